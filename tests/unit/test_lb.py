"""Load balancers: exact sequences where Envoy's algorithms are deterministic, seeded
distributions where they are not, and Envoy's priority / panic / locality arithmetic."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.config.model import Cluster, Endpoint, LbPolicy, Locality, SocketAddress
from shoal.upstream.host import Host
from shoal.upstream.lb import LoadBalancer, build_lb, hash_key_of

ZONE_A = Locality(region="r", zone="a")
ZONE_B = Locality(region="r", zone="b")
NO_LOCALITY = Locality()
KEYS = [hash_key_of(f"user-{i}") for i in range(20_000)]


def make_hosts(
    n: int,
    *,
    weights: Sequence[int] | None = None,
    priority: int = 0,
    healthy: int | None = None,
    locality: Locality = NO_LOCALITY,
    base: int = 0,
) -> list[Host]:
    """``n`` hosts, the first ``healthy`` of them healthy (all if None)."""
    return [
        Host(
            SocketAddress(f"10.{priority}.{base // 250}.{base % 250 + i}", 8080),
            weight=weights[i] if weights else 1,
            priority=priority,
            locality=locality,
            healthy=healthy is None or i < healthy,
        )
        for i in range(n)
    ]


def balancer(
    policy: LbPolicy,
    hosts: Sequence[Host],
    *,
    locality_weights: Mapping[Locality, int] | None = None,
    seed: int = 7,
    **cluster: int,
) -> LoadBalancer:
    weights = locality_weights or {}
    endpoints = tuple(
        Endpoint(h.address, h.weight, h.priority, h.locality, weights.get(h.locality, 0), h.healthy)
        for h in hosts
    )
    config = Cluster("c", endpoints=endpoints, lb_policy=policy, **cluster)  # type: ignore[arg-type]
    return build_lb(config, hosts, rng=random.Random(seed))


def pick(lb: LoadBalancer, hash_key: int | None = None, exclude: Host | None = None) -> Host:
    host = lb.choose(hash_key, exclude)
    assert host is not None
    return host


def shares(lb: LoadBalancer, hosts: Sequence[Host], n: int = 20_000) -> list[float]:
    counts = Counter(pick(lb) for _ in range(n))
    return [counts[h] / n for h in hosts]


def key_shares(lb: LoadBalancer, hosts: Sequence[Host]) -> list[float]:
    counts = Counter(pick(lb, key) for key in KEYS)
    return [counts[h] / len(KEYS) for h in hosts]


# --- basics ---------------------------------------------------------------------------------


def test_hash_key_of_is_a_stable_64_bit_hash() -> None:
    # pinned: every proxy must map a key to the same point, across versions too
    assert hash_key_of("abc") == hash_key_of(b"abc") == 0x5995D533D814BBD8
    assert hash_key_of("abc") != hash_key_of("abd")
    assert all(0 <= hash_key_of(str(i)) < 2**64 for i in range(100))


@pytest.mark.parametrize("policy", list(LbPolicy))
def test_no_hosts_gives_none(policy: LbPolicy) -> None:
    lb = balancer(policy, [])
    assert lb.choose() is None
    assert lb.choose(123) is None
    assert dict(lb.priority_load) == {}


@pytest.mark.parametrize("policy", list(LbPolicy))
def test_single_host_even_when_excluded(policy: LbPolicy) -> None:
    (host,) = make_hosts(1)
    lb = balancer(policy, [host])
    assert pick(lb) is host
    assert pick(lb, 42, exclude=host) is host


# --- round robin ----------------------------------------------------------------------------


def test_round_robin_equal_weights_rotates_in_order() -> None:
    hosts = make_hosts(3)
    lb = balancer(LbPolicy.ROUND_ROBIN, hosts)
    assert [pick(lb) for _ in range(7)] == [hosts[i] for i in (0, 1, 2, 0, 1, 2, 0)]


def test_round_robin_weighted_follows_envoy_edf() -> None:
    # deadlines k/weight, ties to the earliest queued: A@1 A@2 B@3 A@3 | A@4 A@5 B@6 A@6 ...
    a, b = make_hosts(2, weights=[3, 1])
    lb = balancer(LbPolicy.ROUND_ROBIN, [a, b])
    assert [pick(lb) for _ in range(8)] == [a, a, b, a, a, a, b, a]

    # A steps 1/5, B and C 1: at t=5 B and C were queued before A's 5th deadline
    a, b, c = make_hosts(3, weights=[5, 1, 1])
    lb = balancer(LbPolicy.ROUND_ROBIN, [a, b, c])
    expected = [a, a, a, a, b, c, a, a, a, a, a, b, c, a]
    assert [pick(lb) for _ in range(14)] == expected
    assert Counter(pick(lb) for _ in range(700)) == {a: 500, b: 100, c: 100}


def test_round_robin_exclude_takes_the_next_host() -> None:
    hosts = make_hosts(3)
    lb = balancer(LbPolicy.ROUND_ROBIN, hosts)
    assert pick(lb, exclude=hosts[0]) is hosts[1]
    assert pick(lb) is hosts[2]

    a, b = make_hosts(2, weights=[3, 1])
    lb = balancer(LbPolicy.ROUND_ROBIN, [a, b])
    assert pick(lb, exclude=a) is b
    # the skipped turn is not consumed: A keeps its deadline
    assert [pick(lb) for _ in range(4)] == [a, a, a, a]


# --- random ---------------------------------------------------------------------------------


def test_random_is_weighted() -> None:
    hosts = make_hosts(4, weights=[1, 2, 3, 4])
    got = shares(balancer(LbPolicy.RANDOM, hosts), hosts)
    assert got == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=0.015)


def test_random_equal_weights_is_uniform() -> None:
    hosts = make_hosts(5)
    got = shares(balancer(LbPolicy.RANDOM, hosts), hosts)
    assert got == pytest.approx([0.2] * 5, abs=0.015)


@pytest.mark.parametrize("weights", [None, [1, 2, 3, 4]])
def test_random_exclude_redistributes_over_the_others(weights: list[int] | None) -> None:
    hosts = make_hosts(4, weights=weights)
    lb = balancer(LbPolicy.RANDOM, hosts)
    counts = Counter(pick(lb, exclude=hosts[1]) for _ in range(20_000))
    assert hosts[1] not in counts
    w = weights or [1, 1, 1, 1]
    rest = sum(w) - w[1]
    for i in (0, 2, 3):
        assert counts[hosts[i]] / 20_000 == pytest.approx(w[i] / rest, abs=0.015)


# --- least request --------------------------------------------------------------------------


@pytest.mark.parametrize("choices", [2, 5])
def test_least_request_power_of_n_choices(choices: int) -> None:
    hosts = make_hosts(10)
    for host in hosts[1:]:
        host.active_requests = 10
    lb = balancer(LbPolicy.LEAST_REQUEST, hosts, least_request_choice_count=choices)
    # the idle host wins whenever it is among the N samples (drawn with replacement)
    expected = 1 - (9 / 10) ** choices
    assert shares(lb, hosts)[0] == pytest.approx(expected, abs=0.015)


def test_least_request_all_idle_is_uniform_and_honours_exclude() -> None:
    hosts = make_hosts(4)
    lb = balancer(LbPolicy.LEAST_REQUEST, hosts)
    assert shares(lb, hosts) == pytest.approx([0.25] * 4, abs=0.015)
    assert hosts[2] not in {pick(lb, exclude=hosts[2]) for _ in range(2000)}


def test_least_request_weighted_uses_weight_over_active_requests() -> None:
    a, b = make_hosts(2, weights=[1, 3])
    lb = balancer(LbPolicy.LEAST_REQUEST, [a, b])
    assert Counter(pick(lb) for _ in range(400)) == {a: 100, b: 300}

    a, b = make_hosts(2, weights=[1, 3])
    b.active_requests = 2  # 3 / (2 + 1) == 1 / (0 + 1): an even split
    lb = balancer(LbPolicy.LEAST_REQUEST, [a, b])
    assert Counter(pick(lb) for _ in range(400)) == {a: 200, b: 200}
    assert all(pick(lb, exclude=b) is a for _ in range(10))


# --- ring hash and maglev -------------------------------------------------------------------

HASHING = [LbPolicy.RING_HASH, LbPolicy.MAGLEV]


@pytest.mark.parametrize("policy", HASHING)
def test_hashing_same_key_same_host_whatever_the_host_order(policy: LbPolicy) -> None:
    hosts = make_hosts(10)
    first = balancer(policy, hosts, seed=1)
    second = balancer(policy, list(reversed(hosts)), seed=2)
    assert [pick(first, k) for k in KEYS[:2000]] == [pick(second, k) for k in KEYS[:2000]]


@pytest.mark.parametrize(
    ("policy", "tolerance"), [(LbPolicy.RING_HASH, 0.04), (LbPolicy.MAGLEV, 0.01)]
)
def test_hashing_spreads_keys_by_weight(policy: LbPolicy, tolerance: float) -> None:
    hosts = make_hosts(10)
    assert key_shares(balancer(policy, hosts), hosts) == pytest.approx([0.1] * 10, abs=tolerance)
    hosts = make_hosts(3, weights=[1, 2, 5])
    got = key_shares(balancer(policy, hosts), hosts)
    assert got == pytest.approx([1 / 8, 2 / 8, 5 / 8], abs=tolerance)


@pytest.mark.parametrize("policy", HASHING)
def test_hashing_without_a_key_picks_at_random(policy: LbPolicy) -> None:
    hosts = make_hosts(4)
    got = shares(balancer(policy, hosts), hosts, n=8000)
    assert got == pytest.approx([0.25] * 4, abs=0.05)


def test_ring_hash_removing_a_host_moves_only_its_keys() -> None:
    hosts = make_hosts(10)
    before = balancer(LbPolicy.RING_HASH, hosts)
    after = balancer(LbPolicy.RING_HASH, hosts[:4] + hosts[5:])
    moved = [pick(before, k) for k in KEYS if pick(after, k) is not pick(before, k)]
    assert set(moved) == {hosts[4]}
    assert len(moved) / len(KEYS) == pytest.approx(0.1, abs=0.04)


def test_maglev_removing_a_host_moves_about_a_tenth() -> None:
    hosts = make_hosts(10)
    before = balancer(LbPolicy.MAGLEV, hosts)
    after = balancer(LbPolicy.MAGLEV, hosts[:4] + hosts[5:])
    moved = sum(pick(before, k) is not pick(after, k) for k in KEYS) / len(KEYS)
    assert 0.09 < moved < 0.15  # the removed host's 10% plus Maglev's small reshuffle


def test_ring_hash_size_limits_still_reach_every_host() -> None:
    hosts = make_hosts(10)
    lb = balancer(LbPolicy.RING_HASH, hosts, ring_hash_min_size=1, ring_hash_max_size=10)
    assert {pick(lb, k) for k in KEYS} == set(hosts)


def test_maglev_rejects_a_table_size_that_is_not_prime() -> None:
    with pytest.raises(ValueError, match="prime"):
        balancer(LbPolicy.MAGLEV, make_hosts(3), maglev_table_size=65536)


@pytest.mark.parametrize("policy", HASHING)
def test_hashing_exclude_walks_to_another_host_deterministically(policy: LbPolicy) -> None:
    hosts = make_hosts(5)
    lb = balancer(policy, hosts)
    for key in KEYS[:500]:
        first = pick(lb, key)
        second = pick(lb, key, exclude=first)
        assert second is not first
        assert pick(lb, key, exclude=first) is second


# --- priorities and panic ---------------------------------------------------------------------


def test_priority_spills_over_by_envoy_formula() -> None:
    p0 = make_hosts(10, priority=0, healthy=4)
    p1 = make_hosts(10, priority=1)
    lb = balancer(LbPolicy.ROUND_ROBIN, p0 + p1)
    # health: P0 = min(100, 140 * 4 // 10) = 56, P1 = 100; total min(156, 100) = 100:
    # P0 gets its 56, P1 the remaining 44, and nothing is in panic
    assert dict(lb.priority_load) == {0: 56, 1: 44}
    counts = Counter(pick(lb) for _ in range(20_000))
    assert sum(counts[h] for h in p1) / 20_000 == pytest.approx(0.44, abs=0.015)
    assert set(counts) == set(p0[:4] + p1)


def test_priority_load_is_normalised_and_a_weak_level_panics() -> None:
    p0 = make_hosts(10, priority=0, healthy=5)
    p1 = make_hosts(10, priority=1, healthy=1)
    lb = balancer(LbPolicy.RANDOM, p0 + p1, seed=3)
    # health 70 and 14, total 84: P0 = 70 * 100 // 84 = 83, P1 = 14 * 100 // 84 = 16, the
    # rounding remainder 1 goes to the first healthy level; P1 (10% healthy) is in panic
    assert dict(lb.priority_load) == {0: 84, 1: 16}
    counts = Counter(pick(lb) for _ in range(20_000))
    assert sum(counts[h] for h in p1) / 20_000 == pytest.approx(0.16, abs=0.015)
    assert set(counts) == set(p0[:5] + p1)


def test_fully_healthy_first_priority_takes_everything() -> None:
    p0 = make_hosts(2, priority=0)
    p1 = make_hosts(2, priority=1)
    lb = balancer(LbPolicy.ROUND_ROBIN, p0 + p1)
    assert dict(lb.priority_load) == {0: 100, 1: 0}
    assert [pick(lb) for _ in range(4)] == p0 * 2


def test_overprovisioning_factor_is_honoured() -> None:
    p0 = make_hosts(10, priority=0, healthy=8)
    p1 = make_hosts(10, priority=1)
    lb = balancer(LbPolicy.ROUND_ROBIN, p0 + p1, overprovisioning_factor=100)
    assert dict(lb.priority_load) == {0: 80, 1: 20}
    # a zero factor leaves no availability anywhere: split by host count, as in total panic
    lb = balancer(LbPolicy.ROUND_ROBIN, p0 + p1[:5], overprovisioning_factor=0)
    assert dict(lb.priority_load) == {0: 67, 1: 33}


def test_hash_policies_split_priorities_by_key() -> None:
    p0 = make_hosts(10, priority=0, healthy=4)
    p1 = make_hosts(10, priority=1)
    lb = balancer(LbPolicy.MAGLEV, p0 + p1, maglev_table_size=5003)
    counts = Counter(pick(lb, k) for k in KEYS)
    assert sum(counts[h] for h in p1) / len(KEYS) == pytest.approx(0.44, abs=0.015)
    assert set(counts) == set(p0[:4] + p1)


def test_panic_below_half_healthy_uses_all_hosts() -> None:
    hosts = make_hosts(10, healthy=4)  # 56% available, 40% healthy: panic
    lb = balancer(LbPolicy.ROUND_ROBIN, hosts)
    assert [pick(lb) for _ in range(10)] == hosts


def test_no_panic_at_half_healthy() -> None:
    hosts = make_hosts(10, healthy=5)  # 70% available, 50% healthy: not below the threshold
    lb = balancer(LbPolicy.ROUND_ROBIN, hosts)
    assert [pick(lb) for _ in range(10)] == hosts[:5] * 2


def test_total_panic_splits_by_host_count() -> None:
    p0 = make_hosts(2, priority=0, healthy=0)
    p1 = make_hosts(1, priority=1, healthy=0)
    lb = balancer(LbPolicy.RANDOM, p0 + p1)
    # 100 * 2 // 3 = 66 and 33, the remaining 1 to the first level
    assert dict(lb.priority_load) == {0: 67, 1: 33}
    assert {pick(lb) for _ in range(200)} == set(p0 + p1)


def test_exclude_falls_back_to_another_priority() -> None:
    (only,) = make_hosts(1, priority=0)
    p1 = make_hosts(2, priority=1)
    for policy in LbPolicy:
        lb = balancer(policy, [only, *p1])
        assert pick(lb, KEYS[0]) is only
        assert pick(lb, KEYS[0], exclude=only) in p1


# --- localities -------------------------------------------------------------------------------


def test_localities_are_picked_by_weight() -> None:
    a = make_hosts(2, locality=ZONE_A)
    b = make_hosts(2, locality=ZONE_B, base=10)
    lb = balancer(LbPolicy.ROUND_ROBIN, a + b, locality_weights={ZONE_A: 1, ZONE_B: 3})
    counts = Counter(pick(lb) for _ in range(400))
    assert counts == {a[0]: 50, a[1]: 50, b[0]: 150, b[1]: 150}


def test_locality_weight_is_scaled_by_its_availability() -> None:
    a = make_hosts(2, locality=ZONE_A)
    b = make_hosts(2, locality=ZONE_B, healthy=1, base=10)
    lb = balancer(LbPolicy.ROUND_ROBIN, a + b, locality_weights={ZONE_A: 1, ZONE_B: 3})
    # B: 3 * min(1, 1.4 * 1/2) = 2.1 against A's 1, i.e. 10:21 over an exact EDF period
    counts = Counter(pick(lb) for _ in range(3100))
    assert counts == {a[0]: 500, a[1]: 500, b[0]: 2100}


def test_locality_without_weight_gets_no_traffic() -> None:
    a = make_hosts(2, locality=ZONE_A)
    b = make_hosts(2, locality=ZONE_B, base=10)
    lb = balancer(LbPolicy.RANDOM, a + b, locality_weights={ZONE_A: 1})
    assert {pick(lb) for _ in range(500)} == set(a)
    assert pick(lb, exclude=a[0]) is a[1]


def test_locality_exclude_moves_to_another_locality() -> None:
    (a,) = make_hosts(1, locality=ZONE_A)
    b = make_hosts(2, locality=ZONE_B, base=10)
    lb = balancer(LbPolicy.ROUND_ROBIN, [a, *b], locality_weights={ZONE_A: 5, ZONE_B: 1})
    assert pick(lb) is a
    assert pick(lb, exclude=a) in b


@pytest.mark.parametrize("policy", HASHING)
def test_hash_policies_fold_locality_weights_into_host_weights(policy: LbPolicy) -> None:
    (a,) = make_hosts(1, locality=ZONE_A)
    b = make_hosts(3, locality=ZONE_B, base=10)
    lb = balancer(policy, [a, *b], locality_weights={ZONE_A: 1, ZONE_B: 1})
    got = key_shares(lb, [a, *b])
    assert got == pytest.approx([1 / 2, 1 / 6, 1 / 6, 1 / 6], abs=0.04)


# --- property ---------------------------------------------------------------------------------

host_specs = st.lists(
    st.tuples(
        st.integers(0, 2),  # priority
        st.booleans(),  # healthy
        st.integers(1, 5),  # weight
        st.sampled_from([ZONE_A, ZONE_B]),
        st.integers(0, 3),  # active requests
    ),
    min_size=1,
    max_size=12,
)


def in_panic(hosts: Sequence[Host], factor: int = 140) -> set[int]:
    """Priorities in panic, by Envoy's rule (independent of the implementation)."""
    levels: dict[int, list[Host]] = {}
    for h in hosts:
        levels.setdefault(h.priority, []).append(h)
    health = {
        p: min(100, factor * sum(h.healthy for h in level) // len(level))
        for p, level in levels.items()
    }
    if sum(health.values()) >= 100:
        return set()
    return {p for p, level in levels.items() if 2 * sum(h.healthy for h in level) < len(level)}


@settings(max_examples=300, deadline=None)
@given(
    specs=host_specs,
    policy=st.sampled_from(list(LbPolicy)),
    locality_weights=st.sampled_from([{}, {ZONE_A: 1, ZONE_B: 3}, {ZONE_A: 2, ZONE_B: 1}]),
    keys=st.lists(st.one_of(st.none(), st.integers(0, 2**64 - 1)), min_size=1, max_size=8),
    exclude_index=st.integers(0, 11),
    seed=st.integers(0, 1000),
)
def test_choose_is_healthy_unless_in_panic_and_never_raises(
    *,
    specs: list[tuple[int, bool, int, Locality, int]],
    policy: LbPolicy,
    locality_weights: dict[Locality, int],
    keys: list[int | None],
    exclude_index: int,
    seed: int,
) -> None:
    hosts = []
    for i, (priority, healthy, weight, locality, active) in enumerate(specs):
        host = Host(
            SocketAddress(f"10.0.0.{i}", 80),
            weight=weight,
            priority=priority,
            locality=locality,
            healthy=healthy,
        )
        host.active_requests = active
        hosts.append(host)
    lb = balancer(
        policy, hosts, locality_weights=locality_weights, seed=seed, maglev_table_size=251
    )
    panicking = in_panic(hosts)
    exclude = hosts[exclude_index % len(hosts)]
    others_healthy = any(h.healthy and h is not exclude for h in hosts)
    for key in keys:
        for avoid in (None, exclude):
            chosen = lb.choose(key, avoid)
            assert chosen is not None
            assert chosen in hosts
            assert chosen.healthy or chosen.priority in panicking
            if avoid is not None and others_healthy:
                assert chosen is not exclude
