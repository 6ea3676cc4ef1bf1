"""The ADS client of ``shoal proxy``: subscribe, translate, apply, ACK or NACK.

One gRPC stream carries every type (state of the world or delta, as the bootstrap's
``ads_config.api_type`` says). Updates go through the same translation as the static
bootstrap (:mod:`shoal.config.envoy`), so a resource shoal cannot honour is NACKed with the
very error a bad file would give, and the running config stays as it was.

As in Envoy: clusters are requested first, then listeners; a new EDS cluster is *warming*
until its endpoints arrive (or ``initial_fetch_timeout`` passes) and nothing that would use
it is applied before; a listener waits for its RouteConfiguration the same way. When the
server goes away the proxy keeps serving what it has and reconnects with jittered backoff,
then resyncs (the server answers the re-sent subscriptions with the current state).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format
from google.rpc import status_pb2

from shoal import __version__
from shoal.config.envoy import (
    translate_cluster,
    translate_listener,
    translate_load_assignment,
    translate_route_configuration,
)
from shoal.config.model import AdsSource, Cluster, DiscoveryType, Endpoint, Listener, Node
from shoal.errors import ConfigError
from shoal.xds import CLUSTER, ENDPOINT, LISTENER, ROUTE

log = logging.getLogger("shoal.xds")

_PROTOS: dict[str, type[Any]] = {
    LISTENER: listener_pb2.Listener,
    ROUTE: route_pb2.RouteConfiguration,
    CLUSTER: cluster_pb2.Cluster,
    ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
}
_FULL_STATE = frozenset({LISTENER, CLUSTER})
_BACKOFF_BASE, _BACKOFF_MAX = 0.5, 10.0


class XdsSink(Protocol):
    """Where accepted config goes: the proxy runtime."""

    async def apply_dynamic(
        self, listeners: tuple[Listener, ...], clusters: tuple[Cluster, ...]
    ) -> None: ...

    def update_assignment(self, service_name: str, endpoints: tuple[Endpoint, ...]) -> None: ...

    def server_address(self, cluster: str) -> tuple[str, int] | None: ...


@dataclass(slots=True)
class Subscription:
    """One type's subscription and what was accepted of it."""

    type_url: str
    wildcard: bool
    names: set[str] = field(default_factory=set)
    requested: set[str] = field(default_factory=set)  # names the server was last told
    versions: dict[str, str] = field(default_factory=dict)  # delta: name -> version
    version_info: str = ""  # state of the world: last accepted
    nonce: str = ""
    started: bool = False


def node_proto(node: Node) -> base_pb2.Node:
    proto = base_pb2.Node(
        id=node.id, cluster=node.cluster, user_agent_name="shoal", user_agent_version=__version__
    )
    if node.metadata:
        json_format.ParseDict(node.metadata, proto.metadata)
    return proto


