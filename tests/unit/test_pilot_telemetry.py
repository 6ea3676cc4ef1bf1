"""Pilot's metrics store, Prometheus text parsing, histogram quantiles, the merged tap,
the HTTP server's streamed answers and static files, and what pilot reads from nodes
(user agent, ADMIN_ADDRESS) and gives shoal sidecars (the istio_stats filter)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from tests.conftest import free_port

from shoal.config.envoy import translate_listener
from shoal.config.model import HttpConnectionManager, IstioStats
from shoal.errors import ConfigError
from shoal.pilot.api.model import RuleSet
from shoal.pilot.bootstrap import sidecar_bootstrap
from shoal.pilot.http import Answer, Stream, serve_http, static_routes
from shoal.pilot.model import RegistrySnapshot, Service, ServicePort
from shoal.pilot.telemetry import (
    MetricsStore,
    ProxyInfo,
    Scrape,
    Telemetry,
    bucket_quantile,
    format_duration,
    graph,
    open_tap,
    parse_duration,
    parse_istio,
    tap_spec,
)
from shoal.pilot.translate import NodeInfo, Translator
from shoal.pilot.xds import admin_address, node_info
from shoal.xds.client import _with_routes

LABELS = (
    'reporter="{reporter}",source_workload="{source}",destination_service="{service}",'
    'request_protocol="http",response_code="{code}",response_flags="-"'
)


def requests_line(value: float, reporter: str, source: str, service: str, code: str) -> str:
    labels = LABELS.format(reporter=reporter, source=source, service=service, code=code)
    return f"istio_requests_total{{{labels}}} {value}"


def test_durations() -> None:
    assert parse_duration("500ms") == 0.5
    assert parse_duration("10s") == parse_duration("10") == 10.0
    assert parse_duration("1.5m") == 90.0
    assert parse_duration("1h") == 3600.0
    for bad in ("", "0s", "-1s", "10x", "1m30s"):
        with pytest.raises(ValueError, match="expected a duration"):
            parse_duration(bad)
    assert [format_duration(s) for s in (3600, 900, 90, 1, 0.25)] == [
        "1h",
        "15m",
        "90s",
        "1s",
        "250ms",
    ]


def test_parse_keeps_istio_request_series_summed_over_labels_pilot_does_not_use() -> None:
    text = "\n".join(
        [
            "# TYPE istio_requests_total counter",
            requests_line(7, "source", "web", "api", "200"),
            requests_line(3, "source", "web", "api", "404"),  # 4xx succeeded
            requests_line(2, "source", "web", "api", "503"),
            requests_line(1, "source", "web", "api", "0"),  # no response: failed
            'istio_request_duration_milliseconds_bucket{reporter="source",source_workload="web",'
            'destination_service="api",le="5"} 9',
            'istio_request_duration_milliseconds_bucket{reporter="source",source_workload="web",'
            'destination_service="api",le="+Inf"} 13',
            'istio_request_duration_milliseconds_sum{reporter="source"} 40',
            'envoy_cluster_upstream_rq_total{envoy_cluster_name="x"} 99',
            'istio_requests_total{reporter="destination",source_workload="a\\"b\\\\c",'
            'destination_service="api",request_protocol="http",response_code="200"} 4 1700000000',
        ]
    )
    scrape = parse_istio(text)
    assert scrape.requests == {
        ("source", "web", "api", "http", True): 10.0,
        ("source", "web", "api", "http", False): 3.0,
        ("destination", 'a"b\\c', "api", "http", True): 4.0,
    }
    assert scrape.buckets == {
        ("source", "web", "api", 5.0): 9.0,
        ("source", "web", "api", math.inf): 13.0,
    }


def test_parse_keeps_per_route_series() -> None:
    """Envoy's per-route stats as shoal and Envoy print them: codes summed into success
    and failure (5xx) per virtual host and route; other route series skipped."""
    tags = 'envoy_virtual_host="reviews:9080",envoy_route="{route}"'

    def code(value: int, status: str, route: str = "v2") -> str:
        labels = f'envoy_response_code="{status}",{tags.format(route=route)}'
        return f"envoy_vhost_route_upstream_rq{{{labels}}} {value}"

    text = "\n".join(
        [
            "# TYPE envoy_vhost_route_upstream_rq counter",
            code(7, "200"),
            code(1, "404"),
            code(2, "503"),
            code(3, "200", "x"),
            f"envoy_vhost_route_upstream_rq_total{{{tags.format(route='v2')}}} 12",
            f"envoy_vhost_route_upstream_rq_completed{{{tags.format(route='v2')}}} 10",
            f'envoy_vhost_route_upstream_rq_time_bucket{{{tags.format(route="v2")},le="5"}} 8',
            f'envoy_vhost_route_upstream_rq_time_bucket{{{tags.format(route="v2")},le="+Inf"}} 10',
            f"envoy_vhost_route_upstream_rq_time_sum{{{tags.format(route='v2')}}} 31.5",
            # a dotted virtual host name: Envoy's tags keep no route, so nothing to keep
            'envoy_vhost_local_route_v2_upstream_rq{envoy_response_code="200",'
            'envoy_virtual_host="shop"} 5',
        ]
    )
    scrape = parse_istio(text)
    assert scrape.routes == {
        ("reviews:9080", "v2", True): 8.0,
        ("reviews:9080", "v2", False): 2.0,
        ("reviews:9080", "x", True): 3.0,
    }
    assert scrape.route_buckets == {
        ("reviews:9080", "v2", 5.0): 8.0,
        ("reviews:9080", "v2", math.inf): 10.0,
    }
    assert not scrape.requests


def test_store_per_route_rows_and_their_services() -> None:
    store = MetricsStore(retention=900, interval=1)
    for proxy in ("web-1", "web-2"):
        store.ingest(proxy, 1000.0, Scrape(), None)
    latency = {1.0: 40.0, 10.0: 50.0, math.inf: 50.0}
    for proxy, (ok, failed) in (("web-1", (40.0, 10.0)), ("web-2", (60.0, 0.0))):
        store.ingest(
            proxy,
            1010.0,
            Scrape(
                routes={
                    ("reviews_shop:9080", "v2", True): ok,
                    ("reviews_shop:9080", "v2", False): failed,
                    ("old:80", "default", True): 6.0,
                },
                route_buckets={("reviews_shop:9080", "v2", le): n for le, n in latency.items()},
            ),
            1000.0,
        )
    rows = store.routes_stat(60, 1010.0)
    assert [(r["virtual_host"], r["route"], r["requests"]) for r in rows] == [
        ("old:80", "default", 12),
        ("reviews_shop:9080", "v2", 110),
    ]
    v2 = rows[1]
    assert (v2["success_rate"], v2["rps"]) == (round(100 / 110, 4), round(110 / 60, 3))
    # both proxies' buckets: {1: 80, 10: 100, +Inf: 100}
    assert v2["p50_ms"] == 0.625 and v2["p99_ms"] == pytest.approx(9.55)
    assert store.series_count == 2 * 3 + 2 * 3  # per proxy: 3 route series, 3 buckets

    telemetry = Telemetry(
        list, interval=1, retention=900, vhost_services=lambda: {"reviews_shop:9080": "rev.shop"}
    )
    mapped = telemetry.route_rows(rows, None)
    assert [(r["service"], r["route"], r["virtual_host"]) for r in mapped] == [
        ("old", "default", "old:80"),  # a virtual host pilot no longer has: its name
        ("rev.shop", "v2", "reviews_shop:9080"),
    ]
    assert list(mapped[1]) == [
        "service",
        "route",
        "success_rate",
        "rps",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "requests",
        "virtual_host",
    ]
    assert telemetry.route_rows(rows, "rev.shop") == [mapped[1]]


def test_bucket_quantile_is_prometheus_histogram_quantile() -> None:
    buckets = {1.0: 10.0, 2.0: 20.0, 4.0: 20.0, math.inf: 20.0}
    assert bucket_quantile(0.5, buckets) == 1.0
    assert bucket_quantile(0.75, buckets) == 1.5
    assert bucket_quantile(1.0, buckets) == 2.0
    # a rank in the +Inf bucket: the highest finite bound
    assert bucket_quantile(0.99, {1.0: 10.0, 2.0: 20.0, math.inf: 100.0}) == 2.0
    # counts read at slightly different times are made monotonic first
    assert bucket_quantile(0.5, {1.0: 10.0, 2.0: 9.0, math.inf: 20.0}) == 1.0
    assert bucket_quantile(0.5, {1.0: 0.0, math.inf: 0.0}) is None
    assert bucket_quantile(0.5, {1.0: 3.0}) is None  # no +Inf bucket


def scrape(
    requests: dict[tuple[str, str, str, bool], float], buckets: dict[float, float]
) -> Scrape:
    """Requests by (reporter, source, service, ok); the buckets are web → api's, both sides."""
    return Scrape(
        requests={(r, s, d, "http", ok): v for (r, s, d, ok), v in requests.items()},
        buckets={
            (reporter, "web", "api", le): v
            for reporter in ("source", "destination")
            for le, v in buckets.items()
        },
    )


