"""Envoy v3 configuration → :mod:`shoal.config.model`.

The static bootstrap (YAML/JSON) and, later, xDS resources go through this one path: the
input is parsed into the real Envoy protos (``xds-protos``), every set field is checked
against the table in :mod:`shoal.config.envoy_check` so that nothing which would change
behaviour is silently ignored, and then the protos are translated into frozen,
pre-compiled model objects. Every error is a :class:`ConfigError` naming the source and
the dotted field path. The supported subset is documented in ``docs/config.md``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.core.v3 import config_source_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from shoal.config.envoy_backup import backup_policy_from_dict
from shoal.config.envoy_breaker import check_cluster_fallbacks, policy_from_dict
from shoal.config.envoy_check import check
from shoal.config.envoy_clusters import build_cluster, load_assignment
from shoal.config.envoy_fields import Ctx, seconds, socket_address, unique
from shoal.config.envoy_listeners import access_logs, build_listener
from shoal.config.envoy_routes import build_route_configuration
from shoal.config.filters import GlobalRateLimit
from shoal.config.model import (
    Admin,
    AdsSource,
    Bootstrap,
    CircuitBreakerPolicy,
    Cluster,
    DiscoveryType,
    Endpoint,
    HttpConnectionManager,
    Listener,
    Node,
    RouteConfiguration,
)
from shoal.errors import ConfigError

__all__ = [
    "backup_from_dict",
    "bootstrap_from_dict",
    "breaker_from_dict",
    "load_bootstrap",
    "plaintext_service_problem",
    "translate_cluster",
    "translate_listener",
    "translate_load_assignment",
    "translate_route_configuration",
]


def load_bootstrap(path: str) -> Bootstrap:
    """Read an Envoy v3 bootstrap file (.yaml, .yml or .json) into the runtime model."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError("expected a .yaml, .yml or .json file", source=path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the file: {exc}", source=path) from exc
    try:
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "JSON" if suffix == ".json" else "YAML"
        raise ConfigError(f"invalid {kind}: {exc}", source=path) from exc
    if not isinstance(data, dict):
        raise ConfigError("the bootstrap must be a mapping", source=path)
    return bootstrap_from_dict(data, source=path)


def bootstrap_from_dict(data: dict[str, Any], source: str = "<dict>") -> Bootstrap:
    """Translate an already-loaded bootstrap (YAML/JSON shape, snake or camel case)."""
    proto = bootstrap_pb2.Bootstrap()
    try:
        json_format.ParseDict(data, proto)
    except json_format.ParseError as exc:
        raise _parse_error(exc, source) from exc
    except (KeyError, TypeError, ValueError) as exc:  # protobuf does not wrap every case
        raise ConfigError(f"cannot parse the config: {exc!r}", source=source) from exc
    ctx = Ctx(source, "")
    check(proto, ctx)
    return _bootstrap(proto, ctx)


def translate_listener(
    proto: Message, source: str = "", field: str = "", *, clusters: Iterable[str] | None = None
) -> Listener:
    """An Envoy Listener (bootstrap or LDS); ``clusters``, if given, are the names routes
    may refer to (Envoy checks inline route configs against the cluster manager)."""
    ctx = Ctx(source, field, None if clusters is None else frozenset(clusters))
    check(proto, ctx)
    return build_listener(proto, ctx)


def translate_cluster(proto: Message, source: str = "", field: str = "") -> Cluster:
    """An Envoy Cluster (bootstrap or CDS)."""
    ctx = Ctx(source, field)
    check(proto, ctx)
    return build_cluster(proto, ctx)


def translate_route_configuration(
    proto: Message, source: str = "", field: str = ""
) -> RouteConfiguration:
    """An Envoy RouteConfiguration (RDS; like Envoy, cluster names are not checked here)."""
    ctx = Ctx(source, field)
    check(proto, ctx)
    return build_route_configuration(proto, ctx)


def translate_load_assignment(
    proto: Message, source: str = "", field: str = ""
) -> tuple[Endpoint, ...]:
    """An EDS ClusterLoadAssignment: the endpoints of the clusters that follow it."""
    ctx = Ctx(source, field)
    check(proto, ctx)
    return load_assignment(proto, ctx)


