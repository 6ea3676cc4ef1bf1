"""Shoal's runtime configuration: frozen dataclasses the proxy runs on.

Built from Envoy v3 protos by :mod:`shoal.config.envoy` (static bootstrap and xDS share
that one path). Everything here is already validated and compiled (regexes compiled,
durations in seconds, names lower-cased) so the hot path never re-parses anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from shoal.config.filters import FilterConfig, HttpFilter, TokenBucket

Seconds = float


@dataclass(frozen=True, slots=True)
class SocketAddress:
    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


# --- matching -------------------------------------------------------------------------

StringMatchKind = Literal["exact", "prefix", "suffix", "contains", "regex", "present"]


@dataclass(frozen=True, slots=True)
class StringMatch:
    """One string test; ``regex`` is compiled once (full match, as Envoy's safe_regex)."""

    kind: StringMatchKind
    value: str = ""
    ignore_case: bool = False
    regex: re.Pattern[str] | None = None

    def matches(self, candidate: str) -> bool:
        kind = self.kind
        if kind == "present":
            return True
        if kind == "regex":
            assert self.regex is not None
            return self.regex.fullmatch(candidate) is not None
        value = self.value
        if self.ignore_case:
            candidate = candidate.lower()
            value = value.lower()
        if kind == "exact":
            return candidate == value
        if kind == "prefix":
            return candidate.startswith(value)
        if kind == "suffix":
            return candidate.endswith(value)
        return value in candidate


@dataclass(frozen=True, slots=True)
class HeaderMatcher:
    """Envoy HeaderMatcher: ``name`` lower-cased; ``match`` None means present_match."""

    name: str
    match: StringMatch
    invert: bool = False
    present: bool = True  # for present_match: false means "must be absent"

    def test(self, value: str | None) -> bool:
        """Whether a header with ``value`` (None: absent) matches, as Envoy decides."""
        if self.match.kind == "present":
            result = (value is not None) == self.present
        elif value is None:
            return False  # a missing header fails a value match, inverted or not
        else:
            result = self.match.matches(value)
        return result != self.invert


@dataclass(frozen=True, slots=True)
class QueryParameterMatcher:
    name: str
    match: StringMatch  # kind "present" for present_match


PathMatchKind = Literal["prefix", "path", "regex"]
CodecType = Literal["auto", "http1", "http2"]


@dataclass(frozen=True, slots=True)
class RouteMatch:
    kind: PathMatchKind
    value: str = ""
    regex: re.Pattern[str] | None = None
    case_sensitive: bool = True
    headers: tuple[HeaderMatcher, ...] = ()
    query_parameters: tuple[QueryParameterMatcher, ...] = ()


# --- route actions ----------------------------------------------------------------------

AppendAction = Literal[
    "append_if_exists_or_add", "add_if_absent", "overwrite_if_exists_or_add", "overwrite_if_exists"
]


@dataclass(frozen=True, slots=True)
class HeaderValueOption:
    """A header to add; ``key`` lower-cased."""

    key: str
    value: str
    action: AppendAction = "append_if_exists_or_add"


@dataclass(frozen=True, slots=True)
class HeaderMutations:
    request_add: tuple[HeaderValueOption, ...] = ()
    request_remove: frozenset[str] = frozenset()
    response_add: tuple[HeaderValueOption, ...] = ()
    response_remove: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(
            self.request_add or self.request_remove or self.response_add or self.response_remove
        )


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    name: str
    weight: int
    headers: HeaderMutations = HeaderMutations()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Envoy retry policy. ``retry_on`` holds Envoy's condition names."""

    retry_on: frozenset[str]
    num_retries: int = 1
    per_try_timeout: Seconds | None = None
    retriable_status_codes: frozenset[int] = frozenset()
    base_interval: Seconds = 0.025
    max_interval: Seconds = 0.25
    retry_other_host: bool = False  # retry_host_predicate: previous_hosts
    host_selection_retry_max_attempts: int = 1


HashPolicyKind = Literal["header", "cookie", "source_ip", "query_parameter"]


@dataclass(frozen=True, slots=True)
class HashPolicy:
    kind: HashPolicyKind
    name: str = ""  # header name (lower-cased), cookie or query parameter name
    terminal: bool = False
    # cookie only: with a ttl (whole seconds; 0 sends no Max-Age), a request without the
    # cookie gets a generated value and the response sets it, as Envoy does
    ttl: int | None = None
    path: str = ""  # the generated cookie's Path ("" sends none)


@dataclass(frozen=True, slots=True)
class RequestMirrorPolicy:
    """``RouteAction.request_mirror_policies[]``: a ``fraction`` (0..1) of the route's
    requests is copied to ``cluster``, fire and forget."""

    cluster: str
    fraction: float = 1.0


@dataclass(frozen=True, slots=True)
class RouteAction:
    cluster: str = ""
    weighted_clusters: tuple[WeightedCluster, ...] = ()
    total_weight: int = 0
    prefix_rewrite: str | None = None
    regex_rewrite: tuple[re.Pattern[str], str] | None = None
    host_rewrite_literal: str | None = None
    auto_host_rewrite: bool = False
    timeout: Seconds = 15.0  # 0 disables
    idle_timeout: Seconds | None = None
    max_stream_duration: Seconds | None = None
    retry_policy: RetryPolicy | None = None
    hash_policy: tuple[HashPolicy, ...] = ()
    request_mirror_policies: tuple[RequestMirrorPolicy, ...] = ()
    # hedge_policy.hedge_on_per_try_timeout: a per-try timeout starts another try without
    # abandoning the first; the first answer wins
    hedge_on_per_try_timeout: bool = False


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Redirect:
    scheme: str | None = None
    host: str | None = None
    port: int | None = None
    path: str | None = None
    prefix_rewrite: str | None = None
    status: int = 301
    strip_query: bool = False


# --- error-rate circuit breaker (Shoal's own: metadata "shoal.circuit_breaker") --------------

BreakerWindow = Literal["count", "time"]


@dataclass(frozen=True, slots=True)
class BreakerLocalReply:
    """The answer to a request the breaker refuses; header names lower-cased."""

    status: int = 503
    body: bytes = b"circuit breaker open"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class CircuitBreakerPolicy:
    """An error-rate / slow-call breaker (``shoal.upstream.breaker``), from a cluster's or a
    route's ``metadata.filter_metadata["shoal.circuit_breaker"]``.

    The window is the last ``window_size`` requests (``"count"``) or the last
    ``window_duration`` in ``window_buckets`` buckets (``"time"``). Slow calls count only
    when ``slow_call_duration`` is set and ``slow_call_ratio`` is below 1. While open, a
    request gets ``local_reply``, or goes to ``fallback_cluster`` when that is set.
    """

    window: BreakerWindow = "count"
    window_size: int = 100
    window_duration: Seconds = 10.0
    window_buckets: int = 10
    minimum_requests: int = 20
    error_ratio: float = 0.5
    slow_call_duration: Seconds | None = None
    slow_call_ratio: float = 1.0
    open_duration: Seconds = 5.0
    half_open_trials: int = 3
    local_reply: BreakerLocalReply = BreakerLocalReply()
    fallback_cluster: str = ""  # "": answer with local_reply


@dataclass(frozen=True, slots=True)
class BackupRequestPolicy:
    """Motan-style backup requests on a route (``shoal.upstream.backup``), from the route's
    ``metadata.filter_metadata["shoal.backup_request"]``: a request still unanswered after
    the ``percentile`` of the route's last ``window`` latencies (clamped to
    [``min_delay``, ``max_delay``]; ``max_delay`` until ``minimum_samples`` are known) gets
    one more try on another host, for at most ``max_ratio`` of the requests.
    """

    percentile: float = 90.0
    max_ratio: float = 0.1
    min_delay: Seconds = 0.005
    max_delay: Seconds = 1.0
    window: int = 1000
    minimum_samples: int = 100


@dataclass(frozen=True, slots=True)
class Route:
    """Exactly one of ``action``, ``direct_response`` and ``redirect`` is set."""

    match: RouteMatch
    name: str = ""
    action: RouteAction | None = None
    direct_response: DirectResponse | None = None
    redirect: Redirect | None = None
    headers: HeaderMutations = HeaderMutations()
    # typed_per_filter_config: filter name → that filter's per-route config
    per_filter: tuple[tuple[str, FilterConfig], ...] = ()
    breaker: CircuitBreakerPolicy | None = None  # route-level error-rate breaker
    backup: BackupRequestPolicy | None = None  # backup requests after a latency percentile
    # per-route stats, vhost.<virtual host>.route.<stat_prefix>.*; "" for none
    stat_prefix: str = ""


@dataclass(frozen=True, slots=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...]  # lower-cased, as configured (wildcards "*", "*.x", "x.*")
    routes: tuple[Route, ...]
    headers: HeaderMutations = HeaderMutations()
    retry_policy: RetryPolicy | None = None
    hash_policy: tuple[HashPolicy, ...] = ()
    hedge_on_per_try_timeout: bool = False
    per_filter: tuple[tuple[str, FilterConfig], ...] = ()


@dataclass(frozen=True, slots=True)
class RouteConfiguration:
    name: str
    virtual_hosts: tuple[VirtualHost, ...]
    headers: HeaderMutations = HeaderMutations()


# --- telemetry ---------------------------------------------------------------------------

Reporter = Literal["source", "destination"]


@dataclass(frozen=True, slots=True)
class IstioStats:
    """Shoal's ``istio_stats`` filter: Istio's standard metrics for this listener, reported
    as the calling side (``source``, outbound) or the called side (``destination``)."""

    reporter: Reporter


@dataclass(frozen=True, slots=True)
class CustomTag:
    """A span tag: a literal ``value``, or the request header ``header`` (lower-cased) with
    ``value`` as its default (no tag when both are empty)."""

    tag: str
    value: str = ""
    header: str = ""


@dataclass(frozen=True, slots=True)
class ZipkinTracer:
    """``envoy.tracers.zipkin``: Zipkin v2 JSON over HTTP, B3 propagation (and W3C with
    ``w3c``: Envoy's ``USE_B3_WITH_W3C_PROPAGATION``)."""

    cluster: str
    endpoint: str
    hostname: str = ""  # the collector requests' Host; "" means the cluster's name
    trace_id_128bit: bool = False
    shared_span_context: bool = True
    w3c: bool = False


@dataclass(frozen=True, slots=True)
class OpenTelemetryTracer:
    """``envoy.tracers.opentelemetry``: OTLP over gRPC (``path`` empty) or HTTP/protobuf
    (POST to ``path``), W3C propagation."""

    cluster: str
    service_name: str = "unknown_service:envoy"
    path: str = ""
    authority: str = ""  # OTLP/HTTP's Host; "" means the cluster's name
    timeout: Seconds = 5.0


@dataclass(frozen=True, slots=True)
class Tracing:
    """The connection manager's ``tracing``; sampling shares are 0..1."""

    provider: ZipkinTracer | OpenTelemetryTracer
    client_sampling: float = 1.0
    random_sampling: float = 1.0
    overall_sampling: float = 1.0
    custom_tags: tuple[CustomTag, ...] = ()
    max_path_tag_length: int = 256


# --- listeners ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccessLog:
    """File access log; ``text_format`` uses Envoy's command operators, ``json_format`` maps
    keys to format strings; neither set means Envoy's default text format."""

    path: str
    text_format: str | None = None
    json_format: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True, slots=True)