def test_store_rates_success_latency_and_reporter_choice() -> None:
    store = MetricsStore(retention=900, interval=1)
    # first scrape of both proxies: nothing yet (the series appear with the traffic)
    store.ingest("web-1", 1000.0, Scrape(), None)
    store.ingest("api-1", 1000.0, Scrape(), None)
    traffic = {
        ("source", "web", "api", True): 80.0,
        ("source", "web", "api", False): 20.0,
        ("destination", "web", "api", True): 80.0,
        ("destination", "web", "api", False): 20.0,
        ("destination", "unknown", "api", True): 10.0,  # a caller outside the mesh
        ("source", "web", "db", True): 30.0,  # no sidecar at db: only its callers report
    }
    latency = {1.0: 50.0, 10.0: 100.0, math.inf: 100.0}
    for proxy in ("web-1", "api-1"):
        mine = {k: v for k, v in traffic.items() if (k[0] == "source") == (proxy == "web-1")}
        store.ingest(proxy, 1010.0, scrape(mine, latency), 1000.0)

    rows = {row["service"]: row for row in store.stat(60, 1010.0)}
    assert list(rows) == ["api", "db"]
    api = rows["api"]  # its sidecar's numbers: 110 requests, the unknown caller's included
    assert api["requests"] == 110
    assert api["success_rate"] == round(90 / 110, 4)
    assert api["rps"] == round(110 / 60, 3)
    assert api["p50_ms"] == 1.0 and api["p99_ms"] == pytest.approx(9.82)
    assert api["protocol"] == "http"
    db = rows["db"]  # its callers' numbers
    assert (db["requests"], db["success_rate"], db["p50_ms"]) == (30, 1.0, None)
    assert store.stat(60, 1010.0, "db") == [db]

    edges = graph(store.edges(60, 1010.0))
    assert edges["nodes"] == [
        {"id": "api", "kind": "service"},
        {"id": "db", "kind": "service"},
        {"id": "unknown", "kind": "unknown"},
        {"id": "web", "kind": "workload"},
    ]
    assert [(e["source"], e["destination"], e["rps"]) for e in edges["edges"]] == [
        ("unknown", "api", round(10 / 60, 3)),
        ("web", "api", round(100 / 60, 3)),
        ("web", "db", 0.5),
    ]

    # ten seconds later, nothing new: the window after the traffic has none
    store.ingest(
        "web-1",
        1020.0,
        scrape({k: v for k, v in traffic.items() if k[0] == "source"}, latency),
        1010.0,
    )
    quiet = store.stat(5, 1020.0, "db")[0]
    assert (quiet["requests"], quiet["success_rate"], quiet["p99_ms"]) == (0, None, None)

    points = store.series("api", [1000.0, 1010.0], lookback=10)
    assert [(p["t"], p["rps"], p["success_rate"]) for p in points] == [
        (1000.0, 0.0, None),
        (1010.0, 11.0, round(90 / 110, 4)),
    ]


