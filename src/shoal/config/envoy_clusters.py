"""Envoy Cluster → :class:`shoal.config.model.Cluster`.

Internal to :mod:`shoal.config.envoy`.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.config.core.v3.base_pb2 import RequestMethod
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf.message import Message

from shoal.config.envoy_breaker import breaker_policy
from shoal.config.envoy_fields import (
    Ctx,
    choice,
    duration,
    flag,
    keepalive,
    required,
    seconds,
    socket_address,
    timeout,
    uint,
    unpack,
)
from shoal.config.envoy_headers import headers_to_add
from shoal.config.envoy_tls import upstream_tls
from shoal.config.model import (
    DEFAULT_EXPECTED_STATUSES,
    CircuitBreakerThresholds,
    Cluster,
    DiscoveryType,
    DnsLookupFamily,
    Endpoint,
    GrpcHealthCheck,
    HealthCheck,
    HttpHealthCheck,
    Keepalive,
    LbPolicy,
    Locality,
    OutlierDetection,
    Seconds,
    StatusRange,
    TcpHealthCheck,
)

_HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_GRPC_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")
_GRPC_CLIENT_HEADERS = frozenset({"content-type", "te", "user-agent"})
_MAX_RING_SIZE = 8 * 1024 * 1024
_DISCOVERY_TYPES = {
    cluster_pb2.Cluster.STATIC: DiscoveryType.STATIC,
    cluster_pb2.Cluster.STRICT_DNS: DiscoveryType.STRICT_DNS,
    cluster_pb2.Cluster.LOGICAL_DNS: DiscoveryType.LOGICAL_DNS,
    cluster_pb2.Cluster.EDS: DiscoveryType.EDS,
}
_LB_POLICIES = {getattr(cluster_pb2.Cluster, policy.name): policy for policy in LbPolicy}
_LB_CONFIGS = {
    "ring_hash_lb_config": LbPolicy.RING_HASH,
    "maglev_lb_config": LbPolicy.MAGLEV,
    "least_request_lb_config": LbPolicy.LEAST_REQUEST,
}
_DNS_LOOKUP_FAMILIES: dict[int, DnsLookupFamily] = {
    cluster_pb2.Cluster.AUTO: "auto",
    cluster_pb2.Cluster.V4_ONLY: "v4_only",
    cluster_pb2.Cluster.V6_ONLY: "v6_only",
    cluster_pb2.Cluster.V4_PREFERRED: "v4_preferred",
    cluster_pb2.Cluster.ALL: "all",
}
_UNHEALTHY = frozenset(
    {health_check_pb2.UNHEALTHY, health_check_pb2.DRAINING, health_check_pb2.TIMEOUT}
)
# RequestMethod → the health check request's method (unset means GET; CONNECT is invalid)
_HC_METHODS = {
    number: name if name != "METHOD_UNSPECIFIED" else "GET"
    for name, number in RequestMethod.items()
    if name != "CONNECT"
}


def build_cluster(proto: Message, ctx: Ctx) -> Cluster:
    name = required(str(proto.name), ctx.at("name"), "name")
    eds_service_name = _eds_service_name(proto, name, ctx)
    discovery = choice(_DISCOVERY_TYPES, proto, "type", ctx)
    lb_policy = choice(_LB_POLICIES, proto, "lb_policy", ctx)
    lb_config = proto.WhichOneof("lb_config")
    if lb_config and _LB_CONFIGS[lb_config] is not lb_policy:
        raise ctx.at(lb_config).error(f"needs lb_policy {_LB_CONFIGS[lb_config].name}")
    ring, ring_ctx = proto.ring_hash_lb_config, ctx.at("ring_hash_lb_config")
    ring_min = uint(ring, "minimum_ring_size", 1024, ring_ctx, lo=1, hi=_MAX_RING_SIZE)
    ring_max = uint(ring, "maximum_ring_size", _MAX_RING_SIZE, ring_ctx, lo=1, hi=_MAX_RING_SIZE)
    if ring_min > ring_max:
        raise ring_ctx.at("minimum_ring_size").error("minimum_ring_size exceeds maximum_ring_size")
    maglev_ctx = ctx.at("maglev_lb_config")
    table_size = uint(proto.maglev_lb_config, "table_size", 65537, maglev_ctx, hi=5000011)
    if not _is_prime(table_size):
        raise maglev_ctx.at("table_size").error(f"table_size {table_size} is not a prime")
    breakers = _circuit_breakers(proto.circuit_breakers, ctx.at("circuit_breakers"))
    endpoints, overprovisioning = _load_assignment(
        proto.load_assignment, ctx.at("load_assignment"), discovery
    )
    http = _upstream_http_options(proto, ctx)
    http2 = http.http2
    tls = upstream_tls(proto, ctx, http2=http2)
    if tls is not None and http.downstream_http2:
        raise ctx.at("transport_socket").error(
            "not supported yet: TLS with use_downstream_protocol_config (use explicit_http_config)"
        )
    return Cluster(
        name=name,
        type=discovery,
        endpoints=endpoints,
        connect_timeout=seconds(proto, "connect_timeout", 5.0, ctx, positive=True),
        lb_policy=lb_policy,
        circuit_breakers=breakers.get(base_pb2.DEFAULT, CircuitBreakerThresholds()),
        high_priority_breakers=breakers.get(base_pb2.HIGH, CircuitBreakerThresholds()),
        dns_refresh_rate=seconds(proto, "dns_refresh_rate", 5.0, ctx, positive=True),
        dns_lookup_family=choice(_DNS_LOOKUP_FAMILIES, proto, "dns_lookup_family", ctx),
        ring_hash_min_size=ring_min,
        ring_hash_max_size=ring_max,
        maglev_table_size=table_size,
        least_request_choice_count=uint(
            proto.least_request_lb_config,
            "choice_count",
            2,
            ctx.at("least_request_lb_config"),
            lo=2,
        ),
        per_connection_buffer_limit_bytes=uint(
            proto, "per_connection_buffer_limit_bytes", 1024 * 1024, ctx
        ),
        idle_timeout=http.idle_timeout,
        http2=http2,
        downstream_http2=http.downstream_http2,
        keepalive=http.keepalive,
        max_requests_per_connection=http.max_requests,
        overprovisioning_factor=overprovisioning,
        outlier_detection=(
            _outlier_detection(proto.outlier_detection, ctx.at("outlier_detection"))
            if proto.HasField("outlier_detection")
            else None
        ),
        health_checks=_health_checks(proto, ctx, http2=http2, tls=tls is not None),
        breaker=breaker_policy(proto, ctx),
        eds_service_name=eds_service_name,
        tls=tls,
    )


def _eds_service_name(proto: Message, name: str, ctx: Ctx) -> str:
    """EDS clusters follow a ClusterLoadAssignment over ADS (the only EDS source shoal has)."""
    eds = proto.eds_cluster_config
    if proto.type != cluster_pb2.Cluster.EDS:
        if proto.HasField("eds_cluster_config"):
            raise ctx.at("eds_cluster_config").error("only EDS clusters take eds_cluster_config")
        return ""
    if not eds.eds_config.HasField("ads"):
        raise ctx.at("eds_cluster_config", "eds_config").error(
            "EDS must come over ADS (eds_config: {ads: {}})"
        )
    if proto.HasField("load_assignment"):
        raise ctx.at("load_assignment").error("EDS clusters get endpoints from EDS, not inline")
    return str(eds.service_name) or name


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _circuit_breakers(config: Message, ctx: Ctx) -> dict[int, CircuitBreakerThresholds]:
    """Thresholds by routing priority (DEFAULT, HIGH); each priority at most once."""
    result: dict[int, CircuitBreakerThresholds] = {}
    for index, t in enumerate(config.thresholds):
        here = ctx.at("thresholds", index)
        if t.priority in result:
            raise here.at("priority").error("duplicate thresholds for this priority")
        defaults = CircuitBreakerThresholds()
        result[t.priority] = CircuitBreakerThresholds(
            max_connections=uint(t, "max_connections", defaults.max_connections, here),
            max_pending_requests=uint(
                t, "max_pending_requests", defaults.max_pending_requests, here
            ),
            max_requests=uint(t, "max_requests", defaults.max_requests, here),
            max_retries=uint(t, "max_retries", defaults.max_retries, here),
            **_retry_budget(t, here),
        )
    return result


def _retry_budget(thresholds: Message, ctx: Ctx) -> dict[str, Any]:
    """Envoy's retry budget: 20% of active plus pending requests, at least 3, by default."""
    if not thresholds.HasField("retry_budget"):
        return {}
    budget = thresholds.retry_budget
    here = ctx.at("retry_budget")
    percent = float(budget.budget_percent.value) if budget.HasField("budget_percent") else 20.0
    if not 0.0 <= percent <= 100.0:
        raise here.at("budget_percent").error("budget_percent must be in [0, 100]")
    return {
        "retry_budget": percent / 100.0,
        "min_retry_concurrency": uint(budget, "min_retry_concurrency", 3, here),
    }


