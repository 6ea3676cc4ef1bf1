"""Distributed tracing as Envoy does it: one span per proxy hop, B3 or W3C propagation.

A request's span is started when its head arrives (:meth:`Tracer.start`): the incoming
context is read (B3 multi-header or single ``b3`` for Zipkin, W3C ``traceparent`` /
``tracestate`` for OpenTelemetry), a sampling decision is taken unless the request carries
one (an incoming "not sampled" is honoured), and ids are drawn. The context always goes
upstream, sampled or not (:meth:`Tracer.headers`). Only a sampled span is recorded when
the request ends (:meth:`Tracer.finish`), with Envoy's tags, and handed to an exporter;
encoding into Zipkin v2 JSON or OTLP happens when the exporter flushes, off the request.

Span shapes follow Envoy's tracers: a listener with ``traffic_direction: OUTBOUND`` makes
egress spans (kind CLIENT), any other ingress spans (SERVER). Zipkin's ingress span shares
the caller's span id unless ``shared_span_context`` is false; OpenTelemetry's is always a
child. Zipkin names spans after the host, OpenTelemetry ``ingress`` / ``egress <host>``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from opentelemetry.proto.collector.trace.v1 import (  # type: ignore[import-untyped]
    trace_service_pb2,
)
from opentelemetry.proto.trace.v1 import trace_pb2  # type: ignore[import-untyped]

from shoal.codec.http1 import Headers
from shoal.config.model import OpenTelemetryTracer, Tracing, ZipkinTracer
from shoal.observe.accesslog import AccessLogRecord

B3_HEADERS = frozenset(
    {b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid", b"x-b3-sampled", b"x-b3-flags", b"b3"}
)
W3C_HEADERS = frozenset({b"traceparent", b"tracestate"})
_CLIENT_TRACE_ID = b"x-client-trace-id"
_HEX16 = re.compile(r"[0-9a-f]{16}")
_TRACE_ID = re.compile(r"[0-9a-f]{32}|[0-9a-f]{16}")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-|$)")
_ZERO = re.compile(r"0+")
_SAMPLED = {b"1": True, b"true": True, b"d": True, b"0": False, b"false": False}


class SpanSink(Protocol):
    """Where sampled spans go when their request ends (an exporter's bounded queue)."""

    def add(self, pending: PendingSpan) -> None: ...


@dataclass(frozen=True, slots=True)
class LocalInfo:
    """What spans say about the proxy: Envoy's ``node_id`` tag and Zipkin's service name
    (the node's cluster)."""

    node_id: str = ""
    cluster: str = ""


class Span:
    """One hop's trace context, from the request's head to its end."""

    __slots__ = ("b3_single", "parent_id", "sampled", "shared", "span_id", "trace_id", "tracestate")

    def __init__(
        self,
        trace_id: str,
        span_id: str,
        parent_id: str,
        sampled: bool,
        *,
        shared: bool = False,
        tracestate: bytes = b"",
        b3_single: bool = False,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.sampled = sampled
        self.shared = shared  # Zipkin: the caller's span id, shared (Envoy's shared context)
        self.tracestate = tracestate
        self.b3_single = b3_single  # the caller used the single b3 header: so do we


@dataclass(slots=True)
class FinishedSpan:
    """A sampled span, recorded when its request ended (times in microseconds)."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    client: bool  # kind CLIENT (egress), else SERVER
    start_us: int
    duration_us: int
    tags: dict[str, str]
    shared: bool = False
    tracestate: str = ""
    local_ip: str = ""


def _id64() -> str:
    return f"{random.getrandbits(64) or 1:016x}"


def _id128() -> str:
    return f"{random.getrandbits(128) or 1:032x}"


def _hit(share: float) -> bool:
    return share >= 1.0 or (share > 0.0 and random.random() < share)


class Tracer:
    """One connection manager's tracing: sampling shares, span shape, tags, exporter."""

    __slots__ = (
        "_read",
        "config",
        "egress",
        "local",
        "long_ids",
        "otel",
        "owned",
        "sink",
        "w3c",
        "zipkin",
    )

    def __init__(self, config: Tracing, egress: bool, local: LocalInfo, sink: SpanSink) -> None:
        self.config = config
        self.egress = egress
        self.local = local
        self.sink = sink
        provider = config.provider
        self.zipkin: ZipkinTracer | None = provider if isinstance(provider, ZipkinTracer) else None
        self.otel: OpenTelemetryTracer | None = (
            provider if isinstance(provider, OpenTelemetryTracer) else None
        )
        self.w3c = self.otel is not None or (self.zipkin is not None and self.zipkin.w3c)
        self.long_ids = self.otel is not None or (
            self.zipkin is not None and self.zipkin.trace_id_128bit
        )
        # the headers this tracer rewrites upstream (the others pass through untouched)
        owned: frozenset[bytes] = frozenset()
        if self.zipkin is not None:
            owned |= B3_HEADERS
        if self.w3c:
            owned |= W3C_HEADERS
        self.owned = owned
        self._read = owned | {_CLIENT_TRACE_ID}

    def start(self, headers: Headers) -> Span:
        """The request's span: its context continued or a new trace, sampled or not."""
        found: dict[bytes, bytes] = {}
        read = self._read
        for name, value in headers:
            if name in read and name not in found:
                found[name] = value
        incoming = self._extract(found) if found else None
        if incoming is not None and incoming.sampled is not None:
            sampled = incoming.sampled
        else:
            config = self.config
            traced = (_CLIENT_TRACE_ID in found and _hit(config.client_sampling)) or _hit(
                config.random_sampling
            )
            sampled = traced and _hit(config.overall_sampling)
        if incoming is None or not incoming.span_id:  # a new trace (Zipkin: trace = span id)
            span_id = _id64()
            trace_id = _id128() if self.long_ids else span_id
            return Span(trace_id, span_id, "", sampled, b3_single=b"b3" in found)
        zipkin = self.zipkin
        if zipkin is not None and not self.egress and zipkin.shared_span_context:
            return Span(
                incoming.trace_id,
                incoming.span_id,
                incoming.parent_id,
                sampled,
                shared=True,
                tracestate=incoming.tracestate,
                b3_single=incoming.b3_single,
            )
        return Span(
            incoming.trace_id,
            _id64(),
            incoming.span_id,
            sampled,
            tracestate=incoming.tracestate,
            b3_single=incoming.b3_single,
        )

    def _extract(self, found: dict[bytes, bytes]) -> _Incoming | None:
        """B3 first for Zipkin, then W3C where this tracer reads it."""
        if self.zipkin is not None:
            context = _b3(found)
            if context is not None:
                return context
        if self.w3c:
            return _traceparent(found)
        return None

    def headers(self, span: Span) -> bytes:
        """The HTTP/1.1 header lines that carry ``span`` upstream (replacing the caller's)."""
        return b"".join(b"%s: %s\r\n" % pair for pair in self.header_pairs(span))

    def header_pairs(self, span: Span) -> Headers:
        """The headers that carry ``span`` upstream, as (name, value) pairs (HTTP/2)."""
        flag = b"1" if span.sampled else b"0"
        trace, own, parent = span.trace_id.encode(), span.span_id.encode(), span.parent_id.encode()
        out: Headers = []
        if self.zipkin is not None:
            if span.b3_single:
                out.append(
                    (b"b3", b"%s-%s-%s%s" % (trace, own, flag, b"-" + parent if parent else b""))
                )
            else:
                out += [(b"x-b3-traceid", trace), (b"x-b3-spanid", own)]
                if parent:
                    out.append((b"x-b3-parentspanid", parent))
                out.append((b"x-b3-sampled", flag))
        if self.w3c:
            out.append((b"traceparent", b"00-%s-%s-0%s" % (trace.rjust(32, b"0"), own, flag)))
            if span.tracestate:
                out.append((b"tracestate", span.tracestate))
        return out

    def finish(self, span: Span, record: AccessLogRecord, host: str) -> None:
        """Queue a sampled span (``host``: the request's Host). The request pays for a
        tuple: tags are worked out by :func:`finished` when the exporter sends it, from the
        ended request, which nothing changes any more."""
        self.sink.add((self, span, record, host))

    def build(self, span: Span, record: AccessLogRecord, host: str) -> FinishedSpan:
        """The span with Envoy's tags."""
        config = self.config
        path = record.request_header("x-envoy-original-path") or record.path
        scheme = record.request_header("x-forwarded-proto") or "http"
        status = record.status
        tags = {
            "component": "proxy",
            "node_id": self.local.node_id,
            "http.url": f"{scheme}://{host}{path[: config.max_path_tag_length]}",
            "http.method": record.method,
            "http.protocol": record.protocol,
            "downstream_cluster": record.request_header("x-envoy-downstream-service-cluster")
            or "-",
            "user_agent": record.request_header("user-agent") or "-",
            "peer.address": _without_port(record.downstream_remote),
            "request_size": str(record.bytes_received),
            "response_size": str(record.bytes_sent),
            "http.status_code": str(status),
            "response_flags": record.response_flags,
        }
        request_id = record.request_header("x-request-id")
        if request_id:
            tags["guid:x-request-id"] = request_id
        cluster = record.upstream_cluster
        if cluster:
            tags["upstream_cluster"] = tags["upstream_cluster.name"] = cluster
        for custom in config.custom_tags:
            value = record.request_header(custom.header) if custom.header else None
            if value or custom.value:
                tags[custom.tag] = value or custom.value
        if status >= 500 or not status:
            tags["error"] = "true"
        name = host if self.zipkin is not None else self._otel_name(host)
        return FinishedSpan(
            trace_id=span.trace_id,
            span_id=span.span_id,
            parent_id=span.parent_id,
            name=name,
            client=self.egress,
            start_us=int(record.start_time * 1_000_000),
            duration_us=int(record.duration * 1_000_000),
            tags=tags,
            shared=span.shared,
            tracestate=span.tracestate.decode("latin-1"),
            local_ip=_without_port(record.downstream_local),
        )

    def _otel_name(self, host: str) -> str:
        return f"egress {host}" if self.egress else "ingress"


# a sampled span waiting for its exporter: tracer, span, the ended request, its Host
PendingSpan = tuple[Tracer, Span, AccessLogRecord, str]


def finished(pending: PendingSpan) -> FinishedSpan:
    tracer, span, record, host = pending
    return tracer.build(span, record, host)


@dataclass(slots=True)
class _Incoming:
    trace_id: str
    span_id: str
    parent_id: str
    sampled: bool | None
    tracestate: bytes = b""
    b3_single: bool = False


def _b3(found: dict[bytes, bytes]) -> _Incoming | None:
    """B3 multi-header, else the single ``b3`` header; a bare sampling decision keeps its
    flag with no ids; anything malformed is no context."""
    trace = found.get(b"x-b3-traceid")
    if trace is not None:
        trace_id = trace.decode("latin-1").lower()
        span_id = found.get(b"x-b3-spanid", b"").decode("latin-1").lower()
        parent = found.get(b"x-b3-parentspanid", b"").decode("latin-1").lower()
        if not (_valid_trace(trace_id) and _HEX16.fullmatch(span_id)):
            return None
        if parent and not _HEX16.fullmatch(parent):
            parent = ""
        sampled = _SAMPLED.get(found.get(b"x-b3-sampled", b"").lower())
        if found.get(b"x-b3-flags") == b"1":
            sampled = True  # debug
        return _Incoming(trace_id, span_id, parent, sampled)
    single = found.get(b"b3")
    if single is None:
        sampled = _SAMPLED.get(found.get(b"x-b3-sampled", b"").lower())
        return None if sampled is None else _Incoming("", "", "", sampled)
    parts = single.decode("latin-1").lower().split("-")
    if len(parts) == 1:
        sampled = _SAMPLED.get(parts[0].encode())
        return None if sampled is None else _Incoming("", "", "", sampled, b3_single=True)
    if len(parts) > 4 or not (_valid_trace(parts[0]) and _HEX16.fullmatch(parts[1])):
        return None
    sampled = _SAMPLED.get(parts[2].encode()) if len(parts) > 2 else None
    parent = parts[3] if len(parts) == 4 and _HEX16.fullmatch(parts[3]) else ""
    return _Incoming(parts[0], parts[1], parent, sampled, b3_single=True)


def _valid_trace(trace_id: str) -> bool:
    return _TRACE_ID.fullmatch(trace_id) is not None and _ZERO.fullmatch(trace_id) is None


def _traceparent(found: dict[bytes, bytes]) -> _Incoming | None:
    """W3C ``traceparent`` (version 00, or a later one read as 00); tracestate kept."""
    header = found.get(b"traceparent")
    if header is None:
        return None
    text = header.decode("latin-1").strip()  # lower-case hex only, as the spec says
    match = _TRACEPARENT.match(text)
    if match is None or match[1] == "ff" or (match[1] == "00" and len(text) != 55):
        return None
    _, trace_id, span_id, flags = match.groups()
    if _ZERO.fullmatch(trace_id) or _ZERO.fullmatch(span_id):
        return None
    sampled = bool(int(flags, 16) & 1)
    return _Incoming(trace_id, span_id, "", sampled, tracestate=found.get(b"tracestate", b""))


def trace_id_of(header: Callable[[str], str | None]) -> str | None:
    """A request's trace id from its W3C or B3 headers (for access logs); None if it has
    no valid one."""
    found: dict[bytes, bytes] = {}
    for name in ("traceparent", "x-b3-traceid", "x-b3-spanid", "b3"):
        value = header(name)
        if value is not None:
            found[name.encode()] = value.encode("latin-1")
    context = _traceparent(found) or _b3(found)
    return context.trace_id if context is not None and context.trace_id else None


def _without_port(address: str) -> str:
    if address.startswith("["):
        return address[1 : address.find("]")]
    return address.rpartition(":")[0] or address


# --- encodings (done by the exporter, off the request path) -------------------------------


def zipkin_json(spans: list[FinishedSpan], service_name: str) -> bytes:
    """Zipkin v2 JSON (``POST /api/v2/spans``): a list of spans."""
    out = []
    for span in spans:
        item: dict[str, object] = {
            "traceId": span.trace_id,
            "id": span.span_id,
            "name": span.name,
            "kind": "CLIENT" if span.client else "SERVER",
            "timestamp": span.start_us,
            "duration": max(span.duration_us, 1),
            "localEndpoint": {"serviceName": service_name, "ipv4": span.local_ip, "port": 0},
            "tags": span.tags,
        }
        if span.parent_id:
            item["parentId"] = span.parent_id
        if span.shared:
            item["shared"] = True
        out.append(item)
    return json.dumps(out, separators=(",", ":")).encode()


def otlp_request(spans: list[FinishedSpan], service_name: str, version: str) -> bytes:
    """An OTLP ``ExportTraceServiceRequest``, serialized: the same bytes go over gRPC and
    OTLP/HTTP. (xds-protos ships an older copy of the OTLP protos whose field 2 of
    ResourceSpans is named ``instrumentation_library_spans``: the wire format is the same
    as today's ``scope_spans``.)"""

    request = trace_service_pb2.ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    attributes = resource_spans.resource.attributes
    for key, value in (
        ("service.name", service_name),
        ("telemetry.sdk.name", "shoal"),
        ("telemetry.sdk.language", "python"),
        ("telemetry.sdk.version", version),
    ):
        attributes.add(key=key).value.string_value = value
    library = resource_spans.instrumentation_library_spans.add()
    library.instrumentation_library.name = "shoal"
    library.instrumentation_library.version = version
    kinds = (trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT)
    add_span = library.spans.add
    for span in spans:  # add() and field writes: three times faster than nested constructors
        item = add_span(
            trace_id=bytes.fromhex(span.trace_id.rjust(32, "0")),
            span_id=bytes.fromhex(span.span_id),
            parent_span_id=bytes.fromhex(span.parent_id) if span.parent_id else b"",
            trace_state=span.tracestate,
            name=span.name,
            kind=kinds[span.client],
            start_time_unix_nano=span.start_us * 1000,
            end_time_unix_nano=(span.start_us + span.duration_us) * 1000,
        )
        add_attribute = item.attributes.add
        for key, value in span.tags.items():
            add_attribute(key=key).value.string_value = value
        if "error" in span.tags:
            item.status.code = trace_pb2.Status.STATUS_CODE_ERROR
    data: bytes = request.SerializeToString()
    return data
