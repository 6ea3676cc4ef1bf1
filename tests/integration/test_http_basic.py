"""The HTTP/1.1 path end to end: real client sockets → shoal proxy → real upstream."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest
from tests.conftest import (
    Echo,
    bootstrap,
    free_port,
    http_listener,
    raw_request,
    route_to,
    static_cluster,
)


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def _body(response: bytes) -> bytes:
    return response.partition(b"\r\n\r\n")[2]


def _headers(response: bytes) -> dict[str, str]:
    head = response.partition(b"\r\n\r\n")[0].decode("latin-1")
    pairs = (line.split(":", 1) for line in head.split("\r\n")[1:])
    return {k.strip().lower(): v.strip() for k, v in pairs}


@pytest.fixture
def proxy(make_proxy: Any, echo_a: Echo, echo_b: Echo, tmp_path: Any) -> Any:
    port = free_port()
    vhosts = [
        {
            "name": "b",
            "domains": ["b.local", "b.local:*", "*.b.local"],
            "routes": [route_to("b")],
        },
        {
            "name": "default",
            "domains": ["*"],
            "routes": [
                {
                    "match": {"path": "/direct"},
                    "direct_response": {"status": 200, "body": {"inline_string": "hi"}},
                },
                {
                    "match": {"prefix": "/old/"},
                    "redirect": {"path_redirect": "/new", "response_code": "FOUND"},
                },
                {
                    "match": {
                        "prefix": "/hdr",
                        "headers": [{"name": "x-canary", "string_match": {"exact": "1"}}],
                    },
                    "route": {"cluster": "b"},
                },
                route_to("a", "/rewrite/", prefix_rewrite="/v2/"),
                route_to("a", "/api"),
                route_to("a", "/"),
            ],
            "response_headers_to_add": [{"header": {"key": "x-mesh", "value": "shoal"}}],
        },
    ]
    config = bootstrap(
        [http_listener(port, vhosts, access_log=str(tmp_path / "access.log"))],
        [static_cluster("a", echo_a.port), static_cluster("b", echo_b.port)],
        free_port(),
    )
    proxy = make_proxy(config)
    proxy.port = port
    proxy.access_log = tmp_path / "access.log"
    return proxy


def test_proxies_get_with_envoy_headers(proxy: Any) -> None:
    response = raw_request(
        proxy.port, b"GET /hello?x=1 HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n"
    )
    assert _status(response) == 200
    headers = _headers(response)
    assert headers["x-served-by"] == "a"
    assert headers["server"] == "envoy"
    assert headers["x-mesh"] == "shoal"
    assert int(headers["x-envoy-upstream-service-time"]) >= 0
    echoed = json.loads(_body(response))
    assert echoed["path"] == "/hello?x=1"
    assert echoed["headers"]["x-forwarded-proto"] == "http"
    assert len(echoed["headers"]["x-request-id"]) == 36
    assert "connection" not in echoed["headers"]


def test_routes_by_host_header_and_wildcard(proxy: Any) -> None:
    for host in (b"b.local", b"b.local:8080", b"x.b.local"):
        response = raw_request(
            proxy.port, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
        )
        assert _headers(response)["x-served-by"] == "b", host


def test_header_match_and_prefix_rewrite(proxy: Any) -> None:
    response = raw_request(
        proxy.port, b"GET /hdr HTTP/1.1\r\nHost: s\r\nx-canary: 1\r\nConnection: close\r\n\r\n"
    )
    assert _headers(response)["x-served-by"] == "b"
    response = raw_request(proxy.port, b"GET /hdr HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n")
    assert _headers(response)["x-served-by"] == "a"
    response = raw_request(
        proxy.port, b"GET /rewrite/x HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n"
    )
    echoed = json.loads(_body(response))
    assert echoed["path"] == "/v2/x"
    assert echoed["headers"]["x-envoy-original-path"] == "/rewrite/x"


def test_direct_response_and_redirect(proxy: Any) -> None:
    response = raw_request(
        proxy.port, b"GET /direct HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n"
    )
    assert _status(response) == 200 and _body(response) == b"hi"
    response = raw_request(
        proxy.port, b"GET /old/x?q=1 HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n"
    )
    assert _status(response) == 302
    assert _headers(response)["location"] == "http://s/new?q=1"


def test_keep_alive_and_pipelining(proxy: Any) -> None:
    requests = (
        b"".join(b"GET /p%d HTTP/1.1\r\nHost: s\r\n\r\n" % i for i in range(5))
        + b"GET /last HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n"
    )
    response = raw_request(proxy.port, requests)
    assert response.count(b"HTTP/1.1 200") == 6
    paths = [
        json.loads(line)["path"]
        for line in response.split(b"\r\n\r\n")[1:]
        for line in [line.split(b"\n")[0]]
        if line.startswith(b"{")
    ]
    assert paths == ["/p0", "/p1", "/p2", "/p3", "/p4", "/last"]


def test_post_body_content_length_and_chunked(proxy: Any) -> None:
    body = b"z" * 100_000
    response = raw_request(
        proxy.port,
        b"POST /up HTTP/1.1\r\nHost: s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (len(body), body),
    )
    assert json.loads(_body(response))["body_bytes"] == 100_000
    chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    response = raw_request(
        proxy.port,
        b"POST /up HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + chunked,
    )
    assert json.loads(_body(response))["body_bytes"] == 11


def test_expect_continue_is_answered(proxy: Any) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(
            b"POST /e HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        interim = sock.recv(1024)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"abc")
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
    final = rest if rest.startswith(b"HTTP/1.1 200") else (interim + rest).split(b"\r\n\r\n", 1)[1]
    echoed = json.loads(_body(final))
    assert echoed["body_bytes"] == 3
    assert "expect" not in echoed["headers"]


def test_head_and_204_framing(proxy: Any) -> None:
    response = raw_request(
        proxy.port,
        b"HEAD /bytes/5000 HTTP/1.1\r\nHost: s\r\n\r\nGET /status/204 HTTP/1.1\r\nHost: s\r\n\r\n"
        b"GET /after HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n",
    )
    first, _, rest = response.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200") and b"content-length: 5000" in first
    assert rest.startswith(b"HTTP/1.1 204")
    assert b"HTTP/1.1 200" in rest and b'"path": "/after"' in rest


def test_absolute_form_target(proxy: Any) -> None:
    response = raw_request(
        proxy.port, b"GET http://b.local/abs HTTP/1.1\r\nHost: ignored\r\nConnection: close\r\n\r\n"
    )
    assert _headers(response)["x-served-by"] == "b"
    assert json.loads(_body(response))["path"] == "/abs"


def test_chunked_download_is_rechunked(proxy: Any) -> None:
    response = raw_request(
        proxy.port, b"GET /bytes/100000?chunked=1 HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n"
    )
    assert _headers(response)["transfer-encoding"] == "chunked"
    body = _body(response)
    decoded, rest = b"", body
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        decoded += rest[:size]
        rest = rest[size + 2 :]
    assert decoded == b"x" * 100000


def test_no_route_404_and_access_log(proxy: Any) -> None:
    response = raw_request(proxy.port, b"GET /x HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n")
    assert _status(response) == 200
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        text = proxy.access_log.read_text() if proxy.access_log.exists() else ""
        if '"GET /x HTTP/1.1" 200 - 0' in text:
            break
        time.sleep(0.1)
    assert '"GET /x HTTP/1.1" 200 - 0' in text
    assert '"127.0.0.1:' in text  # upstream host


def test_admin_stats(proxy: Any) -> None:
    request = b"GET /s HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n"
    response = raw_request(proxy.port, request)
    stats = proxy.stats()
    assert stats["http.ingress.downstream_cx_rx_bytes_total"] >= len(request)
    assert stats["http.ingress.downstream_cx_tx_bytes_total"] >= len(response)
    assert stats["cluster.a.upstream_rq_200"] >= 1
    assert stats["cluster.a.upstream_rq_2xx"] >= 1
    assert stats["http.ingress.downstream_rq_total"] >= 1
    status, text = proxy.admin("/stats/prometheus")
    assert status == 200
    assert 'envoy_cluster_upstream_rq{envoy_response_code="200",envoy_cluster_name="a"}' in text
    assert "envoy_cluster_upstream_rq_time_bucket" in text
    status, text = proxy.admin("/clusters")
    assert "a::127.0.0.1:" in text
    status, text = proxy.admin("/config_dump")
    assert json.loads(text)["configs"][0]["bootstrap"]["static_resources"]
