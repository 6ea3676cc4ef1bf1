"""The error-rate / slow-call breaker (``shoal.upstream.breaker``), driven with explicit
times: no sleeping, no event loop."""

from __future__ import annotations

from typing import Any

import pytest

from shoal.config.model import CircuitBreakerPolicy, Cluster
from shoal.observe.stats import render_prometheus
from shoal.proxy.runtime import ProxyRuntime
from shoal.upstream.breaker import (
    BREAKER_COUNTERS,
    ROUTE_BREAKERS,
    BreakerRegistry,
    ErrorRateBreaker,
    build_breaker,
)
from shoal.upstream.cluster import ClusterRuntime


def breaker(**fields: Any) -> ErrorRateBreaker:
    return ErrorRateBreaker(CircuitBreakerPolicy(**fields), "svc")


def feed(b: ErrorRateBreaker, now: float, outcomes: str, duration: float = 0.01) -> None:
    """One allowed request per character: ``.`` success, ``x`` error, ``s`` slow success."""
    for outcome in outcomes:
        assert b.allow(now)
        b.record(now, outcome != "x", 10.0 if outcome == "s" else duration)


def open_breaker(b: ErrorRateBreaker, now: float = 0.0) -> None:
    feed(b, now, "x" * b.policy.minimum_requests)
    assert b.state == "open"


# --- CLOSED: the count window ----------------------------------------------------------------


def test_starts_closed_with_zero_counters() -> None:
    b = breaker()
    assert b.state == "closed" and b.state_code == 0
    assert b.counters == dict.fromkeys(BREAKER_COUNTERS, 0)
    assert set(b.counters) == {
        "opened",
        "half_opened",
        "closed",
        "rejected",
        "fallback_local",
        "fallback_cluster",
    }


def test_opens_on_error_ratio_only_once_the_minimum_volume_is_reached() -> None:
    b = breaker(minimum_requests=10, error_ratio=0.5)
    feed(b, 0.0, "x" * 9)  # 100% errors, but only 9 requests
    assert b.state == "closed"
    assert b.window_counts() == (9, 9, 0)
    feed(b, 0.0, "x")
    assert b.state == "open" and b.state_code == 1
    assert b.counters["opened"] == 1


def test_error_ratio_threshold_is_inclusive() -> None:
    b = breaker(minimum_requests=10, error_ratio=0.3)
    feed(b, 0.0, "......xx.")  # 2 of 9
    assert b.state == "closed"
    feed(b, 0.0, "x")  # 3 of 10: exactly 0.3
    assert b.state == "open"


def test_stays_closed_below_the_error_ratio() -> None:
    b = breaker(minimum_requests=10, error_ratio=0.6)
    feed(b, 0.0, ".x" * 50 + "." * 10)  # at most half
    feed(b, 0.0, "x" * 4 + "." * 10)
    assert b.state == "closed"
    assert b.counters["opened"] == 0


def test_count_window_forgets_the_oldest_outcomes() -> None:
    b = breaker(window_size=10, minimum_requests=10, error_ratio=0.5)
    feed(b, 0.0, "xxxx......")  # 4 of 10
    assert b.window_counts() == (10, 4, 0)
    feed(b, 0.0, "....")  # the four errors leave the window
    assert b.window_counts() == (10, 0, 0)
    feed(b, 0.0, "xxxx")  # 4 of 10 again, never 5
    assert b.state == "closed"
    assert b.window_counts() == (10, 4, 0)
    feed(b, 0.0, "x")  # 5 of 10
    assert b.state == "open"
    assert b.window_counts() == (0, 0, 0)  # opening empties the window


def test_opens_when_a_success_completes_the_minimum_volume() -> None:
    b = breaker(minimum_requests=10, error_ratio=0.5)
    feed(b, 0.0, "x" * 9 + ".")  # 9 of 10
    assert b.state == "open"


# --- slow calls ------------------------------------------------------------------------------


