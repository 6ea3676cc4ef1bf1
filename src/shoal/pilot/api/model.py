"""Istio ``networking.istio.io`` resources as frozen dataclasses, already validated.

Field names follow Istio's (snake_cased); durations are seconds, percentages 0-100 floats.
Only what the translator uses is modelled; a field Istio has but Shoal does not support is
rejected by the parser with its path, never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from shoal.pilot.model import AppProtocol, Labels

Seconds = float


@dataclass(frozen=True, slots=True)
class Meta:
    name: str
    namespace: str = "default"
    source: str = ""  # "file.yaml" or "file.yaml#2" (the 3rd document), for messages


# --- VirtualService ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: Literal["exact", "prefix", "regex"]
    value: str


@dataclass(frozen=True, slots=True)
class HTTPMatchRequest:
    name: str = ""
    uri: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()  # names lower-cased
    without_headers: tuple[tuple[str, StringMatch], ...] = ()
    query_params: tuple[tuple[str, StringMatch], ...] = ()
    ignore_uri_case: bool = False
    port: int | None = None


@dataclass(frozen=True, slots=True)
class Destination:
    host: str
    subset: str = ""
    port: int | None = None


@dataclass(frozen=True, slots=True)
class HeaderOperations:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Headers:
    request: HeaderOperations = HeaderOperations()
    response: HeaderOperations = HeaderOperations()


@dataclass(frozen=True, slots=True)
class HTTPRouteDestination:
    destination: Destination
    weight: int = 0  # 0 when the route has a single destination and no weight was given
    headers: Headers | None = None


@dataclass(frozen=True, slots=True)
class HTTPRewrite:
    uri: str = ""
    authority: str = ""


@dataclass(frozen=True, slots=True)
class HTTPRetry:
    attempts: int
    per_try_timeout: Seconds | None = None
    retry_on: str = ""  # Envoy retry_on list as written; "" means Istio's default


@dataclass(frozen=True, slots=True)
class FaultDelay:
    fixed_delay: Seconds
    percentage: float = 100.0


@dataclass(frozen=True, slots=True)
class FaultAbort:
    http_status: int
    percentage: float = 100.0


@dataclass(frozen=True, slots=True)
class HTTPFaultInjection:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    name: str = ""
    match: tuple[HTTPMatchRequest, ...] = ()
    route: tuple[HTTPRouteDestination, ...] = ()
    rewrite: HTTPRewrite | None = None
    timeout: Seconds | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    mirror_percentage: float | None = None
    headers: Headers | None = None


@dataclass(frozen=True, slots=True)
class VirtualService:
    meta: Meta
    hosts: tuple[str, ...]
    http: tuple[HTTPRoute, ...] = ()


# --- DestinationRule ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsistentHash:
    http_header_name: str = ""
    http_cookie: str = ""  # cookie name
    http_cookie_ttl: Seconds | None = None
    use_source_ip: bool = False
    http_query_parameter_name: str = ""
    minimum_ring_size: int | None = None


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    simple: Literal["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "PASSTHROUGH", ""] = ""
    consistent_hash: ConsistentHash | None = None


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    max_connections: int | None = None  # tcp.maxConnections
    connect_timeout: Seconds | None = None  # tcp.connectTimeout
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: Seconds | None = None


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx_errors: int | None = None
    consecutive_gateway_errors: int | None = None
    interval: Seconds | None = None
    base_ejection_time: Seconds | None = None
    max_ejection_percent: int | None = None
    min_health_percent: int | None = None


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: Labels
    traffic_policy: TrafficPolicy | None = None


@dataclass(frozen=True, slots=True)
class DestinationRule:
    meta: Meta
    host: str
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()


# --- ServiceEntry / WorkloadEntry ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Port:
    number: int
    name: str
    protocol: AppProtocol = "HTTP"
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class WorkloadEntry:
    """Also the shape of a ServiceEntry's inline ``endpoints``."""

    meta: Meta
    address: str
    ports: tuple[tuple[str, int], ...] = ()  # port name -> endpoint port
    labels: Labels = ()
    weight: int = 1
    locality: str = ""


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    meta: Meta
    hosts: tuple[str, ...]
    ports: tuple[Port, ...]
    resolution: Literal["STATIC", "DNS", "NONE"] = "STATIC"
    endpoints: tuple[WorkloadEntry, ...] = ()
    workload_selector: Labels | None = None  # selects WorkloadEntry by labels


# --- Shoal's own kinds (shoal.io/v1): what Istio has no resource for -----------------------------


