"""Outlier detection, driven by hand: a fake clock moves time, results are recorded as the
proxy would record them, and the cluster's load balancer shows who still gets traffic.

Expectations follow Envoy's ``outlier_detection_impl.cc`` (and its documented
arithmetic: the success-rate example {50, 100, 100, 100, 100} gives threshold 52).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from shoal.config.model import Cluster, Endpoint, OutlierDetection, SocketAddress
from shoal.observe.stats import render_prometheus
from shoal.proxy.runtime import ProxyRuntime
from shoal.upstream.cluster import ClusterRuntime
from shoal.upstream.host import Host
from shoal.upstream.outlier import OutlierDetector


@dataclass
class _Handle:
    due: float
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeClock:
    """Envoy's simulated time: timers run when :meth:`advance` passes their due time."""

    now: float = 0.0
    timers: list[_Handle] = field(default_factory=list)

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Handle:
        handle = _Handle(self.now + delay, callback)
        self.timers.append(handle)
        return handle

    def advance(self, seconds: float) -> None:
        target = self.now + seconds
        while True:
            due = [t for t in self.timers if not t.cancelled and t.due <= target + 1e-9]
            if not due:
                break
            timer = min(due, key=lambda t: t.due)
            self.timers.remove(timer)
            self.now = max(self.now, timer.due)
            timer.callback()
        self.now = target


def make_cluster(hosts: int = 4, **outlier: float | int | bool) -> tuple[ClusterRuntime, FakeClock]:
    endpoints = tuple(Endpoint(SocketAddress(f"10.0.0.{i + 1}", 80)) for i in range(hosts))
    config = Cluster(
        "web",
        endpoints=endpoints,
        outlier_detection=OutlierDetection(**outlier),  # type: ignore[arg-type]
    )
    cluster = ClusterRuntime(config)
    clock = FakeClock()
    detector(cluster).start(clock)
    return cluster, clock


def detector(cluster: ClusterRuntime) -> OutlierDetector:
    assert cluster.outlier is not None
    return cluster.outlier


def fail(cluster: ClusterRuntime, host: Host, times: int, status: int = 500) -> None:
    for _ in range(times):
        detector(cluster).record_response(host, status)


def served(cluster: ClusterRuntime, n: int = 400) -> Counter[str]:
    """Which hosts the cluster's balancer picks for ``n`` requests."""
    picks: Counter[str] = Counter()
    for _ in range(n):
        host = cluster.lb.choose()
        assert host is not None
        picks[host.key] += 1
    return picks


def counters(cluster: ClusterRuntime) -> dict[str, int]:
    return detector(cluster).counters


# --- consecutive errors ------------------------------------------------------------------------


def test_consecutive_5xx_ejects_after_n_and_the_host_gets_no_traffic() -> None:
    cluster, _ = make_cluster(consecutive_5xx=3, max_ejection_percent=100)
    bad = cluster.hosts[0]
    fail(cluster, bad, 2)
    assert not bad.ejected and bad.key in served(cluster)
    fail(cluster, bad, 1)
    assert bad.ejected and not bad.healthy
    assert bad.key not in served(cluster)
    assert set(served(cluster)) == {h.key for h in cluster.hosts[1:]}
    assert detector(cluster).ejections_active == 1
    stats = counters(cluster)
    assert stats["ejections_detected_consecutive_5xx"] == 1
    assert stats["ejections_enforced_consecutive_5xx"] == 1
    assert stats["ejections_enforced_total"] == 1
    assert stats["ejections_total"] == stats["ejections_consecutive_5xx"] == 1  # deprecated
    assert stats["ejections_overflow"] == 0


def test_a_success_resets_the_consecutive_count() -> None:
    cluster, _ = make_cluster(consecutive_5xx=3, max_ejection_percent=100)
    bad = cluster.hosts[0]
    for _ in range(5):
        fail(cluster, bad, 2)
        detector(cluster).record_response(bad, 200)
    assert not bad.ejected
    assert counters(cluster)["ejections_detected_consecutive_5xx"] == 0


def test_4xx_is_not_an_error() -> None:
    cluster, _ = make_cluster(consecutive_5xx=2, max_ejection_percent=100)
    fail(cluster, cluster.hosts[0], 10, status=404)
    assert not cluster.hosts[0].ejected