def backup_from_dict(data: dict[str, Any], source: str = "", field: str = "") -> object:
    """Shoal's backup request settings from their metadata fields (checked by the control
    plane before it puts them on routes)."""
    return backup_policy_from_dict(data, Ctx(source, field))


def breaker_from_dict(
    data: dict[str, Any], source: str = "", field: str = ""
) -> CircuitBreakerPolicy:
    """Shoal's error-rate breaker from its metadata fields (what the control plane checks
    before it puts them on a cluster)."""
    return policy_from_dict(data, Ctx(source, field))


_PARSE_PREFIX = re.compile(r"Failed to parse (\S+) field: ")
_PARSE_AT = re.compile(r'\.? at "?\w+(?:\.(?P<path>[^"\s]*?))?"?\.*$')


def _parse_error(exc: json_format.ParseError, source: str) -> ConfigError:
    """Turn protobuf's nested "Failed to parse x field: ... at Bootstrap.a[0].b" message into
    a reason and a dotted field path."""
    text = str(exc).split("\n", 1)[0]
    field = ".".join(_PARSE_PREFIX.findall(text))  # fallback path, without list indexes
    reason = _PARSE_PREFIX.sub("", text)
    located = _PARSE_AT.search(reason)
    if located:
        field = located["path"] or ""
        reason = reason[: located.start()]
    reason = reason.rstrip(".")
    if unknown := re.search(r'has no field named "([^"]+)"', reason):
        field = f"{field}.{unknown[1]}" if field else unknown[1]
        reason = "unknown field (not in the Envoy v3 API)"
    elif type_url := re.search(r"Can not find message descriptor by type_url: (\S+)", reason):
        reason = f"unsupported extension type {type_url[1].rsplit('/', 1)[-1]}"
    return ConfigError(reason, field=field, source=source)


def _bootstrap(proto: Message, ctx: Ctx) -> Bootstrap:
    """Clusters first, so that routes and TCP proxies can be checked against their names."""
    static_ctx = ctx.at("static_resources")
    clusters_ctx = static_ctx.at("clusters")
    clusters = tuple(
        build_cluster(c, clusters_ctx.at(i)) for i, c in enumerate(proto.static_resources.clusters)
    )
    unique((c.name for c in clusters), clusters_ctx, "name", "cluster name")
    check_cluster_fallbacks(clusters, clusters_ctx)
    listeners_ctx = replace(
        static_ctx.at("listeners"), clusters=frozenset(c.name for c in clusters)
    )
    listeners = tuple(
        build_listener(item, listeners_ctx.at(i))
        for i, item in enumerate(proto.static_resources.listeners)
    )
    unique((item.name for item in listeners), listeners_ctx, "name", "listener name")
    _check_plaintext_services(listeners, clusters, listeners_ctx)
    unique(
        (str(item.address) if item.address.port else "" for item in listeners),
        listeners_ctx,
        "address",
        "listener address",
    )
    ads = _ads_source(proto, clusters, ctx)
    node = proto.node
    return Bootstrap(
        listeners=listeners,
        clusters=clusters,
        admin=_admin(proto.admin, ctx.at("admin")),
        node=Node(
            id=str(node.id),
            cluster=str(node.cluster),
            metadata=dict(json_format.MessageToDict(node.metadata)),
        ),
        source=ctx.source,
        ads=ads,
    )


