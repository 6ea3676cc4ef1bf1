"""Malformed or ambiguous HTTP never reaches an upstream.

Every request here is byte-exact and goes over a real socket to a real `shoal proxy`,
which routes to a *recording* upstream: a raw TCP server in this process that keeps every
byte it receives. For each bad request the test checks the status line, the
``connection: close`` header, that the proxy closes the socket afterwards, and that the
upstream received nothing at all of it (only the good request sent afterwards).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import pytest
from tests.conftest import Proxy, bootstrap, free_port, http_listener, route_to, static_cluster

MAX_HEADERS_KB = 8
MAX_REQUEST_BYTES = 1024
HEADERS_TIMEOUT = 0.5


# --- the recording upstream -------------------------------------------------------------------


@dataclass
class Recorded:
    """One upstream connection: every byte it received and the requests parsed from them."""

    data: bytearray = field(default_factory=bytearray)
    requests: list[tuple[bytes, bytes, bytes]] = field(default_factory=list)  # method, url, body
    error: str = ""


class _UpstreamParser:
    def __init__(self, record: Recorded, sock: socket.socket) -> None:
        self.record, self.sock = record, sock
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body = b""

    def on_message_begin(self) -> None:
        self.url, self.body = b"", b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        self.record.requests.append((method, self.url, self.body))
        body = b"upstream saw " + self.url
        self.sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))


class RecordingUpstream:
    """A raw TCP server that records every byte and answers each complete request 200."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.connections: list[Recorded] = []
        self.sockets: list[socket.socket] = []
        self.stopped = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            record = Recorded()
            with self.lock:
                self.connections.append(record)
                self.sockets.append(sock)
            threading.Thread(target=self._serve, args=(sock, record), daemon=True).start()

    def _serve(self, sock: socket.socket, record: Recorded) -> None:
        parser = _UpstreamParser(record, sock)
        with contextlib.suppress(OSError):
            while data := sock.recv(65536):
                with self.lock:
                    record.data += data
                try:
                    parser.parser.feed_data(data)
                except httptools.HttpParserError as exc:
                    record.error = f"upstream could not parse what the proxy sent: {exc}"
                    break
        with contextlib.suppress(OSError):
            sock.close()

    def clear(self) -> None:
        with self.lock:
            for record in self.connections:
                record.data.clear()
                record.requests.clear()
                record.error = ""

    def received(self) -> bytes:
        with self.lock:
            return b"".join(bytes(record.data) for record in self.connections)

    def requests(self) -> list[tuple[bytes, bytes, bytes]]:
        with self.lock:
            return [request for record in self.connections for request in record.requests]

    def errors(self) -> list[str]:
        with self.lock:
            return [record.error for record in self.connections if record.error]

    def stop(self) -> None:
        self.stopped = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.close()
        self.thread.join(timeout=5)


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    server = RecordingUpstream()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(upstream: RecordingUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    port = free_port()
    buffer_filter = {
        "name": "envoy.filters.http.buffer",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
            "max_request_bytes": MAX_REQUEST_BYTES,
        },
    }
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
        },
    }
    listener = http_listener(
        port,
        [{"name": "all", "domains": ["*"], "routes": [route_to("recorder")]}],
        max_request_headers_kb=MAX_HEADERS_KB,
        request_headers_timeout=f"{HEADERS_TIMEOUT}s",
        http_filters=[buffer_filter, router],
    )
    config = bootstrap([listener], [static_cluster("recorder", upstream.port)], free_port())
    workdir: Path = tmp_path_factory.mktemp("bad-input-proxy")
    running = Proxy(config, workdir)
    running.port = port
    yield running
    running.stop()


@pytest.fixture
def recorder(upstream: RecordingUpstream, proxy: Any) -> RecordingUpstream:
    upstream.clear()
    return upstream


# --- helpers ------------------------------------------------------------------------------


@dataclass
class Reply:
    data: bytes
    closed: bool  # the proxy closed the connection (EOF or reset) after answering

    @property
    def status_line(self) -> bytes:
        return self.data.partition(b"\r\n")[0]

    @property
    def status(self) -> int:
        return int(self.status_line.split(b" ", 2)[1])

    def header(self, name: bytes) -> bytes | None:
        head = self.data.partition(b"\r\n\r\n")[0]
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name:
                return value.strip()
        return None


