"""Histograms, snapshots, and Envoy's /stats and /stats/prometheus renderings."""

from __future__ import annotations

import math
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.observe.stats import (
    DEFAULT_BUCKETS,
    Histogram,
    RouteStatsRegistry,
    Snapshot,
    merge,
    prometheus_name,
    render_prometheus,
    render_text,
)


def histogram(*values: float, bounds: tuple[float, ...] = DEFAULT_BUCKETS) -> Histogram:
    h = Histogram(bounds)
    for value in values:
        h.record(value)
    return h


def state(h: Histogram) -> tuple[tuple[float, ...], list[int], float]:
    return h.bounds, h.counts, h.sum


# --- histogram ---------------------------------------------------------------------------------


def test_envoy_default_buckets() -> None:
    assert DEFAULT_BUCKETS == (
        0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
        300000, 600000, 1800000, 3600000,
    )  # fmt: skip


def test_record_uses_le_buckets_plus_overflow() -> None:
    h = histogram(0, 0.5, 0.5000001, 1, 7, 3600000, 3600000.5, 1e12)
    assert h.counts[:4] == [2, 2, 0, 1]
    assert h.counts[-2:] == [1, 2]
    assert h.count == 8
    assert h.sum == pytest.approx(0 + 0.5 + 0.5000001 + 1 + 7 + 3600000 + 3600000.5 + 1e12)
    assert h.cumulative()[:4] == [2, 4, 4, 5]
    assert h.cumulative()[-1] == 6  # the overflow bucket is only in +Inf


def test_bounds_must_increase() -> None:
    with pytest.raises(ValueError, match="increasing"):
        Histogram((1, 1, 2))
    with pytest.raises(ValueError, match="increasing"):
        Histogram(())


def test_quantiles_interpolate_inside_the_bucket() -> None:
    h = histogram(*[7.0] * 10)  # all in (5, 10]
    assert h.quantile(0) == 5
    assert h.quantile(0.5) == 7.5
    assert h.quantile(0.9) == pytest.approx(9.5)
    assert h.quantile(1) == 10


def test_quantiles_across_buckets() -> None:
    h = histogram(0.2, 0.8, 3, 3, bounds=(1, 5))  # 2 in [0, 1], 2 in (1, 5]
    assert h.quantile(0) == 0
    assert h.quantile(0.25) == 0.5
    assert h.quantile(0.5) == 1
    assert h.quantile(0.75) == 3
    assert h.quantile(1) == 5


def test_quantile_in_overflow_is_the_last_bound() -> None:
    h = histogram(1, 100, bounds=(10,))
    assert h.quantile(0.25) == 5
    assert h.quantile(0.99) == 10


def test_quantile_edge_cases() -> None:
    assert math.isnan(Histogram().quantile(0.5))
    with pytest.raises(ValueError, match="quantile"):
        histogram(1).quantile(1.5)


@given(st.lists(st.floats(min_value=0, max_value=1e7), min_size=1))
def test_quantiles_are_monotonic_and_bracket_the_data(values: list[float]) -> None:
    h = histogram(*values)
    estimates = [h.quantile(q / 100) for q in range(101)]
    assert estimates == sorted(estimates)
    bounds = (0.0, *h.bounds)
    low = max(b for b in bounds if b < min(values)) if min(values) > 0 else 0.0
    high = min((b for b in h.bounds if b >= max(values)), default=h.bounds[-1])
    assert low <= estimates[0] and estimates[-1] <= high


def test_quantile_summary_like_envoy() -> None:
    assert histogram(*[7.0] * 10).quantile_summary() == (
        "P0(nan,5) P25(nan,6.25) P50(nan,7.5) P75(nan,8.75) P90(nan,9.5) P95(nan,9.75) "
        "P99(nan,9.95) P99.5(nan,9.975) P99.9(nan,9.995) P100(nan,10)"
    )
    assert Histogram().quantile_summary() == "No recorded values"


