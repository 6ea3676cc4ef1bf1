"""Pilot's own registry, the default: services and instances registered over pilot's REST
API (or by pilot itself, for the sidecars that connect over xDS), kept in a SQLite file.

Lifecycle, kept deliberately simple:

* A service is created by the first registration of one of its instances and lives until
  ``deregister(host)``. Deregistering or expiring its instances leaves it with none (its
  clients then get a cluster with no endpoints, a clearer failure than an unknown host).
* An instance with a TTL must be renewed (``heartbeat``, or ``register`` again) within
  that many seconds or it is removed; TTL 0 means it never expires.
* Everything is in SQLite (WAL), so a pilot restart keeps the mesh. Instances could not
  renew while pilot was down, so on opening every TTL counts afresh from the restart:
  a live instance always gets one full TTL to find the new pilot.

The store is small and local: its calls are synchronous and short, made on the event loop
(in the thread that opened it, as sqlite3 requires). SQLite is the durable copy, read once on
opening; the view is kept in memory, changed by each write once it has committed, and
``snapshot()`` is built from it when asked after a change. A write then costs the same with
10 or 10,000 instances (reloading every row after each write made bulk registration
quadratic), and a burst of writes builds one snapshot, not one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TypeGuard, cast, get_args

from shoal.pilot.model import (
    RPC_PROTOCOLS,
    AppProtocol,
    Instance,
    Registry,
    RegistrySnapshot,
    Resolution,
    Service,
    ServicePort,
    labels_of,
    merge_ports,
)

PROTOCOLS: tuple[str, ...] = get_args(AppProtocol)
MAX_WEIGHT = 65535  # 65535 x 65536 endpoints still fits Envoy's uint32 weight sum
SWEEP_INTERVAL = 1.0  # seconds between expiry sweeps, unless a TTL asks for less
MIN_SWEEP_INTERVAL = 0.05  # a tiny TTL must not turn the sweep into a busy loop

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_PORT_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_LABEL_KEY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,251}[A-Za-z0-9])?")
_INSTANCE_ID = re.compile(r"[A-Za-z0-9_.:@\[\]-]{1,253}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS services (
    host TEXT PRIMARY KEY,
    ports TEXT NOT NULL,          -- JSON [{"number", "name", "protocol"}], sorted by number
    resolution TEXT NOT NULL      -- STATIC (IP addresses) or DNS (host names)
);
CREATE TABLE IF NOT EXISTS instances (
    host TEXT NOT NULL REFERENCES services (host) ON DELETE CASCADE,
    id TEXT NOT NULL,
    service_port INTEGER NOT NULL,
    address TEXT NOT NULL,
    port INTEGER NOT NULL,
    labels TEXT NOT NULL,         -- JSON object
    weight INTEGER NOT NULL,
    locality TEXT NOT NULL,
    ttl REAL,                     -- seconds; NULL: never expires
    last_renewed REAL NOT NULL,   -- unix time
    PRIMARY KEY (host, id),
    UNIQUE (host, service_port, address, port)
);
CREATE INDEX IF NOT EXISTS instances_expiry ON instances (last_renewed + ttl)
    WHERE ttl IS NOT NULL;
-- the shortest TTL sets the sweep interval: asked every sweep, so no scan
CREATE INDEX IF NOT EXISTS instances_ttl ON instances (ttl) WHERE ttl IS NOT NULL;
"""


