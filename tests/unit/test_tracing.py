"""Tracing: context propagation (B3, W3C), sampling, span shapes and tags as Envoy makes
them, the two encodings, the exporter's queue, and the connection manager's config."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from tests.conftest import bootstrap, free_port, http_listener, route_to, static_cluster

from shoal.config.envoy import bootstrap_from_dict
from shoal.config.model import (
    CustomTag,
    HttpConnectionManager,
    OpenTelemetryTracer,
    Tracing,
    ZipkinTracer,
)
from shoal.errors import ConfigError
from shoal.observe import export
from shoal.observe.export import SpanExporter
from shoal.observe.tracing import (
    FinishedSpan,
    LocalInfo,
    PendingSpan,
    Span,
    Tracer,
    finished,
    otlp_request,
    trace_id_of,
    zipkin_json,
)

ZIPKIN = ZipkinTracer(cluster="zipkin", endpoint="/api/v2/spans")
OTEL = OpenTelemetryTracer(cluster="otel", service_name="shop")
TRACE = "463ac35c9f6413ad48485a3953bb6124"
CALLER = "a2fb4a1d1a96d312"
GRANDPARENT = "0020000000000001"


@dataclass
class Sink:
    pending: list[PendingSpan] = field(default_factory=list)

    def add(self, pending: PendingSpan) -> None:
        self.pending.append(pending)


def tracer(provider: Any = ZIPKIN, egress: bool = False, **config: Any) -> Tracer:
    return Tracer(Tracing(provider, **config), egress, LocalInfo("sidecar~1", "shop"), Sink())


def start(t: Tracer, **headers: str) -> Span:
    return t.start([(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()])


def lines(data: bytes) -> dict[str, str]:
    pairs = (line.split(": ", 1) for line in data.decode().splitlines())
    return {name: value for name, value in pairs}


# --- propagation ------------------------------------------------------------------------------


def test_zipkin_ingress_shares_the_callers_span() -> None:
    t = tracer()
    span = start(
        t, x_b3_traceid=TRACE, x_b3_spanid=CALLER, x_b3_parentspanid=GRANDPARENT, x_b3_sampled="1"
    )
    assert (span.trace_id, span.span_id, span.parent_id, span.shared) == (
        TRACE,
        CALLER,
        GRANDPARENT,
        True,
    )
    assert lines(t.headers(span)) == {
        "x-b3-traceid": TRACE,
        "x-b3-spanid": CALLER,
        "x-b3-parentspanid": GRANDPARENT,
        "x-b3-sampled": "1",
    }


def test_zipkin_child_spans_egress_and_unshared() -> None:
    for t in (tracer(egress=True), tracer(ZipkinTracer("z", "/", shared_span_context=False))):
        span = start(t, x_b3_traceid=TRACE, x_b3_spanid=CALLER)
        assert span.trace_id == TRACE and span.parent_id == CALLER and not span.shared
        assert span.span_id not in (CALLER, "") and len(span.span_id) == 16


def test_zipkin_new_trace_uses_the_span_id_as_64_bit_trace_id() -> None:
    span = start(tracer())
    assert span.trace_id == span.span_id and span.parent_id == ""
    long = start(tracer(ZipkinTracer("z", "/", trace_id_128bit=True)))
    assert len(long.trace_id) == 32


def test_single_b3_header_in_single_b3_header_out() -> None:
    t = tracer(egress=True)
    span = start(t, b3=f"{TRACE}-{CALLER}-1-{GRANDPARENT}")
    assert span.trace_id == TRACE and span.parent_id == CALLER and span.b3_single
    assert lines(t.headers(span)) == {"b3": f"{TRACE}-{span.span_id}-1-{CALLER}"}


@pytest.mark.parametrize(
    "headers",
    [
        {"x_b3_traceid": TRACE, "x_b3_spanid": CALLER, "x_b3_sampled": "0"},
        {"b3": f"{TRACE}-{CALLER}-0"},
        {"b3": "0"},
        {"x_b3_sampled": "0"},
    ],
)
def test_an_incoming_not_sampled_is_honoured(headers: dict[str, str]) -> None:
    t = tracer()  # 100% sampling
    span = start(t, **headers)
    assert not span.sampled
    out = lines(t.headers(span))
    assert out.get("x-b3-sampled") == "0" or out["b3"].split("-")[2] == "0"


def test_debug_flag_and_textual_sampled_values() -> None:
    t = tracer(random_sampling=0.0)
    assert start(t, x_b3_traceid=TRACE, x_b3_spanid=CALLER, x_b3_flags="1").sampled
    assert start(t, x_b3_traceid=TRACE, x_b3_spanid=CALLER, x_b3_sampled="true").sampled


@pytest.mark.parametrize(
    "headers",
    [
        {"x_b3_traceid": "xyz", "x_b3_spanid": CALLER},
        {"x_b3_traceid": "0" * 32, "x_b3_spanid": CALLER},
        {"x_b3_traceid": TRACE, "x_b3_spanid": "short"},
        {"b3": "not-a-context-at-all-x"},
    ],
)
def test_malformed_b3_starts_a_new_trace(headers: dict[str, str]) -> None:
    span = start(tracer(), **headers)
    assert span.trace_id != TRACE and span.parent_id == ""


def test_w3c_context_is_continued_by_opentelemetry() -> None:
    t = tracer(OTEL, egress=True)
    span = start(t, traceparent=f"00-{TRACE}-{CALLER}-01", tracestate="k=v")
    assert (span.trace_id, span.parent_id, span.sampled) == (TRACE, CALLER, True)
    assert lines(t.headers(span)) == {
        "traceparent": f"00-{TRACE}-{span.span_id}-01",
        "tracestate": "k=v",
    }
    unsampled = start(t, traceparent=f"00-{TRACE}-{CALLER}-00")
    assert not unsampled.sampled
    assert lines(t.headers(unsampled))["traceparent"].endswith("-00")


@pytest.mark.parametrize(
    "traceparent",
    [
        f"00-{TRACE.upper()}-{CALLER}-01",
        f"00-{'0' * 32}-{CALLER}-01",
        f"00-{TRACE}-{'0' * 16}-01",
        f"ff-{TRACE}-{CALLER}-01",
        f"00-{TRACE}-{CALLER}-01-extra",
    ],
)
def test_invalid_traceparent_starts_a_new_trace(traceparent: str) -> None:
    span = start(tracer(OTEL), traceparent=traceparent)
    assert span.trace_id != TRACE and len(span.trace_id) == 32 and span.parent_id == ""


def test_future_traceparent_versions_are_read_as_00() -> None:
    span = start(tracer(OTEL), traceparent=f"01-{TRACE}-{CALLER}-01-future")
    assert span.trace_id == TRACE


def test_each_tracer_reads_only_its_own_format() -> None:
    zipkin = start(tracer(), traceparent=f"00-{TRACE}-{CALLER}-01")
    assert zipkin.trace_id != TRACE  # Envoy's Zipkin tracer reads B3 only
    both = tracer(ZipkinTracer("z", "/", w3c=True), egress=True)  # USE_B3_WITH_W3C_...
    span = start(both, traceparent=f"00-{TRACE}-{CALLER}-01")
    assert span.trace_id == TRACE
    assert set(lines(both.headers(span))) == {
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "traceparent",
    }
    otel = start(tracer(OTEL), x_b3_traceid=TRACE, x_b3_spanid=CALLER)
    assert otel.trace_id != TRACE


# --- sampling ---------------------------------------------------------------------------------


def test_sampling_shares() -> None:
    never = tracer(random_sampling=0.0)
    assert not any(start(never).sampled for _ in range(200))
    assert all(start(tracer()).sampled for _ in range(200))
    half = sum(start(tracer(random_sampling=0.5)).sampled for _ in range(2000))
    assert 800 < half < 1200
    forced = tracer(random_sampling=0.0, client_sampling=1.0)
    assert start(forced, x_client_trace_id="abc").sampled
    assert not start(tracer(overall_sampling=0.0), x_client_trace_id="abc").sampled


def test_an_unsampled_request_still_carries_context_upstream() -> None:
    t = tracer(random_sampling=0.0)
    span = start(t)
    assert lines(t.headers(span))["x-b3-sampled"] == "0"


# --- finished spans -----------------------------------------------------------------------------


@dataclass
class Exchange:
    """What the proxy's exchange shows a tracer when the request ends."""

    status: int = 200
    response_flags: str = "-"
    headers: dict[str, str] = field(default_factory=dict)
    start_time: float = 1_700_000_000.25
    duration: float = 0.0125
    method: str = "GET"
    path: str = "/api/items?id=7"
    protocol: str = "HTTP/1.1"
    bytes_received: int = 3
    bytes_sent: int = 1234
    upstream_cluster: str = "outbound|80||shop"
    downstream_remote: str = "10.0.0.9:51234"
    downstream_local: str = "10.0.0.1:15001"

    def request_header(self, name: str) -> str | None:
        return self.headers.get(name)