def test_merge_and_copy() -> None:
    a = histogram(1, 2)
    b = histogram(2, 3000)
    clone = a.copy()
    a.merge(b)
    assert state(a) == state(histogram(1, 2, 2, 3000))
    assert state(clone) == state(histogram(1, 2))
    assert state(b) == state(histogram(2, 3000))
    with pytest.raises(ValueError, match="bounds"):
        a.merge(Histogram((1, 2)))


def test_histogram_pickles() -> None:
    h = histogram(1, 2, 3, bounds=(1.5, 2.5))
    assert state(pickle.loads(pickle.dumps(h))) == state(h)


# --- snapshots ---------------------------------------------------------------------------------


def sample() -> Snapshot:
    return Snapshot(
        counters={"cluster.web.upstream_rq_200": 3, "http.ingress.downstream_rq_total": 4},
        gauges={"cluster.web.upstream_cx_active": 2},
        histograms={"cluster.web.upstream_rq_time": histogram(1, 7, 7, bounds=(5, 10))},
    )


def test_json_round_trip() -> None:
    snapshot = sample()
    back = Snapshot.from_json(snapshot.to_json())
    assert back.counters == snapshot.counters
    assert back.gauges == snapshot.gauges
    assert {k: state(h) for k, h in back.histograms.items()} == {
        k: state(h) for k, h in snapshot.histograms.items()
    }


def test_from_json_rejects_counts_that_do_not_match_bounds() -> None:
    text = sample().to_json().replace('"counts":[1,2,0]', '"counts":[1,2]')
    with pytest.raises(ValueError, match="counts"):
        Snapshot.from_json(text)


def test_merge_sums_everything_and_leaves_inputs_alone() -> None:
    a, b = sample(), sample()
    b.counters["server.only_in_b"] = 1
    merged = merge([a, b, Snapshot()])
    assert merged.counters == {
        "cluster.web.upstream_rq_200": 6,
        "http.ingress.downstream_rq_total": 8,
        "server.only_in_b": 1,
    }
    assert merged.gauges == {"cluster.web.upstream_cx_active": 4}
    assert state(merged.histograms["cluster.web.upstream_rq_time"]) == state(
        histogram(1, 7, 7, 1, 7, 7, bounds=(5, 10))
    )
    assert state(a.histograms["cluster.web.upstream_rq_time"]) == state(
        histogram(1, 7, 7, bounds=(5, 10))
    )


# --- /stats ------------------------------------------------------------------------------------


def test_render_text() -> None:
    snapshot = sample()
    snapshot.histograms["cluster.idle.upstream_rq_time"] = Histogram()
    assert render_text(snapshot) == (
        "cluster.web.upstream_cx_active: 2\n"
        "cluster.web.upstream_rq_200: 3\n"
        "http.ingress.downstream_rq_total: 4\n"
        "cluster.idle.upstream_rq_time: No recorded values\n"
        "cluster.web.upstream_rq_time: P0(nan,0) P25(nan,3.75) P50(nan,6.25) P75(nan,8.125) "
        "P90(nan,9.25) P95(nan,9.625) P99(nan,9.925) P99.5(nan,9.9625) P99.9(nan,9.9925) "
        "P100(nan,10)\n"
    )