def test_slow_call_ratio_opens_even_when_every_call_succeeds() -> None:
    b = breaker(minimum_requests=10, slow_call_duration=1.0, slow_call_ratio=0.5)
    feed(b, 0.0, "s....s..s")  # 3 of 9 slow
    assert b.window_counts() == (9, 0, 3)
    feed(b, 0.0, "ss")  # 5 of 11
    assert b.state == "closed"
    feed(b, 0.0, "s")  # 6 of 12
    assert b.state == "open"


def test_a_call_exactly_at_slow_call_duration_is_slow() -> None:
    b = breaker(minimum_requests=1, slow_call_duration=0.5, slow_call_ratio=0.5)
    assert b.allow(0.0)
    b.record(0.0, True, 0.4999)
    assert b.window_counts() == (1, 0, 0)
    assert b.allow(0.0)
    b.record(0.0, True, 0.5)  # 1 of 2 slow
    assert b.state == "open"


def test_slow_calls_are_not_counted_by_default() -> None:
    b = breaker(minimum_requests=5)
    feed(b, 0.0, "sssss")
    assert b.window_counts() == (5, 0, 0)
    assert b.state == "closed"


# --- CLOSED: the time window -----------------------------------------------------------------


def test_time_window_forgets_requests_older_than_its_duration() -> None:
    b = breaker(window="time", window_duration=10.0, window_buckets=10, minimum_requests=10)
    feed(b, 100.0, "xxxxx")
    feed(b, 105.0, "....")
    assert b.window_counts() == (9, 5, 0)
    feed(b, 110.0, ".")  # the bucket of t=100 is out: 5 requests, none failed
    assert b.window_counts() == (5, 0, 0)
    feed(b, 111.0, "xxxxx")  # 10 requests, 5 errors
    assert b.state == "open"


def test_time_window_keeps_requests_within_its_duration() -> None:
    b = breaker(window="time", window_duration=10.0, window_buckets=10, minimum_requests=10)
    feed(b, 100.0, "xxxxx")
    feed(b, 109.9, "xxxx")
    assert b.window_counts() == (9, 9, 0)
    feed(b, 109.95, "x")
    assert b.state == "open"


def test_time_window_after_a_long_quiet_time_starts_empty() -> None:
    b = breaker(window="time", window_duration=1.0, window_buckets=4, minimum_requests=3)
    feed(b, 0.0, "xx")
    feed(b, 1000.0, "x")
    assert b.window_counts() == (1, 1, 0)
    assert b.state == "closed"
    feed(b, 1000.1, "xx")
    assert b.state == "open"


def test_time_window_counts_a_clock_step_back_in_the_newest_bucket() -> None:
    b = breaker(window="time", window_duration=1.0, window_buckets=4, minimum_requests=5)
    feed(b, 10.0, "xx")
    feed(b, 9.0, "x")
    assert b.window_counts() == (3, 3, 0)


# --- OPEN and HALF_OPEN ----------------------------------------------------------------------


def test_open_rejects_until_open_duration_is_over() -> None:
    b = breaker(minimum_requests=5, open_duration=5.0)
    open_breaker(b, now=10.0)
    assert not b.allow(10.0)
    assert not b.allow(14.99)
    assert b.counters["rejected"] == 2
    assert b.state == "open"
    assert b.allow(15.0)  # the first trial
    assert b.state == "half_open" and b.state_code == 2
    assert b.counters["half_opened"] == 1


def test_half_open_admits_exactly_the_trials() -> None:
    b = breaker(minimum_requests=5, open_duration=1.0, half_open_trials=3)
    open_breaker(b)
    admitted = [b.allow(1.0) for _ in range(10)]
    assert admitted == [True] * 3 + [False] * 7
    assert b.counters["rejected"] == 7
    assert b.state == "half_open"


