"""HTTP/1.1 ⇄ HTTP/2 translation: a request goes to its cluster in the cluster's protocol
(``explicit_http_config``), whatever the client spoke, as Envoy does.

- :class:`H2Carrier`: an HTTP/1.1 request to an HTTP/2 cluster. It stands in for the
  socket under an ordinary :class:`~shoal.transport.upstream.UpstreamConnection`: the
  exchange writes HTTP/1.1 bytes as to any upstream; the carrier decodes them, sends them
  as one stream on the host's multiplexed connection, and feeds the answer back as
  HTTP/1.1 bytes. Retries, timeouts, hedging, mirrors and stats above it are unchanged,
  and the plain HTTP/1.1 path has nothing added.
- :class:`Http1Leg`: an HTTP/2 stream (``shoal.proxy.h2.H2Stream``) to an HTTP/1.1
  cluster, over a pooled keep-alive connection, with the methods of an HTTP/2 upstream
  connection, so the stream drives it as it drives one.

Flow control holds both ways: request bytes wait, bounded, for the upstream's window or
socket (the client is throttled meanwhile), and response credit goes back only as the
client takes the bytes. Trailers do not cross into HTTP/1.1 (Envoy's default), nor does
an upgrade.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, cast

from shoal.codec.http1 import (
    END,
    HOP_BY_HOP,
    LAST_CHUNK,
    RequestDecoder,
    RequestHead,
    ResponseHead,
    connection_tokens,
    encode_chunk,
    encode_headers,
    no_body_status,
    status_line,
)
from shoal.codec.http2 import CANCEL, Headers
from shoal.errors import LocalProtocolError, RemoteProtocolError
from shoal.transport.h2 import H2HostPool, H2StreamSink, H2UpstreamConnection
from shoal.transport.upstream import HIGH_WATERMARK, UpstreamConnection

if TYPE_CHECKING:
    from shoal.upstream.cluster import ClusterRuntime, PoolWaiter
    from shoal.upstream.host import Host

BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})  # framed even when empty
_NOT_CARRIED = frozenset({b"host", b"expect"})  # :authority says the one; 100-continue is ours


def h2_pool(cluster: ClusterRuntime, host: Host) -> H2HostPool:
    """The host's HTTP/2 connections, kept on the cluster so that they close with it."""
    key = ("h2", host.key)
    pool = cluster.rpc_pools.get(key)
    if pool is None:
        address = host.address
        pool = cluster.rpc_pools[key] = H2HostPool(
            (address.host, address.port),
            cluster.config.connect_timeout,
            cluster.stats,
            tls=cluster.tls,
            keepalive=cluster.config.keepalive,
        )
    return cast(H2HostPool, pool)


# --- HTTP/1.1 client, HTTP/2 cluster --------------------------------------------------------


