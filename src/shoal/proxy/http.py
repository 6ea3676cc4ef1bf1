"""The HTTP/1.1 sidecar path: a downstream connection and its exchanges.

``HttpConnection`` is the asyncio Protocol for one downstream socket. It feeds bytes to
the codec and turns each request into an ``Exchange``, which routes it, takes an upstream
connection from the cluster's pool, streams both bodies with backpressure, retries and
times out, and writes the access log. No coroutine runs per request: everything is a
callback, timers are ``call_later`` handles cancelled on completion.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import socket
import time
from collections import deque
from collections.abc import Callable
from email.utils import formatdate
from typing import TYPE_CHECKING, cast

from shoal.codec.http1 import (
    CONTINUE_RESPONSE,
    END,
    HOP_BY_HOP,
    LAST_CHUNK,
    Event,
    Headers,
    RequestDecoder,
    RequestHead,
    ResponseHead,
    Upgrade,
    connection_tokens,
    encode_chunk,
    header_value,
    no_body_status,
    status_line,
)
from shoal.config.filters import FilterConfig
from shoal.config.model import (
    HashPolicy,
    Redirect,
    RequestMirrorPolicy,
    RetryPolicy,
    RouteAction,
)
from shoal.errors import RemoteProtocolError
from shoal.filters.base import LocalReply
from shoal.filters.run import run_filters
from shoal.observe.istio import PEER_HEADER, PEER_HEADERS
from shoal.observe.stats import RouteStats
from shoal.observe.tracing import Span, trace_id_of
from shoal.proxy.cookies import generated_value, set_cookie_line
from shoal.proxy.hashing import HASHING_LBS, request_hash
from shoal.proxy.routes import CompiledRoute, HeaderPlan, split_lines
from shoal.transport.upstream import HIGH_WATERMARK, UpstreamConnection
from shoal.upstream.breaker import ErrorRateBreaker, admit
from shoal.upstream.cluster import retry_delay, retry_on_status

if TYPE_CHECKING:
    from shoal.proxy.listeners import HttpListenerContext
    from shoal.upstream.backup import BackupRequests
    from shoal.upstream.cluster import ClusterRuntime
    from shoal.upstream.host import Host

log = logging.getLogger("shoal.http")

_connection_ids = itertools.count(1)
_random = os.urandom(8).hex()
# UUID4 layout: random per process in the first four groups, a counter in the last.
_REQUEST_ID_PREFIX = f"{_random[:8]}-{_random[8:12]}-4{_random[12:15]}-a{_random[15]}00-".encode()
_request_ids = itertools.count(random.getrandbits(40))

# retry_on conditions that a failure before response headers satisfies
_RESET_CONDITIONS = frozenset({"5xx", "gateway-error", "reset", "reset-before-request"})
_CONNECT_CONDITIONS = frozenset({"5xx", "gateway-error", "connect-failure", "reset"})
PER_TRY_CONDITIONS = frozenset({"5xx", "gateway-error", "reset"})  # a per-try timeout's
# answered or rewritten by the proxy itself, never passed on
_NOT_FORWARDED = frozenset(
    {
        b"expect",
        b"x-envoy-internal",
        b"x-envoy-original-path",
        b"x-envoy-original-host",
        b"x-envoy-external-address",
        # router control headers: consumed by Envoy's router, never forwarded
        b"x-envoy-max-retries",
        b"x-envoy-retry-on",
        b"x-envoy-retry-grpc-on",
        b"x-envoy-retriable-status-codes",
        b"x-envoy-retriable-header-names",
        b"x-envoy-upstream-rq-timeout-ms",
        b"x-envoy-upstream-rq-per-try-timeout-ms",
        b"x-envoy-upstream-rq-timeout-alt-response",
        b"x-envoy-hedge-on-per-try-timeout",
        b"x-envoy-expected-rq-timeout-ms",
    }
)
_UPGRADE_HEADERS = frozenset({b"connection", b"upgrade"})
# response headers the proxy writes itself, replacing any the upstream sent
_SET_BY_PROXY = frozenset({b"server", b"date", b"x-envoy-upstream-service-time"})


# balancers that use a request's hash; Envoy evaluates hash policies only for them
class _Date:
    """The ``date`` header of the current second, formatted once per second."""

    __slots__ = ("line", "second", "value")

    def __init__(self) -> None:
        self.second = -1
        self.value = self.line = b""

    def refresh(self) -> _Date:
        second = int(time.time())
        if second != self.second:
            self.second = second
            self.value = formatdate(second, usegmt=True).encode()
            self.line = b"date: %s\r\n" % self.value
        return self


_DATE = _Date()


def new_request_id() -> bytes:
    """A UUID4-shaped id: no randomness drawn per request, unique within the process."""
    return b"%s%012x" % (_REQUEST_ID_PREFIX, next(_request_ids) & 0xFFFFFFFFFFFF)


class _Discard:
    """Drains the rest of a response nobody wants (a retried 5xx, a mirror's answer) and
    returns the connection to its pool when the response ends."""

    __slots__ = ("cluster", "conn", "host")

    def __init__(self, cluster: ClusterRuntime, host: Host, conn: UpstreamConnection) -> None:
        self.cluster, self.host, self.conn = cluster, host, conn

    def upstream_head(self, head: ResponseHead) -> None:
        pass

    def upstream_data(self, data: bytes) -> None:
        pass

    def upstream_end(self) -> None:
        self.cluster.release(self.host, self.conn)

    def upstream_upgraded(self, rest: bytes) -> None:
        self.conn.close()

    def upstream_reset(self, reason: str) -> None:
        pass

    def upstream_pause(self) -> None:
        pass

    def upstream_resume(self) -> None:
        pass

    def cork(self) -> None:
        pass

    def uncork(self) -> None:
        pass


class _MirrorAnswer(_Discard):
    """A mirrored request's answer: reported to its ``Mirror``, its bytes thrown away."""

    __slots__ = ("mirror",)

    def __init__(self, mirror: Mirror, host: Host, conn: UpstreamConnection) -> None:
        super().__init__(mirror.cluster, host, conn)
        self.mirror = mirror

    def upstream_head(self, head: ResponseHead) -> None:
        self.mirror.answered(head.status)

    def upstream_end(self) -> None:  # also after an upgrade, once the closed tunnel ends
        super().upstream_end()
        self.mirror.finish(0)

    def upstream_reset(self, reason: str) -> None:
        self.mirror.failed()


class Mirror:
    """One copy of a request for a mirror cluster (Envoy's request_mirror_policies), fire
    and forget: it takes a connection from the mirror cluster's own pool, runs under the
    route's timeout and counts in the mirror cluster's stats as any request does, and
    nothing it does reaches the exchange it was copied from."""

    __slots__ = (
        "cluster",
        "conn",
        "data",
        "head_only",
        "host",
        "loop",
        "started",
        "status",
        "timer",
    )

    def __init__(
        self,
        cluster: ClusterRuntime,
        data: bytes,
        head_only: bool,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.cluster = cluster
        self.data = data  # head and whole body
        self.head_only = head_only
        self.loop = loop
        self.host: Host | None = None
        self.conn: UpstreamConnection | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.started = 0.0
        self.status = 0

    def send(self, timeout: float) -> None:
        """Ask the pool for a connection; refusals (max_requests, no healthy host, pending
        overflow) count as the 503 they would be for any request."""
        cluster = self.cluster
        if cluster.rq_active >= cluster.config.circuit_breakers.max_requests:
            cluster.stats.upstream_rq_active_overflow += 1
            self._count(503)
            return
        host = cluster.lb.choose(None, None)
        if host is None:
            self._count(503)
            return
        conn = cluster.acquire(host, self)
        if conn is False:
            self._count(503)
            return
        self.host = host
        host.active_requests += 1
        cluster.rq_active += 1
        self.started = self.loop.time()
        if timeout:
            self.timer = self.loop.call_later(timeout, self._timeout)
        if conn is not None:
            assert isinstance(conn, UpstreamConnection)
            self.pool_ready(conn)

    def pool_ready(self, conn: UpstreamConnection) -> None:
        cluster, host = self.cluster, self.host
        assert host is not None
        self.conn = conn
        cluster.stats.upstream_rq_total += 1
        if cluster.outlier is not None:
            cluster.outlier.record_local_success(host)
        conn.start(_MirrorAnswer(self, host, conn), self.data, self.head_only)

    def pool_failure(self, reason: str, transport_reason: str) -> None:
        self._report("connect_failure")
        self.finish(503)

    def answered(self, status: int) -> None:
        cluster = self.cluster
        assert self.host is not None
        self.status = status
        cluster.stats.upstream_rq_time.record((self.loop.time() - self.started) * 1000.0)
        if cluster.outlier is not None:
            cluster.outlier.record_response(self.host, status)

    def failed(self) -> None:
        """The connection closed or reset before the answer ended."""
        if not self.status:
            self.cluster.stats.upstream_rq_rx_reset += 1
            self._report("reset")
        self.finish(503)

    def _timeout(self) -> None:
        self.timer = None
        self.cluster.stats.upstream_rq_timeout += 1
        assert self.host is not None
        if self.conn is None:
            self.cluster.cancel(self.host, self)  # still waiting for a connection
        else:
            self.conn.abort()
        if not self.status:
            self._report("timeout")
        self.finish(504)

    def _report(self, kind: str) -> None:
        outlier = self.cluster.outlier
        if outlier is not None and self.host is not None:
            outlier.record_local_failure(self.host, kind)

    def finish(self, failure_status: int) -> None:
        """Done: the answer's status (or ``failure_status`` without one) is counted."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        assert self.host is not None
        self.host.active_requests -= 1
        self.cluster.rq_active -= 1
        self._count(self.status or failure_status)

    def _count(self, status: int) -> None:
        codes = self.cluster.stats.codes
        codes[status] = codes.get(status, 0) + 1


def mirror_head(head: bytes) -> bytes:
    """The upstream request head as Envoy's mirror sends it: ``-shadow`` after the host part
    of Host (``reviews:9080`` → ``reviews-shadow:9080``), and ``x-envoy-internal: true``,
    which Envoy's internal client adds."""
    start = head.find(b"\r\nhost: ") + 8
    if start >= 8:
        end = head.index(b"\r\n", start)
        host = head[start:end]
        port_at = host.rfind(b":")
        if port_at < 0 or host.rfind(b"]") > port_at:  # no port ("[v6]" has colons inside)
            host += b"-shadow"
        else:
            host = host[:port_at] + b"-shadow" + host[port_at:]
        head = head[:start] + host + head[end:]
    return head[:-2] + b"x-envoy-internal: true\r\n\r\n"


class _Racer:
    """An earlier try kept running by hedging (Envoy's hedge_on_per_try_timeout) or by a
    backup request (``backup``): whichever try answers first wins the exchange, the other
    is abandoned."""

    __slots__ = ("backup", "conn", "exchange", "host", "started")

    def __init__(
        self,
        exchange: Exchange,
        conn: UpstreamConnection,
        host: Host,
        started: float,
        backup: bool = False,
    ) -> None:
        self.exchange, self.conn, self.host, self.started = exchange, conn, host, started
        self.backup = backup

    def upstream_head(self, head: ResponseHead) -> None:
        exchange = self.exchange
        exchange.adopt_racer()
        exchange.upstream_head(head)

    def upstream_data(self, data: bytes) -> None:
        pass  # nothing comes before the head, which hands the connection over

    def upstream_end(self) -> None:
        pass

    def upstream_upgraded(self, rest: bytes) -> None:
        self.conn.close()

    def upstream_reset(self, reason: str) -> None:
        self.exchange.racer_lost(self)

    def upstream_pause(self) -> None:
        self.exchange.upstream_pause()

    def upstream_resume(self) -> None:
        self.exchange.upstream_resume()

    def cork(self) -> None:
        self.exchange.cork()

    def uncork(self) -> None:
        self.exchange.uncork()

    def abandon(self) -> None:
        self.conn.abort()
        self.host.active_requests -= 1


class Exchange:
    """One request and its response; the unit of routing, retry, timeout and logging."""

    __slots__ = (
        "_backup_from",
        "_breakers",
        "_chunked_response",
        "_idle_bytes",
        "_idle_mark_at",
        "_mirrors",
        "_on_finish",
        "_per_try_timer",
        "_racer",
        "_resent",
        "_retry_held",
        "_retry_timer",
        "_set_cookies",
        "attempt_start",
        "backup_at",
        "body_buffer",
        "body_buffered_bytes",
        "bytes_received",
        "bytes_sent",
        "cluster",
        "compiled",
        "conn",
        "connection",
        "deadline",
        "done",
        "duration",
        "hash_key",
        "head",
        "host",
        "idle_timeout",
        "original_path",
        "path_bytes",
        "peer",
        "pending",
        "request_complete",
        "request_end_at",
        "request_id",
        "request_plan",
        "response_code_details",
        "response_complete",
        "response_flags",
        "response_headers",
        "response_plan",
        "response_started",
        "retries_left",
        "route_action",
        "route_stats",
        "span",
        "start",
        "start_time",
        "status",
        "stream_end_at",
        "tried_hosts",
        "tunnel",
        "unsent",
        "upstream_authority",
        "upstream_head_bytes",
        "upstream_ms",
    )

    def __init__(self, connection: HttpConnection, head: RequestHead) -> None:
        self.connection = connection
        self.head = head
        self.start_time = time.time()
        self.start = connection.loop.time()
        self.duration = 0.0
        self.status = 0
        self.response_flags = "-"
        self.response_code_details = ""
        self.bytes_received = 0
        self.bytes_sent = 0
        self.compiled: CompiledRoute | None = None
        self.response_plan: HeaderPlan | None = None
        self.request_plan: HeaderPlan | None = None
        self.upstream_authority = b""
        self.upstream_ms = -1
        self.route_action: RouteAction | None = None
        self.cluster: ClusterRuntime | None = None
        self.route_stats: RouteStats | None = None  # the route's, with a stat_prefix
        self.host: Host | None = None
        self.conn: UpstreamConnection | None = None
        self.pending = False
        self.request_complete = False
        self.response_started = False
        self.response_complete = False
        self.done = False
        self.tunnel = False
        self._chunked_response = False
        self.unsent: list[bytes] = []
        self.body_buffer: list[bytes] | None = None
        self.body_buffered_bytes = 0
        self.retries_left = 0
        self.tried_hosts: list[Host] = []
        self.hash_key: int | None = None
        self.upstream_head_bytes = b""
        self.response_headers: Headers = []
        self.request_id = b""
        self.original_path = b""
        self.path_bytes = head.target
        self.attempt_start = 0.0
        self.deadline = 0.0  # route timeout, checked by the connection's deadline timer
        self.stream_end_at = 0.0  # max_stream_duration
        self.request_end_at = 0.0  # request_timeout: the whole request must arrive by then
        self.idle_timeout = 0.0  # stream idle timeout (route or connection manager)
        self._idle_bytes = 0
        self._idle_mark_at = 0.0
        self._per_try_timer: asyncio.TimerHandle | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        # filters watching the end, breakers that let this request through (made on demand:
        # most requests have neither)
        self._on_finish: list[Callable[[float, bool], None]] | None = None
        self._breakers: list[ErrorRateBreaker] | None = None
        self._racer: _Racer | None = None  # the earlier try still running, when hedging
        self._resent = False  # re-sent once after a stale keep-alive connection failed
        self._retry_held = False  # holds a max_retries slot until the retry's outcome
        # mirrors chosen for this request and the head they get, sent once it has all arrived
        self._mirrors: tuple[bytes, list[ClusterRuntime]] | None = None
        self._set_cookies = b""  # set-cookie lines of cookies generated by the hash policy
        # backup requests: when the request, complete, had its first try under way (0: not
        # tracked), and when a backup is due (0: none), checked by the deadline timer
        self._backup_from = 0.0
        self.backup_at = 0.0
        # telemetry, only with the istio_stats filter / tracing: the peer's x-shoal-peer
        # (the caller's on inbound, the callee's on outbound), and the request's span
        self.peer = b""
        self.span: Span | None = None

    # access-log record view ------------------------------------------------------------------

    @property
    def protocol(self) -> str:
        return "HTTP/1.1" if self.head.version == b"1.1" else "HTTP/1.0"

    @property
    def method(self) -> str:
        return self.head.method.decode("latin-1")

    @property
    def path(self) -> str:
        return self.path_bytes.decode("latin-1")

    @property
    def authority(self) -> str:
        return (self.upstream_authority or self.head.host).decode("latin-1")

    @property
    def upstream_host(self) -> str:
        return self.host.key if self.host is not None else ""

    @property
    def upstream_cluster(self) -> str:
        return self.cluster.config.name if self.cluster is not None else ""

    @property
    def route_name(self) -> str:
        return self.compiled.route.name if self.compiled is not None else ""

    @property
    def downstream_remote(self) -> str:
        return self.connection.remote

    @property
    def downstream_local(self) -> str:
        return self.connection.local

    @property
    def connection_id(self) -> int:
        return self.connection.id

    @property
    def trace_id(self) -> str:
        if self.span is not None:
            return self.span.trace_id
        return trace_id_of(self.request_header) or ""

    def request_header(self, name: str) -> str | None:
        if name == "x-request-id" and self.request_id:
            return self.request_id.decode("latin-1")
        if name == "x-envoy-original-path":
            return self.original_path.decode("latin-1") if self.original_path else None
        return header_value(self.head.headers, name.encode("latin-1"))

    def response_header(self, name: str) -> str | None:
        if name == "x-envoy-upstream-service-time" and self.upstream_ms >= 0:
            return str(self.upstream_ms)
        return header_value(self.response_headers, name.encode("latin-1"))

    # request side --------------------------------------------------------------------------

    def begin(self) -> None:
        """Route the request and send it upstream (or answer it locally)."""
        connection = self.connection
        ctx = connection.ctx
        head = self.head
        ctx.stats.downstream_rq_total += 1
        ctx.stats.downstream_rq_active += 1
        if ctx.istio is not None and ctx.istio.destination:
            self.peer = head.header(PEER_HEADER) or b""
        if ctx.tracer is not None:
            self.span = ctx.tracer.start(head.headers)
        limit = ctx.config.max_request_bytes
        if limit is not None and self.bytes_received > limit:
            self._too_large()
            return
        target = head.target
        if not target.startswith(b"/") and not self._absolute_form(target):
            return
        if head.upgrade:
            if head.upgrade == b"connect":
                self.local_reply(404, b"", "NR", "route_not_found")
                return
            if head.upgrade.decode("latin-1") not in ctx.config.upgrade_types:
                self.local_reply(403, b"", "-", "upgrade_failed")
                return
            self.tunnel = True
        compiled = ctx.routes.match(head.host.decode("latin-1"), self.path, head.headers)
        if compiled is None:
            self.local_reply(404, b"", "NR", "route_not_found")
            return
        self.compiled = compiled
        self.response_plan = compiled.response_plan
        if ctx.filters and run_filters(self, ctx.filters, connection.loop):
            return
        self._dispatch(compiled)

    # the filter chain's view (shoal.filters.run.FilterDriven)

    def filter_reply(self, reply: LocalReply) -> None:
        flags = (
            reply.flags if self.response_flags == "-" else f"{self.response_flags},{reply.flags}"
        )
        self.local_reply(reply.status, reply.body, flags, reply.details, extra=reply.headers)

    def filters_passed(self) -> None:
        assert self.compiled is not None
        self._dispatch(self.compiled)

    @property
    def request_headers(self) -> Headers:
        return self.head.headers

    @property
    def route_cluster(self) -> str:
        action = self.compiled.route.action if self.compiled is not None else None
        return action.cluster if action is not None else ""

    @property
    def connection_key(self) -> int:
        return self.connection.id

    @property
    def remote_ip(self) -> str:
        return self.connection.remote_ip

    def per_filter(self, name: str) -> FilterConfig | None:
        return self.compiled.per_filter.get(name) if self.compiled is not None else None

    def on_finish(self, callback: Callable[[float, bool], None]) -> None:
        if self._on_finish is None:
            self._on_finish = []
        self._on_finish.append(callback)

    def _dispatch(self, compiled: CompiledRoute) -> None:
        """The router: local answers, or the cluster, breakers and the first try."""
        connection = self.connection
        ctx = connection.ctx
        head = self.head
        route = compiled.route
        if route.direct_response is not None:
            self.local_reply(
                route.direct_response.status,
                route.direct_response.body,
                "-",
                "direct_response",
                content_type=b"text/plain",
            )
            return
        if route.redirect is not None:
            self._redirect(route.redirect)
            return
        action = route.action
        assert action is not None
        self.route_action = action
        cluster_name = self._pick_cluster(action)
        if compiled.breaker is not None or ctx.breakers:
            fallback = self._ask_breakers(compiled, cluster_name)
            if fallback is None:
                return  # refused and answered locally
            cluster_name = fallback
        plans = compiled.cluster_plans.get(cluster_name) if compiled.cluster_plans else None
        request_plan, self.response_plan = plans or (
            compiled.request_plan,
            compiled.response_plan,
        )
        cluster = ctx.clusters.get(cluster_name)
        if cluster is None:
            self.local_reply(503, b"", "NC", "cluster_not_found")
            return
        self.cluster = cluster
        self.route_stats = compiled.stats
        limits = cluster.config.circuit_breakers
        if cluster.rq_active >= limits.max_requests:
            cluster.stats.upstream_rq_active_overflow += 1
            self._overflow_reply()
            return
        cluster.rq_active += 1
        self._arm_stream_timers(action)
        policy = compiled.retry_policy
        if (policy is not None or compiled.backup is not None) and not self.tunnel:
            if policy is not None:
                self.retries_left = policy.num_retries
            self.body_buffer = list(self.unsent)  # a queued request's body may be here
            self.body_buffered_bytes = sum(map(len, self.unsent))
        if action.hash_policy:
            hashing = cluster.config.lb_policy in HASHING_LBS
            self.hash_key = request_hash(
                action.hash_policy,
                head.headers,
                self.path,
                connection.remote_ip,
                self._generate_cookie if hashing else None,
            )
        if head.expect_continue and not connection.closing:
            connection.write(CONTINUE_RESPONSE)
        self.request_plan = request_plan
        self.upstream_head_bytes = self._upstream_head(action, compiled, request_plan)
        if compiled.mirrors and not self.tunnel:
            self._pick_mirrors(compiled.mirrors)
        if not head.has_body:
            self.request_complete = True
        if self.request_complete:
            self._start_timeout()
        elif (
            ctx.config.max_request_bytes is not None
            and not self.request_complete
            and not self.tunnel
        ):
            return  # envoy.filters.http.buffer: nothing goes upstream before the whole body
        self._attempt()
        if compiled.backup is not None and self.request_complete:
            self._arm_backup(compiled.backup)
        if self._mirrors is not None and self.request_complete and not self.done:
            self._send_mirrors()

    def _pick_mirrors(self, policies: tuple[RequestMirrorPolicy, ...]) -> None:
        """Draw which mirrors get a copy of this request and keep its body for them; an
        unknown mirror cluster (removed by CDS) is skipped."""
        clusters = self.connection.ctx.clusters
        chosen: list[ClusterRuntime] = []
        for policy in policies:
            cluster = clusters.get(policy.cluster)
            if cluster is not None and (
                policy.fraction >= 1.0 or random.random() < policy.fraction
            ):
                chosen.append(cluster)
        if not chosen:
            return
        if self.head.has_body and self.body_buffer is None:
            self.body_buffer = list(self.unsent)  # a queued request's body may be here
            self.body_buffered_bytes = sum(map(len, self.unsent))
        # before the first try: auto_host_rewrite must not reach the copies (as in Envoy)
        self._mirrors = (mirror_head(self.upstream_head_bytes), chosen)

    def _send_mirrors(self) -> None:
        """The whole request is here and its first try under way: send the copies. A body
        larger than the listener's buffer limit was not kept, so that request is not
        mirrored (Envoy streams bodies to its copies; this keeps memory bounded)."""
        assert self._mirrors is not None
        data, clusters = self._mirrors
        self._mirrors = None
        if self.head.has_body:
            body = self.body_buffer
            if body is None or self.body_buffered_bytes > self.connection.ctx.buffer_limit:
                return
            data += b"".join(body)
        action = self.route_action
        timeout = action.timeout if action is not None else 0.0
        head_only = self.head.method == b"HEAD"
        for cluster in clusters:
            Mirror(cluster, data, head_only, self.connection.loop).send(timeout)

    def _ask_breakers(self, compiled: CompiledRoute, cluster_name: str) -> str | None:
        """Ask the route's and the cluster's error-rate breakers; the cluster to use (the
        fallback cluster when one refuses), or None when a local fallback was sent."""
        now = self.connection.loop.time()
        cluster = self.connection.ctx.clusters.get(cluster_name)
        admitted: list[ErrorRateBreaker] = []
        refused = admit(
            (compiled.breaker, cluster.breaker if cluster is not None else None), now, admitted
        )
        self._breakers = admitted or None
        if refused is None:
            return cluster_name
        policy = refused.policy
        if policy.fallback_cluster:
            return policy.fallback_cluster
        reply = policy.local_reply
        self.local_reply(
            reply.status,
            reply.body,
            "UO",
            "circuit_breaker_open",
            extra=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers],
        )
        return None

    def _absolute_form(self, target: bytes) -> bool:
        """``GET http://host/path``: the target names the authority (HTTP_PROXY use)."""
        scheme, sep, rest = target.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            self.local_reply(400, b"", "DPE", "invalid_request_target", close=True)
            return False
        authority, slash, path = rest.partition(b"/")
        self.head.host = authority
        for index, (name, _) in enumerate(self.head.headers):
            if name == b"host":
                self.head.headers[index] = (b"host", authority)
                break
        else:
            self.head.headers.append((b"host", authority))
        self.path_bytes = slash + path if slash else b"/"
        self.head.target = self.path_bytes
        return True

    def _pick_cluster(self, action: RouteAction) -> str:
        if action.cluster:
            return action.cluster
        point = random.randrange(action.total_weight)
        for weighted in action.weighted_clusters:
            point -= weighted.weight
            if point < 0:
                return weighted.name
        return action.weighted_clusters[-1].name

    def _generate_cookie(self, policy: HashPolicy) -> str:
        """Envoy's generated cookie: one value per downstream connection, set on the response."""
        connection = self.connection
        value = generated_value(connection.remote, connection.local)
        self._set_cookies += set_cookie_line(policy, value)
        return value

    def _upstream_head(
        self,
        action: RouteAction,
        compiled: CompiledRoute,
        plan: HeaderPlan,
        rewrite_host: bytes = b"",
    ) -> bytes:
        """The request head sent upstream, built once and reused by retries (rebuilt per
        try only for auto_host_rewrite, whose Host is the chosen host's name)."""
        ctx = self.connection.ctx
        head = self.head
        path = self.path_bytes
        if action.prefix_rewrite is not None:
            prefix = compiled.route.match.value.encode("latin-1")
            if path.startswith(prefix):
                self.original_path = path
                path = action.prefix_rewrite.encode("latin-1") + path[len(prefix) :]
        elif action.regex_rewrite is not None:
            pattern, substitution = action.regex_rewrite
            bare, sep, query = path.decode("latin-1").partition("?")
            rewritten = pattern.sub(substitution, bare).encode("latin-1")
            self.original_path = path
            path = rewritten + (b"?" + query.encode("latin-1") if sep else b"")
        remove = plan.remove
        if head.connection:
            remove = remove | connection_tokens(head.headers)
        istio, tracer, span = ctx.istio, ctx.tracer, self.span
        if istio is not None:
            remove = remove | PEER_HEADERS
        if tracer is not None:
            remove = remove | tracer.owned
        lines = [b"%s %s HTTP/1.1\r\n" % (head.method, path)]
        append = lines.append
        original_host = host = head.host
        if action.host_rewrite_literal is not None:
            host = action.host_rewrite_literal.encode("latin-1")
        elif rewrite_host:
            host = rewrite_host
        self.upstream_authority = host  # the access log shows what went upstream, as Envoy's
        config = ctx.config
        edge = config.use_remote_address
        request_id = b""
        forwarded_proto = False
        xff: bytes | None = None
        for name, value in head.headers:
            if name in HOP_BY_HOP:
                if name == b"te" and value.strip().lower() == b"trailers":
                    append(b"te: trailers\r\n")  # the one TE value that crosses a proxy
                continue
            if name in remove:
                continue
            if name == b"host":
                append(b"host: %s\r\n" % host)
                continue
            if name == b"x-request-id":
                if edge and config.generate_request_id:
                    continue  # an edge proxy replaces an outside request id
                request_id = value
            elif name == b"x-forwarded-proto":
                forwarded_proto = True
            elif name == b"x-forwarded-for":
                xff = value if xff is None else xff + b"," + value
                continue
            elif name in _NOT_FORWARDED:
                continue
            append(b"%s: %s\r\n" % (name, value))
        if edge:
            remote = self.connection.remote_ip.encode("latin-1")
            append(b"x-envoy-external-address: %s\r\n" % remote)
            if not config.skip_xff_append:
                xff = remote if xff is None else xff + b"," + remote
        if xff is not None:
            append(b"x-forwarded-for: %s\r\n" % xff)
        if not forwarded_proto:
            append(b"x-forwarded-proto: http\r\n")
        if not request_id and config.generate_request_id:
            request_id = self.request_id or new_request_id()  # the same id on every try
            append(b"x-request-id: %s\r\n" % request_id)
        self.request_id = request_id
        if self.original_path:
            append(b"x-envoy-original-path: %s\r\n" % self.original_path)
        if host != original_host:
            append(b"x-envoy-original-host: %s\r\n" % original_host)
        if istio is not None and istio.request_line:
            append(istio.request_line)
        if tracer is not None and span is not None:
            append(tracer.headers(span))
        append(compiled.timeout_header)
        if plan.fast:
            append(plan.add)
        else:  # route edits see the headers set above, as Envoy's do
            edited = plan.apply(split_lines(b"".join(lines[1:])))
            del lines[1:]
            lines.extend(b"%s: %s\r\n" % pair for pair in edited)
        if self.tunnel:
            append(b"connection: upgrade\r\nupgrade: %s\r\n" % head.header(b"upgrade"))
        elif head.chunked:
            append(b"transfer-encoding: chunked\r\n")
        append(b"\r\n")
        return b"".join(lines)

    def request_data(self, data: bytes) -> None:
        if self.done:
            return
        self.bytes_received += len(data)
        limit = self.connection.ctx.config.max_request_bytes
        if limit is not None and self.bytes_received > limit and not self.response_started:
            if self is not self.connection.active:
                self.unsent.clear()  # queued: begin() answers 413 in turn
                return
            self._too_large()
            return
        if self.head.chunked and not self.tunnel:
            data = encode_chunk(data)
        buffer = self.body_buffer
        if buffer is not None:
            self.body_buffered_bytes += len(data)
            if self.body_buffered_bytes > self.connection.ctx.buffer_limit:
                self.body_buffer = None  # too big to replay: no more retries
                self.retries_left = 0
            else:
                buffer.append(data)
        conn = self.conn
        if conn is not None:
            conn.write(data)
        else:
            self.unsent.append(data)

    def _too_large(self) -> None:
        self.reset_upstream()
        self.local_reply(413, b"Payload Too Large", "-", "request_payload_too_large", close=True)

    def request_end(self) -> None:
        if self.done or self.request_complete:
            return
        self.request_complete = True
        if self.head.chunked:
            self.request_data_raw(LAST_CHUNK)
        self._start_timeout()
        if self.cluster is not None and not self.tried_hosts and not self.done:
            self._attempt()  # begin() held it for the buffer filter: the body is complete
        backup = self.compiled.backup if self.compiled is not None else None
        if backup is not None and self.tried_hosts:
            self._arm_backup(backup)
        if self._mirrors is not None and not self.done:
            self._send_mirrors()

    def request_data_raw(self, data: bytes) -> None:
        if self.body_buffer is not None:
            self.body_buffer.append(data)
        if self.conn is not None:
            self.conn.write(data)
        else:
            self.unsent.append(data)

    # upstream attempts -----------------------------------------------------------------------

    def _attempt(self, host: Host | None = None) -> None:
        """Start a try on ``host``, or on the balancer's pick."""
        cluster = self.cluster
        assert cluster is not None
        if host is None:
            host = self._choose_host(cluster)
        if host is None:
            self.local_reply(503, b"no healthy upstream", "UH", "no_healthy_upstream")
            return
        self.host = host
        action = self.route_action
        if action is not None and action.auto_host_rewrite and host.hostname:
            assert self.compiled is not None and self.request_plan is not None
            self.upstream_head_bytes = self._upstream_head(
                action, self.compiled, self.request_plan, host.hostname.encode("latin-1")
            )
        self.tried_hosts.append(host)
        host.active_requests += 1
        self.attempt_start = self.connection.loop.time()
        route_stats = self.route_stats
        if route_stats is not None:
            route_stats.upstream_rq_total += 1  # per try started, as Envoy counts a route's
        conn = cluster.acquire(host, self)
        if conn is None:
            self.pending = True
        elif conn is False:
            host.active_requests -= 1
            self._release_retry()
            if self._wait_for_racer():
                return  # no room for this extra try: the earlier one still runs
            self._overflow_reply()
        else:
            assert isinstance(conn, UpstreamConnection)
            self.pool_ready(conn)

    def _choose_host(self, cluster: ClusterRuntime) -> Host | None:
        """The LB's pick; with previous_hosts, Envoy picks again (up to
        host_selection_retry_max_attempts times) while the pick was tried before, and
        keeps the last pick if every one was."""
        tried = self.tried_hosts
        policy = self._policy()
        if not tried or policy is None or not policy.retry_other_host:
            return cluster.lb.choose(self.hash_key, None)
        host = cluster.lb.choose(self.hash_key, tried[-1])
        for _ in range(policy.host_selection_retry_max_attempts):
            if host is None or host not in tried:
                break
            host = cluster.lb.choose(self.hash_key, tried[-1])
        return host

    def _overflow_reply(self) -> None:
        """A circuit breaker is full: Envoy's fast 503, flagged UO."""
        self.local_reply(
            503,
            b"upstream connect error or disconnect/reset before headers. reset reason: overflow",
            "UO",
            "upstream_reset_before_response_started{overflow}",
            overloaded=True,
        )

    def pool_ready(self, conn: UpstreamConnection) -> None:
        self.pending = False
        if self.done:
            assert self.cluster is not None and self.host is not None
            self.cluster.release(self.host, conn)
            return
        self.conn = conn
        cluster = self.cluster
        assert cluster is not None and self.host is not None
        cluster.stats.upstream_rq_total += 1  # per try on the wire, as Envoy counts
        if cluster.outlier is not None:
            cluster.outlier.record_local_success(self.host)
        parts = self.body_buffer if self.body_buffer is not None else self.unsent
        data = self.upstream_head_bytes
        if parts:
            data += b"".join(parts)
        self.unsent = []
        conn.start(self, data, self.head.method == b"HEAD")
        policy = self._policy()
        if policy is not None and policy.per_try_timeout:
            self._per_try_timer = self.connection.loop.call_later(
                policy.per_try_timeout, self._on_per_try_timeout
            )
        if self.connection.paused_writing:
            conn.pause_reading()

    def pool_failure(self, reason: str, transport_reason: str) -> None:
        self.pending = False
        self._end_attempt()
        self._report_failure("connect_failure")
        if self._maybe_retry(_CONNECT_CONDITIONS):
            return
        self._reset_reply(reason, transport_reason, "UF")

    def _reset_reply(self, reason: str, transport_reason: str, flag: str) -> None:
        """Envoy's 503 for an upstream that failed before sending response headers (unless
        an earlier hedged try is still running: then it gets its chance)."""
        if self._wait_for_racer():
            return
        policy = self._policy()
        if policy is not None and self.retries_left < policy.num_retries:
            text = f"retried and the latest reset reason: {reason}"
        else:
            text = f"reset reason: {reason}"
            if transport_reason:
                text += f", transport failure reason: {transport_reason}"
        detail = reason.replace(" ", "_")
        if transport_reason:
            detail += "|" + transport_reason.replace(" ", "_")
        self.local_reply(
            503,
            b"upstream connect error or disconnect/reset before headers. " + text.encode(),
            self._flags(flag),
            "upstream_reset_before_response_started{" + detail + "}",
        )

    def _report_failure(self, kind: str) -> None:
        """Tell the cluster's outlier detector about a failure of the current try."""
        cluster = self.cluster
        if cluster is not None and cluster.outlier is not None and self.host is not None:
            cluster.outlier.record_local_failure(self.host, kind)

    def _policy(self) -> RetryPolicy | None:
        return self.compiled.retry_policy if self.compiled is not None else None

    def _flags(self, flag: str) -> str:
        """``flag`` after URX or UO when a retry was wanted but not allowed: Envoy lists
        flags in the order they were set (``URX,UF``)."""
        return flag if self.response_flags == "-" else f"{self.response_flags},{flag}"

    def _maybe_retry(self, conditions: frozenset[str], status: int = 0) -> bool:
        """Schedule a retry if the policy wants one and may have it. As in Envoy, the
        previous retry's max_retries slot is given back first, and a retriable failure
        that may not be retried flags the stream URX (out of retries) or UO (overflow)."""
        self._release_retry()
        policy = self._policy()
        if policy is None or self.response_started or self.done:
            return False
        if status:
            if not retry_on_status(policy, status):
                return False
        elif not conditions & policy.retry_on:
            return False
        cluster = self.cluster
        assert cluster is not None
        refused = cluster.try_retry(self.retries_left, self.route_stats)
        if refused:
            self.response_flags = refused
            return False
        self.retries_left -= 1
        self._retry_held = True
        delay = retry_delay(policy, policy.num_retries - self.retries_left)
        self._retry_timer = self.connection.loop.call_later(delay, self._retry)
        return True

    def _retry(self) -> None:
        self._retry_timer = None
        if not self.done:
            self._attempt()

    def _release_retry(self) -> None:
        if self._retry_held:
            self._retry_held = False
            assert self.cluster is not None
            self.cluster.release_retry()

    def _end_attempt(self) -> None:
        """Forget the current upstream attempt (its connection is gone or handed off)."""
        if self._per_try_timer is not None:
            self._per_try_timer.cancel()
            self._per_try_timer = None
        if self.host is not None:
            self.host.active_requests -= 1
        self.conn = None

    def _on_per_try_timeout(self) -> None:
        self._per_try_timer = None
        assert self.cluster is not None
        self.cluster.stats.upstream_rq_per_try_timeout += 1
        self._report_failure("timeout")
        conn = self.conn
        if self.compiled is not None and self.compiled.hedge and conn is not None:
            self._hedge(conn)
            return
        if conn is not None:
            conn.abort()
        self._end_attempt()
        if self._maybe_retry(PER_TRY_CONDITIONS):
            return
        if self._wait_for_racer():
            return
        self.local_reply(
            504, b"upstream request timeout", self._flags("UT"), "upstream_per_try_timeout"
        )

    # hedging ----------------------------------------------------------------------------------

    def _hedge(self, conn: UpstreamConnection) -> None:
        """The try is slow: keep it running and start another (a retry), as Envoy's
        hedge_on_per_try_timeout does. Without retries left the slow try just goes on."""
        if not self._maybe_retry(PER_TRY_CONDITIONS):
            return
        if self._racer is not None:  # only the newest earlier try is kept
            self._racer.abandon()
        assert self.host is not None
        self._racer = _Racer(self, conn, self.host, self.attempt_start)
        conn.sink = self._racer
        self.conn = None  # the racer keeps the host's active request

    def adopt_racer(self) -> None:
        """The earlier try answered first: drop the newer one and carry on with it."""
        self._drop_current_try()
        self._take_racer()

    def racer_lost(self, racer: _Racer) -> None:
        """The earlier try failed: the newer one (or its retry) carries on."""
        if self._racer is racer:
            self._racer = None
            racer.host.active_requests -= 1
            outlier = self.cluster.outlier if self.cluster is not None else None
            if outlier is not None:
                outlier.record_local_failure(racer.host, "reset")

    def _wait_for_racer(self) -> bool:
        """The newest try failed for good while an earlier one still runs: wait for that."""
        if self._racer is None or self.done:
            return False
        self._take_racer()
        return True

    def _take_racer(self) -> None:
        """The earlier try becomes the exchange's current one."""
        racer = self._racer
        assert racer is not None
        self._racer = None
        self.conn, self.host, self.attempt_start = racer.conn, racer.host, racer.started
        racer.conn.sink = self

    def _drop_current_try(self) -> None:
        """Abandon the exchange's own try, wherever it is (connecting, waiting, sent)."""
        if self.pending and self.cluster is not None and self.host is not None:
            self.cluster.cancel(self.host, self)
            self.pending = False
            self.host.active_requests -= 1
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        self._release_retry()
        conn = self.conn
        if conn is not None:
            conn.abort()
            self._end_attempt()

    # backup requests -------------------------------------------------------------------------

    def _arm_backup(self, backup: BackupRequests) -> None:
        """The whole request is here and its first try under way: it joins the backup
        budget and its backup falls due after the route's current delay. A body too large
        to keep cannot be sent twice."""
        if self.done or self.tunnel or self.response_started or self._backup_from:
            return
        if self.head.has_body and self.body_buffer is None:
            return
        now = self.connection.loop.time()
        self._backup_from = now
        backup.admit()
        self.backup_at = now + backup.delay
        self.connection.arm_deadline(self.backup_at)

    def _send_backup(self) -> None:
        """The request has waited longer than the route's delay. Unless it is answering,
        waiting for a connection, being retried or racing a hedge already, its try keeps
        running as a racer and one backup try goes to another host, within max_ratio and,
        like a hedged try, counted as a retry under the cluster's retry circuit breaker."""
        compiled, cluster, conn, host = self.compiled, self.cluster, self.conn, self.host
        if (
            compiled is None
            or compiled.backup is None
            or cluster is None
            or conn is None
            or host is None
            or self.response_started
            or self._racer is not None
            or self._retry_held
        ):
            return
        if self.head.has_body and self.body_buffer is None:
            return  # the body outgrew the buffer limit while it streamed
        backup = compiled.backup
        other = cluster.lb.choose(self.hash_key, host)
        if other is None or other is host:
            return  # no other host to ask
        route_stats = self.route_stats
        if cluster.retries_active >= cluster.retry_limit():
            cluster.stats.upstream_rq_retry_overflow += 1
            if route_stats is not None:
                route_stats.upstream_rq_retry_overflow += 1
            backup.counters["capped"] += 1
            return
        if not backup.take():
            return
        backup.counters["sent"] += 1
        cluster.stats.upstream_rq_retry += 1
        if route_stats is not None:
            route_stats.upstream_rq_retry += 1
        cluster.retries_active += 1
        self._retry_held = True  # given back when the race is decided
        if self._per_try_timer is not None:  # the backup brings its own
            self._per_try_timer.cancel()
            self._per_try_timer = None
        self._racer = _Racer(self, conn, host, self.attempt_start, backup=True)
        conn.sink = self._racer
        self.conn = None  # the racer keeps the host's active request
        self._attempt(other)

    def _arm_stream_timers(self, action: RouteAction) -> None:
        """Stream-level limits (Envoy's stream idle timeout, max stream duration, request
        timeout) share the connection's lazy deadline timer with the route timeout."""
        config = self.connection.ctx.config
        idle = (
            action.idle_timeout if action.idle_timeout is not None else config.stream_idle_timeout
        )
        duration = action.max_stream_duration or config.max_stream_duration
        start = self.start
        first = 0.0
        if idle:
            self.idle_timeout = idle
            self._idle_mark_at = start
            first = start + idle
        if duration:
            self.stream_end_at = start + duration
            first = min(first, self.stream_end_at) if first else self.stream_end_at
        if config.request_timeout and not self.request_complete:
            self.request_end_at = start + config.request_timeout
            first = min(first, self.request_end_at) if first else self.request_end_at
        if first:
            self.connection.arm_deadline(first)

    def check_timers(self, now: float) -> float:
        """Fire whichever stream timer is due; otherwise say when to look again (0: never)."""
        if self.deadline and now >= self.deadline:
            self.on_timeout()
            return 0.0
        if self.stream_end_at and now >= self.stream_end_at:
            self._stream_timeout(b"downstream duration timeout", "DT", "max_duration_timeout")
            return 0.0
        if self.request_end_at and not self.request_complete and now >= self.request_end_at:
            self._stream_timeout(b"request timeout", "-", "request_overall_timeout")
            return 0.0
        if self.backup_at and now >= self.backup_at:
            self.backup_at = 0.0
            self._send_backup()
        idle_at = 0.0
        if self.idle_timeout:
            moved = self.bytes_received + self.bytes_sent
            if moved != self._idle_bytes:  # activity since the last look: idle from now
                self._idle_bytes = moved
                self._idle_mark_at = now
            elif now >= self._idle_mark_at + self.idle_timeout:
                self._stream_timeout(b"stream timeout", "SI", "stream_idle_timeout")
                return 0.0
            idle_at = self._idle_mark_at + self.idle_timeout
        pending = [t for t in (self.deadline, self.stream_end_at, idle_at, self.backup_at) if t]
        if self.request_end_at and not self.request_complete:
            pending.append(self.request_end_at)
        return min(pending) if pending else 0.0

    def _stream_timeout(self, body: bytes, flag: str, details: str) -> None:
        """Envoy answers a stream-level timeout with 408 if it can, else resets."""
        self.reset_upstream()
        if self.response_started:
            self.response_flags = flag
            self.response_code_details = details
            self.connection.abort()
            self.finish()
            return
        self.local_reply(408, body, flag, details, close=not self.request_complete)

    def _start_timeout(self) -> None:
        action = self.route_action
        if action is not None and action.timeout and not self.deadline and not self.done:
            connection = self.connection
            self.deadline = connection.loop.time() + action.timeout
            connection.arm_deadline(self.deadline)

    def on_timeout(self) -> None:
        if self.done:
            return
        assert self.cluster is not None
        self.cluster.stats.upstream_rq_timeout += 1
        if self.route_stats is not None:
            self.route_stats.upstream_rq_timeout += 1
        if self.conn is not None:
            self._report_failure("timeout")
        self.reset_upstream()
        if self.response_started:
            self.response_flags = "UT"
            self.connection.abort()
            return
        self.local_reply(504, b"upstream request timeout", "UT", "response_timeout")

    def reset_upstream(self) -> None:
        """Abandon the upstream side (timeout, downstream gone): its connection can't be
        reused mid-exchange, so it is closed."""
        self._drop_current_try()
        if self._racer is not None:
            self._racer.abandon()
            self._racer = None

    # response side (called by the upstream connection) ------------------------------------

    def upstream_head(self, head: ResponseHead) -> None:
        status = head.status
        conn = self.conn
        assert conn is not None and self.cluster is not None and self.host is not None
        outlier = self.cluster.outlier
        if outlier is not None:
            outlier.record_response(self.host, status)
        retried = self._retry_held  # this try is a retry
        if (
            status >= 500 or status == 409 or status in self._retriable_codes()
        ) and self._maybe_retry(frozenset(), status):
            conn.sink = _Discard(self.cluster, self.host, conn)
            self._end_attempt()
            return
        self._release_retry()
        compiled = self.compiled
        if self._racer is not None:  # this try answered first: the earlier one is dropped
            if self._racer.backup:  # a backup was sent: the route has a backup policy
                assert compiled is not None and compiled.backup is not None
                compiled.backup.counters["won"] += 1
            self._racer.abandon()
            self._racer = None
        self.status = status
        self.response_started = True
        self.response_code_details = "via_upstream"
        if retried:  # a retry or a backup answered, with nothing the policy would retry
            policy = self._policy()
            if policy is None or not retry_on_status(policy, status):
                self.cluster.stats.upstream_rq_retry_success += 1
                if self.route_stats is not None:
                    self.route_stats.upstream_rq_retry_success += 1
        connection = self.connection
        ctx = connection.ctx
        now = connection.loop.time()
        elapsed = now - self.attempt_start
        if self._backup_from and status < 500:
            # errors are left out: often fast, they would shorten the delay in bad times
            assert compiled is not None and compiled.backup is not None
            compiled.backup.record(now - self._backup_from)
        self.upstream_ms = upstream_ms = int(elapsed * 1000)
        self.cluster.stats.upstream_rq_time.record(elapsed * 1000.0)
        plan = self.response_plan
        assert plan is not None
        remove = plan.remove
        if head.connection and status != 101:
            remove = remove | connection_tokens(head.headers)
        istio = ctx.istio
        if istio is not None:
            remove = remove | PEER_HEADERS
            if not istio.destination:
                self.peer = head.header(PEER_HEADER) or b""
        self.response_headers = head.headers
        lines = [status_line(status)]
        append = lines.append
        has_length = False
        for name, value in head.headers:
            if name in HOP_BY_HOP:
                if status == 101 and name in _UPGRADE_HEADERS:
                    append(b"%s: %s\r\n" % (name, value))
                continue
            if name in remove or name in _SET_BY_PROXY:
                continue
            if name == b"content-length":
                has_length = True
            append(b"%s: %s\r\n" % (name, value))
        append(b"x-envoy-upstream-service-time: %d\r\n" % upstream_ms)
        if istio is not None and istio.response_line and self.peer:
            append(istio.response_line)  # the caller is in the mesh: tell it who answered
        if self._set_cookies and b"set-cookie" not in remove:  # route edits come after it
            append(self._set_cookies)
        if plan.fast:
            append(plan.add)
        else:  # date, server and framing stay the proxy's: they are added after the edits
            edited = plan.apply(split_lines(b"".join(lines[1:])))
            del lines[1:]
            lines.extend(b"%s: %s\r\n" % pair for pair in edited)
        append(_DATE.refresh().line)
        append(ctx.server_header)
        bodyless = no_body_status(status) or self.head.method == b"HEAD"
        close = connection.must_close(self.head)
        if status == 101:
            pass
        elif not bodyless and not has_length:
            if self.head.version == b"1.1":
                self._chunked_response = True
                append(b"transfer-encoding: chunked\r\n")
            else:
                close = True  # an HTTP/1.0 client learns the end from the close
        if close:
            connection.closing = True
            append(b"connection: close\r\n")
        append(b"\r\n")
        data = b"".join(lines)
        connection.write(data)

    def _retriable_codes(self) -> frozenset[int]:
        policy = self._policy()
        return policy.retriable_status_codes if policy is not None else frozenset()

    def upstream_data(self, data: bytes) -> None:
        self.bytes_sent += len(data)
        if self._chunked_response:
            data = encode_chunk(data)
        self.connection.write(data)

    def upstream_end(self) -> None:
        conn = self.conn
        cluster = self.cluster
        host = self.host
        assert conn is not None and cluster is not None and host is not None
        if self.tunnel and self.response_started and self.status == 101:
            self._end_attempt()
            self.connection.abort()
            self.finish()
            return
        self._end_attempt()
        if self.request_complete and not conn.closed:
            cluster.release(host, conn)
        else:
            conn.close()
        if self._chunked_response:
            self.connection.write(LAST_CHUNK)
        self.response_complete = True
        self.finish()

    def upstream_upgraded(self, rest: bytes) -> None:
        """101 from upstream: from now on both sides are a byte tunnel."""
        self.connection.start_tunnel(self)
        if rest:
            self.upstream_data(rest)

    def upstream_reset(self, reason: str) -> None:
        reused = self.conn is not None and self.conn.requests > 1
        self._end_attempt()
        if self.done:
            return
        if self.response_started:
            self.response_flags = "UC"
            self.connection.abort()
            self.finish()
            return
        assert self.cluster is not None
        self.cluster.stats.upstream_rq_rx_reset += 1
        replayable = not self.head.has_body or self.body_buffer is not None
        if reused and not self._resent and replayable and self._idempotent():
            # A kept-alive connection the upstream closed while idle: not the request's
            # fault, so it goes once more, on another connection.
            self._resent = True
            self._attempt()
            return
        self._report_failure("reset")  # after the stale re-send: that was not the host's fault
        if self._maybe_retry(_RESET_CONDITIONS):
            return
        self._reset_reply(reason, "", "UC")

    def _idempotent(self) -> bool:
        return self.head.method in (b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE")

    def upstream_pause(self) -> None:
        self.connection.pause_reading_for_upstream()

    def cork(self) -> None:
        self.connection.cork()

    def uncork(self) -> None:
        self.connection.uncork()

    def upstream_resume(self) -> None:
        self.connection.resume_reading_for_upstream()

    # local replies and completion --------------------------------------------------------------

    def _redirect(self, redirect: Redirect) -> None:
        scheme = redirect.scheme or "http"
        host = (
            redirect.host or self.authority.rsplit(":", 1)[0]
            if redirect.port
            else (redirect.host or self.authority)
        )
        if redirect.port:
            host = f"{host}:{redirect.port}"
        path = self.path
        bare, sep, query = path.partition("?")
        if redirect.path is not None:
            bare = redirect.path
        elif redirect.prefix_rewrite is not None and self.compiled is not None:
            bare = redirect.prefix_rewrite + bare[len(self.compiled.route.match.value) :]
        if redirect.strip_query or not sep:
            location = f"{scheme}://{host}{bare}"
        else:
            location = f"{scheme}://{host}{bare}?{query}"
        self.local_reply(
            redirect.status, b"", "-", "direct_response", extra=[(b"location", location.encode())]
        )

    def local_reply(
        self,
        status: int,
        body: bytes,
        flags: str,
        details: str,
        *,
        close: bool = False,
        overloaded: bool = False,
        content_type: bytes = b"text/plain",
        extra: Headers | None = None,
    ) -> None:
        """Envoy-style locally generated response (no route, no upstream, timeout...)."""
        if self.done:
            return
        self.response_flags = flags
        self.response_code_details = details
        connection = self.connection
        if self.response_started:
            connection.abort()
            self.finish()
            return
        self.reset_upstream()
        self.status = status
        self.response_started = True
        headers: Headers = list(extra) if extra else []
        if body:
            headers.append((b"content-type", content_type))
        if overloaded:
            headers.append((b"x-envoy-overloaded", b"true"))
        istio = connection.ctx.istio
        if istio is not None and istio.response_value and self.peer:
            headers.append((PEER_HEADER, istio.response_value))
        if self.response_plan is not None:
            headers = self.response_plan.apply(headers)
        if not no_body_status(status):  # RFC 9110: never on 1xx and 204 (Envoy omits it)
            headers.append((b"content-length", b"%d" % len(body)))
        headers.append((b"date", _DATE.refresh().value))
        headers.append((b"server", connection.ctx.server_name))
        # A body still on its way (or an upgrade's bytes) would be read as the next
        # request: close. A request without a body is complete even before its END event
        # (Envoy keeps those connections alive).
        unread = not self.request_complete and (self.head.has_body or bool(self.head.upgrade))
        if close or unread or connection.must_close(self.head):
            connection.closing = True
            headers.append((b"connection", b"close"))
        self.response_headers = headers
        lines = [status_line(status)]
        lines.extend(b"%s: %s\r\n" % pair for pair in headers)
        lines.append(b"\r\n")
        if self.head.method != b"HEAD" and not no_body_status(status):
            lines.append(body)
            self.bytes_sent = len(body)
        connection.write(b"".join(lines))
        self.response_complete = True
        self.finish()

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        connection = self.connection
        if self._retry_timer is not None:
            self.reset_upstream()
        if self.pending or self._racer is not None:
            self.reset_upstream()
        self._release_retry()
        if self._per_try_timer is not None:
            self._per_try_timer.cancel()
            self._per_try_timer = None
        self.duration = connection.loop.time() - self.start
        ctx = connection.ctx
        stats = ctx.stats
        stats.downstream_rq_active -= 1
        status = self.status
        stats.count_status(status)
        stats.downstream_rq_time.record(self.duration * 1000.0)
        cluster = self.cluster
        if cluster is not None:
            cluster.rq_active -= 1
            if status:
                codes = cluster.stats.codes
                codes[status] = codes.get(status, 0) + 1
            route_stats = self.route_stats
            if route_stats is not None:
                # the answering try's time to the end of its response, when it ended well
                upstream_ms = -1.0
                if self.upstream_ms >= 0 and self.response_complete:
                    upstream_ms = (connection.loop.time() - self.attempt_start) * 1000.0
                route_stats.record(status, upstream_ms)
        if self._on_finish is not None or self._breakers is not None:
            # local failures are 5xx replies too; flags such as DI (delayed) are no failure
            ok = 0 < status < 500
            for callback in self._on_finish or ():
                callback(self.duration, ok)
            for breaker in self._breakers or ():
                if status:
                    breaker.record(connection.loop.time(), ok, self.duration)
                else:
                    breaker.release()  # the client left before an answer: no verdict
        istio = ctx.istio
        if istio is not None:
            key = (self.peer, self.upstream_cluster, self.head.host, status, self.response_flags)
            istio.record(key, self.duration, self.bytes_received, self.bytes_sent)
        span = self.span
        if span is not None and span.sampled and ctx.tracer is not None:
            ctx.tracer.finish(span, self, self.head.host.decode("latin-1"))
        for access_log in ctx.access_logs:
            access_log(self)
        connection.exchange_done(self)


class HttpConnection(asyncio.Protocol):
    """One downstream HTTP/1.1 connection: keep-alive, pipelining, tunnels, drain."""

    __slots__ = (
        "_corked",
        "_deadline_at",
        "_deadline_timer",
        "_deferred_error",
        "_head_timer",
        "_idle_timer",
        "_out",
        "_paused_for_pipeline",
        "_paused_for_upstream",
        "active",
        "closing",
        "ctx",
        "decoder",
        "id",
        "last_activity",
        "local",
        "loop",
        "paused_writing",
        "queue",
        "receiving",
        "remote",
        "remote_ip",
        "served",
        "transport",
        "tunnel",
    )

    def __init__(self, ctx: HttpListenerContext) -> None:
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        self.decoder = RequestDecoder(ctx.config.max_request_headers_kb * 1024)
        self.transport: asyncio.Transport | None = None
        self.id = next(_connection_ids)
        self.active: Exchange | None = None
        self.receiving: Exchange | None = None
        self.queue: deque[Exchange] = deque()
        self.closing = False
        self.tunnel: Exchange | None = None
        self.remote = self.local = self.remote_ip = ""
        self._paused_for_pipeline = False
        self._paused_for_upstream = False
        self.paused_writing = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self.last_activity = 0.0
        self.served = False  # has finished a request: an idle drain may close it
        self._corked = 0
        self._out: list[bytes] = []
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._deadline_at = 0.0
        self._deferred_error: RemoteProtocolError | None = None

    # asyncio callbacks -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        ctx = self.ctx
        ctx.connections.add(self)
        ctx.stats.downstream_cx_total += 1
        ctx.stats.downstream_cx_active += 1
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if peer:
            self.remote_ip = str(peer[0])
            self.remote = _format_address(peer)
        if local:
            self.local = _format_address(local)
        transport.set_write_buffer_limits(high=HIGH_WATERMARK)
        idle = ctx.config.idle_timeout
        if idle:
            self.last_activity = self.loop.time()
            self._idle_timer = self.loop.call_later(idle, self._check_idle)

    def data_received(self, data: bytes) -> None:
        self.ctx.stats.downstream_cx_rx_bytes_total += len(data)
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.bytes_received += len(data)
            if tunnel.conn is not None:
                tunnel.conn.write(data)
            return
        if self._deferred_error is not None:
            return  # the stream broke: only the requests before the break are answered
        error: RemoteProtocolError | None = None
        try:
            events = self.decoder.feed(data)
        except RemoteProtocolError as exc:
            # requests complete before the bad bytes are still served, in order
            events, error = self.decoder.completed_before_error, exc
        self._corked += 1
        try:
            self._handle(events)
        finally:
            self.uncork()
        if error is not None:
            self._protocol_error(error)

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            if event.__class__ is bytes:
                receiving = self.receiving
                if receiving is not None:
                    receiving.request_data(event)
                    if receiving is not self.active and not self._paused_for_pipeline:
                        # a queued request's body waits in memory: read no more of it
                        # until its turn comes (exchange_done resumes)
                        self._paused_for_pipeline = True
                        self._pause_reading()
            elif event is END:
                receiving = self.receiving
                if receiving is not None:
                    self.receiving = None
                    receiving.request_end()
            elif event.__class__ is RequestHead:
                self._cancel_head_timer()
                exchange = Exchange(self, event)
                self.receiving = exchange
                if self.active is None and not self.closing:
                    self.active = exchange
                    exchange.begin()
                else:
                    self.queue.append(exchange)
                    if len(self.queue) > 8 and not self._paused_for_pipeline:
                        self._paused_for_pipeline = True
                        self._pause_reading()
            elif isinstance(event, Upgrade):
                receiving = self.receiving or self.active
                if receiving is not None and receiving.tunnel:
                    receiving.request_complete = True
                    if event.rest:
                        receiving.request_data_raw(event.rest)
        if self.decoder.in_head and self._head_timer is None:
            timeout = self.ctx.config.request_headers_timeout
            if timeout:
                self._head_timer = self.loop.call_later(timeout, self._on_head_timeout)

    def eof_received(self) -> bool | None:
        tunnel = self.tunnel
        if tunnel is not None and tunnel.conn is not None:
            tunnel.conn.write_eof()
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        ctx = self.ctx
        ctx.connections.discard(self)
        ctx.stats.downstream_cx_active -= 1
        self._cancel_head_timer()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self.closing = True
        for exchange in (self.active, self.receiving, *self.queue):
            if exchange is not None and not exchange.done:
                if exchange.tunnel and exchange.status == 101:
                    exchange.reset_upstream()
                    exchange.finish()
                    continue
                exchange.reset_upstream()
                exchange.response_flags = "DC"
                exchange.finish()
        self.queue.clear()

    def pause_writing(self) -> None:
        self.paused_writing = True
        active = self.active
        if active is not None and active.conn is not None:
            active.conn.pause_reading()

    def resume_writing(self) -> None:
        self.paused_writing = False
        active = self.active
        if active is not None and active.conn is not None:
            active.conn.resume_reading()

    # used by exchanges ----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self.ctx.stats.downstream_cx_tx_bytes_total += len(data)
        if self._corked:
            self._out.append(data)
        else:
            assert self.transport is not None
            self.transport.write(data)

    def cork(self) -> None:
        """Hold writes until ``uncork``: a response head and body leave in one send."""
        self._corked += 1

    def uncork(self) -> None:
        self._corked -= 1
        if not self._corked and self._out:
            self._flush()

    def _flush(self) -> None:
        out = self._out
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _close(self) -> None:
        """Close after what is buffered (corked or in the transport) has been sent."""
        self.closing = True
        if self._out:
            self._flush()
        if self.transport is not None:
            self.transport.close()

    def must_close(self, head: RequestHead) -> bool:
        return self.closing or not head.keep_alive or self.ctx.draining

    def start_tunnel(self, exchange: Exchange) -> None:
        self.tunnel = exchange
        exchange.tunnel = True

    def pause_reading_for_upstream(self) -> None:
        if not self._paused_for_upstream:
            self._paused_for_upstream = True
            self._pause_reading()

    def resume_reading_for_upstream(self) -> None:
        if self._paused_for_upstream:
            self._paused_for_upstream = False
            self._resume_reading()

    def _pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if (
            self.transport is not None
            and not self._paused_for_upstream
            and not self._paused_for_pipeline
            and not self.transport.is_closing()
        ):
            self.transport.resume_reading()

    def exchange_done(self, exchange: Exchange) -> None:
        if exchange is not self.active:
            return
        self.active = None
        self.served = True
        self.last_activity = self.loop.time()
        if self.closing or self.transport is None:
            self.queue.clear()
            self._close()
            return
        if self.tunnel is exchange:
            self.tunnel = None
        if self._paused_for_upstream:
            self.resume_reading_for_upstream()
        queue = self.queue
        while queue and self.active is None and not self.closing:
            self.active = queue.popleft()
            self.active.begin()
        if self.active is None and self._deferred_error is not None:
            error, self._deferred_error = self._deferred_error, None
            self._protocol_error(error)  # every request before it is answered: now this
            return
        if self._paused_for_pipeline and len(queue) <= 1:
            self._paused_for_pipeline = False
            self._resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.closing = True
            self.transport.abort()

    def drain(self) -> None:
        """Stop keep-alive: close now if idle, else after the current response.

        A connection that has not finished a request yet is not idle: its client may have
        sent (or be sending) its first request, which closing would reset. It gets the
        connection manager's ``drain_timeout`` to do so; the response says ``close``."""
        if self.active is not None or self.receiving is not None or self.decoder.in_head:
            return
        if self.served:
            self._close()
        elif not self.closing:
            self.loop.call_later(self.ctx.config.drain_timeout, self._drain_unused)

    def _drain_unused(self) -> None:
        if self.active is None and self.receiving is None and not self.served:
            self._close()

    # errors and timers -------------------------------------------------------------------------

    def _protocol_error(self, exc: RemoteProtocolError) -> None:
        if self.receiving is None and self.active is not None:
            # The bad bytes begin a new request; the ones before it are complete and are
            # answered first (exchange_done then answers this error and closes). After a
            # request that said Connection: close, the rest is ignored.
            if not self.closing:
                self._deferred_error = exc
                self._pause_reading()
            return
        self.ctx.stats.downstream_cx_protocol_error += 1
        self.closing = True
        log.debug("downstream protocol error from %s: %s", self.remote, exc)
        target = self.receiving if self.receiving is not None else self.active
        if target is not None and not target.response_started:
            target.local_reply(exc.status, str(exc).encode(), "DPE", "codec_error", close=True)
            self.abort_after_write()
            return
        if target is None or target.done:
            self._reply_without_exchange(exc.status, str(exc).encode())
        else:
            self.abort()

    def _reply_without_exchange(self, status: int, body: bytes) -> None:
        """A request too broken to become an exchange still gets a proper answer."""
        head = RequestHead()
        head.method = b"GET"
        exchange = Exchange(self, head)
        self.ctx.stats.downstream_rq_total += 1
        self.ctx.stats.downstream_rq_active += 1
        self.active = exchange
        exchange.local_reply(status, body, "DPE", "codec_error", close=True)
        self.abort_after_write()

    def abort_after_write(self) -> None:
        """Close once the error response is flushed; stop reading what can't be trusted."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
            self._close()

    def _on_head_timeout(self) -> None:
        self._head_timer = None
        if self.decoder.in_head and self.active is None:
            self.ctx.stats.downstream_rq_header_timeout += 1
            self._reply_without_exchange(408, b"request header timeout")

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def arm_deadline(self, deadline: float) -> None:
        """One lazy timer per connection serves every exchange's timeouts: it is only
        re-armed when it would fire too late, so a fast request costs no timer at all."""
        if self._deadline_timer is None or deadline < self._deadline_at:
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
            self._deadline_at = deadline
            self._deadline_timer = self.loop.call_at(deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self._deadline_timer = None
        active = self.active
        if active is None or active.done:
            return
        next_at = active.check_timers(self.loop.time())
        if next_at:
            self.arm_deadline(next_at)

    def _check_idle(self) -> None:
        idle = self.ctx.config.idle_timeout
        assert idle
        self._idle_timer = None
        if self.active is None and self.receiving is None and self.tunnel is None:
            remaining = self.last_activity + idle - self.loop.time()
            if remaining <= 0:
                self.ctx.stats.downstream_cx_idle_timeout += 1
                self._close()
                return
            self._idle_timer = self.loop.call_later(remaining, self._check_idle)
        else:
            self._idle_timer = self.loop.call_later(idle, self._check_idle)


def _format_address(address: tuple[object, ...] | str) -> str:
    if isinstance(address, str):
        return address
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
