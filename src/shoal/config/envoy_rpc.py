"""Envoy's ``generic_proxy`` network filter → :class:`shoal.config.model.RpcProxy`.

Internal to :mod:`shoal.config.envoy`. Shoal reads Envoy's own generic proxy config for its
RPC protocols: Envoy's Dubbo codec (``DubboCodecConfig``) and Shoal's Bolt and Motan2
codecs as ``xds.type.v3.TypedStruct`` with the type URLs in :data:`TYPED_STRUCT_CODECS`.
Routes are Envoy's unified matcher (``xds.type.matcher.v3.Matcher``): a list of field
matchers whose predicates test the service, the method or a property, each ending in a
``RouteAction``. Matcher trees are not supported (a list says the same, in order).
"""

from __future__ import annotations

from typing import Any

from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.network.generic_proxy.action.v3 import action_pb2
from envoy.extensions.filters.network.generic_proxy.codecs.dubbo.v3 import dubbo_pb2
from envoy.extensions.filters.network.generic_proxy.matcher.v3 import matcher_pb2 as inputs_pb2
from envoy.extensions.filters.network.generic_proxy.router.v3 import router_pb2
from google.protobuf import json_format
from google.protobuf.message import Message
from xds.type.v3 import typed_struct_pb2

from shoal.config.envoy_breaker import breaker_policy
from shoal.config.envoy_fields import (
    Ctx,
    cluster_ref,
    required,
    timeout,
    total_weight,
    typed_config,
    uint,
    unpack,
)
from shoal.config.envoy_filters import local_rate_limit
from shoal.config.envoy_headers import string_match
from shoal.config.filters import TokenBucket
from shoal.config.model import (
    AccessLog,
    RpcCondition,
    RpcInput,
    RpcProxy,
    RpcRetryPolicy,
    RpcRoute,
    RpcVirtualHost,
    WeightedCluster,
)

# the protocols Shoal's codec registry provides (shoal.codec.rpc.registry; a test keeps the
# two in step, as config may not import codec)
RPC_PROTOCOLS = ("dubbo", "bolt", "motan2")
TYPED_STRUCT_CODECS = {
    "type.shoal.io/shoal.codecs.v1.BoltCodecConfig": "bolt",
    "type.shoal.io/shoal.codecs.v1.Motan2CodecConfig": "motan2",
    "type.shoal.io/shoal.codecs.v1.DubboCodecConfig": "dubbo",
}
_INPUTS: dict[type[Message], RpcInput] = {
    inputs_pb2.ServiceMatchInput: "service",
    inputs_pb2.HostMatchInput: "service",
    inputs_pb2.PathMatchInput: "service",
    inputs_pb2.MethodMatchInput: "method",
    inputs_pb2.PropertyMatchInput: "property",
}
_RATE_LIMIT_FIELDS = frozenset({"stat_prefix", "token_bucket"})
RPC_RETRY_ON = frozenset({"connect-failure", "reset"})


def generic_proxy(proxy: Message, ctx: Ctx, access_logs: tuple[AccessLog, ...]) -> RpcProxy:
    protocol, max_frame_bytes = _codec(proxy, ctx)
    _router_filter(proxy, ctx)
    if proxy.HasField("generic_rds"):
        raise ctx.at("generic_rds").error("generic_rds is not supported; use route_config")
    if not proxy.HasField("route_config"):
        raise ctx.at("route_config").error("route_config is required")
    config, config_ctx = proxy.route_config, ctx.at("route_config")
    hosts_ctx = config_ctx.at("virtual_hosts")
    virtual_hosts = tuple(
        _virtual_host(vhost, hosts_ctx.at(i)) for i, vhost in enumerate(config.virtual_hosts)
    )
    seen: set[str] = set()
    for i, vhost in enumerate(virtual_hosts):
        for host in vhost.hosts:
            if host in seen:
                raise hosts_ctx.at(i, "hosts").error(f"host {host!r} is in two virtual hosts")
            seen.add(host)
    routes: tuple[RpcRoute, ...] = ()
    if config.HasField("routes"):
        routes = _routes(config.routes, config_ctx.at("routes"))
    if not virtual_hosts and not routes:
        raise config_ctx.error("routes or virtual_hosts is required")
    return RpcProxy(
        stat_prefix=required(str(proxy.stat_prefix), ctx.at("stat_prefix"), "stat_prefix"),
        protocol=protocol,
        virtual_hosts=virtual_hosts,
        routes=routes,
        access_logs=access_logs,
        max_frame_bytes=max_frame_bytes,
    )


