"""The mesh as pilot sees it: services and their instances, whatever registry they came from.

Every registry (embedded, files, etcd, ZooKeeper, later Kubernetes) reduces its own data to
these two frozen shapes; the translator turns them, with the traffic rules, into xDS. Values
are hashable so that pilot can compare two snapshots cheaply and push only what changed.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

AppProtocol = Literal["HTTP", "HTTP2", "GRPC", "TCP", "DUBBO", "BOLT", "MOTAN2"]
# The RPC protocols the proxy routes by service and method (Envoy's generic_proxy), in the
# order their filter chains take on a listener.
RPC_PROTOCOLS: tuple[AppProtocol, ...] = ("DUBBO", "BOLT", "MOTAN2")
Resolution = Literal["STATIC", "DNS"]

Labels = tuple[tuple[str, str], ...]


def envoy_duration(seconds: float) -> str:
    """Seconds in protobuf's JSON form for a Duration (``"1.5s"``), as xDS carries them."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def labels_of(mapping: Mapping[str, str]) -> Labels:
    """The canonical (sorted, hashable) form of a label map."""
    return tuple(sorted((str(k), str(v)) for k, v in mapping.items()))


@dataclass(frozen=True, slots=True)
class ServicePort:
    number: int
    name: str = "http"
    protocol: AppProtocol = "HTTP"


@dataclass(frozen=True, slots=True)
class Service:
    """A name clients call (``reviews``, ``reviews.default.svc.cluster.local``) and its ports.

    The host of a service with an RPC port is also its RPC service name (a Dubbo or SOFA
    interface, ``com.example.Greeter``), which the proxy matches exactly: registries keep
    its case."""

    host: str
    ports: tuple[ServicePort, ...]
    resolution: Resolution = "STATIC"
    source: str = ""  # the registry it came from, for errors and `shoal services`


@dataclass(frozen=True, slots=True)
class Instance:
    """One endpoint of a service port: where to connect and what labels it carries."""

    host: str  # the service host
    service_port: int  # which of the service's ports this instance serves
    address: str  # IP address, or a DNS name for resolution DNS
    port: int  # the port to connect to
    labels: Labels = ()
    weight: int = 1
    locality: str = ""  # "region/zone/subzone", any part may be empty
    healthy: bool = True
    source: str = ""

    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    def matches(self, selector: Labels) -> bool:
        """Whether every label of ``selector`` is on this instance (a subset's labels)."""
        mine = self.label_map()
        return all(mine.get(key) == value for key, value in selector)


@dataclass(frozen=True, slots=True)
class RegistrySnapshot:
    services: tuple[Service, ...] = ()
    instances: tuple[Instance, ...] = ()


class Registry(abc.ABC):
    """A source of services and instances.

    ``run`` connects, loads, and then keeps the registry's view current until cancelled,
    calling ``changed()`` (on the event loop's thread) after every change; ``snapshot()`` is
    the current view and must be cheap. A registry that loses its backend keeps its last view
    (a brief etcd or ZooKeeper outage must not empty the mesh) and reconnects with backoff.
    """

    name: str = ""

    @abc.abstractmethod
    async def run(self, changed: Callable[[], None]) -> None: ...

    @abc.abstractmethod
    def snapshot(self) -> RegistrySnapshot: ...

    def close(self) -> None:  # noqa: B027 (most registries hold nothing beyond run())
        """Release what the registry holds once ``run`` has ended (a file, say)."""


@dataclass(slots=True)
class MergedRegistries:
    """All registries as one view: the same host from two sources keeps the first source's
    service definition and the instances of both."""

    registries: list[Registry] = field(default_factory=list)

    def snapshot(self) -> RegistrySnapshot:
        services: dict[str, Service] = {}
        instances: list[Instance] = []
        for registry in self.registries:
            view = registry.snapshot()
            for service in view.services:
                services.setdefault(service.host, service)
            instances.extend(view.instances)
        return RegistrySnapshot(tuple(services.values()), tuple(instances))


def rpc_ports(ports: Iterable[ServicePort]) -> dict[AppProtocol, ServicePort]:
    """The first of ``ports`` for each RPC protocol among them, in RPC_PROTOCOLS order."""
    found: dict[AppProtocol, ServicePort] = {}
    for port in ports:
        if port.protocol in RPC_PROTOCOLS:
            found.setdefault(port.protocol, port)
    return {protocol: found[protocol] for protocol in RPC_PROTOCOLS if protocol in found}


def merge_ports(ports: Iterable[ServicePort]) -> tuple[ServicePort, ...]:
    """Ports by number, first wins, sorted: the stable form a Service keeps."""
    by_number: dict[int, ServicePort] = {}
    for port in ports:
        by_number.setdefault(port.number, port)
    return tuple(by_number[n] for n in sorted(by_number))
