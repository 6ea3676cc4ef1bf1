"""Sidecars as endpoints: a proxy connected with ``SERVICE`` and ``APP_ADDRESS`` in its node
metadata is an instance of that service (at its inbound address) for as long as its xDS
stream lives. Nothing is persisted: after a pilot restart the proxies reconnect and are
registered again."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

from shoal.pilot.model import Instance, Registry, RegistrySnapshot, Service, ServicePort
from shoal.pilot.translate import NodeInfo


class ConnectedProxies(Registry):
    name = "proxies"

    def __init__(self) -> None:
        self._streams: Counter[NodeInfo] = Counter()  # a proxy's workers each keep a stream
        self._changed: Callable[[], None] = lambda: None
        self._view = RegistrySnapshot()

    async def run(self, changed: Callable[[], None]) -> None:
        self._changed = changed
        await asyncio.Event().wait()

    def snapshot(self) -> RegistrySnapshot:
        return self._view

    def connected(self, node: NodeInfo) -> None:
        if node.has_inbound:
            self._streams[node] += 1
            if self._streams[node] == 1:
                self._rebuild()

    def disconnected(self, node: NodeInfo) -> None:
        if node.has_inbound and self._streams[node] > 0:
            self._streams[node] -= 1
            if self._streams[node] == 0:
                del self._streams[node]
                self._rebuild()

    def _rebuild(self) -> None:
        services: dict[str, Service] = {}
        instances = []
        for node in self._streams:
            assert node.app_address is not None
            port = node.service_port or node.app_address[1]
            services.setdefault(
                node.service, Service(node.service, (ServicePort(port),), source=self.name)
            )
            instances.append(
                Instance(
                    host=node.service,
                    service_port=port,
                    address=node.inbound_address[0],
                    port=node.inbound_address[1],
                    labels=node.labels,
                    source=f"{self.name}:{node.id}",
                )
            )
        self._view = RegistrySnapshot(tuple(services.values()), tuple(instances))
        self._changed()
