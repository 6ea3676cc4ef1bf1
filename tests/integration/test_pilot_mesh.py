"""shoal pilot drives shoal proxies over xDS: registry contents and Istio rules changed while
everything runs reach the sidecar's routing."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from tests.conftest import Echo, EnvoyProxy, Proxy
from tests.integration.mesh_helpers import (
    PilotProcess,
    destination_rule,
    eventually,
    outbound_port,
    served_by,
    sidecar_config,
    to,
    virtual_service,
)

pytestmark = pytest.mark.slow

REVIEWS = "reviews:9080"


@pytest.fixture
def versions() -> Iterator[dict[str, Echo]]:
    started = {name: Echo(name) for name in ("v1", "v2", "v3")}
    yield started
    for echo in started.values():
        echo.stop()


@pytest.mark.parametrize(
    ("kind", "delta"),
    [(Proxy, False), (EnvoyProxy, False), (Proxy, True), (EnvoyProxy, True)],
    ids=["shoal", "envoy", "shoal-delta", "envoy-delta"],
)
def test_registry_and_rules_changes_reach_a_running_sidecar(
    pilot: PilotProcess, versions: dict[str, Echo], make_proxy: Any, kind: type[Proxy], delta: bool
) -> None:
    for name in ("v1", "v2"):
        pilot.register("reviews", versions[name].port, {"version": name}, service_port=9080)
    pilot.write_rules("reviews-dr.yaml", destination_rule("reviews", "version", "v1", "v2"))
    config = sidecar_config(pilot, "productpage-1", delta=delta)
    proxy = make_proxy(config, kind=kind)
    port = outbound_port(config)

    # no VirtualService: the service's endpoints, all of them (once pilot pushed them)
    eventually(lambda: set(served_by(port, REVIEWS, 20)) == {"v1", "v2"})
    # the bare host name routes too (the first HTTP port)
    assert set(served_by(port, "reviews", 4)) == {"v1", "v2"}

    # canary: 90/10 over 2,000 requests, within ±5%
    pilot.write_rules(
        "reviews-vs.yaml",
        virtual_service("reviews", {"route": [to("reviews", "v1", 90), to("reviews", "v2", 10)]}),
    )
    eventually(lambda: set(served_by(port, REVIEWS, 20)) <= {"v1", "v2"} and pilot.debug())
    eventually(lambda: served_by(port, REVIEWS, 200)["v1"] >= 160)
    counts = served_by(port, REVIEWS, 2000)
    assert abs(counts["v1"] / 2000 - 0.90) <= 0.05, counts
    assert counts["v1"] + counts["v2"] == 2000, counts

    # header-based routing, then everything else to v1
    pilot.write_rules(
        "reviews-vs.yaml",
        virtual_service(
            "reviews",
            {
                "match": [{"headers": {"end-user": {"exact": "jason"}}}],
                "route": [to("reviews", "v2")],
            },
            {"route": [to("reviews", "v1")]},
        ),
    )
    eventually(lambda: served_by(port, REVIEWS, 10, headers={"end-user": "jason"}) == {"v2": 10})
    assert served_by(port, REVIEWS, 20) == {"v1": 20}

    # a new v2 instance registered while running is used by the v2 subset
    instance = pilot.register("reviews", versions["v3"].port, {"version": "v2"}, 9080)
    eventually(lambda: "v3" in served_by(port, REVIEWS, 10, headers={"end-user": "jason"}))
    # ... and removed again
    pilot.deregister("reviews", instance)
    eventually(lambda: served_by(port, REVIEWS, 20, headers={"end-user": "jason"}) == {"v2": 20})

    # a changed cluster (its endpoints unchanged) becomes active: its endpoints come with it,
    # or Envoy would keep it warming and go on with the old one
    rule = destination_rule("reviews", "version", "v1", "v2")
    pool = {"http": {"http1MaxPendingRequests": 7}}
    rule["spec"]["trafficPolicy"] = {"connectionPool": pool}
    pilot.write_rules("reviews-dr.yaml", rule)
    limit = "outbound|9080|v1|reviews::default_priority::max_pending_requests::7"
    eventually(lambda: limit in proxy.admin("/clusters")[1].splitlines())
    assert served_by(port, REVIEWS, 20) == {"v1": 20}
    assert pilot.debug()["nacks"] == 0, pilot.output()


def test_an_app_uses_the_sidecar_as_its_http_proxy(
    pilot: PilotProcess, versions: dict[str, Echo], make_proxy: Any
) -> None:
    pilot.register("ratings", versions["v1"].port, service_port=8080)
    config = sidecar_config(pilot, "app")
    make_proxy(config)
    port = outbound_port(config)
    result = subprocess.run(
        ["curl", "-s", "--max-time", "5", "http://ratings:8080/hello"],
        env={"http_proxy": f"http://127.0.0.1:{port}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        check=True,
    )
    answer = json.loads(result.stdout)
    assert answer["service"] == "v1"
    assert answer["path"] == "/hello"


@pytest.mark.parametrize("kind", [Proxy, EnvoyProxy], ids=["shoal", "envoy"])
def test_a_sidecar_with_an_app_is_an_endpoint_of_its_service(
    pilot: PilotProcess, versions: dict[str, Echo], make_proxy: Any, kind: type[Proxy]
) -> None:
    server = sidecar_config(
        pilot,
        "details-1",
        service="details:9080",
        app_address=f"127.0.0.1:{versions['v2'].port}",
        labels={"version": "v2"},
    )
    server_proxy = make_proxy(server, kind=kind)
    client = sidecar_config(pilot, "productpage-1")
    make_proxy(client, kind=kind)
    port = outbound_port(client)
    # productpage → its sidecar → details' sidecar (inbound) → the details app
    eventually(lambda: served_by(port, "details:9080", 4) == {"v2": 4})
    mesh = pilot.debug()
    details = next(s for s in mesh["services"] if s["host"] == "details")
    assert [i["labels"] for i in details["instances"]] == [{"version": "v2"}]
    # what came over xDS is in /config_dump, as Envoy shows it
    dump = dynamic_names(json.loads(server_proxy.admin("/config_dump")[1]))
    assert dump["listeners"] == {"inbound", "outbound"}
    inbound_port = server["node"]["metadata"]["INBOUND_ADDRESS"].rpartition(":")[2]
    assert {f"inbound|{inbound_port}||details", "outbound|9080||details"} <= dump["clusters"]
    assert dump["routes"] == {"outbound"}


def dynamic_names(dump: dict[str, Any]) -> dict[str, set[str]]:
    """The names of the dynamic listeners, clusters and route tables in a config dump."""
    found: dict[str, set[str]] = {"listeners": set(), "clusters": set(), "routes": set()}
    for config in dump["configs"]:
        for item in config.get("dynamic_listeners", []):
            found["listeners"].add(item["name"])
        for item in config.get("dynamic_active_clusters", []):
            found["clusters"].add(item["cluster"]["name"])
        for item in config.get("dynamic_route_configs", []):
            found["routes"].add(item["route_config"]["name"])
    return found


def test_workers_each_follow_pilot(
    pilot: PilotProcess, versions: dict[str, Echo], make_proxy: Any
) -> None:
    """With --concurrency 2 every worker holds its own stream; the sidecar is one endpoint."""
    server = sidecar_config(
        pilot, "details-1", service="details:9080", app_address=f"127.0.0.1:{versions['v1'].port}"
    )
    make_proxy(server, "--concurrency", "2")
    client = sidecar_config(pilot, "productpage-1")
    make_proxy(client, "--concurrency", "2")
    port = outbound_port(client)
    eventually(lambda: served_by(port, "details:9080", 8) == {"v1": 8})
    clients = pilot.debug()["clients"]
    assert sum(label.startswith("details-1 ") for label in clients) == 2
    details = next(s for s in pilot.debug()["services"] if s["host"] == "details")
    assert len(details["instances"]) == 1