def _ads_source(proto: Message, clusters: tuple[Cluster, ...], ctx: Ctx) -> AdsSource | None:
    """dynamic_resources, as far as shoal goes: everything over one ADS stream (gRPC, state
    of the world or delta) through a static HTTP/2 cluster, as Istio's bootstraps do."""
    eds = [c for c in clusters if c.type is DiscoveryType.EDS]
    if not proto.HasField("dynamic_resources"):
        if eds:
            index = clusters.index(eds[0])
            raise ctx.at("static_resources", "clusters", index).error(
                "EDS clusters need dynamic_resources.ads_config"
            )
        return None
    dynamic, dctx = proto.dynamic_resources, ctx.at("dynamic_resources")
    if not dynamic.HasField("ads_config"):
        raise dctx.at("ads_config").error("only ADS is supported (ads_config is required)")
    ads, actx = dynamic.ads_config, dctx.at("ads_config")
    api_types = {
        config_source_pb2.ApiConfigSource.GRPC: False,
        config_source_pb2.ApiConfigSource.DELTA_GRPC: True,
    }
    if ads.api_type not in api_types:
        raise actx.at("api_type").error("must be GRPC or DELTA_GRPC")
    if ads.transport_api_version != config_source_pb2.V3:
        raise actx.at("transport_api_version").error("must be V3")
    if len(ads.grpc_services) != 1 or not ads.grpc_services[0].HasField("envoy_grpc"):
        raise actx.at("grpc_services").error("exactly one envoy_grpc service is required")
    name = ads.grpc_services[0].envoy_grpc.cluster_name
    target = next((c for c in clusters if c.name == name), None)
    where = actx.at("grpc_services", 0, "envoy_grpc", "cluster_name")
    if target is None:
        raise where.error(f"unknown cluster {name!r} (it must be a static cluster)")
    if not target.http2:
        raise where.error(f"cluster {name!r} needs http2_protocol_options (gRPC)")
    if target.tls is not None:
        raise where.error(f"cluster {name!r}: TLS to the ADS server is not supported yet")
    for field_name in ("lds_config", "cds_config"):
        source = getattr(dynamic, field_name)
        if dynamic.HasField(field_name) and not source.HasField("ads"):
            raise dctx.at(field_name).error("only ADS is supported ({ads: {}})")
    timeouts = [
        seconds(getattr(dynamic, f), "initial_fetch_timeout", 15.0, dctx.at(f))
        for f in ("lds_config", "cds_config")
    ]
    return AdsSource(
        cluster=name,
        delta=api_types[ads.api_type],
        listeners=dynamic.HasField("lds_config"),
        clusters=dynamic.HasField("cds_config"),
        initial_fetch_timeout=max(timeouts),
    )


def _check_plaintext_services(
    listeners: tuple[Listener, ...], clusters: tuple[Cluster, ...], ctx: Ctx
) -> None:
    problem = plaintext_service_problem(listeners, clusters)
    if problem is not None:
        raise ctx.at(problem[0]).error(problem[1])


def plaintext_service_problem(
    listeners: Iterable[Listener], clusters: Iterable[Cluster]
) -> tuple[int, str] | None:
    """The rate limit service and trace collectors are reached by clients of their own
    (grpcio, a small HTTP client) that do not speak TLS yet: a TLS cluster there is refused
    rather than used in plaintext. Returns (listener index, reason) of the first such use.
    (The proxy runs this on every config it applies, listeners and clusters from xDS too.)"""
    tls = {c.name for c in clusters if c.tls is not None}
    if not tls:
        return None
    for index, listener in enumerate(listeners):
        managers = [
            listener.filter,
            *(chain.filter for chain in listener.protocol_chains),
            *(chain.filter for chain in listener.server_name_chains),
        ]
        for manager in managers:
            if not isinstance(manager, HttpConnectionManager):
                continue
            used = [
                ("the rate limit service", f.config.cluster)
                for f in manager.http_filters
                if isinstance(f.config, GlobalRateLimit)
            ]
            if manager.tracing is not None:
                used.append(("the trace collector", manager.tracing.provider.cluster))
            for what, name in used:
                if name in tls:
                    return index, (
                        f"cluster {name!r} has a TLS transport_socket: TLS to {what} is"
                        " not supported yet"
                    )
    return None


def _admin(admin: Message, ctx: Ctx) -> Admin | None:
    """No admin address means no admin listener, as in Envoy; the first file log is used."""
    if not admin.HasField("address"):
        return None
    logs = access_logs(admin.access_log, ctx.at("access_log"))
    return Admin(
        address=socket_address(admin.address, ctx.at("address")),
        access_log_path=str(admin.access_log_path) or (logs[0].path if logs else None),
    )
