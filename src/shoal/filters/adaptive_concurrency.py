"""``envoy.filters.http.adaptive_concurrency``: Envoy's gradient controller.

The proxy admits at most ``limit`` requests at once. Every update interval the limit moves by
the gradient between the idle latency (minRTT, measured with the limit pinned low) and the
latest sampled latency: ``limit = limit * clamp((minRTT * (1 + buffer)) / sampleRTT, 0.5, 2)
+ sqrt(limit)``. When the upstream saturates, latency rises, the gradient drops below 1 and
the excess is shed with 503 instead of queueing. Updates happen lazily on the request path
(no timers), so an idle proxy does nothing.
"""

from __future__ import annotations

import math
import random

from shoal.config.filters import AdaptiveConcurrency
from shoal.filters.base import FilteredRequest, LocalReply, Outcome


class AdaptiveConcurrencyFilter:
    def __init__(
        self, name: str, config: AdaptiveConcurrency, rng: random.Random | None = None
    ) -> None:
        self.name = name
        self.config = config
        self.rng = rng or random.Random()
        self.in_flight = 0
        self.limit = config.min_concurrency
        self.samples: list[float] = []
        self.min_rtt = config.min_rtt_fixed or 0.0
        self.sample_rtt = 0.0
        self.gradient = 1.0
        self.measuring = config.min_rtt_fixed is None  # the first minRTT is measured first
        self.next_update = 0.0
        self.next_min_rtt = 0.0
        self.saved_limit = config.min_concurrency
        self.stats = {"rq_blocked": 0}

    def on_request(self, request: FilteredRequest, now: float) -> Outcome:
        if not self.config.enabled:
            return None
        self._tick(now)
        if self.in_flight >= self.limit:
            self.stats["rq_blocked"] += 1
            return LocalReply(
                self.config.status, b"reached concurrency limit", "-", "reached_concurrency_limit"
            )
        self.in_flight += 1
        request.on_finish(self._finished)
        return None

    def _finished(self, latency: float, ok: bool) -> None:
        self.in_flight -= 1
        if ok:  # failures say nothing about how fast the upstream serves
            self.samples.append(latency)
        if self.measuring and len(self.samples) >= self.config.min_rtt_requests:
            self.min_rtt = self._aggregate()
            self.measuring = False
            self.limit = self.saved_limit
            self.samples.clear()
            self.next_min_rtt = 0.0  # scheduled on the next tick

    def _tick(self, now: float) -> None:
        config = self.config
        if self.measuring:
            return
        if config.min_rtt_fixed is None:
            if not self.next_min_rtt:
                spread = 1.0 + self.rng.uniform(0.0, config.jitter)
                self.next_min_rtt = now + config.min_rtt_interval * spread
            elif now >= self.next_min_rtt:
                self.measuring = True
                self.saved_limit = self.limit
                self.limit = config.min_concurrency
                self.samples.clear()
                return
        if now < self.next_update:
            return
        self.next_update = now + config.update_interval
        if not self.samples:
            return
        self.sample_rtt = self._aggregate()
        self.samples.clear()
        target = self.min_rtt * (1.0 + config.buffer)
        self.gradient = min(2.0, max(0.5, target / self.sample_rtt)) if self.sample_rtt else 2.0
        limit = self.limit * self.gradient
        limit += math.sqrt(limit)
        self.limit = max(1, min(config.max_limit, int(limit)))

    def _aggregate(self) -> float:
        ordered = sorted(self.samples)
        index = min(len(ordered) - 1, int(self.config.percentile * len(ordered)))
        return ordered[index]

    def counters(self) -> dict[str, int]:
        return dict(self.stats)

    def gauges(self) -> dict[str, int]:
        """Envoy's gradient controller gauges (times in milliseconds)."""
        return {
            "concurrency_limit": self.limit,
            "min_rtt_msecs": int(self.min_rtt * 1000),
            "sample_rtt_msecs": int(self.sample_rtt * 1000),
            "min_rtt_calculation_active": int(self.measuring),
        }