class _NoOwner:
    """A carried connection belongs to no HTTP/1.1 pool: the HTTP/2 pool counts connections."""

    def connection_ready(self, conn: UpstreamConnection) -> None:
        pass

    def connection_closed(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        pass


_NO_OWNER = _NoOwner()


def carry_over_h2(cluster: ClusterRuntime, host: Host, waiter: PoolWaiter) -> UpstreamConnection:
    """A connection for one HTTP/1.1 request, carried by a stream to ``host``."""
    scheme = b"https" if cluster.tls is not None else b"http"
    return H2Carrier(h2_pool(cluster, host), scheme, waiter).conn


class H2Carrier(asyncio.Transport):
    """The transport under one :class:`UpstreamConnection`: one stream, one request."""

    __slots__ = (
        "chunked",
        "closed",
        "conn",
        "decoder",
        "loop",
        "owed",
        "pool",
        "reading_paused",
        "request_ended",
        "scheme",
        "sent_end",
        "stream_id",
        "to_send",
        "unsent_bytes",
        "up",
        "waiter",
        "writing_paused",
    )

    def __init__(self, pool: H2HostPool, scheme: bytes, waiter: PoolWaiter) -> None:
        self.pool = pool
        self.scheme = scheme
        self.waiter = waiter
        self.loop = asyncio.get_running_loop()
        self.decoder = RequestDecoder()
        self.up: H2UpstreamConnection | None = None
        self.stream_id = 0
        self.to_send: list[bytes] = []  # request body waiting for the stream's window
        self.unsent_bytes = 0
        self.request_ended = self.sent_end = False
        self.chunked = False  # the answer has no content-length: it is re-chunked
        self.reading_paused = self.writing_paused = False
        self.owed = 0  # response bytes taken while reading is paused: credit owed
        self.closed = False
        self.conn = UpstreamConnection(_NO_OWNER)
        self.conn.connection_made(self)

    # the asyncio.Transport the UpstreamConnection uses ---------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.pool.address
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        pass

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """HTTP/1.1 bytes from the exchange: the head opens the stream, the body follows."""
        if self.closed:
            return
        try:
            events = self.decoder.feed(bytes(data))
        except RemoteProtocolError as exc:
            self._lost(f"untranslatable request: {exc}")
            return
        for event in events:
            if isinstance(event, bytes):
                self.to_send.append(event)
                self.unsent_bytes += len(event)
            elif event is END:
                self.request_ended = True
            elif isinstance(event, RequestHead):
                if event.upgrade:
                    self._lost("upgrade requests do not cross to HTTP/2")
                    return
                if not self._open(event):
                    return
            else:
                self._lost("untranslatable request")
                return
        self._pump()
        if self.unsent_bytes > HIGH_WATERMARK and not self.writing_paused:
            self.writing_paused = True
            self.conn.pause_writing()  # the exchange stops reading its client

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False
        owed, self.owed = self.owed, 0
        if owed and self.up is not None and not self.closed:
            self.up.acknowledge(self.stream_id, owed)

    def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        if self._drop_stream():
            self.loop.call_soon(self.conn.connection_lost, None)  # as a socket's close does

    def _drop_stream(self) -> bool:
        """Forget the stream, resetting it if still open; False when it was gone already."""
        if self.closed:
            return False
        self.closed = True
        up, self.up = self.up, None
        if up is not None:
            up.reset(self.stream_id, CANCEL)
        return True

    # request -----------------------------------------------------------------------------------

    def _open(self, head: RequestHead) -> bool:
        headers: Headers = [
            (b":method", head.method),
            (b":scheme", self.scheme),
            (b":authority", head.host),
            (b":path", head.target),
        ]
        listed = connection_tokens(head.headers) if head.connection else frozenset()
        for name, value in head.headers:
            if name in HOP_BY_HOP or name in listed or name in _NOT_CARRIED:
                if name == b"te" and value.strip().lower() == b"trailers":
                    headers.append((b"te", b"trailers"))
                continue
            headers.append((name, value))
        up = self.pool.connection()
        try:
            self.stream_id = up.open_stream(self, headers, not head.has_body)
        except LocalProtocolError as exc:  # the connection died under us
            self._lost(str(exc))
            return False
        self.up = up
        self.sent_end = not head.has_body
        return True

    def _pump(self) -> None:
        up = self.up
        if up is None or self.sent_end:
            return
        to_send = self.to_send
        stream_id = self.stream_id
        try:
            while to_send:
                window = up.window(stream_id)
                if window <= 0:
                    break
                chunk = to_send[0]
                if len(chunk) > window:
                    to_send[0] = chunk[window:]
                    chunk = chunk[:window]
                else:
                    del to_send[0]
                self.unsent_bytes -= len(chunk)
                self.sent_end = not to_send and self.request_ended
                up.send_data(stream_id, chunk, self.sent_end)
            if not to_send and self.request_ended and not self.sent_end:
                self.sent_end = True
                up.send_data(stream_id, b"", True)
        except LocalProtocolError:
            return  # the stream was reset: its reset event follows
        if self.writing_paused and self.unsent_bytes <= HIGH_WATERMARK // 2:
            self.writing_paused = False
            self.conn.resume_writing()

    # the stream's events (H2StreamSink) ---------------------------------------------------

    def upstream_window(self) -> None:
        self._pump()

    def upstream_headers(self, headers: Headers, end_stream: bool) -> None:
        status = 0
        has_length = False
        fields: Headers = []
        for name, value in headers:
            if name == b":status":
                status = int(value)
            elif name[0] != 0x3A:  # ':'
                has_length = has_length or name == b"content-length"
                fields.append((name, value))
        if 100 <= status < 200:
            return  # informational: the HTTP/1.1 client gets the final answer
        head = status_line(status) + encode_headers(fields)
        if end_stream:
            if not has_length and not no_body_status(status):
                head += b"content-length: 0\r\n"
        elif not has_length:
            self.chunked = True
            head += b"transfer-encoding: chunked\r\n"
        self._answer(head + b"\r\n", end_stream)

    def upstream_data(self, data: bytes, flow_controlled_length: int, end_stream: bool) -> None:
        payload = encode_chunk(data) if data and self.chunked else data
        if end_stream and self.chunked:
            payload += LAST_CHUNK
        self._answer(payload, end_stream)
        up = self.up
        if up is not None and flow_controlled_length:
            if self.reading_paused:
                self.owed += flow_controlled_length
            else:
                up.acknowledge(self.stream_id, flow_controlled_length)

    def upstream_trailers(self, headers: Headers) -> None:
        self._answer(LAST_CHUNK if self.chunked else b"", True)

    def upstream_reset(self, error_code: int, refused: bool) -> None:
        self.up = None
        self._lost(f"upstream reset the stream (error {error_code})")

    def upstream_failed(self, reason: str, connect: bool) -> None:
        self.up = None
        conn = self.conn
        if connect and conn.sink is cast(object, self.waiter) and not self.closed:
            # the connection never came up: the waiter hears it as from a pool
            self.closed = True
            conn.sink = None
            self.waiter.pool_failure("remote connection failure", reason)
            return
        self._lost(reason)

    def _answer(self, data: bytes, end_stream: bool) -> None:
        if end_stream:
            self.up = None  # the stream is over: close() has nothing to reset
        if data and not self.closed:
            self.conn.data_received(data)

    def _lost(self, reason: str) -> None:
        """The stream is gone: to the exchange, the connection closed under it."""
        if self._drop_stream():
            self.conn.connection_lost(ConnectionResetError(reason))


# --- HTTP/2 client, HTTP/1.1 cluster --------------------------------------------------------


def http1_request(headers: Headers) -> tuple[bytes, bytes, bool]:
    """An HTTP/2 request as HTTP/1.1 head lines (without the blank line that ends them):
    the pseudo-headers become the request line and ``host``, split cookies one header
    again (RFC 9113 §8.2.3), hop-by-hop fields go. Also its method, and whether it has a
    ``content-length`` (else the caller frames the body)."""
    method = path = authority = b""
    has_length = False
    cookies: list[bytes] = []
    fields: Headers = []
    for name, value in headers:
        if name[0] == 0x3A:  # ':'
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
        elif name == b"cookie":
            cookies.append(value)
        elif name not in HOP_BY_HOP:
            has_length = has_length or name == b"content-length"
            fields.append((name, value))
    head = b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method, path, authority)
    if cookies:
        head += b"cookie: %s\r\n" % b"; ".join(cookies)
    return head + encode_headers(fields), method, has_length