def _codec(proxy: Message, ctx: Ctx) -> tuple[str, int]:
    here = ctx.at("codec_config")
    if not proxy.HasField("codec_config"):
        raise here.error("codec_config is required")
    codec = typed_config(
        proxy.codec_config, here, dubbo_pb2.DubboCodecConfig, typed_struct_pb2.TypedStruct
    )
    if isinstance(codec, dubbo_pb2.DubboCodecConfig):
        return "dubbo", 8 * 1024 * 1024
    here = here.at("typed_config")
    protocol = TYPED_STRUCT_CODECS.get(str(codec.type_url))
    if protocol is None:
        known = ", ".join(sorted(TYPED_STRUCT_CODECS))
        raise here.at("type_url").error(f"unknown codec {codec.type_url!r}; known: {known}")
    options: dict[str, Any] = json_format.MessageToDict(codec.value)
    unknown = sorted(set(options) - {"max_frame_bytes", "maxFrameBytes"})
    if unknown:
        raise here.at("value", unknown[0]).error("unknown codec option (max_frame_bytes only)")
    size = options.get("max_frame_bytes", options.get("maxFrameBytes", 8 * 1024 * 1024))
    if not isinstance(size, int | float) or size != int(size) or not 64 <= size <= 2**31:
        raise here.at("value", "max_frame_bytes").error("must be an integer in [64, 2^31]")
    return protocol, int(size)


def _router_filter(proxy: Message, ctx: Ctx) -> None:
    """The router must be the one and only generic filter (Envoy requires it last)."""
    filters, here = proxy.filters, ctx.at("filters")
    if len(filters) != 1:
        raise here.error("exactly one filter, the router (envoy.filters.generic.router)")
    typed_config(filters[0], here.at(0), router_pb2.Router)


def _virtual_host(vhost: Message, ctx: Ctx) -> RpcVirtualHost:
    if not vhost.hosts:
        raise ctx.at("hosts").error("at least one host is required")
    if not vhost.HasField("routes"):
        raise ctx.at("routes").error("routes is required")
    return RpcVirtualHost(
        name=str(vhost.name),
        hosts=tuple(str(h) for h in vhost.hosts),
        routes=_routes(vhost.routes, ctx.at("routes")),
    )


def _routes(matcher: Message, ctx: Ctx) -> tuple[RpcRoute, ...]:
    """A matcher list (in order), then its on_no_match as a route that always matches."""
    kind = matcher.WhichOneof("matcher_type")
    if kind == "matcher_tree":
        raise ctx.at(kind).error("matcher_tree is not supported; use matcher_list")
    routes: list[RpcRoute] = []
    if kind == "matcher_list":
        here = ctx.at("matcher_list", "matchers")
        for i, field in enumerate(matcher.matcher_list.matchers):
            conditions = _predicate(field.predicate, here.at(i, "predicate"))
            routes.append(_on_match(field.on_match, conditions, here.at(i, "on_match")))
    if matcher.HasField("on_no_match"):
        routes.append(_on_match(matcher.on_no_match, (), ctx.at("on_no_match")))
    if not routes:
        raise ctx.error("matcher_list or on_no_match is required")
    return tuple(routes)


def _predicate(predicate: Message, ctx: Ctx) -> tuple[RpcCondition, ...]:
    """A single predicate or an and_matcher of single predicates (or/not: not supported)."""
    kind = predicate.WhichOneof("match_type")
    if kind == "single_predicate":
        return (_single(predicate.single_predicate, ctx.at(kind)),)
    if kind == "and_matcher":
        here = ctx.at(kind, "predicate")
        conditions: list[RpcCondition] = []
        for i, item in enumerate(predicate.and_matcher.predicate):
            conditions.extend(_predicate(item, here.at(i)))
        return tuple(conditions)
    raise ctx.error("single_predicate or and_matcher is required (or/not are not supported)")


