"""Envoy's retry budget: concurrent retries limited to a share of active requests."""

from __future__ import annotations

import itertools
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from tests.conftest import Echo, bootstrap, free_port, http_listener, static_cluster

_keys = itertools.count()


def _proxy(make_proxy: Any, echo: Echo, budget: dict[str, Any]) -> Any:
    port = free_port()
    route = {
        "match": {"prefix": "/"},
        "route": {
            "cluster": "a",
            "retry_policy": {
                "retry_on": "5xx",
                "num_retries": 1,
                # a long back-off holds each retry's slot while the others arrive
                "retry_back_off": {"base_interval": "0.6s", "max_interval": "0.6s"},
            },
        },
    }
    breakers = {"thresholds": [{"max_retries": 1000, "retry_budget": budget}]}
    proxy = make_proxy(
        bootstrap(
            [http_listener(port, [{"name": "v", "domains": ["*"], "routes": [route]}])],
            [static_cluster("a", echo.port, circuit_breakers=breakers)],
            free_port(),
        )
    )
    proxy.port = port
    return proxy


def _burst(port: int, size: int) -> list[int]:
    """``size`` requests sent at the same moment on connections opened beforehand: the
    retries' back-off is jittered from 0, so requests that straggle in could find an
    early retry's slot already free again."""
    connections = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(size)]
    start = threading.Barrier(size)

    def one(sock: socket.socket) -> int:
        request = b"GET /fail/budget-%d/1 HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n"
        data = request % next(_keys)
        start.wait()
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        sock.close()
        return int(answer.split(b" ", 2)[1])

    with ThreadPoolExecutor(size) as pool:
        return list(pool.map(one, connections))


@pytest.mark.parametrize(
    ("budget", "retried"),
    [
        ({"budget_percent": {"value": 0}, "min_retry_concurrency": 1}, 1),
        ({"budget_percent": {"value": 100}, "min_retry_concurrency": 1}, 6),
    ],
)
def test_retry_budget_caps_concurrent_retries(
    make_proxy: Any, echo_a: Echo, budget: dict[str, Any], retried: int
) -> None:
    proxy = _proxy(make_proxy, echo_a, budget)
    statuses = _burst(proxy.port, 6)
    stats = proxy.stats()
    assert statuses.count(200) == retried  # a retried request succeeds on its retry
    assert stats["cluster.a.upstream_rq_retry"] == retried
    assert stats["cluster.a.upstream_rq_retry_overflow"] == 6 - retried
