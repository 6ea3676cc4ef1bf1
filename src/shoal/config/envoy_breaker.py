"""Shoal's error-rate circuit breaker, from Envoy metadata →
:class:`shoal.config.model.CircuitBreakerPolicy`.

Internal to :mod:`shoal.config.envoy`. The breaker is configured on a Cluster or a Route
as ``metadata.filter_metadata["shoal.circuit_breaker"]``: Envoy accepts and ignores
metadata, so the same bootstrap still runs on Envoy. Other ``filter_metadata`` keys are
ignored here too; inside ``shoal.circuit_breaker`` every field is checked and an unknown
one is an error, as for Envoy's own fields.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from shoal.config.envoy_fields import Ctx, cluster_ref
from shoal.config.model import BreakerLocalReply, CircuitBreakerPolicy, Cluster, Seconds

KEY = "shoal.circuit_breaker"

_FIELDS = (
    "window",
    "window_size",
    "window_duration",
    "window_buckets",
    "minimum_requests",
    "error_ratio",
    "slow_call_duration",
    "slow_call_ratio",
    "open_duration",
    "half_open_trials",
    "fallback",
)
_COUNT_ONLY = ("window_size",)
_TIME_ONLY = ("window_duration", "window_buckets")
_MAX_WINDOW_SIZE = 1_000_000
_MAX_BUCKETS = 1000
_UINT32_MAX = 2**32 - 1
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(s|ms)")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE = re.compile(r"[\x00\r\n]")
# the proxy frames the local reply itself
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})


def breaker_policy(owner: Message, ctx: Ctx) -> CircuitBreakerPolicy | None:
    """The policy in ``owner.metadata`` (a Cluster or a Route), or None when it has none."""
    if not owner.HasField("metadata") or KEY not in owner.metadata.filter_metadata:
        return None
    data = json_format.MessageToDict(owner.metadata.filter_metadata[KEY])
    here = ctx.at("metadata", "filter_metadata", KEY)
    return policy_from_dict(data, here)


def route_breaker_policy(route: Message, ctx: Ctx) -> CircuitBreakerPolicy | None:
    """A Route's policy; only a route that goes to a cluster (``route``) can have one."""
    policy = breaker_policy(route, ctx)
    kind = route.WhichOneof("action")
    if policy is not None and kind != "route":
        raise ctx.at("metadata", "filter_metadata", KEY).error(
            f"a circuit breaker needs a route to a cluster, not {kind}"
        )
    return policy


def policy_from_dict(data: dict[str, Any], ctx: Ctx) -> CircuitBreakerPolicy:
    """Validate and translate the metadata's fields (JSON values: numbers may be floats)."""
    for name in sorted(data):  # a protobuf Struct keeps no order: report deterministically
        if name not in _FIELDS:
            raise ctx.at(name).error(
                f"unknown field in {KEY} (expected one of: {', '.join(_FIELDS)})"
            )
    d = CircuitBreakerPolicy()
    window = data.get("window", d.window)
    if window not in ("count", "time"):
        raise ctx.at("window").error(f'{window!r} is not "count" or "time"')
    wrong = _TIME_ONLY if window == "count" else _COUNT_ONLY
    for name in wrong:
        if name in data:
            raise ctx.at(name).error(f'{name} does not apply to window "{window}"')
    window_size = int_field(data, "window_size", d.window_size, ctx, hi=_MAX_WINDOW_SIZE)
    minimum = int_field(data, "minimum_requests", d.minimum_requests, ctx)
    if window == "count" and minimum > window_size:
        raise ctx.at("minimum_requests").error(
            f"minimum_requests {minimum} exceeds window_size {window_size}: the breaker"
            " could never open"
        )
    slow_duration = duration_field(data, "slow_call_duration", None, ctx)
    slow_ratio = ratio_field(data, "slow_call_ratio", d.slow_call_ratio, ctx)
    if slow_ratio < 1.0 and slow_duration is None:
        raise ctx.at("slow_call_ratio").error("slow_call_ratio needs slow_call_duration")
    if slow_duration is not None and slow_ratio >= 1.0:
        raise ctx.at("slow_call_duration").error(
            "slow_call_duration needs a slow_call_ratio below 1 (1, the default, is off)"
        )
    local_reply, fallback_cluster = _fallback(data, ctx)
    window_duration = duration_field(data, "window_duration", d.window_duration, ctx)
    assert window_duration is not None
    open_duration = duration_field(data, "open_duration", d.open_duration, ctx)
    assert open_duration is not None
    return CircuitBreakerPolicy(
        window="time" if window == "time" else "count",
        window_size=window_size,
        window_duration=window_duration,
        window_buckets=int_field(data, "window_buckets", d.window_buckets, ctx, hi=_MAX_BUCKETS),
        minimum_requests=minimum,
        error_ratio=ratio_field(data, "error_ratio", d.error_ratio, ctx),
        slow_call_duration=slow_duration,
        slow_call_ratio=slow_ratio,
        open_duration=open_duration,
        half_open_trials=int_field(data, "half_open_trials", d.half_open_trials, ctx),
        local_reply=local_reply,
        fallback_cluster=fallback_cluster,
    )


