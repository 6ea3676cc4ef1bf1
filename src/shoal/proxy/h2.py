"""The HTTP/2 stream driver: h2c downstream connections, routed stream by stream to HTTP/2
clusters (gRPC and plain h2c), with flow control end to end.

A downstream connection (:class:`H2Session`) drives a server-side
:class:`~shoal.codec.http2.H2Connection`; each request becomes an :class:`H2Stream`, which
is routed with the listener's :class:`~shoal.proxy.routes.RouteTable`, answered locally
(no route, direct response, redirect, overflow, no healthy host, timeouts) or sent on a
multiplexed upstream connection (:mod:`shoal.transport.h2`).

**Flow control.** Body bytes move only as far as the receiving peer's window allows; the
rest waits on the stream (``to_up`` / ``to_down``) and moves on ``WindowUpdated``. Credit
goes back to the sender (``acknowledge_received_data``) only for bytes handed to the other
side's codec, so what waits here per stream is bounded by the window we advertised.

**gRPC.** ``grpc-timeout`` is the stream's deadline (capped by the route timeout). The
proxy's own answers to gRPC requests are trailers-only responses (``:status 200``,
``grpc-status``, ``grpc-message``): no route → UNIMPLEMENTED, no host / connect failure /
reset / overflow → UNAVAILABLE, timeouts → DEADLINE_EXCEEDED. For outlier detection a
gRPC answer counts by its ``grpc-status`` as Envoy maps it (UNKNOWN and INTERNAL → 500,
UNAVAILABLE → 503, DEADLINE_EXCEEDED → 504, anything else → 200).

**Telemetry.** With Shoal's ``istio_stats`` filter each stream is one Istio request
(``request_protocol`` ``grpc`` or ``http``, ``grpc_response_status`` from the trailers or a
trailers-only answer) and ``x-shoal-peer`` is exchanged as HTTP/1.1 does it. gRPC streams
routed to a cluster count Envoy's per-method stats (:class:`GrpcStats`).

**Retries.** The route's ``retry_policy``: HTTP conditions, ``reset``, ``connect-failure``,
``refused-stream`` and the gRPC ones (a trailers-only answer's ``grpc-status``), while no
byte of the answer was relayed and the request sent so far is kept (``_REPLAY_LIMIT``), on
another host when there is one. A stream refused by GOAWAY is sent again once regardless.

**Filters, breakers, tracing.** The listener's HTTP filters (fault, local and global rate
limit, adaptive concurrency) run on each stream as on an HTTP/1.1 request, after routing;
their local answers are gRPC statuses for gRPC streams. The buffer filter
(``max_request_bytes``) holds the body until it is whole, crediting the client as it
comes, and answers 413 past the limit. The route's and the cluster's error-rate breakers
admit the stream (a gRPC answer counts by its ``grpc-status``), and a tracer makes a span
per stream, sent upstream in the tracer's headers.

**Translation.** A stream routed to an HTTP/1.1 cluster goes over a pooled keep-alive
connection through :class:`~shoal.upstream.bridge.Http1Leg`, which the stream drives as it
drives an HTTP/2 upstream connection.

The route's ``hash_policy`` (with generated cookies) and ``per_try_timeout`` apply as for
HTTP/1.1.

``request_mirror_policies`` send each copy, once the request is whole, as an HTTP/1.1
request (:class:`~shoal.proxy.http.Mirror`, carried over HTTP/2 to an HTTP/2 cluster).

``hedge_on_per_try_timeout`` keeps a slow try running (:class:`_Racer`) beside its retry,
and a route's backup requests (``shoal.backup_request``) send one more try to another host
after the route's delay; the first to answer wins.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from shoal.codec.http1 import HOP_BY_HOP, header_value
from shoal.codec.http2 import (
    CANCEL,
    INTERNAL_ERROR,
    NO_ERROR,
    PREFACE,
    ConnectionTerminated,
    DataReceived,
    H2Connection,
    Headers,
    PingAckReceived,
    RequestReceived,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from shoal.config.filters import FilterConfig
from shoal.config.model import (
    HashPolicy,
    Redirect,
    RequestMirrorPolicy,
    RetryPolicy,
    RouteAction,
)
from shoal.errors import LocalProtocolError
from shoal.filters.base import LocalReply
from shoal.filters.run import run_filters
from shoal.observe.istio import PEER_HEADER, PEER_HEADERS
from shoal.observe.stats import RouteStats
from shoal.observe.tracing import Span, trace_id_of
from shoal.proxy.cookies import generated_value, set_cookie
from shoal.proxy.hashing import HASHING_LBS, request_hash
from shoal.proxy.http import (
    PER_TRY_CONDITIONS,
    HttpConnection,
    Mirror,
    mirror_head,
    new_request_id,
)
from shoal.proxy.listeners import HttpListenerContext
from shoal.proxy.routes import CompiledRoute, HeaderPlan
from shoal.transport.h2 import H2UpstreamConnection, Pinger
from shoal.upstream.breaker import ErrorRateBreaker, admit
from shoal.upstream.bridge import BODY_METHODS, Http1Leg, h2_pool, http1_request
from shoal.upstream.cluster import ClusterRuntime, retry_delay, retry_on_status
from shoal.upstream.host import Host

log = logging.getLogger(__name__)
_connection_ids = itertools.count(3_000_000_000)

# grpc-status codes the proxy uses, and Envoy's HTTP → gRPC mapping for local replies
GRPC_UNKNOWN = 2
GRPC_DEADLINE_EXCEEDED = 4
GRPC_UNIMPLEMENTED = 12
GRPC_UNAVAILABLE = 14
_HTTP_TO_GRPC = {
    400: 13,
    401: 16,
    403: 7,
    404: GRPC_UNIMPLEMENTED,
    408: GRPC_DEADLINE_EXCEEDED,
    429: GRPC_UNAVAILABLE,
    502: GRPC_UNAVAILABLE,
    503: GRPC_UNAVAILABLE,
    504: GRPC_DEADLINE_EXCEEDED,  # Envoy says UNAVAILABLE; a timeout reads better as this
}
# grpc-status → the HTTP status outlier detection sees (Envoy's grpcToHttpStatus, 5xx only)
_GRPC_TO_HTTP = {b"2": 500, b"4": 504, b"13": 500, b"14": 503}
_GRPC_TIMEOUT_UNITS = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}
_REPLAY_LIMIT = 64 * 1024  # request bytes kept to send again (GOAWAY, retries)
# grpc-status values of trailers-only answers that retry_on may name (x-envoy-retry-grpc-on)
_GRPC_RETRY_ON = {
    b"1": "cancelled",
    b"4": "deadline-exceeded",
    b"8": "resource-exhausted",
    b"13": "internal",
    b"14": "unavailable",
}
_RESET = frozenset({"reset"})
_REFUSED = frozenset({"reset", "refused-stream"})
_CONNECT_FAILURE = frozenset({"reset", "connect-failure"})


def grpc_timeout(value: bytes) -> float | None:
    """``grpc-timeout`` (1-8 digits and a unit) in seconds; None when malformed."""
    if len(value) < 2 or not value[:-1].isdigit():
        return None
    unit = _GRPC_TIMEOUT_UNITS.get(value[-1])
    return int(value[:-1]) * unit if unit is not None else None


def _retriable(policy: RetryPolicy, status: int, grpc_status: bytes) -> bool:
    """Whether an answer's status (or a trailers-only gRPC answer's grpc-status) is one the
    route's retry_on names."""
    if retry_on_status(policy, status):
        return True
    condition = _GRPC_RETRY_ON.get(grpc_status)
    return condition is not None and condition in policy.retry_on