class Keepalive:
    """HTTP/2 PING keepalive (Envoy's ``connection_keepalive``): a PING every ``interval``;
    a connection whose peer does not answer one within ``timeout`` is closed."""

    interval: Seconds
    timeout: Seconds


@dataclass(frozen=True, slots=True)
class HttpConnectionManager:
    stat_prefix: str
    route_config: RouteConfiguration
    access_logs: tuple[AccessLog, ...] = ()
    idle_timeout: Seconds | None = 3600.0
    request_timeout: Seconds | None = None
    request_headers_timeout: Seconds | None = None
    stream_idle_timeout: Seconds | None = 300.0
    max_stream_duration: Seconds | None = None
    max_request_headers_kb: int = 60
    max_request_bytes: int | None = None  # from envoy.filters.http.buffer; 413 beyond
    use_remote_address: bool = False
    xff_num_trusted_hops: int = 0
    skip_xff_append: bool = False
    generate_request_id: bool = True
    server_name: str = "envoy"
    strip_matching_host_port: bool = False
    upgrade_types: frozenset[str] = frozenset()  # lower-cased, e.g. {"websocket"}
    drain_timeout: Seconds = 5.0
    http_filters: tuple[HttpFilter, ...] = ()  # before the router, in order
    istio_stats: IstioStats | None = None
    tracing: Tracing | None = None
    # "auto": HTTP/2 for a connection that opens with the h2 preface, else HTTP/1.1
    codec_type: CodecType = "auto"
    keepalive: Keepalive | None = None  # http2_protocol_options.connection_keepalive


