"""Active health checking against real sockets in this process: an asyncio HTTP/TCP target
whose answers the test flips, and a stand-in cluster that records what the checker does.

Expectations follow Envoy's health checkers (first success heals at once, a bad status
fails at once, network failures and retriable statuses count to the threshold, the
request Envoy sends, its interval rules).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from shoal.config.model import (
    HeaderValueOption,
    HealthCheck,
    HttpHealthCheck,
    SocketAddress,
    TcpHealthCheck,
)
from shoal.upstream.health import HealthChecker, _http_request, _tcp_match
from shoal.upstream.host import Host


class Target:
    """An HTTP/1.1 (or raw TCP) server: ``status`` answers, ``"hang"`` never answers;
    ``close_after_answer`` closes each connection after its answer. Records each request
    head and counts connections."""

    def __init__(
        self,
        status: int | str = 200,
        *,
        tcp_reply: bytes | None = None,
        close_after_answer: bool = False,
    ) -> None:
        self.status = status
        self.tcp_reply = tcp_reply
        self.close_after_answer = close_after_answer
        self.requests: list[bytes] = []
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, port: int = 0) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                if self.tcp_reply is not None:
                    data = await reader.read(100)
                    if not data:
                        return
                    self.requests.append(data)
                    if self.status == 200:
                        writer.write(self.tcp_reply)
                    continue
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                if self.status == "hang":
                    await asyncio.sleep(3600)
                writer.write(b"HTTP/1.1 %d X\r\ncontent-length: 2\r\n\r\nok" % int(self.status))
                if self.close_after_answer:
                    await writer.drain()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


class FakeCluster:
    """What the checker needs of a cluster, recording the calls."""

    def __init__(self, *ports: int) -> None:
        self.hosts = [Host(SocketAddress("127.0.0.1", port)) for port in ports]
        for host in self.hosts:
            host.hc_failed = True  # as ClusterRuntime starts them
            host.update_health()
        self.refreshes = 0
        self.passed: list[Host] = []
        self.traffic = True

    def refresh_health(self) -> None:
        self.refreshes += 1

    def has_traffic(self) -> bool:
        return self.traffic

    def health_check_passed(self, host: Host) -> None:
        self.passed.append(host)


def http_check(**fields: Any) -> HealthCheck:
    checker = fields.pop("checker", HttpHealthCheck(path="/healthz"))
    settings: dict[str, Any] = {
        "timeout": 0.3,
        "interval": 0.02,
        "unhealthy_threshold": 3,
        "healthy_threshold": 2,
        **fields,
    }
    return HealthCheck(checker=checker, **settings)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


# --- the request ---------------------------------------------------------------------------


def test_request_is_what_envoy_sends() -> None:
    """Captured from Envoy 1.40 with ``http_health_check: {path: /healthz}`` on cluster web."""
    request = _http_request(HttpHealthCheck(path="/healthz"), "web")
    assert request == b"GET /healthz HTTP/1.1\r\nhost: web\r\nuser-agent: Envoy/HC\r\n\r\n"


def test_request_host_method_and_header_edits() -> None:
    checker = HttpHealthCheck(
        path="/ready",
        host="svc.local",
        method="HEAD",
        request_headers_to_add=(
            HeaderValueOption("x-a", "1"),
            HeaderValueOption("user-agent", "probe", "overwrite_if_exists_or_add"),
            HeaderValueOption("x-a", "2", "add_if_absent"),
            HeaderValueOption("x-b", "3", "overwrite_if_exists"),
        ),
    )
    assert _http_request(checker, "web") == (
        b"HEAD /ready HTTP/1.1\r\nhost: svc.local\r\nx-a: 1\r\nuser-agent: probe\r\n\r\n"
    )
    removed = HttpHealthCheck(path="/", request_headers_to_remove=frozenset({"user-agent"}))
    assert _http_request(removed, "web") == b"GET / HTTP/1.1\r\nhost: web\r\n\r\n"


def test_tcp_receive_blocks_match_in_order_not_contiguous() -> None:
    assert _tcp_match((), b"")
    assert _tcp_match((b"PO", b"NG"), b"xxPOyyNGzz")
    assert not _tcp_match((b"NG", b"PO"), b"PONG")
    assert not _tcp_match((b"PONG",), b"PON")


# --- intervals -------------------------------------------------------------------------------


def test_intervals_follow_envoys_rules() -> None:
    config = http_check(
        interval=5,
        unhealthy_interval=7,
        unhealthy_edge_interval=3,
        healthy_edge_interval=2,
        no_traffic_interval=60,
        no_traffic_healthy_interval=90,
    )
    cluster = FakeCluster(1)
    checker = HealthChecker(config, cluster, "web")
    changed, pending = 1, 2
    assert checker._interval(True, changed) == 5
    assert checker._interval(True, pending) == 2  # healthy result, threshold not reached yet
    assert checker._interval(False, changed) == 7
    assert checker._interval(False, pending) == 3
    cluster.traffic = False  # no upstream connection for traffic yet
    assert checker._interval(True, changed) == 90
    assert checker._interval(True, pending) == 60
    assert checker._interval(False, changed) == 60


def test_interval_jitter_is_added_never_subtracted() -> None:
    config = http_check(interval=1, interval_jitter=0.5, interval_jitter_percent=20)
    checker = HealthChecker(config, FakeCluster(1), "web", rng=random.Random(3))
    intervals = [checker._interval(True, 0) for _ in range(500)]
    assert all(1.0 <= i < 1.7 for i in intervals)
    assert max(intervals) > 1.5 and len(set(intervals)) > 100


# --- HTTP checks against a live target -----------------------------------------------------


def test_first_success_heals_at_once_then_threshold_rules() -> None:
    async def scenario() -> None:
        target = Target(200)
        await target.start()
        cluster = FakeCluster(target.port)
        host = cluster.hosts[0]
        checker = HealthChecker(http_check(healthy_threshold=3), cluster, "web")
        await checker.start()  # returns once the first check is in
        assert not host.hc_failed and host.healthy  # one success is enough the first time
        assert checker.counters["success"] >= 1 and cluster.refreshes == 1
        assert cluster.passed and cluster.passed[0] is host

        target.status = 503  # not an expected status: unhealthy at once
        await until(lambda: host.hc_failed)
        assert checker.counters["network_failure"] == 0
        failures = checker.counters["failure"]
        assert failures >= 1

        target.status = 200  # now it takes healthy_threshold successes in a row
        successes = checker.counters["success"]
        await until(lambda: not host.hc_failed)
        assert checker.counters["success"] - successes == 3
        assert checker.counters["attempt"] >= checker.counters["success"] + failures
        assert target.connections == 1  # one keep-alive connection for every check
        assert checker.healthy_count() == 1
        checker.close()
        await target.stop()

    run(scenario)


def test_retriable_status_counts_to_the_threshold() -> None:
    async def scenario() -> None:
        target = Target(200)
        await target.start()
        cluster = FakeCluster(target.port)
        host = cluster.hosts[0]
        checker = HealthChecker(
            http_check(
                unhealthy_threshold=4,
                checker=HttpHealthCheck(path="/h", retriable_statuses=((503, 504),)),
            ),
            cluster,
            "web",
        )
        await checker.start()
        failures = checker.counters["failure"]
        target.status = 503
        await until(lambda: host.hc_failed)
        assert checker.counters["failure"] - failures == 4
        checker.close()
        await target.stop()

    run(scenario)


def test_network_failures_count_to_the_threshold() -> None:
    async def scenario() -> None:
        target = Target(200)
        await target.start()
        port = target.port
        cluster = FakeCluster(port)
        host = cluster.hosts[0]
        checker = HealthChecker(http_check(unhealthy_threshold=3), cluster, "web")
        await checker.start()
        await target.stop()  # connection refused from now on
        await until(lambda: host.hc_failed)
        assert checker.counters["network_failure"] == 3
        assert checker.counters["failure"] == 3
        restarted = Target(200)
        await restarted.start(port)
        await until(lambda: not host.hc_failed)  # healthy_threshold (2) successes
        checker.close()
        await restarted.stop()

    run(scenario)


def test_timeout_is_a_network_failure_and_a_down_host_starts_failed() -> None:
    async def scenario() -> None:
        hanging = Target("hang")
        await hanging.start()
        good = Target(200)
        await good.start()
        cluster = FakeCluster(hanging.port, good.port)
        checker = HealthChecker(http_check(timeout=0.1, unhealthy_threshold=1), cluster, "web")
        start = asyncio.get_running_loop().time()
        await checker.start()  # waits for the first result of both hosts: the timeout
        assert asyncio.get_running_loop().time() - start >= 0.09
        assert [h.hc_failed for h in cluster.hosts] == [True, False]
        assert checker.counters["network_failure"] == 1
        checker.close()
        await hanging.stop()
        await good.stop()

    run(scenario)


def test_idle_close_by_the_upstream_is_no_failure() -> None:
    """An upstream that closes each connection after answering: Envoy reconnects for the
    next check without counting a failure."""

    async def scenario() -> None:
        target = Target(200, close_after_answer=True)
        await target.start()
        cluster = FakeCluster(target.port)
        checker = HealthChecker(http_check(), cluster, "web")
        await checker.start()
        await until(lambda: checker.counters["success"] >= 5)
        assert checker.counters["failure"] == 0
        assert target.connections >= 5
        checker.close()
        await target.stop()

    run(scenario)


def test_reuse_connection_false_opens_one_per_check() -> None:
    async def scenario() -> None:
        target = Target(200)
        await target.start()
        cluster = FakeCluster(target.port)
        checker = HealthChecker(http_check(reuse_connection=False), cluster, "web")
        await checker.start()
        await until(lambda: checker.counters["success"] >= 4)
        assert target.connections >= 4
        checker.close()
        await target.stop()

    run(scenario)


def test_hosts_changed_checks_new_hosts_and_stops_removed_ones() -> None:
    async def scenario() -> None:
        first, second = Target(200), Target(200)
        await first.start()
        await second.start()
        cluster = FakeCluster(first.port)
        checker = HealthChecker(http_check(), cluster, "web")
        await checker.start()
        added = Host(SocketAddress("127.0.0.1", second.port))
        added.hc_failed = True
        cluster.hosts = [added]
        checker.hosts_changed(cluster.hosts)
        await until(lambda: not added.hc_failed)
        seen = len(first.requests)
        await asyncio.sleep(0.1)
        assert len(first.requests) == seen  # no longer checked
        checker.close()
        await first.stop()
        await second.stop()

    run(scenario)


# --- TCP checks ------------------------------------------------------------------------------


@pytest.mark.parametrize("receive", [(), (b"PO", b"NG")])
def test_tcp_check_sends_and_expects(receive: tuple[bytes, ...]) -> None:
    async def scenario() -> None:
        target = Target(200, tcp_reply=b"PONG")
        await target.start()
        cluster = FakeCluster(target.port)
        host = cluster.hosts[0]
        config = http_check(
            unhealthy_threshold=2, checker=TcpHealthCheck(send=b"PING", receive=receive)
        )
        checker = HealthChecker(config, cluster, "web")
        await checker.start()
        assert not host.hc_failed
        assert target.requests[0] == b"PING"
        target.status = 0  # stays silent: only a check that expects a reply fails
        if receive:
            await until(lambda: host.hc_failed)  # two timeouts
            assert checker.counters["network_failure"] == 2
        else:
            await asyncio.sleep(0.4)
            assert not host.hc_failed
        checker.close()
        await target.stop()

    run(scenario)


def test_closing_during_the_first_round_does_not_hang_start() -> None:
    async def scenario() -> None:
        hanging = Target("hang")
        await hanging.start()
        checker = HealthChecker(http_check(timeout=30), FakeCluster(hanging.port), "web")
        starting = asyncio.create_task(checker.start())
        await asyncio.sleep(0.1)
        assert not starting.done()
        checker.close()
        await asyncio.wait_for(starting, 2)
        await hanging.stop()

    run(scenario)
