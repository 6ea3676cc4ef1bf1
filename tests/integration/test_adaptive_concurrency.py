"""Adaptive concurrency (Envoy's gradient controller) under a 10x overload.

The upstream serves one request at a time (5 ms each), so queueing shows up as latency. The
test prints the p99 of admitted requests with and without the filter: the figure the issue
asks for.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from tests.conftest import bootstrap, free_port, http_listener, static_cluster

SERVICE_TIME = 0.005
ADAPTIVE = (
    "type.googleapis.com/envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency"
)


class _Serial(socketserver.StreamRequestHandler):
    """One request at a time across all connections: capacity is 1 / SERVICE_TIME."""

    lock = threading.Lock()

    def handle(self) -> None:
        while self.rfile.readline().strip():
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
            with self.lock:
                time.sleep(SERVICE_TIME)
            self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture(scope="module")
def serial_upstream() -> Iterator[int]:
    server = _Server(("127.0.0.1", 0), _Serial)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _proxy(make_proxy: Any, upstream: int, adaptive: bool) -> Any:
    port = free_port()
    route = {"match": {"prefix": "/"}, "route": {"cluster": "serial", "timeout": "10s"}}
    listener = http_listener(port, [{"name": "v", "domains": ["*"], "routes": [route]}])
    if adaptive:
        controller = {
            "gradient_controller_config": {
                "sample_aggregate_percentile": {"value": 50},
                "concurrency_limit_params": {"concurrency_update_interval": "0.1s"},
                "min_rtt_calc_params": {
                    "interval": "60s",
                    "request_count": 20,
                    "min_concurrency": 2,
                    "buffer": {"value": 25},
                },
            }
        }
        chain = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
        chain.insert(0, {"name": "adaptive", "typed_config": {"@type": ADAPTIVE, **controller}})
    cluster = static_cluster(
        "serial",
        upstream,
        circuit_breakers={
            "thresholds": [
                {"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000}
            ]
        },
    )
    proxy = make_proxy(bootstrap([listener], [cluster], free_port()))
    proxy.port = port
    return proxy


def _load(port: int, clients: int, seconds: float, settle: float = 0.0) -> tuple[list[float], int]:
    """Clients on keep-alive connections, each sending its next request when the last is
    answered (10 ms later after a 503): (latencies of 200s, count of 503s). Requests sent
    in the first ``settle`` seconds are not counted (the controller is still adapting)."""
    latencies: list[float] = []
    shed = [0]
    lock = threading.Lock()
    begin = time.monotonic()
    stop = begin + seconds

    def client() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            reader = sock.makefile("rb")
            while time.monotonic() < stop:
                started = time.monotonic()
                sock.sendall(b"GET / HTTP/1.1\r\nHost: s\r\n\r\n")
                status = int(reader.readline().split()[1])
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                reader.read(length)
                if started < begin + settle:
                    continue
                with lock:
                    if status == 200:
                        latencies.append(time.monotonic() - started)
                    elif status == 503:
                        shed[0] += 1
                    else:
                        raise AssertionError(f"unexpected status {status}")
                if status == 503:
                    time.sleep(0.01)  # a shed client backs off, as real clients do

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, shed[0]


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@pytest.mark.slow
def test_overload_is_shed_and_admitted_latency_stays_bounded(
    make_proxy: Any, serial_upstream: int
) -> None:
    plain = _proxy(make_proxy, serial_upstream, adaptive=False)
    baseline, _ = _load(plain.port, 40, 3.0, settle=1.0)  # 10x the 4 it serves well

    proxy = _proxy(make_proxy, serial_upstream, adaptive=True)
    warm, shed = _load(proxy.port, 2, 1.0)  # light load: minRTT is measured, nothing shed
    assert warm and shed == 0
    admitted, shed = _load(proxy.port, 40, 3.0, settle=1.0)
    recovered, shed_after = _load(proxy.port, 2, 1.5)

    without, with_filter = _p99(baseline), _p99(admitted)
    print(
        f"p99 admitted: {with_filter * 1000:.0f} ms with adaptive concurrency, "
        f"{without * 1000:.0f} ms without; shed {shed}, admitted {len(admitted)}"
    )
    assert shed > 0
    assert with_filter < without / 2
    assert with_filter < 0.12  # ~24 service times, against ~40 queued without the filter
    assert recovered and shed_after <= 2  # back to serving all once the load drops
    stats = proxy.stats()
    assert stats["http.ingress.adaptive_concurrency.gradient_controller.rq_blocked"] >= shed
    assert stats["http.ingress.adaptive_concurrency.gradient_controller.concurrency_limit"] >= 1