def test_all_trials_succeeding_closes_with_an_empty_window() -> None:
    b = breaker(minimum_requests=5, open_duration=1.0, half_open_trials=3)
    open_breaker(b)
    assert [b.allow(1.0) for _ in range(3)] == [True] * 3
    b.record(1.1, True, 0.1)
    b.record(1.1, True, 0.1)
    assert b.state == "half_open"
    assert not b.allow(1.1)  # still all three taken
    b.record(1.2, True, 0.1)
    assert b.state == "closed" and b.state_code == 0
    assert b.counters["closed"] == 1
    assert b.window_counts() == (0, 0, 0)
    assert all(b.allow(1.2) for _ in range(20))
    feed(b, 1.3, "xxxx")  # a fresh window: minimum_requests again
    assert b.state == "closed"


def test_a_failed_trial_reopens_at_once() -> None:
    b = breaker(minimum_requests=5, open_duration=1.0, half_open_trials=3)
    open_breaker(b)
    assert b.allow(1.0) and b.allow(1.0)
    b.record(1.5, True, 0.1)
    b.record(1.6, False, 0.1)
    assert b.state == "open"
    assert b.counters["opened"] == 2
    assert not b.allow(2.5)  # open_duration counts from the re-opening
    assert b.allow(2.6)
    assert b.state == "half_open"
    assert b.counters["half_opened"] == 2


def test_a_slow_trial_reopens_when_slow_calls_count() -> None:
    b = breaker(minimum_requests=5, open_duration=1.0, slow_call_duration=0.5, slow_call_ratio=0.5)
    open_breaker(b)
    assert b.allow(1.0)
    b.record(2.0, True, 1.0)
    assert b.state == "open"


def test_results_of_requests_allowed_before_opening_are_ignored() -> None:
    b = breaker(minimum_requests=5, open_duration=1.0, half_open_trials=2)
    assert b.allow(0.0)  # in flight while the breaker opens
    open_breaker(b)
    b.record(0.5, False, 0.5)  # OPEN: ignored
    assert b.state == "open" and b.counters["opened"] == 1
    assert b.allow(1.0)  # HALF_OPEN, one trial admitted
    b.record(1.1, True, 0.1)
    b.record(1.1, True, 0.1)  # more results than trials admitted: not a trial
    assert b.state == "half_open"
    assert b.allow(1.1)
    b.record(1.2, True, 0.1)
    assert b.state == "closed"


def test_release_gives_a_trial_slot_back() -> None:
    b = breaker(minimum_requests=5, open_duration=1.0, half_open_trials=1)
    open_breaker(b)
    assert b.allow(1.0)
    assert not b.allow(1.0)
    b.release()  # that trial's client went away
    assert b.allow(1.0)
    b.record(1.1, True, 0.1)
    assert b.state == "closed"
    b.release()  # CLOSED: nothing to give back
    assert b.state == "closed"


def test_full_cycle_counters() -> None:
    b = breaker(minimum_requests=4, open_duration=2.0, half_open_trials=2)
    feed(b, 0.0, "xxxx")  # opened 1
    assert not b.allow(1.0)  # rejected 1
    assert b.allow(2.0)  # half_opened 1
    b.record(2.5, False, 0.1)  # opened 2
    assert not b.allow(3.0)  # rejected 2
    assert b.allow(4.5) and b.allow(4.5)  # half_opened 2
    assert not b.allow(4.5)  # rejected 3
    b.record(5.0, True, 0.1)
    b.record(5.0, True, 0.1)  # closed 1
    b.counters["fallback_local"] += 2  # the proxy counts the fallbacks it serves
    b.counters["fallback_cluster"] += 1
    assert b.counters == {
        "opened": 2,
        "half_opened": 2,
        "closed": 1,
        "rejected": 3,
        "fallback_local": 2,
        "fallback_cluster": 1,
    }
    assert b.state == "closed"


@pytest.mark.parametrize("window", ["count", "time"])
def test_reopens_from_a_fresh_window_after_closing(window: str) -> None:
    b = breaker(window=window, minimum_requests=4, open_duration=1.0, half_open_trials=1)
    feed(b, 0.0, "xxxx")
    assert b.allow(1.0)
    b.record(1.0, True, 0.0)
    assert b.state == "closed"
    feed(b, 1.5, "xxx")
    assert b.state == "closed"
    feed(b, 1.5, "x")
    assert b.state == "open"


