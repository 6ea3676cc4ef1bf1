"""Istio's standard metrics: peer metadata, label rules, series, scrape rendering, merging
across workers, and the istio_stats filter's config."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from tests.conftest import bootstrap, http_listener, route_to, static_cluster
from tests.rpc_config import action, generic_proxy, matcher

from shoal.config.envoy import bootstrap_from_dict
from shoal.config.model import HttpConnectionManager, IstioStats, Node, RpcProxy, TcpProxy
from shoal.errors import ConfigError
from shoal.observe.istio import (
    HTTP_LABELS,
    MAX_SERIES,
    TCP_LABELS,
    UNKNOWN_WORKLOAD,
    IstioMetrics,
    IstioReporter,
    Workload,
    local_workload,
    rpc_response_code,
)
from shoal.observe.stats import Snapshot, merge, render_prometheus, render_text

REVIEWS = Workload(
    name="reviews-v2",
    namespace="shop",
    app="reviews",
    version="v2",
    canonical_service="reviews",
    canonical_revision="v2",
    cluster="east",
)
PRODUCTPAGE = Workload(
    name="productpage-v1",
    namespace="shop",
    app="productpage",
    version="v1",
    canonical_service="productpage",
    canonical_revision="v1",
)
OUTBOUND_CLUSTER = "outbound|9080||reviews.shop.svc.cluster.local"


def labels_of(metrics: IstioMetrics) -> list[dict[str, str]]:
    return [dict(zip(HTTP_LABELS, values, strict=True)) for values in metrics.requests]


# --- peer metadata -------------------------------------------------------------------------


def test_peer_header_round_trips_and_escapes() -> None:
    odd = Workload(name="a;b=c%d", namespace="ns with space", app="ünï")
    assert Workload.decode(odd.encode()) == odd
    assert Workload.decode(REVIEWS.encode()) == REVIEWS
    assert b" " not in odd.encode() and b"\r" not in odd.encode()
    assert Workload().encode() == b""  # all defaults: nothing to say


def test_peer_header_is_compact_and_tolerant() -> None:
    assert REVIEWS.encode() == b"w=reviews-v2;n=shop;a=reviews;v=v2;s=reviews;r=v2;c=east"
    assert Workload.decode(b"w=x;zz=future;n=") == Workload(name="x")  # unknown keys skipped
    assert Workload.decode(b"garbage") == UNKNOWN_WORKLOAD
    assert Workload.decode(b"w=" + b"x" * 2000) == UNKNOWN_WORKLOAD  # oversized


def test_local_workload_from_node_metadata() -> None:
    node = Node(
        id="sidecar~10.0.0.7~reviews-v2-abc.shop",
        cluster="reviews",
        metadata={
            "WORKLOAD_NAME": "reviews-v2",
            "NAMESPACE": "shop",
            "CLUSTER_ID": "east",
            "SERVICE": "reviews.shop.svc.cluster.local:9080",
            "LABELS": {"app": "reviews", "version": "v2"},
        },
    )
    assert local_workload(node) == (REVIEWS, "reviews.shop.svc.cluster.local")


def test_local_workload_fallbacks_follow_istio() -> None:
    workload, service = local_workload(
        Node(
            cluster="ratings:9080",  # shoal bootstrap writes the service with its port
            metadata={
                "SERVICE": "ratings",
                "LABELS": {
                    "app.kubernetes.io/name": "ratings",
                    "service.istio.io/canonical-revision": "r7",
                },
            },
        )
    )
    assert service == "ratings"
    assert workload == Workload(
        name="ratings", app="ratings", canonical_service="ratings", canonical_revision="r7"
    )
    bare, no_service = local_workload(Node())
    assert bare == UNKNOWN_WORKLOAD and no_service == ""


# --- labels ---------------------------------------------------------------------------------


def test_source_reports_the_destination_from_its_answer() -> None:
    metrics = IstioMetrics()
    source = IstioReporter(IstioStats("source"), PRODUCTPAGE, "", metrics=metrics)
    assert source.request_line == b"x-shoal-peer: " + PRODUCTPAGE.encode() + b"\r\n"
    assert source.response_line == b""
    key = (REVIEWS.encode(), OUTBOUND_CLUSTER, b"reviews:9080", 200, "-")
    source.record(key, 0.012, 10, 300)
    source.record(key, 0.030, 0, 100)
    [labels] = labels_of(metrics)
    assert labels == {
        "reporter": "source",
        "source_workload": "productpage-v1",
        "source_canonical_service": "productpage",
        "source_canonical_revision": "v1",
        "source_workload_namespace": "shop",
        "source_principal": "unknown",
        "source_app": "productpage",
        "source_version": "v1",
        "source_cluster": "unknown",
        "destination_workload": "reviews-v2",
        "destination_workload_namespace": "shop",
        "destination_principal": "unknown",
        "destination_app": "reviews",
        "destination_version": "v2",
        "destination_service": "reviews.shop.svc.cluster.local",
        "destination_canonical_service": "reviews",
        "destination_canonical_revision": "v2",
        "destination_service_name": "reviews",
        "destination_service_namespace": "shop",
        "destination_cluster": "east",
        "request_protocol": "http",
        "response_code": "200",
        "grpc_response_status": "",
        "response_flags": "-",
        "connection_security_policy": "unknown",
    }
    [series] = metrics.requests.values()
    assert series.count == 2
    assert series.duration.count == 2 and series.duration.sum == pytest.approx(42.0)
    assert series.request_bytes.sum == 10 and series.response_bytes.sum == 400


def test_destination_reports_the_source_from_its_request() -> None:
    metrics = IstioMetrics()
    reviews = IstioReporter(
        IstioStats("destination"), REVIEWS, "reviews.shop.svc.cluster.local", metrics=metrics
    )
    assert reviews.request_line == b""
    assert reviews.response_line == b"x-shoal-peer: " + REVIEWS.encode() + b"\r\n"
    reviews.record((PRODUCTPAGE.encode(), "inbound|9080||", b"reviews", 503, "UF"), 0.001, 0, 0)
    [labels] = labels_of(metrics)
    assert labels["reporter"] == "destination"
    assert labels["source_workload"] == "productpage-v1"
    assert labels["source_app"] == "productpage"
    assert labels["destination_workload"] == "reviews-v2"
    assert labels["destination_service"] == "reviews.shop.svc.cluster.local"
    assert labels["destination_service_name"] == "reviews"
    assert labels["destination_service_namespace"] == "shop"
    assert labels["response_code"] == "503"
    assert labels["response_flags"] == "UF"
    assert labels["connection_security_policy"] == "none"


def test_unknown_peers_and_services_as_istio_reports_them() -> None:
    metrics = IstioMetrics()
    source = IstioReporter(IstioStats("source"), PRODUCTPAGE, "", metrics=metrics)
    source.record((b"", "static-backend", b"api.example.com:8443", 0, "DC"), 0.1, 0, 0)
    [labels] = labels_of(metrics)
    assert labels["destination_workload"] == "unknown"
    assert labels["destination_canonical_revision"] == "latest"
    assert labels["destination_service"] == "api.example.com"  # the authority's host
    assert labels["destination_service_name"] == "api.example.com"
    assert labels["destination_service_namespace"] == "unknown"
    assert labels["response_code"] == "0"


def test_label_values_are_escaped_for_prometheus() -> None:
    metrics = IstioMetrics()
    source = IstioReporter(IstioStats("source"), Workload(name='we"ird\\'), "", metrics=metrics)
    source.record((b"", "c", b"h", 200, "-"), 0.0, 0, 0)
    snapshot = Snapshot()
    metrics.contribute(snapshot)
    [text] = snapshot.labelled_counters["istio_requests_total"]
    assert 'source_workload="we\\"ird\\\\"' in text


def test_series_are_bounded_when_peers_are_made_up() -> None:
    metrics = IstioMetrics()
    reporter = IstioReporter(IstioStats("destination"), REVIEWS, "reviews", metrics=metrics)
    for index in range(MAX_SERIES + 50):
        peer = Workload(name=f"attacker-{index}").encode()
        reporter.record((peer, "inbound|80||", b"reviews", 200, "-"), 0.0, 0, 0)
    assert len(metrics.requests) == MAX_SERIES + 1  # the rest share one "unknown" series
    overflow = [s for v, s in metrics.requests.items() if v[1] == "unknown"]
    assert overflow[0].count == 50


def test_rpc_outcomes_as_http_codes() -> None:
    assert rpc_response_code(True, "-") == 200
    assert rpc_response_code(False, "-") == 500
    assert rpc_response_code(False, "NR") == 404
    assert rpc_response_code(False, "UT") == 504
    assert rpc_response_code(False, "RL") == 429
    assert rpc_response_code(False, "UH") == 503


def test_tcp_connections_are_reported_when_they_close() -> None:
    class Session:
        response_flags = "-"
        upstream_cluster = "outbound|5432||db.data.svc.cluster.local"
        bytes_received = 120
        bytes_sent = 4000

    metrics = IstioMetrics()
    IstioReporter(IstioStats("source"), PRODUCTPAGE, "", metrics=metrics).record_tcp(Session())
    [(values, tcp)] = metrics.tcp.items()
    labels = dict(zip(TCP_LABELS, values, strict=True))
    assert labels["request_protocol"] == "tcp"
    assert labels["destination_service"] == "db.data.svc.cluster.local"
    assert (tcp.opened, tcp.closed, tcp.received, tcp.sent) == (1, 1, 120, 4000)


# --- scrape, workers -----------------------------------------------------------------------


def scraped(*statuses: int) -> Snapshot:
    metrics = IstioMetrics()
    reporter = IstioReporter(IstioStats("source"), PRODUCTPAGE, "", metrics=metrics)
    for status in statuses:
        reporter.record((REVIEWS.encode(), OUTBOUND_CLUSTER, b"r", status, "-"), 0.003, 5, 7)
    snapshot = Snapshot(counters={"server.live": 1})
    metrics.contribute(snapshot)
    return snapshot


def test_prometheus_rendering_of_istio_metrics() -> None:
    text = render_prometheus(scraped(200, 200, 500))
    assert "# TYPE istio_requests_total counter\n" in text
    assert "# TYPE istio_request_duration_milliseconds histogram\n" in text
    assert "# TYPE istio_request_bytes histogram\n" in text
    assert "# TYPE istio_response_bytes histogram\n" in text
    lines = text.splitlines()
    total = [line for line in lines if line.startswith("istio_requests_total{")]
    assert sorted(int(line.rsplit(" ", 1)[1]) for line in total) == [1, 2]
    inf = [
        line
        for line in lines
        if line.startswith("istio_request_duration_milliseconds_bucket{") and 'le="+Inf"' in line
    ]
    assert sorted(line.rsplit(" ", 1)[1] for line in inf) == ["1", "2"]
    assert any(
        line.startswith("istio_response_bytes_sum{") and line.endswith(" 14") for line in lines
    )
    assert any(line.startswith("istio_request_bytes_count{") for line in lines)
    assert "envoy_server_live" in text  # the Envoy-style stats are still there
    assert "istio_requests_total{reporter=" in render_text(scraped(200))


def test_labelled_series_survive_json_and_merge_across_workers() -> None:
    one, two = scraped(200, 500), scraped(200)
    back = Snapshot.from_json(one.to_json())
    assert back.labelled_counters == one.labelled_counters
    merged = merge([back, two])
    counts = merged.labelled_counters["istio_requests_total"]
    assert sorted(counts.values()) == [1, 2]
    durations = merged.labelled_histograms["istio_request_duration_milliseconds"]
    assert sorted(h.count for h in durations.values()) == [1, 2]
    assert one.labelled_histograms["istio_request_bytes"] != {}
    assert Snapshot.from_json('{"counters":{},"gauges":{},"histograms":{}}') == Snapshot()


# --- config ----------------------------------------------------------------------------------

TYPED_STRUCT = "type.googleapis.com/xds.type.v3.TypedStruct"


def stats_filter(reporter: Any = "source", **value: Any) -> dict[str, Any]:
    return {
        "name": "shoal.filters.http.istio_stats",
        "typed_config": {
            "@type": TYPED_STRUCT,
            "type_url": "type.shoal.io/shoal.filters.v1.IstioStats",
            "value": {"reporter": reporter, **value},
        },
    }


def http_config(*filters: dict[str, Any]) -> dict[str, Any]:
    listener = http_listener(10000, [{"name": "all", "domains": ["*"], "routes": [route_to("b")]}])
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    manager["http_filters"] = [*filters, *manager["http_filters"]]
    return bootstrap([listener], [static_cluster("b", 8080)], 9901)


def test_http_filter_sets_the_reporter() -> None:
    manager = bootstrap_from_dict(http_config(stats_filter("destination"))).listeners[0].filter
    assert isinstance(manager, HttpConnectionManager)
    assert manager.istio_stats == IstioStats("destination")
    assert manager.http_filters == ()  # not one of the filters run per request
    plain = bootstrap_from_dict(http_config()).listeners[0].filter
    assert isinstance(plain, HttpConnectionManager) and plain.istio_stats is None


HTTP_FILTERS = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters"


@pytest.mark.parametrize(
    ("filters", "field", "reason"),
    [
        ([stats_filter("client")], "[0].typed_config.value.reporter", "'source' .* not 'client'"),
        ([stats_filter(None)], "[0].typed_config.value.reporter", "not None"),
        ([stats_filter(extra=1)], "[0].typed_config.value.extra", "only reporter"),
        ([stats_filter(), stats_filter()], "[1]", "configured twice"),
    ],
)
def test_http_filter_errors(filters: list[dict[str, Any]], field: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as info:
        bootstrap_from_dict(http_config(*filters))
    assert info.value.field == HTTP_FILTERS + field


def test_unknown_typed_struct_filter_is_rejected() -> None:
    other = stats_filter()
    other["typed_config"]["type_url"] = "type.example.com/Other"
    with pytest.raises(ConfigError, match=re.escape("unknown filter 'type.example.com/Other'")):
        bootstrap_from_dict(http_config(other))


def network_config(terminal: dict[str, Any], reporter: str = "source") -> dict[str, Any]:
    stats = stats_filter(reporter)
    stats["name"] = "shoal.filters.network.istio_stats"
    listener = {
        "name": "l",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
        "filter_chains": [{"filters": [stats, terminal]}],
    }
    return bootstrap([listener], [static_cluster("b", 8080)], 9901)


def test_network_filter_in_front_of_tcp_proxy_and_generic_proxy() -> None:
    tcp = {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "tcp",
            "cluster": "b",
        },
    }
    proxy = bootstrap_from_dict(network_config(tcp)).listeners[0].filter
    assert isinstance(proxy, TcpProxy) and proxy.istio_stats == IstioStats("source")
    dubbo = generic_proxy("dubbo", {"com.example.Greeter": matcher([], action("b"))})
    rpc = bootstrap_from_dict(network_config(dubbo, "destination")).listeners[0].filter
    assert isinstance(rpc, RpcProxy) and rpc.istio_stats == IstioStats("destination")


def test_network_filter_is_not_for_http_listeners() -> None:
    config = http_config()
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    with pytest.raises(ConfigError, match=re.escape("HTTP filter shoal.filters.http.istio_stats")):
        bootstrap_from_dict(network_config(copy.deepcopy(manager)))
