"""Outlier detection end to end: a real ``shoal proxy`` in front of four real upstreams;
one (or three) start failing, the proxy ejects them from the load balancer, respects
max_ejection_percent, and takes them back when their ejection time is over.
``/stats/prometheus`` shows Envoy's ``outlier_detection.*`` counters and gauge.

These need the proxy to report each upstream result to the cluster's outlier detector
(``ClusterRuntime.outlier.record_response`` / ``record_local_failure``) from
``proxy/http.py``.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from tests.conftest import bootstrap, free_port, http_listener, route_to, static_cluster
from tests.integration.flaky_upstream import FlakyUpstream, served_by, wait_for


def config(upstreams: list[FlakyUpstream], **outlier: Any) -> tuple[dict[str, Any], int]:
    port = free_port()
    cluster = static_cluster(
        "svc", *(u.port for u in upstreams), connect_timeout="0.5s", outlier_detection=outlier
    )
    listener = http_listener(port, [{"name": "all", "domains": ["*"], "routes": [route_to("svc")]}])
    return bootstrap([listener], [cluster], free_port()), port


@pytest.fixture
def upstreams() -> Iterator[list[FlakyUpstream]]:
    started = [FlakyUpstream(name) for name in "abcd"]
    yield started
    for upstream in started:
        upstream.stop()


def outlier_stats(proxy: Any) -> dict[str, int]:
    prefix = "cluster.svc.outlier_detection."
    return {k[len(prefix) :]: v for k, v in proxy.stats().items() if k.startswith(prefix)}


def test_failing_upstream_is_ejected_and_returns_after_its_time(
    make_proxy: Any, upstreams: list[FlakyUpstream]
) -> None:
    bad = upstreams[3]
    data, port = config(
        upstreams,
        consecutive_5xx=3,
        interval="0.5s",
        base_ejection_time="1s",
        max_ejection_percent=50,
    )
    proxy = make_proxy(data)
    assert outlier_stats(proxy)["ejections_active"] == 0
    bad.status = 500
    first = served_by(port, 16)  # round robin: the bad one answers 4 times, ejected at 3
    assert first["d"] == 3 and sum(first.values()) == 16
    after = served_by(port, 30)
    assert "d" not in after and sum(after.values()) == 30
    stats = outlier_stats(proxy)
    assert stats["ejections_active"] == 1
    assert stats["ejections_enforced_consecutive_5xx"] == 1
    assert stats["ejections_detected_consecutive_5xx"] == 1
    assert stats["ejections_enforced_total"] == 1
    assert proxy.stats()["cluster.svc.membership_healthy"] == 3
    clusters = proxy.admin("/clusters")[1]
    assert f"svc::127.0.0.1:{bad.port}::health_flags::/failed_outlier_check" in clusters
    text = proxy.admin("/stats/prometheus")[1]
    assert 'envoy_cluster_outlier_detection_ejections_active{envoy_cluster_name="svc"} 1' in text
    assert (
        'envoy_cluster_outlier_detection_ejections_enforced_total{envoy_cluster_name="svc"} 1'
        in text
    )

    bad.status = 200  # back at the first interval tick after base_ejection_time
    took = wait_for(lambda: "d" in served_by(port, 4))
    assert took < 1.0 + 0.5 + 1.0
    assert outlier_stats(proxy)["ejections_active"] == 0
    assert set(served_by(port, 8)) == {"a", "b", "c", "d"}


def test_three_of_four_failing_with_max_50_percent_ejects_at_most_two(
    make_proxy: Any, upstreams: list[FlakyUpstream]
) -> None:
    data, port = config(upstreams, consecutive_5xx=2, max_ejection_percent=50)
    proxy = make_proxy(data)
    for upstream in upstreams[1:]:
        upstream.status = 500
    served_by(port, 60)
    stats = outlier_stats(proxy)
    assert stats["ejections_active"] == 2
    assert stats["ejections_enforced_total"] == 2
    assert stats["ejections_overflow"] >= 1
    assert proxy.stats()["cluster.svc.membership_healthy"] == 2
    # the good one and the failing one that could not be ejected share the traffic
    assert len(served_by(port, 20)) == 2
    text = proxy.admin("/stats/prometheus")[1]
    assert 'envoy_cluster_outlier_detection_ejections_active{envoy_cluster_name="svc"} 2' in text


def test_refused_connections_eject_too(make_proxy: Any, upstreams: list[FlakyUpstream]) -> None:
    """Without split_external_local_origin_errors a connect failure counts as a 503."""
    data, port = config(upstreams, consecutive_5xx=3, max_ejection_percent=50)
    proxy = make_proxy(data)
    upstreams[3].stop()
    first = served_by(port, 16)
    assert first["503"] == 3  # the proxy's own 503s for the dead host, then it is ejected
    assert served_by(port, 20)["503"] == 0
    assert outlier_stats(proxy)["ejections_enforced_consecutive_5xx"] == 1


def test_failure_percentage_ejects_within_an_interval(
    make_proxy: Any, upstreams: list[FlakyUpstream]
) -> None:
    interval = 1.0
    data, port = config(
        upstreams,
        consecutive_5xx=100000,  # only the interval's failure percentage may eject
        interval=f"{interval}s",
        base_ejection_time="30s",
        max_ejection_percent=50,
        success_rate_minimum_hosts=100,
        enforcing_failure_percentage=100,
        failure_percentage_minimum_hosts=4,
        failure_percentage_request_volume=5,
    )
    proxy = make_proxy(data)
    bad = upstreams[3]
    bad.status = 500
    start = time.monotonic()
    while "d" in served_by(port, 8):
        assert time.monotonic() - start < 3 * interval + 1, "not ejected in time"
    # detection runs at each interval tick over the interval just ended: within two
    assert time.monotonic() - start < 2 * interval + 1
    stats = outlier_stats(proxy)
    assert stats["ejections_detected_failure_percentage"] == 1
    assert stats["ejections_enforced_failure_percentage"] == 1
    assert stats["ejections_active"] == 1


TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


def test_tcp_proxy_connect_failures_eject(make_proxy: Any, upstreams: list[FlakyUpstream]) -> None:
    """The TCP proxy reports connect failures and successes too (Envoy's tcp_proxy)."""
    port = free_port()
    cluster = static_cluster(
        "svc",
        *(u.port for u in upstreams),
        connect_timeout="0.5s",
        outlier_detection={"consecutive_5xx": 2, "max_ejection_percent": 50},
    )
    listener = {
        "name": "tcp",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {
                            "@type": TCP_PROXY,
                            "stat_prefix": "tcp",
                            "cluster": "svc",
                        },
                    }
                ]
            }
        ],
    }
    proxy = make_proxy(bootstrap([listener], [cluster], free_port()))
    upstreams[3].stop()

    def exchange() -> str:
        """One request through the TCP proxy on its own connection: who answered ("" if the
        proxy closed the connection)."""
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n")
            data = b""
            with contextlib.suppress(ConnectionResetError):
                while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < 1:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
        return data.split(b"\r\n\r\n", 1)[1].decode() if b"\r\n\r\n" in data else ""

    first = Counter(exchange() for _ in range(12))
    assert first[""] == 2  # two refused connections to the dead host, then it is ejected
    assert Counter(exchange() for _ in range(12))[""] == 0
    stats = outlier_stats(proxy)
    assert stats["ejections_enforced_consecutive_5xx"] == 1
    assert stats["ejections_active"] == 1
