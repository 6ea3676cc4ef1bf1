"""Stream-level timeouts (Envoy semantics): stream idle, max stream duration, request timeout."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from tests.conftest import Echo, bootstrap, free_port, http_listener, raw_request, static_cluster


def _start(make_proxy: Any, echo: Echo, route: dict[str, Any] | None = None, **hcm: Any) -> Any:
    port = free_port()
    action = {"cluster": "a", **(route or {})}
    vhosts = [
        {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": action}]}
    ]
    proxy = make_proxy(
        bootstrap(
            [http_listener(port, vhosts, **hcm)], [static_cluster("a", echo.port)], free_port()
        )
    )
    proxy.port = port
    return proxy


def _status_and_body(response: bytes) -> tuple[int, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_stream_idle_timeout_answers_408(make_proxy: Any, echo_a: Echo) -> None:
    proxy = _start(make_proxy, echo_a, stream_idle_timeout="0.4s")
    started = time.monotonic()
    response = raw_request(proxy.port, b"GET /delay/3000 HTTP/1.1\r\nHost: s\r\n\r\n")
    assert _status_and_body(response) == (408, b"stream timeout")
    assert time.monotonic() - started < 2.5


def test_route_idle_timeout_overrides_the_connection_manager(make_proxy: Any, echo_a: Echo) -> None:
    proxy = _start(make_proxy, echo_a, {"idle_timeout": "0.3s"}, stream_idle_timeout="60s")
    response = raw_request(proxy.port, b"GET /delay/3000 HTTP/1.1\r\nHost: s\r\n\r\n")
    assert _status_and_body(response) == (408, b"stream timeout")


def test_activity_keeps_an_idle_timer_from_firing(make_proxy: Any, echo_a: Echo) -> None:
    proxy = _start(make_proxy, echo_a, stream_idle_timeout="0.4s")
    pieces = 8
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(
            b"POST /up HTTP/1.1\r\nHost: s\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % pieces
        )
        for _ in range(pieces):  # 1.6 s in all, never 0.4 s quiet
            time.sleep(0.2)
            sock.sendall(b"x")
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    status, body = _status_and_body(response)
    assert status == 200
    assert json.loads(body)["body_bytes"] == pieces


def test_max_stream_duration(make_proxy: Any, echo_a: Echo) -> None:
    proxy = _start(make_proxy, echo_a, common_http_protocol_options={"max_stream_duration": "0.4s"})
    response = raw_request(proxy.port, b"GET /delay/3000 HTTP/1.1\r\nHost: s\r\n\r\n")
    assert _status_and_body(response) == (408, b"downstream duration timeout")
    response = raw_request(
        proxy.port, b"GET /fast HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n"
    )
    assert _status_and_body(response)[0] == 200


def test_request_timeout_for_a_body_that_never_completes(make_proxy: Any, echo_a: Echo) -> None:
    proxy = _start(make_proxy, echo_a, request_timeout="0.4s")
    response = raw_request(
        proxy.port, b"POST /up HTTP/1.1\r\nHost: s\r\nContent-Length: 10\r\n\r\nab"
    )
    status, body = _status_and_body(response)
    assert (status, body) == (408, b"request timeout")
    assert b"connection: close" in response.lower()
