"""Shoal's policy kinds through pilot: a CircuitBreakerPolicy opens on a failing service and
serves its fallback; a RateLimitPolicy limits every instance of a service at its sidecar,
locally or against a budget shared through `shoal ratelimit`."""

from __future__ import annotations

import http.client
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import Echo
from tests.integration.mesh_helpers import (
    PilotProcess,
    eventually,
    outbound_port,
    served_by,
    sidecar_config,
)
from tests.integration.ratelimit_helpers import (
    RateLimitService,
    RedisServer,
    sleep_to_window_start,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def echo() -> Iterator[Echo]:
    server = Echo("app")
    yield server
    server.stop()


def answers(port: int, host: str, path: str, count: int) -> Counter[str]:
    """Status and who answered (the upstream's name, else the body), counted."""
    seen: Counter[str] = Counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for _ in range(count):
            conn.request("GET", path, headers={"Host": host})
            response = conn.getresponse()
            body = response.read()
            seen[f"{response.status} {response.getheader('x-served-by') or body.decode()}"] += 1
    finally:
        conn.close()
    return seen


def shoal_policy(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "shoal.io/v1", "kind": kind, "metadata": {"name": "p"}, "spec": spec}


def test_circuit_breaker_policy_opens_and_serves_the_fallback(
    pilot: PilotProcess, echo: Echo, make_proxy: Any
) -> None:
    pilot.register("orders", echo.port, service_port=80)
    config = sidecar_config(pilot, "shop")
    make_proxy(config)
    port = outbound_port(config)
    eventually(lambda: served_by(port, "orders", 2) == {"app": 2})
    breaker = {
        "host": "orders",
        "minimumRequests": 5,
        "errorRatio": 0.5,
        "openDuration": "30s",
        "fallback": {"localReply": {"status": 200, "body": "from the fallback"}},
    }
    pilot.write_rules("breaker.yaml", shoal_policy("CircuitBreakerPolicy", breaker))

    def opened() -> bool:
        answers(port, "orders", "/status/500", 5)
        return answers(port, "orders", "/", 1) == {"200 from the fallback": 1}

    eventually(opened)
    assert answers(port, "orders", "/", 10) == {"200 from the fallback": 10}


def test_rate_limit_policy_limits_each_instance_at_its_sidecar(
    pilot: PilotProcess, echo: Echo, make_proxy: Any
) -> None:
    pilot.write_rules(
        "limit.yaml",
        shoal_policy(
            "RateLimitPolicy",
            {"host": "orders", "local": {"maxTokens": 5, "fillInterval": "60s"}},
        ),
    )
    server = sidecar_config(
        pilot, "orders-1", service="orders:80", app_address=f"127.0.0.1:{echo.port}"
    )
    server_proxy = make_proxy(server)
    client = sidecar_config(pilot, "shop")
    make_proxy(client)
    port = outbound_port(client)
    eventually(lambda: "429" in served_by(port, "orders", 6))  # 5 tokens, then limited
    assert served_by(port, "orders", 10) == {"429": 10}  # refilled only after 60 s
    stats = server_proxy.stats()
    assert stats["inbound_rate_limit.http_local_rate_limit.rate_limited"] >= 10


def rate_limit_calls(proxy: Any) -> int:
    """The calls a sidecar's global rate limit filter has made (whatever their answer)."""
    return sum(
        value
        for key, value in proxy.stats().items()
        if key.endswith((".ratelimit.ok", ".ratelimit.over_limit"))
    )


def test_global_rate_limit_policy_shares_one_budget_across_instances(
    pilot: PilotProcess, make_proxy: Any, tmp_path: Path
) -> None:
    limits = tmp_path / "shop.yaml"
    limits.write_text(
        "domain: shop\n"
        "descriptors:\n"
        "  - {key: generic_key, value: orders, rate_limit: {unit: second, requests_per_unit: 10}}\n"
    )
    redis = RedisServer(tmp_path / "redis")
    service = RateLimitService([limits], redis.url, tmp_path / "rls")
    echoes = [Echo("a"), Echo("b")]
    try:
        pilot.register("ratelimit", service.grpc_port, service_port=8081, protocol="GRPC")
        descriptor = {"actions": [{"genericKey": {"descriptorValue": "orders"}}]}
        limit = {
            "domain": "shop",
            "service": {"host": "ratelimit", "port": 8081},
            "descriptors": [descriptor],
            "timeout": "500ms",
        }
        pilot.write_rules(
            "limit.yaml", shoal_policy("RateLimitPolicy", {"host": "orders", "global": limit})
        )
        servers = [
            make_proxy(
                sidecar_config(
                    pilot,
                    f"orders-{e.name}",
                    service="orders:80",
                    app_address=f"127.0.0.1:{e.port}",
                )
            )
            for e in echoes
        ]
        client = sidecar_config(pilot, "shop")
        make_proxy(client)
        port = outbound_port(client)
        # both instances known to the client, and both asking the service
        eventually(lambda: {"a", "b"} <= set(served_by(port, "orders", 4)))

        def both_asking() -> bool:
            served_by(port, "orders", 2)
            return all(rate_limit_calls(server) > 0 for server in servers)

        eventually(both_asking)
        sleep_to_window_start()
        start = time.monotonic()
        seen = served_by(port, "orders", 40)
        assert time.monotonic() - start < 0.9, "the 40 requests must fit in one window"
        print("seen in one window:", dict(seen))
        admitted = seen["a"] + seen["b"]
        assert 8 <= admitted <= 12, seen  # 10 a second for the two together, not each
        assert seen["429"] == 40 - admitted, seen
        assert seen["a"] > 0 and seen["b"] > 0, seen
    finally:
        for echo_server in echoes:
            echo_server.stop()
        service.stop()
        redis.stop()
