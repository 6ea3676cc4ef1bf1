"""Active health checking end to end: a real ``shoal proxy`` checks real upstreams (HTTP and
TCP checks) while real clients send traffic; an upstream that starts failing its checks
stops getting traffic within about interval x threshold, and gets it again once it
passes; ``/stats/prometheus`` shows Envoy's ``health_check.*`` counters and gauges.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from tests.conftest import bootstrap, free_port, http_listener, route_to, static_cluster
from tests.integration.flaky_upstream import FlakyUpstream, served_by, wait_for

INTERVAL = 0.2


def health_check(**fields: Any) -> dict[str, Any]:
    return {
        "timeout": "0.5s",
        "interval": f"{INTERVAL}s",
        "no_traffic_interval": f"{INTERVAL}s",
        "unhealthy_threshold": 2,
        "healthy_threshold": 2,
        "http_health_check": {"path": "/healthz"},
        **fields,
    }


def config(upstreams: list[FlakyUpstream], check: dict[str, Any]) -> tuple[dict[str, Any], int]:
    port = free_port()
    cluster = static_cluster(
        "svc", *(u.port for u in upstreams), connect_timeout="0.5s", health_checks=[check]
    )
    listener = http_listener(port, [{"name": "all", "domains": ["*"], "routes": [route_to("svc")]}])
    return bootstrap([listener], [cluster], free_port()), port


@pytest.fixture
def upstreams() -> Iterator[list[FlakyUpstream]]:
    started = [FlakyUpstream("a"), FlakyUpstream("b")]
    yield started
    for upstream in started:
        upstream.stop()


def test_failing_check_takes_the_host_out_and_passing_brings_it_back(
    make_proxy: Any, upstreams: list[FlakyUpstream]
) -> None:
    b = upstreams[1]
    data, port = config(upstreams, health_check())
    proxy = make_proxy(data)
    assert proxy.stats()["cluster.svc.health_check.healthy"] == 2
    assert set(served_by(port, 10)) == {"a", "b"}

    b.health = 503  # not an expected status: out at its next check
    took = wait_for(lambda: proxy.stats()["cluster.svc.membership_healthy"] == 1)
    assert took < INTERVAL * 2 + 1.0
    assert served_by(port, 20) == {"a": 20}

    b.health = 200  # back after healthy_threshold passing checks
    took = wait_for(lambda: proxy.stats()["cluster.svc.membership_healthy"] == 2)
    assert took < INTERVAL * 3 + 1.0
    assert set(served_by(port, 10)) == {"a", "b"}

    stats = proxy.stats()
    assert stats["cluster.svc.health_check.failure"] >= 1
    assert stats["cluster.svc.health_check.network_failure"] == 0
    assert stats["cluster.svc.health_check.success"] >= 4
    assert stats["cluster.svc.health_check.attempt"] >= stats["cluster.svc.health_check.success"]
    assert f"svc::127.0.0.1:{b.port}::health_flags::healthy" in proxy.admin("/clusters")[1]
    text = proxy.admin("/stats/prometheus")[1]
    assert "# TYPE envoy_cluster_health_check_failure counter" in text
    assert 'envoy_cluster_health_check_healthy{envoy_cluster_name="svc"} 2' in text
    assert 'envoy_cluster_membership_healthy{envoy_cluster_name="svc"} 2' in text


@pytest.mark.parametrize("kind", ["http", "tcp"])
def test_stopped_upstream_is_out_after_the_threshold_and_back_when_restarted(
    make_proxy: Any, upstreams: list[FlakyUpstream], kind: str
) -> None:
    b = upstreams[1]
    check = health_check()
    if kind == "tcp":  # connecting is the check
        del check["http_health_check"]
        check["tcp_health_check"] = {}
    data, port = config(upstreams, check)
    proxy = make_proxy(data)
    assert set(served_by(port, 10)) == {"a", "b"}

    b.stop()  # connections refused: two network failures in a row take it out
    took = wait_for(lambda: proxy.stats()["cluster.svc.membership_healthy"] == 1)
    assert took < INTERVAL * 2 + 1.5
    assert served_by(port, 20) == {"a": 20}  # no 503 for the dead host
    assert proxy.stats()["cluster.svc.health_check.network_failure"] >= 2

    b.start()
    wait_for(lambda: proxy.stats()["cluster.svc.membership_healthy"] == 2)
    assert set(served_by(port, 10)) == {"a", "b"}
    flags = proxy.admin("/clusters")[1]
    assert f"svc::127.0.0.1:{b.port}::health_flags::healthy" in flags


def test_host_down_at_startup_never_gets_traffic(
    make_proxy: Any, upstreams: list[FlakyUpstream]
) -> None:
    """Hosts start failed until their first check passes, and the proxy is ready only once
    every host was checked (Envoy's cluster warming)."""
    b = upstreams[1]
    b.stop()
    data, port = config(upstreams, health_check())
    proxy = make_proxy(data)
    stats = proxy.stats()
    assert stats["cluster.svc.membership_healthy"] == 1
    assert stats["cluster.svc.health_check.healthy"] == 1
    assert served_by(port, 10) == {"a": 10}
    clusters = proxy.admin("/clusters")[1]
    assert f"svc::127.0.0.1:{b.port}::health_flags::/failed_active_hc" in clusters


def test_every_host_failing_panics_and_uses_them_all(
    make_proxy: Any, upstreams: list[FlakyUpstream]
) -> None:
    """Below the 50% panic threshold Envoy balances over all hosts, healthy or not."""
    data, port = config(upstreams, health_check())
    proxy = make_proxy(data)
    for upstream in upstreams:
        upstream.health = 500
    wait_for(lambda: proxy.stats()["cluster.svc.membership_healthy"] == 0)
    assert set(served_by(port, 10)) == {"a", "b"}


def test_timeouts_count_as_network_failures(
    make_proxy: Any, upstreams: list[FlakyUpstream]
) -> None:
    b = upstreams[1]
    data, port = config(upstreams, health_check(timeout="0.2s"))
    proxy = make_proxy(data)
    b.health = "hang"
    wait_for(lambda: proxy.stats()["cluster.svc.membership_healthy"] == 1)
    assert proxy.stats()["cluster.svc.health_check.network_failure"] >= 2
    assert served_by(port, 10) == {"a": 10}
