"""The sans-IO core of ``ShouldRateLimit``: a request becomes a :class:`Plan` (one counter
increment per limited descriptor), the counts the store returns become the response.

Fixed windows, as the reference service: a limit of N per unit counts hits in a counter
per ``(domain, descriptor entries, window start)``, the window start being the Unix time
rounded down to the unit; a descriptor is OVER_LIMIT when its counter, after adding this
request's hits, exceeds N. Stats follow the reference's arithmetic: with a hits addend of
5 taking a counter from 98 to 103 on a limit of 100, 2 hits were near the limit and 3 over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from envoy.service.ratelimit.v3 import rls_pb2

from shoal.ratelimit.config import MAX_UINT32, UNIT_SECONDS, Limit, RateLimitConfig
from shoal.ratelimit.stats import LimitStats, ServiceStats

OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT
_UNIT_ENUM: dict[str, int] = {
    name: rls_pb2.RateLimitResponse.RateLimit.Unit.Value(name.upper()) for name in UNIT_SECONDS
}
_ENUM_UNIT: dict[int, str] = {number: name for name, number in _UNIT_ENUM.items()}
_NS = 1_000_000_000


class RequestError(ValueError):
    """The request cannot be answered (no domain, no descriptors, a bad limit override)."""


@dataclass(slots=True)
class Check:
    """One limited descriptor of a request: the counter to add ``hits`` to."""

    index: int  # the descriptor's position in the request
    limit: Limit
    key: str  # the Redis key: prefix, domain, entries, window start
    hits: int
    stats: LimitStats


@dataclass(slots=True)
class Plan:
    """What one request asks for, before the counters are touched."""

    size: int  # descriptors in the request
    checks: list[Check]
    unlimited: list[bool]
    now_ns: int

    def increments(self) -> list[tuple[str, int, int]]:
        """``(key, hits, ttl seconds)`` for each counter to increment."""
        return [(c.key, c.hits, c.limit.seconds) for c in self.checks]


def redis_key(prefix: str, domain: str, entries: Sequence[tuple[str, str]], window: int) -> str:
    """The reference service's cache key: ``prefix + domain_key_value_..._windowstart``."""
    parts = [prefix, domain, "_"]
    for key, value in entries:
        parts += (key, "_", value, "_")
    parts.append(str(window))
    return "".join(parts)


