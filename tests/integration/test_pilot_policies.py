"""Shoal's policy kinds through pilot: a CircuitBreakerPolicy opens on a failing service and
serves its fallback; a RateLimitPolicy limits every instance of a service at its sidecar."""

from __future__ import annotations

import http.client
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

pytestmark = pytest.mark.slow


@pytest.fixture
def pilot(tmp_path: Path) -> Iterator[PilotProcess]:
    process = PilotProcess(tmp_path)
    yield process
    process.stop()


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
