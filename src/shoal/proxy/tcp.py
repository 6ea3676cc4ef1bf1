"""``envoy.filters.network.tcp_proxy``: splice a downstream socket to an upstream host.

Bytes flow both ways with backpressure: when one side's write buffer passes the
watermark the other side stops reading until it drains.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from shoal.observe.stats import int_fields
from shoal.transport.upstream import HIGH_WATERMARK

if TYPE_CHECKING:
    from shoal.proxy.listeners import TcpListenerContext
    from shoal.upstream.cluster import ClusterRuntime
    from shoal.upstream.host import Host

_ids = itertools.count(1_000_000_000)


@dataclass(slots=True)
class TcpStats:
    """``tcp.<stat_prefix>.*`` counters."""

    downstream_cx_total: int = 0
    downstream_cx_no_route: int = 0
    downstream_cx_rx_bytes_total: int = 0
    downstream_cx_tx_bytes_total: int = 0
    idle_timeout: int = 0


TCP_COUNTERS = int_fields(TcpStats)


class _UpstreamSide(asyncio.Protocol):
    __slots__ = ("session", "transport")

    def __init__(self, session: TcpSession) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=HIGH_WATERMARK)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.session.from_upstream(data)

    def eof_received(self) -> bool | None:
        return self.session.upstream_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.upstream_closed()

    def pause_writing(self) -> None:
        self.session.pause_downstream()

    def resume_writing(self) -> None:
        self.session.resume_downstream()


class TcpSession(asyncio.Protocol):
    """Downstream protocol of a tcp_proxy listener; also the access-log record."""

    __slots__ = (
        "_idle_timer",
        "_last",
        "bytes_received",
        "bytes_sent",
        "cluster",
        "connection_id",
        "ctx",
        "downstream",
        "downstream_local",
        "downstream_remote",
        "duration",
        "early",
        "half_closed",
        "host",
        "loop",
        "response_flags",
        "start",
        "start_time",
        "upstream",
    )

    protocol = ""
    method = path = authority = route_name = response_code_details = trace_id = ""
    status = 0

    def __init__(self, ctx: TcpListenerContext) -> None:
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        self.downstream: asyncio.Transport | None = None
        self.upstream: _UpstreamSide | None = None
        self.cluster: ClusterRuntime | None = None
        self.host: Host | None = None
        self.early: list[bytes] = []
        self.half_closed = False  # one direction has ended; the second end closes both
        self.bytes_received = self.bytes_sent = 0
        self.response_flags = "-"
        self.downstream_remote = self.downstream_local = ""
        self.connection_id = next(_ids)
        self.start_time = time.time()
        self.start = self.loop.time()
        self.duration = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last = self.start

    @property
    def upstream_host(self) -> str:
        return self.host.key if self.host is not None else ""

    @property
    def upstream_cluster(self) -> str:
        return self.cluster.config.name if self.cluster is not None else ""

    def request_header(self, name: str) -> str | None:
        return None

    def response_header(self, name: str) -> str | None:
        return None

    # downstream --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.downstream = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=HIGH_WATERMARK)
        ctx = self.ctx
        ctx.connections.add(self)
        ctx.stats.downstream_cx_total += 1
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self.downstream_remote = f"{peer[0]}:{peer[1]}" if peer else ""
        self.downstream_local = f"{local[0]}:{local[1]}" if local else ""
        transport.pause_reading()
        config = ctx.config
        name = config.cluster
        if config.weighted_clusters:
            point = random.randrange(sum(w.weight for w in config.weighted_clusters))
            for weighted in config.weighted_clusters:
                point -= weighted.weight
                if point < 0:
                    name = weighted.name
                    break
        cluster = ctx.clusters.get(name)
        if cluster is None:
            ctx.stats.downstream_cx_no_route += 1
            self.response_flags = "NR"
            transport.close()
            return
        self.cluster = cluster
        self.loop.create_task(self._connect(cluster))
        if config.idle_timeout:
            self._idle_timer = self.loop.call_later(config.idle_timeout, self._check_idle)

    async def _connect(self, cluster: ClusterRuntime) -> None:
        attempts = max(1, self.ctx.config.max_connect_attempts)
        tried: Host | None = None
        for _ in range(attempts):
            host = cluster.lb.choose(None, tried)
            if host is None:
                self.response_flags = "UH"
                break
            if cluster.cx_active >= cluster.config.circuit_breakers.max_connections:
                cluster.stats.upstream_cx_overflow += 1
                self.response_flags = "UO"
                break
            tried = self.host = host
            cluster.cx_active += 1
            cluster.stats.upstream_cx_total += 1
            cluster.stats.upstream_rq_total += 1  # Envoy counts each try as a request too
            tls = cluster.tls
            try:
                async with asyncio.timeout(cluster.config.connect_timeout):
                    if tls is None:
                        _, side = await self.loop.create_connection(
                            lambda: _UpstreamSide(self), host.address.host, host.address.port
                        )
                    else:  # TLS origination: the handshake is part of the connect
                        side = _UpstreamSide(self)
                        await tls.connect(side, host.address.host, host.address.port)
            except (OSError, TimeoutError) as exc:
                cluster.cx_active -= 1
                cluster.stats.upstream_cx_connect_fail += 1
                self.response_flags = "UF"
                if cluster.outlier is not None:
                    kind = "timeout" if isinstance(exc, TimeoutError) else "connect_failure"
                    cluster.outlier.record_local_failure(host, kind)
                continue
            if cluster.outlier is not None:  # for a TCP proxy the connection is the exchange
                cluster.outlier.record_local_success(host, final=True)
            if self.downstream is None or self.downstream.is_closing():
                side.transport.close()  # type: ignore[union-attr]
                return
            self.upstream = side
            self.response_flags = "-"
            for data in self.early:
                side.transport.write(data)  # type: ignore[union-attr]
            self.early.clear()
            self.downstream.resume_reading()
            return
        if self.response_flags == "UF":
            self.response_flags = "UF,URX"  # as Envoy, even for max_connect_attempts 1
        if self.downstream is not None:
            self.downstream.close()

    def data_received(self, data: bytes) -> None:
        self.bytes_received += len(data)
        self._last = self.loop.time()
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.write(data)
        else:
            self.early.append(data)

    def eof_received(self) -> bool | None:
        upstream = self.upstream
        transport = upstream.transport if upstream is not None else None
        if transport is not None and transport.can_write_eof():
            transport.write_eof()
            if self.half_closed:
                return None  # the upstream ended first: both directions are done
            self.half_closed = True
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        ctx = self.ctx
        ctx.connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()
        self.duration = self.loop.time() - self.start
        ctx.stats.downstream_cx_rx_bytes_total += self.bytes_received
        ctx.stats.downstream_cx_tx_bytes_total += self.bytes_sent
        for access_log in ctx.access_logs:
            access_log(self)

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    # upstream ----------------------------------------------------------------------------------

    def from_upstream(self, data: bytes) -> None:
        self.bytes_sent += len(data)
        self._last = self.loop.time()
        if self.downstream is not None:
            self.downstream.write(data)

    def upstream_eof(self) -> bool:
        """Pass the upstream's FIN on; True keeps the upstream socket open for the
        downstream's remaining bytes, False closes it when the downstream has ended too."""
        if self.downstream is not None and self.downstream.can_write_eof():
            self.downstream.write_eof()
        if self.half_closed:
            return False
        self.half_closed = True
        return True

    def upstream_closed(self) -> None:
        if self.cluster is not None:
            self.cluster.cx_active -= 1
        self.upstream = None
        if self.downstream is not None:
            self.downstream.close()

    def pause_downstream(self) -> None:
        if self.downstream is not None:
            self.downstream.pause_reading()

    def resume_downstream(self) -> None:
        if self.downstream is not None:
            self.downstream.resume_reading()

    def _check_idle(self) -> None:
        idle = self.ctx.config.idle_timeout
        assert idle
        remaining = self._last + idle - self.loop.time()
        if remaining > 0:
            self._idle_timer = self.loop.call_later(remaining, self._check_idle)
            return
        self._idle_timer = None
        self.ctx.stats.idle_timeout += 1
        if self.downstream is not None:
            self.downstream.close()

    def drain(self) -> None:
        """TCP has no graceful end: a drained listener lets its sessions run out."""
