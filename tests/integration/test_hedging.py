"""Hedging (Envoy's hedge_on_per_try_timeout): a per-try timeout starts another try but
keeps the first; whichever answers first wins, the other is dropped."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from tests.conftest import bootstrap, free_port, http_listener, raw_request, static_cluster


class _Slow(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, name: str, delay: float) -> None:
        self.name, self.delay, self.hits, self.finished = name, delay, 0, 0
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        server = self.server
        assert isinstance(server, _Slow)
        server.hits += 1
        time.sleep(server.delay)
        try:
            self.send_response(200)
            self.send_header("content-length", "0")
            self.send_header("x-served-by", server.name)
            self.end_headers()
            server.finished += 1
        except OSError:
            pass  # the proxy dropped this try

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def upstreams() -> Iterator[tuple[_Slow, _Slow]]:
    first, second = _Slow("first", 0.5), _Slow("second", 2.0)
    yield first, second
    for server in (first, second):
        server.shutdown()
        server.server_close()


def _proxy(make_proxy: Any, upstreams: tuple[_Slow, _Slow], hedge: bool) -> Any:
    port = free_port()
    action: dict[str, Any] = {
        "cluster": "pair",
        "timeout": "5s",
        "retry_policy": {
            "retry_on": "5xx,reset",
            "num_retries": 1,
            "per_try_timeout": "0.2s",
            "retry_back_off": {"base_interval": "0.001s"},
        },
    }
    if hedge:
        action["hedge_policy"] = {"hedge_on_per_try_timeout": True}
    listener = http_listener(
        port,
        [{"name": "v", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": action}]}],
    )
    cluster = static_cluster("pair", *(server.server_address[1] for server in upstreams))
    proxy = make_proxy(bootstrap([listener], [cluster], free_port()))
    proxy.port = port
    return proxy


def _timed_get(port: int) -> tuple[int, str, float]:
    started = time.monotonic()
    response = raw_request(port, b"GET / HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n")
    elapsed = time.monotonic() - started
    head = response.partition(b"\r\n\r\n")[0].decode().lower()
    served = head.split("x-served-by: ")[1].split("\r\n")[0] if "x-served-by" in head else ""
    return int(head.split(" ", 2)[1]), served, elapsed


def test_the_slow_first_try_still_wins_when_hedged(
    make_proxy: Any, upstreams: tuple[_Slow, _Slow]
) -> None:
    # round robin starts at the first host (0.5 s); the hedge goes to the second (2 s)
    proxy = _proxy(make_proxy, upstreams, hedge=True)
    status, served, elapsed = _timed_get(proxy.port)
    assert (status, served) == (200, "first")
    assert 0.45 < elapsed < 1.5
    assert upstreams[1].hits == 1  # the hedge was sent, then dropped
    stats = proxy.stats()
    assert stats["cluster.pair.upstream_rq_per_try_timeout"] >= 1  # the hedge may time out too
    assert stats["cluster.pair.upstream_rq_retry"] == 1


def test_without_hedging_the_timed_out_try_is_abandoned(
    make_proxy: Any, upstreams: tuple[_Slow, _Slow]
) -> None:
    proxy = _proxy(make_proxy, upstreams, hedge=False)
    status, _, elapsed = _timed_get(proxy.port)
    # the first try was cut at 0.2 s; the retry (2 s) outlives its own per-try timeout
    assert status == 504
    assert elapsed < 1.0


def test_the_hedge_wins_over_a_stuck_first_try(make_proxy: Any) -> None:
    stuck, quick = _Slow("stuck", 3.0), _Slow("quick", 0.05)
    try:
        proxy = _proxy(make_proxy, (stuck, quick), hedge=True)
        status, served, elapsed = _timed_get(proxy.port)
        assert (status, served) == (200, "quick")
        assert elapsed < 1.0  # 0.2 s per-try timeout + 0.05 s, not 3 s
        time.sleep(0.2)
        assert stuck.hits == 1 and stuck.finished == 0  # dropped, not waited for
    finally:
        for server in (stuck, quick):
            server.shutdown()
            server.server_close()