def _single(single: Message, ctx: Ctx) -> RpcCondition:
    if not single.HasField("input"):
        raise ctx.at("input").error("input is required")
    source = typed_config(single.input, ctx.at("input"), *_INPUTS)
    if single.WhichOneof("matcher") != "value_match":
        raise ctx.at("value_match").error("value_match is required")
    match = string_match(single.value_match, ctx.at("value_match"))
    kind = _INPUTS[type(source)]
    name = ""
    if kind == "property":
        here = ctx.at("input", "typed_config", "property_name")
        name = required(str(source.property_name), here, "property_name")
    return RpcCondition(kind, match, name)


def _on_match(on_match: Message, conditions: tuple[RpcCondition, ...], ctx: Ctx) -> RpcRoute:
    if on_match.WhichOneof("on_match") != "action":
        raise ctx.error("action is required (nested matchers are not supported)")
    action = typed_config(on_match.action, ctx.at("action"), action_pb2.RouteAction)
    here = ctx.at("action", "typed_config")
    kind = action.WhichOneof("cluster_specifier")
    weighted: tuple[WeightedCluster, ...] = ()
    if kind == "cluster":
        cluster_ref(str(action.cluster), here.at("cluster"))
    elif kind == "weighted_clusters":
        clusters_ctx = here.at("weighted_clusters", "clusters")
        weighted = tuple(
            WeightedCluster(
                cluster_ref(str(c.name), clusters_ctx.at(i, "name")),
                uint(c, "weight", 0, clusters_ctx.at(i)),
            )
            for i, c in enumerate(action.weighted_clusters.clusters)
        )
        total_weight(weighted, clusters_ctx)
    else:
        raise here.error("one of cluster or weighted_clusters is required")
    return RpcRoute(
        conditions=conditions,
        name=str(action.name),
        cluster=str(action.cluster),
        weighted_clusters=weighted,
        timeout=timeout(action, "timeout", None, here),
        retry_policy=_retry(action, here),
        breaker=breaker_policy(action, here),
        rate_limit=_rate_limit(action, here),
    )


def _retry(action: Message, ctx: Ctx) -> RpcRetryPolicy | None:
    if not action.HasField("retry_policy"):
        return None
    policy, here = action.retry_policy, ctx.at("retry_policy")
    retry_on = frozenset(c.strip() for c in str(policy.retry_on).split(",") if c.strip())
    if not retry_on:
        raise here.at("retry_on").error("retry_on is required")
    unknown = sorted(retry_on - RPC_RETRY_ON)
    if unknown:
        allowed = ", ".join(sorted(RPC_RETRY_ON))
        raise here.at("retry_on").error(f"unknown condition {unknown[0]!r}; one of {allowed}")
    retries = int(policy.num_retries.value) if policy.HasField("num_retries") else 1
    return RpcRetryPolicy(retry_on, retries)


def _rate_limit(action: Message, ctx: Ctx) -> TokenBucket | None:
    """A token bucket from a ``LocalRateLimit`` in ``per_filter_config`` (any key)."""
    buckets = []
    for key, packed in sorted(action.per_filter_config.items()):
        here = ctx.at(f"per_filter_config[{key}]")
        limit = unpack(packed, here, local_rate_limit_pb2.LocalRateLimit)
        extra = [f.name for f, _ in limit.ListFields() if f.name not in _RATE_LIMIT_FIELDS]
        if extra:
            raise here.at(extra[0]).error("an RPC route limit takes stat_prefix and token_bucket")
        config = local_rate_limit(limit, here)
        if config.bucket is None:
            raise here.at("token_bucket").error("token_bucket is required")
        buckets.append(config.bucket)
    if len(buckets) > 1:
        raise ctx.at("per_filter_config").error("at most one local rate limit per route")
    return buckets[0] if buckets else None
