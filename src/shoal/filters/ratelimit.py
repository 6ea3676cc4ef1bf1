"""``envoy.filters.http.ratelimit``: ask a rate limit service (Envoy's
``envoy.service.ratelimit.v3`` over gRPC, e.g. ``shoal ratelimit``) before routing, so many
proxies share one budget.

Each configured rate limit makes one descriptor from its actions; a descriptor whose action
finds nothing (a missing header) is not sent, as in Envoy. The check runs as a task only for
requests through this filter; an unreachable service lets requests through unless
``failure_mode_deny``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from shoal.codec.http1 import header_value
from shoal.config.filters import GlobalRateLimit, RateLimitAction
from shoal.filters.base import FilteredRequest, LocalReply, Outcome, Resolve, Wait

log = logging.getLogger("shoal.ratelimit")


class GlobalRateLimitFilter:
    def __init__(self, name: str, config: GlobalRateLimit, resolve: Resolve) -> None:
        self.name = name
        self.config = config
        self.resolve = resolve
        self.stats = {"ok": 0, "over_limit": 0, "error": 0, "failure_mode_allowed": 0}
        self._channel: grpc.aio.Channel | None = None
        self._target: tuple[str, int] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def on_request(self, request: FilteredRequest, now: float) -> Outcome:
        descriptors = []
        for actions in self.config.descriptors:
            entries = _entries(actions, request)
            if entries:
                descriptors.append(ratelimit_pb2.RateLimitDescriptor(entries=entries))
        if not descriptors:
            return None
        query = rls_pb2.RateLimitRequest(
            domain=self.config.domain, descriptors=descriptors, hits_addend=1
        )
        return Wait(lambda resume: self._start(query, resume))

    def _start(
        self, query: rls_pb2.RateLimitRequest, resume: Callable[[LocalReply | None], None]
    ) -> None:
        task = asyncio.get_running_loop().create_task(self._check(query, resume))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _check(
        self, query: rls_pb2.RateLimitRequest, resume: Callable[[LocalReply | None], None]
    ) -> None:
        config = self.config
        try:
            stub = rls_pb2_grpc.RateLimitServiceStub(self._channel_for_service())
            answer = await stub.ShouldRateLimit(query, timeout=config.timeout)
        except (grpc.RpcError, OSError, LookupError) as exc:
            self.stats["error"] += 1
            log.debug("rate limit service %s: %s", config.cluster, exc)
            if config.failure_mode_deny:
                resume(LocalReply(config.status_on_error, b"", "RLSE", "rate_limiter_error"))
            else:
                self.stats["failure_mode_allowed"] += 1
                resume(None)
            return
        if answer.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT:
            self.stats["over_limit"] += 1
            headers = (
                [(b"x-envoy-ratelimited", b"true")] if config.x_envoy_ratelimited_header else []
            )
            resume(
                LocalReply(config.rate_limited_status, b"", "RL", "request_rate_limited", headers)
            )
        else:
            self.stats["ok"] += 1
            resume(None)

    def _channel_for_service(self) -> grpc.aio.Channel:
        target = self.resolve(self.config.cluster)
        if target is None:
            raise LookupError(f"no healthy host in cluster {self.config.cluster}")
        if target != self._target or self._channel is None:
            self._target = target
            self._channel = grpc.aio.insecure_channel(f"{target[0]}:{target[1]}")
        return self._channel

    def counters(self) -> dict[str, int]:
        return dict(self.stats)

    def gauges(self) -> dict[str, int]:
        return {}


def _entries(
    actions: tuple[RateLimitAction, ...], request: FilteredRequest
) -> list[ratelimit_pb2.RateLimitDescriptor.Entry] | None:
    """The descriptor's entries, or None when an action finds nothing (no descriptor)."""
    entries = []
    headers = request.request_headers
    for action in actions:
        kind = action.kind
        value: str | None
        if kind == "generic_key":
            value = action.value
        elif kind == "request_headers":
            value = header_value(headers, action.header.encode("latin-1"))
            if value is None and action.skip_if_absent:
                continue
        elif kind == "remote_address":
            value = request.remote_ip or None
        elif kind == "destination_cluster":
            value = request.route_cluster or None
        else:  # header_value_match
            matched = all(
                m.test(header_value(headers, m.name.encode("latin-1"))) for m in action.headers
            )
            value = action.value if matched == action.expect_match else None
        if value is None:
            return None
        entries.append(ratelimit_pb2.RateLimitDescriptor.Entry(key=action.key, value=value))
    return entries or None
