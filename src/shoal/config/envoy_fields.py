"""Shared pieces of the Envoy translation: field paths, Any unpacking and field readers.

Internal to :mod:`shoal.config.envoy`; each reader applies Envoy's default and bounds so the
translators stay declarative.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TypeVar

from envoy.config.trace.v3 import opentelemetry_pb2, zipkin_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.http.adaptive_concurrency.v3 import adaptive_concurrency_pb2
from envoy.extensions.filters.http.buffer.v3 import buffer_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.http_inspector.v3 import http_inspector_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.generic_proxy.action.v3 import action_pb2
from envoy.extensions.filters.network.generic_proxy.codecs.dubbo.v3 import dubbo_pb2
from envoy.extensions.filters.network.generic_proxy.matcher.v3 import matcher_pb2
from envoy.extensions.filters.network.generic_proxy.router.v3 import (
    router_pb2 as generic_router_pb2,
)
from envoy.extensions.filters.network.generic_proxy.v3 import generic_proxy_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf.message import DecodeError, Message
from xds.type.v3 import typed_struct_pb2

from shoal.config.model import Keepalive, Seconds, SocketAddress, WeightedCluster
from shoal.errors import ConfigError

T = TypeVar("T")

NOT_YET = "not supported yet"
_UINT32_MAX = 2**32 - 1

# typed_config types shoal understands; importing their modules also registers them with the
# descriptor pool, which ParseDict needs to resolve "@type".
EXTENSIONS: dict[str, type[Message]] = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (
        hcm_pb2.HttpConnectionManager,
        tcp_proxy_pb2.TcpProxy,
        router_pb2.Router,
        buffer_pb2.Buffer,
        fault_pb2.HTTPFault,
        local_rate_limit_pb2.LocalRateLimit,
        adaptive_concurrency_pb2.AdaptiveConcurrency,
        rate_limit_pb2.RateLimit,
        file_pb2.FileAccessLog,
        http_protocol_options_pb2.HttpProtocolOptions,
        previous_hosts_pb2.PreviousHostsPredicate,
        http_inspector_pb2.HttpInspector,
        tls_inspector_pb2.TlsInspector,
        tls_pb2.DownstreamTlsContext,
        tls_pb2.UpstreamTlsContext,
        raw_buffer_pb2.RawBuffer,
        typed_struct_pb2.TypedStruct,
        generic_proxy_pb2.GenericProxy,
        generic_router_pb2.Router,
        action_pb2.RouteAction,
        dubbo_pb2.DubboCodecConfig,
        matcher_pb2.ServiceMatchInput,
        matcher_pb2.HostMatchInput,
        matcher_pb2.PathMatchInput,
        matcher_pb2.MethodMatchInput,
        matcher_pb2.PropertyMatchInput,
        zipkin_pb2.ZipkinConfig,
        opentelemetry_pb2.OpenTelemetryConfig,
    )
}


@dataclass(frozen=True, slots=True)
class Ctx:
    """The source and dotted field path being translated, plus the cluster names that
    routes may use (None: do not check)."""

    source: str
    path: str
    clusters: frozenset[str] | None = None

    def at(self, *parts: str | int) -> Ctx:
        path = self.path
        for part in parts:
            if isinstance(part, int):
                path = f"{path}[{part}]"
            else:
                path = f"{path}.{part}" if path else part
        return replace(self, path=path)

    def error(self, reason: str) -> ConfigError:
        return ConfigError(reason, field=self.path, source=self.source)


def unpack(packed: Message, ctx: Ctx, *expected: type[Message]) -> Message:
    """Unpack an Any holding one of the extensions shoal knows (and, if given, expects here)."""
    type_name = packed.TypeName()
    cls = EXTENSIONS.get(type_name)
    if cls is None:
        raise ctx.error(f"unsupported extension type {type_name}")
    if expected and cls not in expected:
        wanted = " or ".join(e.DESCRIPTOR.full_name for e in expected)
        raise ctx.error(f"{type_name} cannot be used here; expected {wanted}")
    message = cls()
    try:
        packed.Unpack(message)
    except DecodeError as exc:
        raise ctx.error(f"cannot decode {type_name}: {exc}") from exc
    return message


def typed_config(owner: Message, ctx: Ctx, *expected: type[Message]) -> Message:
    """The unpacked ``typed_config`` of a filter or extension entry (Envoy requires it)."""
    if not owner.HasField("typed_config"):
        raise ctx.at("typed_config").error("typed_config is required")
    return unpack(owner.typed_config, ctx.at("typed_config"), *expected)


def duration(msg: Message, name: str, ctx: Ctx) -> Seconds | None:
    """A Duration field in seconds, or None when unset; Envoy rejects negative ones."""
    if not msg.HasField(name):
        return None
    value = getattr(msg, name)
    total = float(value.seconds + value.nanos / 1e9)
    if total < 0:
        raise ctx.at(name).error("duration must not be negative")
    return total


def seconds(
    msg: Message, name: str, default: Seconds, ctx: Ctx, *, positive: bool = False
) -> Seconds:
    """A Duration with Envoy's default when unset; ``positive`` rejects 0 as Envoy does."""
    value = duration(msg, name, ctx)
    if value is None:
        return default
    if positive and value == 0:
        raise ctx.at(name).error("duration must be greater than 0")
    return value