class RegistrationError(ValueError):
    """A registration was refused; ``field`` names the offending input for API errors."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Registration:
    """One instance as the embedded registry keeps it: the mesh's view plus its
    bookkeeping (id, TTL, when it expires)."""

    id: str
    instance: Instance
    ttl: float | None  # None: never expires
    expires_at: float | None


class EmbeddedRegistry(Registry):
    """Services and instances registered with pilot itself, persisted in SQLite at ``path``.

    ``default_ttl`` applies to registrations that give none; ``now`` is the clock TTLs are
    measured with (injectable so that expiry can be tested without waiting).
    """

    name = "embedded"

    def __init__(
        self, path: str, default_ttl: float = 30.0, *, now: Callable[[], float] = time.time
    ) -> None:
        if default_ttl < 0:
            raise ValueError(f"default_ttl must be >= 0, not {default_ttl}")
        self.default_ttl = default_ttl
        self.now = now
        self._db = sqlite3.connect(path)
        self._db.execute("PRAGMA journal_mode=WAL")
        # With WAL, NORMAL loses nothing when pilot crashes (only the last commits when the
        # machine does) and spares an fsync per heartbeat.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._db:
            self._db.executescript(_SCHEMA)
            self._db.execute(
                "UPDATE instances SET last_renewed = ? WHERE ttl IS NOT NULL", (now(),)
            )
        self._changed: Callable[[], None] | None = None
        self._wake: asyncio.Event | None = None  # cuts the sweep's sleep short (see run)
        # the view, as committed: services by host; per host, its instances by id
        self._services: dict[str, Service] = {}
        self._instances: dict[str, dict[str, Registration]] = {}
        self._snapshot: RegistrySnapshot | None = None  # None: to build from the above
        self._load()

    def close(self) -> None:
        self._db.close()

    # --- the Registry interface ----------------------------------------------------------

    def snapshot(self) -> RegistrySnapshot:
        """Services by host, instances by host and id; built on the first call after a
        change (pilot asks once per push, however many writes came before it)."""
        if self._snapshot is None:
            hosts = sorted(self._services)
            self._snapshot = RegistrySnapshot(
                tuple(self._services[host] for host in hosts),
                tuple(r.instance for host in hosts for r in self._sorted(host)),
            )
        return self._snapshot

    async def run(self, changed: Callable[[], None]) -> None:
        """Expire instances whose TTL passed, about every second (more often when a TTL is
        shorter than 3 s), until cancelled; ``changed()`` follows every change of the view,
        from here or from any mutation while this runs."""
        self._changed = changed
        self._wake = wake = asyncio.Event()
        try:
            while True:
                self.expire()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self._sweep_interval())
                wake.clear()
        finally:
            self._changed = self._wake = None

    # --- the API -------------------------------------------------------------------------

    def register(
        self,
        host: str,
        address: str,
        port: int,
        *,
        service_port: int | None = None,
        ports: Iterable[ServicePort] | None = None,
        labels: Mapping[str, str] | None = None,
        weight: int = 1,
        locality: str = "",
        ttl: float | None = None,
        instance_id: str | None = None,
    ) -> str:
        """Add or update an instance of ``host`` and renew it; returns its id.

        ``ports`` are the service's ports (merged into those it has; a given port's name and
        protocol win). Without them the instance's ``service_port`` (default: ``port``)
        becomes an HTTP port of the service if it is not one yet. ``ttl`` None means
        ``default_ttl``, 0 never expires. The id defaults to ``address:port``. The same
        address, port and service port under another id is refused: it would be the same
        endpoint twice. Raises :class:`RegistrationError` for any invalid input.
        """
        given_ports = _ports(ports) if ports is not None else ()
        old_service = self._services.get(host) if isinstance(host, str) else None
        host = _host("host", host, (*given_ports, *(old_service.ports if old_service else ())))
        address = _address(address)
        port = _port("port", port)
        if service_port is None:
            service_port = given_ports[0].number if given_ports else port
        service_port = _port("service_port", service_port)
        label_map = _labels(labels or {})
        weight = _weight(weight)
        locality = _locality(locality)
        ttl = float(self.default_ttl) if ttl is None else _ttl(ttl)  # float: as SQLite has it
        if instance_id is None:
            instance_id = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        instance_id = _instance_id(instance_id)

        siblings = self._instances.get(host, {})
        new_ports = merge_ports((*given_ports, *(old_service.ports if old_service else ())))
        if service_port not in {p.number for p in new_ports}:
            if given_ports:
                raise RegistrationError(
                    "service_port", f"{service_port} is not one of the service's ports"
                )
            new_ports = merge_ports((*new_ports, ServicePort(service_port)))
        resolution: Resolution = "STATIC" if _is_ip(address) else "DNS"
        if (
            old_service is not None
            and old_service.resolution != resolution
            and any(other != instance_id for other in siblings)
        ):
            kind = "IP addresses" if old_service.resolution == "STATIC" else "host names"
            raise RegistrationError(
                "address", f"the instances of {host} have {kind}; {address} is not one"
            )
        db = self._db
        # the UNIQUE index finds the endpoint's owner, however many instances the host has
        taken = db.execute(
            "SELECT id FROM instances WHERE host = ? AND service_port = ? AND address = ?"
            " AND port = ? AND id != ?",
            (host, service_port, address, port, instance_id),
        ).fetchone()
        if taken:
            raise RegistrationError(
                "address", f"{address}:{port} is already instance {taken[0]} of {host}"
            )
        service = Service(host, new_ports, resolution, self.name)
        instance = Instance(
            host=host,
            service_port=service_port,
            address=address,
            port=port,
            labels=labels_of(label_map),
            weight=weight,
            locality=locality,
            source=self.name,
        )
        kept_ttl = ttl if ttl > 0 else None
        now = self.now()
        with db:
            db.execute(
                "INSERT INTO services (host, ports, resolution) VALUES (?, ?, ?)"
                " ON CONFLICT (host) DO UPDATE SET ports = excluded.ports,"
                " resolution = excluded.resolution",
                (host, _ports_to_json(new_ports), resolution),
            )
            db.execute(
                "INSERT INTO instances (host, id, service_port, address, port, labels, weight,"
                " locality, ttl, last_renewed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (host, id) DO UPDATE SET service_port = excluded.service_port,"
                " address = excluded.address, port = excluded.port, labels = excluded.labels,"
                " weight = excluded.weight, locality = excluded.locality, ttl = excluded.ttl,"
                " last_renewed = excluded.last_renewed",
                (
                    host,
                    instance_id,
                    service_port,
                    address,
                    port,
                    json.dumps(label_map, sort_keys=True),
                    weight,
                    locality,
                    kept_ttl,
                    now,
                ),
            )
        old = siblings.get(instance_id)
        self._services[host] = service
        self._instances[host] = siblings
        siblings[instance_id] = Registration(
            instance_id, instance, kept_ttl, None if kept_ttl is None else now + kept_ttl
        )
        if not (old_service == service and old is not None and old.instance == instance):
            self._view_changed()
        if self._wake is not None and 0 < ttl < 3 * SWEEP_INTERVAL:
            self._wake.set()  # the sweep may be sleeping longer than this TTL allows
        return instance_id

    def heartbeat(self, host: str, instance_id: str) -> bool:
        """Renew an instance's TTL; False when it is unknown (expired or never registered:
        register it again). A renewal does not change the view, so nothing is notified."""
        registration = self._instances.get(host, {}).get(instance_id)
        if registration is None:
            return False
        now = self.now()
        with self._db:
            self._db.execute(
                "UPDATE instances SET last_renewed = ? WHERE host = ? AND id = ?",
                (now, host, instance_id),
            )
        if registration.ttl is not None:
            self._instances[host][instance_id] = replace(
                registration, expires_at=now + registration.ttl
            )
        return True

    def deregister(self, host: str, instance_id: str | None = None) -> bool:
        """Remove one instance, or (``instance_id`` None) the service with all its
        instances; False when there was no such thing."""
        if instance_id is None:
            if host not in self._services:
                return False
            with self._db:
                self._db.execute("DELETE FROM services WHERE host = ?", (host,))
            del self._services[host], self._instances[host]
        else:
            if instance_id not in self._instances.get(host, {}):
                return False
            with self._db:
                self._db.execute(
                    "DELETE FROM instances WHERE host = ? AND id = ?", (host, instance_id)
                )
            del self._instances[host][instance_id]
        self._view_changed()
        return True

    def expire(self) -> int:
        """Remove the instances whose TTL has passed; returns how many. ``run`` calls it.
        The expiry index finds them, so a sweep with nothing due costs next to nothing."""
        with self._db:
            expired = self._db.execute(
                "DELETE FROM instances WHERE ttl IS NOT NULL AND last_renewed + ttl < ?"
                " RETURNING host, id",
                (self.now(),),
            ).fetchall()
        for host, instance_id in expired:
            del self._instances[host][instance_id]
        if expired:
            self._view_changed()
        return len(expired)

    def services(self) -> tuple[Service, ...]:
        return self.snapshot().services

    def registrations(self) -> tuple[Registration, ...]:
        """Every instance with its id and TTL, by host and id (sorted on each call: for
        listings, not for hot paths)."""
        return tuple(r for host in sorted(self._instances) for r in self._sorted(host))

    # --- internals -----------------------------------------------------------------------

    def _sweep_interval(self) -> float:
        shortest: float | None = self._db.execute(
            "SELECT MIN(ttl) FROM instances WHERE ttl IS NOT NULL"
        ).fetchone()[0]
        if shortest is None:
            return SWEEP_INTERVAL
        return max(MIN_SWEEP_INTERVAL, min(SWEEP_INTERVAL, shortest / 3))

    def _view_changed(self) -> None:
        """After a write that changed services or instances (a renewal does not)."""
        self._snapshot = None
        if self._changed is not None:
            self._changed()

    def _sorted(self, host: str) -> list[Registration]:
        """The instances of ``host`` by id, the order SQLite's ``ORDER BY id`` gave."""
        instances = self._instances[host]
        return [instances[instance_id] for instance_id in sorted(instances)]

    def _load(self) -> None:
        """Read the whole store into memory: on opening only."""
        for host, ports, resolution in self._db.execute(
            "SELECT host, ports, resolution FROM services"
        ):
            resolution = cast(Resolution, resolution)
            self._services[host] = Service(host, _ports_from_json(ports), resolution, self.name)
            self._instances[host] = {}
        for row in self._db.execute(
            "SELECT host, id, service_port, address, port, labels, weight, locality, ttl,"
            " last_renewed + ttl FROM instances"
        ):
            instance = Instance(
                host=row[0],
                service_port=row[2],
                address=row[3],
                port=row[4],
                labels=labels_of(json.loads(row[5])),
                weight=row[6],
                locality=row[7],
                source=self.name,
            )
            self._instances[row[0]][row[1]] = Registration(row[1], instance, row[8], row[9])