def window_start(now_ns: int, seconds: int) -> int:
    """The start (Unix seconds) of the fixed window of ``seconds`` holding ``now_ns``."""
    return (now_ns // _NS) // seconds * seconds


class RateLimiter:
    """Turns requests into plans and counts into responses; holds the live config."""

    def __init__(
        self,
        config: RateLimitConfig,
        stats: ServiceStats,
        key_prefix: str = "",
        shadow_mode: bool = False,
        near_limit_ratio: float = 0.8,
    ) -> None:
        self.stats = stats
        self.key_prefix = key_prefix
        self.shadow_mode = shadow_mode
        self.near_limit_ratio = near_limit_ratio
        self.config = config
        self.set_config(config)

    def set_config(self, config: RateLimitConfig) -> None:
        self.config = config
        self.stats.register(limit.stats_key for limit in config.limits())

    def plan(self, request: rls_pb2.RateLimitRequest, now_ns: int) -> Plan:
        """Find each descriptor's limit, its counter key and hits; counts ``total_hits``.

        ``RequestError`` when the request has no domain or no descriptors, as the
        reference service rejects it."""
        domain: str = request.domain
        if not domain:
            raise RequestError("rate limit domain must not be empty")
        if not request.descriptors:
            raise RequestError("rate limit descriptor list must not be empty")
        config = self.config
        known = config.has_domain(domain)
        limits: list[Limit | None] = []
        unlimited: list[bool] = []
        replaced: set[str] = set()
        entries_of: list[list[tuple[str, str]]] = []
        for descriptor in request.descriptors:
            entries = [(e.key, e.value) for e in descriptor.entries]
            entries_of.append(entries)
            limit: Limit | None = None
            if not known:
                self.stats.domain_not_found[domain] = self.stats.domain_not_found.get(domain, 0) + 1
            elif descriptor.HasField("limit"):
                limit = _override(domain, entries, descriptor.limit)
            else:
                limit = config.limit_for(domain, entries)
            if limit is not None:
                replaced.update(limit.replaces)
                if limit.unlimited:
                    limit = None
                    unlimited.append(True)
                else:
                    unlimited.append(False)
            else:
                unlimited.append(False)
            limits.append(limit)

        default_hits = max(1, int(request.hits_addend))
        checks: list[Check] = []
        for index, limit in enumerate(limits):
            if limit is None or (limit.name and limit.name in replaced):
                continue
            descriptor = request.descriptors[index]
            hits = (
                int(descriptor.hits_addend.value)
                if descriptor.HasField("hits_addend")
                else default_hits
            )
            stats = self.stats.limit(limit.stats_key)
            stats.total_hits += hits
            window = window_start(now_ns, limit.seconds)
            key = redis_key(self.key_prefix, domain, entries_of[index], window)
            checks.append(Check(index, limit, key, hits, stats))
        return Plan(len(limits), checks, unlimited, now_ns)

    def respond(self, plan: Plan, counts: Sequence[int]) -> rls_pb2.RateLimitResponse:
        """The response once each check's counter is ``counts[i]`` (after the increment)."""
        statuses = self._blank_statuses(plan)
        over = False
        for check, count in zip(plan.checks, counts, strict=True):
            status = self._status(check, count, plan.now_ns)
            statuses[check.index] = status
            over = over or status.code == OVER_LIMIT
        code = OK
        if over:
            if self.shadow_mode:
                self.stats.global_shadow_mode += 1
            else:
                code = OVER_LIMIT
        return rls_pb2.RateLimitResponse(overall_code=code, statuses=statuses)

    def fail_open(self, plan: Plan) -> rls_pb2.RateLimitResponse:
        """The answer when the counters cannot be reached: OK for every descriptor, with
        no ``current_limit`` (nothing is known about the remaining budget)."""
        return rls_pb2.RateLimitResponse(overall_code=OK, statuses=self._blank_statuses(plan))

    def _blank_statuses(self, plan: Plan) -> list[rls_pb2.RateLimitResponse.DescriptorStatus]:
        DescriptorStatus = rls_pb2.RateLimitResponse.DescriptorStatus  # noqa: N806
        return [
            DescriptorStatus(code=OK, limit_remaining=MAX_UINT32)
            if unlimited
            else DescriptorStatus(code=OK)
            for unlimited in plan.unlimited
        ]

    def _status(
        self, check: Check, after: int, now_ns: int
    ) -> rls_pb2.RateLimitResponse.DescriptorStatus:
        limit, stats, hits = check.limit, check.stats, check.hits
        before = after - hits
        threshold = limit.requests_per_unit
        near = int(threshold * self.near_limit_ratio)
        if after > threshold:
            code = OVER_LIMIT
            remaining = 0
            if before >= threshold:
                stats.over_limit += hits
            else:
                stats.over_limit += after - threshold
                stats.near_limit += threshold - max(near, before)
            if limit.shadow_mode:
                code = OK
                stats.shadow_mode += hits if before >= threshold else after - threshold
        else:
            code = OK
            remaining = threshold - after
            stats.within_limit += hits
            if after > near:
                stats.near_limit += hits if before >= near else after - near
        seconds = limit.seconds
        reset_ns = (window_start(now_ns, seconds) + seconds) * _NS - now_ns
        status = rls_pb2.RateLimitResponse.DescriptorStatus(
            code=code,
            current_limit=rls_pb2.RateLimitResponse.RateLimit(
                name=limit.name,
                requests_per_unit=threshold,
                unit=_UNIT_ENUM[limit.unit],
            ),
            limit_remaining=min(remaining, MAX_UINT32),
        )
        status.duration_until_reset.FromNanoseconds(reset_ns)
        return status


def _override(domain: str, entries: Sequence[tuple[str, str]], override: Any) -> Limit:
    """A limit the request brings (Envoy's ``limit`` override on a descriptor): never in
    shadow mode, counted under ``domain.key_value...``."""
    unit = _ENUM_UNIT.get(int(override.unit))
    if unit is None:
        raise RequestError("the descriptor's limit override has no valid unit")
    rpu = int(override.requests_per_unit)
    path = tuple(f"{key}_{value}" if value else key for key, value in entries)
    return Limit(requests_per_unit=rpu, unit=unit, stats_key=(domain, *path))