@dataclass(frozen=True, slots=True)
class TcpProxy:
    stat_prefix: str
    cluster: str = ""
    weighted_clusters: tuple[WeightedCluster, ...] = ()
    idle_timeout: Seconds | None = 3600.0
    access_logs: tuple[AccessLog, ...] = ()
    max_connect_attempts: int = 1
    istio_stats: IstioStats | None = None


RpcInput = Literal["service", "method", "property"]


@dataclass(frozen=True, slots=True)
class RpcCondition:
    """One test on a request: its service (Envoy's host/path/service inputs), its method, or
    a property (``version``, ``group``, or an attachment/header by name; an absent property
    never matches)."""

    input: RpcInput
    match: StringMatch
    property: str = ""


@dataclass(frozen=True, slots=True)
class RpcRetryPolicy:
    """Retries of an RPC route; ``retry_on`` ⊆ {connect-failure, reset}. Configure it only
    on routes whose methods are idempotent: the proxy cannot tell."""

    retry_on: frozenset[str]
    num_retries: int = 1


@dataclass(frozen=True, slots=True)
class RpcRoute:
    """A generic proxy route: all ``conditions`` hold → ``cluster`` or ``weighted_clusters``.
    ``timeout`` caps the protocol's own per-request timeout; ``rate_limit`` is a token bucket
    for this route alone (per method, when the route matches one method)."""

    conditions: tuple[RpcCondition, ...]
    name: str = ""
    cluster: str = ""
    weighted_clusters: tuple[WeightedCluster, ...] = ()
    timeout: Seconds | None = None
    retry_policy: RpcRetryPolicy | None = None
    breaker: CircuitBreakerPolicy | None = None
    rate_limit: TokenBucket | None = None


