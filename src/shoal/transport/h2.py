"""Upstream HTTP/2: multiplexed connections to one host, each driving a client-side
:class:`~shoal.codec.http2.H2Connection`.

A host gets one connection, shared by every downstream stream routed to it; a second is
opened only when the first has reached the server's SETTINGS_MAX_CONCURRENT_STREAMS (or
was told GOAWAY). A connection is usable while it connects: the codec queues the preface
and requests, and ``connection_made`` writes them.

The connection knows streams only through :class:`H2StreamSink`: it hands each event to
the stream that opened it and never buffers body bytes itself. Writes are batched: each
change marks the connection dirty and one ``loop.call_soon`` flushes the codec's bytes,
so many streams' frames leave in one ``write``.

With ``connection_keepalive`` (:class:`Pinger`, also used by downstream sessions) a PING
goes out every interval and a peer that does not answer within the timeout loses the
connection: its streams fail with "keepalive timeout".
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from shoal.codec.http2 import (
    CANCEL,
    REFUSED_STREAM,
    ConnectionTerminated,
    DataReceived,
    H2Connection,
    Headers,
    PingAckReceived,
    ResponseReceived,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from shoal.config.model import Keepalive
from shoal.transport.tls import UpstreamTls
from shoal.transport.upstream import ConnectionCounters, start_connect, upstream_transport

_PING_DATA = b"shoal-ka"


class Pinger:
    """HTTP/2 PING keepalive of one connection: a PING every ``interval``; ``expired`` is
    called when one goes unanswered for ``timeout``."""

    __slots__ = ("codec", "expired", "keepalive", "kick", "loop", "timer")

    def __init__(
        self,
        keepalive: Keepalive,
        codec: H2Connection,
        kick: Callable[[], None],
        expired: Callable[[], None],
    ) -> None:
        self.keepalive = keepalive
        self.codec = codec
        self.kick = kick
        self.expired = expired
        self.loop = asyncio.get_running_loop()
        self.timer = self.loop.call_later(keepalive.interval, self._ping)

    def _ping(self) -> None:
        self.codec.ping(_PING_DATA)
        self.kick()
        self.timer = self.loop.call_later(self.keepalive.timeout, self.expired)

    def acked(self, data: bytes) -> None:
        if data == _PING_DATA:
            self.timer.cancel()
            self.timer = self.loop.call_later(self.keepalive.interval, self._ping)

    def stop(self) -> None:
        self.timer.cancel()


class H2StreamSink(Protocol):
    """The downstream side of one upstream stream (``shoal.proxy.h2.H2Stream``)."""

    def upstream_headers(self, headers: Headers, end_stream: bool) -> None: ...
    def upstream_data(self, data: bytes, flow_controlled_length: int, end_stream: bool) -> None: ...
    def upstream_trailers(self, headers: Headers) -> None: ...
    def upstream_window(self) -> None: ...
    def upstream_reset(self, error_code: int, refused: bool) -> None: ...
    def upstream_failed(self, reason: str, connect: bool) -> None: ...


class H2UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "closed",
        "codec",
        "connected",
        "dirty",
        "loop",
        "pinger",
        "pool",
        "streams",
        "transport",
    )

    def __init__(self, pool: H2HostPool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        # A stream's window is what a slow downstream client may leave buffered here.
        self.codec = H2Connection(
            True,
            max_concurrent_streams=0,  # we accept no pushed streams
            initial_window_size=256 * 1024,
            connection_window_size=4 * 1024 * 1024,
        )
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2StreamSink] = {}
        self.connected = False
        self.closed = False
        self.dirty = False
        self.pinger: Pinger | None = None

    # used by the pool and the downstream streams ----------------------------------------------

    def has_room(self) -> bool:
        codec = self.codec
        return (
            not self.closed
            and not codec.goaway_received
            and codec.open_outbound_streams < codec.remote_max_concurrent_streams
        )

    def open_stream(self, sink: H2StreamSink, headers: Headers, end_stream: bool) -> int:
        codec = self.codec
        stream_id = codec.get_next_available_stream_id()
        codec.send_headers(stream_id, headers, end_stream)
        self.streams[stream_id] = sink
        self.kick()
        return stream_id

    def window(self, stream_id: int) -> int:
        return self.codec.local_flow_control_window(stream_id)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self.codec.send_data(stream_id, data, end_stream)
        self.kick()

    def send_trailers(self, stream_id: int, headers: Headers) -> None:
        self.codec.send_trailers(stream_id, headers)
        self.kick()

    def acknowledge(self, stream_id: int, size: int) -> None:
        """The downstream client took ``size`` bytes: the server may send that much more."""
        self.codec.acknowledge_received_data(size, stream_id)
        self.kick()

    def retarget(self, stream_id: int, sink: H2StreamSink) -> None:
        """Send the stream's events to ``sink`` from now on (a hedged try changing hands)."""
        if stream_id in self.streams:
            self.streams[stream_id] = sink

    def reset(self, stream_id: int, error_code: int = CANCEL) -> None:
        """Forget the stream (timeout, the client left) and tell the server."""
        if self.streams.pop(stream_id, None) is not None:
            self.codec.reset_stream(stream_id, error_code)
            self.kick()
        self._maybe_close()

    def kick(self) -> None:
        if not self.dirty:
            self.dirty = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.dirty = False
        if self.transport is not None and not self.closed:
            data = self.codec.data_to_send()
            if data:
                self.transport.write(data)

    # asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = upstream_transport(transport)
        self.connected = True
        keepalive = self.pool.keepalive
        if keepalive is not None:
            self.pinger = Pinger(keepalive, self.codec, self.kick, self._keepalive_expired)
        self.flush()

    def _keepalive_expired(self) -> None:
        self.flush()
        self.fail("keepalive timeout")

    def data_received(self, data: bytes) -> None:
        streams = self.streams
        for event in self.codec.receive_data(data):
            if isinstance(event, DataReceived):
                sink = streams.get(event.stream_id)
                if sink is None:
                    self.codec.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                    continue
                if event.end_stream:
                    del streams[event.stream_id]
                sink.upstream_data(event.data, event.flow_controlled_length, event.end_stream)
            elif isinstance(event, ResponseReceived):
                sink = streams.get(event.stream_id)
                if sink is not None:
                    if event.end_stream:
                        del streams[event.stream_id]
                    sink.upstream_headers(event.headers, event.end_stream)
            elif isinstance(event, TrailersReceived):
                sink = streams.pop(event.stream_id, None)
                if sink is not None:
                    sink.upstream_trailers(event.headers)
            elif isinstance(event, WindowUpdated):
                if event.stream_id:
                    sink = streams.get(event.stream_id)
                    if sink is not None:
                        sink.upstream_window()
                else:
                    for sink in list(streams.values()):
                        sink.upstream_window()
            elif isinstance(event, StreamReset):
                sink = streams.pop(event.stream_id, None)
                if sink is not None:
                    refused = event.remote and event.error_code == REFUSED_STREAM
                    sink.upstream_reset(event.error_code, refused)
            elif isinstance(event, PingAckReceived):
                if self.pinger is not None:
                    self.pinger.acked(event.ping_data)
            elif isinstance(event, ConnectionTerminated):
                self.pool.forget(self)  # no new streams here; open ones may finish
                if not event.remote or event.error_code:
                    self.flush()
                    self.fail("upstream connection terminated (GOAWAY)")
                    return
        self.flush()
        self._maybe_close()

    def _maybe_close(self) -> None:
        """A connection told GOAWAY (or whose cluster went away) closes once its last
        stream is done."""
        closing = self.codec.goaway_received or self.pool.closing
        if closing and not self.streams and self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        """Nothing to do: what we queue is bounded by the server's flow-control windows."""

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost("upstream connection reset", connect=False)

    def fail(self, reason: str) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._lost(reason, connect=False)

    def connect_failed(self, reason: str) -> None:
        self._lost(reason, connect=True)

    def _lost(self, reason: str, connect: bool) -> None:
        if self.closed:
            return
        self.closed = True
        if self.pinger is not None:
            self.pinger.stop()
        self.pool.closed(self)
        streams, self.streams = self.streams, {}
        for sink in streams.values():
            sink.upstream_failed(reason, connect)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        else:
            self._lost("connection closed", connect=True)