def load_assignment(assignment: Message, ctx: Ctx) -> tuple[Endpoint, ...]:
    """A ClusterLoadAssignment from EDS (IP endpoints only, as for STATIC clusters)."""
    return _load_assignment(assignment, ctx, DiscoveryType.STATIC)[0]


def _load_assignment(
    assignment: Message, ctx: Ctx, discovery: DiscoveryType
) -> tuple[tuple[Endpoint, ...], int]:
    """Flatten locality groups into endpoints; STATIC needs IP literals, LOGICAL_DNS exactly
    one endpoint (both as in Envoy). Returns the endpoints and the overprovisioning factor."""
    endpoints = []
    for group_index, group in enumerate(assignment.endpoints):
        group_ctx = ctx.at("endpoints", group_index)
        locality = Locality(
            str(group.locality.region), str(group.locality.zone), str(group.locality.sub_zone)
        )
        locality_weight = uint(group, "load_balancing_weight", 0, group_ctx, lo=1)
        for index, lb_endpoint in enumerate(group.lb_endpoints):
            here = group_ctx.at("lb_endpoints", index)
            if not lb_endpoint.HasField("endpoint"):
                raise here.at("endpoint").error("endpoint is required")
            address = socket_address(
                lb_endpoint.endpoint.address,
                here.at("endpoint", "address"),
                ip_only=discovery is DiscoveryType.STATIC,
                min_port=1,
            )
            endpoints.append(
                Endpoint(
                    address=address,
                    weight=uint(lb_endpoint, "load_balancing_weight", 1, here, lo=1),
                    priority=int(group.priority),
                    locality=locality,
                    locality_weight=locality_weight,
                    healthy=lb_endpoint.health_status not in _UNHEALTHY,
                    hostname=str(lb_endpoint.endpoint.hostname),
                )
            )
    if discovery is DiscoveryType.LOGICAL_DNS and len(endpoints) != 1:
        raise ctx.error("LOGICAL_DNS clusters need exactly one endpoint")
    overprovisioning = uint(
        assignment.policy, "overprovisioning_factor", 140, ctx.at("policy"), lo=1
    )
    return tuple(endpoints), overprovisioning


