"""The error-rate / slow-call circuit breaker (Hystrix and Sentinel semantics), per cluster
or per route.

Unlike Envoy's ``circuit_breakers`` (limits on concurrent connections and requests), this
breaker watches outcomes. It is configured as Shoal's own metadata,
``metadata.filter_metadata["shoal.circuit_breaker"]`` (see
:class:`shoal.config.model.CircuitBreakerPolicy` and ``docs/config.md``).

- **CLOSED**: every request is allowed; each finished one is added to a sliding window, by
  count (the last ``window_size`` requests, a ring buffer) or by time (the last
  ``window_duration``, in ``window_buckets`` buckets). Once the window holds at least
  ``minimum_requests`` requests and the error ratio reaches ``error_ratio`` (or the
  slow-call ratio reaches ``slow_call_ratio``), the breaker opens.
- **OPEN**: requests are refused (the caller serves the fallback) until ``open_duration``
  has passed; the first request after that turns the breaker HALF_OPEN.
- **HALF_OPEN**: ``half_open_trials`` requests are let through, the rest refused. Any
  failed (or slow) trial re-opens the breaker at once; when all trials succeed it closes
  with an empty window.

Every call is O(1) (a time window may clear up to ``window_buckets`` stale buckets, a
constant). Time is passed in by the caller (``now``, seconds on a monotonic clock such as
``loop.time()``), so the breaker needs no timer and tests need no sleeping.

The caller's contract: every ``allow(now)`` that returns True is followed by exactly one
``record(now, success, duration)`` when the request ends, or ``release()`` when it ended
without an outcome (the client went away first). Results of requests allowed before the
breaker opened are ignored while it is OPEN.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from shoal.config.model import CircuitBreakerPolicy

CLOSED: Final = 0
OPEN: Final = 1
HALF_OPEN: Final = 2
STATE_NAMES: Final = ("closed", "open", "half_open")  # indexed by the state code (the gauge)

# counters; the proxy increments the two fallback ones when it serves a fallback
BREAKER_COUNTERS: Final = (
    "opened",  # CLOSED or HALF_OPEN → OPEN
    "half_opened",  # OPEN → HALF_OPEN
    "closed",  # HALF_OPEN → CLOSED
    "rejected",  # requests refused while OPEN, or HALF_OPEN with every trial taken
    "fallback_local",  # refused requests answered with the local reply
    "fallback_cluster",  # refused requests sent to the fallback cluster
)

# how a refused request is flagged in access logs (%RESPONSE_FLAGS%, %RESPONSE_CODE_DETAILS%)
RESPONSE_FLAG: Final = "UO"
RESPONSE_CODE_DETAILS: Final = "circuit_breaker_open"


class ErrorRateBreaker:
    """One breaker: a cluster's (``ClusterRuntime.breaker``) or a route's
    (:func:`build_breaker`)."""

    __slots__ = (
        "_bucket_errors",
        "_bucket_slow",
        "_bucket_total",
        "_bucket_width",
        "_error_ratio",
        "_errors",
        "_head",
        "_minimum",
        "_open_duration",
        "_opened_at",
        "_outcomes",
        "_pos",
        "_results",
        "_slow",
        "_slow_duration",
        "_slow_ratio",
        "_time_window",
        "_total",
        "_trials",
        "_trials_max",
        "clock",
        "counters",
        "name",
        "policy",
        "state_code",
    )

    def __init__(
        self,
        policy: CircuitBreakerPolicy,
        name: str = "",
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.policy = policy
        self.name = name
        # only for callers without a clock of their own: allow/record take ``now``
        self.clock: Callable[[], float] = clock if clock is not None else time.monotonic
        self.counters: dict[str, int] = dict.fromkeys(BREAKER_COUNTERS, 0)
        self.state_code = CLOSED  # the ``state`` gauge: 0 closed, 1 open, 2 half-open
        self._opened_at = 0.0
        self._trials = 0  # trials admitted in this HALF_OPEN period
        self._results = 0  # of which finished (all successes: a failure re-opens)
        self._trials_max = policy.half_open_trials
        self._minimum = policy.minimum_requests
        self._error_ratio = policy.error_ratio
        self._open_duration = policy.open_duration
        slow_duration = policy.slow_call_duration
        counts_slow = slow_duration is not None and policy.slow_call_ratio < 1.0
        self._slow_duration = slow_duration if counts_slow and slow_duration is not None else 0.0
        self._slow_ratio = policy.slow_call_ratio if counts_slow else 2.0  # > 1: never reached
        # the window: running sums, plus a ring of outcomes (count) or of buckets (time)
        self._time_window = policy.window == "time"
        self._total = 0
        self._errors = 0
        self._slow = 0
        self._pos = 0
        self._outcomes: list[int] = []  # count window: 0 ok, bit 1 error, bit 2 slow, -1 empty
        self._bucket_total: list[int] = []
        self._bucket_errors: list[int] = []
        self._bucket_slow: list[int] = []
        self._bucket_width = 1.0
        self._head = 0  # time window: the index (now // width) of the newest bucket
        if self._time_window:
            buckets = policy.window_buckets
            self._bucket_width = policy.window_duration / buckets
            self._bucket_total = [0] * buckets
            self._bucket_errors = [0] * buckets
            self._bucket_slow = [0] * buckets
        else:
            self._outcomes = [-1] * policy.window_size

    # the hot path -----------------------------------------------------------------------------

    def allow(self, now: float) -> bool:
        """Whether a request may go to the upstream now; False means serve the fallback
        (counted in ``rejected``). An OPEN breaker whose ``open_duration`` is over turns
        HALF_OPEN here and admits the first trial."""
        state = self.state_code
        if state == CLOSED:
            return True
        if state == OPEN:
            if now - self._opened_at < self._open_duration:
                self.counters["rejected"] += 1
                return False
            self.state_code = HALF_OPEN
            self.counters["half_opened"] += 1
            self._trials = 0
            self._results = 0
        if self._trials < self._trials_max:
            self._trials += 1
            return True
        self.counters["rejected"] += 1
        return False

    def record(self, now: float, success: bool, duration: float) -> None:
        """One allowed request finished: ``success`` False for an error (a 5xx answer or a
        local failure: connect failure, reset, timeout); ``duration`` in seconds makes it
        slow when at least ``slow_call_duration``."""
        slow = self._slow_duration > 0.0 and duration >= self._slow_duration
        state = self.state_code
        if state == CLOSED:
            if self._time_window:
                self._add_timed(now, success, slow)
            else:
                self._add_counted(success, slow)
            total = self._total
            if total >= self._minimum and (
                self._errors / total >= self._error_ratio or self._slow / total >= self._slow_ratio
            ):
                self._open(now)
        elif state == HALF_OPEN:
            if self._results >= self._trials:
                return  # not a trial: allowed before the breaker opened
            if not success or slow:
                self._open(now)
                return
            self._results += 1
            if self._results >= self._trials_max:
                self.state_code = CLOSED
                self.counters["closed"] += 1
                self._reset_window()
        # OPEN: a request allowed before the breaker opened; the window starts afresh

    def release(self) -> None:
        """An allowed request ended without an outcome (the client left before the answer):
        in HALF_OPEN its trial slot is given back, so another request can take it."""
        if self.state_code == HALF_OPEN and self._trials > self._results:
            self._trials -= 1

    # introspection ----------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"`` (as of the last call: an OPEN breaker
        turns HALF_OPEN only when a request asks)."""
        return STATE_NAMES[self.state_code]

    def now(self) -> float:
        return self.clock()

    def window_counts(self) -> tuple[int, int, int]:
        """The window's requests, errors and slow calls (a time window as of its newest
        bucket)."""
        return self._total, self._errors, self._slow

    def inherit(self, previous: ErrorRateBreaker) -> None:
        """Keep counting into ``previous``'s counters (a new config version of the same
        cluster or route); the state starts CLOSED."""
        self.counters = previous.counters

    # internals --------------------------------------------------------------------------------

    def _open(self, now: float) -> None:
        self.state_code = OPEN
        self._opened_at = now
        self.counters["opened"] += 1
        self._reset_window()

    def _reset_window(self) -> None:
        self._total = self._errors = self._slow = 0
        self._pos = 0
        if self._time_window:
            buckets = len(self._bucket_total)
            self._bucket_total = [0] * buckets
            self._bucket_errors = [0] * buckets
            self._bucket_slow = [0] * buckets
        else:
            self._outcomes = [-1] * len(self._outcomes)

    def _add_counted(self, success: bool, slow: bool) -> None:
        outcomes = self._outcomes
        pos = self._pos
        old = outcomes[pos]
        if old >= 0:  # the oldest outcome leaves the window
            self._total -= 1
            self._errors -= old & 1
            self._slow -= (old >> 1) & 1
        outcome = (0 if success else 1) | (2 if slow else 0)
        outcomes[pos] = outcome
        self._total += 1
        self._errors += outcome & 1
        self._slow += (outcome >> 1) & 1
        pos += 1
        self._pos = pos if pos < len(outcomes) else 0

    def _add_timed(self, now: float, success: bool, slow: bool) -> None:
        index = int(now // self._bucket_width)
        buckets = len(self._bucket_total)
        head = self._head
        if not self._total:
            self._head = head = index  # an empty window starts here
        elif index > head:
            # buckets after the newest one up to ``index`` are out of the window: clear them
            for step in range(1, min(index - head, buckets) + 1):
                slot = (head + step) % buckets
                self._total -= self._bucket_total[slot]
                self._errors -= self._bucket_errors[slot]
                self._slow -= self._bucket_slow[slot]
                self._bucket_total[slot] = 0
                self._bucket_errors[slot] = 0
                self._bucket_slow[slot] = 0
            self._head = head = index
        slot = head % buckets  # a clock that stepped back counts in the newest bucket
        self._bucket_total[slot] += 1
        self._total += 1
        if not success:
            self._bucket_errors[slot] += 1
            self._errors += 1
        if slow:
            self._bucket_slow[slot] += 1
            self._slow += 1


def admit(
    breakers: tuple[ErrorRateBreaker | None, ...], now: float, admitted: list[ErrorRateBreaker]
) -> ErrorRateBreaker | None:
    """Ask a request's breakers in turn (the route's, then the cluster's): those that let it
    through join ``admitted``; the first that refuses is returned with its fallback counted,
    and the ones that had admitted the request are released (a refusal is no verdict)."""
    for breaker in breakers:
        if breaker is None:
            continue
        if breaker.allow(now):
            admitted.append(breaker)
            continue
        for earlier in admitted:
            earlier.release()
        admitted.clear()
        fallback = "fallback_cluster" if breaker.policy.fallback_cluster else "fallback_local"
        breaker.counters[fallback] += 1
        return breaker
    return None


class BreakerRegistry:
    """Route-level breakers by route name, for the stats snapshot
    (``route.<name>.circuit_breaker.*``). A breaker registered under a name already taken
    (the same route in a new config version, or a route of that name in another listener)
    shares the counters already there, so counters never go back; the state gauge is the
    newest one's."""

    __slots__ = ("breakers",)

    def __init__(self) -> None:
        self.breakers: dict[str, ErrorRateBreaker] = {}

    def add(self, breaker: ErrorRateBreaker) -> None:
        previous = self.breakers.get(breaker.name)
        if previous is not None:
            breaker.inherit(previous)
        self.breakers[breaker.name] = breaker

    def clear(self) -> None:
        self.breakers.clear()


# this process's route-level breakers, read by ProxyRuntime.snapshot()
ROUTE_BREAKERS: Final = BreakerRegistry()


def build_breaker(
    policy: CircuitBreakerPolicy,
    name: str,
    clock: Callable[[], float] | None = None,
    registry: BreakerRegistry | None = ROUTE_BREAKERS,
) -> ErrorRateBreaker:
    """A route-level breaker (one per route per config version). A route with a ``name``
    is registered for stats as ``route.<name>.circuit_breaker.*``; an unnamed one (``""``)
    works the same but has no stats."""
    breaker = ErrorRateBreaker(policy, name, clock)
    if name and registry is not None:
        registry.add(breaker)
    return breaker