class AdsClient:
    def __init__(self, source: AdsSource, node: Node, sink: XdsSink) -> None:
        self.source = source
        self.node = node_proto(node)
        self.sink = sink
        self.initialized = asyncio.Event()
        self.subscriptions: dict[str, Subscription] = {}
        if source.clusters:
            self.subscriptions[CLUSTER] = Subscription(CLUSTER, wildcard=True)
        self.subscriptions[ENDPOINT] = Subscription(ENDPOINT, wildcard=False)
        if source.listeners:
            self.subscriptions[LISTENER] = Subscription(LISTENER, wildcard=True)
        self.subscriptions[ROUTE] = Subscription(ROUTE, wildcard=False)
        # accepted state
        self.clusters: dict[str, Cluster] = {}
        self.listener_protos: dict[str, Any] = {}
        self.route_protos: dict[str, Any] = {}
        self.assigned: set[str] = set()  # EDS service names with endpoints received
        self.applied: tuple[dict[str, Listener], dict[str, Cluster]] = ({}, {})
        self._warming_since: dict[str, float] = {}
        self._warm_timer: asyncio.TimerHandle | None = None
        self._outbox: asyncio.Queue[Any] = asyncio.Queue()
        self._received = {CLUSTER: not source.clusters, LISTENER: not source.listeners}
        self.accepted: dict[
            str, dict[str, tuple[str, Any]]
        ] = {}  # type -> name -> (version, proto)

    # the stream ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Stay subscribed until cancelled, reconnecting with jittered exponential backoff."""
        failures = 0
        while True:
            address = self.sink.server_address(self.source.cluster)
            if address is not None:
                try:
                    failures = 0 if await self._session(address) else failures + 1
                except grpc.RpcError as exc:
                    log.warning("xDS stream to %s:%d ended: %s", *address, _rpc_reason(exc))
                    failures += 1
            delay = min(_BACKOFF_MAX, _BACKOFF_BASE * 2 ** min(failures, 8))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _session(self, address: tuple[str, int]) -> bool:
        """One stream; True if the server answered at least once."""
        host, port = address
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._outbox = asyncio.Queue()
        first = True
        for subscription in self.subscriptions.values():
            subscription.started = False
            subscription.nonce = ""
            if subscription.wildcard or subscription.names:
                self._send(self._request(subscription, first=first))
                first = False
        answered = False
        async with grpc.aio.insecure_channel(target) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            method = (
                stub.DeltaAggregatedResources
                if self.source.delta
                else stub.StreamAggregatedResources
            )
            call = method(_Outbox(self._outbox))
            async for response in call:
                if not answered:
                    log.info("xDS stream to %s established", target)
                    answered = True
                await self._handle(response)
        return answered

    def _send(self, request: Any) -> None:
        self._outbox.put_nowait(request)

    def _request(
        self, subscription: Subscription, *, first: bool = False, error: str | None = None
    ) -> Any:
        detail = status_pb2.Status(code=3, message=error) if error is not None else None
        if self.source.delta:
            request = discovery_pb2.DeltaDiscoveryRequest(
                type_url=subscription.type_url, response_nonce=subscription.nonce
            )
            if not subscription.started:
                subscription.started = True
                if subscription.wildcard:
                    request.resource_names_subscribe.append("*")
                request.resource_names_subscribe.extend(sorted(subscription.names))
                request.initial_resource_versions.update(subscription.versions)
            else:
                request.resource_names_subscribe.extend(
                    sorted(subscription.names - subscription.requested)
                )
                request.resource_names_unsubscribe.extend(
                    sorted(subscription.requested - subscription.names)
                )
        else:
            subscription.started = True
            request = discovery_pb2.DiscoveryRequest(
                version_info=subscription.version_info,
                type_url=subscription.type_url,
                response_nonce=subscription.nonce,
                resource_names=[] if subscription.wildcard else sorted(subscription.names),
            )
        subscription.requested = set(subscription.names)
        if first:
            request.node.CopyFrom(self.node)
        if detail is not None:
            request.error_detail.CopyFrom(detail)
        return request

    def _resubscribe(self, type_url: str, names: set[str]) -> None:
        subscription = self.subscriptions[type_url]
        if names == subscription.names:
            return
        subscription.names = names
        for name in list(subscription.versions):
            if name not in names:
                del subscription.versions[name]
        self._send(self._request(subscription))

    # responses ----------------------------------------------------------------------------

    async def _handle(self, response: Any) -> None:
        type_url = str(response.type_url)
        subscription = self.subscriptions.get(type_url)
        if subscription is None:
            return
        subscription.nonce = str(response.nonce)
        if self.source.delta:
            updates = {
                str(r.name): (str(r.version), self._unpack(type_url, r.resource))
                for r in response.resources
            }
            removed = {str(n) for n in response.removed_resources}
            version = ""
        else:
            updates = {}
            for packed in response.resources:
                message = self._unpack(type_url, packed)
                name = message.cluster_name if type_url == ENDPOINT else message.name
                updates[str(name)] = ("", message)
            removed = set()
            version = str(response.version_info)
        try:
            await self._accept(type_url, updates, removed, full=not self.source.delta)
        except ConfigError as exc:
            log.error("xDS update rejected (NACK), keeping the running config: %s", exc)
            self._send(self._request(subscription, error=str(exc)))
            return
        self._record(type_url, updates, removed, version)
        if self.source.delta:
            for name, (resource_version, _message) in updates.items():
                subscription.versions[name] = resource_version
            for name in removed:
                subscription.versions.pop(name, None)
        else:
            subscription.version_info = version
        self._send(self._request(subscription))  # the ACK

    def _record(
        self, type_url: str, updates: dict[str, tuple[str, Any]], removed: set[str], version: str
    ) -> None:
        """Keep what was accepted, as received, for ``/config_dump``."""
        held = self.accepted.setdefault(type_url, {})
        if not self.source.delta and type_url in _FULL_STATE:
            held.clear()
        for name, (resource_version, message) in updates.items():
            held[name] = (resource_version or version, message)
        for name in removed:
            held.pop(name, None)

    def config_dump(self) -> dict[str, list[dict[str, Any]]]:
        """The accepted dynamic resources, in Envoy's ``/config_dump`` shapes."""

        def entries(type_url: str, key: str) -> list[tuple[str, str, dict[str, Any]]]:
            held = self.accepted.get(type_url, {})
            return [
                (
                    name,
                    version,
                    {key: json_format.MessageToDict(message, preserving_proto_field_name=True)},
                )
                for name, (version, message) in sorted(held.items())
            ]

        return {
            "dynamic_listeners": [
                {"name": name, "active_state": {"version_info": version, **body}}
                for name, version, body in entries(LISTENER, "listener")
            ],
            "dynamic_route_configs": [
                {"version_info": version, **body}
                for _name, version, body in entries(ROUTE, "route_config")
            ],
            "dynamic_active_clusters": [
                {"version_info": version, **body}
                for _name, version, body in entries(CLUSTER, "cluster")
            ],
            "dynamic_endpoint_configs": [
                {"version_info": version, **body}
                for _name, version, body in entries(ENDPOINT, "endpoint_config")
            ],
        }

    @staticmethod
    def _unpack(type_url: str, packed: Any) -> Any:
        message = _PROTOS[type_url]()
        if packed.type_url != type_url or not packed.Unpack(message):
            raise ConfigError(f"expected {type_url}, got {packed.type_url}", source="xds")
        return message

    async def _accept(
        self, type_url: str, updates: dict[str, tuple[str, Any]], removed: set[str], full: bool
    ) -> None:
        """Validate a whole response, then take it (all or nothing, like Envoy)."""
        messages = {name: message for name, (_v, message) in updates.items()}
        if type_url == CLUSTER:
            built = {
                name: translate_cluster(m, source=f"xds Cluster {name}")
                for name, m in messages.items()
            }
            clusters = built if full and type_url in _FULL_STATE else {**self.clusters, **built}
            for name in removed:
                clusters.pop(name, None)
            self.clusters = clusters
            now = time.monotonic()
            wanted = {c.eds_service_name for c in clusters.values() if c.type is DiscoveryType.EDS}
            for name, cluster in built.items():
                if (
                    cluster.type is DiscoveryType.EDS
                    and cluster.eds_service_name not in self.assigned
                ):
                    self._warming_since.setdefault(name, now)
            self._resubscribe(ENDPOINT, wanted)
            self._received[CLUSTER] = True
        elif type_url == ENDPOINT:
            for name, message in messages.items():
                endpoints = translate_load_assignment(
                    message, source=f"xds ClusterLoadAssignment {name}"
                )
                self.sink.update_assignment(name, endpoints)
                self.assigned.add(name)
            for name in removed:
                self.sink.update_assignment(name, ())
        elif type_url == LISTENER:
            listeners = messages if full else {**self.listener_protos, **messages}
            for name in removed:
                listeners.pop(name, None)
            wanted = {r for r in map(_rds_name, listeners.values()) if r}
            for name, message in messages.items():  # validate what can be validated now
                route_name = _rds_name(message)
                if not route_name or route_name in self.route_protos:
                    self._listener(name, message)
            self.listener_protos = listeners
            self._resubscribe(ROUTE, wanted)
            self._received[LISTENER] = True
        elif type_url == ROUTE:
            for name, message in messages.items():
                translate_route_configuration(message, source=f"xds RouteConfiguration {name}")
            route_protos = {**self.route_protos, **messages}
            for name in removed:
                route_protos.pop(name, None)
            self.route_protos = route_protos
        await self._apply()

    def _listener(self, name: str, message: Any) -> Listener | None:
        """The listener with its RouteConfiguration inlined, or None while that is missing."""
        route_name = _rds_name(message)
        if route_name:
            routes = self.route_protos.get(route_name)
            if routes is None:
                return None
            message = _with_routes(message, routes)
        return translate_listener(message, source=f"xds Listener {name}")

    async def _apply(self) -> None:
        """Apply what is warm; wait (up to initial_fetch_timeout) for what is not."""
        if not all(self._received.values()):
            return
        now = time.monotonic()
        timeout = self.source.initial_fetch_timeout
        warming = {
            name: since
            for name, since in self._warming_since.items()
            if name in self.clusters and self.clusters[name].eds_service_name not in self.assigned
        }
        self._warming_since = warming
        if any(now - since < timeout for since in warming.values()):
            self._arm_warm_timer(min(warming.values()) + timeout - now)
            return
        if self._warm_timer is not None:  # everything warmed before the timeout
            self._warm_timer.cancel()
            self._warm_timer = None
        listeners = {}
        for name, message in self.listener_protos.items():
            listener = self._listener(name, message)
            if listener is None:
                previous = self.applied[0].get(name)
                if previous is not None:
                    listeners[name] = previous  # the new version waits for its routes
                continue
            listeners[name] = listener
        if (listeners, self.clusters) == self.applied:
            self._initialized()
            return
        try:
            await self.sink.apply_dynamic(tuple(listeners.values()), tuple(self.clusters.values()))
        except OSError as exc:
            raise ConfigError(f"cannot bind: {exc}", source="xds") from exc
        self.applied = (listeners, dict(self.clusters))
        self._initialized()

    def _initialized(self) -> None:
        if not self.initialized.is_set():
            listeners, clusters = self.applied
            log.info("xDS config applied: %d listeners, %d clusters", len(listeners), len(clusters))
            self.initialized.set()

    def _arm_warm_timer(self, delay: float) -> None:
        if self._warm_timer is not None:
            self._warm_timer.cancel()
        loop = asyncio.get_running_loop()
        self._warm_timer = loop.call_later(max(delay, 0.0), self._warm_timeout)

    def _warm_timeout(self) -> None:
        self._warm_timer = None
        log.warning("clusters still without endpoints after the fetch timeout: applying")
        self._warming_since = {name: 0.0 for name in self._warming_since}
        task = asyncio.get_running_loop().create_task(self._apply())
        task.add_done_callback(_log_failure)