# --- /stats/prometheus -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stat", "metric", "labels"),
    [
        ("cluster.web.upstream_rq_total", "envoy_cluster_upstream_rq_total",
         'envoy_cluster_name="web"'),
        ("cluster.web.upstream_rq_503", "envoy_cluster_upstream_rq",
         'envoy_response_code="503",envoy_cluster_name="web"'),
        ("cluster.web.upstream_rq_5xx", "envoy_cluster_upstream_rq_xx",
         'envoy_response_code_class="5",envoy_cluster_name="web"'),
        ("cluster.web.upstream_rq_time", "envoy_cluster_upstream_rq_time",
         'envoy_cluster_name="web"'),
        ("cluster.web.circuit_breakers.default.cx_open",
         "envoy_cluster_circuit_breakers_default_cx_open", 'envoy_cluster_name="web"'),
        ("http.ingress_http.downstream_rq_2xx", "envoy_http_downstream_rq_xx",
         'envoy_response_code_class="2",envoy_http_conn_manager_prefix="ingress_http"'),
        ("http.ingress_http.downstream_rq_total", "envoy_http_downstream_rq_total",
         'envoy_http_conn_manager_prefix="ingress_http"'),
        ("listener.0.0.0.0_15001.downstream_cx_total", "envoy_listener_downstream_cx_total",
         'envoy_listener_address="0.0.0.0_15001"'),
        ("listener.[__]_8080.downstream_cx_total", "envoy_listener_downstream_cx_total",
         'envoy_listener_address="[__]_8080"'),
        ("listener.0.0.0.0_80.http.inbound.downstream_rq_2xx",
         "envoy_listener_http_downstream_rq_xx",
         'envoy_response_code_class="2",envoy_http_conn_manager_prefix="inbound",'
         'envoy_listener_address="0.0.0.0_80"'),
        ("listener.admin.downstream_cx_total", "envoy_listener_admin_downstream_cx_total", ""),
        ("tcp.db_tcp.downstream_cx_total", "envoy_tcp_downstream_cx_total",
         'envoy_tcp_prefix="db_tcp"'),
        ("server.uptime", "envoy_server_uptime", ""),
        ("server.hot-restart.epoch:1", "envoy_server_hot_restart_epoch_1", ""),
        ('cluster.we"i\\rd.upstream_cx_total', "envoy_cluster_upstream_cx_total",
         'envoy_cluster_name="we\\"i\\\\rd"'),
        # Shoal's error-rate breakers
        ("cluster.web.circuit_breaker.opened", "envoy_cluster_circuit_breaker_opened",
         'envoy_cluster_name="web"'),
        ("route.shop.v1.circuit_breaker.state", "envoy_route_circuit_breaker_state",
         'envoy_route="shop.v1"'),
        # per-route stats (Route.stat_prefix), as Envoy 1.40 prints them
        ("vhost.shop.route.status.upstream_rq_503", "envoy_vhost_route_upstream_rq",
         'envoy_response_code="503",envoy_virtual_host="shop",envoy_route="status"'),
        ("vhost.shop.route.status.upstream_rq_5xx", "envoy_vhost_route_upstream_rq_xx",
         'envoy_response_code_class="5",envoy_virtual_host="shop",envoy_route="status"'),
        ("vhost.shop.route.status.upstream_rq_time", "envoy_vhost_route_upstream_rq_time",
         'envoy_virtual_host="shop",envoy_route="status"'),
        ("vhost.reviews:9080.route.v2-canary.upstream_rq_total",
         "envoy_vhost_route_upstream_rq_total",
         'envoy_virtual_host="reviews:9080",envoy_route="v2-canary"'),
        # Envoy's extractors take one dot-separated token: the rest stays in the name
        ("vhost.shop.local.route.other.upstream_rq_200",
         "envoy_vhost_local_route_other_upstream_rq",
         'envoy_response_code="200",envoy_virtual_host="shop"'),
        ("vhost.shop.route.shop.status.upstream_rq_completed",
         "envoy_vhost_route_status_upstream_rq_completed",
         'envoy_virtual_host="shop",envoy_route="shop"'),
        ("vhost.shop.vcluster.other.upstream_rq_200", "envoy_vhost_vcluster_upstream_rq",
         'envoy_response_code="200",envoy_virtual_cluster="other",envoy_virtual_host="shop"'),
    ],
)  # fmt: skip
def test_prometheus_names_and_tags(stat: str, metric: str, labels: str) -> None:
    assert prometheus_name(stat) == (metric, labels)