def ended(t: Tracer, exchange: Exchange, **headers: str) -> FinishedSpan:
    """The span of a request that ended, as its exporter sends it."""
    span = start(t, **headers)
    t.finish(span, exchange, "shop.example:80")  # type: ignore[arg-type]
    sink = t.sink
    assert isinstance(sink, Sink)
    assert sink.pending[-1][1] is span and sink.pending[-1][2] is exchange  # tags come later
    return finished(sink.pending[-1])


def test_envoys_tags_and_span_fields() -> None:
    exchange = Exchange(
        headers={"x-request-id": "rid-1", "user-agent": "curl/8", "x-foo": "bar"}, status=503
    )
    custom = (CustomTag("lit", value="x"), CustomTag("hdr", header="x-foo", value="none"))
    span = ended(tracer(custom_tags=custom), exchange)
    assert span.tags == {
        "component": "proxy",
        "node_id": "sidecar~1",
        "guid:x-request-id": "rid-1",
        "http.url": "http://shop.example:80/api/items?id=7",
        "http.method": "GET",
        "http.protocol": "HTTP/1.1",
        "downstream_cluster": "-",
        "user_agent": "curl/8",
        "peer.address": "10.0.0.9",
        "request_size": "3",
        "response_size": "1234",
        "upstream_cluster": "outbound|80||shop",
        "upstream_cluster.name": "outbound|80||shop",
        "http.status_code": "503",
        "response_flags": "-",
        "lit": "x",
        "hdr": "bar",
        "error": "true",
    }
    assert (span.start_us, span.duration_us) == (1_700_000_000_250_000, 12_500)
    assert span.name == "shop.example:80" and not span.client and span.local_ip == "10.0.0.1"