class _HttpOptions(NamedTuple):
    idle_timeout: Seconds | None = 3600.0
    max_requests: int | None = None
    http2: bool = False  # every request goes upstream as HTTP/2
    downstream_http2: bool = False  # HTTP/2 streams do (use_downstream_protocol_config)
    keepalive: Keepalive | None = None


def _upstream_http_options(proto: Message, ctx: Ctx) -> _HttpOptions:
    """The typed HttpProtocolOptions: upstream connection idle timeout, max requests per
    connection (or the deprecated cluster field), which requests go upstream as HTTP/2
    (``explicit_http_config``: all, or ``use_downstream_protocol_config``: those that came
    as HTTP/2), and the HTTP/2 PING keepalive."""
    found = _HttpOptions(max_requests=uint(proto, "max_requests_per_connection", 0, ctx) or None)
    for key, packed in proto.typed_extension_protocol_options.items():
        here = ctx.at(f"typed_extension_protocol_options[{key}]")
        if key != _HTTP_OPTIONS_KEY:
            raise here.error(f"unsupported protocol options {key!r}; expected {_HTTP_OPTIONS_KEY}")
        options = unpack(packed, here, http_protocol_options_pb2.HttpProtocolOptions)
        kind = options.WhichOneof("upstream_protocol_options")
        if kind not in ("explicit_http_config", "use_downstream_protocol_config"):
            raise here.at("explicit_http_config").error(
                "explicit_http_config or use_downstream_protocol_config is required"
            )
        chosen, chosen_ctx = getattr(options, kind), here.at(kind)
        if kind == "explicit_http_config":
            found = found._replace(http2=chosen.HasField("http2_protocol_options"))
        else:
            found = found._replace(downstream_http2=chosen.HasField("http2_protocol_options"))
        if chosen.HasField("http2_protocol_options"):
            h2_ctx = chosen_ctx.at("http2_protocol_options")
            found = found._replace(keepalive=keepalive(chosen.http2_protocol_options, h2_ctx))
        common = options.common_http_protocol_options
        common_ctx = here.at("common_http_protocol_options")
        found = found._replace(idle_timeout=timeout(common, "idle_timeout", 3600.0, common_ctx))
        if common.HasField("max_requests_per_connection"):
            if found.max_requests is not None:
                raise common_ctx.at("max_requests_per_connection").error(
                    "also set by the deprecated cluster-level max_requests_per_connection"
                )
            limit = uint(common, "max_requests_per_connection", 0, common_ctx) or None
            found = found._replace(max_requests=limit)
    return found