@dataclass(frozen=True, slots=True)
class RpcVirtualHost:
    """Routes for the services named in ``hosts`` (exact names, or ``*`` for any)."""

    name: str
    hosts: tuple[str, ...]
    routes: tuple[RpcRoute, ...]


@dataclass(frozen=True, slots=True)
class RpcProxy:
    """Envoy's ``generic_proxy`` network filter with one of Shoal's RPC codecs."""

    stat_prefix: str
    protocol: str  # a name in shoal.codec.rpc.registry
    virtual_hosts: tuple[RpcVirtualHost, ...]
    routes: tuple[RpcRoute, ...] = ()  # for requests no virtual host names
    access_logs: tuple[AccessLog, ...] = ()
    max_frame_bytes: int = 8 * 1024 * 1024
    istio_stats: IstioStats | None = None


NetworkFilter = HttpConnectionManager | TcpProxy | RpcProxy


TrafficDirection = Literal["unspecified", "inbound", "outbound"]


# --- TLS ----------------------------------------------------------------------------------------

TlsVersion = Literal["1.0", "1.1", "1.2", "1.3"]
SanType = Literal["dns", "uri", "ip_address", "email"]


@dataclass(frozen=True, slots=True)
class TlsCertificate:
    """A certificate chain and its private key, PEM, as read from the config (files are
    read when the config is loaded, so a changed file is a changed config)."""

    certificate_chain: bytes
    private_key: bytes


