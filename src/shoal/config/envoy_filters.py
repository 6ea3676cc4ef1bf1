"""Envoy HTTP filters (fault, local_ratelimit) → :mod:`shoal.config.filters`.

Internal to :mod:`shoal.config.envoy`. The same messages configure the connection manager's
filter chain and the per-route overrides (``typed_per_filter_config``).
"""

from __future__ import annotations

from envoy.extensions.filters.http.adaptive_concurrency.v3 import adaptive_concurrency_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2
from google.protobuf.message import Message

from shoal.config.envoy_fields import (
    Ctx,
    cluster_ref,
    duration,
    percent,
    required,
    uint,
    unpack,
)
from shoal.config.envoy_headers import header_matcher, headers_to_add
from shoal.config.filters import (
    AdaptiveConcurrency,
    Fault,
    FaultAbort,
    FaultDelay,
    FilterConfig,
    GlobalRateLimit,
    LocalRateLimit,
    RateLimitAction,
    TokenBucket,
)

FILTER_TYPES = (
    fault_pb2.HTTPFault,
    local_rate_limit_pb2.LocalRateLimit,
    adaptive_concurrency_pb2.AdaptiveConcurrency,
    rate_limit_pb2.RateLimit,
)
_DENOMINATORS = {0: 100, 1: 10_000, 2: 1_000_000}  # FractionalPercent.DenominatorType


def filter_config(message: Message, ctx: Ctx) -> FilterConfig:
    """An unpacked fault or local_ratelimit message as Shoal's config."""
    if isinstance(message, fault_pb2.HTTPFault):
        return _fault(message, ctx)
    if isinstance(message, adaptive_concurrency_pb2.AdaptiveConcurrency):
        return _adaptive_concurrency(message, ctx)
    if isinstance(message, rate_limit_pb2.RateLimit):
        return _global_rate_limit(message, ctx)
    assert isinstance(message, local_rate_limit_pb2.LocalRateLimit)
    return local_rate_limit(message, ctx)


def per_filter_configs(owner: Message, ctx: Ctx) -> tuple[tuple[str, FilterConfig], ...]:
    """``typed_per_filter_config`` of a route or virtual host, keyed by filter name."""
    here = ctx.at("typed_per_filter_config")
    return tuple(
        (
            str(name),
            filter_config(unpack(packed, here.at(str(name)), *FILTER_TYPES), here.at(str(name))),
        )
        for name, packed in sorted(owner.typed_per_filter_config.items())
    )


def _fraction(percent: Message, ctx: Ctx) -> float:
    """A FractionalPercent as a share in 0..1 (Envoy caps it at 100%)."""
    denominator = _DENOMINATORS.get(int(percent.denominator))
    if denominator is None:
        raise ctx.at("denominator").error("unknown denominator")
    return min(1.0, int(percent.numerator) / denominator)


def _fault(fault: Message, ctx: Ctx) -> Fault:
    abort = None
    if fault.HasField("abort"):
        here = ctx.at("abort")
        config = fault.abort
        kind = config.WhichOneof("error_type")
        if kind == "grpc_status":
            raise here.at(kind).error("grpc_status aborts need HTTP/2, not supported yet")
        if kind is None:
            raise here.error("one of http_status or header_abort is required")
        status = int(config.http_status) if kind == "http_status" else 0
        if kind == "http_status" and not 200 <= status < 600:
            raise here.at("http_status").error("http_status must be in [200, 600)")
        abort = FaultAbort(
            status=status,
            fraction=_percentage(config, here),
            header_controlled=kind == "header_abort",
        )
    delay = None
    if fault.HasField("delay"):
        here = ctx.at("delay")
        config = fault.delay
        kind = config.WhichOneof("fault_delay_secifier")
        if kind is None:
            raise here.error("one of fixed_delay or header_delay is required")
        delay = FaultDelay(
            seconds=duration(config, "fixed_delay", here) or 0.0,
            fraction=_percentage(config, here),
            header_controlled=kind == "header_delay",
        )
    headers_ctx = ctx.at("headers")
    return Fault(
        abort=abort,
        delay=delay,
        headers=tuple(header_matcher(h, headers_ctx.at(i)) for i, h in enumerate(fault.headers)),
        upstream_cluster=str(fault.upstream_cluster),
        max_active_faults=uint(fault, "max_active_faults", 0, ctx)
        if fault.HasField("max_active_faults")
        else None,
    )


