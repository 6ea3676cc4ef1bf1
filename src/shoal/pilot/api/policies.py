"""Shoal's own kinds (``shoal.io/v1``), for what Istio has no resource for.

``CircuitBreakerPolicy``: the error-rate / slow-call breaker with half-open state and
fallback (Hystrix / Sentinel semantics) for a host or one of its subsets. Its fields are
those of Shoal's ``shoal.circuit_breaker`` cluster metadata (docs/config.md), written in
camelCase like Istio's; they are checked by the very code that reads them in the proxy.

``RateLimitPolicy``: a local token bucket on every instance of a host (Envoy's
local_ratelimit filter on the instance's sidecar, inbound).
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from shoal.config.envoy import breaker_from_dict
from shoal.errors import ConfigError
from shoal.pilot.api.model import CircuitBreakerPolicy, Destination, Meta, RateLimitPolicy
from shoal.pilot.api.parse import (
    _At,
    _destination,
    _dns_label,
    _duration,
    _fields,
    _hostname,
    _integer,
    _required,
)

KINDS: Final = ("CircuitBreakerPolicy", "RateLimitPolicy")

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
) -> CircuitBreakerPolicy | RateLimitPolicy:
    if kind == "CircuitBreakerPolicy":
        return _circuit_breaker(spec, at, meta)
    return _rate_limit(spec, at, meta)


def _circuit_breaker(spec: object, at: _At, meta: Meta) -> CircuitBreakerPolicy:
    data = _fields(spec, at, ("host", "subset", *_BREAKER_FIELDS))
    host = _hostname(_required(data, "host", at), at.at("host"), wildcard=False)
    subset = _dns_label(data["subset"], at.at("subset"), "subset name") if "subset" in data else ""
    settings: dict[str, Any] = {_snake(k): v for k, v in data.items() if k in _BREAKER_FIELDS}
    fallback: Destination | None = None
    if "fallback" in data:
        here = at.at("fallback")
        chosen = _fields(data["fallback"], here, ("localReply", "destination"))
        if len(chosen) != 1:
            raise here.error("exactly one of localReply or destination")
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
    return CircuitBreakerPolicy(meta, host, json.dumps(settings, sort_keys=True), subset, fallback)


def _rate_limit(spec: object, at: _At, meta: Meta) -> RateLimitPolicy:
    data = _fields(spec, at, ("host", "local", "status"))
    host = _hostname(_required(data, "host", at), at.at("host"), wildcard=False)
    local_at = at.at("local")
    local = _fields(
        _required(data, "local", at), local_at, ("maxTokens", "tokensPerFill", "fillInterval")
    )
    max_tokens = _integer(
        _required(local, "maxTokens", local_at), local_at.at("maxTokens"), 1, 2**32 - 1
    )
    per_fill = local.get("tokensPerFill", max_tokens)
    tokens_per_fill = _integer(per_fill, local_at.at("tokensPerFill"), 1, 2**32 - 1)
    fill_interval = _duration(
        _required(local, "fillInterval", local_at), local_at.at("fillInterval")
    )
    if fill_interval < 0.05:
        raise local_at.at("fillInterval").error("must be at least 50ms (as Envoy requires)")
    status = _integer(data.get("status", 429), at.at("status"), 400, 599)
    return RateLimitPolicy(meta, host, max_tokens, tokens_per_fill, fill_interval, status)
