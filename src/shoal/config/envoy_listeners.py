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
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
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
    keepalive,
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
from shoal.config.envoy_tls import downstream_tls
from shoal.config.filters import HttpFilter
from shoal.config.model import (
    AccessLog,
    CodecType,
    HttpConnectionManager,
    IstioStats,
    Listener,
    NetworkFilter,
    ProtocolChain,
    ServerNameChain,
    TcpProxy,
    TlsContext,
    TrafficDirection,
    WeightedCluster,
)
from shoal.config.tls import verify_mode

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
    """One filter chain, or several told apart by ``application_protocols`` (plaintext: Shoal's
    protocol inspector reads the first bytes) or by ``server_names`` (TLS: the client's SNI).
    A TLS listener has TLS on every chain: mixing TLS and plaintext chains on one port is not
    supported."""
    if not proto.HasField("address"):
        raise ctx.at("address").error("address is required")
    chains = proto.filter_chains
    if not chains:
        raise ctx.at("filter_chains").error("at least one filter chain is required")
    inspected, tls_inspected = _listener_filters(proto.listener_filters, ctx.at("listener_filters"))
    default: NetworkFilter | None = None
    default_tls: TlsContext | None = None
    by_protocol: list[ProtocolChain] = []
    by_name: list[ServerNameChain] = []
    seen: set[str] = set()
    names_seen: set[str] = set()
    tls_chains: list[tuple[TlsContext, Ctx]] = []
    plain_chains: list[Ctx] = []
    for index, chain in enumerate(chains):
        chain_ctx = ctx.at("filter_chains", index)
        network_filter = _chain_filter(chain, chain_ctx)
        match, match_ctx = chain.filter_chain_match, chain_ctx.at("filter_chain_match")
        tls = downstream_tls(chain, chain_ctx)
        _transport_protocol(match, tls, tls_inspected, match_ctx)
        if tls is None:
            plain_chains.append(chain_ctx)
        else:
            tls_chains.append((tls, chain_ctx))
        server_names = _server_names(match, tls, tls_inspected, names_seen, match_ctx)
        protocols = frozenset(str(p) for p in match.application_protocols)
        if server_names:
            if protocols:
                raise match_ctx.at("application_protocols").error(
                    "not supported: application_protocols together with server_names"
                )
            assert tls is not None
            by_name.append(ServerNameChain(server_names, network_filter, tls))
            continue
        if not protocols:
            if default is not None:
                raise chain_ctx.error(
                    "two filter chains without application_protocols or server_names"
                )
            default, default_tls = network_filter, tls
            continue
        if tls is not None:
            raise match_ctx.at("application_protocols").error(
                "not supported: application_protocols on a TLS filter chain (Envoy matches"
                " them against the ALPN of a TLS connection; Shoal picks the HTTP version by"
                " ALPN within one chain)"
            )
        if not inspected:
            raise match_ctx.error(
                "application_protocols needs a protocol inspector in listener_filters"
                f" ({INSPECTOR} or envoy.filters.listener.http_inspector)"
            )
        unknown = sorted(protocols - DETECTED_PROTOCOLS)
        if unknown:
            known = ", ".join(sorted(DETECTED_PROTOCOLS))
            raise match_ctx.at("application_protocols").error(
                f"unknown protocol {unknown[0]!r}; the inspector detects {known}"
            )
        if protocols & seen:
            raise match_ctx.at("application_protocols").error(
                f"{sorted(protocols & seen)[0]!r} is matched by an earlier chain"
            )
        seen |= protocols
        by_protocol.append(ProtocolChain(protocols, network_filter))
    if tls_chains and plain_chains:
        raise plain_chains[0].error(
            "not supported: TLS and plaintext filter chains on one listener (every chain"
            " needs a transport_socket, or none); put them on two listeners"
        )
    _same_handshake(tls_chains)
    if default is None:
        # no catch-all chain: the first one is used when the inspector cannot tell, or for
        # a client whose SNI no chain names
        if by_protocol:
            default = by_protocol[0].filter
        else:
            default, default_tls = by_name[0].filter, by_name[0].tls
    return Listener(
        name=str(proto.name),
        address=socket_address(proto.address, ctx.at("address")),
        filter=default,
        per_connection_buffer_limit_bytes=uint(
            proto, "per_connection_buffer_limit_bytes", 1024 * 1024, ctx
        ),
        protocol_chains=tuple(by_protocol),
        traffic_direction=choice(_DIRECTIONS, proto, "traffic_direction", ctx),
        tls=default_tls,
        server_name_chains=tuple(by_name),
    )