def test_custom_header_default_and_path_length_and_names() -> None:
    t = tracer(
        OTEL,
        egress=True,
        custom_tags=(CustomTag("hdr", header="x-foo", value="none"),),
        max_path_tag_length=4,
    )
    span = ended(t, Exchange())
    assert span.tags["hdr"] == "none" and "error" not in span.tags
    assert span.tags["http.url"] == "http://shop.example:80/api"
    assert span.name == "egress shop.example:80" and span.client
    assert ended(tracer(OTEL), Exchange()).name == "ingress"


# --- encodings ----------------------------------------------------------------------------------


def sample_span(**changes: Any) -> FinishedSpan:
    values: dict[str, Any] = {
        "trace_id": TRACE,
        "span_id": CALLER,
        "parent_id": GRANDPARENT,
        "name": "ingress",
        "client": False,
        "start_us": 1_000_000,
        "duration_us": 250,
        "tags": {"http.status_code": "500", "error": "true"},
        "shared": True,
        "local_ip": "127.0.0.1",
        **changes,
    }
    return FinishedSpan(**values)


def test_zipkin_v2_json() -> None:
    [item] = json.loads(zipkin_json([sample_span()], "shop"))
    assert item == {
        "traceId": TRACE,
        "id": CALLER,
        "parentId": GRANDPARENT,
        "name": "ingress",
        "kind": "SERVER",
        "timestamp": 1_000_000,
        "duration": 250,
        "shared": True,
        "localEndpoint": {"serviceName": "shop", "ipv4": "127.0.0.1", "port": 0},
        "tags": {"http.status_code": "500", "error": "true"},
    }
    [root] = json.loads(zipkin_json([sample_span(parent_id="", shared=False, client=True)], "s"))
    assert "parentId" not in root and "shared" not in root and root["kind"] == "CLIENT"