def read_until_closed(sock: socket.socket, timeout: float = 3.0) -> Reply:
    """Read until EOF; ``closed`` is False if the proxy kept the socket open past timeout."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return Reply(b"".join(chunks), closed=False)
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return Reply(b"".join(chunks), closed=False)
        except ConnectionResetError:
            return Reply(b"".join(chunks), closed=True)
        if not chunk:
            return Reply(b"".join(chunks), closed=True)
        chunks.append(chunk)


def send(port: int, data: bytes, pause: float = 0.0) -> Reply:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        if pause:
            time.sleep(pause)
        return read_until_closed(sock)


def read_response(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Read exactly one response with a Content-Length body (what the recorder sends)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-body: {data!r}"
        body += chunk
    assert len(body) == length, "more bytes than one response"
    return head + b"\r\n\r\n" + body


def good(path: bytes, extra: bytes = b"") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: svc\r\n" + extra + b"\r\n"


def assert_rejected(reply: Reply, status: int) -> None:
    assert reply.data, "no response at all"
    assert reply.status == status, reply.data
    assert reply.status_line.startswith(b"HTTP/1.1 %d " % status), reply.data
    assert reply.header(b"connection") == b"close", reply.data
    assert reply.closed, f"proxy kept the connection open after {reply.data!r}"
    # exactly one response, nothing after it
    assert reply.data.count(b"HTTP/1.1 ") == 1, reply.data


def assert_upstream_saw_only(
    proxy: Any, recorder: RecordingUpstream, paths: list[bytes], probe: bytes
) -> None:
    """Send a good request (``probe``) and check the upstream saw ``paths`` + it, nothing else.

    The probe also proves the proxy still serves; anything a bad request had leaked would
    already be at the upstream by the time the probe's response is back.
    """
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(good(probe, b"Connection: close\r\n"))
        response = read_response(sock)
    assert response.startswith(b"HTTP/1.1 200 "), response
    assert response.endswith(b"upstream saw " + probe)
    assert recorder.errors() == []
    assert [url for _, url, _ in recorder.requests()] == [*paths, probe]
    received = recorder.received()
    for path in (*paths, probe):
        assert received.count(b" " + path + b" HTTP/1.1\r\n") == 1, received
    assert b"/bad" not in received, received


# --- the cases ------------------------------------------------------------------------------

BIG_URL = b"/bad/" + b"u" * (MAX_HEADERS_KB * 1024 + 100)
BIG_HEADERS = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 500) for i in range(20))
BODY_OVER = b"b" * (MAX_REQUEST_BYTES * 4)

# (id, request bytes, expected status)
CASES = [
    (
        "cl-and-te",
        b"POST /bad HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "te-and-cl",
        b"POST /bad HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "duplicate-cl-same",
        b"POST /bad HTTP/1.1\r\nHost: svc\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nA",
        400,
    ),
    (
        "duplicate-cl-different",
        b"POST /bad HTTP/1.1\r\nHost: svc\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nAB",
        400,
    ),
    ("cl-list", b"POST /bad HTTP/1.1\r\nHost: svc\r\nContent-Length: 1, 1\r\n\r\nA", 400),
    ("cl-negative", b"POST /bad HTTP/1.1\r\nHost: svc\r\nContent-Length: -1\r\n\r\nA", 400),
    ("cl-plus", b"POST /bad HTTP/1.1\r\nHost: svc\r\nContent-Length: +1\r\n\r\nA", 400),
    (
        "cl-overflow",
        b"POST /bad HTTP/1.1\r\nHost: svc\r\nContent-Length: 99999999999999999999999\r\n\r\nA",
        400,
    ),
    (
        "chunk-size-invalid",
        b"POST /bad HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nA\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk-size-overflow",
        b"POST /bad HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"fffffffffffffffff1\r\nA\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk-data-too-long",
        b"POST /bad HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\nAB\r\n0\r\n\r\n",
        400,
    ),
    ("bare-lf", b"GET /bad HTTP/1.1\nHost: svc\n\n", 400),
    ("bare-lf-in-headers", b"GET /bad HTTP/1.1\r\nHost: svc\nX: y\r\n\r\n", 400),
    ("bare-lf-end-of-head", b"GET /bad HTTP/1.1\r\nHost: svc\r\n\n", 400),
    ("bare-cr", b"GET /bad HTTP/1.1\r\nHost: svc\rX: y\r\n\r\n", 400),
    ("bare-cr-in-value", b"GET /bad HTTP/1.1\r\nHost: svc\r\nX: a\rb\r\n\r\n", 400),
    ("obs-fold", b"GET /bad HTTP/1.1\r\nHost: svc\r\nX: a\r\n b\r\n\r\n", 400),
    ("obs-fold-tab", b"GET /bad HTTP/1.1\r\nHost: svc\r\nX: a\r\n\tb\r\n\r\n", 400),
    ("nul-in-value", b"GET /bad HTTP/1.1\r\nHost: svc\r\nX: a\x00b\r\n\r\n", 400),
    ("space-before-colon", b"GET /bad HTTP/1.1\r\nHost : svc\r\n\r\n", 400),
    ("invalid-header-name", b"GET /bad HTTP/1.1\r\nHost: svc\r\nX(a): b\r\n\r\n", 400),
    ("empty-header-name", b"GET /bad HTTP/1.1\r\nHost: svc\r\n: b\r\n\r\n", 400),
    ("invalid-method", b"G(T /bad HTTP/1.1\r\nHost: svc\r\n\r\n", 400),
    ("http-2.0", b"GET /bad HTTP/2.0\r\nHost: svc\r\n\r\n", 505),
    ("http-3.0", b"GET /bad HTTP/3.0\r\nHost: svc\r\n\r\n", 505),
    (
        "te-in-http-1.0",
        b"POST /bad HTTP/1.0\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("te-gzip", b"POST /bad HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: gzip\r\n\r\nA", 501),
    (
        "te-gzip-chunked",
        b"POST /bad HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    (
        "te-chunked-chunked",
        b"POST /bad HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "te-chunked-twice",
        b"POST /bad HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("missing-host", b"GET /bad HTTP/1.1\r\nX: y\r\n\r\n", 400),
    ("duplicate-host", b"GET /bad HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("oversize-request-line", b"GET " + BIG_URL + b" HTTP/1.1\r\nHost: svc\r\n\r\n", 431),
    ("oversize-headers", b"GET /bad HTTP/1.1\r\nHost: svc\r\n" + BIG_HEADERS + b"\r\n", 431),
    (
        "body-over-limit-content-length",
        b"POST /bad HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n%s"
        % (len(BODY_OVER), BODY_OVER),
        413,
    ),
    (
        "body-over-limit-chunked",
        b"POST /bad HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY_OVER), BODY_OVER),
        413,
    ),
]


@pytest.mark.parametrize(
    ("request_bytes", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_request_is_rejected_and_never_forwarded(
    proxy: Any, recorder: RecordingUpstream, request_bytes: bytes, status: int
) -> None:
    reply = send(proxy.port, request_bytes)
    assert_rejected(reply, status)
    assert_upstream_saw_only(proxy, recorder, [], b"/after")


def test_slow_headers_get_408(proxy: Any, recorder: RecordingUpstream) -> None:
    before = proxy.stats().get("http.ingress.downstream_rq_header_timeout", 0)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /bad HTTP/1.1\r\nHost: svc\r\nX-Half: ")
        started = time.monotonic()
        reply = read_until_closed(sock, timeout=HEADERS_TIMEOUT + 3)
        elapsed = time.monotonic() - started
    assert_rejected(reply, 408)
    assert HEADERS_TIMEOUT * 0.8 <= elapsed < HEADERS_TIMEOUT + 2
    assert proxy.stats()["http.ingress.downstream_rq_header_timeout"] == before + 1
    assert_upstream_saw_only(proxy, recorder, [], b"/after")


def test_head_completed_in_time_is_not_timed_out(proxy: Any, recorder: RecordingUpstream) -> None:
    """The 408 timer covers the head only: a head trickled in under the limit is served."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        for piece in (b"GET /slow-but-ok HTTP/1.1\r\n", b"Host: svc\r\n", b"\r\n"):
            sock.sendall(piece)
            time.sleep(HEADERS_TIMEOUT / 4)
        response = read_response(sock)
    assert response.startswith(b"HTTP/1.1 200 ")
    assert_upstream_saw_only(proxy, recorder, [b"/slow-but-ok"], b"/after")