def test_a_service_whose_sidecar_saw_nothing_is_measured_by_its_callers() -> None:
    store = MetricsStore(retention=900, interval=1)
    callers = ("source", "web", "api", False)
    store.ingest("api-1", 0.0, scrape({("destination", "web", "api", True): 5.0}, {}), None)
    store.ingest("web-1", 0.0, scrape({callers: 0.0}, {}), None)
    # api's sidecar still answers scrapes but sees nothing; its callers get 503s
    store.ingest("api-1", 10.0, scrape({("destination", "web", "api", True): 5.0}, {}), 0.0)
    store.ingest("web-1", 10.0, scrape({callers: 7.0}, {}), 0.0)
    (api,) = store.stat(5, 10.0)
    assert (api["requests"], api["success_rate"]) == (7, 0.0)
    assert store.series("api", [10.0], lookback=5)[0]["success_rate"] == 0.0


def test_counter_resets_count_the_new_value_and_old_series_are_forgotten() -> None:
    store = MetricsStore(retention=60, interval=1)
    key = ("source", "web", "api", True)
    for when, value in ((0.0, 10.0), (1.0, 15.0), (2.0, 3.0), (3.0, 8.0)):  # restart at 2
        store.ingest("web-1", when, scrape({key: value}, {}), None)
    assert store.stat(3, 3.0)[0]["requests"] == 5 + 3 + 5
    store.prune(62.5)
    assert store.series_count == 1
    store.prune(63.5)
    assert store.series_count == 0