def test_gateway_failures_are_detected_but_not_enforced_by_default() -> None:
    """Envoy's enforcing_consecutive_gateway_failure defaults to 0: 503s are detected as
    gateway failures without ejecting; the same 503s eject as consecutive 5xx."""
    cluster, _ = make_cluster(max_ejection_percent=100)
    bad = cluster.hosts[0]
    fail(cluster, bad, 5, status=503)
    assert bad.ejected
    stats = counters(cluster)
    assert stats["ejections_detected_consecutive_gateway_failure"] == 1
    assert stats["ejections_enforced_consecutive_gateway_failure"] == 0
    assert stats["ejections_detected_consecutive_5xx"] == 1
    assert stats["ejections_enforced_consecutive_5xx"] == 1


def test_gateway_failures_enforced_and_500_breaks_the_run() -> None:
    cluster, _ = make_cluster(
        consecutive_5xx=100,
        consecutive_gateway_failure=3,
        enforcing_consecutive_gateway_failure=100,
        max_ejection_percent=100,
    )
    bad = cluster.hosts[0]
    for status in (502, 504, 500, 503, 502):  # the 500 is a 5xx but no gateway failure
        detector(cluster).record_response(bad, status)
    assert not bad.ejected
    detector(cluster).record_response(bad, 504)
    assert bad.ejected
    assert counters(cluster)["ejections_enforced_consecutive_gateway_failure"] == 1


@pytest.mark.parametrize(
    ("kind", "gateway"), [("connect_failure", 1), ("reset", 1), ("timeout", 1)]
)
def test_local_failures_count_as_gateway_errors_without_split(kind: str, gateway: int) -> None:
    """Envoy's non-split mode: connect failure and reset are 503, a timeout 504."""
    cluster, _ = make_cluster(consecutive_5xx=3, max_ejection_percent=100)
    bad = cluster.hosts[0]
    for _ in range(3):
        detector(cluster).record_local_failure(bad, kind)
    assert bad.ejected
    stats = counters(cluster)
    assert stats["ejections_enforced_consecutive_5xx"] == 1
    assert stats["ejections_detected_consecutive_local_origin_failure"] == 0


def test_split_mode_counts_local_failures_on_their_own() -> None:
    cluster, _ = make_cluster(
        split_external_local_origin_errors=True,
        consecutive_local_origin_failure=3,
        consecutive_5xx=3,
        max_ejection_percent=100,
    )
    out = detector(cluster)
    bad = cluster.hosts[0]
    out.record_local_failure(bad, "connect_failure")
    out.record_local_failure(bad, "timeout")
    out.record_local_success(bad)  # a connection was had: the local run is broken
    out.record_local_failure(bad, "reset")
    out.record_local_failure(bad, "reset")
    fail(cluster, bad, 2)  # answers do not add to the local run (nor local to the 5xx run)
    assert not bad.ejected
    out.record_local_failure(bad, "timeout")
    assert bad.ejected
    stats = counters(cluster)
    assert stats["ejections_detected_consecutive_local_origin_failure"] == 1
    assert stats["ejections_enforced_consecutive_local_origin_failure"] == 1
    assert stats["ejections_detected_consecutive_5xx"] == 0


# --- ejection time -----------------------------------------------------------------------------


def test_ejected_host_returns_at_the_first_interval_after_its_time() -> None:
    cluster, clock = make_cluster(
        consecutive_5xx=3, interval=10, base_ejection_time=30, max_ejection_percent=100
    )
    bad = cluster.hosts[0]
    clock.advance(1)
    fail(cluster, bad, 3)  # ejected at t=1, for 30 s: the tick at t=40 returns it
    clock.advance(29)  # t=30 (ticks at 10, 20, 30)
    assert bad.ejected and bad.key not in served(cluster)
    clock.advance(10)  # t=40
    assert not bad.ejected and bad.healthy
    assert bad.key in served(cluster)
    assert detector(cluster).ejections_active == 0
    # counters start afresh: two more errors do not eject again
    fail(cluster, bad, 2)
    assert not bad.ejected