def timeout(msg: Message, name: str, default: Seconds | None, ctx: Ctx) -> Seconds | None:
    """A timeout that is ``default`` when unset and disabled (None) when 0, as in Envoy."""
    value = duration(msg, name, ctx)
    if value is None:
        return default
    return value or None


def keepalive(options: Message, ctx: Ctx) -> Keepalive | None:
    """``Http2ProtocolOptions.connection_keepalive``: PINGs only with an ``interval`` (as in
    Envoy), answered within ``timeout`` (required)."""
    if not options.HasField("connection_keepalive"):
        return None
    settings, here = options.connection_keepalive, ctx.at("connection_keepalive")
    interval = duration(settings, "interval", here)
    wait = duration(settings, "timeout", here)
    if not wait:
        raise here.at("timeout").error("timeout is required and must be greater than 0")
    if not interval:
        raise here.at("interval").error(
            "only periodic PINGs are supported: interval is required and greater than 0"
        )
    return Keepalive(interval, wait)


def uint(
    msg: Message, name: str, default: int, ctx: Ctx, *, lo: int = 0, hi: int = _UINT32_MAX
) -> int:
    """An integer wrapper field (UInt32Value, ...) within Envoy's bounds, ``default`` if unset."""
    if not msg.HasField(name):
        return default
    value = int(getattr(msg, name).value)
    if not lo <= value <= hi:
        raise ctx.at(name).error(f"{value} is out of range [{lo}, {hi}]")
    return value


def percent(msg: Message, name: str, default: float, ctx: Ctx) -> float:
    """An ``envoy.type.v3.Percent`` field (0..100), ``default`` when unset."""
    if not msg.HasField(name):
        return default
    value = float(getattr(msg, name).value)
    if not 0.0 <= value <= 100.0:
        raise ctx.at(name, "value").error("must be in [0, 100]")
    return value


def flag(msg: Message, name: str, default: bool) -> bool:
    """A BoolValue field, ``default`` when unset."""
    return bool(getattr(msg, name).value) if msg.HasField(name) else default


def choice(table: Mapping[int, T], msg: Message, name: str, ctx: Ctx) -> T:
    """An enum field mapped through ``table``; values shoal lacks are errors naming them."""
    value = getattr(msg, name)
    if value not in table:
        known = msg.DESCRIPTOR.fields_by_name[name].enum_type.values_by_number
        label = known[value].name if value in known else str(value)
        raise ctx.at(name).error(f"{label} is {NOT_YET}")
    return table[value]


def required(value: str, ctx: Ctx, what: str) -> str:
    if not value:
        raise ctx.error(f"{what} is required")
    return value


def compile_regex(matcher: Message, ctx: Ctx) -> re.Pattern[str]:
    """Compile a RegexMatcher once (Python ``re``; the router uses full-match semantics)."""
    try:
        return re.compile(matcher.regex)
    except re.error as exc:
        raise ctx.at("regex").error(f"invalid regex {matcher.regex!r}: {exc}") from exc


def data_source(source: Message) -> bytes:
    """An inline DataSource (files and environment variables are rejected by the check)."""
    if source.WhichOneof("specifier") == "inline_bytes":
        return bytes(source.inline_bytes)
    return str(source.inline_string).encode()


def socket_address(
    address: Message, ctx: Ctx, *, ip_only: bool = True, min_port: int = 0
) -> SocketAddress:
    """Listeners and STATIC endpoints need IP literals (Envoy does not resolve them)."""
    if not address.HasField("socket_address"):
        raise ctx.at("socket_address").error("socket_address is required")
    sa = address.socket_address
    ctx = ctx.at("socket_address")
    host = required(str(sa.address), ctx.at("address"), "address")
    if ip_only:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ctx.at("address").error(f"{host!r} is not an IP address") from None
    port = int(sa.port_value)
    if not min_port <= port <= 65535:
        raise ctx.at("port_value").error(f"port {port} is out of range [{min_port}, 65535]")
    return SocketAddress(host, port)


def unique(values: Iterable[str], ctx: Ctx, field: str, what: str) -> None:
    """Envoy rejects duplicate listener/cluster names and addresses; blanks are not compared."""
    seen: set[str] = set()
    for index, value in enumerate(values):
        if value in seen:
            raise ctx.at(index, field).error(f"duplicate {what} {value!r}")
        if value:
            seen.add(value)


def cluster_ref(name: str, ctx: Ctx) -> str:
    """A cluster name used by a route or TCP proxy; unknown names are errors, as in Envoy's
    static config."""
    required(name, ctx, "cluster name")
    if ctx.clusters is not None and name not in ctx.clusters:
        raise ctx.error(f"unknown cluster {name!r}")
    return name


def total_weight(clusters: tuple[WeightedCluster, ...], ctx: Ctx) -> int:
    total = sum(c.weight for c in clusters)
    if total == 0:
        raise ctx.error("cluster weights must not sum to 0")
    return total