def test_otlp_request() -> None:
    data = otlp_request([sample_span(trace_id=CALLER, tracestate="k=v")], "shop", "1.0")
    request = trace_service_pb2.ExportTraceServiceRequest.FromString(data)
    [resource_spans] = request.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "shop"
    [library] = resource_spans.instrumentation_library_spans
    [span] = library.spans
    assert span.trace_id.hex() == CALLER.rjust(32, "0")  # 64-bit ids are left-padded
    assert span.span_id.hex() == CALLER and span.parent_span_id.hex() == GRANDPARENT
    assert span.kind == span.SPAN_KIND_SERVER and span.status.code == span.status.STATUS_CODE_ERROR
    assert span.trace_state == "k=v"
    assert (span.start_time_unix_nano, span.end_time_unix_nano) == (10**9, 10**9 + 250_000)


def test_trace_id_for_access_logs() -> None:
    headers = {"traceparent": f"00-{TRACE}-{CALLER}-01", "x-b3-traceid": "1" * 16}
    assert trace_id_of(headers.get) == TRACE  # W3C first
    assert trace_id_of({"x-b3-traceid": "1" * 16, "x-b3-spanid": CALLER}.get) == "1" * 16
    assert trace_id_of({}.get) is None


# --- the exporter -------------------------------------------------------------------------------


