"""Upstream connections for RPC protocols: one shared connection per host when the
protocol multiplexes by request id, one request per connection when it does not.

A multiplexed connection carries requests from many downstream connections, whose ids may
collide, so each request gets a fresh upstream id (``RpcCodec.set_request_id``) and the
answer is matched back by it. The server's own heartbeats are answered here; answers to
nobody (a request that timed out meanwhile) are dropped.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from shoal.codec.rpc.base import RpcCodec, RpcFrame, RpcProtocolError
from shoal.transport.tls import UpstreamTls
from shoal.transport.upstream import ConnectionCounters, start_connect, upstream_transport

_MAX_ID = 2**31 - 1  # Bolt's ids are 32-bit, the others' 64-bit: stay within both


class RpcExchange(Protocol):
    """One request in flight upstream; the connection tells it how it ended."""

    def upstream_response(self, frame: RpcFrame) -> None: ...
    def upstream_failed(self, reason: str, connect: bool) -> None: ...


class RpcUpstreamConnection(asyncio.Protocol):
    __slots__ = ("closed", "codec", "decoder", "next_id", "out", "pending", "pool", "transport")

    def __init__(self, pool: RpcHostPool) -> None:
        self.pool = pool
        self.codec = pool.codec
        self.decoder = pool.codec.decoder(pool.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, RpcExchange] = {}
        # requests not yet written: many downstream connections share this one, so what
        # they send in one loop iteration goes out as one write (one syscall, not one each)
        self.out: list[bytes] = []
        self.next_id = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = upstream_transport(transport)
        self.flush()

    def flush(self) -> None:
        out, transport = self.out, self.transport
        if out and transport is not None and not self.closed:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def send(self, frame: RpcFrame, exchange: RpcExchange | None) -> int:
        """Write ``frame`` under a fresh id; ``exchange`` (None for one-way requests) gets
        the answer. Returns the upstream id, for :meth:`forget`."""
        upstream_id = self.next_id = self.next_id % _MAX_ID + 1
        data = self.codec.set_request_id(frame.raw, upstream_id)
        if exchange is not None:
            self.pending[upstream_id] = exchange
        out = self.out
        if not out and self.transport is not None:
            asyncio.get_running_loop().call_soon(self.flush)
        out.append(data)
        return upstream_id

    def forget(self, upstream_id: int) -> None:
        """The request was given up (timeout, downstream gone); a late answer is dropped."""
        self.pending.pop(upstream_id, None)
        if self.pool.closing and not self.pending:
            self.close()

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except RpcProtocolError as exc:
            self.deliver(exc.frames)
            self.fail(f"upstream protocol error: {exc}")
            return
        self.deliver(frames)

    def deliver(self, frames: list[RpcFrame]) -> None:
        for frame in frames:
            if frame.is_request:
                if frame.heartbeat and self.transport is not None:
                    self.transport.write(self.codec.heartbeat_reply(frame))
                continue
            exchange = self.pending.pop(frame.request_id, None)
            if exchange is not None:
                exchange.upstream_response(frame)
        if self.pool.closing and not self.pending:
            self.close()

    def fail(self, reason: str) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._lost(reason, connect=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost("upstream connection reset", connect=False)

    def connect_failed(self, reason: str) -> None:
        self._lost(reason, connect=True)

    def _lost(self, reason: str, connect: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self.pool.closed(self)
        pending, self.pending = self.pending, {}
        for exchange in pending.values():
            exchange.upstream_failed(reason, connect)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        else:
            self._lost("connection closed", connect=True)


class RpcHostPool:
    """Connections to one host for one protocol. Multiplexed: a single connection, shared;
    otherwise one in-flight request per connection (new connections as needed)."""

    __slots__ = (
        "address",
        "closing",
        "codec",
        "connect_timeout",
        "connections",
        "counters",
        "max_frame_bytes",
        "tls",
    )

    def __init__(
        self,
        codec: RpcCodec,
        address: tuple[str, int],
        connect_timeout: float,
        max_frame_bytes: int,
        counters: ConnectionCounters,
        *,
        tls: UpstreamTls | None = None,
    ) -> None:
        self.tls = tls
        self.codec = codec
        self.address = address
        self.connect_timeout = connect_timeout
        self.max_frame_bytes = max_frame_bytes
        self.counters = counters
        self.closing = False
        self.connections: list[RpcUpstreamConnection] = []

    def connection(self) -> RpcUpstreamConnection:
        """A connection with room for one more request (opened now if none has room)."""
        multiplexed = self.codec.multiplexed
        for conn in self.connections:
            if multiplexed or not conn.pending:
                return conn
        conn = RpcUpstreamConnection(self)
        self.connections.append(conn)
        start_connect(conn, conn.connect_failed, self)
        return conn

    def closed(self, conn: RpcUpstreamConnection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)
            self.counters.upstream_cx_destroy += 1

    def close(self) -> None:
        """Close idle connections now and the others after their last answer (a config
        change must not cut requests in flight)."""
        self.closing = True
        for conn in list(self.connections):
            if not conn.pending:
                conn.close()
