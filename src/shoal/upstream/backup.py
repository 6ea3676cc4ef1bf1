"""Backup requests (Motan's ``backupRequest``, "The Tail at Scale"'s hedged requests): one
route's recent latencies, the delay after which an unanswered request gets a second try on
another host, and the budget that caps how many do.

Configured as Shoal's metadata ``shoal.backup_request`` on a Route (see
:class:`shoal.config.model.BackupRequestPolicy` and ``docs/config.md``); the proxy
(``proxy/http.py``) asks :meth:`BackupRequests.admit` when a request's first try is on its
way, :meth:`BackupRequests.take` when the delay has passed, and :meth:`BackupRequests.record`
with the latency of each answer.

- **Latencies** go into a histogram of the last ``window`` answers: a ring of bucket
  indexes plus a count per bucket, so a sample is O(1) and memory is fixed. Buckets are
  log-linear (HdrHistogram's layout: 16 per power of two above 32 µs, exact below), so a
  percentile is at most 1/16 above the exact one — it is read as its bucket's upper edge,
  never early. The percentile is recomputed every ``_RECOMPUTE_EVERY`` samples by a walk
  over the buckets (a constant, no sort), so no request pays for more than a few hundred
  additions and the loop never stalls, whatever the window.
- **The budget** is a token bucket: each request that may get a backup adds ``max_ratio``
  of a token, a backup takes a whole one, and the bucket starts empty and holds at most
  ``100 * max_ratio`` (at least 1). So backups never exceed ``max_ratio`` of the requests
  so far, and after a calm period at most the share of 100 requests goes out at once.
"""

from __future__ import annotations

import math
from typing import Final

from shoal.config.model import BackupRequestPolicy

BACKUP_COUNTERS: Final = (
    "sent",  # backups sent
    "won",  # the backup's answer was the one the client got
    "capped",  # the delay passed but max_ratio (or the retry circuit breaker) said no
)

_RECOMPUTE_EVERY: Final = 32
_SAVED_REQUESTS: Final = 100  # the budget saves at most the backups of this many requests
_BACKUP: Final = 1_000_000  # one backup in the budget's units
_SUB_BITS: Final = 4  # 2**4 = 16 buckets per power of two
_LINEAR: Final = 2 << _SUB_BITS  # below 32 µs every microsecond has its own bucket
_MAX_US: Final = (1 << 26) - 1  # ~67 s: longer answers count as this long


def bucket_of(micros: int) -> int:
    """The histogram bucket of a latency in whole microseconds."""
    if micros < _LINEAR:
        return micros
    micros = min(micros, _MAX_US)
    shift = micros.bit_length() - _SUB_BITS - 1
    return (shift << _SUB_BITS) + (micros >> shift)


def bucket_ceiling(index: int) -> int:
    """The smallest latency (µs) above every value of bucket ``index``."""
    if index < _LINEAR:
        return index + 1
    shift = (index >> _SUB_BITS) - 1
    return ((index - (shift << _SUB_BITS)) + 1) << shift


_BUCKETS: Final = bucket_of(_MAX_US) + 1


class BackupRequests:
    """One route's backup-request state (one per route per config version)."""

    __slots__ = (
        "_budget",
        "_capacity",
        "_counts",
        "_filled",
        "_pos",
        "_ratio",
        "_ring",
        "_since",
        "counters",
        "delay",
        "name",
        "policy",
    )

    def __init__(self, policy: BackupRequestPolicy, name: str = "") -> None:
        self.policy = policy
        self.name = name
        self.counters: dict[str, int] = dict.fromkeys(BACKUP_COUNTERS, 0)
        self.delay = policy.max_delay  # seconds; max_delay until the window knows enough
        self._ring: list[int] = [0] * policy.window  # bucket of each sample, oldest at _pos
        self._counts: list[int] = [0] * _BUCKETS
        self._pos = 0
        self._filled = 0  # samples in the ring, up to the window
        # samples since the percentile was last computed, offset so that the first
        # computation comes with the minimum_samples-th sample
        self._since = _RECOMPUTE_EVERY - policy.minimum_samples
        # the budget in millionths of a backup: whole numbers add up exactly
        self._ratio = max(1, round(policy.max_ratio * _BACKUP))
        self._capacity = max(_BACKUP, self._ratio * _SAVED_REQUESTS)
        self._budget = 0

    def admit(self) -> None:
        """A request whose first try is on its way: it may get a backup, and adds its
        share to the budget."""
        budget = self._budget + self._ratio
        self._budget = budget if budget < self._capacity else self._capacity

    def take(self) -> bool:
        """May one more backup go out? (Counted as ``capped`` when not.)"""
        if self._budget >= _BACKUP:
            self._budget -= _BACKUP
            return True
        self.counters["capped"] += 1
        return False

    def record(self, seconds: float) -> None:
        """The latency of an answer (from the first try's start to its response head)."""
        bucket = bucket_of(int(seconds * 1_000_000))
        ring = self._ring
        pos = self._pos
        counts = self._counts
        if self._filled == len(ring):
            counts[ring[pos]] -= 1  # the oldest sample leaves the window
        else:
            self._filled += 1
        ring[pos] = bucket
        counts[bucket] += 1
        pos += 1
        self._pos = 0 if pos == len(ring) else pos
        self._since += 1
        if self._since >= _RECOMPUTE_EVERY:
            self._since = 0
            self._recompute()

    def delay_ms(self) -> int:
        """The current delay in whole milliseconds, rounded up (the ``delay_ms`` gauge)."""
        return math.ceil(self.delay * 1000 - 1e-9)

    def inherit(self, previous: BackupRequests) -> None:
        """Keep counting into ``previous``'s counters (a new config version of the same
        route); with an unchanged policy the latencies learnt so far are kept too."""
        self.counters = previous.counters
        if previous.policy == self.policy:
            self._ring = list(previous._ring)
            self._counts = list(previous._counts)
            self._pos, self._filled, self._since = previous._pos, previous._filled, previous._since
            self.delay, self._budget = previous.delay, previous._budget

    def _recompute(self) -> None:
        """The percentile's bucket, by a walk up the counts (nearest rank)."""
        policy = self.policy
        rank = max(1, math.ceil(policy.percentile * self._filled / 100 - 1e-9))
        counts = self._counts
        index = 0
        seen = counts[0]
        while seen < rank:  # rank <= the samples counted: the walk ends
            index += 1
            seen += counts[index]
        seconds = bucket_ceiling(index) / 1_000_000
        self.delay = min(max(seconds, policy.min_delay), policy.max_delay)


class BackupRegistry:
    """Routes' backup-request state by route name, for the stats snapshot
    (``route.<name>.backup_request.*``); a name registered again (a new config version, or
    a route of that name in another listener) keeps counting into the counters there."""

    __slots__ = ("routes",)

    def __init__(self) -> None:
        self.routes: dict[str, BackupRequests] = {}

    def add(self, backup: BackupRequests) -> None:
        previous = self.routes.get(backup.name)
        if previous is not None:
            backup.inherit(previous)
        self.routes[backup.name] = backup


# this process's routes with backup requests, read by ProxyRuntime.snapshot()
ROUTE_BACKUPS: Final = BackupRegistry()


def build_backup(
    policy: BackupRequestPolicy, name: str, registry: BackupRegistry | None = ROUTE_BACKUPS
) -> BackupRequests:
    """A route's state; a named route is registered for stats, an unnamed one has none."""
    backup = BackupRequests(policy, name)
    if name and registry is not None:
        registry.add(backup)
    return backup