def _transport_protocol(
    match: Message, tls: TlsContext | None, tls_inspected: bool, ctx: Ctx
) -> None:
    """``transport_protocol: tls`` on a TLS chain (as Istio writes it) or ``raw_buffer`` on a
    plaintext one changes nothing in Shoal; anything else would mean TLS passthrough."""
    transport = str(match.transport_protocol)
    if not transport:
        return
    here = ctx.at("transport_protocol")
    if transport not in ("tls", "raw_buffer"):
        raise here.error(f"unknown transport protocol {transport!r} (tls or raw_buffer)")
    if transport == "tls" and tls is None:
        raise here.error(
            "not supported: transport_protocol tls without a transport_socket (TLS passthrough)"
        )
    if transport == "raw_buffer" and tls is not None:
        raise here.error("transport_protocol raw_buffer on a chain that terminates TLS")
    if transport == "tls" and not tls_inspected:
        raise here.error(
            "transport_protocol tls needs envoy.filters.listener.tls_inspector in"
            " listener_filters (as in Envoy)"
        )


def _server_names(
    match: Message, tls: TlsContext | None, tls_inspected: bool, seen: set[str], ctx: Ctx
) -> tuple[str, ...]:
    """``server_names``: exact names or a leading ``*.`` wildcard, lower-cased, each on one
    chain only; they need TLS and Envoy's TLS inspector (which reads the SNI in Envoy)."""
    names = tuple(str(n).lower() for n in match.server_names)
    if not names:
        return ()
    here = ctx.at("server_names")
    if tls is None:
        raise here.error("server_names needs a TLS chain (transport_socket)")
    if not tls_inspected:
        raise here.error(
            "server_names needs envoy.filters.listener.tls_inspector in listener_filters"
            " (as in Envoy)"
        )
    for index, name in enumerate(names):
        bare = name[2:] if name.startswith("*.") else name
        if not bare or "*" in bare or any(c in bare for c in " /\r\n\x00"):
            raise here.at(index).error(f"invalid server name {name!r} (an exact name or *.domain)")
        if name in seen:
            raise here.at(index).error(f"{name!r} is matched by an earlier chain")
        seen.add(name)
    return names


def _same_handshake(chains: list[tuple[TlsContext, Ctx]]) -> None:
    """The TLS version range and whether client certificates are asked for are settled
    before the SNI picks a chain, so every chain of a listener must agree on them."""
    if not chains:
        return
    first = chains[0][0]
    for tls, chain_ctx in chains[1:]:
        here = chain_ctx.at("transport_socket", "typed_config")
        if (tls.min_version, tls.max_version) != (first.min_version, first.max_version):
            raise here.at("common_tls_context", "tls_params").error(
                "not supported: filter chains of one listener with different TLS versions"
                " (the version is chosen before the SNI picks a chain)"
            )
        if verify_mode(tls) != verify_mode(first):
            raise here.error(
                "not supported: filter chains of one listener that ask for client"
                " certificates differently (trusted_ca / require_client_certificate: asked"
                " before the SNI picks a chain)"
            )


def _listener_filters(filters: Any, ctx: Ctx) -> tuple[bool, bool]:
    """Whether a protocol inspector and Envoy's TLS inspector are configured (the only
    listener filters Shoal has; TLS termination reads the SNI itself, so the TLS inspector
    does nothing more)."""
    protocol = tls = False
    for index, item in enumerate(filters):
        if not item.HasField("typed_config"):
            raise ctx.at(index).error(
                f"only the protocol inspector ({INSPECTOR} or"
                " envoy.filters.listener.http_inspector) and"
                " envoy.filters.listener.tls_inspector are supported"
            )
        config = typed_config(
            item,
            ctx.at(index),
            http_inspector_pb2.HttpInspector,
            tls_inspector_pb2.TlsInspector,
            typed_struct_pb2.TypedStruct,
        )
        if isinstance(config, tls_inspector_pb2.TlsInspector):
            tls = True
            continue
        if (
            isinstance(config, typed_struct_pb2.TypedStruct)
            and config.type_url != INSPECTOR_TYPE_URL
        ):
            raise ctx.at(index, "typed_config", "type_url").error(
                f"unknown listener filter {config.type_url!r}; Shoal has {INSPECTOR_TYPE_URL}"
            )
        protocol = True
    return protocol, tls


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
        keepalive=keepalive(hcm.http2_protocol_options, ctx.at("http2_protocol_options")),
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