def check_cluster_fallbacks(clusters: Sequence[Cluster], ctx: Ctx) -> None:
    """Cluster-level fallbacks name existing clusters, never the cluster itself, and do
    not loop (a → b → a); ``ctx`` is the ``clusters`` list's."""
    by_name = {c.name: c for c in clusters}
    for index, cluster in enumerate(clusters):
        policy = cluster.breaker
        if policy is None or not policy.fallback_cluster:
            continue
        here = ctx.at(index, "metadata", "filter_metadata", KEY, "fallback", "cluster")
        name = policy.fallback_cluster
        if name not in by_name:
            raise here.error(f"unknown cluster {name!r}")
        if name == cluster.name:
            raise here.error("a cluster cannot be its own fallback")
        chain = [cluster.name]
        while True:
            chain.append(name)
            nxt = by_name[name].breaker
            if nxt is None or not nxt.fallback_cluster:
                break
            name = nxt.fallback_cluster
            if name in chain:
                raise here.error(f"fallback clusters loop: {' → '.join([*chain, name])}")


def _fallback(data: dict[str, Any], ctx: Ctx) -> tuple[BreakerLocalReply, str]:
    if "fallback" not in data:
        return BreakerLocalReply(), ""
    ctx = ctx.at("fallback")
    fallback = mapping_field(data["fallback"], ctx)
    for name in sorted(fallback):
        if name not in ("local_reply", "cluster"):
            raise ctx.at(name).error("unknown field in fallback (expected local_reply or cluster)")
    if len(fallback) != 1:
        raise ctx.error("exactly one of local_reply or cluster is required")
    if "cluster" in fallback:
        name = fallback["cluster"]
        if not isinstance(name, str):
            raise ctx.at("cluster").error("must be a cluster name (a string)")
        return BreakerLocalReply(), cluster_ref(name, ctx.at("cluster"))
    return _local_reply(fallback["local_reply"], ctx.at("local_reply")), ""


def _local_reply(value: object, ctx: Ctx) -> BreakerLocalReply:
    """A configured reply: status (default 503), body (default empty), headers (sorted by
    name: a protobuf Struct keeps no order, and a stable order keeps configs comparable)."""
    reply = mapping_field(value, ctx)
    for name in sorted(reply):
        if name not in ("status", "body", "headers"):
            raise ctx.at(name).error(
                "unknown field in local_reply (expected status, body or headers)"
            )
    status = int_field(reply, "status", 503, ctx, lo=200, hi=599)
    body = reply.get("body", "")
    if not isinstance(body, str):
        raise ctx.at("body").error("must be a string")
    headers: list[tuple[str, str]] = []
    headers_ctx = ctx.at("headers")
    for key, header_value in sorted(mapping_field(reply.get("headers", {}), headers_ctx).items()):
        name = key.lower()
        here = headers_ctx.at(key)
        if not _TOKEN.fullmatch(name):
            raise here.error(f"{key!r} is not a valid header name")
        if name in _FRAMING_HEADERS:
            raise here.error(f"{name} is set by the proxy")
        if not isinstance(header_value, str):
            raise here.error("a header value must be a string")
        if _BAD_VALUE.search(header_value):
            raise here.error("a header value must not contain CR, LF or NUL")
        headers.append((name, header_value))
    return BreakerLocalReply(status, body.encode(), tuple(sorted(headers)))


def mapping_field(value: object, ctx: Ctx) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ctx.error("must be a mapping")
    return value


def number_field(data: dict[str, Any], name: str, ctx: Ctx) -> float:
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ctx.at(name).error("must be a number")
    return float(value)


def int_field(
    data: dict[str, Any], name: str, default: int, ctx: Ctx, *, lo: int = 1, hi: int = _UINT32_MAX
) -> int:
    if name not in data:
        return default
    value = number_field(data, name, ctx)
    if not value.is_integer():
        raise ctx.at(name).error(f"{value:g} is not a whole number")
    if not lo <= value <= hi:
        raise ctx.at(name).error(f"{value:g} is out of range [{lo}, {hi}]")
    return int(value)


def ratio_field(data: dict[str, Any], name: str, default: float, ctx: Ctx) -> float:
    """A share in (0, 1]."""
    if name not in data:
        return default
    value = number_field(data, name, ctx)
    if not 0 < value <= 1:
        raise ctx.at(name).error(f"{value:g} is out of range (0, 1]")
    return value


def duration_field(
    data: dict[str, Any], name: str, default: Seconds | None, ctx: Ctx
) -> Seconds | None:
    """A duration string, ``"5s"``, ``"0.25s"`` or ``"250ms"``; it must be above 0."""
    if name not in data:
        return default
    value = data[name]
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ctx.at(name).error(f'{value!r} is not a duration such as "5s" or "250ms"')
    seconds = float(match[1]) / (1000 if match[2] == "ms" else 1)
    if seconds <= 0:
        raise ctx.at(name).error("duration must be greater than 0")
    return seconds