class H2HostPool:
    """HTTP/2 connections to one host of a cluster (kept in ``ClusterRuntime.rpc_pools``,
    so that they close with the cluster)."""

    __slots__ = (
        "address",
        "closing",
        "connect_timeout",
        "connections",
        "counters",
        "keepalive",
        "tls",
    )

    def __init__(
        self,
        address: tuple[str, int],
        connect_timeout: float,
        counters: ConnectionCounters,
        *,
        tls: UpstreamTls | None = None,
        keepalive: Keepalive | None = None,
    ) -> None:
        self.address = address
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.counters = counters
        self.tls = tls
        self.closing = False
        self.connections: list[H2UpstreamConnection] = []

    def connection(self) -> H2UpstreamConnection:
        """A connection with room for one more stream (a new one if none has room)."""
        for conn in self.connections:
            if conn.has_room():
                return conn
        conn = H2UpstreamConnection(self)
        self.connections.append(conn)
        start_connect(conn, conn.connect_failed, self)
        return conn

    def forget(self, conn: H2UpstreamConnection) -> None:
        """No new streams on ``conn`` (GOAWAY received); it stays open for its streams."""
        if conn in self.connections:
            self.connections.remove(conn)
            self.counters.upstream_cx_destroy += 1

    def closed(self, conn: H2UpstreamConnection) -> None:
        self.forget(conn)

    def close(self) -> None:
        """Close idle connections now, the others after their last stream (GOAWAY)."""
        self.closing = True
        for conn in list(self.connections):
            if not conn.streams:
                conn.close()
            elif conn.transport is not None and not conn.closed:
                conn.codec.close_connection()
                conn.flush()
