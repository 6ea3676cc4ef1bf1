"""HTTP/1.1 ⇄ HTTP/2 translation, chosen per cluster as Envoy does: curl over HTTP/1.1 to
an h2c upstream, curl, h2load and grpcio-free HTTP/2 clients to an HTTP/1.1 upstream, and
a gRPC-less h2c upstream (tests/integration/h2_upstream.py) on the other side."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import Echo, free_port, route_to, static_cluster
from tests.integration.ratelimit_helpers import HTTP2_OPTIONS
from tests.integration.test_h2_proxy import (
    H2Upstream,
    _rss_kb,
    curl,
    h2_cluster,
    h2_upstream,
    proxy_config,
)

__all__ = ["h2_upstream"]  # the fixture used here


def test_http1_clients_reach_an_h2c_cluster(
    make_proxy: Any, h2_upstream: H2Upstream, tmp_path: Path
) -> None:
    """codec_type HTTP1 → an HTTP/2 cluster: heads, bodies with content-length and chunked,
    a large answer re-chunked, keep-alive on the client side, one upstream connection."""
    port = free_port()
    config = proxy_config(
        port, [h2_cluster("plain", h2_upstream.port)], [route_to("plain")], "HTTP1"
    )
    proxy = make_proxy(config)
    base = f"http://127.0.0.1:{port}"
    got = curl("--http1.1", "-i", f"{base}/x", f"{base}/y")  # two requests, one connection
    assert got.stdout.count("HTTP/1.1 200") == 2
    assert got.stdout.endswith("h2 GET /y 0")
    body = tmp_path / "body"
    body.write_bytes(b"b" * 300_000)  # past every window on the way
    posted = curl("--http1.1", "--data-binary", f"@{body}", f"{base}/upload")
    assert posted.stdout == "h2 POST /upload 300000"
    chunked = curl(
        "--http1.1", "-H", "transfer-encoding: chunked", "--data-binary", f"@{body}",
        f"{base}/chunked",
    )  # fmt: skip
    assert chunked.stdout == "h2 POST /chunked 300000"
    size = 20_000_000
    before = _rss_kb(proxy.proc.pid)
    down = curl("--http1.1", "-o", "/dev/null", "-w", "%{size_download}", f"{base}/size/{size}")
    assert down.stdout == str(size)
    assert _rss_kb(proxy.proc.pid) - before < 15_000
    head = curl("--http1.1", "-I", f"{base}/x")
    assert head.stdout.startswith("HTTP/1.1 200")
    stats = proxy.stats()
    assert stats["cluster.plain.upstream_rq_total"] == 6
    assert stats["cluster.plain.upstream_rq_200"] == 6
    assert stats["cluster.plain.upstream_cx_total"] == 1  # every request a stream of one


def test_h2c_clients_reach_an_http1_cluster(make_proxy: Any, echo_a: Echo, tmp_path: Path) -> None:
    """codec_type HTTP2 → an HTTP/1.1 cluster: the request's pseudo-headers become the
    request line and Host, split cookies one header, bodies framed by content-length or
    chunked; many streams at once spread over pooled keep-alive connections."""
    port = free_port()
    config = proxy_config(port, [static_cluster("echo", echo_a.port)], [route_to("echo")])
    proxy = make_proxy(config)
    base = f"http://127.0.0.1:{port}"
    got = curl(
        "--http2-prior-knowledge", "-H", "cookie: a=1", "-H", "cookie: b=2",
        f"{base}/hello?x=1",
    )  # fmt: skip
    seen = json.loads(got.stdout)
    assert seen["method"] == "GET" and seen["path"] == "/hello?x=1"
    assert seen["headers"]["host"] == f"127.0.0.1:{port}"
    assert seen["headers"]["cookie"] == "a=1; b=2"
    assert "te" not in seen["headers"] and ":method" not in seen["headers"]
    body = tmp_path / "body"
    body.write_bytes(b"b" * 300_000)
    posted = json.loads(
        curl("--http2-prior-knowledge", "--data-binary", f"@{body}", f"{base}/up").stdout
    )
    assert posted["body_bytes"] == 300_000
    assert posted["headers"]["content-length"] == "300000"
    streamed = subprocess.run(  # no content-length: chunked on the HTTP/1.1 side
        ["curl", "-sS", "--http2-prior-knowledge", "-T", "-", f"{base}/stream"],
        input=b"s" * 100_000, capture_output=True, check=True, timeout=20,
    )  # fmt: skip
    received = json.loads(streamed.stdout)
    assert received["body_bytes"] == 100_000
    assert received["headers"]["transfer-encoding"] == "chunked"
    size = 20_000_000
    down = curl("--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{size_download}",
                f"{base}/bytes/{size}?chunked=1")  # fmt: skip
    assert down.stdout == str(size)
    head = curl("--http2-prior-knowledge", "-I", f"{base}/x")
    assert head.stdout.startswith("HTTP/2 200")
    load = subprocess.run(
        ["h2load", "-n", "400", "-c", "2", "-m", "20", f"{base}/load"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert re.search(r"requests: 400 total, 400 started, 400 done, 400 succeeded", load.stdout)
    stats = proxy.stats()
    assert stats["cluster.echo.upstream_rq_200"] == 405
    cx = stats["cluster.echo.upstream_cx_total"]
    assert 1 <= cx <= 40, cx  # keep-alive connections, reused across streams


def test_translated_failures_answer_as_envoy_does(make_proxy: Any, h2_upstream: H2Upstream) -> None:
    """An HTTP/1.1 request to a dead HTTP/2 host fails as a connect failure (503 UF), and a
    retry_on connect-failure goes to the live host."""
    port = free_port()
    dead = free_port()
    mixed = static_cluster(
        "mixed", dead, h2_upstream.port, typed_extension_protocol_options=HTTP2_OPTIONS
    )
    config = proxy_config(
        port,
        [h2_cluster("dead", dead), mixed],
        [
            route_to("dead", "/dead"),
            route_to("mixed", "/", retry_policy={"retry_on": "connect-failure", "num_retries": 2}),
        ],
        "HTTP1",
    )
    proxy = make_proxy(config)
    base = f"http://127.0.0.1:{port}"
    failed = curl("--http1.1", "-w", " %{http_code}", f"{base}/dead")
    assert failed.stdout.endswith(" 503")
    assert "remote connection failure" in failed.stdout
    for _ in range(4):
        ok = curl("--http1.1", f"{base}/live")
        assert ok.stdout == "h2 GET /live 0"
    stats = proxy.stats()
    assert stats["cluster.dead.upstream_cx_connect_fail"] >= 1
    assert stats["cluster.mixed.upstream_rq_retry"] >= 1


def test_use_downstream_protocol_config(make_proxy: Any, h2_upstream: H2Upstream) -> None:
    """A cluster with use_downstream_protocol_config gets each request in the protocol it
    came in (the upstream serves both and says which it saw)."""
    key = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    options = {
        "@type": f"type.googleapis.com/{key}",
        "use_downstream_protocol_config": {
            "http_protocol_options": {},
            "http2_protocol_options": {},
        },
    }
    both = static_cluster("both", h2_upstream.port, typed_extension_protocol_options={key: options})
    port = free_port()
    proxy = make_proxy(proxy_config(port, [both], [route_to("both")], "AUTO"))
    base = f"http://127.0.0.1:{port}"
    assert curl("--http2-prior-knowledge", f"{base}/a").stdout == "h2 GET /a 0"
    assert curl("--http1.1", f"{base}/b").stdout == "h1 GET /b"
    stats = proxy.stats()
    assert stats["cluster.both.upstream_rq_200"] == 2
    assert stats["cluster.both.upstream_cx_total"] == 2  # one h2c, one HTTP/1.1
