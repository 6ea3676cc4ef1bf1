"""h2c and gRPC through the proxy: grpcio client → shoal (HTTP/2 listener) → grpcio server
for every kind of call, the proxy's own gRPC answers (deadline, no upstream, no route),
curl and h2load against a plain h2c upstream, a large body with bounded memory, and
``codec_type: AUTO`` serving HTTP/1.1 and h2c on one port."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from tests.conftest import (
    ROOT,
    bootstrap,
    free_port,
    http_listener,
    route_to,
    static_cluster,
    stop_process,
    wait_for_port,
)
from tests.integration.ratelimit_helpers import HTTP2_OPTIONS

from shoal.codec.http2 import CANCEL, H2Connection, StreamReset

SERVICE = "shoal.test.Streams"
FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"


def _identity(data: bytes) -> bytes:
    return data


class GrpcServer:
    """A grpcio server with one method of each kind, on raw bytes (generic handlers)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "Slow": grpc.unary_unary_rpc_method_handler(self._slow),
            "Count": grpc.unary_stream_rpc_method_handler(self._count),
            "Join": grpc.stream_unary_rpc_method_handler(self._join),
            "Echo": grpc.stream_stream_rpc_method_handler(self._echo),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    @staticmethod
    def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"hello " + request

    @staticmethod
    def _slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(3)
        return request

    @staticmethod
    def _count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request)):
            yield b"%d" % i

    @staticmethod
    def _join(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return b"+".join(requests)

    @staticmethod
    def _echo(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for request in requests:
            yield request.upper()

    def stop(self) -> None:
        self.server.stop(0)


class H2Upstream:
    """tests/integration/h2_upstream.py in its own process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.h2_upstream", "--port", str(self.port)],
            cwd=ROOT,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def grpc_server() -> Iterator[GrpcServer]:
    server = GrpcServer()
    yield server
    server.stop()


@pytest.fixture
def h2_upstream() -> Iterator[H2Upstream]:
    server = H2Upstream()
    yield server
    server.stop()


def h2_cluster(name: str, port: int) -> dict[str, Any]:
    return static_cluster(name, port, typed_extension_protocol_options=HTTP2_OPTIONS)


def proxy_config(
    port: int,
    clusters: list[dict[str, Any]],
    routes: list[dict[str, Any]],
    codec_type: str = "HTTP2",
    access_log: str | None = None,
    **hcm: Any,
) -> dict[str, Any]:
    vhost = {"name": "all", "domains": ["*"], "routes": routes}
    listener = http_listener(port, [vhost], access_log=access_log, codec_type=codec_type, **hcm)
    return bootstrap([listener], clusters, free_port())


def call(channel: grpc.Channel, method: str, kind: str = "unary_unary") -> Any:
    factory = getattr(channel, kind)
    return factory(
        f"/{SERVICE}/{method}", request_serializer=_identity, response_deserializer=_identity
    )


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", *args], capture_output=True, text=True, check=False
    )


def test_grpc_calls_of_every_kind(make_proxy: Any, grpc_server: GrpcServer, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "access.log"
    config = proxy_config(
        port,
        [h2_cluster("grpc", grpc_server.port)],
        [route_to("grpc", "/" + SERVICE)],
        access_log=str(log),
    )
    proxy = make_proxy(config)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert call(channel, "Unary")(b"world", timeout=5) == b"hello world"
        assert list(call(channel, "Count", "unary_stream")(b"5", timeout=5)) == [
            b"0", b"1", b"2", b"3", b"4",
        ]  # fmt: skip
        parts = iter([b"a", b"b", b"c"])
        assert call(channel, "Join", "stream_unary")(parts, timeout=5) == b"a+b+c"
        echoed = call(channel, "Echo", "stream_stream")(iter([b"x", b"y"]), timeout=5)
        assert list(echoed) == [b"X", b"Y"]
        big = b"z" * 3_000_000  # larger than every window on the way
        assert call(channel, "Unary")(big, timeout=10) == b"hello " + big
    stats = proxy.stats()
    assert stats["http.ingress.downstream_rq_total"] == 5
    assert stats["http.ingress.downstream_rq_2xx"] == 5
    assert stats["cluster.grpc.upstream_rq_total"] == 5
    assert stats["cluster.grpc.upstream_rq_200"] == 5
    assert stats["cluster.grpc.upstream_cx_total"] == 1  # one multiplexed connection
    time.sleep(1.2)  # access logs are flushed each second
    line = log.read_text().splitlines()[0]
    assert '"POST /shoal.test.Streams/Unary HTTP/2" 200' in line


def test_grpc_local_replies(make_proxy: Any, grpc_server: GrpcServer) -> None:
    port = free_port()
    dead = free_port()
    config = proxy_config(
        port,
        [h2_cluster("grpc", grpc_server.port), h2_cluster("down", dead)],
        [
            route_to("down", f"/{SERVICE}/Join"),
            route_to("grpc", f"/{SERVICE}/Slow", timeout="1s"),
            route_to("grpc", f"/{SERVICE}/Unary"),
        ],
    )
    proxy = make_proxy(config)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as deadline:
            call(channel, "Slow")(b"x", timeout=0.3)
        assert deadline.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(grpc.RpcError) as route_timeout:  # the route's 1 s, from the proxy
            call(channel, "Slow")(b"x", timeout=10)
        assert route_timeout.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 3
        with pytest.raises(grpc.RpcError) as unavailable:
            call(channel, "Join", "stream_unary")(iter([b"a"]), timeout=5)
        assert unavailable.value.code() is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as no_route:
            call(channel, "Count", "unary_stream")(b"1", timeout=5).next()
        assert no_route.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert call(channel, "Unary")(b"again", timeout=5) == b"hello again"
    stats = proxy.stats()
    assert stats["cluster.grpc.upstream_rq_timeout"] >= 1
    assert stats["cluster.down.upstream_cx_connect_fail"] == 1


def test_curl_and_h2load_to_h2c_upstream(make_proxy: Any, h2_upstream: H2Upstream) -> None:
    port = free_port()
    config = proxy_config(
        port,
        [h2_cluster("plain", h2_upstream.port)],
        [
            {"match": {"prefix": "/direct"}, "direct_response": {"status": 418}},
            route_to("plain", "/"),
        ],
    )
    proxy = make_proxy(config)
    base = f"http://127.0.0.1:{port}"
    result = curl("--http2-prior-knowledge", "-i", f"{base}/hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("HTTP/2 200")
    assert result.stdout.endswith("h2 GET /hello 0")
    posted = curl("--http2-prior-knowledge", "--data-binary", "abc", f"{base}/up")
    assert posted.stdout == "h2 POST /up 3"
    direct = curl(
        "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}", f"{base}/direct"
    )
    assert direct.stdout == "418"
    load = subprocess.run(
        ["h2load", "-n", "2000", "-c", "4", "-m", "10", f"{base}/load"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert re.search(r"2000 succeeded, 0 failed, 0 errored", load.stdout), load.stdout
    assert proxy.stats()["http.ingress.downstream_rq_2xx"] >= 2002


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_large_bodies_with_bounded_memory(make_proxy: Any, h2_upstream: H2Upstream) -> None:
    port = free_port()
    proxy = make_proxy(
        proxy_config(port, [h2_cluster("plain", h2_upstream.port)], [route_to("plain")])
    )
    base = f"http://127.0.0.1:{port}"
    curl("--http2-prior-knowledge", f"{base}/warm")
    before = _rss_kb(proxy.proc.pid)
    size = 20_000_000
    down = curl(
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        f"{base}/size/{size}",
    )
    assert down.stdout == str(size), down.stderr
    upload = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "--data-binary", "@-", f"{base}/upload"],
        input=b"u" * size, capture_output=True, check=True, timeout=30,
    )  # fmt: skip
    assert upload.stdout == b"h2 POST /upload %d" % size
    grown = _rss_kb(proxy.proc.pid) - before
    assert grown < 15_000, f"proxy RSS grew {grown} kB for {size} B bodies"


def test_auto_serves_http1_and_h2c_on_one_port(
    make_proxy: Any, h2_upstream: H2Upstream, grpc_server: GrpcServer
) -> None:
    port = free_port()
    http1_port = free_port()
    http1 = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(http1_port)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(http1_port)
        config = proxy_config(
            port,
            [h2_cluster("plain", h2_upstream.port), static_cluster("old", http1_port)],
            [
                {
                    "match": {"prefix": "/", "headers": [{"name": "x-old", "present_match": True}]},
                    "route": {"cluster": "old"},
                },
                route_to("plain"),
            ],
            codec_type="AUTO",
        )
        make_proxy(config)
        base = f"http://127.0.0.1:{port}"
        h2 = curl("--http2-prior-knowledge", "-i", f"{base}/x")
        assert h2.stdout.startswith("HTTP/2 200") and h2.stdout.endswith("h2 GET /x 0")
        old = curl("--http1.1", "-i", "-H", "x-old: 1", f"{base}/README.md")
        assert old.stdout.startswith("HTTP/1.1 200")
        # each protocol reaches the other kind of cluster too, translated
        h2_to_old = curl("--http2-prior-knowledge", "-i", "-H", "x-old: 1", f"{base}/README.md")
        assert h2_to_old.stdout.startswith("HTTP/2 200") and "make demo" in h2_to_old.stdout
        old_to_h2 = curl("--http1.1", "-i", f"{base}/x")
        assert old_to_h2.stdout.startswith("HTTP/1.1 200") and old_to_h2.stdout.endswith(
            "h2 GET /x 0"
        )
    finally:
        stop_process(http1)


def test_zero_window_stall_is_reset_by_stream_idle_timeout(
    make_proxy: Any, h2_upstream: H2Upstream
) -> None:
    """A client that never returns flow-control credit stalls its stream: after
    stream_idle_timeout the proxy resets it (and the upstream stream)."""
    port = free_port()
    config = proxy_config(
        port, [h2_cluster("plain", h2_upstream.port)], [route_to("plain")], stream_idle_timeout="1s"
    )
    proxy = make_proxy(config)
    client = H2Connection(True, initial_window_size=1024)
    headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x")]
    client.send_headers(1, [*headers, (b":path", b"/size/1000000")], end_stream=True)
    reset: StreamReset | None = None
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(client.data_to_send())
        while reset is None and time.monotonic() - started < 5:
            for event in client.receive_data(sock.recv(65536)):  # never acknowledged
                if isinstance(event, StreamReset):
                    reset = event
            sock.sendall(client.data_to_send())
    assert reset is not None and reset.error_code == CANCEL
    assert 0.9 < time.monotonic() - started < 4
    assert proxy.stats()["http.ingress.downstream_rq_total"] == 1