class _Outbox:
    """The request stream: an async iterator (not a generator, which gRPC could not close
    while it waits) over the queue of requests to send."""

    def __init__(self, queue: asyncio.Queue[Any]) -> None:
        self.queue = queue

    def __aiter__(self) -> _Outbox:
        return self

    async def __anext__(self) -> Any:
        return await self.queue.get()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("applying xDS config failed: %s", task.exception())


def _hcm(listener: Any) -> Any | None:
    for chain in listener.filter_chains:
        for network_filter in chain.filters:
            manager = hcm_pb2.HttpConnectionManager()
            if network_filter.typed_config.Unpack(manager):
                return manager
    return None


def _rds_name(listener: Any) -> str:
    manager = _hcm(listener)
    return (
        str(manager.rds.route_config_name)
        if manager is not None and manager.HasField("rds")
        else ""
    )


def _with_routes(listener: Any, routes: Any) -> Any:
    """A copy of ``listener`` whose connection manager carries ``routes`` inline."""
    copy = listener_pb2.Listener()
    copy.CopyFrom(listener)
    for chain in copy.filter_chains:
        for network_filter in chain.filters:
            manager = hcm_pb2.HttpConnectionManager()
            if network_filter.typed_config.Unpack(manager) and manager.HasField("rds"):
                manager.ClearField("rds")
                manager.route_config.CopyFrom(routes)
                network_filter.typed_config.Pack(manager)
    return copy


def _rpc_reason(exc: grpc.RpcError) -> str:
    code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
    details = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
    return f"{code.name if code else 'error'}: {details}"
