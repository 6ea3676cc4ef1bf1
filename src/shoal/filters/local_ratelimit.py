"""``envoy.filters.http.local_ratelimit``: a token bucket per filter, per route override, or
per downstream connection.

The bucket refills lazily — the tokens a fill timer would have added are computed from the
elapsed time when a request arrives — so an idle limiter costs nothing. Envoy's default
``filter_enabled``/``filter_enforced`` is 0%: a limit does nothing until enabled.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from shoal.config.filters import LocalRateLimit, TokenBucket
from shoal.filters.base import FilteredRequest, LocalReply, Outcome


@dataclass(slots=True)
class TokenBucketState:
    config: TokenBucket
    tokens: float
    last_fill: float

    def take(self, now: float) -> bool:
        config = self.config
        fills = int((now - self.last_fill) / config.fill_interval)
        if fills > 0:
            self.tokens = min(config.max_tokens, self.tokens + fills * config.tokens_per_fill)
            self.last_fill += fills * config.fill_interval
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def reset_in(self, now: float) -> float:
        return max(0.0, self.last_fill + self.config.fill_interval - now)


class LocalRateLimitFilter:
    def __init__(self, name: str, config: LocalRateLimit, rng: random.Random | None = None) -> None:
        self.name = name
        self.config = config
        self.rng = rng or random.Random()
        self.buckets: dict[tuple[int, int], TokenBucketState] = {}
        self.stats = {"enabled": 0, "enforced": 0, "rate_limited": 0, "ok": 0}

    def on_request(self, request: FilteredRequest, now: float) -> Outcome:
        override = request.per_filter(self.name)
        config = override if isinstance(override, LocalRateLimit) else self.config
        if config.bucket is None or not self._share(config.enabled):
            return None
        self.stats["enabled"] += 1
        key = (id(config), request.connection_key if config.per_connection else 0)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = TokenBucketState(
                config.bucket, config.bucket.max_tokens, now
            )
        if bucket.take(now):
            self.stats["ok"] += 1
            return None
        self.stats["rate_limited"] += 1
        if not self._share(config.enforced):
            return None
        self.stats["enforced"] += 1
        headers = [
            (o.key.encode("latin-1"), o.value.encode("latin-1"))
            for o in config.response_headers_to_add
        ]
        if config.x_ratelimit_headers:
            headers += [
                (b"x-ratelimit-limit", b"%d" % config.bucket.max_tokens),
                (b"x-ratelimit-remaining", b"0"),
                (b"x-ratelimit-reset", b"%d" % round(bucket.reset_in(now) + 0.5)),
            ]
        return LocalReply(config.status, b"local_rate_limited", "RL", "local_rate_limited", headers)

    def counters(self) -> dict[str, int]:
        return dict(self.stats)

    def gauges(self) -> dict[str, int]:
        return {}

    def _share(self, fraction: float) -> bool:
        return fraction >= 1.0 or (fraction > 0 and self.rng.random() < fraction)
