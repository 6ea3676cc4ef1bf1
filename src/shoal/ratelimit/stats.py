"""The rate limit service's counters, named as the reference service names them.

Per limit (``key`` is the descriptor path, ``domain.key_value.key``)::

    ratelimit.service.rate_limit.<key>.total_hits | over_limit | near_limit
        | within_limit | shadow_mode
    ratelimit.service.rate_limit.<domain>.domain_not_found

and for the service::

    ratelimit.service.config_load_success | config_load_error | global_shadow_mode
    ratelimit.service.call.should_rate_limit.redis_error | service_error
    ratelimit_server.ShouldRateLimit.total_requests | response_time

``/stats`` renders them as Prometheus text with the names and labels of the reference
service's statsd-exporter mapping (``ratelimit_service_rate_limit_over_limit{domain=...,
key1=...,key2=...}``); ``/stats?format=text`` lists the dotted names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from shoal.observe.stats import Histogram, int_fields

_IPV4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")
_LABEL_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", '"': '\\"'})


def sanitize(part: str) -> str:
    """The reference service's stat name sanitizing: ``:`` and ``|`` become ``_``, and so
    do the dots of an IPv4 address."""
    part = part.replace(":", "_").replace("|", "_")
    return _IPV4.sub(lambda m: m[0].replace(".", "_"), part)


@dataclass(slots=True)
class LimitStats:
    """Counters of one limit (one descriptor path)."""

    total_hits: int = 0
    over_limit: int = 0
    near_limit: int = 0
    within_limit: int = 0
    shadow_mode: int = 0


LIMIT_COUNTERS = int_fields(LimitStats)


class ServiceStats:
    """Every counter of one ``shoal ratelimit`` process."""

    def __init__(self) -> None:
        self.config_load_success = 0
        self.config_load_error = 0
        self.global_shadow_mode = 0
        self.redis_error = 0
        self.service_error = 0
        self.total_requests = 0
        self.response_time = Histogram()  # milliseconds
        self.domain_not_found: dict[str, int] = {}
        self.limits: dict[tuple[str, ...], LimitStats] = {}

    def limit(self, key: tuple[str, ...]) -> LimitStats:
        """The counters of the limit whose stats key is ``key`` (created at zero)."""
        stats = self.limits.get(key)
        if stats is None:
            stats = self.limits[key] = LimitStats()
        return stats

    def register(self, keys: Iterable[tuple[str, ...]]) -> None:
        """Show these limits' counters from the start, at zero."""
        for key in keys:
            self.limit(key)

    def counters(self) -> dict[str, int]:
        """All counters by dotted name."""
        out = {
            "ratelimit.service.config_load_success": self.config_load_success,
            "ratelimit.service.config_load_error": self.config_load_error,
            "ratelimit.service.global_shadow_mode": self.global_shadow_mode,
            "ratelimit.service.call.should_rate_limit.redis_error": self.redis_error,
            "ratelimit.service.call.should_rate_limit.service_error": self.service_error,
            "ratelimit_server.ShouldRateLimit.total_requests": self.total_requests,
        }
        for domain, count in self.domain_not_found.items():
            out[f"ratelimit.service.rate_limit.{sanitize(domain)}.domain_not_found"] = count
        for key, stats in self.limits.items():
            prefix = "ratelimit.service.rate_limit." + ".".join(map(sanitize, key))
            for name in LIMIT_COUNTERS:
                out[f"{prefix}.{name}"] = getattr(stats, name)
        return out

    def render_text(self) -> str:
        """``name: value`` lines, sorted, then the response time's quantiles."""
        counters = self.counters()
        lines = [f"{name}: {counters[name]}\n" for name in sorted(counters)]
        lines.append(
            "ratelimit_server.ShouldRateLimit.response_time: "
            f"{self.response_time.quantile_summary()}\n"
        )
        return "".join(lines)

    def render_prometheus(self) -> str:
        """Prometheus text exposition (version 0.0.4)."""
        out: list[str] = []

        def family(name: str, kind: str, series: list[tuple[str, int]]) -> None:
            if not series:
                return
            out.append(f"# TYPE {name} {kind}\n")
            out.extend(f"{name}{labels} {value}\n" for labels, value in sorted(series))

        family("ratelimit_service_config_load_success", "counter", [("", self.config_load_success)])
        family("ratelimit_service_config_load_error", "counter", [("", self.config_load_error)])
        family("ratelimit_service_global_shadow_mode", "counter", [("", self.global_shadow_mode)])
        family(
            "ratelimit_service_should_rate_limit_error",
            "counter",
            [
                ('{err_type="redis_error"}', self.redis_error),
                ('{err_type="service_error"}', self.service_error),
            ],
        )
        family(
            "ratelimit_service_total_requests",
            "counter",
            [('{grpc_method="ShouldRateLimit"}', self.total_requests)],
        )
        family(
            "ratelimit_service_rate_limit_domain_not_found",
            "counter",
            [(_labels(("domain", d)), n) for d, n in self.domain_not_found.items()],
        )
        for name in LIMIT_COUNTERS:
            family(
                f"ratelimit_service_rate_limit_{name}",
                "counter",
                [(_limit_labels(key), getattr(s, name)) for key, s in self.limits.items()],
            )

        metric = "ratelimit_service_response_time_seconds"
        histogram = self.response_time
        label = 'grpc_method="ShouldRateLimit"'
        out.append(f"# TYPE {metric} histogram\n")
        for bound, below in zip(histogram.bounds, histogram.cumulative(), strict=True):
            out.append(f'{metric}_bucket{{{label},le="{bound / 1000:.12g}"}} {below}\n')
        out.append(f'{metric}_bucket{{{label},le="+Inf"}} {histogram.count}\n')
        out.append(f"{metric}_sum{{{label}}} {histogram.sum / 1000:.12g}\n")
        out.append(f"{metric}_count{{{label}}} {histogram.count}\n")
        return "".join(out)


def _labels(*pairs: tuple[str, str]) -> str:
    inner = ",".join(f'{name}="{value.translate(_LABEL_ESCAPES)}"' for name, value in pairs)
    return "{" + inner + "}"


def _limit_labels(key: tuple[str, ...]) -> str:
    """``domain``, then ``key1``, ``key2``, ... one per descriptor level."""
    domain, *levels = map(sanitize, key)
    return _labels(("domain", domain), *((f"key{i}", v) for i, v in enumerate(levels, 1)))