def _percentage(config: Message, ctx: Ctx) -> float:
    """An abort or delay's share of requests; Envoy's default is 100%."""
    if not config.HasField("percentage"):
        return 1.0
    return _fraction(config.percentage, ctx.at("percentage"))


def local_rate_limit(limit: Message, ctx: Ctx) -> LocalRateLimit:
    if not limit.stat_prefix:
        raise ctx.at("stat_prefix").error("stat_prefix is required")
    bucket = None
    if limit.HasField("token_bucket"):
        here = ctx.at("token_bucket")
        config = limit.token_bucket
        max_tokens = int(config.max_tokens)
        if max_tokens <= 0:
            raise here.at("max_tokens").error("max_tokens must be greater than 0")
        fill = duration(config, "fill_interval", here)
        if not fill:
            raise here.at("fill_interval").error("fill_interval must be greater than 0")
        bucket = TokenBucket(max_tokens, uint(config, "tokens_per_fill", 1, here, lo=1), fill)
    status = 429
    if limit.HasField("status"):
        status = int(limit.status.code)
        if status < 400:
            status = 429  # Envoy: a status below 400 means the default, 429
    return LocalRateLimit(
        stat_prefix=str(limit.stat_prefix),
        bucket=bucket,
        enabled=_runtime_fraction(limit, "filter_enabled", ctx),
        enforced=_runtime_fraction(limit, "filter_enforced", ctx),
        status=status,
        response_headers_to_add=headers_to_add(limit, "response_headers_to_add", ctx),
        x_ratelimit_headers=int(limit.enable_x_ratelimit_headers) != 0,
        per_connection=bool(limit.local_rate_limit_per_downstream_connection),
    )


def _runtime_fraction(owner: Message, name: str, ctx: Ctx) -> float:
    """A RuntimeFractionalPercent's default value (no runtime here); unset means 0%."""
    if not owner.HasField(name):
        return 0.0
    return _fraction(getattr(owner, name).default_value, ctx.at(name, "default_value"))


def _adaptive_concurrency(config: Message, ctx: Ctx) -> AdaptiveConcurrency:
    """The gradient controller (the only one Envoy has), with Envoy's defaults."""
    if not config.HasField("gradient_controller_config"):
        raise ctx.at("gradient_controller_config").error("gradient_controller_config is required")
    here = ctx.at("gradient_controller_config")
    gradient = config.gradient_controller_config
    limits = gradient.concurrency_limit_params
    limits_ctx = here.at("concurrency_limit_params")
    interval = duration(limits, "concurrency_update_interval", limits_ctx)
    if not interval:
        raise limits_ctx.at("concurrency_update_interval").error(
            "concurrency_update_interval is required and must be greater than 0"
        )
    rtt = gradient.min_rtt_calc_params
    rtt_ctx = here.at("min_rtt_calc_params")
    status = 503
    if config.HasField("concurrency_limit_exceeded_status"):
        status = int(config.concurrency_limit_exceeded_status.code)
        if status < 400:
            status = 503  # Envoy: a non-error status means the default
    return AdaptiveConcurrency(
        update_interval=interval,
        percentile=percent(gradient, "sample_aggregate_percentile", 50.0, here) / 100.0,
        max_limit=uint(limits, "max_concurrency_limit", 1000, limits_ctx, lo=1),
        min_rtt_interval=duration(rtt, "interval", rtt_ctx) or 60.0,
        min_rtt_fixed=duration(rtt, "fixed_value", rtt_ctx),
        min_rtt_requests=uint(rtt, "request_count", 50, rtt_ctx, lo=1),
        jitter=percent(rtt, "jitter", 15.0, rtt_ctx) / 100.0,
        min_concurrency=uint(rtt, "min_concurrency", 3, rtt_ctx, lo=1),
        buffer=percent(rtt, "buffer", 25.0, rtt_ctx) / 100.0,
        enabled=bool(config.enabled.default_value.value) if config.HasField("enabled") else True,
        status=status,
    )


