"""Shoal's own kinds (``shoal.io/v1``), for what Istio has no resource for.

``CircuitBreakerPolicy``: the error-rate / slow-call breaker with half-open state and
fallback (Hystrix / Sentinel semantics) for a host or one of its subsets. Its fields are
those of Shoal's ``shoal.circuit_breaker`` cluster metadata (docs/config.md), written in
camelCase like Istio's; they are checked by the very code that reads them in the proxy.

``RateLimitPolicy``: overload protection for every instance of a host, on the instance's
sidecar (inbound): a local token bucket (Envoy's local_ratelimit filter), a global budget
shared by all instances (Envoy's ratelimit filter calling ``shoal ratelimit``) and adaptive
concurrency (Envoy's adaptive_concurrency filter). They share a kind because they share the
place and the question ("how much may reach this service?"), and a sidecar's inbound
listener takes them from one resource.

``RpcRoute``: routes for RPC services (Dubbo, SOFA Bolt, Motan2) by method, version, group
and attributes, modelled on Aeraki's MetaRouter; each route may carry a timeout, retries, a
token bucket and an error-rate breaker of its own (they go on the route, so per method).
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from shoal.config.envoy import backup_from_dict, breaker_from_dict
from shoal.config.envoy_rpc import RPC_RETRY_ON
from shoal.errors import ConfigError
from shoal.pilot.api.model import (
    BackupRequestPolicy,
    BreakerSettings,
    CircuitBreakerPolicy,
    Destination,
    GlobalRateLimit,
    HTTPRetry,
    LocalRateLimit,
    Meta,
    RateLimitPolicy,
    RpcMatch,
    RpcRoute,
    RpcRouteRule,
)
from shoal.pilot.api.parse import (
    _INT32_MAX,
    _At,
    _bool,
    _destination,
    _dns_label,
    _duration,
    _fields,
    _header_name,
    _hostname,
    _integer,
    _list,
    _named_matches,
    _one_of,
    _optional,
    _port,
    _required,
    _route_destinations,
    _string,
    _string_match,
)
from shoal.pilot.model import envoy_duration

KINDS: Final = ("CircuitBreakerPolicy", "RateLimitPolicy", "BackupRequestPolicy", "RpcRoute")
_UINT32 = 2**32 - 1
_ACTIONS = ("genericKey", "requestHeaders", "remoteAddress", "destinationCluster")
_MIN_RTT_FIELDS = ("interval", "fixedValue", "requestCount", "jitter", "minConcurrency", "buffer")

_BREAKER_FIELDS = (
    "window",
    "windowSize",
    "windowDuration",
    "windowBuckets",
    "minimumRequests",
    "errorRatio",
    "slowCallDuration",
    "slowCallRatio",
    "openDuration",
    "halfOpenTrials",
    "fallback",
)
_SNAKE = re.compile(r"(?<!^)(?=[A-Z])")
_SNAKE_WORD = re.compile(r"\b[a-z]+(?:_[a-z]+)+\b")
# A stand-in for the fallback destination's cluster while the settings are checked.
_FALLBACK_CLUSTER = "outbound|0|fallback|fallback"


def _snake(name: str) -> str:
    return _SNAKE.sub("_", name).lower()


def _camel(text: str) -> str:
    """Field names in the proxy's messages, spelled as in the policy (``localReply``)."""
    return _SNAKE_WORD.sub(lambda m: re.sub(r"_([a-z])", lambda c: c[1].upper(), m[0]), text)


def parse_policy(
    kind: str, spec: object, at: _At, meta: Meta
) -> CircuitBreakerPolicy | RateLimitPolicy | BackupRequestPolicy | RpcRoute:
    if kind == "CircuitBreakerPolicy":
        return _circuit_breaker(spec, at, meta)
    if kind == "BackupRequestPolicy":
        return _backup_request(spec, at, meta)
    if kind == "RpcRoute":
        return _rpc_route(spec, at, meta)
    return _rate_limit(spec, at, meta)


_BACKUP_FIELDS = ("percentile", "maxRatio", "minDelay", "maxDelay", "window", "minimumSamples")


def _backup_request(spec: object, at: _At, meta: Meta) -> BackupRequestPolicy:
    """The proxy's ``shoal.backup_request`` fields in camelCase, checked by the proxy's
    own reader so that what pilot accepts the proxy applies."""
    data = _fields(spec, at, ("host", *_BACKUP_FIELDS))
    host = _hostname(_required(data, "host", at), at.at("host"), wildcard=False)
    settings = {_snake(k): v for k, v in data.items() if k in _BACKUP_FIELDS}
    try:
        backup_from_dict(settings)
    except ConfigError as exc:
        raise at.at(*_camel(exc.field).split(".")).error(_camel(exc.reason)) from exc
    return BackupRequestPolicy(meta, host, json.dumps(settings, sort_keys=True))


