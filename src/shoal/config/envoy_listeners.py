"""Envoy Listener (HTTP connection manager or TCP proxy) → :class:`shoal.config.model.Listener`.

Internal to :mod:`shoal.config.envoy`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.http.buffer.v3 import buffer_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.http_inspector.v3 import http_inspector_pb2
from envoy.extensions.filters.network.generic_proxy.v3 import generic_proxy_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf.message import Message
from xds.type.v3 import typed_struct_pb2

from shoal.config.envoy_fields import (
    Ctx,
    choice,
    cluster_ref,
    data_source,
    flag,
    required,
    seconds,
    socket_address,
    timeout,
    total_weight,
    typed_config,
    uint,
)
from shoal.config.envoy_filters import FILTER_TYPES, filter_config
from shoal.config.envoy_routes import build_route_configuration
from shoal.config.envoy_rpc import RPC_PROTOCOLS, generic_proxy
from shoal.config.envoy_telemetry import istio_stats, tracing
from shoal.config.filters import HttpFilter
from shoal.config.model import (
    AccessLog,
    CodecType,
    HttpConnectionManager,
    IstioStats,
    Listener,
    NetworkFilter,
    ProtocolChain,
    TcpProxy,
    TrafficDirection,
    WeightedCluster,
)

INSPECTOR = "shoal.filters.listener.protocol_inspector"
INSPECTOR_TYPE_URL = "type.shoal.io/shoal.listener.v1.ProtocolInspector"
# what the inspector can tell from a connection's first bytes (Envoy's http_inspector names)
DETECTED_PROTOCOLS = frozenset({"http/1.0", "http/1.1", "h2c", *RPC_PROTOCOLS})

_TYPED_STRUCT = typed_struct_pb2.TypedStruct.DESCRIPTOR.full_name
_DIRECTIONS: dict[int, TrafficDirection] = {
    base_pb2.UNSPECIFIED: "unspecified",
    base_pb2.INBOUND: "inbound",
    base_pb2.OUTBOUND: "outbound",
}
_CODEC_TYPES: dict[int, CodecType] = {
    hcm_pb2.HttpConnectionManager.AUTO: "auto",
    hcm_pb2.HttpConnectionManager.HTTP1: "http1",
    hcm_pb2.HttpConnectionManager.HTTP2: "http2",
}


def access_logs(logs: Iterable[Message], ctx: Ctx) -> tuple[AccessLog, ...]:
    return tuple(
        _file_access_log(
            typed_config(log, ctx.at(i), file_pb2.FileAccessLog), ctx.at(i, "typed_config")
        )
        for i, log in enumerate(logs)
    )


def _file_access_log(log: Message, ctx: Ctx) -> AccessLog:
    """Neither format set means Envoy's default text format (both left None)."""
    path = required(str(log.path), ctx.at("path"), "path")
    kind = log.WhichOneof("access_log_format")
    if kind == "format":
        return AccessLog(path, text_format=str(log.format))
    if kind == "json_format":
        return AccessLog(path, json_format=_json_format(log.json_format, ctx.at(kind)))
    if kind is None:
        return AccessLog(path)
    fmt = log.log_format
    ctx = ctx.at("log_format")
    which = fmt.WhichOneof("format")
    if which == "text_format":
        return AccessLog(path, text_format=str(fmt.text_format))
    if which == "text_format_source":
        return AccessLog(path, text_format=data_source(fmt.text_format_source).decode())
    if which == "json_format":
        return AccessLog(path, json_format=_json_format(fmt.json_format, ctx.at(which)))
    raise ctx.error("one of text_format, text_format_source or json_format is required")


def _json_format(struct: Message, ctx: Ctx) -> tuple[tuple[str, str], ...]:
    """Flat key → format string pairs, sorted by key (nested objects are not supported)."""
    pairs = []
    for key, value in sorted(struct.fields.items()):
        if value.WhichOneof("kind") != "string_value":
            raise ctx.at(key).error("only string values are supported in json_format")
        pairs.append((str(key), str(value.string_value)))
    return tuple(pairs)


