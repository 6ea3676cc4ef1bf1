"""Build filter instances from config, keeping their state and counters across reloads
when a filter's config did not change."""

from __future__ import annotations

from shoal.config.filters import AdaptiveConcurrency, Fault, GlobalRateLimit, LocalRateLimit
from shoal.config.filters import HttpFilter as HttpFilterConfig
from shoal.filters.adaptive_concurrency import AdaptiveConcurrencyFilter
from shoal.filters.base import HttpFilter, Resolve
from shoal.filters.fault import FaultFilter
from shoal.filters.local_ratelimit import LocalRateLimitFilter


def stat_prefix(manager_prefix: str, config: HttpFilterConfig) -> str:
    """Envoy's stat names: ``http.<prefix>.fault.*``, ``<stat>.http_local_rate_limit.*``."""
    if isinstance(config.config, Fault):
        return f"http.{manager_prefix}.fault."
    if isinstance(config.config, AdaptiveConcurrency):
        return f"http.{manager_prefix}.adaptive_concurrency.gradient_controller."
    if isinstance(config.config, GlobalRateLimit):
        return f"cluster.{config.config.cluster}.ratelimit."
    return f"{config.config.stat_prefix}.http_local_rate_limit."


def build_filters(
    manager_prefix: str,
    configs: tuple[HttpFilterConfig, ...],
    existing: dict[str, HttpFilter],
    resolve: Resolve,
) -> tuple[tuple[HttpFilter, ...], dict[str, HttpFilter]]:
    """The chain for one connection manager, and the instances by stat prefix (so the
    next reload and the stats scrape find them)."""
    chain: list[HttpFilter] = []
    by_prefix: dict[str, HttpFilter] = {}
    for config in configs:
        prefix = stat_prefix(manager_prefix, config)
        current = existing.get(prefix)
        if current is not None and current.config == config.config:
            instance = current
        else:
            instance = _new(config, resolve)
            if current is not None:  # counters are cumulative, as Envoy's
                for key, value in current.stats.items():
                    instance.stats[key] = instance.stats.get(key, 0) + value
        chain.append(instance)
        by_prefix[prefix] = instance
    return tuple(chain), by_prefix


def _new(config: HttpFilterConfig, resolve: Resolve) -> HttpFilter:
    if isinstance(config.config, Fault):
        return FaultFilter(config.name, config.config)
    if isinstance(config.config, AdaptiveConcurrency):
        return AdaptiveConcurrencyFilter(config.name, config.config)
    if isinstance(config.config, GlobalRateLimit):
        # grpcio costs ~17 MB of RSS: loaded only by a proxy that has this filter
        from shoal.filters.ratelimit import GlobalRateLimitFilter  # noqa: PLC0415

        return GlobalRateLimitFilter(config.name, config.config, resolve)
    assert isinstance(config.config, LocalRateLimit)
    return LocalRateLimitFilter(config.name, config.config)