def _circuit_breaker(spec: object, at: _At, meta: Meta) -> CircuitBreakerPolicy:
    data = _fields(spec, at, ("host", "subset", *_BREAKER_FIELDS))
    host = _hostname(_required(data, "host", at), at.at("host"), wildcard=False)
    subset = _dns_label(data["subset"], at.at("subset"), "subset name") if "subset" in data else ""
    breaker = _breaker(data, at, ("localReply", "destination"))
    return CircuitBreakerPolicy(meta, host, breaker.settings, subset, breaker.fallback)


def _breaker(data: dict[str, Any], at: _At, fallbacks: tuple[str, ...]) -> BreakerSettings:
    """The breaker fields of ``data`` as the proxy's ``shoal.circuit_breaker`` settings,
    checked by the proxy's own reader; a fallback is one of ``fallbacks``."""
    settings: dict[str, Any] = {_snake(k): v for k, v in data.items() if k in _BREAKER_FIELDS}
    fallback: Destination | None = None
    if "fallback" in data:
        here = at.at("fallback")
        others = [f for f in ("localReply", "destination") if f not in fallbacks]
        chosen = _fields(data["fallback"], here, fallbacks, others)
        if len(chosen) != 1:
            wanted = " or ".join(fallbacks)
            raise here.error(
                f"exactly one of {wanted}" if len(fallbacks) > 1 else f"{wanted} is required"
            )
        if "destination" in chosen:
            fallback = _destination(chosen["destination"], here.at("destination"))
            settings["fallback"] = {"cluster": _FALLBACK_CLUSTER}
        else:
            settings["fallback"] = {"local_reply": chosen["localReply"]}
    try:
        breaker_from_dict(settings)
    except ConfigError as exc:
        raise at.at(*_camel(exc.field).split(".")).error(_camel(exc.reason)) from exc
    if fallback is not None:
        del settings["fallback"]
    return BreakerSettings(json.dumps(settings, sort_keys=True), fallback)


def _rate_limit(spec: object, at: _At, meta: Meta) -> RateLimitPolicy:
    data = _fields(spec, at, ("host", "local", "global", "adaptiveConcurrency", "status"))
    host = _hostname(_required(data, "host", at), at.at("host"), wildcard=False)
    if not data.keys() & {"local", "global", "adaptiveConcurrency"}:
        raise at.error("at least one of local, global or adaptiveConcurrency is required")
    local = _local(data["local"], at.at("local")) if "local" in data else None
    limit = _global(data["global"], at.at("global")) if "global" in data else None
    adaptive = ""
    if "adaptiveConcurrency" in data:
        settings = _adaptive(data["adaptiveConcurrency"], at.at("adaptiveConcurrency"))
        adaptive = json.dumps(settings, sort_keys=True)
    status = _integer(data.get("status", 429), at.at("status"), 400, 599)
    return RateLimitPolicy(meta, host, local, limit, adaptive, status)


def _local(value: object, at: _At) -> LocalRateLimit:
    local = _fields(value, at, ("maxTokens", "tokensPerFill", "fillInterval"))
    max_tokens = _integer(_required(local, "maxTokens", at), at.at("maxTokens"), 1, _UINT32)
    per_fill = local.get("tokensPerFill", max_tokens)
    tokens_per_fill = _integer(per_fill, at.at("tokensPerFill"), 1, _UINT32)
    fill_interval = _duration(_required(local, "fillInterval", at), at.at("fillInterval"))
    if fill_interval < 0.05:
        raise at.at("fillInterval").error("must be at least 50ms (as Envoy requires)")
    return LocalRateLimit(max_tokens, tokens_per_fill, fill_interval)


def _global(value: object, at: _At) -> GlobalRateLimit:
    data = _fields(value, at, ("domain", "service", "descriptors", "timeout", "failureModeDeny"))
    domain = _string(_required(data, "domain", at), at.at("domain"), empty=False)
    service_at = at.at("service")
    service = _fields(_required(data, "service", at), service_at, ("host", "port"))
    host = _hostname(_required(service, "host", service_at), service_at.at("host"), wildcard=False)
    port = _port(_required(service, "port", service_at), service_at.at("port"))
    here = at.at("descriptors")
    descriptors = _list(_required(data, "descriptors", at), here, empty=False)
    rate_limits = [_descriptor(item, here.at(index)) for index, item in enumerate(descriptors)]
    timeout = _duration(data["timeout"], at.at("timeout")) if "timeout" in data else 0.02
    deny = _bool(data.get("failureModeDeny", False), at.at("failureModeDeny"))
    return GlobalRateLimit(domain, host, port, json.dumps(rate_limits), timeout, deny)


