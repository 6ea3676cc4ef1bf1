"""EtcdRegistry against a real etcd: what is written under the prefix (and what leases take
away) reaches the registry's snapshot and fires ``changed``; an outage keeps the view."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aetcd
import pytest
from tests.integration.registry_servers import EtcdServer, Running, start_etcd

from shoal.pilot.model import Instance, RegistrySnapshot, Service, ServicePort
from shoal.pilot.registry.etcd import EtcdRegistry


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with start_etcd(tmp_path_factory.mktemp("etcd")) as endpoint:
        yield endpoint


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """Each test its own prefix on the shared server."""
    return f"/{request.node.name}"


def scenario(endpoint: str, test: Callable[[Any], Awaitable[None]], timeout: float = 20) -> None:
    """Run ``test`` with an etcd client in a fresh event loop (the project runs async tests
    with ``asyncio.run``)."""
    host, _, port = endpoint.rpartition(":")

    async def main() -> None:
        async with aetcd.Client(host, int(port)) as client:
            await asyncio.wait_for(test(client), timeout)

    asyncio.run(main())


async def put(client: Any, key: str, value: Any, lease: Any = None) -> None:
    text = value if isinstance(value, str) else json.dumps(value)
    await client.put(key.encode(), text.encode(), lease=lease)


def service(snapshot: RegistrySnapshot, host: str) -> Service | None:
    return next((s for s in snapshot.services if s.host == host), None)


def test_loads_then_follows_registration_change_and_removal(etcd: str, prefix: str) -> None:
    registry = EtcdRegistry(etcd, prefix)
    assert registry.name == f"etcd://{etcd}{prefix}"
    ports = [
        {"number": 9080, "name": "http", "protocol": "HTTP"},
        {"number": 9090, "protocol": "GRPC"},
    ]

    async def test(client: Any) -> None:
        # Written before the registry starts: found by the first (range) read.
        await put(client, f"{prefix}/services/reviews", {"ports": ports})
        await put(client, f"{prefix}/instances/reviews/a", {"address": "10.0.0.1", "port": 9080})
        async with Running(registry) as running:
            view = await running.until(lambda s: len(s.instances) == 1)
            assert running.changes == 1
            assert view.services == (
                Service(
                    "reviews",
                    (ServicePort(9080, "http", "HTTP"), ServicePort(9090, "grpc", "GRPC")),
                    source=registry.name,
                ),
            )
            assert view.instances == (
                Instance("reviews", 9080, "10.0.0.1", 9080, source=registry.name),
            )
            assert registry.snapshot() is view  # cached until something changes

            # Registration, through the watch.
            await put(
                client,
                f"{prefix}/instances/reviews/b",
                {
                    "address": "10.0.0.2",
                    "port": 19090,
                    "service_port": 9090,
                    "labels": {"version": "v2"},
                    "weight": 3,
                    "locality": "eu/west-1a",
                },
            )
            view = await running.until(lambda s: len(s.instances) == 2)
            assert running.changes == 2
            b = view.instances[1]
            assert (b.service_port, b.address, b.port, b.label_map(), b.weight, b.locality) == (
                9090, "10.0.0.2", 19090, {"version": "v2"}, 3, "eu/west-1a",
            )  # fmt: skip

            # Change: labels, weight and port of one instance.
            await put(
                client,
                f"{prefix}/instances/reviews/a",
                {"address": "10.0.0.1", "port": 9081, "labels": {"version": "v1"}, "weight": 5},
            )
            view = await running.until(lambda s: s.instances[0].port == 9081)
            assert view.instances[0].label_map() == {"version": "v1"}
            assert view.instances[0].weight == 5
            assert running.changes == 3

            # Removal: the instance key, then the service key.
            await client.delete(f"{prefix}/instances/reviews/b".encode())
            view = await running.until(lambda s: len(s.instances) == 1)
            assert running.changes == 4
            await client.delete_prefix(prefix.encode())
            await running.until(lambda s: s == RegistrySnapshot())
            assert running.changes >= 5

    scenario(etcd, test)


def test_instance_without_service_key_infers_an_http_service(etcd: str, prefix: str) -> None:
    registry = EtcdRegistry(etcd, prefix)

    async def test(client: Any) -> None:
        async with Running(registry) as running:
            await put(
                client, f"{prefix}/instances/ratings/a", {"address": "10.0.0.1", "port": 8080}
            )
            await put(
                client,
                f"{prefix}/instances/ratings/b",
                {"address": "10.0.0.2", "port": 18080, "service_port": 80},
            )
            view = await running.until(lambda s: len(s.instances) == 2)
            assert service(view, "ratings") == Service(
                "ratings", (ServicePort(80), ServicePort(8080)), source=registry.name
            )
            assert [i.service_port for i in view.instances] == [8080, 80]

            # Once the service is written, its first port is the default service port.
            await put(client, f"{prefix}/services/ratings", {"ports": [{"number": 9080}]})
            view = await running.until(lambda s: s.instances[0].service_port == 9080)
            assert service(view, "ratings") == Service(
                "ratings", (ServicePort(9080),), source=registry.name
            )
            assert view.instances[1].service_port == 80

    scenario(etcd, test)


def test_invalid_values_are_skipped_with_a_warning(
    etcd: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    registry = EtcdRegistry(etcd, prefix)
    bad = {
        "services/broken": "{not json",
        "services/noports": {"ports": []},
        "services/badproto": {"ports": [{"number": 80, "protocol": "SMTP"}]},
        "instances/x/list": [1, 2],
        "instances/x/noaddress": {"port": 80},
        "instances/x/badport": {"address": "10.0.0.1", "port": 70000},
        "instances/x/badlabels": {"address": "10.0.0.1", "port": 80, "labels": {"v": 1}},
        "instances/x/badweight": {"address": "10.0.0.1", "port": 80, "weight": True},
    }

    async def test(client: Any) -> None:
        await put(client, f"{prefix}/instances/x/good", {"address": "10.0.0.9", "port": 80})
        for key, value in bad.items():
            await put(client, f"{prefix}/{key}", value)
        await put(client, f"{prefix}/unrelated/key", "anything")  # outside the layout: ignored
        async with Running(registry) as running:
            view = await running.until(lambda s: len(s.instances) == 1)
            assert [s.host for s in view.services] == ["x"]
            # A valid instance turned invalid is dropped; fixed again, it is back.
            await put(client, f"{prefix}/instances/x/good", "{oops")
            await running.until(lambda s: s == RegistrySnapshot())
            await put(client, f"{prefix}/instances/x/good", {"address": "10.0.0.9", "port": 81})
            await running.until(lambda s: len(s.instances) == 1)

    with caplog.at_level(logging.WARNING, logger="shoal.pilot.registry.etcd"):
        scenario(etcd, test)
    warned = caplog.text
    for key in [*bad, "instances/x/good"]:
        assert f"ignoring key {prefix}/{key}:" in warned
    assert "unrelated" not in warned


def test_instances_go_with_their_lease(etcd: str, prefix: str) -> None:
    registry = EtcdRegistry(etcd, prefix)

    async def test(client: Any) -> None:
        async with Running(registry) as running:
            expiring = await client.lease(1)  # etcd grants its minimum, about 2 s
            await put(
                client, f"{prefix}/instances/r/b", {"address": "10.0.0.2", "port": 80}, expiring
            )
            revoked = await client.lease(30)
            for i in range(20):
                value = {"address": f"10.0.1.{i}", "port": 80}
                await put(client, f"{prefix}/instances/r/a{i}", value, revoked)
            await running.until(lambda s: len(s.instances) == 21)
            changes = running.changes

            # The owner leaves cleanly: its 20 keys go in one revision, one change.
            await revoked.revoke()
            view = await running.until(lambda s: len(s.instances) == 1)
            assert view.instances[0].address == "10.0.0.2"
            assert running.changes == changes + 1

            # The owner dies: nobody refreshes the lease, etcd expires it.
            await running.until(lambda s: s == RegistrySnapshot(), timeout=10)
            assert running.changes == changes + 2

    scenario(etcd, test)


@pytest.mark.slow
def test_server_restart_keeps_the_view_and_resyncs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = EtcdServer(tmp_path / "etcd")
    registry = EtcdRegistry(server.endpoint, "/shoal")

    async def test(client: Any) -> None:
        async with Running(registry) as running:
            await put(client, "/shoal/instances/r/a", {"address": "10.0.0.1", "port": 80})
            before = await running.until(lambda s: len(s.instances) == 1)

            server.stop()
            await asyncio.sleep(1.5)  # the watch breaks, reconnections fail
            assert registry.snapshot() == before

            await asyncio.get_running_loop().run_in_executor(None, server.start)
            async with aetcd.Client("127.0.0.1", server.port) as again:
                await put(again, "/shoal/instances/r/b", {"address": "10.0.0.2", "port": 80})
                await again.delete(b"/shoal/instances/r/a")
            view = await running.until(lambda s: [i.address for i in s.instances] == ["10.0.0.2"])
            assert view.services == before.services

    try:
        with caplog.at_level(logging.INFO, logger="shoal.pilot.registry.etcd"):
            scenario(server.endpoint, test, timeout=30)
    finally:
        server.stop()
    assert "keeping the last view, reconnecting in 0.5 s" in caplog.text
    assert caplog.text.count("loaded") >= 2  # the first read, and a full one after reconnecting