def build_listener(proto: Message, ctx: Ctx) -> Listener:
    """One filter chain, or several told apart by ``application_protocols`` that Shoal's
    protocol inspector (a listener filter) sets from the first bytes of a connection."""
    if not proto.HasField("address"):
        raise ctx.at("address").error("address is required")
    chains = proto.filter_chains
    if not chains:
        raise ctx.at("filter_chains").error("at least one filter chain is required")
    inspected = _listener_filters(proto.listener_filters, ctx.at("listener_filters"))
    default: NetworkFilter | None = None
    by_protocol: list[ProtocolChain] = []
    seen: set[str] = set()
    for index, chain in enumerate(chains):
        chain_ctx = ctx.at("filter_chains", index)
        network_filter = _chain_filter(chain, chain_ctx)
        protocols = frozenset(str(p) for p in chain.filter_chain_match.application_protocols)
        if not protocols:
            if default is not None:
                raise chain_ctx.error("two filter chains without application_protocols")
            default = network_filter
            continue
        if not inspected:
            raise chain_ctx.at("filter_chain_match").error(
                "application_protocols needs a protocol inspector in listener_filters"
                f" ({INSPECTOR} or envoy.filters.listener.http_inspector)"
            )
        unknown = sorted(protocols - DETECTED_PROTOCOLS)
        if unknown:
            known = ", ".join(sorted(DETECTED_PROTOCOLS))
            raise chain_ctx.at("filter_chain_match", "application_protocols").error(
                f"unknown protocol {unknown[0]!r}; the inspector detects {known}"
            )
        if protocols & seen:
            raise chain_ctx.at("filter_chain_match", "application_protocols").error(
                f"{sorted(protocols & seen)[0]!r} is matched by an earlier chain"
            )
        seen |= protocols
        by_protocol.append(ProtocolChain(protocols, network_filter))
    if default is None:
        # no catch-all chain: the first one is used when the inspector cannot tell
        default = by_protocol[0].filter
    return Listener(
        name=str(proto.name),
        address=socket_address(proto.address, ctx.at("address")),
        filter=default,
        per_connection_buffer_limit_bytes=uint(
            proto, "per_connection_buffer_limit_bytes", 1024 * 1024, ctx
        ),
        protocol_chains=tuple(by_protocol),
        traffic_direction=choice(_DIRECTIONS, proto, "traffic_direction", ctx),
    )


def _listener_filters(filters: Any, ctx: Ctx) -> bool:
    """Whether a protocol inspector is configured (the only listener filters Shoal has)."""
    for index, item in enumerate(filters):
        if not item.HasField("typed_config"):
            raise ctx.at(index).error(
                f"only the protocol inspector ({INSPECTOR} or"
                " envoy.filters.listener.http_inspector) is supported"
            )
        typed_config(
            item, ctx.at(index), http_inspector_pb2.HttpInspector, typed_struct_pb2.TypedStruct
        )
        config = item.typed_config
        if config.TypeName() == "xds.type.v3.TypedStruct":
            struct = typed_struct_pb2.TypedStruct()
            config.Unpack(struct)
            if struct.type_url != INSPECTOR_TYPE_URL:
                raise ctx.at(index, "typed_config", "type_url").error(
                    f"unknown listener filter {struct.type_url!r}; Shoal has {INSPECTOR_TYPE_URL}"
                )
    return bool(filters)


def _chain_filter(chain: Message, ctx: Ctx) -> NetworkFilter:
    """The chain's one terminal filter, after Shoal's istio_stats network filter if any (in
    front of tcp_proxy or generic_proxy, where Istio puts its istio.stats filter)."""
    filters = chain.filters
    stats: IstioStats | None = None
    if len(filters) == 2 and filters[0].typed_config.TypeName() == _TYPED_STRUCT:
        here = ctx.at("filters", 0)
        struct = typed_config(filters[0], here, typed_struct_pb2.TypedStruct)
        stats = istio_stats(struct, here.at("typed_config"))
    elif len(filters) != 1:
        raise ctx.at("filters").error(
            "exactly one network filter is supported (http_connection_manager, tcp_proxy or"
            " generic_proxy), optionally after shoal.filters.network.istio_stats"
        )
    filter_ctx = ctx.at("filters", len(filters) - 1)
    config = typed_config(
        filters[-1],
        filter_ctx,
        hcm_pb2.HttpConnectionManager,
        tcp_proxy_pb2.TcpProxy,
        generic_proxy_pb2.GenericProxy,
    )
    config_ctx = filter_ctx.at("typed_config")
    if isinstance(config, hcm_pb2.HttpConnectionManager):
        if stats is not None:
            raise ctx.at("filters", 0).error(
                "an HTTP listener reports Istio stats with the HTTP filter"
                " shoal.filters.http.istio_stats in http_filters"
            )
        return _http_connection_manager(config, config_ctx)
    if isinstance(config, generic_proxy_pb2.GenericProxy):
        logs = access_logs(config.access_log, config_ctx.at("access_log"))
        return replace(generic_proxy(config, config_ctx, logs), istio_stats=stats)
    return replace(_tcp_proxy(config, config_ctx), istio_stats=stats)