def _outlier_detection(config: Message, ctx: Ctx) -> OutlierDetection:
    """Envoy's OutlierDetection with its defaults; percentages are at most 100 and
    max_ejection_time (default max(300 s, base_ejection_time)) not below base_ejection_time,
    as Envoy checks."""
    d = OutlierDetection()
    base = seconds(config, "base_ejection_time", d.base_ejection_time, ctx, positive=True)
    max_time = seconds(
        config, "max_ejection_time", max(d.max_ejection_time, base), ctx, positive=True
    )
    if max_time < base:
        raise ctx.at("max_ejection_time").error(
            "max_ejection_time cannot be smaller than base_ejection_time"
        )

    def count(name: str) -> int:
        return uint(config, name, getattr(d, name), ctx)

    def percent(name: str) -> int:
        return uint(config, name, getattr(d, name), ctx, hi=100)

    return OutlierDetection(
        consecutive_5xx=count("consecutive_5xx"),
        consecutive_gateway_failure=count("consecutive_gateway_failure"),
        consecutive_local_origin_failure=count("consecutive_local_origin_failure"),
        split_external_local_origin_errors=bool(config.split_external_local_origin_errors),
        interval=seconds(config, "interval", d.interval, ctx, positive=True),
        base_ejection_time=base,
        max_ejection_time=max_time,
        max_ejection_time_jitter=seconds(
            config, "max_ejection_time_jitter", d.max_ejection_time_jitter, ctx
        ),
        max_ejection_percent=percent("max_ejection_percent"),
        always_eject_one_host=flag(config, "always_eject_one_host", d.always_eject_one_host),
        enforcing_consecutive_5xx=percent("enforcing_consecutive_5xx"),
        enforcing_consecutive_gateway_failure=percent("enforcing_consecutive_gateway_failure"),
        enforcing_consecutive_local_origin_failure=percent(
            "enforcing_consecutive_local_origin_failure"
        ),
        enforcing_success_rate=percent("enforcing_success_rate"),
        enforcing_local_origin_success_rate=percent("enforcing_local_origin_success_rate"),
        enforcing_failure_percentage=percent("enforcing_failure_percentage"),
        enforcing_failure_percentage_local_origin=percent(
            "enforcing_failure_percentage_local_origin"
        ),
        success_rate_minimum_hosts=count("success_rate_minimum_hosts"),
        success_rate_request_volume=count("success_rate_request_volume"),
        success_rate_stdev_factor=count("success_rate_stdev_factor"),
        failure_percentage_threshold=percent("failure_percentage_threshold"),
        failure_percentage_minimum_hosts=count("failure_percentage_minimum_hosts"),
        failure_percentage_request_volume=count("failure_percentage_request_volume"),
        successful_active_health_check_uneject_host=flag(
            config,
            "successful_active_health_check_uneject_host",
            d.successful_active_health_check_uneject_host,
        ),
    )