def test_ejection_time_grows_with_each_ejection_up_to_the_max() -> None:
    cluster, clock = make_cluster(
        consecutive_5xx=1,
        interval=10,
        base_ejection_time=10,
        max_ejection_time=25,
        max_ejection_percent=100,
    )
    out = detector(cluster)
    bad = cluster.hosts[0]
    times = []
    for _ in range(4):
        fail(cluster, bad, 1)
        assert bad.ejected
        times.append(out.ejection_time(bad))
        ejected_at = clock.now
        while bad.ejected:
            clock.advance(10)
        # back at the first interval tick once the time is over
        assert clock.now - ejected_at == pytest.approx(math.ceil(times[-1] / 10) * 10)
    assert times == [10, 20, 25, 25]  # base x ejections, capped at max_ejection_time
    assert out.num_ejections(bad) == 4


def test_back_off_shrinks_while_the_host_stays_healthy() -> None:
    cluster, clock = make_cluster(
        consecutive_5xx=1, interval=10, base_ejection_time=10, max_ejection_percent=100
    )
    out = detector(cluster)
    bad = cluster.hosts[0]
    for _ in range(3):
        fail(cluster, bad, 1)
        while bad.ejected:
            clock.advance(10)
    assert out.ejection_time(bad) == 30
    clock.advance(10)  # a full interval back in service: one step less
    assert out.ejection_time(bad) == 20
    clock.advance(100)
    assert out.ejection_time(bad) == 0  # back to nothing: the next ejection is base again
    fail(cluster, bad, 1)
    assert out.ejection_time(bad) == 10


# --- max_ejection_percent ----------------------------------------------------------------------


def test_three_of_four_failing_with_max_50_percent_ejects_two() -> None:
    cluster, _ = make_cluster(consecutive_5xx=2, max_ejection_percent=50)
    bad = cluster.hosts[:3]
    for _ in range(5):
        for host in bad:
            fail(cluster, host, 2)
    assert sum(h.ejected for h in cluster.hosts) == 2
    assert detector(cluster).ejections_active == 2
    stats = counters(cluster)
    assert stats["ejections_enforced_total"] == 2
    assert stats["ejections_overflow"] >= 1
    # 2 of 4 healthy is not below Envoy's 50% panic threshold: only they get traffic
    assert set(served(cluster)) == {h.key for h in cluster.hosts if not h.ejected}


def test_default_max_ejection_percent_ejects_nothing_from_a_small_cluster() -> None:
    """Envoy: 10% of 4 hosts allows no ejection at all (one is 25%)..."""
    cluster, _ = make_cluster(consecutive_5xx=2)
    fail(cluster, cluster.hosts[0], 2)
    assert not cluster.hosts[0].ejected
    assert counters(cluster)["ejections_overflow"] == 1
    assert counters(cluster)["ejections_detected_consecutive_5xx"] == 1


def test_always_eject_one_host() -> None:
    """... unless always_eject_one_host lets the first one go."""
    cluster, _ = make_cluster(consecutive_5xx=2, always_eject_one_host=True)
    fail(cluster, cluster.hosts[0], 2)
    fail(cluster, cluster.hosts[1], 2)
    assert [h.ejected for h in cluster.hosts] == [True, False, False, False]


def test_too_many_ejected_panics_and_uses_every_host() -> None:
    """With over half the hosts ejected the balancer is in panic: all hosts get traffic."""
    cluster, _ = make_cluster(consecutive_5xx=1, max_ejection_percent=100)
    for host in cluster.hosts[:3]:
        fail(cluster, host, 1)
    assert detector(cluster).ejections_active == 3
    assert set(served(cluster)) == {h.key for h in cluster.hosts}


# --- success rate and failure percentage -------------------------------------------------------


def traffic(cluster: ClusterRuntime, successes: list[int], total: int = 100) -> None:
    """Record ``total`` results per host, ``successes[i]`` of them 200s, then 500s (the
    clusters here set consecutive_5xx out of reach)."""
    out = detector(cluster)
    for host, ok in zip(cluster.hosts, successes, strict=True):
        for i in range(total):
            out.record_response(host, 200 if i < ok else 500)


