"""The RPC stream driver: Envoy's generic proxy for Shoal's codecs (Dubbo, Bolt, Motan2).

A downstream connection is decoded frame by frame; heartbeats are answered here; each
request is routed by service, method and properties, admitted by the route's token bucket
and error-rate breaker and the cluster's breakers, and sent on a shared upstream
connection under a fresh request id. The answer goes back byte for byte, with the
client's id. Whatever the proxy answers itself is a protocol-native error
(``RpcCodec.local_reply``): no route, no healthy upstream, timeout, rate limited, circuit
open, upstream unavailable.

Retries happen only where a route's ``retry_policy`` asks (connect failure, reset), on
another host when there is one: the proxy cannot know whether a method is
idempotent, so the route that names the method says so.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from shoal.codec.rpc.base import RpcCodec, RpcErrorKind, RpcFrame, RpcProtocolError
from shoal.config.filters import TokenBucket
from shoal.config.model import RpcCondition, RpcProxy, RpcRoute
from shoal.filters.local_ratelimit import TokenBucketState
from shoal.observe.istio import IstioReporter, rpc_response_code
from shoal.observe.stats import Histogram, int_fields
from shoal.observe.telemetry import TELEMETRY
from shoal.observe.tracing import trace_id_of
from shoal.proxy.listeners import AccessLogs
from shoal.transport.rpc import RpcHostPool, RpcUpstreamConnection
from shoal.upstream.breaker import ErrorRateBreaker, admit, build_breaker
from shoal.upstream.cluster import ClusterRuntime
from shoal.upstream.host import Host

log = logging.getLogger("shoal.proxy.rpc")
_connection_ids = itertools.count(2_000_000_000)

# Envoy's response flags for the proxy's own answers, in access logs
RESPONSE_FLAGS = {
    RpcErrorKind.NO_ROUTE: "NR",
    RpcErrorKind.NO_HEALTHY_UPSTREAM: "UH",
    RpcErrorKind.UPSTREAM_UNAVAILABLE: "UF",
    RpcErrorKind.TIMEOUT: "UT",
    RpcErrorKind.RATE_LIMITED: "RL",
    RpcErrorKind.CIRCUIT_OPEN: "UO",
    RpcErrorKind.BAD_REQUEST: "DPE",
}

# distinct (service, method) pairs with their own stats per listener; the rest share one
MAX_METHOD_STATS = 1000
OTHER = ("other", "other")


@dataclass(slots=True)
class MethodStats:
    rq_total: int = 0
    rq_success: int = 0
    rq_error: int = 0
    rq_local: int = 0  # answered by the proxy (no route, limits, timeouts, ...)
    rq_time: Histogram = field(default_factory=Histogram)


@dataclass(slots=True)
class RpcStats:
    """``generic_proxy.<stat_prefix>.*``; the two ``*_active`` fields are gauges."""

    downstream_cx_total: int = 0
    downstream_cx_protocol_error: int = 0
    downstream_rq_total: int = 0
    downstream_rq_error: int = 0
    downstream_rq_local: int = 0
    downstream_rq_heartbeat: int = 0
    downstream_rq_rate_limited: int = 0
    downstream_rq_timeout: int = 0
    downstream_rq_retry: int = 0
    downstream_cx_active: int = 0
    downstream_rq_active: int = 0
    downstream_rq_time: Histogram = field(default_factory=Histogram)
    methods: dict[tuple[str, str], MethodStats] = field(default_factory=dict)

    def method(self, service: str, method: str) -> MethodStats:
        key = (service, method)
        stats = self.methods.get(key)
        if stats is None:
            if len(self.methods) >= MAX_METHOD_STATS:
                key = OTHER
            stats = self.methods.setdefault(key, MethodStats())
        return stats


RPC_GAUGES = ("downstream_cx_active", "downstream_rq_active")
RPC_COUNTERS = tuple(name for name in int_fields(RpcStats) if name not in RPC_GAUGES)
METHOD_COUNTERS = int_fields(MethodStats)


class CompiledRpcRoute:
    """A route with its live parts: breaker, token bucket and cluster weights."""

    __slots__ = ("breaker", "bucket", "clusters", "conditions", "config", "weights")

    def __init__(self, config: RpcRoute, clock: Callable[[], float], stat_prefix: str) -> None:
        self.config = config
        self.conditions = config.conditions
        self.breaker: ErrorRateBreaker | None = None
        if config.breaker is not None:
            name = f"{stat_prefix}.{config.name}" if config.name else ""
            self.breaker = build_breaker(config.breaker, name, clock)
        self.bucket = _bucket(config.rate_limit, clock())
        if config.weighted_clusters:
            self.clusters = [w.name for w in config.weighted_clusters]
            self.weights = [w.weight for w in config.weighted_clusters]
        else:
            self.clusters = [config.cluster]
            self.weights = []

    def matches(self, frame: RpcFrame) -> bool:
        for condition in self.conditions:
            value = _input(condition, frame)
            if value is None or not condition.match.matches(value):
                return False
        return True

    def pick_cluster(self) -> str:
        if not self.weights:
            return self.clusters[0]
        return random.choices(self.clusters, self.weights)[0]


def _bucket(config: TokenBucket | None, now: float) -> TokenBucketState | None:
    return TokenBucketState(config, config.max_tokens, now) if config is not None else None


def _input(condition: RpcCondition, frame: RpcFrame) -> str | None:
    kind = condition.input
    if kind == "method":
        return frame.method
    if kind == "service":
        return frame.service
    name = condition.property
    if name == "version":
        return frame.version
    if name == "group":
        return frame.group
    return frame.headers.get(name)


class RpcRouter:
    """Virtual hosts by exact service name, then ``*``, then the top-level routes."""

    __slots__ = ("by_service", "fallback")

    def __init__(self, config: RpcProxy, clock: Callable[[], float]) -> None:
        prefix = config.stat_prefix
        self.by_service: dict[str, list[CompiledRpcRoute]] = {}
        for vhost in config.virtual_hosts:
            routes = [CompiledRpcRoute(r, clock, prefix) for r in vhost.routes]
            for host in vhost.hosts:
                self.by_service[host] = routes
        wildcard = self.by_service.pop("*", None)
        top = [CompiledRpcRoute(r, clock, prefix) for r in config.routes]
        self.fallback = wildcard if wildcard is not None else top

    def route(self, frame: RpcFrame) -> CompiledRpcRoute | None:
        routes = self.by_service.get(frame.service, self.fallback)
        for route in routes:
            if route.matches(frame):
                return route
        return None


class RpcListenerContext:
    __slots__ = (
        "access_logs",
        "clusters",
        "codec",
        "config",
        "connections",
        "draining",
        "istio",
        "loop",
        "router",
        "stats",
    )

    def __init__(
        self,
        config: RpcProxy,
        codec: RpcCodec,
        clusters: dict[str, ClusterRuntime],
        stats: RpcStats,
        logs: AccessLogs,
    ) -> None:
        self.config = config
        self.access_logs = [logs.sink(a) for a in config.access_logs]
        self.codec = codec
        self.clusters = clusters
        self.stats = stats
        self.loop = asyncio.get_running_loop()
        self.router = RpcRouter(config, self.loop.time)
        self.connections: set[RpcSession] = set()
        self.draining = False
        self.istio = (
            IstioReporter(config.istio_stats, TELEMETRY.workload, TELEMETRY.service, codec.name)
            if config.istio_stats is not None
            else None
        )


class RpcSession(asyncio.Protocol):
    """One downstream connection."""

    __slots__ = ("calls", "closed", "ctx", "decoder", "id", "transport")

    def __init__(self, ctx: RpcListenerContext) -> None:
        self.ctx = ctx
        self.id = next(_connection_ids)
        self.decoder = ctx.codec.decoder(ctx.config.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.calls: set[RpcCall] = set()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        ctx = self.ctx
        ctx.connections.add(self)
        ctx.stats.downstream_cx_total += 1
        ctx.stats.downstream_cx_active += 1

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except RpcProtocolError as exc:
            for frame in exc.frames:  # what came before the bad frame is served
                if frame.is_request:
                    self.request(frame)
            self.protocol_error(exc.at, str(exc))
            return
        for frame in frames:
            if frame.is_request:
                self.request(frame)

    def protocol_error(self, data: bytes, message: str) -> None:
        """Bytes that are not the protocol: answer if the protocol can, then close."""
        self.ctx.stats.downstream_cx_protocol_error += 1
        reply = self.ctx.codec.error_reply(data, message)
        if reply is not None and self.transport is not None:
            self.transport.write(reply)
        log.debug("downstream protocol error: %s", message)
        self.close()

    def request(self, frame: RpcFrame) -> None:
        ctx = self.ctx
        stats = ctx.stats
        if frame.heartbeat:
            stats.downstream_rq_heartbeat += 1
            self.write(ctx.codec.heartbeat_reply(frame))
            return
        stats.downstream_rq_total += 1
        stats.downstream_rq_active += 1
        call = RpcCall(self, frame)
        self.calls.add(call)
        call.start()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def call_done(self, call: RpcCall) -> None:
        self.calls.discard(call)
        self.ctx.stats.downstream_rq_active -= 1
        if self.ctx.draining and not self.calls:
            self.close()

    def pause_writing(self) -> None:
        """The client is not reading its answers: stop reading its requests until it does
        (what is in flight is bounded by the clusters' max_requests)."""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def drain(self) -> None:
        if not self.calls:
            self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def address(self, which: str) -> str:
        """``peername`` or ``sockname`` as ``ip:port`` (for access logs)."""
        value = self.transport.get_extra_info(which) if self.transport is not None else None
        return f"{value[0]}:{value[1]}" if value else ""

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        ctx = self.ctx
        ctx.connections.discard(self)
        ctx.stats.downstream_cx_active -= 1
        for call in list(self.calls):
            call.abandon()


class RpcCall:
    """One request from arrival to its answer, across retries."""

    __slots__ = (
        "breakers",
        "bytes_sent",
        "cluster",
        "cluster_name",
        "conn",
        "done",
        "duration",
        "frame",
        "host",
        "method_stats",
        "response_code_details",
        "response_flags",
        "retries_left",
        "retry_held",
        "route",
        "session",
        "started",
        "status",
        "timer",
        "tried",
        "upstream_host",
        "upstream_id",
    )

    def __init__(self, session: RpcSession, frame: RpcFrame) -> None:
        self.session = session
        self.frame = frame
        self.started = session.ctx.loop.time()
        self.method_stats = session.ctx.stats.method(frame.service, frame.method)
        self.route: CompiledRpcRoute | None = None
        self.cluster: ClusterRuntime | None = None
        self.host: Host | None = None
        self.conn: RpcUpstreamConnection | None = None
        self.upstream_id = 0
        self.timer: asyncio.TimerHandle | None = None
        self.breakers: list[ErrorRateBreaker] = []
        self.tried: list[Host] = []
        self.retries_left = 0
        self.retry_held = False
        self.done = False
        # what access logs read (Envoy's fields; status is the protocol's own code)
        self.cluster_name = self.upstream_host = self.response_code_details = ""
        self.response_flags = "-"
        self.status = 0
        self.bytes_sent = 0
        self.duration = 0.0

    # admission ------------------------------------------------------------------------------

    def start(self) -> None:
        session = self.session
        ctx = session.ctx
        frame = self.frame
        self.method_stats.rq_total += 1
        route = self.route = ctx.router.route(frame)
        if route is None:
            self.local_reply(RpcErrorKind.NO_ROUTE, f"no route for {frame.service}/{frame.method}")
            return
        now = ctx.loop.time()
        if route.bucket is not None and not route.bucket.take(now):
            ctx.stats.downstream_rq_rate_limited += 1
            self.local_reply(RpcErrorKind.RATE_LIMITED, "rate limited")
            return
        cluster_name = self._admit(route, route.pick_cluster(), now)
        if cluster_name is None:
            return
        cluster = ctx.clusters.get(cluster_name)
        if cluster is None:
            self.local_reply(RpcErrorKind.NO_ROUTE, f"cluster {cluster_name} not found")
            return
        limits = cluster.config.circuit_breakers
        if cluster.rq_active >= limits.max_requests:
            cluster.stats.upstream_rq_active_overflow += 1
            self.release_breakers()
            self.local_reply(RpcErrorKind.CIRCUIT_OPEN, "upstream overflow (max_requests)")
            return
        self.cluster = cluster
        self.cluster_name = cluster_name
        cluster.rq_active += 1
        retry = route.config.retry_policy
        self.retries_left = retry.num_retries if retry is not None else 0
        limit = route.config.timeout
        if frame.timeout is not None and (limit is None or frame.timeout < limit):
            limit = frame.timeout
        if limit is not None and not frame.oneway:
            self.timer = ctx.loop.call_later(limit, self.timed_out)
        self.attempt()

    def _admit(self, route: CompiledRpcRoute, cluster_name: str, now: float) -> str | None:
        """The route's, then the cluster's error-rate breaker; a refusal goes to the
        breaker's fallback cluster or is answered CIRCUIT_OPEN (None)."""
        cluster = self.session.ctx.clusters.get(cluster_name)
        pair = (route.breaker, cluster.breaker if cluster is not None else None)
        refused = admit(pair, now, self.breakers)
        if refused is None:
            return cluster_name
        if refused.policy.fallback_cluster:
            return refused.policy.fallback_cluster
        self.local_reply(RpcErrorKind.CIRCUIT_OPEN, refused.policy.local_reply.body.decode())
        return None

    def release_breakers(self) -> None:
        for breaker in self.breakers:
            breaker.release()
        self.breakers = []

    # upstream -------------------------------------------------------------------------------

    def attempt(self) -> None:
        cluster = self.cluster
        assert cluster is not None
        exclude = self.tried[-1] if self.tried else None
        host = cluster.lb.choose(None, exclude)
        if host is None:
            self.fail(RpcErrorKind.NO_HEALTHY_UPSTREAM, "no healthy upstream")
            return
        self.host = host
        self.upstream_host = host.key
        self.tried.append(host)
        host.active_requests += 1
        cluster.stats.upstream_rq_total += 1
        conn = self.conn = _pool(cluster, host, self.session.ctx).connection()
        if self.frame.oneway:
            conn.send(self.frame, None)
            self.upstream_done()
            self.finish(True)
            return
        self.upstream_id = conn.send(self.frame, self)

    def upstream_response(self, frame: RpcFrame) -> None:
        if self.done:
            return
        cluster, host = self.cluster, self.host
        assert cluster is not None and host is not None
        now = self.session.ctx.loop.time()
        elapsed = now - self.started
        cluster.stats.upstream_rq_time.record(elapsed * 1000.0)
        ok = frame.ok
        if cluster.outlier is not None:
            cluster.outlier.record_response(host, 200 if ok else 500)
        for breaker in self.breakers:
            breaker.record(now, ok, elapsed)
        self.breakers = []
        self.upstream_done()
        self.status = frame.status
        self.bytes_sent = len(frame.raw)
        self.session.write(self.session.ctx.codec.set_request_id(frame.raw, self.frame.request_id))
        self.finish(ok)

    def upstream_failed(self, reason: str, connect: bool) -> None:
        if self.done:
            return
        cluster, host = self.cluster, self.host
        assert cluster is not None and host is not None
        if not connect:
            cluster.stats.upstream_rq_rx_reset += 1
        if cluster.outlier is not None:
            cluster.outlier.record_local_failure(host, "connect_failure" if connect else "reset")
        self.upstream_done()
        if self.retry("connect-failure" if connect else "reset"):
            return
        self.fail(RpcErrorKind.UPSTREAM_UNAVAILABLE, reason)

    def timed_out(self) -> None:
        self.timer = None
        if self.done:
            return
        cluster = self.cluster
        assert cluster is not None
        cluster.stats.upstream_rq_timeout += 1
        self.session.ctx.stats.downstream_rq_timeout += 1
        if self.conn is not None:
            self.conn.forget(self.upstream_id)
        if self.host is not None and cluster.outlier is not None:
            cluster.outlier.record_local_failure(self.host, "timeout")
        self.upstream_done()
        self.fail(RpcErrorKind.TIMEOUT, "upstream request timeout")

    def retry(self, condition: str) -> bool:
        route = self.route
        assert route is not None and self.cluster is not None
        policy = route.config.retry_policy
        if self.retries_left <= 0 or policy is None or condition not in policy.retry_on:
            return False
        cluster = self.cluster
        if not cluster.admit_retry():
            return False
        self.retry_held = True  # until the retried try ends
        self.retries_left -= 1
        self.session.ctx.stats.downstream_rq_retry += 1
        self.attempt()
        return True

    def upstream_done(self) -> None:
        """The current try is over: give the host its slot back, and the cluster its retry
        slot if this try was a retry."""
        host, self.host = self.host, None
        if host is not None:
            host.active_requests -= 1
        self.conn = None
        if self.retry_held:
            self.retry_held = False
            assert self.cluster is not None
            self.cluster.release_retry()

    # endings --------------------------------------------------------------------------------

    def fail(self, kind: RpcErrorKind, message: str) -> None:
        now = self.session.ctx.loop.time()
        for breaker in self.breakers:
            breaker.record(now, False, now - self.started)
        self.breakers = []
        self.local_reply(kind, message)

    def local_reply(self, kind: RpcErrorKind, message: str) -> None:
        session = self.session
        session.ctx.stats.downstream_rq_local += 1
        self.method_stats.rq_local += 1
        self.response_flags = RESPONSE_FLAGS[kind]
        self.response_code_details = kind.value
        if not self.frame.oneway:
            reply = session.ctx.codec.local_reply(self.frame, kind, message)
            self.bytes_sent = len(reply)
            session.write(reply)
        self.finish(False)

    def _end(self) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.cluster is not None:
            self.cluster.rq_active -= 1
            self.cluster = None

    def finish(self, ok: bool) -> None:
        if self.done:
            return
        self._end()
        stats = self.method_stats
        self.duration = self.session.ctx.loop.time() - self.started
        elapsed_ms = self.duration * 1000.0
        stats.rq_time.record(elapsed_ms)
        self.session.ctx.stats.downstream_rq_time.record(elapsed_ms)
        if ok:
            stats.rq_success += 1
        else:
            stats.rq_error += 1
            self.session.ctx.stats.downstream_rq_error += 1
        ctx = self.session.ctx
        if ctx.istio is not None:  # no peer metadata in RPC frames: the peer is unknown
            code = rpc_response_code(ok, self.response_flags)
            key = (b"", self.cluster_name, self.frame.service.encode(), code, self.response_flags)
            ctx.istio.record(key, self.duration, len(self.frame.raw), self.bytes_sent)
        for write in ctx.access_logs:
            write(self)
        self.session.call_done(self)

    # the access log record (shoal.observe.accesslog.AccessLogRecord) --------------------

    @property
    def start_time(self) -> float:
        return time.time() - (self.session.ctx.loop.time() - self.started)

    @property
    def protocol(self) -> str:
        return self.session.ctx.codec.name

    @property
    def method(self) -> str:
        return self.frame.method

    @property
    def path(self) -> str:
        return self.frame.service

    @property
    def authority(self) -> str:
        return self.frame.service

    @property
    def bytes_received(self) -> int:
        return len(self.frame.raw)

    @property
    def upstream_cluster(self) -> str:
        return self.cluster_name

    @property
    def route_name(self) -> str:
        return self.route.config.name if self.route is not None else ""

    @property
    def downstream_remote(self) -> str:
        return self.session.address("peername")

    @property
    def downstream_local(self) -> str:
        return self.session.address("sockname")

    @property
    def connection_id(self) -> int:
        return self.session.id

    @property
    def trace_id(self) -> str:
        return trace_id_of(self.request_header) or ""

    def request_header(self, name: str) -> str | None:
        """An attachment / header map / metadata value (``version`` and ``group`` too)."""
        frame = self.frame
        if name == "version":
            return frame.version or None
        if name == "group":
            return frame.group or None
        return frame.headers.get(name)

    def response_header(self, name: str) -> str | None:
        return None

    def abandon(self) -> None:
        """The client went away: forget the request upstream and free what it held."""
        if self.done:
            return
        if self.conn is not None:
            self.conn.forget(self.upstream_id)
        self.upstream_done()
        self.release_breakers()
        self._end()
        self.session.ctx.stats.downstream_rq_active -= 1


def _pool(cluster: ClusterRuntime, host: Host, ctx: RpcListenerContext) -> RpcHostPool:
    """The host's pool for this protocol, kept on the cluster so that it closes with it."""
    key = (ctx.codec.name, host.key)
    pool = cluster.rpc_pools.get(key)
    if pool is None:
        address = host.address
        pool = cluster.rpc_pools[key] = RpcHostPool(
            ctx.codec,
            (address.host, address.port),
            cluster.config.connect_timeout,
            ctx.config.max_frame_bytes,
            cluster.stats,
            tls=cluster.tls,
        )
    return cast(RpcHostPool, pool)