def _health_checks(
    cluster: Message, ctx: Ctx, *, http2: bool, tls: bool
) -> tuple[HealthCheck, ...]:
    """At most one check: Envoy runs several only when each has a ``name``, a field this
    version of the API does not have. A gRPC check needs an HTTP/2 cluster, as in Envoy, and
    (in Shoal) a plaintext one."""
    checks = cluster.health_checks
    if len(checks) > 1:
        raise ctx.at("health_checks").error(
            "only one health check per cluster is supported (Envoy needs a name for each of"
            " several)"
        )
    for index, check in enumerate(checks):
        if check.HasField("grpc_health_check") and not http2:
            raise ctx.at("health_checks", index, "grpc_health_check").error(
                f"{cluster.name} cluster must support HTTP/2 for gRPC healthchecking"
                " (http2_protocol_options)"
            )
        if check.HasField("grpc_health_check") and tls:
            raise ctx.at("health_checks", index, "grpc_health_check").error(
                "gRPC health checks of a TLS cluster are not supported yet (HTTP and TCP"
                " checks use the cluster's TLS)"
            )
    return tuple(_health_check(c, ctx.at("health_checks", i)) for i, c in enumerate(checks))


def _health_check(config: Message, ctx: Ctx) -> HealthCheck:
    """Envoy's HealthCheck: timeout, interval and both thresholds are required."""
    for name in ("timeout", "interval", "unhealthy_threshold", "healthy_threshold"):
        if not config.HasField(name):
            raise ctx.at(name).error(f"{name} is required")
    kind = config.WhichOneof("health_checker")
    checker: HttpHealthCheck | TcpHealthCheck | GrpcHealthCheck
    if kind == "http_health_check":
        checker = _http_health_check(config.http_health_check, ctx.at(kind))
    elif kind == "tcp_health_check":
        checker = _tcp_health_check(config.tcp_health_check, ctx.at(kind))
    elif kind == "grpc_health_check":
        checker = _grpc_health_check(config.grpc_health_check, ctx.at(kind))
    else:  # custom checkers are refused by the field check before this
        raise ctx.error(
            "a health checker is required: http_health_check, tcp_health_check or grpc_health_check"
        )

    def interval(name: str) -> Seconds:  # 0 in the model: Envoy's default for that interval
        return seconds(config, name, 0.0, ctx, positive=True)

    return HealthCheck(
        timeout=seconds(config, "timeout", 0.0, ctx, positive=True),
        interval=seconds(config, "interval", 0.0, ctx, positive=True),
        unhealthy_threshold=uint(config, "unhealthy_threshold", 0, ctx),
        healthy_threshold=uint(config, "healthy_threshold", 0, ctx),
        checker=checker,
        initial_jitter=duration(config, "initial_jitter", ctx) or 0.0,
        interval_jitter=duration(config, "interval_jitter", ctx) or 0.0,
        interval_jitter_percent=int(config.interval_jitter_percent),
        no_traffic_interval=seconds(config, "no_traffic_interval", 60.0, ctx, positive=True),
        no_traffic_healthy_interval=interval("no_traffic_healthy_interval"),
        unhealthy_interval=interval("unhealthy_interval"),
        unhealthy_edge_interval=interval("unhealthy_edge_interval"),
        healthy_edge_interval=interval("healthy_edge_interval"),
        reuse_connection=flag(config, "reuse_connection", True),
    )