class Http1Leg:
    """One HTTP/2 stream's request on a pooled HTTP/1.1 connection."""

    __slots__ = (
        "chunked",
        "cluster",
        "conn",
        "done",
        "head_only",
        "host",
        "loop",
        "pending",
        "reading_paused",
        "request_sent",
        "response_ended",
        "sink",
        "unacked",
        "waiting",
        "writing_paused",
    )

    def __init__(self, cluster: ClusterRuntime, host: Host) -> None:
        self.cluster = cluster
        self.host = host
        self.loop = asyncio.get_running_loop()
        self.sink: H2StreamSink | None = None
        self.conn: UpstreamConnection | None = None
        self.pending: list[bytes] = []  # request bytes until a connection is ours
        self.waiting = False  # for a connection from the pool
        self.chunked = self.head_only = False
        self.request_sent = self.response_ended = self.done = False
        self.reading_paused = self.writing_paused = False
        self.unacked = 0  # response bytes the client has not taken yet

    # what the stream calls (as on H2UpstreamConnection) -------------------------------------

    def open_stream(self, sink: H2StreamSink, headers: Headers, end_stream: bool) -> int:
        self.sink = sink
        self.pending.append(self._head(headers, end_stream))
        self.request_sent = end_stream
        cluster = self.cluster
        conn = cluster.acquire(self.host, self)
        if conn is False:
            self.done = True
            self.loop.call_soon(sink.upstream_failed, "pending overflow", True)
        elif conn is None:
            self.waiting = True
        else:
            assert isinstance(conn, UpstreamConnection)
            self._start(conn)
        return 1

    def window(self, stream_id: int) -> int:
        if self.done or self.writing_paused:
            return 0
        if self.conn is None:
            return max(0, HIGH_WATERMARK - sum(map(len, self.pending)))
        return HIGH_WATERMARK

    def send_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        out = encode_chunk(data) if data and self.chunked else data
        if end_stream:
            self.request_sent = True
            if self.chunked:
                out += LAST_CHUNK
        self._write(out)

    def send_trailers(self, stream_id: int, headers: Headers) -> None:
        self.send_data(stream_id, b"", True)

    def acknowledge(self, stream_id: int, size: int) -> None:
        self.unacked -= size
        conn = self.conn
        if self.reading_paused and conn is not None and self.unacked <= HIGH_WATERMARK // 2:
            self.reading_paused = False
            conn.resume_reading()

    def retarget(self, stream_id: int, sink: H2StreamSink) -> None:
        self.sink = sink

    def reset(self, stream_id: int, error_code: int = CANCEL) -> None:
        """The stream is abandoned: a connection mid-exchange cannot be reused."""
        if self.done:
            return
        self.done = True
        if self.waiting:
            self.waiting = False
            self.cluster.cancel(self.host, self)
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()

    def _head(self, headers: Headers, end_stream: bool) -> bytes:
        head, method, has_length = http1_request(headers)
        self.head_only = method == b"HEAD"
        if not has_length:
            if not end_stream:
                self.chunked = True
                head += b"transfer-encoding: chunked\r\n"
            elif method in BODY_METHODS:
                head += b"content-length: 0\r\n"
        return head + b"\r\n"

    def _write(self, data: bytes) -> None:
        if self.done or not data:
            return
        if self.conn is not None:
            self.conn.write(data)
        else:
            self.pending.append(data)

    def _start(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        data = b"".join(self.pending)
        self.pending = []
        conn.start(self, data, self.head_only)

    # the pool's answers (PoolWaiter) ----------------------------------------------------------

    def pool_ready(self, conn: UpstreamConnection) -> None:
        self.waiting = False
        if self.done:
            self.cluster.release(self.host, conn)
            return
        self._start(conn)
        if self.sink is not None:
            self.sink.upstream_window()  # more of the body may go now

    def pool_failure(self, reason: str, transport_reason: str) -> None:
        self.waiting = False
        self.done = True
        if self.sink is not None:
            detail = f"{reason}: {transport_reason}" if transport_reason else reason
            self.sink.upstream_failed(detail, True)

    # the connection's events (ResponseSink) ---------------------------------------------------

    def upstream_head(self, head: ResponseHead) -> None:
        status = head.status
        listed = connection_tokens(head.headers) if head.connection else frozenset()
        headers: Headers = [(b":status", b"%d" % status)]
        headers += [(n, v) for n, v in head.headers if n not in HOP_BY_HOP and n not in listed]
        bodyless = self.head_only or no_body_status(status) or head.content_length == 0
        self.response_ended = bodyless
        if self.sink is not None:
            self.sink.upstream_headers(headers, bodyless)

    def upstream_data(self, data: bytes) -> None:
        self.unacked += len(data)
        conn = self.conn
        if self.unacked > HIGH_WATERMARK and conn is not None and not self.reading_paused:
            self.reading_paused = True  # until the client takes some
            conn.pause_reading()
        if self.sink is not None:
            self.sink.upstream_data(data, len(data), False)

    def upstream_end(self) -> None:
        conn, self.conn = self.conn, None
        self.done = True
        if conn is not None:
            if self.request_sent and not conn.closed:
                if self.reading_paused:
                    conn.resume_reading()
                self.cluster.release(self.host, conn)
            else:
                conn.close()
        if not self.response_ended and self.sink is not None:
            self.response_ended = True
            self.sink.upstream_data(b"", 0, True)

    def upstream_upgraded(self, rest: bytes) -> None:
        self._fail("upgrades do not cross to HTTP/2")

    def upstream_reset(self, reason: str) -> None:
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()
        if self.done:
            return
        self.done = True
        if self.sink is not None:
            self.sink.upstream_failed(reason, False)

    def upstream_pause(self) -> None:
        self.writing_paused = True

    def upstream_resume(self) -> None:
        self.writing_paused = False
        if self.sink is not None:
            self.sink.upstream_window()

    def cork(self) -> None:
        pass

    def uncork(self) -> None:
        pass