def test_body_at_the_limit_is_forwarded(proxy: Any, recorder: RecordingUpstream) -> None:
    body = b"k" * MAX_REQUEST_BYTES
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(
            b"POST /at-limit HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        response = read_response(sock)
    assert response.startswith(b"HTTP/1.1 200 ")
    assert [(m, u, len(b)) for m, u, b in recorder.requests()] == [
        (b"POST", b"/at-limit", MAX_REQUEST_BYTES)
    ]
    assert_upstream_saw_only(proxy, recorder, [b"/at-limit"], b"/after")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [c[1:] for c in CASES if c[0] in ("duplicate-cl-different", "cl-and-te", "obs-fold")],
    ids=["duplicate-cl-different", "cl-and-te", "obs-fold"],
)
def test_bad_request_after_good_keep_alive_request(
    proxy: Any, recorder: RecordingUpstream, request_bytes: bytes, status: int
) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(good(b"/first"))
        first = read_response(sock)
        assert first.startswith(b"HTTP/1.1 200 ")
        assert b"connection: close" not in first.lower()
        sock.sendall(request_bytes)
        reply = read_until_closed(sock)
    assert_rejected(reply, status)
    assert_upstream_saw_only(proxy, recorder, [b"/first"], b"/after")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [c[1:] for c in CASES if c[0] in ("duplicate-cl-different", "cl-and-te", "http-2.0")],
    ids=["duplicate-cl-different", "cl-and-te", "http-2.0"],
)
def test_good_request_pipelined_before_bad_one_gets_its_200(
    proxy: Any, recorder: RecordingUpstream, request_bytes: bytes, status: int
) -> None:
    """Both in one write: the good request is served, then the bad one is rejected."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(good(b"/first") + request_bytes)
        reply = read_until_closed(sock)
    first, rest = _split_first_response(reply.data)
    assert first.startswith(b"HTTP/1.1 200 "), reply.data
    assert first.endswith(b"upstream saw /first"), reply.data
    assert_rejected(Reply(rest, reply.closed), status)
    assert_upstream_saw_only(proxy, recorder, [b"/first"], b"/after")


def test_two_good_requests_pipelined_before_a_bad_one(
    proxy: Any, recorder: RecordingUpstream
) -> None:
    bad = b"GET /bad HTTP/1.1\r\nHost: svc\r\nX: a\r\n b\r\n\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(good(b"/one") + good(b"/two") + bad)
        reply = read_until_closed(sock)
    first, rest = _split_first_response(reply.data)
    second, rest = _split_first_response(rest)
    assert first.endswith(b"upstream saw /one"), reply.data
    assert second.endswith(b"upstream saw /two"), reply.data
    assert_rejected(Reply(rest, reply.closed), 400)
    assert_upstream_saw_only(proxy, recorder, [b"/one", b"/two"], b"/after")


def _split_first_response(data: bytes) -> tuple[bytes, bytes]:
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, data
    length = 0
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            length = int(value)
    return head + sep + rest[:length], rest[length:]


def test_proxy_stays_healthy(proxy: Any, recorder: RecordingUpstream) -> None:
    """After every bad input above, a normal request still works and /ready is 200."""
    assert proxy.proc.poll() is None, proxy.output()
    assert proxy.admin("/ready")[0] == 200
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        for index in range(3):
            sock.sendall(good(b"/healthy-%d" % index))
            assert read_response(sock).endswith(b"upstream saw /healthy-%d" % index)
    stats = proxy.stats()
    assert stats["http.ingress.downstream_cx_protocol_error"] >= len(CASES) - 3
    assert "Traceback" not in proxy.output()