@dataclass(slots=True)
class GrpcMethodStats:
    """Envoy's grpc_stats filter counters of one method of one cluster."""

    success: int = 0
    failure: int = 0
    total: int = 0
    request_message_count: int = 0
    response_message_count: int = 0


GRPC_METHOD_COUNTERS = (
    "success",
    "failure",
    "total",
    "request_message_count",
    "response_message_count",
)


class GrpcStats:
    """Per-method gRPC counters, ``cluster.<cluster>.grpc.<package.Service>.<Method>.*``,
    kept for the process (they survive config changes, like the cluster's own). Method
    names come from clients: past MAX_METHODS new ones are counted as ``unknown.unknown``
    of their cluster."""

    MAX_METHODS = 1000

    __slots__ = ("methods",)

    def __init__(self) -> None:
        self.methods: dict[tuple[str, str, str], GrpcMethodStats] = {}

    def method(self, cluster: str, path: bytes) -> GrpcMethodStats | None:
        """The counters for a call to ``path`` (``/package.Service/Method``); None for a
        path that names no gRPC method."""
        service, sep, name = path[1:].decode("latin-1").partition("/")
        if not path.startswith(b"/") or not sep or not service or not name or "/" in name:
            return None
        key = (cluster, service, name)
        stats = self.methods.get(key)
        if stats is None:
            if len(self.methods) >= self.MAX_METHODS:
                key = (cluster, "unknown", "unknown")
                stats = self.methods.get(key)
                if stats is not None:
                    return stats
            stats = self.methods[key] = GrpcMethodStats()
        return stats

    def counters(self) -> dict[str, int]:
        """Every counter under its Envoy stat name."""
        out: dict[str, int] = {}
        for (cluster, service, name), stats in self.methods.items():
            prefix = f"cluster.{cluster}.grpc.{service}.{name}."
            for counter in GRPC_METHOD_COUNTERS:
                out[prefix + counter] = getattr(stats, counter)
        return out


GRPC_STATS = GrpcStats()


class GrpcFrames:
    """Counts gRPC messages (a 5-byte prefix: flag and big-endian length) in a body that
    arrives in arbitrary chunks."""

    __slots__ = ("count", "head", "left")

    def __init__(self) -> None:
        self.count = 0
        self.head = b""  # the part of the current prefix seen so far
        self.left = 0  # message bytes still to skip

    def feed(self, data: bytes) -> None:
        i, size = 0, len(data)
        while i < size:
            if self.left:
                take = min(self.left, size - i)
                self.left -= take
                i += take
                continue
            part = data[i : i + 5 - len(self.head)]
            i += len(part)
            head = self.head = self.head + part
            if len(head) == 5:
                self.count += 1
                self.left = int.from_bytes(head[1:], "big")
                self.head = b""