# --- validation: every check names the field it refused --------------------------------------


def _int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no number


def _port(field: str, value: object) -> int:
    if not _int(value) or not 1 <= value <= 65535:
        raise RegistrationError(field, f"must be an integer from 1 to 65535, not {value!r}")
    return value


def _host(field: str, value: object, ports: Iterable[ServicePort] = ()) -> str:
    """A DNS name in lower case (``reviews``, ``reviews.default.svc.cluster.local``); with an
    RPC port among ``ports``, upper case too: the host is then the RPC service's name (a
    Dubbo interface such as ``com.example.Greeter``), which the proxy matches exactly."""
    rpc = any(port.protocol in RPC_PROTOCOLS for port in ports)
    if not isinstance(value, str) or not _is_dns_name(value.lower() if rpc else value):
        raise RegistrationError(
            field,
            f"{value!r} is not a DNS name: dot-separated labels of lower-case letters, "
            "digits and '-' (at most 63 characters each, 253 in all; upper case too for a "
            "service with a DUBBO, BOLT or MOTAN2 port)",
        )
    return value


def _is_dns_name(value: str) -> bool:
    return len(value) <= 253 and all(_DNS_LABEL.fullmatch(label) for label in value.split("."))


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _address(value: object) -> str:
    """An IP address in its canonical form (so ``::1`` and ``0::1`` are one endpoint), or a
    DNS name."""
    if isinstance(value, str) and _is_ip(value):
        return str(ipaddress.ip_address(value))
    if isinstance(value, str) and _is_dns_name(value):
        return value
    raise RegistrationError("address", f"must be an IP address or a DNS name, not {value!r}")