def _descriptor(value: object, at: _At) -> dict[str, Any]:
    """One entry of Envoy's ``rate_limits``: its actions make one descriptor, in order."""
    here = at.at("actions")
    actions = _list(_required(_fields(value, at, ("actions",)), "actions", at), here, empty=False)
    return {"actions": [_action(action, here.at(index)) for index, action in enumerate(actions)]}


def _action(value: object, at: _At) -> dict[str, Any]:
    """An Envoy RateLimit.Action of the kinds the proxy supports, in Envoy's field names."""
    data = _fields(value, at, _ACTIONS)
    kind = _one_of(data, _ACTIONS, at)
    here = at.at(kind)
    if kind == "genericKey":
        spec = _fields(data[kind], here, ("descriptorKey", "descriptorValue"))
        action = {"descriptor_value": _nonempty(spec, "descriptorValue", here)}
        if "descriptorKey" in spec:
            action["descriptor_key"] = _string(spec["descriptorKey"], here.at("descriptorKey"))
        return {"generic_key": action}
    if kind == "requestHeaders":
        spec = _fields(data[kind], here, ("headerName", "descriptorKey", "skipIfAbsent"))
        name = _header_name(_required(spec, "headerName", here), here.at("headerName"))
        skip = _bool(spec.get("skipIfAbsent", False), here.at("skipIfAbsent"))
        return {
            "request_headers": {
                "header_name": name,
                "descriptor_key": _nonempty(spec, "descriptorKey", here),
                "skip_if_absent": skip,
            }
        }
    _fields(data[kind], here, ())  # remoteAddress, destinationCluster: no settings
    return {_snake(kind): {}}


def _nonempty(data: dict[str, Any], key: str, at: _At) -> str:
    return _string(_required(data, key, at), at.at(key), empty=False)


def _adaptive(value: object, at: _At) -> dict[str, Any]:
    """Envoy's adaptive_concurrency filter config (its gradient controller), with Envoy's
    field names; only ``concurrencyUpdateInterval``, which Envoy requires, gets a default."""
    data = _fields(
        value,
        at,
        (
            "sampleAggregatePercentile",
            "concurrencyLimitParams",
            "minRttCalcParams",
            "concurrencyLimitExceededStatus",
        ),
    )
    gradient: dict[str, Any] = {}
    if "sampleAggregatePercentile" in data:
        percentile = _percent(data["sampleAggregatePercentile"], at.at("sampleAggregatePercentile"))
        gradient["sample_aggregate_percentile"] = percentile
    limits_at = at.at("concurrencyLimitParams")
    limits = _fields(
        data.get("concurrencyLimitParams", {}),
        limits_at,
        ("maxConcurrencyLimit", "concurrencyUpdateInterval"),
    )
    interval = limits.get("concurrencyUpdateInterval", "100ms")
    gradient["concurrency_limit_params"] = {
        "concurrency_update_interval": _envoy_duration(
            interval, limits_at.at("concurrencyUpdateInterval")
        )
    }
    if "maxConcurrencyLimit" in limits:
        gradient["concurrency_limit_params"]["max_concurrency_limit"] = _integer(
            limits["maxConcurrencyLimit"], limits_at.at("maxConcurrencyLimit"), 1, _UINT32
        )
    rtt_at = at.at("minRttCalcParams")
    rtt = _fields(data.get("minRttCalcParams", {}), rtt_at, _MIN_RTT_FIELDS)
    params: dict[str, Any] = {}
    for name, item in rtt.items():
        here = rtt_at.at(name)
        if name in ("interval", "fixedValue"):
            params[_snake(name)] = _envoy_duration(item, here)
        elif name in ("jitter", "buffer"):
            params[name] = _percent(item, here)
        else:
            params[_snake(name)] = _integer(item, here, 1, _UINT32)
    gradient["min_rtt_calc_params"] = params
    settings: dict[str, Any] = {"gradient_controller_config": gradient}
    if "concurrencyLimitExceededStatus" in data:
        code = _integer(
            data["concurrencyLimitExceededStatus"],
            at.at("concurrencyLimitExceededStatus"),
            400,
            599,
        )
        settings["concurrency_limit_exceeded_status"] = {"code": code}
    return settings