@dataclass(frozen=True, slots=True)
class SanMatcher:
    """``match_typed_subject_alt_names[]``: a peer certificate SAN of ``san_type`` that
    ``match`` accepts (an exact DNS match honours a ``*.`` wildcard in the certificate)."""

    san_type: SanType
    match: StringMatch


@dataclass(frozen=True, slots=True)
class TlsContext:
    """Envoy's ``DownstreamTlsContext`` / ``UpstreamTlsContext`` (``envoy.transport_sockets.
    tls``): ``common_tls_context`` plus each side's own field. With ``trusted_ca`` the peer's
    certificate is verified against it (a server asks for a client certificate and, with
    ``require_client_certificate``, insists on one); without it an upstream's certificate is
    not verified, as in Envoy. ``alpn_protocols`` empty on a cluster means ``h2`` for an
    HTTP/2 cluster and ``http/1.1`` otherwise."""

    certificates: tuple[TlsCertificate, ...] = ()
    alpn_protocols: tuple[str, ...] = ()
    trusted_ca: bytes = b""
    subject_alt_names: tuple[SanMatcher, ...] = ()
    min_version: TlsVersion = "1.2"
    max_version: TlsVersion = "1.3"
    require_client_certificate: bool = False  # downstream only
    sni: str = ""  # upstream only: the server name sent ("" sends none)


@dataclass(frozen=True, slots=True)
class ServerNameChain:
    """A TLS filter chain picked by the client's SNI (``filter_chain_match.server_names``:
    exact names, or ``*.example.com`` for any name below it), lower-cased."""

    server_names: tuple[str, ...]
    filter: NetworkFilter
    tls: TlsContext


@dataclass(frozen=True, slots=True)
class ProtocolChain:
    """A filter chain picked by the protocol a connection's first bytes show
    (``filter_chain_match.application_protocols``)."""

    application_protocols: frozenset[str]
    filter: NetworkFilter


@dataclass(frozen=True, slots=True)
class Listener:
    """``filter`` is the chain without ``application_protocols`` / ``server_names`` (or the
    only chain); ``protocol_chains`` are chosen by Shoal's protocol inspector and
    ``server_name_chains`` by the TLS client's SNI."""

    name: str
    address: SocketAddress
    filter: NetworkFilter
    per_connection_buffer_limit_bytes: int = 1024 * 1024
    protocol_chains: tuple[ProtocolChain, ...] = ()
    # Envoy's traffic_direction: tracing names outbound spans egress (CLIENT), others
    # ingress (SERVER)
    traffic_direction: TrafficDirection = "unspecified"
    # TLS termination (every chain of a TLS listener terminates TLS): ``tls`` is the
    # default chain's (``filter``); ``server_name_chains`` are chosen by SNI
    tls: TlsContext | None = None
    server_name_chains: tuple[ServerNameChain, ...] = ()


# --- clusters --------------------------------------------------------------------------------


class LbPolicy(Enum):
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"
    RANDOM = "RANDOM"
    RING_HASH = "RING_HASH"
    MAGLEV = "MAGLEV"


DnsLookupFamily = Literal["auto", "v4_only", "v6_only", "v4_preferred", "all"]