# --- stats plumbing ----------------------------------------------------------------------------


def test_inherit_keeps_counting_into_the_previous_counters() -> None:
    old = breaker(minimum_requests=1)
    feed(old, 0.0, "x")
    new = breaker(minimum_requests=1)
    new.inherit(old)
    assert new.state == "closed"
    feed(new, 0.0, "x")
    assert old.counters["opened"] == new.counters["opened"] == 2


def test_build_breaker_registers_named_routes_only() -> None:
    registry = BreakerRegistry()
    policy = CircuitBreakerPolicy(minimum_requests=1)
    first = build_breaker(policy, "checkout", registry=registry)
    build_breaker(policy, "", registry=registry)
    assert list(registry.breakers) == ["checkout"]
    feed(first, 0.0, "x")
    second = build_breaker(policy, "checkout", registry=registry)  # the next config version
    assert registry.breakers["checkout"] is second
    assert second.counters["opened"] == 1 and second.state == "closed"
    registry.clear()
    assert not registry.breakers


def test_build_breaker_uses_the_process_registry_by_default() -> None:
    policy = CircuitBreakerPolicy()
    try:
        made = build_breaker(policy, "test-default-registry")
        assert ROUTE_BREAKERS.breakers["test-default-registry"] is made
    finally:
        ROUTE_BREAKERS.breakers.pop("test-default-registry", None)


def test_clock_is_only_a_convenience() -> None:
    b = ErrorRateBreaker(CircuitBreakerPolicy(), "svc", clock=lambda: 42.0)
    assert b.now() == 42.0
    assert b.name == "svc"


def test_runtime_snapshot_shows_cluster_and_route_breakers() -> None:

    policy = CircuitBreakerPolicy(minimum_requests=2, open_duration=1.0)
    cluster = ClusterRuntime(Cluster("web", breaker=policy))
    assert cluster.breaker is not None and cluster.breaker.name == "web"
    feed(cluster.breaker, 0.0, "xx")
    assert not cluster.breaker.allow(0.5)
    route = build_breaker(policy, "test.checkout")
    try:
        feed(route, 0.0, "xx")
        assert route.allow(1.0)  # half-open
        runtime = ProxyRuntime()
        runtime.clusters = {"web": cluster}
        snapshot = runtime.snapshot()
        assert snapshot.counters["cluster.web.circuit_breaker.opened"] == 1
        assert snapshot.counters["cluster.web.circuit_breaker.rejected"] == 1
        assert snapshot.counters["cluster.web.circuit_breaker.fallback_local"] == 0
        assert snapshot.gauges["cluster.web.circuit_breaker.state"] == 1
        assert snapshot.counters["route.test.checkout.circuit_breaker.half_opened"] == 1
        assert snapshot.gauges["route.test.checkout.circuit_breaker.state"] == 2
        text = render_prometheus(snapshot)
        assert 'envoy_cluster_circuit_breaker_state{envoy_cluster_name="web"} 1' in text
        assert 'envoy_route_circuit_breaker_state{envoy_route="test.checkout"} 2' in text
    finally:
        ROUTE_BREAKERS.breakers.pop("test.checkout", None)


def test_cluster_breaker_counters_survive_a_config_change() -> None:

    policy = CircuitBreakerPolicy(minimum_requests=1)
    old = ClusterRuntime(Cluster("web", breaker=policy))
    assert old.breaker is not None
    feed(old.breaker, 0.0, "x")
    new = ClusterRuntime(Cluster("web", breaker=policy, connect_timeout=2.0))
    new.inherit_stats(old)
    assert new.breaker is not None
    assert new.breaker.counters["opened"] == 1 and new.breaker.state == "closed"
    assert ClusterRuntime(Cluster("web")).breaker is None
