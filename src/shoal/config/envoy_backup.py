"""Shoal's backup requests, from Envoy metadata → :class:`shoal.config.model.BackupRequestPolicy`.

Internal to :mod:`shoal.config.envoy`. Configured on a Route as
``metadata.filter_metadata["shoal.backup_request"]`` (Envoy ignores metadata, so the same
bootstrap still runs on Envoy); every field is checked and an unknown one is an error, as
for ``shoal.circuit_breaker`` (whose value readers this module shares).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from shoal.config.envoy_breaker import duration_field, int_field, number_field, ratio_field
from shoal.config.envoy_fields import Ctx
from shoal.config.model import BackupRequestPolicy

KEY = "shoal.backup_request"

_FIELDS = ("percentile", "max_ratio", "min_delay", "max_delay", "window", "minimum_samples")
_PERCENTILE = (50.0, 99.9)
_WINDOW = (10, 100_000)  # the window is a ring of this many ints per route
_MINIMUM_SAMPLES = 100  # the default, or the window when that is smaller
# timers have millisecond resolution (libuv): a shorter delay could not be kept
_MIN_DELAY_FLOOR = 0.001


def route_backup_policy(route: Message, ctx: Ctx) -> BackupRequestPolicy | None:
    """A Route's policy, or None without the key; only a route to a cluster can have one."""
    if not route.HasField("metadata") or KEY not in route.metadata.filter_metadata:
        return None
    here = ctx.at("metadata", "filter_metadata", KEY)
    kind = route.WhichOneof("action")
    if kind != "route":
        raise here.error(f"backup requests need a route to a cluster, not {kind}")
    return backup_policy_from_dict(
        json_format.MessageToDict(route.metadata.filter_metadata[KEY]), here
    )


def backup_policy_from_dict(data: dict[str, Any], ctx: Ctx) -> BackupRequestPolicy:
    """Validate and translate the metadata's fields (JSON values: numbers may be floats)."""
    for name in sorted(data):  # a protobuf Struct keeps no order: report deterministically
        if name not in _FIELDS:
            raise ctx.at(name).error(
                f"unknown field in {KEY} (expected one of: {', '.join(_FIELDS)})"
            )
    d = BackupRequestPolicy()
    percentile = d.percentile
    if "percentile" in data:
        percentile = number_field(data, "percentile", ctx)
        low, high = _PERCENTILE
        if not low <= percentile <= high:
            raise ctx.at("percentile").error(f"{percentile:g} is out of range [{low:g}, {high:g}]")
    min_delay = duration_field(data, "min_delay", d.min_delay, ctx)
    max_delay = duration_field(data, "max_delay", d.max_delay, ctx)
    assert min_delay is not None and max_delay is not None
    if min_delay < _MIN_DELAY_FLOOR:
        raise ctx.at("min_delay").error("must be at least 1ms (timers have millisecond resolution)")
    if min_delay > max_delay:
        raise ctx.at("min_delay").error(
            f"min_delay {min_delay:g}s exceeds max_delay {max_delay:g}s"
        )
    window = int_field(data, "window", d.window, ctx, lo=_WINDOW[0], hi=_WINDOW[1])
    minimum = int_field(data, "minimum_samples", min(_MINIMUM_SAMPLES, window), ctx, hi=_WINDOW[1])
    if minimum > window:
        raise ctx.at("minimum_samples").error(
            f"minimum_samples {minimum} exceeds window {window}: the percentile would never be used"
        )
    return BackupRequestPolicy(
        percentile=percentile,
        max_ratio=ratio_field(data, "max_ratio", d.max_ratio, ctx),
        min_delay=min_delay,
        max_delay=max_delay,
        window=window,
        minimum_samples=minimum,
    )
