"""Envoy's load balancers: priority levels, panic mode, locality weights and the five
policies (round robin, least request, random, ring hash, Maglev).

``build_lb`` precomputes everything from one snapshot of the host set, health included: the
cluster rebuilds on every membership or health change, so ``choose`` (once per request) is
O(1) or O(log n) and never rescans hosts. ``active_requests`` is the only live input.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from hashlib import blake2b
from heapq import heapify, heappop, heappush, heapreplace
from types import MappingProxyType
from typing import Generic, Protocol, TypeVar, cast

from shoal.config.model import Cluster, LbPolicy, Locality
from shoal.upstream.host import Host

PANIC_THRESHOLD = 50  # Envoy's healthy_panic_threshold default, in percent

_T = TypeVar("_T")


def hash_key_of(value: str | bytes) -> int:
    """Stable 64-bit hash for hash policies and ring points (Envoy uses xxHash64)."""
    data = value.encode() if isinstance(value, str) else value
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "little")


class LoadBalancer(Protocol):
    @property
    def priority_load(self) -> Mapping[int, int]:
        """Percent of traffic per priority (Envoy's priority load), for stats."""
        ...

    def choose(self, hash_key: int | None = None, exclude: Host | None = None) -> Host | None:
        """A host for one request, None if there is none; ``exclude`` (the host a retry
        should avoid) is returned only when no other host can be chosen."""
        ...


class _Picker(Protocol):
    """One policy over a fixed non-empty host set; it returns ``exclude`` only when that is
    the only host it can pick, so the balancer then looks in the other sets."""

    @property
    def hosts(self) -> Sequence[Host]: ...

    def pick(self, hash_key: int | None, exclude: Host | None) -> Host: ...


# --- schedulers and policies --------------------------------------------------------------


class _Edf(Generic[_T]):
    """Envoy's earliest-deadline-first scheduler for static weights: each pick takes the
    earliest deadline and re-queues it one period/weight later, ties going to the earliest
    queued (Envoy's order offset). Deadlines are integers (period = lcm of the weights) so
    sequences are exact rather than at the mercy of float rounding."""

    __slots__ = ("_heap", "_seq", "_steps", "items")

    def __init__(self, items: Sequence[_T], weights: Sequence[int]) -> None:
        period = math.lcm(*weights)
        self.items = tuple(items)
        self._steps = tuple(period // w for w in weights)
        self._heap = [(step, i, i) for i, step in enumerate(self._steps)]
        heapify(self._heap)
        self._seq = len(self._steps)

    def next(self, exclude: _T | None = None) -> _T:
        heap = self._heap
        held = None
        if exclude is not None and self.items[heap[0][2]] is exclude and len(heap) > 1:
            held = heappop(heap)  # keeps its deadline: a skipped turn is not a consumed one
        deadline, _, i = heap[0]
        heapreplace(heap, (deadline + self._steps[i], self._seq, i))
        self._seq += 1
        if held is not None:
            heappush(heap, held)
        return self.items[i]


class _RoundRobin:
    """Equal weights: plain rotation, starting at the first host (Envoy starts at a random
    offset; starting at 0 keeps sequences reproducible)."""

    __slots__ = ("_next", "hosts")

    def __init__(self, hosts: Sequence[Host]) -> None:
        self.hosts = tuple(hosts)
        self._next = 0

    def pick(self, hash_key: int | None, exclude: Host | None) -> Host:
        hosts = self.hosts
        i = self._next
        host = hosts[i]
        i = (i + 1) % len(hosts)
        if host is exclude and len(hosts) > 1:
            host = hosts[i]
            i = (i + 1) % len(hosts)
        self._next = i
        return host


class _WeightedRoundRobin:
    """Unequal weights: Envoy's EDF, not nginx's smooth WRR (O(n) per pick)."""

    __slots__ = ("_edf", "hosts")

    def __init__(self, hosts: Sequence[Host], weights: Sequence[int]) -> None:
        self._edf = _Edf(hosts, weights)
        self.hosts = self._edf.items

    def pick(self, hash_key: int | None, exclude: Host | None) -> Host:
        return self._edf.next(exclude)


def _slot(index: Mapping[Host, int], exclude: Host | None) -> int:
    """Position of ``exclude`` in a picker's hosts, -1 if it is not there."""
    return -1 if exclude is None else index.get(exclude, -1)


class _Random:
    """Equal weights: uniform; an excluded host is cut out of the draw, not redrawn."""

    __slots__ = ("_index", "_random", "hosts")

    def __init__(self, hosts: Sequence[Host], rng: random.Random) -> None:
        self.hosts = tuple(hosts)
        self._index = {host: i for i, host in enumerate(self.hosts)}
        self._random = rng.random

    def pick(self, hash_key: int | None, exclude: Host | None) -> Host:
        hosts = self.hosts
        k = _slot(self._index, exclude)
        n = len(hosts) - (k >= 0)
        if n == 0:
            return hosts[0]
        i = int(self._random() * n)
        return hosts[i + (0 <= k <= i)]


class _WeightedRandom:
    """Unequal weights: bisect a uniform draw over cumulative weights."""

    __slots__ = ("_cumulative", "_index", "_random", "hosts")

    def __init__(self, hosts: Sequence[Host], weights: Sequence[int], rng: random.Random) -> None:
        self.hosts = tuple(hosts)
        self._index = {host: i for i, host in enumerate(self.hosts)}
        self._cumulative: list[int] = []
        total = 0
        for weight in weights:
            total += weight
            self._cumulative.append(total)
        self._random = rng.random

    def pick(self, hash_key: int | None, exclude: Host | None) -> Host:
        hosts = self.hosts
        cumulative = self._cumulative
        k = _slot(self._index, exclude)
        if k < 0:
            return hosts[bisect_right(cumulative, self._random() * cumulative[-1])]
        if len(hosts) == 1:
            return hosts[0]
        start = cumulative[k - 1] if k else 0
        weight = cumulative[k] - start
        point = self._random() * (cumulative[-1] - weight)
        if point >= start:
            point += weight  # jump over the excluded host's span
        return hosts[min(bisect_right(cumulative, point), len(hosts) - 1)]


class _LeastRequest:
    """Equal weights: Envoy's power of N choices, sampled with replacement, first sampled
    wins ties."""

    __slots__ = ("_extra", "_index", "_random", "hosts")

    def __init__(self, hosts: Sequence[Host], choice_count: int, rng: random.Random) -> None:
        self.hosts = tuple(hosts)
        self._index = {host: i for i, host in enumerate(self.hosts)}
        self._extra = range(max(1, choice_count) - 1)
        self._random = rng.random

    def pick(self, hash_key: int | None, exclude: Host | None) -> Host:
        hosts = self.hosts
        random_ = self._random
        k = _slot(self._index, exclude)
        n = len(hosts) - (k >= 0)
        if n == 0:
            return hosts[0]
        i = int(random_() * n)
        best = hosts[i + (0 <= k <= i)]
        for _ in self._extra:
            i = int(random_() * n)
            host = hosts[i + (0 <= k <= i)]
            if host.active_requests < best.active_requests:
                best = host
        return best


class _WeightedLeastRequest:
    """Unequal weights: Envoy's EDF where a host re-queues with weight / (active + 1)
    (active_request_bias 1.0), read when it is picked."""

    __slots__ = ("_heap", "_seq", "hosts")

    def __init__(self, hosts: Sequence[Host]) -> None:
        self.hosts = tuple(hosts)
        self._heap = [((h.active_requests + 1) / h.weight, i, i) for i, h in enumerate(hosts)]
        heapify(self._heap)
        self._seq = len(self._heap)

    def pick(self, hash_key: int | None, exclude: Host | None) -> Host:
        heap = self._heap
        held = None
        if exclude is not None and self.hosts[heap[0][2]] is exclude and len(heap) > 1:
            held = heappop(heap)
        deadline, _, i = heap[0]
        host = self.hosts[i]
        heapreplace(heap, (deadline + (host.active_requests + 1) / host.weight, self._seq, i))
        self._seq += 1
        if held is not None:
            heappush(heap, held)
        return host


def _walk(table: Sequence[Host], i: int, exclude: Host) -> Host:
    """The next entry after ``i`` that is not ``exclude``; the caller guarantees one exists.
    Tables interleave hosts, so this is a step or two unless one host dominates the weight."""
    n = len(table)
    host = table[i]
    while host is exclude:
        i = i + 1 if i + 1 < n else 0
        host = table[i]
    return host


class _Ring:
    """Ketama ring as Envoy builds it: points ``"<ip:port>_<i>"`` in proportion to weight,
    the lightest host getting at least its share of ``min_size``, at most ``max_size`` in
    all; a key goes to the first point at or after its hash.

    Unlike Envoy, the lightest host's point count is rounded up to a power of two: Envoy's
    exact ``ceil(min_size * share)`` changes every host's points whenever the host count
    changes, so removing 1 of 10 hosts moves ~15% of keys; rounded, only the removed host's
    ~10% move."""

    __slots__ = ("_hashes", "_points", "_random_bits", "hosts")

    def __init__(
        self,
        hosts: Sequence[Host],
        weights: Sequence[int],
        min_size: int,
        max_size: int,
        rng: random.Random,
    ) -> None:
        total = sum(weights)
        lightest = min(weights)
        lightest_points = max(1, -(-max(1, min_size) * lightest // total))
        per_weight = Fraction(1 << (lightest_points - 1).bit_length(), lightest)
        per_weight = min(per_weight, Fraction(max(1, max_size), total))
        points: list[tuple[int, int]] = []
        present: list[Host] = []
        placed = 0
        target = Fraction(0)
        for i in sorted(range(len(hosts)), key=lambda i: hosts[i].key):
            # running sums hand out fractional points without drifting (as Envoy does)
            target += per_weight * weights[i]
            count = max(0, math.ceil(target) - placed)
            placed += count
            key = hosts[i].key
            points.extend((hash_key_of(f"{key}_{n}"), i) for n in range(count))
            if count:
                present.append(hosts[i])
        points.sort()
        self._hashes = [h for h, _ in points]
        self._points = [hosts[i] for _, i in points]
        self.hosts = tuple(present)
        self._random_bits = rng.getrandbits

    def pick(self, hash_key: int | None, exclude: Host | None) -> Host:
        if hash_key is None:
            hash_key = self._random_bits(64)
        i = bisect_left(self._hashes, hash_key)
        if i == len(self._hashes):
            i = 0
        host = self._points[i]
        if host is exclude and len(self.hosts) > 1:
            return _walk(self._points, i, host)
        return host


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


class _Maglev:
    """Envoy's weighted Maglev: hosts take turns filling the next free slot of their own
    permutation (offset + skip * j mod size), a host of weight w taking a turn in w out of
    every max-weight rounds. Hosts are ordered by address so the table does not depend on
    the order the cluster lists them in."""

    __slots__ = ("_random_bits", "_table", "hosts")

    def __init__(
        self, hosts: Sequence[Host], weights: Sequence[int], size: int, rng: random.Random
    ) -> None:
        if not _is_prime(size):
            raise ValueError(f"maglev table size {size} is not a prime")
        order = sorted(range(len(hosts)), key=lambda i: hosts[i].key)
        members = [hosts[i] for i in order]
        shares = [weights[i] for i in order]
        slots = [hash_key_of(h.key) % size for h in members]
        skips = [
            int.from_bytes(blake2b(h.key.encode(), digest_size=8, salt=b"skip").digest(), "little")
            % (size - 1)
            + 1
            for h in members
        ]
        heaviest = max(shares)
        turns = [0] * len(members)  # Envoy's target_weight_, in weight units
        counts = [0] * len(members)
        table: list[Host | None] = [None] * size
        filled = 0
        rounds = 0
        while filled < size:
            rounds += 1
            for i, host in enumerate(members):
                if rounds * shares[i] < turns[i]:
                    continue
                turns[i] += heaviest
                slot = slots[i]
                skip = skips[i]
                while table[slot] is not None:
                    slot += skip
                    if slot >= size:
                        slot -= size
                table[slot] = host
                slot += skip
                slots[i] = slot - size if slot >= size else slot
                counts[i] += 1
                filled += 1
                if filled == size:
                    break
        self._table = cast("list[Host]", table)  # full: no None left
        self.hosts = tuple(h for h, c in zip(members, counts, strict=True) if c)
        self._random_bits = rng.getrandbits

    def pick(self, hash_key: int | None, exclude: Host | None) -> Host:
        if hash_key is None:
            hash_key = self._random_bits(64)
        table = self._table
        i = hash_key % len(table)
        host = table[i]
        if host is exclude and len(self.hosts) > 1:
            return _walk(table, i, host)
        return host


class _Localities:
    """Envoy's locality-weighted LB: EDF over localities by weight * availability, then the
    host policy among that locality's healthy hosts."""

    __slots__ = ("_edf", "hosts", "leaves")

    def __init__(self, leaves: Sequence[_Picker], weights: Sequence[int]) -> None:
        self._edf = _Edf(leaves, weights)
        self.leaves = self._edf.items
        self.hosts = tuple(host for leaf in self.leaves for host in leaf.hosts)

    def pick(self, hash_key: int | None, exclude: Host | None) -> Host:
        return self._edf.next().pick(hash_key, exclude)


# --- the balancer -----------------------------------------------------------------------------


class _Balancer:
    __slots__ = ("_by_percent", "_fallback", "_only", "_random_bits", "priority_load")

    def __init__(
        self,
        by_percent: Sequence[_Picker],
        fallback: Sequence[_Picker],
        priority_load: Mapping[int, int],
        rng: random.Random,
    ) -> None:
        self._by_percent = tuple(by_percent)
        # one priority taking all the load: skip the draw (and keep round robin deterministic)
        self._only = by_percent[0] if len(set(map(id, by_percent))) == 1 else None
        self._fallback = tuple(fallback)
        self.priority_load = MappingProxyType(dict(priority_load))
        self._random_bits = rng.getrandbits

    def choose(self, hash_key: int | None = None, exclude: Host | None = None) -> Host | None:
        picker = self._only
        if picker is None:
            if hash_key is None:
                hash_key = self._random_bits(64)
            picker = self._by_percent[hash_key % 100]  # Envoy's choosePriority
        host = picker.pick(hash_key, exclude)
        if host is exclude and exclude is not None:
            # the chosen set holds nothing else: any other choosable host beats a repeat
            for other in self._fallback:
                host = other.pick(hash_key, exclude)
                if host is not exclude:
                    break
        return host


class _NoHosts:
    __slots__ = ()

    priority_load: Mapping[int, int] = MappingProxyType({})

    def choose(self, hash_key: int | None = None, exclude: Host | None = None) -> Host | None:
        return None


def _priority_state(
    levels: Sequence[Sequence[Host]], overprovisioning_factor: int
) -> tuple[list[int], list[bool]]:
    """Envoy's per-priority load (percent, summing to 100) and panic flags.

    Health of a level is min(100, factor * healthy / total); load goes to levels in order as
    far as their health reaches, scaled up when the summed health is under 100, rounding left
    over going to the first healthy level. While the summed health is under 100 a level
    with under ``PANIC_THRESHOLD``% healthy hosts is in panic (balances over all its hosts);
    when all are, the load follows host counts instead."""
    healthy = [sum(h.healthy for h in level) for level in levels]
    health = [
        min(100, overprovisioning_factor * ok // len(level))
        for ok, level in zip(healthy, levels, strict=True)
    ]
    available = min(100, sum(health))
    panic = [
        available < 100 and 100 * ok < PANIC_THRESHOLD * len(level)
        for ok, level in zip(healthy, levels, strict=True)
    ]
    if available == 0 or all(panic):  # available is 0 with all healthy if the factor is 0
        total = sum(len(level) for level in levels)
        loads = [100 * len(level) // total for level in levels]
        loads[0] += 100 - sum(loads)
        return loads, panic
    loads = []
    remaining = 100
    for level_health in health:
        load = min(remaining, level_health * 100 // available)
        loads.append(load)
        remaining -= load
    loads[next(i for i, h in enumerate(health) if h)] += remaining
    return loads, panic


def _integers(weights: Sequence[Fraction]) -> list[int]:
    """Smallest integers in the same ratios, so EDF and Maglev arithmetic stays exact."""
    scale = math.lcm(*(w.denominator for w in weights))
    ints = [int(w * scale) for w in weights]
    divisor = math.gcd(*ints)
    return [i // divisor for i in ints]


def _by_locality(hosts: Sequence[Host]) -> dict[Locality, list[Host]]:
    groups: dict[Locality, list[Host]] = {}
    for host in hosts:
        groups.setdefault(host.locality, []).append(host)
    return groups


_Make = Callable[[Sequence[Host], Sequence[int]], _Picker]


def _picker_factory(cluster: Cluster, rng: random.Random) -> _Make:
    policy = cluster.lb_policy

    def make(hosts: Sequence[Host], weights: Sequence[int]) -> _Picker:
        if policy is LbPolicy.RING_HASH:
            return _Ring(
                hosts, weights, cluster.ring_hash_min_size, cluster.ring_hash_max_size, rng
            )
        if policy is LbPolicy.MAGLEV:
            return _Maglev(hosts, weights, cluster.maglev_table_size, rng)
        equal = min(weights) == max(weights)
        if policy is LbPolicy.RANDOM:
            return _Random(hosts, rng) if equal else _WeightedRandom(hosts, weights, rng)
        if policy is LbPolicy.LEAST_REQUEST:
            if equal:
                return _LeastRequest(hosts, cluster.least_request_choice_count, rng)
            return _WeightedLeastRequest(hosts)
        return _RoundRobin(hosts) if equal else _WeightedRoundRobin(hosts, weights)

    return make


def _hash_level(
    make: _Make, eligible: Sequence[Host], locality_weights: Mapping[Locality, int]
) -> _Picker:
    """Hash policies fold locality weights into host weights (Envoy's normalizeWeights):
    choosing a locality first would break key affinity."""
    groups = _by_locality(eligible)
    if any(locality_weights.get(locality, 0) for locality in groups):
        members: list[Host] = []
        shares: list[Fraction] = []
        for locality, group in groups.items():
            locality_weight = locality_weights.get(locality, 0)
            if locality_weight:
                group_weight = sum(h.weight for h in group)
                members.extend(group)
                shares.extend(Fraction(h.weight * locality_weight, group_weight) for h in group)
        return make(members, _integers(shares))
    return make(eligible, [h.weight for h in eligible])


def _level(
    make: _Make,
    hosts: Sequence[Host],
    eligible: Sequence[Host],
    locality_weights: Mapping[Locality, int],
    overprovisioning_factor: int,
) -> _Picker | None:
    """Non-hash policies: with locality weights, localities with healthy hosts are picked
    by weight * min(1, factor * healthy / total), even in panic (as Envoy does); without any
    such locality, all eligible hosts flat."""
    leaves: list[_Picker] = []
    shares: list[Fraction] = []
    for locality, group in _by_locality(hosts).items():
        healthy = [h for h in group if h.healthy]
        weight = locality_weights.get(locality, 0)
        if weight and healthy:
            availability = Fraction(overprovisioning_factor * len(healthy), 100 * len(group))
            shares.append(weight * min(Fraction(1), availability))
            leaves.append(make(healthy, [h.weight for h in healthy]))
    if leaves:
        return _Localities(leaves, _integers(shares))
    if eligible:
        return make(eligible, [h.weight for h in eligible])
    return None


def build_lb(
    cluster: Cluster, hosts: Sequence[Host], rng: random.Random | None = None
) -> LoadBalancer:
    """The cluster's balancer over ``hosts`` as they are now (``rng`` seeds tests)."""
    if not hosts:
        return _NoHosts()
    if rng is None:
        rng = random.Random()
    make = _picker_factory(cluster, rng)
    hashing = cluster.lb_policy in (LbPolicy.RING_HASH, LbPolicy.MAGLEV)
    priorities = sorted({h.priority for h in hosts})
    levels = [[h for h in hosts if h.priority == p] for p in priorities]
    loads, panic = _priority_state(levels, cluster.overprovisioning_factor)
    weights_by_priority: dict[int, dict[Locality, int]] = {}
    for endpoint in cluster.endpoints:
        if endpoint.locality_weight > 0:
            weights_by_priority.setdefault(endpoint.priority, {})[endpoint.locality] = (
                endpoint.locality_weight
            )
    by_percent: list[_Picker] = []
    fallback: list[_Picker] = []
    for priority, level, load, in_panic in zip(priorities, levels, loads, panic, strict=True):
        eligible = level if in_panic else [h for h in level if h.healthy]
        locality_weights = weights_by_priority.get(priority, {})
        source: _Picker | None
        if hashing:
            source = _hash_level(make, eligible, locality_weights) if eligible else None
        else:
            source = _level(
                make, level, eligible, locality_weights, cluster.overprovisioning_factor
            )
        if source is None:
            continue
        by_percent.extend([source] * load)
        fallback.extend(source.leaves if isinstance(source, _Localities) else [source])
    return _Balancer(by_percent, fallback, dict(zip(priorities, loads, strict=True)), rng)