class DiscoveryType(Enum):
    STATIC = "STATIC"
    STRICT_DNS = "STRICT_DNS"
    LOGICAL_DNS = "LOGICAL_DNS"
    EDS = "EDS"


@dataclass(frozen=True, slots=True)
class Locality:
    region: str = ""
    zone: str = ""
    sub_zone: str = ""


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: SocketAddress
    weight: int = 1
    priority: int = 0
    locality: Locality = Locality()
    locality_weight: int = 0  # 0: not set
    healthy: bool = True  # health_status from load_assignment (UNHEALTHY/DRAINING → False)
    hostname: str = ""


@dataclass(frozen=True, slots=True)
class CircuitBreakerThresholds:
    """Envoy defaults."""

    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3
    # retry_budget (replaces max_retries when set): retries may be this share of the
    # active and pending requests, but at least min_retry_concurrency
    retry_budget: float | None = None
    min_retry_concurrency: int = 3


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """Envoy's passive health checking (``Cluster.outlier_detection``), Envoy's defaults.

    Thresholds are counts; ``enforcing_*`` are the percent chance that a detected outlier is
    really ejected; ``success_rate_stdev_factor`` is in thousandths (1900 → 1.9 stdev).
    """

    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    consecutive_local_origin_failure: int = 5
    split_external_local_origin_errors: bool = False
    interval: Seconds = 10.0
    base_ejection_time: Seconds = 30.0
    max_ejection_time: Seconds = 300.0  # Envoy: max(300 s, base_ejection_time) when unset
    max_ejection_time_jitter: Seconds = 0.0
    max_ejection_percent: int = 10
    always_eject_one_host: bool = False
    enforcing_consecutive_5xx: int = 100
    enforcing_consecutive_gateway_failure: int = 0
    enforcing_consecutive_local_origin_failure: int = 100
    enforcing_success_rate: int = 100
    enforcing_local_origin_success_rate: int = 100
    enforcing_failure_percentage: int = 0
    enforcing_failure_percentage_local_origin: int = 0
    success_rate_minimum_hosts: int = 5
    success_rate_request_volume: int = 100
    success_rate_stdev_factor: int = 1900
    failure_percentage_threshold: int = 85
    failure_percentage_minimum_hosts: int = 5
    failure_percentage_request_volume: int = 50
    successful_active_health_check_uneject_host: bool = True


StatusRange = tuple[int, int]  # [start, end), as Envoy's Int64Range
DEFAULT_EXPECTED_STATUSES: tuple[StatusRange, ...] = ((200, 201),)  # Envoy: 200 only


@dataclass(frozen=True, slots=True)
class HttpHealthCheck:
    """An HTTP/1.1 health check request; ``host`` empty means the cluster's name (Envoy)."""

    path: str
    host: str = ""
    method: str = "GET"
    expected_statuses: tuple[StatusRange, ...] = DEFAULT_EXPECTED_STATUSES
    retriable_statuses: tuple[StatusRange, ...] = ()
    request_headers_to_add: tuple[HeaderValueOption, ...] = ()
    request_headers_to_remove: frozenset[str] = frozenset()

    def expected(self, status: int) -> bool:
        return any(start <= status < end for start, end in self.expected_statuses)

    def retriable(self, status: int) -> bool:
        return any(start <= status < end for start, end in self.retriable_statuses)


