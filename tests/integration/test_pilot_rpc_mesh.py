"""RPC services through pilot: real Dubbo and SOFA Bolt servers (Node.js peers) registered in
pilot's embedded registry, RpcRoutes in its config dir, and real clients calling through a
shoal proxy's RPC listener (node metadata RPC_OUTBOUND_ADDRESS) and a server sidecar's
inbound listener."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from tests.conftest import free_port
from tests.integration.mesh_helpers import PilotProcess, eventually, sidecar_config
from tests.integration.rpc_peers import Protocol, RpcServer, run_client, whoami

pytestmark = pytest.mark.slow

GREETER = "com.example.Greeter"
PORTS: dict[Protocol, int] = {"dubbo": 20880, "bolt": 12200}


@pytest.fixture(params=["dubbo", "bolt"])
def protocol(request: pytest.FixtureRequest) -> Protocol:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def servers(protocol: Protocol) -> Iterator[dict[str, RpcServer]]:
    with RpcServer(protocol, "v1") as v1, RpcServer(protocol, "v2") as v2:
        yield {"v1": v1, "v2": v2}


def register(pilot: PilotProcess, servers: dict[str, RpcServer], host: str = GREETER) -> None:
    """Each server as an instance of ``host``'s RPC port, labelled with its version."""
    for label, server in servers.items():
        port = PORTS[server.protocol]
        protocol = server.protocol.upper()
        pilot.register(host, server.port, {"version": label}, service_port=port, protocol=protocol)