def _global_rate_limit(config: Message, ctx: Ctx) -> GlobalRateLimit:
    """The rate limit filter with filter-level ``rate_limits`` (route-level ``rate_limits``
    are not supported yet: every request through the filter is checked)."""
    domain = required(str(config.domain), ctx.at("domain"), "domain")
    service = config.rate_limit_service
    service_ctx = ctx.at("rate_limit_service")
    if not service.grpc_service.HasField("envoy_grpc"):
        raise service_ctx.at("grpc_service").error("grpc_service.envoy_grpc is required")
    cluster = cluster_ref(
        str(service.grpc_service.envoy_grpc.cluster_name),
        service_ctx.at("grpc_service", "envoy_grpc", "cluster_name"),
    )
    if int(service.transport_api_version) != 2:  # V3
        raise service_ctx.at("transport_api_version").error("transport_api_version must be V3")
    limits_ctx = ctx.at("rate_limits")
    descriptors = tuple(
        _descriptor(limit, limits_ctx.at(index)) for index, limit in enumerate(config.rate_limits)
    )
    if not descriptors:
        raise limits_ctx.error("at least one rate limit (filter-level rate_limits) is required")
    status = int(config.status_on_error.code) if config.HasField("status_on_error") else 500
    limited = (
        int(config.rate_limited_status.code) if config.HasField("rate_limited_status") else 429
    )
    return GlobalRateLimit(
        domain=domain,
        cluster=cluster,
        descriptors=descriptors,
        timeout=duration(config, "timeout", ctx) or 0.02,
        failure_mode_deny=bool(config.failure_mode_deny),
        status_on_error=status if status >= 400 else 500,
        rate_limited_status=limited if limited >= 400 else 429,
        x_envoy_ratelimited_header=not config.disable_x_envoy_ratelimited_header,
    )


def _descriptor(limit: Message, ctx: Ctx) -> tuple[RateLimitAction, ...]:
    actions_ctx = ctx.at("actions")
    if not limit.actions:
        raise actions_ctx.error("at least one action is required")
    return tuple(_action(a, actions_ctx.at(i)) for i, a in enumerate(limit.actions))


def _action(action: Message, ctx: Ctx) -> RateLimitAction:
    kind = str(action.WhichOneof("action_specifier"))
    here = ctx.at(kind)
    if kind == "generic_key":
        spec = action.generic_key
        value = required(str(spec.descriptor_value), here.at("descriptor_value"), "value")
        return RateLimitAction(kind, str(spec.descriptor_key) or "generic_key", value)
    if kind == "request_headers":
        spec = action.request_headers
        return RateLimitAction(
            kind,
            required(str(spec.descriptor_key), here.at("descriptor_key"), "descriptor_key"),
            header=required(str(spec.header_name).lower(), here.at("header_name"), "header_name"),
            skip_if_absent=bool(spec.skip_if_absent),
        )
    if kind in ("remote_address", "destination_cluster"):
        return RateLimitAction(kind, kind)
    if kind == "header_value_match":
        spec = action.header_value_match
        headers_ctx = here.at("headers")
        return RateLimitAction(
            kind,
            str(spec.descriptor_key) or "header_match",
            required(str(spec.descriptor_value), here.at("descriptor_value"), "descriptor_value"),
            headers=tuple(header_matcher(h, headers_ctx.at(i)) for i, h in enumerate(spec.headers)),
            expect_match=spec.expect_match.value if spec.HasField("expect_match") else True,
        )
    raise ctx.error(f"rate limit action {kind} is not supported yet")