def _http_connection_manager(hcm: Message, ctx: Ctx) -> HttpConnectionManager:
    codec_type = choice(_CODEC_TYPES, hcm, "codec_type", ctx)
    if not hcm.HasField("route_config"):
        raise ctx.at("route_config").error("route_config is required (rds needs xDS)")
    common = hcm.common_http_protocol_options
    common_ctx = ctx.at("common_http_protocol_options")
    max_request_bytes, http_filters, stats = _http_filters(hcm.http_filters, ctx.at("http_filters"))
    if codec_type == "http2" and (http_filters or max_request_bytes is not None):
        names = [f.name for f in http_filters]
        if max_request_bytes is not None:
            names.append("envoy.filters.http.buffer")
        raise ctx.at("http_filters").error(
            f"codec_type HTTP2 runs no HTTP filters but the router and"
            f" shoal.filters.http.istio_stats; remove {', '.join(names)} (codec_type AUTO runs"
            " them for HTTP/1.1 and asks HTTP/2 clients for HTTP/1.1)"
        )
    return HttpConnectionManager(
        stat_prefix=required(str(hcm.stat_prefix), ctx.at("stat_prefix"), "stat_prefix"),
        route_config=build_route_configuration(hcm.route_config, ctx.at("route_config")),
        access_logs=access_logs(hcm.access_log, ctx.at("access_log")),
        idle_timeout=timeout(common, "idle_timeout", 3600.0, common_ctx),
        request_timeout=timeout(hcm, "request_timeout", None, ctx),
        request_headers_timeout=timeout(hcm, "request_headers_timeout", None, ctx),
        stream_idle_timeout=timeout(hcm, "stream_idle_timeout", 300.0, ctx),
        max_stream_duration=timeout(common, "max_stream_duration", None, common_ctx),
        max_request_headers_kb=uint(hcm, "max_request_headers_kb", 60, ctx, lo=1, hi=8192),
        max_request_bytes=max_request_bytes,
        http_filters=http_filters,
        use_remote_address=flag(hcm, "use_remote_address", False),
        xff_num_trusted_hops=int(hcm.xff_num_trusted_hops),
        skip_xff_append=bool(hcm.skip_xff_append),
        generate_request_id=flag(hcm, "generate_request_id", True),
        server_name=str(hcm.server_name) or "envoy",
        strip_matching_host_port=bool(hcm.strip_matching_host_port),
        upgrade_types=frozenset(
            str(u.upgrade_type).lower() for u in hcm.upgrade_configs if flag(u, "enabled", True)
        ),
        drain_timeout=seconds(hcm, "drain_timeout", 5.0, ctx),
        istio_stats=stats,
        tracing=tracing(hcm, ctx),
        codec_type=codec_type,
    )


def _http_filters(
    filters: Any, ctx: Ctx
) -> tuple[int | None, tuple[HttpFilter, ...], IstioStats | None]:
    """Check the router is present and last; return the buffer filter's limit, if any, the
    other filters in order, and Shoal's Istio stats filter, if any."""
    if not filters:
        raise ctx.error("the router filter (envoy.filters.http.router) is required")
    last = len(filters) - 1
    max_request_bytes = None
    stats: IstioStats | None = None
    chain: list[HttpFilter] = []
    for index, item in enumerate(filters):
        here = ctx.at(index)
        config = typed_config(
            item,
            here,
            router_pb2.Router,
            buffer_pb2.Buffer,
            typed_struct_pb2.TypedStruct,
            *FILTER_TYPES,
        )
        if isinstance(config, typed_struct_pb2.TypedStruct) and index != last:
            if stats is not None:
                raise here.error("the Istio stats filter is configured twice")
            stats = istio_stats(config, here.at("typed_config"))
            continue
        if isinstance(config, FILTER_TYPES):
            name = required(str(item.name), here.at("name"), "name")
            chain.append(HttpFilter(name, filter_config(config, here.at("typed_config"))))
            continue
        is_router = isinstance(config, router_pb2.Router)
        if is_router and index != last:
            raise here.error("the router filter must be the last HTTP filter")
        if index == last and not is_router:
            raise here.error("the last HTTP filter must be the router (envoy.filters.http.router)")
        if isinstance(config, buffer_pb2.Buffer):
            if max_request_bytes is not None:
                raise here.error("the buffer filter is configured twice")
            config_ctx = here.at("typed_config")
            max_request_bytes = uint(config, "max_request_bytes", 0, config_ctx, lo=1)
            if not max_request_bytes:
                raise config_ctx.at("max_request_bytes").error("max_request_bytes is required")
    return max_request_bytes, tuple(chain), stats


def _tcp_proxy(proxy: Message, ctx: Ctx) -> TcpProxy:
    kind = proxy.WhichOneof("cluster_specifier")
    weighted: tuple[WeightedCluster, ...] = ()
    if kind == "cluster":
        cluster_ref(str(proxy.cluster), ctx.at("cluster"))
    elif kind == "weighted_clusters":
        clusters_ctx = ctx.at("weighted_clusters", "clusters")
        weighted = tuple(
            WeightedCluster(cluster_ref(str(c.name), clusters_ctx.at(i, "name")), int(c.weight))
            for i, c in enumerate(proxy.weighted_clusters.clusters)
        )
        total_weight(weighted, clusters_ctx)
    else:
        raise ctx.error("one of cluster or weighted_clusters is required")
    return TcpProxy(
        stat_prefix=required(str(proxy.stat_prefix), ctx.at("stat_prefix"), "stat_prefix"),
        cluster=str(proxy.cluster),
        weighted_clusters=weighted,
        idle_timeout=timeout(proxy, "idle_timeout", 3600.0, ctx),
        access_logs=access_logs(proxy.access_log, ctx.at("access_log")),
        max_connect_attempts=uint(proxy, "max_connect_attempts", 1, ctx, lo=1),
    )
