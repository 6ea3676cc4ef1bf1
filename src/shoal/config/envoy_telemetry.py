"""Telemetry config: Shoal's ``istio_stats`` filter and the connection manager's ``tracing``.

Internal to :mod:`shoal.config.envoy`. The Istio stats filter is Shoal's own extension, an
``xds.type.v3.TypedStruct`` (type URL :data:`ISTIO_STATS_TYPE_URL`) used as an HTTP filter
or as a network filter in front of ``tcp_proxy`` / ``generic_proxy``, as Istio places its
``istio.stats`` filter. Tracing reads Envoy's own ``ZipkinConfig`` and
``OpenTelemetryConfig``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from envoy.config.trace.v3 import opentelemetry_pb2, zipkin_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from shoal.config.envoy_fields import (
    Ctx,
    cluster_ref,
    duration,
    flag,
    percent,
    required,
    typed_config,
    uint,
)
from shoal.config.model import (
    CustomTag,
    IstioStats,
    OpenTelemetryTracer,
    Tracing,
    ZipkinTracer,
)

ISTIO_STATS_TYPE_URL = "type.shoal.io/shoal.filters.v1.IstioStats"
_REPORTERS = ("source", "destination")
_ZIPKIN = zipkin_pb2.ZipkinConfig


def istio_stats(struct: Message, ctx: Ctx) -> IstioStats:
    """An unpacked TypedStruct that must be Shoal's IstioStats: ``{reporter: source}`` on
    outbound listeners, ``{reporter: destination}`` on inbound ones."""
    if struct.type_url != ISTIO_STATS_TYPE_URL:
        raise ctx.at("type_url").error(
            f"unknown filter {struct.type_url!r}; Shoal's filter is {ISTIO_STATS_TYPE_URL}"
        )
    options: dict[str, Any] = json_format.MessageToDict(struct.value)
    unknown = sorted(set(options) - {"reporter"})
    if unknown:
        raise ctx.at("value", unknown[0]).error("unknown option (IstioStats has only reporter)")
    reporter = options.get("reporter")
    if reporter not in _REPORTERS:
        raise ctx.at("value", "reporter").error(
            f"reporter must be 'source' (outbound) or 'destination' (inbound), not {reporter!r}"
        )
    return IstioStats(reporter)


def tracing(hcm: Message, ctx: Ctx) -> Tracing | None:
    """The connection manager's ``tracing``, with Envoy's defaults (100% sampling)."""
    if not hcm.HasField("tracing"):
        return None
    config, here = hcm.tracing, ctx.at("tracing")
    if flag(config, "spawn_upstream_span", False):
        raise here.at("spawn_upstream_span").error("spawn_upstream_span is not supported yet")
    if not config.HasField("provider"):
        raise here.at("provider").error(
            "provider is required (envoy.tracers.zipkin or envoy.tracers.opentelemetry)"
        )
    provider_ctx = here.at("provider")
    message = typed_config(
        config.provider, provider_ctx, _ZIPKIN, opentelemetry_pb2.OpenTelemetryConfig
    )
    provider_ctx = provider_ctx.at("typed_config")
    provider: ZipkinTracer | OpenTelemetryTracer
    if isinstance(message, _ZIPKIN):
        provider = _zipkin(message, provider_ctx)
    else:
        provider = _opentelemetry(message, provider_ctx)
    tags_ctx = here.at("custom_tags")
    return Tracing(
        provider=provider,
        client_sampling=percent(config, "client_sampling", 100.0, here) / 100.0,
        random_sampling=percent(config, "random_sampling", 100.0, here) / 100.0,
        overall_sampling=percent(config, "overall_sampling", 100.0, here) / 100.0,
        custom_tags=tuple(_custom_tag(t, tags_ctx.at(i)) for i, t in enumerate(config.custom_tags)),
        max_path_tag_length=uint(config, "max_path_tag_length", 256, here, lo=1),
    )


def _zipkin(config: Message, ctx: Ctx) -> ZipkinTracer:
    if config.collector_endpoint_version != _ZIPKIN.HTTP_JSON:
        raise ctx.at("collector_endpoint_version").error(
            "collector_endpoint_version must be HTTP_JSON (Zipkin v2 JSON; HTTP_PROTO and GRPC"
            " are not supported)"
        )
    endpoint = required(str(config.collector_endpoint), ctx.at("collector_endpoint"), "endpoint")
    if not endpoint.startswith("/"):
        raise ctx.at("collector_endpoint").error("must be a path, such as /api/v2/spans")
    return ZipkinTracer(
        cluster=cluster_ref(str(config.collector_cluster), ctx.at("collector_cluster")),
        endpoint=endpoint,
        hostname=str(config.collector_hostname),
        trace_id_128bit=bool(config.trace_id_128bit),
        shared_span_context=flag(config, "shared_span_context", True),
        w3c=config.trace_context_option == _ZIPKIN.USE_B3_WITH_W3C_PROPAGATION,
    )


def _opentelemetry(config: Message, ctx: Ctx) -> OpenTelemetryTracer:
    name = str(config.service_name) or "unknown_service:envoy"
    if config.HasField("grpc_service") == config.HasField("http_service"):
        raise ctx.error("exactly one of grpc_service or http_service is required")
    if config.HasField("grpc_service"):
        here = ctx.at("grpc_service")
        if not config.grpc_service.HasField("envoy_grpc"):
            raise here.at("envoy_grpc").error("envoy_grpc is required")
        cluster = config.grpc_service.envoy_grpc.cluster_name
        return OpenTelemetryTracer(
            cluster=cluster_ref(str(cluster), here.at("envoy_grpc", "cluster_name")),
            service_name=name,
            timeout=duration(config.grpc_service, "timeout", here) or 5.0,
        )
    here = ctx.at("http_service", "http_uri")
    uri = config.http_service.http_uri
    parts = urlsplit(required(str(uri.uri), here.at("uri"), "uri"))
    if parts.scheme != "http" or not parts.path:
        raise here.at("uri").error("uri must be http://HOST[:PORT]/PATH (OTLP/HTTP, no TLS)")
    timeout = duration(uri, "timeout", here)
    if not timeout:
        raise here.at("timeout").error("timeout is required and must be greater than 0")
    return OpenTelemetryTracer(
        cluster=cluster_ref(str(uri.cluster), here.at("cluster")),
        service_name=name,
        path=parts.path,
        authority=parts.netloc,
        timeout=timeout,
    )


def _custom_tag(tag: Message, ctx: Ctx) -> CustomTag:
    name = required(str(tag.tag), ctx.at("tag"), "tag")
    kind = tag.WhichOneof("type")
    if kind == "literal":
        return CustomTag(name, value=str(tag.literal.value))
    if kind == "request_header":
        header = tag.request_header
        here = ctx.at(kind)
        return CustomTag(
            name,
            value=str(header.default_value),
            header=required(str(header.name), here.at("name"), "name").lower(),
        )
    raise ctx.error("one of literal or request_header is required")
