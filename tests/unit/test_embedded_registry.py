"""The embedded registry on real SQLite files: registration, renewal, expiry, removal and
what survives a restart. TTLs are measured with a clock the tests move, so nothing waits
except the one test of the expiry loop itself."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.pilot.model import Instance, Service, ServicePort
from shoal.pilot.registry.embedded import EmbeddedRegistry, RegistrationError
from shoal.pilot.rest import services_json


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


def test_a_write_the_store_refuses_changes_nothing(
    registry: EmbeddedRegistry, path: str, clock: Clock
) -> None:
    """The view in memory follows the store only once a write has committed."""
    registry.register("reviews", "10.0.0.1", 9080, ttl=10)
    before = registry.snapshot()
    with sqlite3.connect(path) as db:
        for event in ("INSERT", "UPDATE", "DELETE"):
            db.execute(
                f"CREATE TRIGGER refuse_{event.lower()} BEFORE {event} ON instances"
                " BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
    db.close()
    with pytest.raises(sqlite3.DatabaseError, match="refused"):
        registry.register("ratings", "10.0.0.2", 9080)
    with pytest.raises(sqlite3.DatabaseError, match="refused"):
        registry.heartbeat("reviews", "10.0.0.1:9080")
    with pytest.raises(sqlite3.DatabaseError, match="refused"):
        registry.deregister("reviews", "10.0.0.1:9080")
    clock.time += 11
    with pytest.raises(sqlite3.DatabaseError, match="refused"):
        registry.expire()
    assert registry.snapshot() == before
    (registration,) = registry.registrations()
    assert registration.expires_at == clock.time - 1  # the heartbeat did not count


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


def test_the_view_stays_right_at_10000_instances(
    registry: EmbeddedRegistry, path: str, clock: Clock
) -> None:
    """1,000 services x 10 instances through every kind of write, checked against a model
    the test keeps; the view lives in memory, so the store reopened must agree with it."""
    expected: dict[tuple[str, str], Instance] = {}
    expires: dict[tuple[str, str], float] = {}  # the instances with a TTL

    def key(i: int, j: int) -> tuple[str, str]:
        return f"svc-{i}", f"10.{i // 100}.{i % 100}.{j + 1}:8080"

    def register(i: int, j: int, weight: int = 1) -> None:
        host, address = f"svc-{i}", f"10.{i // 100}.{i % 100}.{j + 1}"
        ttl = 10.0 if j % 2 else 0.0
        label = ("version", f"v{j % 3}")
        instance_id = registry.register(
            host, address, 8080, service_port=80, labels=dict([label]), weight=weight, ttl=ttl
        )
        assert (host, instance_id) == key(i, j)
        expected[key(i, j)] = Instance(host, 80, address, 8080, (label,), weight, source="embedded")
        if ttl:
            expires[key(i, j)] = clock.time + ttl

    for i in range(1000):
        for j in range(10):
            register(i, j)
    assert len(registry.snapshot().instances) == 10_000
    clock.time += 5
    for i in range(0, 1000, 7):
        register(i, 1, weight=3)  # a changed view, and a renewal
    for i in range(0, 1000, 3):
        assert registry.deregister(*key(i, 0))
        del expected[key(i, 0)]
    for i in range(9, 1000, 10):
        assert registry.deregister(f"svc-{i}")
        for j in range(10):
            expected.pop(key(i, j), None)
            expires.pop(key(i, j), None)
    for i in range(0, 1000, 2):
        assert registry.heartbeat(*key(i, 3)) == (key(i, 3) in expected)
        if key(i, 3) in expected:
            expires[key(i, 3)] = clock.time + 10
    clock.time += 6  # past the TTL of what was neither renewed nor registered again
    due = [k for k, at in expires.items() if at < clock.time]
    assert 0 < len(due) < len(expires)
    assert registry.expire() == len(due)
    for k in due:
        del expected[k], expires[k]
    assert registry.expire() == 0

    hosts = sorted(f"svc-{i}" for i in range(1000) if i % 10 != 9)
    snapshot = registry.snapshot()
    assert [s.host for s in snapshot.services] == hosts
    assert snapshot.instances == tuple(expected[k] for k in sorted(expected))
    assert [(r.id, r.instance, r.expires_at) for r in registry.registrations()] == [
        (k[1], expected[k], expires.get(k)) for k in sorted(expected)
    ]
    listing = services_json(snapshot, registry)
    assert [entry["host"] for entry in listing] == hosts
    assert Counter({entry["host"]: len(entry["instances"]) for entry in listing}) == Counter(
        host for host, _ in expected
    )
    renewed = listing[0]["instances"][0]  # svc-0 lost .1; .2 was registered again 6 s ago
    assert (renewed["id"], renewed["weight"], renewed["ttl"], renewed["expires_in"]) == (
        "10.0.0.2:8080",
        3,
        10.0,
        4.0,
    )
    reopened = EmbeddedRegistry(path, now=clock)
    try:
        assert reopened.snapshot() == snapshot
    finally:
        reopened.close()


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