class Collector:
    """A real HTTP endpoint on loopback that keeps what is POSTed."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.status = b"202 Accepted"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        self.bodies.append(await reader.readexactly(length))
        writer.write(b"HTTP/1.1 " + self.status + b"\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()


async def exporter_run(collector: Collector, spans: int, port: int) -> SpanExporter:
    server = await asyncio.start_server(collector.handle, "127.0.0.1", port)
    exporter = SpanExporter(ZIPKIN, "shop")
    exporter.resolve = lambda: ("127.0.0.1", port)
    t = Tracer(Tracing(ZIPKIN), False, LocalInfo(), exporter)
    for _ in range(spans):
        t.finish(start(t), Exchange(), "shop")  # type: ignore[arg-type]
    await asyncio.sleep(export.FLUSH_INTERVAL + 0.3)
    await exporter.close()
    server.close()
    return exporter


def test_exporter_batches_on_its_timer_and_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "FLUSH_INTERVAL", 0.05)
    collector = Collector()
    exporter = asyncio.run(exporter_run(collector, 3, free_port()))
    assert [len(json.loads(body)) for body in collector.bodies] == [3]
    assert exporter.counters["spans_sent"] == 3 and exporter.counters["reports_sent"] == 1
    assert exporter.counters["timer_flushed"] == 1


def test_exporter_queue_is_bounded_and_failures_are_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(export, "FLUSH_INTERVAL", 0.05)
    monkeypatch.setattr(export, "MAX_QUEUE", 5)
    monkeypatch.setattr(export, "BATCH", 100)
    collector = Collector()
    collector.status = b"500 Internal Server Error"
    exporter = asyncio.run(exporter_run(collector, 8, free_port()))
    assert exporter.counters["spans_dropped"] == 3
    assert exporter.counters["reports_failed"] == 1 and exporter.counters["spans_sent"] == 0
    assert len(json.loads(collector.bodies[0])) == 5


def test_exporter_without_collector_host_skips() -> None:
    async def run() -> SpanExporter:
        exporter = SpanExporter(ZIPKIN, "shop")  # resolves to nothing
        t = Tracer(Tracing(ZIPKIN), False, LocalInfo(), exporter)
        t.finish(start(t), Exchange(), "shop")  # type: ignore[arg-type]
        await exporter.close()
        return exporter

    assert asyncio.run(run()).counters["reports_skipped_no_cluster"] == 1


# --- config -----------------------------------------------------------------------------------

ZIPKIN_CONFIG = {
    "name": "envoy.tracers.zipkin",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
        "collector_cluster": "zipkin",
        "collector_endpoint": "/api/v2/spans",
        "collector_endpoint_version": "HTTP_JSON",
    },
}


def otel_config(**service: Any) -> dict[str, Any]:
    return {
        "name": "envoy.tracers.opentelemetry",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
            **service,
        },
    }


def config_with(tracing: dict[str, Any], direction: str | None = None) -> dict[str, Any]:
    listener = http_listener(
        10000, [{"name": "all", "domains": ["*"], "routes": [route_to("b")]}], tracing=tracing
    )
    if direction:
        listener["traffic_direction"] = direction
    clusters = [static_cluster(name, 8080) for name in ("b", "zipkin", "otel")]
    return bootstrap([listener], clusters, 9901)


def manager_of(config: dict[str, Any]) -> HttpConnectionManager:
    manager = bootstrap_from_dict(config).listeners[0].filter
    assert isinstance(manager, HttpConnectionManager)
    return manager


def test_tracing_config_zipkin() -> None:
    tracing = {
        "provider": ZIPKIN_CONFIG,
        "random_sampling": {"value": 1},
        "overall_sampling": {"value": 50},
        "custom_tags": [
            {"tag": "env", "literal": {"value": "prod"}},
            {"tag": "tenant", "request_header": {"name": "X-Tenant", "default_value": "-"}},
        ],
        "max_path_tag_length": 64,
    }
    config = config_with(tracing, "OUTBOUND")
    assert bootstrap_from_dict(config).listeners[0].traffic_direction == "outbound"
    assert manager_of(config).tracing == Tracing(
        provider=ZIPKIN,
        random_sampling=0.01,
        overall_sampling=0.5,
        custom_tags=(CustomTag("env", "prod"), CustomTag("tenant", "-", "x-tenant")),
        max_path_tag_length=64,
    )


def test_tracing_config_opentelemetry_grpc_and_http() -> None:
    grpc = otel_config(grpc_service={"envoy_grpc": {"cluster_name": "otel"}, "timeout": "2s"})
    assert manager_of(config_with({"provider": grpc})).tracing == Tracing(
        OpenTelemetryTracer("otel", timeout=2.0)
    )
    http = otel_config(
        http_service={
            "http_uri": {
                "uri": "http://collector:4318/v1/traces",
                "cluster": "otel",
                "timeout": "1s",
            }
        },
        service_name="shop",
    )
    assert manager_of(config_with({"provider": http})).tracing == Tracing(
        OpenTelemetryTracer(
            "otel", service_name="shop", path="/v1/traces", authority="collector:4318", timeout=1.0
        )
    )


TRACING = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.tracing"


@pytest.mark.parametrize(
    ("tracing", "field", "reason"),
    [
        ({}, "provider", "provider is required"),
        ({"provider": ZIPKIN_CONFIG, "spawn_upstream_span": True}, "spawn_upstream_span", "not"),
        ({"provider": ZIPKIN_CONFIG, "verbose": True}, "verbose", "not supported"),
        (
            {"provider": ZIPKIN_CONFIG, "random_sampling": {"value": 101}},
            "random_sampling.value",
            r"\[0, 100\]",
        ),
        (
            {
                "provider": ZIPKIN_CONFIG,
                "custom_tags": [{"tag": "e", "environment": {"name": "X"}}],
            },
            "custom_tags[0].environment",
            "only literal and request_header",
        ),
        (
            {"provider": otel_config(grpc_service={"envoy_grpc": {"cluster_name": "nope"}})},
            "provider.typed_config.grpc_service.envoy_grpc.cluster_name",
            "unknown cluster 'nope'",
        ),
        ({"provider": otel_config()}, "provider.typed_config", "exactly one of"),
        (
            {"provider": otel_config(sampler={"name": "s"})},
            "provider.typed_config.sampler",
            "sampler extensions are not supported",
        ),
    ],
)
def test_tracing_config_errors(tracing: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as info:
        bootstrap_from_dict(config_with(tracing))
    assert info.value.field == f"{TRACING}.{field}"


def test_zipkin_needs_http_json_as_envoy_does() -> None:
    legacy = json.loads(json.dumps(ZIPKIN_CONFIG))
    del legacy["typed_config"]["collector_endpoint_version"]
    with pytest.raises(ConfigError, match="must be HTTP_JSON"):
        bootstrap_from_dict(config_with({"provider": legacy}))
