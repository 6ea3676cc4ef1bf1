"""etcd as a registry: each service and each instance is one JSON value under a prefix.

Key layout (``prefix`` defaults to ``/shoal``; docs/registries.md has the full schema)::

    <prefix>/services/<host>         {"ports": [{"number": 9080, "name": "http",
                                                 "protocol": "HTTP"}],
                                      "resolution": "STATIC"}
    <prefix>/instances/<host>/<id>   {"address": "10.0.0.1", "port": 9080,
                                      "service_port": 9080, "labels": {"version": "v1"},
                                      "weight": 1, "locality": "region/zone/subzone"}

One key per instance lets its owner write it with an etcd lease, so the instance vanishes
when the owner dies. An instance needs no service key: a missing service is inferred with
one HTTP port. Other keys under the prefix are ignored, which leaves room for more kinds.

The registry reads the prefix once, then follows a watch from the next revision, so no
change between the two is lost; a reconnect reads everything again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast, get_args

import aetcd

from shoal.net import split_address
from shoal.pilot.model import (
    AppProtocol,
    Instance,
    Labels,
    Registry,
    RegistrySnapshot,
    Resolution,
    Service,
    ServicePort,
    labels_of,
    merge_ports,
)

log = logging.getLogger("shoal.pilot.registry.etcd")

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 5.0
RPC_TIMEOUT = 5
CHANNEL_OPTIONS = {
    # Pings find a peer that vanished without closing the stream (a cut network);
    # etcd refuses pings more often than every 5 s.
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.http2.max_pings_without_data": 0,
    # The first read returns the whole prefix at once: a large mesh exceeds gRPC's 4 MiB.
    "grpc.max_receive_message_length": 256 * 1024 * 1024,
}
MAX_WEIGHT = 65535  # as the embedded registry: many endpoints still fit Envoy's uint32 sum
PROTOCOLS: tuple[str, ...] = get_args(AppProtocol)
RESOLUTIONS: tuple[str, ...] = get_args(Resolution)


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """An instance as written: its service port may be left to the service's first port,
    which is known only when the snapshot is built."""

    host: str
    address: str
    port: int
    service_port: int | None
    labels: Labels
    weight: int
    locality: str


class EtcdRegistry(Registry):
    """Services and instances from JSON values under an etcd key prefix."""

    def __init__(self, endpoint: str = "127.0.0.1:2379", prefix: str = "/shoal") -> None:
        self.name = f"etcd://{endpoint}{prefix}"
        self._host, self._port = split_address(endpoint)
        self._prefix = prefix.rstrip("/") + "/"
        self._services: dict[str, Service] = {}  # by key
        self._instances: dict[str, InstanceSpec] = {}  # by key
        self._snapshot: RegistrySnapshot | None = None

    def snapshot(self) -> RegistrySnapshot:
        if self._snapshot is None:
            self._snapshot = self._build()
        return self._snapshot

    async def run(self, changed: Callable[[], None]) -> None:
        delay = BACKOFF_FIRST
        while True:
            try:
                async with aetcd.Client(
                    self._host, self._port, timeout=RPC_TIMEOUT, options=CHANNEL_OPTIONS
                ) as client:
                    revision = await self._load(client, changed)
                    delay = BACKOFF_FIRST
                    watch = await client.watch_prefix(
                        self._prefix.encode(), start_revision=revision + 1
                    )
                    await self._follow(watch, changed)
                reason = "the watch ended"
            except aetcd.ClientError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            log.warning(
                "%s: %s; keeping the last view, reconnecting in %.1f s", self.name, reason, delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _follow(self, watch: Any, changed: Callable[[], None]) -> None:
        """Apply the watch's events, calling ``changed`` once per burst: the events of one
        etcd response (a lease's keys expiring together, a transaction) are applied before
        the loop runs anything else, so one call covers them all."""
        loop = asyncio.get_running_loop()
        pending: asyncio.Handle | None = None

        def notify() -> None:
            nonlocal pending
            pending = None
            changed()

        try:
            async for event in watch:
                if self._apply(event.kind, event.kv.key, event.kv.value) and pending is None:
                    pending = loop.call_soon(notify)
        finally:
            if pending is not None:  # the watch broke right after a change: report it now
                pending.cancel()
                notify()

    async def _load(self, client: aetcd.Client, changed: Callable[[], None]) -> int:
        """Replace the view by the prefix's current content; returns its revision."""
        before = self.snapshot()
        response = await client.get_prefix(self._prefix.encode())
        self._services.clear()
        self._instances.clear()
        for kv in response.kvs:
            self._apply("PUT", kv.key, kv.value)
        if self.snapshot() != before:
            changed()
        log.info("%s: loaded %d keys", self.name, len(response.kvs))
        return int(response.header.revision)

    def _apply(self, kind: str, raw_key: bytes, value: bytes) -> bool:
        """Apply one put or delete; returns whether it touched the view."""
        key = raw_key.decode(errors="replace")
        known = self._services.pop(key, None) is not None
        known = self._instances.pop(key, None) is not None or known
        if kind == "PUT":
            try:
                entry = self._parse(key, value)
            except ValueError as exc:
                log.warning("%s: ignoring key %s: %s", self.name, key, exc)
                entry = None
            if isinstance(entry, Service):
                self._services[key] = entry
            elif isinstance(entry, InstanceSpec):
                self._instances[key] = entry
            known = known or entry is not None
        if known:
            self._snapshot = None
        return known

    def _parse(self, key: str, value: bytes) -> Service | InstanceSpec | None:
        """The entry at ``key``; None for keys outside the layout."""
        kind, _, rest = key.removeprefix(self._prefix).partition("/")
        if kind == "services" and rest and "/" not in rest:
            return parse_service(rest, _object(value), self.name)
        host, _, ident = rest.partition("/")
        if kind == "instances" and host and ident:
            return parse_instance(host, _object(value))
        return None

    def _build(self) -> RegistrySnapshot:
        services = {service.host: service for service in self._services.values()}
        inferred: dict[str, list[ServicePort]] = {}
        instances = []
        for key in sorted(self._instances):
            spec = self._instances[key]
            service = services.get(spec.host)
            service_port = spec.service_port
            if service_port is None:
                service_port = service.ports[0].number if service else spec.port
            if service is None:
                inferred.setdefault(spec.host, []).append(ServicePort(service_port))
            instances.append(
                Instance(
                    host=spec.host,
                    service_port=service_port,
                    address=spec.address,
                    port=spec.port,
                    labels=spec.labels,
                    weight=spec.weight,
                    locality=spec.locality,
                    source=self.name,
                )
            )
        for host, ports in inferred.items():
            services[host] = Service(host, merge_ports(ports), source=self.name)
        return RegistrySnapshot(
            tuple(services[host] for host in sorted(services)), tuple(instances)
        )


def parse_service(host: str, data: Mapping[str, Any], source: str) -> Service:
    ports = data.get("ports")
    if not isinstance(ports, list) or not ports:
        raise ValueError('"ports" must be a non-empty list')
    resolution = data.get("resolution", "STATIC")
    if resolution not in RESOLUTIONS:
        raise ValueError(f'"resolution" must be one of {", ".join(RESOLUTIONS)}')
    parsed = [_port(port) for port in ports]
    if len({port.number for port in parsed}) < len(parsed):
        raise ValueError("a port number is given twice")
    if len({port.name for port in parsed}) < len(parsed):
        raise ValueError("a port name is given twice")
    return Service(
        host,
        merge_ports(parsed),
        resolution=cast(Resolution, resolution),
        source=source,
    )


def parse_instance(host: str, data: Mapping[str, Any]) -> InstanceSpec:
    address = data.get("address")
    if not isinstance(address, str) or not address:
        raise ValueError('"address" must be a non-empty string')
    labels = data.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise ValueError('"labels" must map strings to strings')
    locality = data.get("locality", "")
    if not isinstance(locality, str) or locality.count("/") > 2:
        raise ValueError('"locality" must be a string region/zone/subzone')
    service_port = data.get("service_port")
    return InstanceSpec(
        host=host,
        address=address,
        port=_number(data, "port"),
        service_port=None if service_port is None else _number(data, "service_port"),
        labels=labels_of(labels),
        weight=_number(data, "weight", default=1, top=MAX_WEIGHT),
        locality=locality,
    )


def _port(data: object) -> ServicePort:
    if not isinstance(data, dict):
        raise ValueError("each port must be an object")
    protocol = data.get("protocol", "HTTP")
    if protocol not in PROTOCOLS:
        raise ValueError(f'"protocol" must be one of {", ".join(PROTOCOLS)}')
    name = data.get("name", protocol.lower())
    if not isinstance(name, str) or not name:
        raise ValueError('a port\'s "name" must be a non-empty string')
    return ServicePort(_number(data, "number"), name, cast(AppProtocol, protocol))


def _number(
    data: Mapping[str, Any], field: str, default: int | None = None, top: int = 65535
) -> int:
    value = data.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
        raise ValueError(f'"{field}" must be an integer from 1 to {top}')
    return value


def _object(value: bytes) -> dict[str, Any]:
    try:
        data = json.loads(value)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data
