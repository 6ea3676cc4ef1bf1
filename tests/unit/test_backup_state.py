"""The backup-request state of a route (``shoal.upstream.backup``): the latency histogram and
its percentile, the delay's clamps, the max_ratio budget, and what a new config keeps."""

from __future__ import annotations

import math
import random
import time

import pytest

from shoal.config.model import BackupRequestPolicy
from shoal.observe.stats import prometheus_name
from shoal.upstream.backup import (
    BackupRegistry,
    BackupRequests,
    bucket_ceiling,
    bucket_of,
    build_backup,
)


def _exact(samples: list[float], percentile: float) -> float:
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(percentile * len(ordered) / 100 - 1e-9)) - 1]


def test_buckets_are_ordered_and_at_most_a_sixteenth_wide() -> None:
    previous = -1
    for micros in [*range(5000), *range(5000, 2**26, 997)]:
        index = bucket_of(micros)
        assert index >= previous
        previous = index
        assert micros < bucket_ceiling(index) <= max(micros + 1, micros * 17 / 16 + 1)
    assert bucket_of(10**12) == bucket_of(2**26 - 1)  # answers past ~67 s count as 67 s


@pytest.mark.parametrize("percentile", [50.0, 90.0, 99.0, 99.9])
def test_the_percentile_is_never_early_and_at_most_a_sixteenth_late(percentile: float) -> None:
    rng = random.Random(7)
    policy = BackupRequestPolicy(
        percentile=percentile, min_delay=0.001, max_delay=60.0, window=2048, minimum_samples=32
    )
    state = BackupRequests(policy)
    samples = [rng.lognormvariate(math.log(0.004), 0.8) for _ in range(2048)]  # 64 x 32
    for sample in samples:
        state.record(sample)
    exact = max(_exact(samples, percentile), 0.001)
    assert exact <= state.delay <= exact * 17 / 16 + 1e-6


def test_max_delay_until_minimum_samples_then_the_percentile_clamped() -> None:
    policy = BackupRequestPolicy(
        percentile=50, min_delay=0.005, max_delay=0.2, window=100, minimum_samples=10
    )
    state = BackupRequests(policy)
    for _ in range(9):
        state.record(0.010)
    assert state.delay == 0.2  # too little data
    state.record(0.010)
    assert 0.010 <= state.delay <= 0.0107  # computed as soon as the minimum is reached
    for _ in range(100):
        state.record(0.001)
    assert state.delay == 0.005  # min_delay
    for _ in range(100):
        state.record(3.0)
    assert state.delay == 0.2  # max_delay
    assert state.delay_ms() == 200


def test_the_window_slides_and_the_delay_follows_every_32_samples() -> None:
    policy = BackupRequestPolicy(
        percentile=90, min_delay=0.001, max_delay=10.0, window=100, minimum_samples=100
    )
    state = BackupRequests(policy)
    for _ in range(100):
        state.record(0.002)
    assert state.delay < 0.0022
    for _ in range(31):
        state.record(0.050)
    assert state.delay < 0.0022  # not recomputed yet
    state.record(0.050)
    assert 0.050 <= state.delay < 0.054  # 32 of the last 100 are slow: p90 is slow
    for _ in range(68):
        state.record(0.050)
    for _ in range(96):
        state.record(0.003)  # the slow ones leave the window again
    assert 0.003 <= state.delay < 0.0032


def test_the_budget_starts_empty_and_allows_max_ratio_of_requests() -> None:
    state = BackupRequests(BackupRequestPolicy(max_ratio=0.1))
    granted = 0
    for _ in range(1000):
        state.admit()
        granted += state.take()  # every request wants a backup
    assert granted == 100
    assert state.counters["capped"] == 900


def test_the_budget_saves_at_most_the_share_of_100_requests() -> None:
    state = BackupRequests(BackupRequestPolicy(max_ratio=0.1))
    for _ in range(10_000):
        state.admit()  # a calm period: nobody needs a backup
    assert sum(state.take() for _ in range(50)) == 10
    tiny = BackupRequests(BackupRequestPolicy(max_ratio=0.001))
    for _ in range(10_000):
        tiny.admit()
    assert sum(tiny.take() for _ in range(5)) == 1  # at least one whole backup is kept


def test_a_new_config_keeps_counters_and_with_the_same_policy_the_latencies() -> None:
    registry = BackupRegistry()
    policy = BackupRequestPolicy(min_delay=0.001, window=100, minimum_samples=10)
    first = build_backup(policy, "checkout", registry=registry)
    for _ in range(50):
        first.record(0.020)
        first.admit()
    first.counters["sent"] += 3
    same = build_backup(policy, "checkout", registry=registry)
    assert same.counters is first.counters
    assert same.delay == first.delay < 0.022
    assert same.take()  # the budget came along
    changed = build_backup(
        BackupRequestPolicy(percentile=99, window=100, minimum_samples=10), "checkout", registry
    )
    assert changed.counters["sent"] == 3
    assert changed.delay == 1.0  # another policy learns afresh
    assert registry.routes["checkout"] is changed
    unnamed = build_backup(policy, "", registry=registry)
    assert "" not in registry.routes and unnamed.delay == 1.0


def test_recording_is_cheap() -> None:
    state = BackupRequests(BackupRequestPolicy(window=100_000, minimum_samples=1))
    samples = [random.random() / 10 for _ in range(100_000)]
    started = time.process_time()
    for sample in samples:
        state.record(sample)
    per_sample = (time.process_time() - started) / len(samples)
    assert per_sample < 20e-6  # generous: ~0.1 µs compiled, ~1 µs interpreted


def test_prometheus_tags_the_route() -> None:
    assert prometheus_name("route.shop.v1.backup_request.delay_ms") == (
        "envoy_route_backup_request_delay_ms",
        'envoy_route="shop.v1"',
    )