@dataclass(frozen=True, slots=True)
class CircuitBreakerPolicy:
    """The error-rate / slow-call breaker with half-open state and fallback for a host (or
    one subset of it). ``settings`` is the validated ``shoal.circuit_breaker`` metadata as
    JSON (what goes on the cluster); a fallback destination becomes its ``cluster``."""

    meta: Meta
    host: str
    settings: str
    subset: str = ""
    fallback: Destination | None = None


@dataclass(frozen=True, slots=True)
class LocalRateLimit:
    """A token bucket per instance, as Envoy's local_ratelimit filter keeps it."""

    max_tokens: int
    tokens_per_fill: int
    fill_interval: Seconds


@dataclass(frozen=True, slots=True)
class GlobalRateLimit:
    """A budget shared by every instance, counted by ``shoal ratelimit`` (Envoy's rate
    limit service protocol) at ``host:port``. ``rate_limits`` is the validated filter-level
    ``rate_limits`` of Envoy's ratelimit filter as JSON (one descriptor per entry)."""

    domain: str
    host: str
    port: int
    rate_limits: str
    timeout: Seconds = 0.02
    failure_mode_deny: bool = False


@dataclass(frozen=True, slots=True)
class BackupRequestPolicy:
    """Backup requests (Motan's backupRequest) on every route to ``host``: ``settings`` is
    the validated ``shoal.backup_request`` route metadata as JSON."""

    meta: Meta
    host: str
    settings: str


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    """What protects every instance of ``host`` from overload, on its sidecar's inbound
    listener: a local token bucket, a global budget, adaptive concurrency (at least one).
    ``adaptive_concurrency`` is the validated Envoy filter config as JSON ("" for none)."""

    meta: Meta
    host: str
    local: LocalRateLimit | None = None
    global_limit: GlobalRateLimit | None = None
    adaptive_concurrency: str = ""
    status: int = 429


@dataclass(frozen=True, slots=True)
class RpcMatch:
    """What an RPC request must carry for a route to take it: every field given matches.
    ``attributes`` are Dubbo attachments, the Bolt header map or Motan2 metadata."""

    method: StringMatch | None = None
    version: StringMatch | None = None
    group: StringMatch | None = None
    attributes: tuple[tuple[str, StringMatch], ...] = ()


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """An error-rate breaker: ``settings`` is the validated ``shoal.circuit_breaker``
    metadata as JSON, without the fallback; ``fallback`` is where an open circuit sends."""

    settings: str
    fallback: Destination | None = None


@dataclass(frozen=True, slots=True)
class RpcRouteRule:
    """One route of an RpcRoute. ``match`` None takes every request; ``retries`` reuses
    Istio's retry shape with ``retry_on`` ⊆ {connect-failure, reset}."""

    name: str
    route: tuple[HTTPRouteDestination, ...]
    match: RpcMatch | None = None
    timeout: Seconds | None = None
    retries: HTTPRetry | None = None
    rate_limit: LocalRateLimit | None = None
    circuit_breaker: BreakerSettings | None = None


@dataclass(frozen=True, slots=True)
class RpcRoute:
    """Routes for RPC services (Dubbo, SOFA Bolt, Motan2) by method, version, group and
    attributes, first match first (Aeraki's MetaRouter, in Shoal's shapes)."""

    meta: Meta
    hosts: tuple[str, ...]
    routes: tuple[RpcRouteRule, ...]


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Everything valid in the config dir at one moment (the translator's input)."""

    virtual_services: tuple[VirtualService, ...] = ()
    destination_rules: tuple[DestinationRule, ...] = ()
    service_entries: tuple[ServiceEntry, ...] = ()
    workload_entries: tuple[WorkloadEntry, ...] = ()
    circuit_breakers: tuple[CircuitBreakerPolicy, ...] = ()
    rate_limits: tuple[RateLimitPolicy, ...] = ()
    backup_requests: tuple[BackupRequestPolicy, ...] = ()
    rpc_routes: tuple[RpcRoute, ...] = ()
    errors: tuple[str, ...] = field(default=(), compare=False)  # rejected resources, why
    failed_files: frozenset[str] = field(default=frozenset(), compare=False)  # with errors

    def resources(self) -> list[Any]:
        """Every resource, of every kind."""
        return [
            *self.virtual_services,
            *self.destination_rules,
            *self.service_entries,
            *self.workload_entries,
            *self.circuit_breakers,
            *self.rate_limits,
            *self.backup_requests,
            *self.rpc_routes,
        ]