def test_series_beyond_the_limit_are_dropped_and_counted() -> None:
    store = MetricsStore(retention=60, interval=1, max_series=2)
    many = {("source", "web", f"svc{i}", True): 1.0 for i in range(5)}
    store.ingest("web-1", 0.0, scrape(many, {}), None)
    assert (store.series_count, store.dropped) == (2, 3)


def test_a_ring_keeps_a_bounded_number_of_samples() -> None:
    store = MetricsStore(retention=10, interval=1)
    key = ("source", "web", "api", True)
    for second in range(1000):
        store.ingest("web-1", float(second), scrape({key: float(second)}, {}), None)
    (ring,) = store.requests.values()
    assert len(ring.times) < 2 * store.capacity
    assert store.stat(10, 999.0)[0]["requests"] == 10


def test_tap_parameters() -> None:
    spec = tap_spec({"service": "api", "method": "GET", "max": "5", "duration": "2.5"})
    assert spec.max == 5 and spec.duration == 2.5
    assert spec.target() == "/tap?format=json&service=api&method=GET&max=5&duration=2.5"
    capped = tap_spec({"max": "99999", "duration": "9999"})
    assert (capped.max, capped.duration) == (10_000, 300.0)
    for bad in ({"max": "0"}, {"max": "x"}, {"duration": "-1"}, {"duration": "nan"}):
        with pytest.raises(ValueError, match="must be a positive number"):
            tap_spec(bad)


# --- the HTTP server: streamed answers and static files -------------------------------------


async def _request(port: int, target: str, version: str = "1.1") -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {target} HTTP/{version}\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def test_a_stream_is_sent_as_it_is_made_and_stops_when_the_client_leaves() -> None:
    async def main() -> None:
        ended = asyncio.Event()
        second = asyncio.Event()

        async def pieces(count: int) -> AsyncGenerator[bytes, None]:
            try:
                for n in range(count):
                    yield f"{n}\n".encode()
                    if n == 0 and count > 2:
                        second.set()
                        await asyncio.sleep(3600)  # waits for a piece that never comes
            finally:
                ended.set()

        async def handler(method: str, path: str, query: str, body: bytes) -> Answer:
            return Stream(200, "application/x-ndjson", pieces(int(query)))

        server = await serve_http("127.0.0.1", 0, {("GET", "/s"): handler})
        port = server.sockets[0].getsockname()[1]
        head, body = await _request(port, "/s?2")
        assert b"transfer-encoding: chunked" in head and b"connection: close" in head
        assert body == b"2\r\n0\n\r\n2\r\n1\n\r\n0\r\n\r\n"
        head, body = await _request(port, "/s?2", "1.0")  # unframed, ended by the close
        assert b"transfer-encoding" not in head and body == b"0\n1\n"

        ended.clear()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /s?3 HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (await reader.readuntil(b"0\n\r\n")).endswith(b"2\r\n0\n\r\n")
        await second.wait()
        writer.close()  # the client leaves while the stream waits
        await asyncio.wait_for(ended.wait(), 5)
        server.close()

    asyncio.run(main())


def test_static_files_and_the_dashboard_not_built(tmp_path: Path) -> None:
    async def main() -> None:
        dist = tmp_path / "dist"
        routes = static_routes(dist, "dashboard not built: run make setup")
        server = await serve_http("127.0.0.1", 0, routes)
        port = server.sockets[0].getsockname()[1]
        head, body = await _request(port, "/")
        assert head.startswith(b"HTTP/1.1 404") and body == b"dashboard not built: run make setup\n"

        (dist / "assets").mkdir(parents=True)
        (dist / "index.html").write_text("<!doctype html>")
        (dist / "assets" / "app.js").write_text("export {}")
        (tmp_path / "secret").write_text("no")
        head, body = await _request(port, "/")
        assert b"content-type: text/html; charset=utf-8" in head and body == b"<!doctype html>"
        head, body = await _request(port, "/static/assets/app.js")
        assert b"javascript" in head and body == b"export {}"
        for target in ("/static/../secret", "/static/%2e%2e/secret", "/static/missing.js"):
            head, body = await _request(port, target)
            assert head.startswith(b"HTTP/1.1 404"), target
            assert "error" in json.loads(body)
        head, _ = await _request(port, "/nothing")  # the root is not a catch-all
        assert head.startswith(b"HTTP/1.1 404")
        server.close()

    asyncio.run(main())