def test_success_rate_ejects_the_outlier_at_the_interval() -> None:
    cluster, clock = make_cluster(
        hosts=5, consecutive_5xx=1000, interval=10, max_ejection_percent=50
    )
    traffic(cluster, [50, 100, 100, 100, 100])  # Envoy's example: threshold 52
    assert not any(h.ejected for h in cluster.hosts)
    clock.advance(10)
    assert [h.ejected for h in cluster.hosts] == [True, False, False, False, False]
    out = detector(cluster)
    assert out.success_rate_average == pytest.approx(90)
    assert out.success_rate_threshold == pytest.approx(52)
    stats = counters(cluster)
    assert stats["ejections_detected_success_rate"] == 1
    assert stats["ejections_enforced_success_rate"] == 1
    assert stats["ejections_success_rate"] == 1


def test_success_rate_needs_enough_hosts_with_enough_requests() -> None:
    cluster, clock = make_cluster(
        hosts=5, consecutive_5xx=1000, interval=10, max_ejection_percent=50
    )
    traffic(cluster, [50, 99, 99, 99, 99], total=99)  # under success_rate_request_volume
    clock.advance(10)
    assert not any(h.ejected for h in cluster.hosts)
    cluster4, clock4 = make_cluster(
        hosts=4, consecutive_5xx=1000, interval=10, max_ejection_percent=50
    )
    traffic(cluster4, [10, 100, 100, 100])  # 4 hosts < success_rate_minimum_hosts
    clock4.advance(10)
    assert not any(h.ejected for h in cluster4.hosts)


def test_success_rate_uses_only_the_interval_just_ended() -> None:
    cluster, clock = make_cluster(
        hosts=5, consecutive_5xx=1000, interval=10, max_ejection_percent=50
    )
    traffic(cluster, [100] * 5)
    clock.advance(10)  # judged: all fine
    traffic(cluster, [40, 100, 100, 100, 100])
    assert not cluster.hosts[0].ejected  # not before the interval ends
    clock.advance(10)
    assert cluster.hosts[0].ejected


def test_failure_percentage_detected_but_not_enforced_by_default() -> None:
    cluster, clock = make_cluster(
        hosts=5, consecutive_5xx=1000, interval=10, max_ejection_percent=50,
        success_rate_minimum_hosts=100,
    )  # fmt: skip
    traffic(cluster, [5, 50, 50, 50, 50], total=50)  # 90% failures
    clock.advance(10)
    assert not cluster.hosts[0].ejected
    assert counters(cluster)["ejections_detected_failure_percentage"] == 1
    assert counters(cluster)["ejections_enforced_failure_percentage"] == 0


def test_failure_percentage_ejects_when_enforced() -> None:
    cluster, clock = make_cluster(
        hosts=5,
        consecutive_5xx=1000,
        interval=10,
        max_ejection_percent=50,
        success_rate_minimum_hosts=100,  # success rate off: only failure percentage
        enforcing_failure_percentage=100,
        failure_percentage_threshold=85,
    )
    traffic(cluster, [15, 16, 100, 100, 100])  # 85% and 84% failures
    clock.advance(10)
    assert [h.ejected for h in cluster.hosts] == [True, False, False, False, False]
    assert counters(cluster)["ejections_enforced_failure_percentage"] == 1


def test_local_origin_success_rate_in_split_mode() -> None:
    cluster, clock = make_cluster(
        hosts=5,
        split_external_local_origin_errors=True,
        consecutive_local_origin_failure=1000,
        interval=10,
        max_ejection_percent=50,
    )
    out = detector(cluster)
    for index, host in enumerate(cluster.hosts):
        for i in range(100):
            if index == 0 and i % 2:
                out.record_local_failure(host, "connect_failure")
            else:
                out.record_local_success(host)
    clock.advance(10)
    assert [h.ejected for h in cluster.hosts] == [True, False, False, False, False]
    assert counters(cluster)["ejections_enforced_local_origin_success_rate"] == 1


# --- enforcement, membership, health checks ---------------------------------------------------


def test_enforcing_percent_is_a_probability() -> None:
    """enforcing_consecutive_5xx 30: each detection is enforced with a 30% chance."""
    config = OutlierDetection(
        consecutive_5xx=1, enforcing_consecutive_5xx=30, max_ejection_percent=100
    )
    endpoints = tuple(Endpoint(SocketAddress(f"10.0.0.{i + 1}", 80)) for i in range(2))
    ejected = 0
    for seed in range(200):
        cluster = ClusterRuntime(Cluster("web", endpoints=endpoints))
        out = OutlierDetector(config, cluster, rng=random.Random(seed))
        out.record_response(cluster.hosts[0], 500)
        ejected += cluster.hosts[0].ejected
        assert out.counters["ejections_detected_consecutive_5xx"] == 1
    assert 30 <= ejected <= 90  # about 60 of 200


