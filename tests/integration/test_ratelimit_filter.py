"""The rate limit filter against a gRPC rate limit service (a scripted one here; the real
`shoal ratelimit` with Redis is in test_global_ratelimit.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from tests.conftest import Echo, free_port, raw_request
from tests.integration.ratelimit_helpers import rate_limited_proxy_config


class ScriptedService(rls_pb2_grpc.RateLimitServiceServicer):
    """Over limit for any descriptor entry whose value is "deny"; records every request."""

    def __init__(self) -> None:
        self.requests: list[rls_pb2.RateLimitRequest] = []

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: Any
    ) -> rls_pb2.RateLimitResponse:
        self.requests.append(request)
        over = any(e.value == "deny" for d in request.descriptors for e in d.entries)
        code = rls_pb2.RateLimitResponse.OVER_LIMIT if over else rls_pb2.RateLimitResponse.OK
        return rls_pb2.RateLimitResponse(overall_code=code)


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[ScriptedService, int]]:
    servicer = ScriptedService()
    port = free_port()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stopping: list[Any] = []

    async def serve() -> None:
        server = grpc.aio.server()
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(servicer, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        stop = asyncio.Event()
        stopping.append(stop)
        ready.set()
        await stop.wait()
        await server.stop(0)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    ready.wait(10)
    yield servicer, port
    loop.call_soon_threadsafe(stopping[0].set)
    thread.join(10)


def _proxy(make_proxy: Any, echo: Echo, rls_port: int, **extra: Any) -> Any:
    rate_limits = [
        {"actions": [{"request_headers": {"header_name": "x-user", "descriptor_key": "user"}}]},
        {"actions": [{"generic_key": {"descriptor_value": "all"}}, {"remote_address": {}}]},
    ]
    config, port = rate_limited_proxy_config(
        echo.port, rls_port, rate_limits, timeout="1s", **extra
    )
    proxy = make_proxy(config)
    proxy.port = port
    return proxy


def _get(port: int, headers: bytes = b"") -> tuple[int, bytes]:
    response = raw_request(
        port, b"GET / HTTP/1.1\r\nHost: s\r\n%sConnection: close\r\n\r\n" % headers
    )
    head = response.partition(b"\r\n\r\n")[0]
    return int(head.split(b" ", 2)[1]), head.lower()


def test_descriptors_are_sent_and_over_limit_answers_429(
    make_proxy: Any, echo_a: Echo, service: tuple[ScriptedService, int]
) -> None:
    servicer, rls_port = service
    proxy = _proxy(make_proxy, echo_a, rls_port)
    servicer.requests.clear()
    assert _get(proxy.port, b"x-user: alice\r\n")[0] == 200
    request = servicer.requests[-1]
    assert request.domain == "shop" and request.hits_addend == 1
    entries = [[(e.key, e.value) for e in d.entries] for d in request.descriptors]
    assert entries == [
        [("user", "alice")],
        [("generic_key", "all"), ("remote_address", "127.0.0.1")],
    ]
    # no x-user header: that descriptor is left out, the other still goes
    assert _get(proxy.port)[0] == 200
    assert len(servicer.requests[-1].descriptors) == 1
    status, head = _get(proxy.port, b"x-user: deny\r\n")
    assert status == 429 and b"x-envoy-ratelimited: true" in head
    stats = proxy.stats()
    assert stats["cluster.rls.ratelimit.over_limit"] == 1
    assert stats["cluster.rls.ratelimit.ok"] == 2


@pytest.mark.parametrize(("deny", "status"), [(False, 200), (True, 500)])
def test_unreachable_service_fails_open_unless_configured(
    make_proxy: Any, echo_a: Echo, deny: bool, status: int
) -> None:
    proxy = _proxy(make_proxy, echo_a, free_port(), failure_mode_deny=deny)
    assert _get(proxy.port, b"x-user: bob\r\n")[0] == status
    stats = proxy.stats()
    assert stats["cluster.rls.ratelimit.error"] == 1
    assert stats["cluster.rls.ratelimit.failure_mode_allowed"] == (0 if deny else 1)
