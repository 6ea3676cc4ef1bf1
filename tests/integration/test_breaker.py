"""The error-rate / slow-call circuit breaker end to end: a real ``shoal proxy`` in front of
a scripted upstream that the test flips between failing, slow and healthy. The breaker
opens, serves the fallback (local reply or fallback cluster), lets exactly
``half_open_trials`` requests through in half-open, re-opens on a failed trial, closes
when the upstream recovers, and all of it shows in ``/stats`` and ``/stats/prometheus``.

These need ``proxy/http.py`` to ask the breakers: ``ClusterRuntime.breaker`` and, for
route-level breakers, one ``build_breaker(route.breaker, route.name)`` per route per
config version (``allow(now)`` before the upstream, ``record(now, success, duration)`` after,
the fallback and its ``fallback_*`` counter when refused, flag ``UO`` and details
``circuit_breaker_open`` on the local reply).
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import bootstrap, free_port, http_listener, route_to, static_cluster

KEY = "shoal.circuit_breaker"
# opens after 4 requests at 50% errors; 0.5 s open; 2 trials
POLICY: dict[str, Any] = {
    "window_size": 10,
    "minimum_requests": 4,
    "error_ratio": 0.5,
    "open_duration": "0.5s",
    "half_open_trials": 2,
}
LOCAL = {"local_reply": {"status": 503, "body": "svc is resting", "headers": {"x-fallback": "1"}}}


class ScriptedUpstream:
    """An HTTP/1.1 upstream in this process: every request waits ``delay`` seconds, then
    answers ``status`` with ``x-served-by: <name>``; ``hits`` counts the requests."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.status = 200
        self.delay = 0.0
        self.hits = 0
        self.lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with upstream.lock:
                    upstream.hits += 1
                    status, delay = upstream.status, upstream.delay
                if delay:
                    time.sleep(delay)
                body = upstream.name.encode()
                self.send_response(status)
                self.send_header("content-length", str(len(body)))
                self.send_header("x-served-by", upstream.name)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def count(self) -> int:
        with self.lock:
            return self.hits

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def svc() -> Iterator[ScriptedUpstream]:
    upstream = ScriptedUpstream("svc")
    yield upstream
    upstream.stop()


@pytest.fixture
def spare() -> Iterator[ScriptedUpstream]:
    upstream = ScriptedUpstream("spare")
    yield upstream
    upstream.stop()


def breaker_meta(**policy: Any) -> dict[str, Any]:
    return {"filter_metadata": {KEY: {**POLICY, **policy}}}


def config(
    clusters: list[dict[str, Any]], routes: list[dict[str, Any]] | None = None
) -> tuple[dict[str, Any], int]:
    port = free_port()
    vhost = {"name": "all", "domains": ["*"], "routes": routes or [route_to("svc")]}
    return bootstrap([http_listener(port, [vhost])], clusters, free_port()), port