def test_removed_ejected_host_leaves_the_active_count() -> None:
    cluster, _ = make_cluster(consecutive_5xx=1, max_ejection_percent=100)
    fail(cluster, cluster.hosts[0], 1)
    assert detector(cluster).ejections_active == 1
    cluster.set_hosts([Host(h.address) for h in cluster.hosts[1:]])
    assert detector(cluster).ejections_active == 0
    detector(cluster).record_response(Host(SocketAddress("10.9.9.9", 80)), 500)  # unknown: no-op


def test_successful_active_health_check_returns_an_ejected_host() -> None:
    cluster, _ = make_cluster(consecutive_5xx=1, max_ejection_percent=100)
    bad = cluster.hosts[0]
    fail(cluster, bad, 1)
    cluster.health_check_passed(bad)
    assert not bad.ejected and bad.healthy and detector(cluster).ejections_active == 0


def test_health_check_return_can_be_turned_off() -> None:
    cluster, _ = make_cluster(
        consecutive_5xx=1,
        max_ejection_percent=100,
        successful_active_health_check_uneject_host=False,
    )
    bad = cluster.hosts[0]
    fail(cluster, bad, 1)
    cluster.health_check_passed(bad)
    assert bad.ejected


def test_close_stops_the_interval_timer() -> None:
    cluster, clock = make_cluster(consecutive_5xx=1, max_ejection_percent=100)
    fail(cluster, cluster.hosts[0], 1)
    cluster.close()
    clock.advance(1000)
    assert cluster.hosts[0].ejected  # no tick ran


# --- stats -------------------------------------------------------------------------------------


def test_stats_and_prometheus_names() -> None:
    cluster, _ = make_cluster(consecutive_5xx=1, max_ejection_percent=50)
    for host in cluster.hosts[:3]:
        fail(cluster, host, 1)
    runtime = ProxyRuntime()
    runtime.clusters = {"web": cluster}
    snapshot = runtime.snapshot()
    assert snapshot.gauges["cluster.web.outlier_detection.ejections_active"] == 2
    assert snapshot.counters["cluster.web.outlier_detection.ejections_enforced_total"] == 2
    assert snapshot.counters["cluster.web.outlier_detection.ejections_overflow"] == 1
    assert snapshot.gauges["cluster.web.membership_healthy"] == 2
    text = render_prometheus(snapshot)
    assert 'envoy_cluster_outlier_detection_ejections_active{envoy_cluster_name="web"} 2' in text
    enforced = "envoy_cluster_outlier_detection_ejections_enforced_consecutive_5xx"
    assert f'{enforced}{{envoy_cluster_name="web"}} 2' in text
    assert "# TYPE envoy_cluster_outlier_detection_ejections_active gauge" in text
    clusters = runtime.clusters_text()
    assert "web::10.0.0.1:80::health_flags::/failed_outlier_check" in clusters
    assert "web::10.0.0.4:80::health_flags::healthy" in clusters


def test_tcp_proxy_connection_counts_as_a_success_without_split() -> None:
    cluster, _ = make_cluster(consecutive_5xx=3, max_ejection_percent=100)
    out = detector(cluster)
    bad = cluster.hosts[0]
    for _ in range(4):
        out.record_local_failure(bad, "connect_failure")
        out.record_local_failure(bad, "timeout")
        out.record_local_success(bad, final=True)  # a TCP proxy connection: a 200
        out.record_local_success(bad)  # an HTTP pool connection: nothing without split
    assert not bad.ejected


def test_counters_survive_a_config_change_of_the_cluster() -> None:
    cluster, _ = make_cluster(consecutive_5xx=1, max_ejection_percent=100)
    fail(cluster, cluster.hosts[0], 1)
    replacement = ClusterRuntime(cluster.config)
    replacement.inherit_stats(cluster)
    assert counters(replacement)["ejections_enforced_total"] == 1
    assert detector(replacement).ejections_active == 0  # a gauge: the new hosts are fresh