def subsets(host: str = GREETER) -> dict[str, Any]:
    """A DestinationRule with subsets v1 and v2 (by the label ``version``)."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": host.lower()},
        "spec": {
            "host": host,
            "subsets": [{"name": v, "labels": {"version": v}} for v in ("v1", "v2")],
        },
    }


def rpc_route(*routes: dict[str, Any], host: str = GREETER) -> dict[str, Any]:
    return {
        "apiVersion": "shoal.io/v1",
        "kind": "RpcRoute",
        "metadata": {"name": host.lower()},
        "spec": {"hosts": [host], "routes": list(routes)},
    }


def to(subset: str, host: str = GREETER, weight: int | None = None) -> dict[str, Any]:
    destination: dict[str, Any] = {"destination": {"host": host, "subset": subset}}
    return destination if weight is None else {**destination, "weight": weight}


def client_proxy(pilot: PilotProcess, make_proxy: Any) -> int:
    """A shoal proxy with an RPC listener; returns its port."""
    port = free_port()
    make_proxy(sidecar_config(pilot, "client", rpc_outbound_address=f"127.0.0.1:{port}"))
    return port


def answers(protocol: Protocol, port: int, count: int = 1, **options: Any) -> Counter[str]:
    """Who answered ``sayHello`` through the proxy (the server's label), or the errors."""
    report = run_client(protocol, port, args=["mesh"], count=count, **options)
    seen = Counter(str(result).partition(":")[0] for result in report["results"])
    seen.update(f"error {e['code']}: {e['message']}" for e in report["errors"])
    return seen


def mesh_with_routes(
    pilot: PilotProcess, make_proxy: Any, servers: dict[str, RpcServer], *routes: dict[str, Any]
) -> int:
    """The servers registered, a client proxy, subsets v1 and v2 and an RpcRoute of
    ``routes`` for the Greeter; returns the proxy's RPC port."""
    register(pilot, servers)
    port = client_proxy(pilot, make_proxy)
    pilot.write_rules("greeter.yaml", subsets(), rpc_route(*routes))
    return port


def test_method_routing_between_two_versions(
    pilot: PilotProcess, make_proxy: Any, protocol: Protocol, servers: dict[str, RpcServer]
) -> None:
    port = mesh_with_routes(
        pilot,
        make_proxy,
        servers,
        {"name": "hello", "match": {"method": {"exact": "sayHello"}}, "route": [to("v2")]},
        {"route": [to("v1")]},
    )
    # six in a row: before the rules, the default cluster alternates between v1 and v2
    eventually(lambda: answers(protocol, port, count=6) == {"v2": 6}, timeout=20)
    assert answers(protocol, port, count=10) == {"v2": 10}
    assert whoami(protocol, port)["label"] == "v1"  # any other method
    assert pilot.debug()["rule_errors"] == []


def test_canary_by_attachment_and_weights(
    pilot: PilotProcess, make_proxy: Any, servers: dict[str, RpcServer]
) -> None:
    protocol = servers["v1"].protocol
    port = mesh_with_routes(
        pilot,
        make_proxy,
        servers,
        {"match": {"attributes": {"user": {"exact": "alice"}}}, "route": [to("v2")]},
        {"route": [to("v1", weight=50), to("v2", weight=50)]},
    )
    alice = {"attachments": {"user": "alice"}}
    eventually(lambda: answers(protocol, port, count=6, **alice) == {"v2": 6}, timeout=20)
    assert answers(protocol, port, count=10, **alice) == {"v2": 10}
    split = answers(protocol, port, count=40, attachments={"user": "bob"})
    assert set(split) == {"v1", "v2"}, split  # 50/50: both, barring 1 in 5e11


def test_dubbo_and_bolt_share_one_listener_through_the_inspector(
    pilot: PilotProcess, make_proxy: Any
) -> None:
    bolt_host = "com.example.BoltGreeter"
    with (
        RpcServer("dubbo", "dubbo-v1") as dubbo,
        RpcServer("bolt", "bolt-v1", interface=bolt_host) as bolt,
    ):
        register(pilot, {"v1": dubbo})
        register(pilot, {"v1": bolt}, host=bolt_host)
        port = client_proxy(pilot, make_proxy)
        eventually(lambda: answers("dubbo", port) == {"dubbo-v1": 1}, timeout=20)
        assert answers("bolt", port, interface=bolt_host) == {"bolt-v1": 1}


def test_a_call_through_the_client_proxy_and_the_server_sidecar(
    pilot: PilotProcess, make_proxy: Any
) -> None:
    """The server sidecar registers itself (SERVICE host:port, its LABELS) and speaks Dubbo
    on its inbound listener: the service's port is DUBBO by a ServiceEntry."""
    entry = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "greeter"},
        "spec": {
            "hosts": [GREETER],
            "ports": [{"number": 20880, "name": "dubbo", "protocol": "DUBBO"}],
            "resolution": "STATIC",
        },
    }
    pilot.write_rules("greeter.yaml", entry)
    with RpcServer("dubbo", "app") as app:
        server = make_proxy(
            sidecar_config(
                pilot,
                "server",
                service=f"{GREETER}:20880",
                app_address=app.address,
                labels={"version": "v1"},
            )
        )
        port = free_port()
        client = make_proxy(
            sidecar_config(pilot, "client", rpc_outbound_address=f"127.0.0.1:{port}")
        )
        eventually(lambda: answers("dubbo", port) == {"app": 1}, timeout=20)
        assert answers("dubbo", port, count=5) == {"app": 5}
    # both sidecars report Istio's metrics for the calls, as pilot's metrics store reads them
    for proxy, reporter in ((client, "source"), (server, "destination")):
        metrics = proxy.admin("/stats/prometheus")[1]
        series = [
            line
            for line in metrics.splitlines()
            if line.startswith("istio_requests_total{") and f'reporter="{reporter}"' in line
        ]
        assert any('request_protocol="dubbo"' in line for line in series), series
        assert any(f'destination_service="{GREETER}"' in line for line in series), series


def test_an_rpc_route_on_an_http_service_is_a_rule_error(pilot: PilotProcess) -> None:
    pilot.register("web", free_port(), service_port=80)
    pilot.write_rules(
        "web.yaml", rpc_route({"route": [{"destination": {"host": "web"}}]}, host="web")
    )
    expected = (
        f"{pilot.config_dir}/web.yaml: RpcRoute default/web: spec.hosts[0]: web has no DUBBO, "
        "BOLT or MOTAN2 port (it has 80/HTTP)"
    )
    eventually(lambda: pilot.debug()["rule_errors"] == [expected])
    assert f"rules rejected: {expected}" in pilot.output()