def get(port: int, path: str = "/") -> tuple[int, dict[str, str], str]:
    """One request on its own connection: status, headers (lower-cased names), body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": "svc"})
        response = conn.getresponse()
        body = response.read().decode()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


def get_many(port: int, count: int) -> list[tuple[int, dict[str, str], str]]:
    """``count`` requests at once."""
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: get(port), range(count)))


def breaker_stats(proxy: Any, prefix: str = "cluster.svc") -> dict[str, int]:
    head = f"{prefix}.circuit_breaker."
    return {k[len(head) :]: v for k, v in proxy.stats().items() if k.startswith(head)}


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_opens_serves_the_local_reply_trials_in_half_open_and_closes(
    make_proxy: Any, svc: ScriptedUpstream
) -> None:
    data, port = config([static_cluster("svc", svc.port, metadata=breaker_meta(fallback=LOCAL))])
    proxy = make_proxy(data)
    assert breaker_stats(proxy) == {
        "opened": 0,
        "half_opened": 0,
        "closed": 0,
        "rejected": 0,
        "fallback_local": 0,
        "fallback_cluster": 0,
        "state": 0,
    }
    assert [get(port)[0] for _ in range(4)] == [200] * 4

    svc.status = 500  # 3 of 7 fail: below 50%; the 4th failure makes 4 of 8
    assert [get(port)[0] for _ in range(4)] == [500] * 4
    stats = breaker_stats(proxy)
    assert (stats["opened"], stats["state"]) == (1, 1)

    hits = svc.count()
    for _ in range(5):  # open: the local reply, the upstream is left alone
        status, headers, body = get(port)
        assert (status, body, headers.get("x-fallback")) == (503, "svc is resting", "1")
    assert svc.count() == hits
    stats = breaker_stats(proxy)
    assert (stats["rejected"], stats["fallback_local"], stats["fallback_cluster"]) == (5, 5, 0)

    svc.status, svc.delay = 200, 0.5  # recovered, but slow enough to keep the trials in flight
    time.sleep(0.6)  # open_duration is over
    answers = get_many(port, 5)
    assert sorted(status for status, _, _ in answers) == [200, 200, 503, 503, 503]
    assert svc.count() == hits + 2  # exactly half_open_trials went upstream
    stats = breaker_stats(proxy)
    assert (stats["half_opened"], stats["closed"], stats["state"]) == (1, 1, 0)
    assert (stats["rejected"], stats["fallback_local"]) == (8, 8)

    svc.delay = 0.0
    assert [get(port)[0] for _ in range(10)] == [200] * 10  # closed: all go upstream
    assert svc.count() == hits + 12
    text = proxy.admin("/stats/prometheus")[1]
    assert 'envoy_cluster_circuit_breaker_opened{envoy_cluster_name="svc"} 1' in text
    assert 'envoy_cluster_circuit_breaker_state{envoy_cluster_name="svc"} 0' in text


def test_a_failed_trial_reopens_the_breaker(make_proxy: Any, svc: ScriptedUpstream) -> None:
    data, port = config([static_cluster("svc", svc.port, metadata=breaker_meta())])
    proxy = make_proxy(data)
    svc.status = 502
    assert [get(port)[0] for _ in range(4)] == [502] * 4
    assert breaker_stats(proxy)["state"] == 1
    time.sleep(0.6)
    hits = svc.count()
    assert get(port)[0] == 502  # the first trial reaches the still failing upstream
    assert svc.count() == hits + 1
    status, _, body = get(port)  # re-opened at once: the default fallback
    assert (status, body) == (503, "circuit breaker open")
    assert svc.count() == hits + 1
    stats = breaker_stats(proxy)
    assert (stats["opened"], stats["half_opened"], stats["closed"], stats["state"]) == (2, 1, 0, 1)

    svc.status = 200
    time.sleep(0.6)
    assert [get(port)[0] for _ in range(4)] == [200] * 4  # two trials, then closed
    stats = breaker_stats(proxy)
    assert (stats["half_opened"], stats["closed"], stats["state"]) == (2, 1, 0)


def test_fallback_cluster_serves_while_open(
    make_proxy: Any, svc: ScriptedUpstream, spare: ScriptedUpstream
) -> None:
    fallback = {"cluster": "spare"}
    data, port = config(
        [
            static_cluster("svc", svc.port, metadata=breaker_meta(fallback=fallback)),
            static_cluster("spare", spare.port),
        ]
    )
    proxy = make_proxy(data)
    svc.status = 503
    assert [get(port)[0] for _ in range(4)] == [503] * 4
    hits = svc.count()
    answers = [get(port) for _ in range(3)]
    assert [(s, h.get("x-served-by"), b) for s, h, b in answers] == [(200, "spare", "spare")] * 3
    assert svc.count() == hits and spare.count() == 3
    stats = breaker_stats(proxy)
    assert (stats["rejected"], stats["fallback_cluster"], stats["fallback_local"]) == (3, 3, 0)

    svc.status = 200
    time.sleep(0.6)
    assert [get(port)[2] for _ in range(3)] == ["svc"] * 3
    assert breaker_stats(proxy)["state"] == 0


def test_route_level_breaker_with_the_default_fallback(
    make_proxy: Any, svc: ScriptedUpstream, tmp_path: Path
) -> None:
    route = {**route_to("svc"), "name": "checkout", "metadata": breaker_meta()}
    data, port = config([static_cluster("svc", svc.port)], [route])
    log = tmp_path / "access.log"
    manager = data["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    manager["typed_config"]["access_log"] = [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3."
                "FileAccessLog",
                "path": str(log),
                "log_format": {
                    "text_format_source": {
                        "inline_string": (
                            "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%\n"
                        )
                    }
                },
            },
        }
    ]
    proxy = make_proxy(data)
    svc.status = 500
    assert [get(port)[0] for _ in range(4)] == [500] * 4
    status, _, body = get(port)
    assert (status, body) == (503, "circuit breaker open")
    stats = breaker_stats(proxy, "route.checkout")
    assert (stats["opened"], stats["rejected"], stats["fallback_local"], stats["state"]) == (
        1,
        1,
        1,
        1,
    )
    assert "cluster.svc.circuit_breaker.state" not in proxy.stats()  # no cluster breaker
    wait_for(lambda: log.exists() and "circuit_breaker_open" in log.read_text())
    assert "503 UO circuit_breaker_open" in log.read_text().splitlines()
    text = proxy.admin("/stats/prometheus")[1]
    assert 'envoy_route_circuit_breaker_state{envoy_route="checkout"} 1' in text


def test_connect_failures_open_the_breaker(make_proxy: Any) -> None:
    # a long open period: the last request must still find the breaker open on a busy machine
    meta = breaker_meta(open_duration="5s")
    dead = static_cluster("svc", free_port(), connect_timeout="0.5s", metadata=meta)
    data, port = config([dead])
    proxy = make_proxy(data)
    assert [get(port)[0] for _ in range(4)] == [503] * 4  # upstream connect failures
    assert breaker_stats(proxy)["state"] == 1
    assert get(port)[2] == "circuit breaker open"
    assert breaker_stats(proxy)["rejected"] == 1


def test_slow_calls_open_the_breaker(make_proxy: Any, svc: ScriptedUpstream) -> None:
    meta = breaker_meta(slow_call_duration="150ms", slow_call_ratio=0.5)
    data, port = config([static_cluster("svc", svc.port, metadata=meta)])
    proxy = make_proxy(data)
    svc.delay = 0.2  # every answer a 200, every one slow
    assert [get(port)[0] for _ in range(4)] == [200] * 4
    stats = breaker_stats(proxy)
    assert (stats["opened"], stats["state"]) == (1, 1)
    assert get(port)[0] == 503


def test_delayed_but_successful_requests_are_no_failures(
    make_proxy: Any, svc: ScriptedUpstream
) -> None:
    """A fault filter's delay flags the request DI; the breaker must still see a success."""
    data, port = config([static_cluster("svc", svc.port, metadata=breaker_meta())])
    chain = data["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    chain["typed_config"]["http_filters"].insert(
        0,
        {
            "name": "envoy.filters.http.fault",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                "delay": {"fixed_delay": "0.01s"},
            },
        },
    )
    proxy = make_proxy(data)
    assert [get(port)[0] for _ in range(6)] == [200] * 6
    assert breaker_stats(proxy)["opened"] == 0