def test_render_prometheus() -> None:
    snapshot = Snapshot(
        counters={
            "cluster.web.upstream_rq_200": 3,
            "cluster.api.upstream_rq_200": 1,
            "cluster.web.upstream_rq_503": 2,
            "cluster.web.upstream_rq_2xx": 3,
            "server.uptime": 9,
        },
        gauges={"cluster.web.upstream_cx_active": 2},
        histograms={"cluster.web.upstream_rq_time": histogram(0.5, 7, 7, 20, bounds=(0.5, 10))},
    )
    assert render_prometheus(snapshot) == (
        "# TYPE envoy_cluster_upstream_rq counter\n"
        'envoy_cluster_upstream_rq{envoy_response_code="200",envoy_cluster_name="api"} 1\n'
        'envoy_cluster_upstream_rq{envoy_response_code="200",envoy_cluster_name="web"} 3\n'
        'envoy_cluster_upstream_rq{envoy_response_code="503",envoy_cluster_name="web"} 2\n'
        "\n"
        "# TYPE envoy_cluster_upstream_rq_xx counter\n"
        'envoy_cluster_upstream_rq_xx{envoy_response_code_class="2",envoy_cluster_name="web"} 3\n'
        "\n"
        "# TYPE envoy_server_uptime counter\n"
        "envoy_server_uptime{} 9\n"
        "\n"
        "# TYPE envoy_cluster_upstream_cx_active gauge\n"
        'envoy_cluster_upstream_cx_active{envoy_cluster_name="web"} 2\n'
        "\n"
        "# TYPE envoy_cluster_upstream_rq_time histogram\n"
        'envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="web",le="0.5"} 1\n'
        'envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="web",le="10"} 3\n'
        'envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="web",le="+Inf"} 4\n'
        'envoy_cluster_upstream_rq_time_sum{envoy_cluster_name="web"} 34.5\n'
        'envoy_cluster_upstream_rq_time_count{envoy_cluster_name="web"} 4\n'
        "\n"
    )


def test_render_prometheus_histogram_without_tags_and_default_buckets() -> None:
    out = render_prometheus(Snapshot(histograms={"server.initialization_time_ms": histogram(3)}))
    lines = out.splitlines()
    assert lines[0] == "# TYPE envoy_server_initialization_time_ms histogram"
    assert lines[1] == 'envoy_server_initialization_time_ms_bucket{le="0.5"} 0'
    assert lines[19] == 'envoy_server_initialization_time_ms_bucket{le="3600000"} 1'
    assert lines[20] == 'envoy_server_initialization_time_ms_bucket{le="+Inf"} 1'
    assert lines[21:] == [
        "envoy_server_initialization_time_ms_sum{} 3",
        "envoy_server_initialization_time_ms_count{} 1",
        "",
    ]


def test_render_empty_snapshot() -> None:
    assert render_prometheus(Snapshot()) == ""
    assert render_text(Snapshot()) == ""


def test_route_stats_count_like_envoys_and_are_shared_by_name() -> None:
    registry = RouteStatsRegistry()
    stats = registry.get("shop", "status")
    assert registry.get("shop", "status") is stats  # a reloaded route counts on
    assert registry.get("shop", "other") is not stats
    stats.upstream_rq_total += 3
    stats.upstream_rq_retry += 1
    stats.record(200, 4.0)
    stats.record(503, 12.0)
    stats.record(504, -1.0)  # a timeout: a status, no upstream time
    stats.record(0, -1.0)  # the client left: nothing
    counters: dict[str, int] = {}
    histograms: dict[str, Histogram] = {}
    stats.report(counters, histograms)
    prefix = "vhost.shop.route.status."
    assert {name.removeprefix(prefix): value for name, value in counters.items()} == {
        "upstream_rq_total": 3,
        "upstream_rq_timeout": 0,
        "upstream_rq_retry": 1,
        "upstream_rq_retry_limit_exceeded": 0,
        "upstream_rq_retry_overflow": 0,
        "upstream_rq_retry_success": 0,
        "upstream_rq_200": 1,
        "upstream_rq_503": 1,
        "upstream_rq_504": 1,
        "upstream_rq_2xx": 1,
        "upstream_rq_5xx": 2,
        "upstream_rq_completed": 3,
    }
    (histogram,) = histograms.values()
    assert (histogram.count, histogram.sum) == (2, 16.0)

    # a route nobody called has its counters and histogram, but no codes yet (as Envoy)
    counters.clear()
    registry.get("shop", "other").report(counters, histograms)
    assert "vhost.shop.route.other.upstream_rq_completed" not in counters
    assert counters["vhost.shop.route.other.upstream_rq_total"] == 0

    registry.retain({("shop", "other")})  # "status" left the config
    assert list(registry.routes) == [("shop", "other")]
    assert registry.get("shop", "status") is not stats  # back: from zero
