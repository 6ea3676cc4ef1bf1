"""Backup requests (``shoal.backup_request``): a request still unanswered after the route's
latency percentile gets one more try on another host; the first answer wins, the other try
is dropped, and max_ratio caps how many requests get one. Real proxy, real sockets, hosts
with their own latency in a process of their own (``latency_upstream.py``)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from tests.conftest import ROOT, bootstrap, free_port, http_listener, static_cluster
from tests.integration.flaky_upstream import wait_for

KEY = "shoal.backup_request"


class Hosts:
    """Upstream hosts, one per delay (ms), served by ``latency_upstream.py``."""

    def __init__(self, *delays_ms: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.latency_upstream", *map(str, delays_ms)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self.ports: list[int] = json.loads(self.proc.stdout.readline())

    def stats(self) -> list[dict[str, int]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.ports[0], timeout=5)
        try:
            conn.request("GET", "/__stats")
            result: list[dict[str, int]] = json.loads(conn.getresponse().read())
            return result
        finally:
            conn.close()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def one_slow() -> Iterator[Hosts]:
    hosts = Hosts(300, 0, 0, 0)
    yield hosts
    hosts.stop()


def _route(name: str, cluster: str, policy: dict[str, Any] | None) -> dict[str, Any]:
    """Route ``name`` matches ``/name``."""
    route: dict[str, Any] = {
        "name": name,
        "match": {"prefix": f"/{name}"},
        "route": {"cluster": cluster, "timeout": "5s"},
    }
    if policy is not None:
        route["metadata"] = {"filter_metadata": {KEY: policy}}
    return route


def _proxy(make_proxy: Any, hosts: Hosts, routes: list[dict[str, Any]], **listener: Any) -> Any:
    """A proxy whose routes go to clusters of all ``hosts`` (round robin, one cluster per
    route so that each route's requests are spread evenly)."""
    port = free_port()
    vhost = {"name": "v", "domains": ["*"], "routes": routes}
    limits = {"thresholds": [{"max_retries": 1000}]}  # the ratio, not max_retries, is tested
    clusters = [
        static_cluster(route["route"]["cluster"], *hosts.ports, circuit_breakers=limits)
        for route in routes
    ]
    proxy = make_proxy(
        bootstrap([{**http_listener(port, [vhost]), **listener}], clusters, free_port())
    )
    proxy.port = port
    return proxy


def _load(port: int, path: str, total: int, clients: int = 8) -> list[float]:
    """``total`` GETs from ``clients`` keep-alive connections at once: each one's latency."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client(count: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for _ in range(count):
                started = time.monotonic()
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                elapsed = time.monotonic() - started
                assert response.status == 200
                with lock:
                    latencies.append(elapsed)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(total // clients,)) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(latencies) == total // clients * clients
    return latencies


def _p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[max(0, -(-99 * len(ordered) // 100) - 1)]


def _rq_active(proxy: Any) -> list[int]:
    text = proxy.admin("/clusters")[1]
    return [int(line.rsplit("::", 1)[1]) for line in text.splitlines() if "::rq_active::" in line]


def test_backups_cut_the_tail_of_one_slow_host(make_proxy: Any, one_slow: Hosts) -> None:
    policy = {
        "percentile": 50,
        "max_ratio": 0.5,
        "min_delay": "50ms",
        "max_delay": "100ms",
        "window": 100,
        "minimum_samples": 20,
    }
    proxy = _proxy(
        make_proxy, one_slow, [_route("backup", "a", policy), _route("plain", "b", None)]
    )
    without = _load(proxy.port, "/plain", 200)
    plain = one_slow.stats()[0]
    _load(proxy.port, "/backup", 40)  # learn the latencies: the delay comes down to 50 ms
    assert proxy.stats()["route.backup.backup_request.delay_ms"] == 50
    with_backups = _load(proxy.port, "/backup", 200)
    # a quarter of the requests reach the 300 ms host: its answers are the plain route's
    # tail, while backups answer them after 50 ms + a fast host's time
    assert _p99(without) >= 0.29
    assert _p99(with_backups) < 0.2, sorted(with_backups)[-5:]
    stats = proxy.stats()
    sent = stats["route.backup.backup_request.sent"]
    won = stats["route.backup.backup_request.won"]
    assert stats["route.backup.backup_request.capped"] == 0
    # the slow host's requests were all overtaken: its connection closed before its answer
    wait_for(lambda: one_slow.stats()[0]["active"] == 0)
    slow = {k: v - plain[k] for k, v in one_slow.stats()[0].items()}
    assert slow["hits"] >= 40  # about a quarter of the 240
    assert slow["cancelled"] == slow["hits"] and slow["answered"] == 0
    assert slow["hits"] <= won <= sent <= won + 3  # a fast host rarely needs 50 ms
    # a backup counts as a retry (as hedged tries do) and as a try on the wire
    assert stats["cluster.a.upstream_rq_retry"] == sent
    assert stats["cluster.a.upstream_rq_retry_success"] == won
    assert stats["cluster.a.upstream_rq_total"] == 240 + sent
    assert stats["cluster.b.upstream_rq_retry"] == 0
    # every host's active request was given back
    assert _rq_active(proxy) == [0] * 8
    assert stats["cluster.a.upstream_rq_active"] == 0


def test_max_ratio_caps_backups_when_every_host_is_slow(make_proxy: Any) -> None:
    hosts = Hosts(100, 100, 100, 100)
    try:
        # the window never fills: every request waits max_delay (20 ms), then wants a backup
        policy = {"max_ratio": 0.1, "max_delay": "20ms", "window": 1000, "minimum_samples": 1000}
        proxy = _proxy(make_proxy, hosts, [_route("all", "all", policy)])
        _load(proxy.port, "/all", 200)
        stats = proxy.stats()
        sent = stats["route.all.backup_request.sent"]
        capped = stats["route.all.backup_request.capped"]
        assert sent + capped == 200  # every request reached its delay
        assert 15 <= sent <= 200 * 0.1 + 1  # the budget started empty: ≤ 10% of requests
        assert stats["cluster.all.upstream_rq_total"] == 200 + sent
        assert sum(h["hits"] for h in hosts.stats()) == 200 + sent
        wait_for(lambda: all(h["active"] == 0 for h in hosts.stats()))
        assert _rq_active(proxy) == [0] * 4
    finally:
        hosts.stop()


def test_the_retry_circuit_breaker_also_caps_backups(make_proxy: Any) -> None:
    hosts = Hosts(200, 200)
    try:
        policy = {"max_ratio": 1, "max_delay": "20ms", "minimum_samples": 1000}
        port = free_port()
        cluster = static_cluster(
            "pair", *hosts.ports, circuit_breakers={"thresholds": [{"max_retries": 1}]}
        )
        vhost = {"name": "v", "domains": ["*"], "routes": [_route("r", "pair", policy)]}
        proxy = make_proxy(bootstrap([http_listener(port, [vhost])], [cluster], free_port()))
        _load(port, "/r", 8, clients=4)  # 4 at once: only one backup may run at a time
        stats = proxy.stats()
        sent = stats["route.r.backup_request.sent"]
        overflow = stats["cluster.pair.upstream_rq_retry_overflow"]
        assert sent >= 1 and overflow >= 1
        assert sent + overflow == 8  # max_ratio 1 allowed every one
        assert stats["route.r.backup_request.capped"] == overflow
        assert stats["cluster.pair.upstream_rq_retry"] == sent
    finally:
        hosts.stop()


def test_a_post_body_is_replayed_to_the_backup(make_proxy: Any) -> None:
    hosts = Hosts(600, 0)
    try:
        policy = {"max_delay": "30ms", "minimum_samples": 1000, "max_ratio": 1}
        proxy = _proxy(
            make_proxy,
            hosts,
            [_route("upload", "pair", policy)],
            per_connection_buffer_limit_bytes=256 * 1024,
        )
        body = os.urandom(200 * 1024)
        served = []
        for chunked in (False, True, False, True):
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
            started = time.monotonic()
            if chunked:
                chunks = (body[i : i + 50_000] for i in range(0, len(body), 50_000))
                conn.request("POST", "/upload", body=chunks, encode_chunked=True)
            else:
                conn.request("POST", "/upload", body=body)
            response = conn.getresponse()
            answer = json.loads(response.read())
            elapsed = time.monotonic() - started
            conn.close()
            assert answer == {"body_bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
            served.append(response.getheader("x-served-by"))
            assert elapsed < 0.5  # the slow host's requests were answered by the backup
        assert served == ["1"] * 4  # the first tries on the slow host were overtaken
        sent = proxy.stats()["route.upload.backup_request.sent"]
        assert sent == hosts.stats()[0]["hits"] >= 2

        # a body larger than the listener's buffer limit is not kept: it cannot go twice
        big = os.urandom(300 * 1024)
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        answers = []
        for _ in range(2):  # one of the two goes to the slow host and must wait for it
            conn.request("POST", "/upload", body=big)
            response = conn.getresponse()
            answers.append((response.getheader("x-served-by"), json.loads(response.read())))
        conn.close()
        assert sorted(a[0] for a in answers) == ["0", "1"]
        assert all(a[1]["sha256"] == hashlib.sha256(big).hexdigest() for a in answers)
        assert proxy.stats()["route.upload.backup_request.sent"] == sent
    finally:
        hosts.stop()


def test_a_backup_that_fails_leaves_the_first_try_to_answer(make_proxy: Any) -> None:
    hosts = Hosts(200, -1)  # the backup's host resets every request
    try:
        policy = {"max_delay": "20ms", "minimum_samples": 1000, "max_ratio": 1}
        proxy = _proxy(make_proxy, hosts, [_route("r", "pair", policy)])
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        for _ in range(3):  # the backups take the reset host's turns: all start on the slow one
            started = time.monotonic()
            conn.request("GET", "/r")
            response = conn.getresponse()
            response.read()
            assert (response.status, response.getheader("x-served-by")) == (200, "0")
            assert 0.19 < time.monotonic() - started < 1.0
        conn.close()
        stats = proxy.stats()
        assert stats["route.r.backup_request.sent"] == 3
        assert stats["route.r.backup_request.won"] == 0
        assert stats["cluster.pair.upstream_rq_rx_reset"] == 3
        assert stats["cluster.pair.upstream_rq_retry_success"] == 0
        assert [h["hits"] for h in hosts.stats()] == [3, 3]
        assert _rq_active(proxy) == [0, 0]
    finally:
        hosts.stop()


def _h2load(port: int, path: str, total: int) -> str:
    """``total`` h2c GETs, 4 connections x 2 streams; h2load's report."""
    run = subprocess.run(
        ["h2load", "-n", str(total), "-c", "4", "-m", "2", f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert f"{total} succeeded" in run.stdout, run.stdout
    return run.stdout


def _max_ms(report: str) -> float:
    """The slowest request's time in h2load's report (``time for request: min max ...``)."""
    fields = next(line for line in report.splitlines() if "time for request:" in line).split()
    value = fields[4]
    return float(value[:-2]) if value.endswith("ms") else float(value[:-2]) / 1000.0


def test_backups_on_http2_streams(make_proxy: Any, one_slow: Hosts) -> None:
    """The same for HTTP/2 clients (h2load; the hosts speak HTTP/1.1, so each stream is
    translated): streams that reach the slow host are overtaken by their backup."""
    policy = {
        "percentile": 50,
        "max_ratio": 0.5,
        "min_delay": "50ms",
        "max_delay": "100ms",
        "window": 100,
        "minimum_samples": 20,
    }
    proxy = _proxy(make_proxy, one_slow, [_route("backup", "a", policy)])
    _h2load(proxy.port, "/backup", 40)  # learn the latencies
    assert proxy.stats()["route.backup.backup_request.delay_ms"] == 50
    report = _h2load(proxy.port, "/backup", 200)
    assert _max_ms(report) < 250, report  # not the slow host's 300 ms
    stats = proxy.stats()
    sent, won = stats["route.backup.backup_request.sent"], stats["route.backup.backup_request.won"]
    assert won >= 30 and sent >= won  # about a quarter of the 240 met the slow host
    assert stats["cluster.a.upstream_rq_retry"] == sent
    wait_for(lambda: one_slow.stats()[0]["active"] == 0)
    wait_for(lambda: _rq_active(proxy) == [0] * 4)
    assert proxy.stats()["cluster.a.upstream_rq_active"] == 0
