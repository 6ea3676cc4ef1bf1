"""Pipelined requests: each is answered in order, and a queued request keeps its body."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from tests.conftest import Echo, bootstrap, free_port, http_listener, static_cluster

BUFFER_LIMIT = 1000


def _responses(data: bytes) -> list[tuple[int, bytes]]:
    """Split a byte stream of content-length responses into (status, body) pairs."""
    found = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        found.append((status, rest[:length]))
        data = rest[length:]
    return found


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


@pytest.fixture
def proxy(make_proxy: Any, echo_a: Echo) -> Any:
    port = free_port()
    retrying = {
        "match": {"prefix": "/retry/"},
        "route": {"cluster": "a", "retry_policy": {"retry_on": "5xx", "num_retries": 1}},
    }
    limited_port = free_port()
    listeners = [
        http_listener(
            port,
            [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [retrying, {"match": {"prefix": "/"}, "route": {"cluster": "a"}}],
                }
            ],
        ),
        http_listener(
            limited_port,
            [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "a"}}],
                }
            ],
            name="limited",
        ),
    ]
    listeners[1]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"].insert(
        0,
        {
            "name": "envoy.filters.http.buffer",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                "max_request_bytes": BUFFER_LIMIT,
            },
        },
    )
    proxy = make_proxy(bootstrap(listeners, [static_cluster("a", echo_a.port)], free_port()))
    proxy.port, proxy.limited_port = port, limited_port
    return proxy


def test_queued_request_body_survives_a_retry_policy(proxy: Any) -> None:
    body = b"q" * 5000
    data = (
        b"GET /delay/200 HTTP/1.1\r\nHost: s\r\n\r\n"
        b"POST /retry/up HTTP/1.1\r\nHost: s\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (len(body), body)
    )
    answers = _responses(_exchange(proxy.port, data))
    assert [status for status, _ in answers] == [200, 200]
    assert json.loads(answers[1][1])["body_bytes"] == len(body)


def test_queued_oversize_request_is_answered_in_order(proxy: Any) -> None:
    body = b"z" * (BUFFER_LIMIT + 1)
    data = (
        b"GET /delay/200 HTTP/1.1\r\nHost: s\r\n\r\n"
        b"POST /up HTTP/1.1\r\nHost: s\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    answers = _responses(_exchange(proxy.limited_port, data))
    assert [status for status, _ in answers] == [200, 413]
    assert json.loads(answers[0][1])["path"] == "/delay/200"
