"""The embedded registry on real SQLite files: registration, renewal, expiry, removal and
what survives a restart. TTLs are measured with a clock the tests move, so nothing waits
except the one test of the expiry loop itself."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.pilot.model import Instance, Service, ServicePort
from shoal.pilot.registry.embedded import EmbeddedRegistry, RegistrationError


class Clock:
    def __init__(self) -> None:
        self.time = 1_000_000.0

    def __call__(self) -> float:
        return self.time


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "registry.db")


@pytest.fixture
def registry(path: str, clock: Clock) -> Iterator[EmbeddedRegistry]:
    registry = EmbeddedRegistry(path, default_ttl=30, now=clock)
    yield registry
    registry.close()


def hosts(registry: EmbeddedRegistry) -> list[str]:
    return [service.host for service in registry.services()]


def endpoints(registry: EmbeddedRegistry) -> list[str]:
    return [f"{i.host} {i.address}:{i.port}" for i in registry.snapshot().instances]


def test_register_creates_the_service_and_the_instance(registry: EmbeddedRegistry) -> None:
    assert registry.register("reviews", "10.0.0.1", 9080, labels={"version": "v1"}) == (
        "10.0.0.1:9080"
    )
    snapshot = registry.snapshot()
    assert snapshot.services == (
        Service("reviews", (ServicePort(9080),), "STATIC", source="embedded"),
    )
    assert snapshot.instances == (
        Instance("reviews", 9080, "10.0.0.1", 9080, (("version", "v1"),), source="embedded"),
    )


def test_register_again_updates_and_ids_name_instances(registry: EmbeddedRegistry) -> None:
    registry.register("reviews", "10.0.0.1", 9080, labels={"version": "v1"})
    registry.register("reviews", "10.0.0.1", 9080, labels={"version": "v2"}, weight=5)
    assert [(i.labels, i.weight) for i in registry.snapshot().instances] == [
        ((("version", "v2"),), 5)
    ]
    # the id, not the address, is the instance: the same id may move
    registry.register("reviews", "10.0.0.2", 9080, instance_id="web-1")
    registry.register("reviews", "10.0.0.3", 9080, instance_id="web-1")
    assert endpoints(registry) == ["reviews 10.0.0.1:9080", "reviews 10.0.0.3:9080"]
    assert [r.id for r in registry.registrations()] == ["10.0.0.1:9080", "web-1"]


def test_one_endpoint_cannot_be_two_instances(registry: EmbeddedRegistry) -> None:
    registry.register("reviews", "10.0.0.1", 9080)
    with pytest.raises(RegistrationError, match=r"already instance 10\.0\.0\.1:9080") as caught:
        registry.register("reviews", "10.0.0.1", 9080, instance_id="other")
    assert caught.value.field == "address"


def test_ports_merge_and_service_port_defaults(registry: EmbeddedRegistry) -> None:
    registry.register("api", "10.0.0.1", 8080, service_port=80)
    registry.register("api", "10.0.0.1", 9090, ports=[ServicePort(90, "grpc", "GRPC")])
    registry.register("api", "10.0.0.2", 8080, ports=[ServicePort(80, "web", "HTTP2")])
    (service,) = registry.services()
    assert service.ports == (ServicePort(80, "web", "HTTP2"), ServicePort(90, "grpc", "GRPC"))
    assert [(i.service_port, i.port) for i in registry.snapshot().instances] == [
        (80, 8080),
        (90, 9090),
        (80, 8080),
    ]
    with pytest.raises(RegistrationError, match="not one of the service's ports"):
        registry.register("api", "10.0.0.3", 8080, service_port=81, ports=[ServicePort(80)])


def test_ttl_expiry_and_heartbeats(registry: EmbeddedRegistry, clock: Clock) -> None:
    registry.register("reviews", "10.0.0.1", 9080)  # default_ttl 30
    registry.register("reviews", "10.0.0.2", 9080, ttl=10)
    registry.register("reviews", "10.0.0.3", 9080, ttl=0)  # permanent
    clock.time += 8
    assert registry.heartbeat("reviews", "10.0.0.2:9080")
    clock.time += 9
    assert registry.expire() == 0
    clock.time += 2  # 11 s after the heartbeat
    assert registry.expire() == 1
    assert endpoints(registry) == ["reviews 10.0.0.1:9080", "reviews 10.0.0.3:9080"]
    assert not registry.heartbeat("reviews", "10.0.0.2:9080")  # gone: register again
    clock.time += 12  # 31 s after registration
    assert registry.expire() == 1
    clock.time += 1e6
    assert registry.expire() == 0
    assert endpoints(registry) == ["reviews 10.0.0.3:9080"]


def test_registering_again_renews(registry: EmbeddedRegistry, clock: Clock) -> None:
    registry.register("reviews", "10.0.0.1", 9080, ttl=10)
    clock.time += 9
    registry.register("reviews", "10.0.0.1", 9080, ttl=10)
    clock.time += 9
    assert registry.expire() == 0


def test_expiry_keeps_the_service_deregister_removes_it(
    registry: EmbeddedRegistry, clock: Clock
) -> None:
    registry.register("reviews", "10.0.0.1", 9080, ttl=1)
    registry.register("ratings", "10.0.0.5", 9080, ttl=0)
    clock.time += 2
    registry.expire()
    assert hosts(registry) == ["ratings", "reviews"]
    assert endpoints(registry) == ["ratings 10.0.0.5:9080"]
    assert registry.deregister("ratings")  # the service and its instances
    assert registry.snapshot().instances == ()
    assert hosts(registry) == ["reviews"]
    assert not registry.deregister("ratings")
    registry.register("reviews", "10.0.0.1", 9080)
    assert registry.deregister("reviews", "10.0.0.1:9080")
    assert not registry.deregister("reviews", "10.0.0.1:9080")
    assert hosts(registry) == ["reviews"]


def test_data_survives_a_restart_with_one_ttl_of_grace(path: str, clock: Clock) -> None:
    first = EmbeddedRegistry(path, default_ttl=10, now=clock)
    first.register("reviews", "10.0.0.1", 9080, labels={"version": "v1"}, weight=3)
    first.register("reviews", "10.0.0.2", 9080, locality="eu/a")
    first.register("static", "db.internal", 5432, ports=[ServicePort(5432, "tcp", "TCP")], ttl=0)
    clock.time += 9
    first.heartbeat("reviews", "10.0.0.2:9080")
    before = first.snapshot()
    first.close()

    clock.time += 3600  # pilot was down for an hour: every TTL ran out meanwhile
    second = EmbeddedRegistry(path, default_ttl=10, now=clock)
    try:
        assert second.snapshot() == before
        clock.time += 9
        assert second.expire() == 0  # a full TTL from the restart to renew
        second.heartbeat("reviews", "10.0.0.2:9080")
        clock.time += 2
        assert second.expire() == 1
        assert endpoints(second) == ["reviews 10.0.0.2:9080", "static db.internal:5432"]
        assert second.services()[1].resolution == "DNS"
    finally:
        second.close()


def test_the_store_is_sqlite_in_wal_mode(registry: EmbeddedRegistry, path: str) -> None:
    registry.register("reviews", "10.0.0.1", 9080, ttl=0)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("SELECT host, id, ttl FROM instances").fetchall() == [
            ("reviews", "10.0.0.1:9080", None)
        ]
    db.close()


def test_changes_are_notified_while_running(registry: EmbeddedRegistry, clock: Clock) -> None:
    calls: list[int] = []

    async def scenario() -> None:
        task = asyncio.create_task(registry.run(lambda: calls.append(len(calls))))
        await asyncio.sleep(0)
        registry.register("reviews", "10.0.0.1", 9080, ttl=5)
        registry.register("reviews", "10.0.0.1", 9080, ttl=5)  # only a renewal
        registry.heartbeat("reviews", "10.0.0.1:9080")
        assert len(calls) == 1
        registry.register("reviews", "10.0.0.1", 9080, ttl=5, weight=2)
        assert len(calls) == 2
        clock.time += 6
        assert registry.expire() == 1
        assert len(calls) == 3
        registry.deregister("reviews")
        assert len(calls) == 4
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    registry.register("reviews", "10.0.0.1", 9080)  # not running: nobody to tell
    assert len(calls) == 4


def test_the_loop_expires_on_a_real_clock(path: str) -> None:
    """A 0.3 s TTL: the loop sweeps every 0.1 s, so the instance is gone within ~0.4 s."""
    registry = EmbeddedRegistry(path)
    changed = asyncio.Event()

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        registry.register("reviews", "10.0.0.1", 9080, ttl=0.3)
        start = loop.time()
        task = asyncio.create_task(registry.run(changed.set))
        await asyncio.wait_for(changed.wait(), 2)
        task.cancel()
        return loop.time() - start

    try:
        assert 0.3 <= asyncio.run(scenario()) < 1.0
        assert registry.snapshot().instances == ()
    finally:
        registry.close()


def test_ipv6_and_dns_addresses(registry: EmbeddedRegistry) -> None:
    assert registry.register("v6", "0:0::1", 80) == "[::1]:80"
    assert registry.snapshot().instances[0].address == "::1"
    registry.register("external", "db.example.com", 5432)
    with pytest.raises(RegistrationError, match=r"have host names; 10\.0\.0\.1 is not one"):
        registry.register("external", "10.0.0.1", 5432)
    registry.deregister("external", "db.example.com:5432")
    registry.register("external", "10.0.0.1", 5432)  # no instances left: it may switch
    assert {s.host: s.resolution for s in registry.services()}["external"] == "STATIC"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"host": "Reviews"}, "host"),
        ({"host": "-reviews"}, "host"),
        ({"host": "a" * 64}, "host"),
        ({"address": "10.0.0.1:80"}, "address"),
        ({"port": 0}, "port"),
        ({"port": 65536}, "port"),
        ({"port": True}, "port"),
        ({"service_port": 70000}, "service_port"),
        ({"ports": []}, "ports"),
        ({"ports": [ServicePort(80, "http", "UDP")]}, "ports[0].protocol"),  # type: ignore[arg-type]
        ({"ports": [ServicePort(80, "Web")]}, "ports[0].name"),
        ({"ports": [ServicePort(80), ServicePort(80, "b")]}, "ports[1].number"),
        ({"ports": [ServicePort(80), ServicePort(81)]}, "ports[1].name"),
        ({"labels": {"version": 1}}, "labels.version"),
        ({"labels": {"a b": "c"}}, "labels"),
        ({"labels": ["version"]}, "labels"),
        ({"weight": 0}, "weight"),
        ({"weight": 1.5}, "weight"),
        ({"locality": "a/b/c/d"}, "locality"),
        ({"ttl": -1}, "ttl"),
        ({"ttl": float("nan")}, "ttl"),
        ({"instance_id": "a/b"}, "id"),
        ({"instance_id": ""}, "id"),
    ],
)
def test_invalid_registrations_name_the_field(
    registry: EmbeddedRegistry, kwargs: dict[str, object], field: str
) -> None:
    arguments: dict[str, object] = {"host": "reviews", "address": "10.0.0.1", "port": 9080}
    arguments.update(kwargs)
    with pytest.raises(RegistrationError) as caught:
        registry.register(**arguments)  # type: ignore[arg-type]
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert registry.snapshot().services == ()