def _http_health_check(config: Message, ctx: Ctx) -> HttpHealthCheck:
    path = required(str(config.path), ctx.at("path"), "path")
    if any(c in path for c in "\r\n\x00") or " " in path:
        raise ctx.at("path").error(f"invalid path {path!r}")
    host = str(config.host)
    if any(c in host for c in "\r\n\x00"):
        raise ctx.at("host").error(f"invalid host {host!r}")
    added = headers_to_add(config, "request_headers_to_add", ctx)
    removed = frozenset(str(name).lower() for name in config.request_headers_to_remove)
    for index, option in enumerate(added):
        if option.key == "host" or option.key.startswith(":"):
            raise ctx.at("request_headers_to_add", index).error(
                ":-prefixed or host headers may not be modified"
            )
    if any(name == "host" or name.startswith(":") for name in removed):
        raise ctx.at("request_headers_to_remove").error(
            ":-prefixed or host headers may not be removed"
        )
    return HttpHealthCheck(
        path=path,
        host=host,
        method=choice(_HC_METHODS, config, "method", ctx),
        expected_statuses=(
            _status_ranges(config, "expected_statuses", ctx) or DEFAULT_EXPECTED_STATUSES
        ),
        retriable_statuses=_status_ranges(config, "retriable_statuses", ctx),
        request_headers_to_add=added,
        request_headers_to_remove=removed,
    )


def _status_ranges(config: Message, name: str, ctx: Ctx) -> tuple[StatusRange, ...]:
    """Int64Ranges of statuses, [start, end) within [100, 600), with Envoy's checks."""
    ranges = []
    for index, item in enumerate(getattr(config, name)):
        here = ctx.at(name, index)
        start, end = int(item.start), int(item.end)
        if start >= end:
            raise here.error(f"expecting start < end, but found start={start} and end={end}")
        if start < 100:
            raise here.at("start").error(f"expecting start >= 100, but found start={start}")
        if end > 600:
            raise here.at("end").error(f"expecting end <= 600, but found end={end}")
        ranges.append((start, end))
    return tuple(ranges)


def _tcp_health_check(config: Message, ctx: Ctx) -> TcpHealthCheck:
    return TcpHealthCheck(
        send=_payload(config.send, ctx.at("send")) if config.HasField("send") else b"",
        receive=tuple(
            _payload(item, ctx.at("receive", index)) for index, item in enumerate(config.receive)
        ),
    )


def _grpc_health_check(config: Message, ctx: Ctx) -> GrpcHealthCheck:
    """Envoy refuses ``:``-prefixed and ``host`` metadata. The rest is what grpcio can send
    (refused here rather than failing every check): gRPC metadata keys and printable ASCII
    values; grpcio sets ``content-type``, ``te``, ``user-agent`` and ``grpc-*`` itself."""
    authority = str(config.authority)
    if any(c in authority for c in "\r\n\x00"):
        raise ctx.at("authority").error(f"invalid authority {authority!r}")
    metadata = headers_to_add(config, "initial_metadata", ctx)
    for index, option in enumerate(metadata):
        key, here = option.key, ctx.at("initial_metadata", index)
        if key == "host" or key.startswith(":"):
            raise here.error(":-prefixed or host headers may not be modified")
        if not _GRPC_METADATA_KEY.fullmatch(key):
            raise here.error(f"{key!r} is not a gRPC metadata key (0-9 a-z _ . - only)")
        if key.endswith("-bin"):
            raise here.error(f"binary metadata ({key!r}) is not supported")
        if key in _GRPC_CLIENT_HEADERS or key.startswith("grpc-"):
            raise here.error(f"{key!r} is set by the gRPC client")
        if not (option.value.isascii() and option.value.isprintable()):
            raise here.error(f"the value of {key!r} must be printable ASCII")
    return GrpcHealthCheck(
        service_name=str(config.service_name), authority=authority, initial_metadata=metadata
    )


def _payload(payload: Message, ctx: Ctx) -> bytes:
    """A Payload: ``text`` is hex (Envoy's form, e.g. "000000FF"), ``binary`` raw bytes."""
    kind = payload.WhichOneof("payload")
    if kind == "binary":
        return bytes(payload.binary)
    if kind != "text" or not payload.text:
        raise ctx.error("payload needs text (hex) or binary")
    try:
        return bytes.fromhex(str(payload.text))
    except ValueError:
        raise ctx.at("text").error(f"invalid hex string {payload.text!r}") from None