class H2Session(asyncio.Protocol):
    """One downstream HTTP/2 (h2c, prior knowledge) connection."""

    __slots__ = ("closed", "codec", "ctx", "dirty", "id", "loop", "pinger", "streams", "transport")

    def __init__(self, ctx: HttpListenerContext) -> None:
        self.ctx = ctx
        self.id = next(_connection_ids)
        self.loop = asyncio.get_running_loop()
        self.codec = H2Connection(
            False, max_header_list_size=ctx.config.max_request_headers_kb * 1024
        )
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}
        self.closed = False
        self.dirty = False
        self.pinger: Pinger | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        ctx = self.ctx
        ctx.connections.add(self)
        ctx.stats.downstream_cx_total += 1
        ctx.stats.downstream_cx_active += 1
        if ctx.draining:
            self.codec.close_connection()
        elif ctx.config.keepalive is not None:
            self.pinger = Pinger(ctx.config.keepalive, self.codec, self.kick, self._close)
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.ctx.stats.downstream_cx_rx_bytes_total += len(data)
        streams = self.streams
        codec = self.codec
        for event in codec.receive_data(data):
            if isinstance(event, DataReceived):
                stream = streams.get(event.stream_id)
                if stream is None:  # answered already: drop the rest of the upload
                    codec.acknowledge_received_data(len(event.data), event.stream_id)
                else:
                    stream.request_data(event.data, event.end_stream)
            elif isinstance(event, RequestReceived):
                stream = H2Stream(self, event.stream_id, event.headers, event.end_stream)
                streams[event.stream_id] = stream
                stream.begin()
            elif isinstance(event, TrailersReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.request_trailers(event.headers)
            elif isinstance(event, WindowUpdated):
                if event.stream_id:
                    stream = streams.get(event.stream_id)
                    if stream is not None:
                        stream.pump_down()
                else:
                    for stream in list(streams.values()):
                        stream.pump_down()
            elif isinstance(event, StreamReset):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.downstream_reset(event.error_code)
            elif isinstance(event, PingAckReceived):
                if self.pinger is not None:
                    self.pinger.acked(event.ping_data)
            elif isinstance(event, ConnectionTerminated):
                if not event.remote:
                    self.ctx.stats.downstream_cx_protocol_error += 1
                if not event.remote or event.error_code:
                    self.flush()
                    self._close()
                    return
        self.flush()

    def kick(self) -> None:
        """Something was queued in the codec: write it once this loop iteration ends."""
        if not self.dirty:
            self.dirty = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.dirty = False
        transport = self.transport
        if transport is not None and not self.closed:
            data = self.codec.data_to_send()
            if data:
                self.ctx.stats.downstream_cx_tx_bytes_total += len(data)
                transport.write(data)

    def stream_done(self, stream: H2Stream) -> None:
        self.streams.pop(stream.stream_id, None)
        if self.ctx.draining and not self.streams:
            self.flush()
            self._close()

    def drain(self) -> None:
        """Graceful GOAWAY: open streams finish, new ones are refused."""
        self.codec.close_connection()
        self.flush()
        if not self.streams:
            self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def address(self, which: str) -> str:
        value = self.transport.get_extra_info(which) if self.transport is not None else None
        return f"{value[0]}:{value[1]}" if value else ""

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.pinger is not None:
            self.pinger.stop()
        ctx = self.ctx
        ctx.connections.discard(self)
        ctx.stats.downstream_cx_active -= 1
        for stream in list(self.streams.values()):
            stream.downstream_reset(CANCEL)


class H2Stream:
    """One request and its response, both sides HTTP/2."""

    __slots__ = (
        "attempt_start",
        "backup_from",
        "backup_timer",
        "breakers",
        "bytes_received",
        "bytes_sent",
        "cluster",
        "cluster_name",
        "compiled",
        "deadline_timer",
        "done",
        "down_ended",
        "duration",
        "finish_callbacks",
        "grpc",
        "grpc_method",
        "grpc_status",
        "hash_key",
        "headers",
        "host",
        "idle_mark",
        "idle_timeout",
        "idle_timer",
        "last_host",
        "mirror_body",
        "mirrors",
        "peer",
        "per_try_timer",
        "precredit",
        "racer",
        "raw_authority",
        "raw_method",
        "raw_path",
        "replay",
        "request_ended",
        "request_frames",
        "request_id",
        "response_code_details",
        "response_flags",
        "response_frames",
        "response_headers",
        "response_plan",
        "response_started",
        "retried",
        "retries",
        "retries_left",
        "retry_held",
        "retry_timer",
        "route_stats",
        "session",
        "set_cookies",
        "span",
        "start",
        "started_at",
        "status",
        "stream_id",
        "to_down",
        "to_down_end",
        "to_down_trailers",
        "to_up",
        "to_up_end",
        "to_up_trailers",
        "up",
        "up_ended",
        "up_headers",
        "up_id",
        "upstream_host",
    )

    def __init__(
        self, session: H2Session, stream_id: int, headers: Headers, end_stream: bool
    ) -> None:
        self.session = session
        self.stream_id = stream_id
        self.headers = headers
        method = path = authority = peer = b""
        for name, value in headers:
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority" or (name == b"host" and not authority):
                authority = value
            elif name == PEER_HEADER:
                peer = value
        self.raw_method, self.raw_path, self.raw_authority = method, path, authority
        # the caller's x-shoal-peer (inbound, istio_stats), or the callee's (outbound)
        istio = session.ctx.istio
        self.peer = peer if istio is not None and istio.destination else b""
        self.grpc = (header_value(headers, b"content-type") or "").startswith("application/grpc")
        self.request_ended = end_stream
        self.start = session.loop.time()
        self.started_at = time.time()
        self.compiled: CompiledRoute | None = None
        self.cluster: ClusterRuntime | None = None
        self.host: Host | None = None
        self.up: H2UpstreamConnection | Http1Leg | None = None
        self.up_id = 0
        self.up_headers: Headers = []
        self.up_ended = False
        self.to_up: list[bytes] = []
        self.to_up_end = end_stream
        self.to_up_trailers: Headers | None = None
        self.to_down: list[bytes] = []
        self.to_down_end = False
        self.to_down_trailers: Headers | None = None
        self.down_ended = False
        self.replay: list[bytes] | None = []
        self.retried = False
        # retries (the route's retry_policy): attempts left, the cluster's retry slot held
        self.retries = self.retries_left = 0
        self.retry_held = False
        self.retry_timer: asyncio.TimerHandle | None = None
        self.last_host: Host | None = None
        # per-method gRPC stats and their message counters
        self.grpc_method: GrpcMethodStats | None = None
        self.request_frames: GrpcFrames | None = None
        self.response_frames: GrpcFrames | None = None
        self.response_plan: HeaderPlan | None = None
        self.response_started = False
        self.response_headers: Headers = []
        self.grpc_status = b""
        self.deadline_timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.idle_timeout = 0.0
        self.idle_mark = 0
        self.done = False
        self.status = 0
        self.bytes_received = self.bytes_sent = 0
        self.duration = 0.0
        self.cluster_name = self.upstream_host = self.response_code_details = ""
        self.response_flags = "-"
        # HTTP filters: callbacks told when the stream ends, breakers
        # that let it through, and body bytes credited to the client before they moved on
        self.finish_callbacks: list[Callable[[float, bool], None]] | None = None
        self.breakers: list[ErrorRateBreaker] | None = None
        self.precredit = 0
        self.span: Span | None = None
        self.request_id = b""  # the one the proxy made up, for logs and spans
        self.route_stats: RouteStats | None = None  # the route's, with a stat_prefix
        self.attempt_start = 0.0
        self.per_try_timer: asyncio.TimerHandle | None = None
        self.hash_key: int | None = None  # for ring-hash and Maglev, from the hash policy
        self.set_cookies: Headers | None = None  # generated by the hash policy, for the answer
        # mirror clusters drawn for this stream, and its body kept for them (None: too big)
        self.mirrors: list[ClusterRuntime] | None = None
        self.mirror_body: list[bytes] | None = None
        self.racer: _Racer | None = None  # the earlier try still running, when hedging
        # backup requests: when the whole request had its first try under way (0: not
        # tracked), and the timer of its backup
        self.backup_from = 0.0
        self.backup_timer: asyncio.TimerHandle | None = None

    # routing --------------------------------------------------------------------------------

    def begin(self) -> None:
        ctx = self.session.ctx
        ctx.stats.downstream_rq_total += 1
        ctx.stats.downstream_rq_active += 1
        if ctx.tracer is not None:
            self.span = ctx.tracer.start(self.headers)
        compiled = ctx.routes.match(
            self.raw_authority.decode("latin-1"), self.raw_path.decode("latin-1"), self.headers
        )
        if compiled is None:
            self.local_reply(404, b"", "NR", "route_not_found")
            return
        self.compiled = compiled
        self.response_plan = compiled.response_plan
        if ctx.filters and run_filters(self, ctx.filters, self.session.loop):
            return
        self._dispatch(compiled)

    def _dispatch(self, compiled: CompiledRoute) -> None:
        """The router: local answers, or the cluster, breakers and the first try."""
        ctx = self.session.ctx
        route = compiled.route
        if route.direct_response is not None:
            response = route.direct_response
            self.local_reply(response.status, response.body, "-", "direct_response")
            return
        if route.redirect is not None:
            self._redirect(route.redirect, compiled)
            return
        action = route.action
        assert action is not None
        cluster_name = _pick_cluster(action)
        if compiled.breaker is not None or ctx.breakers:
            cluster_name = self._ask_breakers(compiled, cluster_name)
            if not cluster_name:
                return  # refused and answered locally
        self.cluster_name = cluster_name
        cluster = ctx.clusters.get(cluster_name)
        if cluster is None:
            self.local_reply(503, b"", "NC", "cluster_not_found")
            return
        if cluster.rq_active >= cluster.config.circuit_breakers.max_requests:
            cluster.stats.upstream_rq_active_overflow += 1
            self.local_reply(503, b"upstream overflow", "UO", "overflow")
            return
        cluster.rq_active += 1
        self.cluster = cluster
        self.route_stats = compiled.stats
        if compiled.retry_policy is not None:
            self.retries_left = compiled.retry_policy.num_retries
        if action.hash_policy:
            hashing = cluster.config.lb_policy in HASHING_LBS
            self.hash_key = request_hash(
                action.hash_policy,
                self.headers,
                self.raw_path.decode("latin-1"),
                self.remote_ip,
                self._generate_cookie if hashing else None,
            )
        if self.grpc:
            self.grpc_method = GRPC_STATS.method(cluster_name, self.raw_path)
            if self.grpc_method is not None:
                self.request_frames, self.response_frames = GrpcFrames(), GrpcFrames()
        self._arm_timers(action)
        self.up_headers = self._upstream_headers(action, compiled)
        if compiled.mirrors:
            self._pick_mirrors(compiled.mirrors)
        if ctx.config.max_request_bytes is not None and not self.request_ended:
            return  # envoy.filters.http.buffer: nothing goes upstream before the whole body
        self._attempt()
        if self.request_ended and not self.done:
            self._request_sent()

    def _request_sent(self) -> None:
        """The whole request is here and its first try under way: mirror it, and start
        its backup clock."""
        if self.mirrors is not None:
            self._send_mirrors()
        backup = self.compiled.backup if self.compiled is not None else None
        if backup is not None and not self.backup_from and self.replay is not None:
            self.backup_from = self.session.loop.time()
            backup.admit()
            self.backup_timer = self.session.loop.call_later(backup.delay, self._send_backup)

    def _pick_mirrors(self, policies: tuple[RequestMirrorPolicy, ...]) -> None:
        """Draw which mirror clusters get a copy (an unknown one, removed by CDS, is
        skipped); the body is kept for them from now on."""
        clusters = self.session.ctx.clusters
        chosen = [
            cluster
            for policy in policies
            if (cluster := clusters.get(policy.cluster)) is not None
            and (policy.fraction >= 1.0 or random.random() < policy.fraction)
        ]
        if chosen:
            self.mirrors, self.mirror_body = chosen, []

    def _send_mirrors(self) -> None:
        """The whole request is here and its first try under way: send each copy as an
        HTTP/1.1 request (carried over HTTP/2 to an HTTP/2 mirror cluster), fire and
        forget. A body past the listener's buffer limit was not kept: not mirrored."""
        clusters, self.mirrors = self.mirrors or [], None
        body, self.mirror_body = self.mirror_body, None
        if body is None:
            return
        data = b"".join(body)
        head, method, has_length = http1_request(self.up_headers)
        if not has_length and (data or method in BODY_METHODS):
            head += b"content-length: %d\r\n" % len(data)
        request = mirror_head(head + b"\r\n") + data
        action = self.compiled.route.action if self.compiled is not None else None
        timeout = action.timeout if action is not None and action.timeout else 0.0
        for cluster in clusters:
            Mirror(cluster, request, method == b"HEAD", self.session.loop).send(timeout)

    def _ask_breakers(self, compiled: CompiledRoute, cluster_name: str) -> str:
        """The cluster to use (a refusing breaker's fallback cluster), or "" when the
        refusal was answered locally."""
        ctx = self.session.ctx
        cluster = ctx.clusters.get(cluster_name)
        admitted: list[ErrorRateBreaker] = []
        pair = (compiled.breaker, cluster.breaker if cluster is not None else None)
        refused = admit(pair, self.session.loop.time(), admitted)
        self.breakers = admitted or None
        if refused is None:
            return cluster_name
        policy = refused.policy
        if policy.fallback_cluster:
            return policy.fallback_cluster
        reply = policy.local_reply
        extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
        self.local_reply(reply.status, reply.body, "UO", "circuit_breaker_open", extra)
        return ""

    # HTTP filters (shoal.filters.base) ------------------------------------------------------

    def filter_reply(self, reply: LocalReply) -> None:
        self.local_reply(reply.status, reply.body, reply.flags, reply.details, reply.headers)

    def filters_passed(self) -> None:
        assert self.compiled is not None
        self._dispatch(self.compiled)

    def cork(self) -> None:
        pass  # writes are batched per loop iteration already (H2Session.kick)

    def uncork(self) -> None:
        pass

    @property
    def request_headers(self) -> Headers:
        return self.headers

    @property
    def route_cluster(self) -> str:
        action = self.compiled.route.action if self.compiled is not None else None
        return action.cluster if action is not None else ""

    @property
    def connection_key(self) -> int:
        return self.session.id

    @property
    def remote_ip(self) -> str:
        return self.session.address("peername").rpartition(":")[0]

    def per_filter(self, name: str) -> FilterConfig | None:
        return self.compiled.per_filter.get(name) if self.compiled is not None else None

    def on_finish(self, callback: Callable[[float, bool], None]) -> None:
        if self.finish_callbacks is None:
            self.finish_callbacks = []
        self.finish_callbacks.append(callback)

    def _arm_timers(self, action: RouteAction) -> None:
        loop = self.session.loop
        config = self.session.ctx.config
        limit = action.timeout or 0.0
        if self.grpc:
            raw = header_value(self.headers, b"grpc-timeout")
            deadline = grpc_timeout(raw.encode("latin-1")) if raw is not None else None
            if deadline is not None and (not limit or deadline < limit):
                limit = deadline
        if limit:
            self.deadline_timer = loop.call_later(limit, self.on_timeout)
        idle = (
            action.idle_timeout if action.idle_timeout is not None else config.stream_idle_timeout
        )
        if idle:
            self.idle_timeout = idle
            self.idle_timer = loop.call_later(idle, self._check_idle)

    def _upstream_headers(self, action: RouteAction, compiled: CompiledRoute) -> Headers:
        """The request as the cluster sees it: route rewrites, hop-by-hop fields removed,
        the route's header edits, x-forwarded-proto and x-request-id."""
        path = self.raw_path
        if action.prefix_rewrite is not None and compiled.kind == "prefix":
            prefix = compiled.route.match.value.encode("latin-1")
            if path.startswith(prefix):
                path = action.prefix_rewrite.encode("latin-1") + path[len(prefix) :]
        elif action.regex_rewrite is not None:
            pattern, substitution = action.regex_rewrite
            bare, sep, query = path.decode("latin-1").partition("?")
            path = (pattern.sub(substitution, bare) + sep + query).encode("latin-1")
        authority = self.raw_authority
        if action.host_rewrite_literal is not None:
            authority = action.host_rewrite_literal.encode("latin-1")
        plan = compiled.cluster_plans.get(self.cluster_name) if compiled.cluster_plans else None
        request_plan, self.response_plan = plan or (compiled.request_plan, compiled.response_plan)
        regular: Headers = []
        remove = request_plan.remove_all
        ctx = self.session.ctx
        istio, tracer, span = ctx.istio, ctx.tracer, self.span
        if istio is not None:
            remove = remove | PEER_HEADERS
        if tracer is not None:
            remove = remove | tracer.owned
        forwarded_proto = request_id = False
        for name, value in self.headers:
            if name[0] == 0x3A or name == b"host" or name in remove:  # ':'
                continue
            if name in HOP_BY_HOP and not (name == b"te" and value == b"trailers"):
                continue
            if name == b"x-forwarded-proto":
                forwarded_proto = True
            elif name == b"x-request-id":
                request_id = True
            regular.append((name, value))
        if not forwarded_proto:
            regular.append((b"x-forwarded-proto", b"http"))
        if not request_id and ctx.config.generate_request_id:
            self.request_id = new_request_id()
            regular.append((b"x-request-id", self.request_id))
        if istio is not None and istio.request_value:
            regular.append((PEER_HEADER, istio.request_value))  # who calls, for the callee
        if tracer is not None and span is not None:
            regular += tracer.header_pairs(span)
        if request_plan.levels and any(options for _, options in request_plan.levels):
            regular = [(n.lower(), v) for n, v in request_plan.apply(regular)]
        return [
            (b":method", self.raw_method),
            (b":scheme", b"http"),
            (b":authority", authority),
            (b":path", path),
            *regular,
        ]

    def _attempt(self) -> None:
        cluster = self.cluster
        assert cluster is not None
        # a retry goes to another host when there is one
        host = cluster.lb.choose(self.hash_key, self.last_host)
        if host is None:
            self.local_reply(503, b"no healthy upstream", "UH", "no_healthy_upstream")
            return
        self.host = self.last_host = host
        self.upstream_host = host.key
        host.active_requests += 1
        cluster.stats.upstream_rq_total += 1
        self.attempt_start = self.session.loop.time()
        if self.route_stats is not None:
            self.route_stats.upstream_rq_total += 1  # per try started, as Envoy counts
        conn: H2UpstreamConnection | Http1Leg
        if cluster.config.http2 or cluster.config.downstream_http2:
            conn = h2_pool(cluster, host).connection()
        else:  # the cluster speaks HTTP/1.1: the stream is translated
            conn = Http1Leg(cluster, host)
        end = self.to_up_end and not self.to_up and self.to_up_trailers is None
        try:
            self.up_id = conn.open_stream(self, self.up_headers, end)
        except LocalProtocolError as exc:  # the connection died under us
            self.upstream_failed(str(exc), connect=False)
            return
        self.up = conn
        self.up_ended = end
        policy = self.compiled.retry_policy if self.compiled is not None else None
        if policy is not None and policy.per_try_timeout:
            self.per_try_timer = self.session.loop.call_later(
                policy.per_try_timeout, self._on_per_try_timeout
            )
        self.pump_up()

    def _generate_cookie(self, policy: HashPolicy) -> str:
        """Envoy's generated cookie: one value per downstream connection, set on the answer."""
        session = self.session
        value = generated_value(session.address("peername"), session.address("sockname"))
        if self.set_cookies is None:
            self.set_cookies = []
        self.set_cookies.append((b"set-cookie", set_cookie(policy, value)))
        return value

    # request body ---------------------------------------------------------------------------

    def request_data(self, data: bytes, end_stream: bool) -> None:
        self.bytes_received += len(data)
        limit = self.session.ctx.config.max_request_bytes
        if limit is not None and self.last_host is None and data:
            if self.bytes_received > limit:
                self.local_reply(413, b"Payload Too Large", "-", "request_payload_too_large")
                return
            # the buffer filter holds the body until it is whole: let the client send it
            self.session.codec.acknowledge_received_data(len(data), self.stream_id)
            self.precredit += len(data)
        if self.request_frames is not None:
            self.request_frames.feed(data)
        mirror_body = self.mirror_body
        if mirror_body is not None and data:
            mirror_body.append(data)
            if self.bytes_received > self.session.ctx.buffer_limit:
                self.mirror_body = None  # too big to keep for the copies
        if data:
            self.to_up.append(data)
        if end_stream:
            self._request_complete()
        self.pump_up()

    def request_trailers(self, headers: Headers) -> None:
        self.to_up_trailers = headers
        self._request_complete()
        self.pump_up()

    def _request_complete(self) -> None:
        self.to_up_end = self.request_ended = True
        if self.cluster is not None and self.last_host is None and not self.done:
            self._attempt()  # _dispatch held it for the buffer filter: the body is whole
        if self.last_host is not None and not self.done:
            self._request_sent()

    def pump_up(self) -> None:
        """Move request bytes to the upstream stream as far as its window allows, and give
        the client that much credit back."""
        conn = self.up
        if conn is None or self.up_ended:
            return
        to_up = self.to_up
        up_id = self.up_id
        session = self.session
        moved = 0
        while to_up:
            window = conn.window(up_id)
            if window <= 0:
                break
            chunk = to_up[0]
            if len(chunk) > window:
                to_up[0] = chunk[window:]
                chunk = chunk[:window]
            else:
                del to_up[0]
            last = not to_up and self.to_up_end and self.to_up_trailers is None
            conn.send_data(up_id, chunk, last)
            self.up_ended = last
            moved += len(chunk)
            replay = self.replay
            if replay is not None:
                replay.append(chunk)
                if sum(map(len, replay)) > _REPLAY_LIMIT:
                    self.replay = None
        if moved:
            credited = min(moved, self.precredit)  # given while the buffer filter held it
            self.precredit -= credited
            if moved > credited:
                session.codec.acknowledge_received_data(moved - credited, self.stream_id)
            session.kick()
        if not to_up and self.to_up_end and not self.up_ended:
            if self.to_up_trailers is not None:
                conn.send_trailers(up_id, self.to_up_trailers)
            else:
                conn.send_data(up_id, b"", True)
            self.up_ended = True

    def upstream_window(self) -> None:
        self.pump_up()

    # response -------------------------------------------------------------------------------

    def upstream_headers(self, headers: Headers, end_stream: bool) -> None:
        if self.done:
            return
        cluster = self.cluster
        assert cluster is not None
        status = 0
        grpc_status = b""
        for name, value in headers:
            if name == b":status":
                status = int(value)
            elif name == b"grpc-status":
                grpc_status = value
        if self._retry_response(status, grpc_status, end_stream):
            return
        racer = self.racer
        if racer is not None:  # this try answered first: the earlier one is dropped
            if racer.backup and self.compiled is not None and self.compiled.backup is not None:
                self.compiled.backup.counters["won"] += 1
            racer.abandon()
            self.racer = None
        backup = self.compiled.backup if self.compiled is not None else None
        if backup is not None and self.backup_from and status < 500:
            # errors are left out: often fast, they would shorten the delay in bad times
            backup.record(self.session.loop.time() - self.backup_from)
        if self.retries:  # a retry answered: a success unless the policy would retry it
            policy = self.compiled.retry_policy if self.compiled is not None else None
            if policy is None or not _retriable(policy, status, grpc_status):
                cluster.stats.upstream_rq_retry_success += 1
                if self.route_stats is not None:
                    self.route_stats.upstream_rq_retry_success += 1
        self.replay = None
        self.grpc_status = grpc_status
        plan = self.response_plan
        remove = plan.remove_all if plan is not None else frozenset()
        istio = self.session.ctx.istio
        if istio is not None:
            remove = remove | PEER_HEADERS
        out: Headers = []
        for name, value in headers:
            if name[0] == 0x3A:  # ':'
                continue
            if name in HOP_BY_HOP or name in remove:
                if name == PEER_HEADER and istio is not None and not istio.destination:
                    self.peer = value  # the callee's proxy says who answered
                continue
            out.append((name, value))
        if istio is not None and istio.response_value and self.peer:
            out.append((PEER_HEADER, istio.response_value))  # a mesh caller: say who answers
        elapsed = self.session.loop.time() - self.start
        cluster.stats.upstream_rq_time.record(elapsed * 1000.0)
        out.append((b"x-envoy-upstream-service-time", b"%d" % int(elapsed * 1000)))
        if self.set_cookies is not None and b"set-cookie" not in remove:  # edits come after
            out += self.set_cookies
        if plan is not None and any(options for _, options in plan.levels):
            out = [(n.lower(), v) for n, v in plan.apply(out)]
        self.status = status
        self.response_started = True
        self.response_code_details = "via_upstream"
        self.response_headers = out
        out.insert(0, (b":status", b"%d" % status))
        session = self.session
        session.codec.send_headers(self.stream_id, out, end_stream)
        session.kick()
        if end_stream:
            self.down_ended = True
            self.finish()

    def upstream_data(self, data: bytes, flow_controlled_length: int, end_stream: bool) -> None:
        if self.done:
            return
        if self.response_frames is not None:
            self.response_frames.feed(data)
        if data:
            self.to_down.append(data)
        self.to_down_end = end_stream
        self.pump_down()

    def upstream_trailers(self, headers: Headers) -> None:
        if self.done:
            return
        for name, value in headers:
            if name == b"grpc-status":
                self.grpc_status = value
        self.to_down_trailers = headers
        self.to_down_end = True
        self.pump_down()

    def pump_down(self) -> None:
        """Move response bytes to the client as far as its window allows, and give the
        upstream that much credit back."""
        if self.done or not self.response_started:
            return
        session = self.session
        codec = session.codec
        stream_id = self.stream_id
        to_down = self.to_down
        moved = 0
        try:
            while to_down:
                window = codec.local_flow_control_window(stream_id)
                if window <= 0:
                    break
                chunk = to_down[0]
                if len(chunk) > window:
                    to_down[0] = chunk[window:]
                    chunk = chunk[:window]
                else:
                    del to_down[0]
                last = not to_down and self.to_down_end and self.to_down_trailers is None
                codec.send_data(stream_id, chunk, last)
                moved += len(chunk)
            if not to_down and self.to_down_end:
                if self.to_down_trailers is not None:
                    codec.send_trailers(stream_id, self.to_down_trailers)
                elif not moved:
                    codec.send_data(stream_id, b"", True)
                self.down_ended = True
        except LocalProtocolError:  # the client reset the stream in this same batch
            return
        if moved:
            self.bytes_sent += moved
            if self.up is not None:
                self.up.acknowledge(self.up_id, moved)
        session.kick()
        if self.down_ended:
            self.finish()

    # failures -------------------------------------------------------------------------------

    def upstream_reset(self, error_code: int, refused: bool) -> None:
        if self.done:
            return
        self.up = None  # the stream is gone from its connection
        self._end_attempt()
        cluster = self.cluster
        assert cluster is not None
        if refused and not self.retried and self.replay is not None:
            # GOAWAY: the server never processed it; send it again on a new connection
            self.retried = True
            cluster.stats.upstream_rq_retry += 1
            if self.route_stats is not None:
                self.route_stats.upstream_rq_retry += 1
            self.to_up[:0] = self.replay
            self.replay = []
            self._attempt()
            return
        cluster.stats.upstream_rq_rx_reset += 1
        if self._maybe_retry(_REFUSED if refused else _RESET) or self._wait_for_racer():
            return
        if not self.response_started:
            self.local_reply(503, b"upstream reset", "UR", "upstream_reset_before_response_started")
            return
        self._reset_downstream(error_code)

    def upstream_failed(self, reason: str, connect: bool) -> None:
        if self.done:
            return
        cluster, host = self.cluster, self.host
        assert cluster is not None
        if host is not None and cluster.outlier is not None:
            cluster.outlier.record_local_failure(host, "connect_failure" if connect else "reset")
        self.up = None
        self._end_attempt()
        if self._maybe_retry(_CONNECT_FAILURE if connect else _RESET) or self._wait_for_racer():
            return
        if not self.response_started:
            flag = "UF" if connect else "UC"
            self.local_reply(503, reason.encode(), flag, reason.replace(" ", "_"))
            return
        self._reset_downstream(INTERNAL_ERROR)

    # retries ----------------------------------------------------------------------------

    def _retry_response(self, status: int, grpc_status: bytes, end_stream: bool) -> bool:
        """An answer the route's retry policy wants retried (and may have): drop it and
        try again. The attempt's status still counts for the cluster and its host."""
        policy = self.compiled.retry_policy if self.compiled is not None else None
        if policy is None or not _retriable(policy, status, grpc_status):
            return False
        if not self._may_retry(policy):
            return False
        cluster = self.cluster
        assert cluster is not None
        codes = cluster.stats.codes
        codes[status] = codes.get(status, 0) + 1
        host = self.host
        if host is not None and cluster.outlier is not None:
            cluster.outlier.record_response(host, _GRPC_TO_HTTP.get(grpc_status, status))
        if self.up is not None:
            if not end_stream:
                self.up.reset(self.up_id)  # the rest of this answer is not wanted
            self.up = None
        self._end_attempt()
        self._schedule_retry(policy)
        return True

    def _maybe_retry(self, conditions: frozenset[str]) -> bool:
        """A failed attempt (reset, connect failure): retry it if the policy names one of
        ``conditions`` and a retry is allowed."""
        policy = self.compiled.retry_policy if self.compiled is not None else None
        if policy is None or not conditions & policy.retry_on or not self._may_retry(policy):
            return False
        self._schedule_retry(policy)
        return True

    def _may_retry(self, policy: RetryPolicy) -> bool:
        """Only before the answer is relayed, with the request still at hand (all of it
        sent so far kept, up to 64 KB), within num_retries and the cluster's retry limit;
        as in Envoy, the previous retry's slot is given back first, and a retry wanted but
        not allowed flags the stream URX (out of retries) or UO (overflow)."""
        self._release_retry()
        if self.done or self.response_started or self.replay is None:
            return False
        cluster = self.cluster
        assert cluster is not None
        refused = cluster.try_retry(self.retries_left, self.route_stats)
        if refused:
            self.response_flags = refused
            return False
        self.retry_held = True
        return True

    def _schedule_retry(self, policy: RetryPolicy) -> None:
        cluster = self.cluster
        assert cluster is not None
        self.retries_left -= 1
        self.retries += 1
        # what was sent goes again, before what was not sent yet
        assert self.replay is not None
        self.to_up[:0] = self.replay
        self.replay = []
        delay = retry_delay(policy, self.retries)
        self.retry_timer = self.session.loop.call_later(delay, self._retry)

    def _retry(self) -> None:
        self.retry_timer = None
        if not self.done:
            self._attempt()

    def _release_retry(self) -> None:
        if self.retry_held:
            self.retry_held = False
            assert self.cluster is not None
            self.cluster.release_retry()

    # timeouts ---------------------------------------------------------------------------

    def on_timeout(self) -> None:
        self.deadline_timer = None
        if self.done:
            return
        cluster = self.cluster
        assert cluster is not None
        cluster.stats.upstream_rq_timeout += 1
        if self.route_stats is not None:
            self.route_stats.upstream_rq_timeout += 1
        if self.host is not None and cluster.outlier is not None:
            cluster.outlier.record_local_failure(self.host, "timeout")
        self._stream_timeout(504, b"upstream request timeout", "UT", "response_timeout")

    def _on_per_try_timeout(self) -> None:
        """The route's per_try_timeout: this try is dropped, and retried if the policy
        retries 5xx, gateway errors or resets (as Envoy does), else answered 504."""
        self.per_try_timer = None
        if self.done:
            return
        cluster = self.cluster
        assert cluster is not None
        cluster.stats.upstream_rq_per_try_timeout += 1
        if self.host is not None and cluster.outlier is not None:
            cluster.outlier.record_local_failure(self.host, "timeout")
        compiled = self.compiled
        if compiled is not None and compiled.hedge and self.up is not None and self.up_ended:
            self._hedge()
            return
        self._reset_upstream()
        if self._maybe_retry(PER_TRY_CONDITIONS) or self._wait_for_racer():
            return
        self.local_reply(504, b"upstream request timeout", "UT", "upstream_per_try_timeout")

    # hedging ----------------------------------------------------------------------------

    def _hedge(self) -> None:
        """The try is slow: keep it running and start another (a retry), as Envoy's
        hedge_on_per_try_timeout does; whichever answers first wins. Without a retry left
        the slow try just goes on."""
        if not self._maybe_retry(PER_TRY_CONDITIONS):
            return
        if self.racer is not None:  # only the newest earlier try is kept
            self.racer.abandon()
        up, host = self.up, self.host
        assert up is not None and host is not None
        self.racer = _Racer(self, up, self.up_id, host, self.attempt_start)
        up.retarget(self.up_id, self.racer)
        self.up, self.host = None, None  # the racer keeps the host's active request

    def _send_backup(self) -> None:
        """The stream waited longer than the route's backup delay. Unless it is answering,
        being retried or racing already, its try keeps running as a racer and one backup
        try goes to another host, within max_ratio and, like a hedged try, counted as a
        retry under the cluster's retry circuit breaker."""
        self.backup_timer = None
        compiled, cluster, up, host = self.compiled, self.cluster, self.up, self.host
        if (
            self.done
            or compiled is None
            or compiled.backup is None
            or cluster is None
            or up is None
            or host is None
            or not self.up_ended
            or self.replay is None
            or self.response_started
            or self.racer is not None
            or self.retry_held
        ):
            return
        backup = compiled.backup
        other = cluster.lb.choose(self.hash_key, host)
        if other is None or other is host:
            return  # no other host to ask
        if cluster.retries_active >= cluster.retry_limit():
            cluster.stats.upstream_rq_retry_overflow += 1
            if self.route_stats is not None:
                self.route_stats.upstream_rq_retry_overflow += 1
            backup.counters["capped"] += 1
            return
        if not backup.take():
            return
        cluster.admit_retry()  # a retry, holding its slot until the race is decided
        backup.counters["sent"] += 1
        if self.route_stats is not None:
            self.route_stats.upstream_rq_retry += 1
        self.retry_held = True  # given back when the race is decided
        if self.per_try_timer is not None:  # the backup brings its own
            self.per_try_timer.cancel()
            self.per_try_timer = None
        self.racer = _Racer(self, up, self.up_id, host, self.attempt_start, backup=True)
        up.retarget(self.up_id, self.racer)
        self.up, self.host = None, None  # the racer keeps the host's active request
        self.to_up[:0] = self.replay
        self.replay = []
        self._attempt()

    def adopt_racer(self, racer: _Racer) -> None:
        """The earlier try answered first: drop the newer one and carry on with it."""
        if self.racer is not racer:
            return
        self.racer = None
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
        self._release_retry()
        self._reset_upstream()
        self.up, self.up_id, self.host = racer.conn, racer.stream_id, racer.host
        self.attempt_start, self.up_ended = racer.started, True
        racer.conn.retarget(racer.stream_id, self)

    def racer_lost(self, racer: _Racer) -> None:
        """The earlier try failed: the newer one (or its retry) carries on."""
        if self.racer is racer:
            self.racer = None
            racer.host.active_requests -= 1
            cluster = self.cluster
            if cluster is not None and cluster.outlier is not None:
                cluster.outlier.record_local_failure(racer.host, "reset")

    def _wait_for_racer(self) -> bool:
        """The newest try failed for good while an earlier one still runs: wait for that."""
        racer = self.racer
        if racer is None or self.done:
            return False
        self.adopt_racer(racer)
        return True

    def _check_idle(self) -> None:
        """Envoy's stream idle timeout; a stream whose window stays closed (a zero-window
        stall) moves nothing and ends here too."""
        self.idle_timer = None
        if self.done:
            return
        moved = self.bytes_received + self.bytes_sent
        if moved != self.idle_mark:
            self.idle_mark = moved
            self.idle_timer = self.session.loop.call_later(self.idle_timeout, self._check_idle)
            return
        self._stream_timeout(408, b"stream timeout", "SI", "stream_idle_timeout")

    def _stream_timeout(self, status: int, body: bytes, flag: str, details: str) -> None:
        self._reset_upstream()
        if not self.response_started:
            self.local_reply(status, body, flag, details)
            return
        self.response_flags = flag
        self.response_code_details = details
        self._reset_downstream(CANCEL)

    def downstream_reset(self, error_code: int) -> None:
        """The client reset the stream or left: cancel upstream."""
        if self.done:
            return
        if self.up is not None:
            self.up.reset(self.up_id, error_code)  # RST_STREAM travels on, code and all
            self.up = None
        self._end_attempt()
        self.response_code_details = "downstream_remote_disconnect"
        self.finish()

    def _reset_downstream(self, error_code: int) -> None:
        self.session.codec.reset_stream(self.stream_id, error_code)
        self.session.kick()
        self.finish()

    def _reset_upstream(self) -> None:
        if self.up is not None:
            self.up.reset(self.up_id)
            self.up = None
        self._end_attempt()

    def _end_attempt(self) -> None:
        if self.per_try_timer is not None:
            self.per_try_timer.cancel()
            self.per_try_timer = None
        host, self.host = self.host, None
        if host is not None:
            host.active_requests -= 1

    # local replies --------------------------------------------------------------------------

    def _redirect(self, redirect: Redirect, compiled: CompiledRoute) -> None:
        authority = self.raw_authority.decode("latin-1")
        host = redirect.host or authority
        if redirect.port:
            host = f"{host.rsplit(':', 1)[0]}:{redirect.port}"
        bare, sep, query = self.raw_path.decode("latin-1").partition("?")
        if redirect.path is not None:
            bare = redirect.path
        elif redirect.prefix_rewrite is not None:
            bare = redirect.prefix_rewrite + bare[len(compiled.route.match.value) :]
        location = f"{redirect.scheme or 'http'}://{host}{bare}"
        if sep and not redirect.strip_query:
            location += "?" + query
        self.local_reply(
            redirect.status, b"", "-", "direct_response", [(b"location", location.encode())]
        )

    def local_reply(
        self, status: int, body: bytes, flags: str, details: str, extra: Headers | None = None
    ) -> None:
        """The proxy's own answer: trailers-only for gRPC, a plain response otherwise."""
        if self.done:
            return
        self._reset_upstream()
        # after URX or UO (a retry was wanted, not allowed), as Envoy lists them
        self.response_flags = (
            flags if self.response_flags == "-" else f"{self.response_flags},{flags}"
        )
        self.response_code_details = details
        if self.response_started:
            self._reset_downstream(CANCEL)
            return
        self.response_started = True
        session = self.session
        codec = session.codec
        stream_id = self.stream_id
        if self.grpc:
            code = _HTTP_TO_GRPC.get(status, GRPC_UNKNOWN)
            self.grpc_status = b"%d" % code
            self.status = 200
            message = body or details.encode()
            headers: Headers = [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", self.grpc_status),
                (b"grpc-message", message),
            ]
            self._peer_answer(headers)
            codec.send_headers(stream_id, headers, True)
        else:
            self.status = status
            headers = [(b":status", b"%d" % status), *(extra or ())]
            if body:
                headers.append((b"content-type", b"text/plain"))
            headers.append((b"content-length", b"%d" % len(body)))
            headers.append((b"server", session.ctx.server_name))
            self._peer_answer(headers)
            has_body = bool(body) and self.raw_method != b"HEAD"
            codec.send_headers(stream_id, headers, not has_body)
            if has_body:
                # a local body is small; a client window smaller than it is not worth a wait
                size = min(len(body), codec.local_flow_control_window(stream_id))
                codec.send_data(stream_id, body[:size], True)
                self.bytes_sent = size
        self.response_headers = headers[1:]
        self.down_ended = True
        if not self.request_ended:  # the rest of the upload is not needed (RFC 9113 §8.1)
            codec.reset_stream(stream_id, NO_ERROR)
        session.kick()
        self.finish()

    def _peer_answer(self, headers: Headers) -> None:
        istio = self.session.ctx.istio
        if istio is not None and istio.response_value and self.peer:
            headers.append((PEER_HEADER, istio.response_value))

    # the end --------------------------------------------------------------------------------

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self.deadline_timer is not None:
            self.deadline_timer.cancel()
            self.deadline_timer = None
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
        if self.racer is not None:
            self.racer.abandon()
            self.racer = None
        if self.backup_timer is not None:
            self.backup_timer.cancel()
            self.backup_timer = None
        self._release_retry()
        session = self.session
        ctx = session.ctx
        self.duration = session.loop.time() - self.start
        stats = ctx.stats
        stats.downstream_rq_active -= 1
        status = self.status
        stats.count_status(status)
        stats.downstream_rq_time.record(self.duration * 1000.0)
        cluster = self.cluster
        if cluster is not None:
            cluster.rq_active -= 1
            route_stats = self.route_stats
            if route_stats is not None:
                answered = self.response_code_details == "via_upstream" and self.down_ended
                upstream_ms = (session.loop.time() - self.attempt_start) * 1000.0
                route_stats.record(status, upstream_ms if answered else -1.0)
            if status:
                codes = cluster.stats.codes
                codes[status] = codes.get(status, 0) + 1
            host = self.host
            if host is not None:  # the upstream answered
                if cluster.outlier is not None and self.response_code_details == "via_upstream":
                    verdict = _GRPC_TO_HTTP.get(self.grpc_status, status)
                    cluster.outlier.record_response(host, verdict)
                self._end_attempt()
        if not self.up_ended and self.up is not None:
            self._reset_upstream()  # the response ended before the upload: stop it
        if self.finish_callbacks is not None or self.breakers is not None:
            # local failures are 5xx replies too; a gRPC answer counts by its grpc-status
            verdict = _GRPC_TO_HTTP.get(self.grpc_status, status)
            ok = 0 < verdict < 500
            for callback in self.finish_callbacks or ():
                callback(self.duration, ok)
            for breaker in self.breakers or ():
                if status:
                    breaker.record(session.loop.time(), ok, self.duration)
                else:
                    breaker.release()  # the client left before an answer: no verdict
        grpc_ok = self.grpc_status == b"0"
        method = self.grpc_method
        if method is not None:
            method.total += 1
            if grpc_ok:
                method.success += 1
            else:
                method.failure += 1
            if self.request_frames is not None and self.response_frames is not None:
                method.request_message_count += self.request_frames.count
                method.response_message_count += self.response_frames.count
        istio = ctx.istio
        if istio is not None:
            key = (
                self.peer,
                self.cluster_name,
                self.raw_authority,
                status,
                self.response_flags,
                "grpc" if self.grpc else "http",
                self.grpc_status.decode("latin-1") if self.grpc else "",
            )
            istio.record_stream(key, self.duration, self.bytes_received, self.bytes_sent)
        span = self.span
        if span is not None and span.sampled and ctx.tracer is not None:
            ctx.tracer.finish(span, self, self.raw_authority.decode("latin-1"))
        for access_log in ctx.access_logs:
            access_log(self)
        session.stream_done(self)

    # the access log record (shoal.observe.accesslog.AccessLogRecord) --------------------

    @property
    def start_time(self) -> float:
        return self.started_at

    @property
    def protocol(self) -> str:
        return "HTTP/2"

    @property
    def method(self) -> str:
        return self.raw_method.decode("latin-1")

    @property
    def path(self) -> str:
        return self.raw_path.decode("latin-1")

    @property
    def authority(self) -> str:
        return self.raw_authority.decode("latin-1")

    @property
    def upstream_cluster(self) -> str:
        return self.cluster_name

    @property
    def route_name(self) -> str:
        return self.compiled.route.name if self.compiled is not None else ""

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
        if self.span is not None:
            return self.span.trace_id
        return trace_id_of(self.request_header) or ""

    def request_header(self, name: str) -> str | None:
        if name == "x-request-id" and self.request_id:
            return self.request_id.decode("latin-1")
        return header_value(self.headers, name.encode("latin-1"))

    def response_header(self, name: str) -> str | None:
        return header_value(self.response_headers, name.encode("latin-1"))


class _Racer:
    """An earlier try kept running by hedging: until it answers (and wins) or fails, its
    stream's events come here."""

    __slots__ = ("backup", "conn", "host", "started", "stream", "stream_id")

    def __init__(
        self,
        stream: H2Stream,
        conn: H2UpstreamConnection | Http1Leg,
        stream_id: int,
        host: Host,
        started: float,
        *,
        backup: bool = False,
    ) -> None:
        self.stream, self.conn, self.stream_id = stream, conn, stream_id
        self.host, self.started = host, started
        self.backup = backup  # a backup try was sent beside this one

    def upstream_headers(self, headers: Headers, end_stream: bool) -> None:
        self.stream.adopt_racer(self)
        self.stream.upstream_headers(headers, end_stream)

    def upstream_data(self, data: bytes, flow_controlled_length: int, end_stream: bool) -> None:
        pass  # nothing comes before the headers, which hand the stream over

    def upstream_trailers(self, headers: Headers) -> None:
        pass

    def upstream_window(self) -> None:
        pass  # the whole request was sent before the race began

    def upstream_reset(self, error_code: int, refused: bool) -> None:
        self.stream.racer_lost(self)

    def upstream_failed(self, reason: str, connect: bool) -> None:
        self.stream.racer_lost(self)

    def abandon(self) -> None:
        self.conn.reset(self.stream_id)
        self.host.active_requests -= 1


def _pick_cluster(action: RouteAction) -> str:
    if action.cluster:
        return action.cluster
    return random.choices(
        [w.name for w in action.weighted_clusters], [w.weight for w in action.weighted_clusters]
    )[0]


class HttpSniffer(asyncio.Protocol):
    """``codec_type: AUTO``: a connection that opens with the HTTP/2 preface gets an
    :class:`H2Session`, anything else the HTTP/1.1 :class:`HttpConnection`. Only the
    preface's length is read (usually the first segment), then the connection is handed
    over with ``transport.set_protocol``."""

    __slots__ = ("buffer", "ctx", "timer", "transport")

    def __init__(self, ctx: HttpListenerContext) -> None:
        self.ctx = ctx
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        idle = self.ctx.config.idle_timeout
        if idle:
            self.timer = asyncio.get_running_loop().call_later(idle, self.transport.close)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer = self.buffer + data
        size = min(len(buffer), len(PREFACE))
        session: asyncio.Protocol
        if buffer[:size] != PREFACE[:size]:
            session = HttpConnection(self.ctx)
        elif size == len(PREFACE):
            session = H2Session(self.ctx)
        else:
            return
        if self.timer is not None:
            self.timer.cancel()
        transport = self.transport
        assert transport is not None
        transport.set_protocol(session)
        session.connection_made(transport)
        session.data_received(buffer)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
