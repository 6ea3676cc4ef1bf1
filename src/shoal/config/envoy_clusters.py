"""Envoy Cluster → :class:`shoal.config.model.Cluster`.

Internal to :mod:`shoal.config.envoy`.
"""

from __future__ import annotations

import math

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf.message import Message

from shoal.config.envoy_fields import (
    Ctx,
    choice,
    required,
    seconds,
    socket_address,
    timeout,
    uint,
    unpack,
)
from shoal.config.model import (
    CircuitBreakerThresholds,
    Cluster,
    DiscoveryType,
    DnsLookupFamily,
    Endpoint,
    LbPolicy,
    Locality,
    Seconds,
)

_HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_MAX_RING_SIZE = 8 * 1024 * 1024
_DISCOVERY_TYPES = {
    cluster_pb2.Cluster.STATIC: DiscoveryType.STATIC,
    cluster_pb2.Cluster.STRICT_DNS: DiscoveryType.STRICT_DNS,
    cluster_pb2.Cluster.LOGICAL_DNS: DiscoveryType.LOGICAL_DNS,
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


def build_cluster(proto: Message, ctx: Ctx) -> Cluster:
    name = required(str(proto.name), ctx.at("name"), "name")
    if proto.type == cluster_pb2.Cluster.EDS:
        raise ctx.at("type").error("EDS clusters need xDS (not supported yet)")
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
    idle_timeout, max_requests = _upstream_http_options(proto, ctx)
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
        idle_timeout=idle_timeout,
        max_requests_per_connection=max_requests,
        overprovisioning_factor=overprovisioning,
    )


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
        )
    return result


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


def _upstream_http_options(proto: Message, ctx: Ctx) -> tuple[Seconds | None, int | None]:
    """Upstream connection idle timeout and max requests per connection, from the typed
    HttpProtocolOptions (HTTP/1.1 only) or the deprecated cluster field."""
    idle_timeout: Seconds | None = 3600.0
    max_requests = uint(proto, "max_requests_per_connection", 0, ctx) or None
    for key, packed in proto.typed_extension_protocol_options.items():
        here = ctx.at(f"typed_extension_protocol_options[{key}]")
        if key != _HTTP_OPTIONS_KEY:
            raise here.error(f"unsupported protocol options {key!r}; expected {_HTTP_OPTIONS_KEY}")
        options = unpack(packed, here, http_protocol_options_pb2.HttpProtocolOptions)
        if not options.HasField("explicit_http_config"):
            raise here.at("explicit_http_config").error(
                "explicit_http_config is required (http_protocol_options for HTTP/1.1)"
            )
        common = options.common_http_protocol_options
        common_ctx = here.at("common_http_protocol_options")
        idle_timeout = timeout(common, "idle_timeout", 3600.0, common_ctx)
        if common.HasField("max_requests_per_connection"):
            if max_requests is not None:
                raise common_ctx.at("max_requests_per_connection").error(
                    "also set by the deprecated cluster-level max_requests_per_connection"
                )
            max_requests = uint(common, "max_requests_per_connection", 0, common_ctx) or None
    return idle_timeout, max_requests