def _percent(value: object, at: _At) -> dict[str, float]:
    """Envoy's ``Percent``, written as a plain number 0-100."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise at.error(f"must be a number 0-100, not {value!r}")
    return {"value": float(value)}


def _envoy_duration(value: object, at: _At) -> str:
    """A Go-style duration in protobuf JSON form (whole milliseconds, see ``_duration``)."""
    return envoy_duration(_duration(value, at))


# --- RpcRoute ------------------------------------------------------------------------------------

_RPC_ROUTE_FIELDS = (
    "name", "match", "route", "timeout", "retries", "rateLimit", "circuitBreaker",
)  # fmt: skip
# Properties the proxy reads from the request itself rather than from its attributes.
_RPC_PROPERTIES = ("version", "group")


def _rpc_route(spec: object, at: _At, meta: Meta) -> RpcRoute:
    data = _fields(spec, at, ("hosts", "routes"))
    hosts_at = at.at("hosts")
    hosts: list[str] = []
    for index, item in enumerate(_list(_required(data, "hosts", at), hosts_at, empty=False)):
        # an RPC service's exact name (a Dubbo interface): no wildcards, no short names
        host = _hostname(item, hosts_at.at(index), wildcard=False)
        if host in hosts:
            raise hosts_at.at(index).error(f"duplicate host {host!r}")
        hosts.append(host)
    routes_at = at.at("routes")
    routes: list[RpcRouteRule] = []
    for index, item in enumerate(_list(_required(data, "routes", at), routes_at, empty=False)):
        here = routes_at.at(index)
        if routes and routes[-1].match is None:
            raise here.error(f"unreachable: routes[{index - 1}] has no match and takes every call")
        route = _rpc_route_rule(item, here)
        if route.name and any(other.name == route.name for other in routes):
            raise here.at("name").error(f"duplicate route name {route.name!r}")
        routes.append(route)
    return RpcRoute(meta, tuple(hosts), tuple(routes))


def _rpc_route_rule(value: object, at: _At) -> RpcRouteRule:
    data = _fields(value, at, _RPC_ROUTE_FIELDS)
    breaker = None
    if "circuitBreaker" in data:
        here = at.at("circuitBreaker")
        # an open circuit is answered in the RPC protocol: no HTTP localReply
        breaker = _breaker(
            _fields(data["circuitBreaker"], here, _BREAKER_FIELDS), here, ("destination",)
        )
    return RpcRouteRule(
        name=_string(data.get("name", ""), at.at("name")),
        route=_route_destinations(data, at, headers=False),
        match=_optional(data, "match", at, _rpc_match),
        timeout=_optional(data, "timeout", at, _duration),
        retries=_optional(data, "retries", at, _rpc_retries),
        rate_limit=_optional(data, "rateLimit", at, _local),
        circuit_breaker=breaker,
    )


def _rpc_match(value: object, at: _At) -> RpcMatch | None:
    """None when nothing is to match (``{}``): such a route takes every call."""
    data = _fields(value, at, ("method", "version", "group", "attributes"))
    attributes = _named_matches(data.get("attributes", {}), at.at("attributes"), "attribute", bool)
    for name, _ in attributes:
        if name in _RPC_PROPERTIES:
            raise at.at("attributes", name).error(f"use match.{name}")
    match = RpcMatch(
        method=_optional(data, "method", at, _string_match),
        version=_optional(data, "version", at, _string_match),
        group=_optional(data, "group", at, _string_match),
        attributes=attributes,
    )
    return None if match == RpcMatch() else match


def _rpc_retries(value: object, at: _At) -> HTTPRetry:
    """Istio's ``attempts`` and ``retryOn``, with only the conditions the proxy can retry an
    RPC on; the default, ``connect-failure``, never sends a call twice."""
    data = _fields(value, at, ("attempts", "retryOn"), ("perTryTimeout",))
    attempts = _integer(_required(data, "attempts", at), at.at("attempts"), 0, _INT32_MAX)
    retry_on = _string(data.get("retryOn", "connect-failure"), at.at("retryOn"), empty=False)
    for condition in retry_on.split(","):
        if condition not in RPC_RETRY_ON:
            allowed = ", ".join(sorted(RPC_RETRY_ON))
            raise at.at("retryOn").error(f"{condition!r} is not an RPC retry condition ({allowed})")
    if attempts == 0 and "retryOn" in data:
        raise at.at("attempts").error("retries are disabled (attempts is 0) but configured")
    return HTTPRetry(attempts=attempts, retry_on=retry_on)