def test_the_merged_tap_skips_proxies_it_cannot_tap_and_passes_on_refusals() -> None:
    async def main() -> None:
        async def admin(status: int, lines: list[bytes]) -> tuple[asyncio.Server, int]:
            """A proxy's admin API whose /tap answers ``status``, then ``lines``."""

            async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await reader.readuntil(b"\r\n\r\n")
                body = b"".join(lines)
                writer.write(
                    b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n\r\n%s" % (status, len(body), body)
                )
                await writer.drain()
                writer.close()

            server = await asyncio.start_server(answer, "127.0.0.1", 0)
            return server, server.sockets[0].getsockname()[1]

        record = json.dumps({"method": "GET", "path": "/"}).encode() + b"\n"
        live, live_port = await admin(200, [record, record, b'{"dropped": 2}\n'])
        booting, booting_port = await admin(503, [b"not live yet\n"])
        refusing, refusing_port = await admin(400, [b"unknown parameter 'x'\n"])
        dead_port = free_port()  # nothing listens there
        spec = tap_spec({"service": "api"})

        def proxy(name: str, port: int) -> ProxyInfo:
            return ProxyInfo(node=name, admin=("127.0.0.1", port))

        answer = await open_tap(
            [proxy("a", live_port), proxy("b", booting_port), proxy("c", dead_port)], spec
        )
        assert isinstance(answer, Stream)
        lines = [json.loads(piece) async for piece in answer.body]
        assert lines == [{"method": "GET", "path": "/", "proxy": "a"}] * 2 + [{"dropped": 2}]

        refused = await open_tap([proxy("a", live_port), proxy("c", refusing_port)], spec)
        assert refused == (400, "application/json", b'{\n  "error": "unknown parameter \'x\'"\n}\n')
        nobody = await open_tap([proxy("b", booting_port)], spec)
        assert not isinstance(nobody, Stream) and nobody[0] == 502
        assert b"b: 503 not live yet" in nobody[2]
        without_admin = await open_tap([ProxyInfo("no-admin")], spec)
        assert not isinstance(without_admin, Stream) and without_admin[0] == 503
        for server in (live, booting, refusing):
            server.close()

    asyncio.run(main())


# --- what pilot needs from the nodes, and gives the sidecars ---------------------------------


def test_shoal_sidecars_get_the_istio_stats_filter_and_envoy_does_not() -> None:
    snapshot = Translator().translate(
        RegistrySnapshot((Service("reviews", (ServicePort(9080),)),), ()), RuleSet()
    )
    for agent, expected in (("shoal", True), ("envoy", False), ("", False)):
        node = NodeInfo("n", service="reviews", app_address=("127.0.0.1", 8080), user_agent=agent)
        routes = route_pb2.RouteConfiguration()
        assert snapshot.outbound_routes.body.Unpack(routes)
        for name, resource in snapshot.sidecar_listeners(node).items():
            proto = listener_pb2.Listener()
            assert resource.body.Unpack(proto)
            if name == "outbound":
                proto = _with_routes(proto, routes)  # as the proxy's xDS client does
            accepted = translate_listener(proto, source=name)  # the proxy takes it
            assert isinstance(accepted.filter, HttpConnectionManager)
            reporter = "source" if name == "outbound" else "destination"
            stats = IstioStats(reporter) if expected else None
            assert accepted.filter.istio_stats == stats, (agent, name)


def test_node_user_agent_and_admin_address() -> None:
    node = base_pb2.Node(id="n", user_agent_name="shoal")
    node.metadata.update({"ADMIN_ADDRESS": "[::1]:15000"})
    assert node_info(node).user_agent == "shoal"
    assert admin_address(node) == ("::1", 15000)
    assert admin_address(base_pb2.Node(id="grpc")) is None
    node.metadata.update({"ADMIN_ADDRESS": "nowhere"})
    with pytest.raises(ConfigError) as caught:
        admin_address(node)
    assert caught.value.field == "node.metadata.ADMIN_ADDRESS"
    bootstrap = sidecar_bootstrap("reviews-1", service="reviews:9080", admin=("::1", 15000))
    assert bootstrap["node"]["cluster"] == "reviews"  # names the workload in the metrics
    assert bootstrap["node"]["metadata"]["ADMIN_ADDRESS"] == "[::1]:15000"
    assert "ADMIN_ADDRESS" not in sidecar_bootstrap("x", admin=None)["node"]["metadata"]
