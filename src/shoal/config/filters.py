"""Runtime config of Shoal's HTTP filters (Envoy's fault and local_ratelimit), frozen.

Built from the Envoy protos by :mod:`shoal.config.envoy_filters`; a filter may also carry
per-route overrides (Envoy's ``typed_per_filter_config``, keyed by the filter's name).
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.config.model import HeaderMatcher, HeaderValueOption, Seconds


@dataclass(frozen=True, slots=True)
class FaultAbort:
    status: int = 0  # 0 with header_controlled: the status comes from the request header
    fraction: float = 1.0  # share of requests aborted, 0..1
    header_controlled: bool = False


@dataclass(frozen=True, slots=True)
class FaultDelay:
    seconds: Seconds = 0.0
    fraction: float = 1.0
    header_controlled: bool = False


@dataclass(frozen=True, slots=True)
class Fault:
    """``envoy.extensions.filters.http.fault.v3.HTTPFault``."""

    abort: FaultAbort | None = None
    delay: FaultDelay | None = None
    headers: tuple[HeaderMatcher, ...] = ()
    upstream_cluster: str = ""
    max_active_faults: int | None = None


@dataclass(frozen=True, slots=True)
class TokenBucket:
    max_tokens: int
    tokens_per_fill: int
    fill_interval: Seconds


@dataclass(frozen=True, slots=True)
class LocalRateLimit:
    """``envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit``; a filter with no
    bucket only counts, and limits where a route supplies one."""

    stat_prefix: str
    bucket: TokenBucket | None = None
    enabled: float = 0.0  # filter_enabled share (Envoy's default: 0, i.e. off)
    enforced: float = 0.0  # filter_enforced share
    status: int = 429
    response_headers_to_add: tuple[HeaderValueOption, ...] = ()
    x_ratelimit_headers: bool = False
    per_connection: bool = False


@dataclass(frozen=True, slots=True)
class AdaptiveConcurrency:
    """``envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency`` with
    its gradient controller (Envoy's defaults)."""

    update_interval: Seconds
    percentile: float = 0.5
    max_limit: int = 1000
    min_rtt_interval: Seconds = 60.0
    min_rtt_fixed: Seconds | None = None
    min_rtt_requests: int = 50
    jitter: float = 0.15
    min_concurrency: int = 3
    buffer: float = 0.25
    enabled: bool = True
    status: int = 503


@dataclass(frozen=True, slots=True)
class RateLimitAction:
    """One descriptor entry source (Envoy's RateLimit.Action): ``generic_key``,
    ``request_headers``, ``remote_address``, ``destination_cluster`` or
    ``header_value_match``."""

    kind: str
    key: str = ""
    value: str = ""
    header: str = ""  # lower-cased, for request_headers
    skip_if_absent: bool = False
    headers: tuple[HeaderMatcher, ...] = ()  # for header_value_match
    expect_match: bool = True


@dataclass(frozen=True, slots=True)
class GlobalRateLimit:
    """``envoy.extensions.filters.http.ratelimit.v3.RateLimit`` with filter-level
    ``rate_limits``: each entry makes one descriptor from its actions."""

    domain: str
    cluster: str  # the rate limit service's cluster (gRPC)
    descriptors: tuple[tuple[RateLimitAction, ...], ...] = ()
    timeout: Seconds = 0.02
    failure_mode_deny: bool = False
    status_on_error: int = 500
    rate_limited_status: int = 429
    x_envoy_ratelimited_header: bool = True


FilterConfig = Fault | LocalRateLimit | AdaptiveConcurrency | GlobalRateLimit


@dataclass(frozen=True, slots=True)
class HttpFilter:
    """One entry of the connection manager's filter chain (the router excluded)."""

    name: str
    config: FilterConfig
