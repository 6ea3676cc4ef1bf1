"""Upstream HTTP/1.1 connections: one asyncio Protocol per socket, one request at a time.

The connection knows nothing of routing: it feeds bytes to the response decoder and hands
events to whichever exchange (``ResponseSink``) currently owns it; the pool that created
it (``ConnectionOwner``) learns when it connects, becomes idle again, or dies.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Protocol, cast

from shoal.codec.http1 import END, Event, ResponseDecoder, ResponseHead, Upgrade, no_body_status
from shoal.errors import RemoteProtocolError
from shoal.transport.tls import UpstreamTls

HIGH_WATERMARK = 64 * 1024


class ResponseSink(Protocol):
    """What an upstream connection reports to the exchange using it."""

    def upstream_head(self, head: ResponseHead) -> None: ...
    def upstream_data(self, data: bytes) -> None: ...
    def upstream_end(self) -> None: ...
    def upstream_upgraded(self, rest: bytes) -> None: ...
    def upstream_reset(self, reason: str) -> None: ...
    def upstream_pause(self) -> None: ...
    def cork(self) -> None: ...
    def uncork(self) -> None: ...
    def upstream_resume(self) -> None: ...


class ConnectionOwner(Protocol):
    def connection_ready(self, conn: UpstreamConnection) -> None: ...
    def connection_closed(self, conn: UpstreamConnection, exc: Exception | None) -> None: ...


class ConnectionCounters(Protocol):
    """The cluster's connection counters (``ClusterStats``)."""

    upstream_cx_total: int
    upstream_cx_connect_fail: int
    upstream_cx_connect_timeout: int
    upstream_cx_destroy: int


async def connect_pooled(
    conn: asyncio.Protocol,
    failed: Callable[[str], None],
    address: tuple[str, int],
    timeout: float,
    counters: ConnectionCounters,
    *,
    tls: UpstreamTls | None = None,
) -> None:
    """Open ``conn``'s connection, as the multiplexed pools (HTTP/2, RPC) do: a failure is
    counted and told to ``failed`` with Envoy's reason. With ``tls`` the handshake is part
    of the connect (and of its timeout)."""
    loop = asyncio.get_running_loop()
    host, port = address
    try:
        async with asyncio.timeout(timeout):
            if tls is None:
                await loop.create_connection(lambda: conn, host, port)
            else:
                await tls.connect(conn, host, port)
    except TimeoutError:
        counters.upstream_cx_connect_fail += 1
        counters.upstream_cx_connect_timeout += 1
        failed("connection timeout")
    except OSError as exc:
        counters.upstream_cx_connect_fail += 1
        failed(f"remote connection failure: {exc.strerror or exc}")


class PooledTarget(Protocol):
    """A host pool of a multiplexed protocol (HTTP/2, RPC): where and how to connect."""

    address: tuple[str, int]
    connect_timeout: float
    counters: ConnectionCounters
    tls: UpstreamTls | None


def start_connect(
    conn: asyncio.Protocol, failed: Callable[[str], None], pool: PooledTarget
) -> None:
    """Count a new connection of ``pool`` and open it in the background."""
    pool.counters.upstream_cx_total += 1
    asyncio.get_running_loop().create_task(
        connect_pooled(
            conn, failed, pool.address, pool.connect_timeout, pool.counters, tls=pool.tls
        )
    )


def upstream_transport(transport: asyncio.BaseTransport) -> asyncio.Transport:
    """A new upstream connection's transport, set up the same way for every protocol:
    no Nagle delay (requests are small and latency-bound), our write watermark."""
    tcp = cast(asyncio.Transport, transport)
    sock = tcp.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tcp.set_write_buffer_limits(high=HIGH_WATERMARK)
    return tcp


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "closed",
        "decoder",
        "owner",
        "requests",
        "rx_bytes",
        "sink",
        "transport",
        "tunnel",
        "tx_bytes",
        "until_close",
    )

    def __init__(self, owner: ConnectionOwner) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.decoder = ResponseDecoder()
        self.sink: ResponseSink | None = None
        self.closed = False
        self.tunnel = False
        self.until_close = False  # the response body ends when the upstream closes
        self.requests = 0
        self.rx_bytes = 0
        self.tx_bytes = 0

    # asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = upstream_transport(transport)
        self.owner.connection_ready(self)

    def data_received(self, data: bytes) -> None:
        self.rx_bytes += len(data)
        sink = self.sink
        if self.tunnel:
            if sink is not None:
                sink.upstream_data(data)
            return
        if sink is None:
            self.close()  # bytes nobody asked for: the connection can't be trusted
            return
        try:
            events = self.decoder.feed(data)
        except RemoteProtocolError as exc:
            self.sink = None
            self.close()
            sink.upstream_reset(f"protocol error: {exc}")
            return
        # Everything the events make the sink write goes out as one downstream write.
        sink.cork()
        try:
            self._deliver(sink, events)
        finally:
            sink.uncork()

    def _deliver(self, sink: ResponseSink, events: list[Event]) -> None:
        for event in events:
            if event.__class__ is bytes:
                sink.upstream_data(event)
            elif event is END:
                self.sink = None
                sink.upstream_end()
                return
            elif event.__class__ is ResponseHead:
                head: ResponseHead = event
                self.until_close = (
                    head.content_length < 0 and not head.chunked and not no_body_status(head.status)
                )
                sink.upstream_head(head)
                # the exchange may hand the connection on (a retried response is drained by
                # a discarding sink) or drop it: the rest of this batch goes to the new owner
                owner = self.sink
                if owner is None:
                    return
                sink = owner
            elif isinstance(event, Upgrade):
                self.tunnel = True
                sink.upstream_upgraded(event.rest)
                return

    def eof_received(self) -> bool | None:
        sink = self.sink
        if sink is not None and self.until_close and not self.tunnel:
            self.sink = None
            self.closed = True
            sink.upstream_end()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        sink, self.sink = self.sink, None
        self.owner.connection_closed(self, exc)
        if sink is not None:
            if self.tunnel:
                sink.upstream_end()
            else:
                sink.upstream_reset("connection termination")

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_pause()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_resume()

    # used by the exchange -----------------------------------------------------------------

    def start(self, sink: ResponseSink, data: bytes, head_only: bool) -> None:
        """Send a request head (and maybe body) and make ``sink`` receive the response."""
        self.sink = sink
        self.requests += 1
        self.until_close = False
        self.decoder.expect_head_response(head_only)
        self.write(data)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.tx_bytes += len(data)
        self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def write_eof(self) -> None:
        if self.transport is not None and not self.closed and self.transport.can_write_eof():
            self.transport.write_eof()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        self.sink = None
        if self.transport is not None:
            self.closed = True
            self.transport.abort()