def _ports(value: Iterable[object]) -> tuple[ServicePort, ...]:
    ports: list[ServicePort] = []
    numbers: set[int] = set()
    names: set[str] = set()
    for i, port in enumerate(value):
        if not isinstance(port, ServicePort):
            raise RegistrationError(f"ports[{i}]", "must be a port (number, name, protocol)")
        number = _port(f"ports[{i}].number", port.number)
        if port.protocol not in PROTOCOLS:
            raise RegistrationError(
                f"ports[{i}].protocol",
                f"must be one of {', '.join(PROTOCOLS)}, not {port.protocol!r}",
            )
        if not isinstance(port.name, str) or not _PORT_NAME.fullmatch(port.name):
            raise RegistrationError(
                f"ports[{i}].name",
                f"{port.name!r} is not a port name: lower-case letters, digits and '-'",
            )
        if number in numbers:
            raise RegistrationError(f"ports[{i}].number", f"port {number} is given twice")
        if port.name in names:
            raise RegistrationError(f"ports[{i}].name", f"name {port.name!r} is given twice")
        numbers.add(number)
        names.add(port.name)
        ports.append(port)
    if not ports:
        raise RegistrationError("ports", "must not be empty")
    return tuple(ports)


def _labels(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise RegistrationError("labels", "must be a map of strings to strings")
    for key, item in value.items():
        if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
            raise RegistrationError(
                "labels",
                f"{key!r} is not a label key: letters, digits and '._/-', starting and ending "
                "with a letter or digit",
            )
        if not isinstance(item, str):
            raise RegistrationError(f"labels.{key}", f"must be a string, not {item!r}")
    return dict(cast(Mapping[str, str], value))


def _weight(value: object) -> int:
    if not _int(value) or not 1 <= value <= MAX_WEIGHT:
        raise RegistrationError("weight", f"must be an integer from 1 to {MAX_WEIGHT}")
    return value


def _locality(value: object) -> str:
    if not isinstance(value, str) or value.count("/") > 2:
        raise RegistrationError("locality", "must be a string region/zone/subzone")
    return value


def _ttl(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1e9:
        raise RegistrationError("ttl", f"must be a number of seconds >= 0, not {value!r}")
    return float(value)


def _instance_id(value: object) -> str:
    if not isinstance(value, str) or not _INSTANCE_ID.fullmatch(value):
        raise RegistrationError(
            "id", f"{value!r} is not an instance id: 1 to 253 of letters, digits and '_.:@[]-'"
        )
    return value


def _ports_to_json(ports: Iterable[ServicePort]) -> str:
    return json.dumps([{"number": p.number, "name": p.name, "protocol": p.protocol} for p in ports])


def _ports_from_json(text: str) -> tuple[ServicePort, ...]:
    return tuple(
        ServicePort(p["number"], p["name"], cast(AppProtocol, p["protocol"]))
        for p in json.loads(text)
    )
