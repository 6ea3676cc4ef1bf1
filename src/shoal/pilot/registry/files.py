"""Services and instances from the config dir's ServiceEntry and WorkloadEntry resources.

The registry does not read files itself: pilot already watches the config dir for traffic
rules, and feeding the same RuleSet here keeps rules and endpoints from one consistent read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from shoal.pilot.api.model import RuleSet, ServiceEntry, WorkloadEntry
from shoal.pilot.model import (
    Instance,
    Labels,
    Registry,
    RegistrySnapshot,
    Resolution,
    Service,
    ServicePort,
    merge_ports,
)


class FilesRegistry(Registry):
    """One Service per ServiceEntry host; one Instance per endpoint and service port."""

    name = "files"

    def __init__(self, ruleset: RuleSet | None = None) -> None:
        self._snapshot = snapshot_of(ruleset) if ruleset else RegistrySnapshot()
        self._changed: Callable[[], None] | None = None

    async def run(self, changed: Callable[[], None]) -> None:
        """Nothing to connect to: remember whom to tell about :meth:`update` until cancelled."""
        self._changed = changed
        try:
            if self._snapshot != RegistrySnapshot():
                changed()
            await asyncio.Event().wait()
        finally:
            self._changed = None

    def snapshot(self) -> RegistrySnapshot:
        return self._snapshot

    def update(self, ruleset: RuleSet) -> bool:
        """Take the entries of a new RuleSet; whether the services or instances changed."""
        snapshot = snapshot_of(ruleset)
        if snapshot == self._snapshot:
            return False
        self._snapshot = snapshot
        if self._changed is not None:
            self._changed()
        return True


def snapshot_of(ruleset: RuleSet) -> RegistrySnapshot:
    """Services sorted by host and instances by host, port and address, so that moving a
    resource between files or reordering it is not a change."""
    entries: dict[str, list[ServiceEntry]] = {}
    for entry in ruleset.service_entries:
        for host in entry.hosts:
            entries.setdefault(host, []).append(entry)
    services: list[Service] = []
    instances: set[Instance] = set()
    for host, defining in entries.items():
        first = defining[0]
        ports = merge_ports(
            ServicePort(port.number, port.name, port.protocol)
            for entry in defining
            for port in entry.ports
        )
        resolution: Resolution = "DNS" if first.resolution == "DNS" else "STATIC"
        services.append(Service(host, ports, resolution, FilesRegistry.name))
        for entry in defining:
            instances.update(_instances(host, entry, ruleset.workload_entries))
    return RegistrySnapshot(
        tuple(sorted(services, key=lambda s: s.host)),
        tuple(sorted(instances, key=lambda i: (i.host, i.service_port, i.address, i.port))),
    )


def _instances(
    host: str, entry: ServiceEntry, workloads: tuple[WorkloadEntry, ...]
) -> Iterator[Instance]:
    if entry.workload_selector is not None:
        endpoints: tuple[WorkloadEntry, ...] = tuple(
            workload
            for workload in workloads
            if workload.meta.namespace == entry.meta.namespace
            and _selects(entry.workload_selector, workload)
        )
    elif entry.endpoints or entry.resolution != "DNS":
        endpoints = entry.endpoints
    else:
        # Istio's DNS entry without endpoints: each host resolves to itself.
        endpoints = (WorkloadEntry(entry.meta, address=host),)
    for workload in endpoints:
        ports = dict(workload.ports)
        for port in entry.ports:
            yield Instance(
                host=host,
                service_port=port.number,
                address=workload.address,
                port=ports.get(port.name) or port.target_port or port.number,
                labels=workload.labels,
                weight=workload.weight,
                locality=workload.locality,
                source=FilesRegistry.name,
            )


def _selects(selector: Labels, workload: WorkloadEntry) -> bool:
    labels = dict(workload.labels)
    return all(labels.get(key) == value for key, value in selector)