@dataclass(frozen=True, slots=True)
class TcpHealthCheck:
    """Connect, write ``send`` (if any), then find each ``receive`` block in order."""

    send: bytes = b""
    receive: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class GrpcHealthCheck:
    """``grpc.health.v1.Health/Check`` for ``service_name`` ("" asks about the whole server);
    ``authority`` empty means the cluster's name (Envoy)."""

    service_name: str = ""
    authority: str = ""
    initial_metadata: tuple[HeaderValueOption, ...] = ()


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Envoy's active health check (``Cluster.health_checks[0]``). An interval given as 0
    (Envoy forbids 0) takes Envoy's default, resolved on construction."""

    timeout: Seconds
    interval: Seconds
    unhealthy_threshold: int
    healthy_threshold: int
    checker: HttpHealthCheck | TcpHealthCheck | GrpcHealthCheck
    initial_jitter: Seconds = 0.0
    interval_jitter: Seconds = 0.0
    interval_jitter_percent: int = 0
    no_traffic_interval: Seconds = 60.0
    no_traffic_healthy_interval: Seconds = 0.0  # 0: no_traffic_interval
    unhealthy_interval: Seconds = 0.0  # 0: interval
    unhealthy_edge_interval: Seconds = 0.0  # 0: unhealthy_interval
    healthy_edge_interval: Seconds = 0.0  # 0: interval
    reuse_connection: bool = True

    def __post_init__(self) -> None:
        defaults = (
            ("no_traffic_healthy_interval", self.no_traffic_interval),
            ("unhealthy_interval", self.interval),
            ("unhealthy_edge_interval", self.unhealthy_interval or self.interval),
            ("healthy_edge_interval", self.interval),
        )
        for name, default in defaults:
            if not getattr(self, name):
                object.__setattr__(self, name, default)


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    type: DiscoveryType = DiscoveryType.STATIC
    endpoints: tuple[Endpoint, ...] = ()
    connect_timeout: Seconds = 5.0
    lb_policy: LbPolicy = LbPolicy.ROUND_ROBIN
    circuit_breakers: CircuitBreakerThresholds = CircuitBreakerThresholds()
    high_priority_breakers: CircuitBreakerThresholds = CircuitBreakerThresholds()
    dns_refresh_rate: Seconds = 5.0
    dns_lookup_family: DnsLookupFamily = "auto"
    ring_hash_min_size: int = 1024
    ring_hash_max_size: int = 8 * 1024 * 1024
    maglev_table_size: int = 65537
    least_request_choice_count: int = 2
    per_connection_buffer_limit_bytes: int = 1024 * 1024
    idle_timeout: Seconds | None = 3600.0  # upstream connection idle timeout
    max_requests_per_connection: int | None = None
    http2: bool = False  # explicit_http_config.http2_protocol_options: HTTP/2 upstream
    downstream_http2: bool = False  # use_downstream_protocol_config: HTTP/2 for HTTP/2 streams
    keepalive: Keepalive | None = None  # http2_protocol_options.connection_keepalive
    overprovisioning_factor: int = 140  # percent, as Envoy's default
    outlier_detection: OutlierDetection | None = None
    health_checks: tuple[HealthCheck, ...] = ()
    breaker: CircuitBreakerPolicy | None = None  # cluster-level error-rate breaker
    eds_service_name: str = ""  # EDS clusters: the ClusterLoadAssignment to follow
    tls: TlsContext | None = None  # transport_socket envoy.transport_sockets.tls


# --- bootstrap ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Admin:
    address: SocketAddress
    access_log_path: str | None = None


@dataclass(frozen=True, slots=True)
class Node:
    id: str = ""
    cluster: str = ""
    metadata: dict[str, object] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True, slots=True)
class AdsSource:
    """``dynamic_resources``: listeners and clusters from a management server over ADS."""

    cluster: str  # the static cluster that reaches the server (HTTP/2, gRPC)
    delta: bool = False  # DELTA_GRPC rather than GRPC (state of the world)
    listeners: bool = True  # lds_config: {ads: {}}
    clusters: bool = True  # cds_config: {ads: {}}
    initial_fetch_timeout: Seconds = 15.0


@dataclass(frozen=True, slots=True)
class Bootstrap:
    listeners: tuple[Listener, ...] = ()
    clusters: tuple[Cluster, ...] = ()
    admin: Admin | None = None
    node: Node = Node()
    ads: AdsSource | None = None
    source: str = ""  # file the config came from, for error messages and config_dump
