"""The Aggregated Discovery Service: state-of-the-world and delta xDS over one gRPC stream.

Each stream is a session holding, per resource type, what the client subscribed to and the
version of every resource last sent. A push compares the new snapshot's versions with that
record and sends only what changed, so an endpoint change reaches clients as EDS alone.

Protocol rules kept (Envoy's xDS protocol doc, gRFC A27): a SotW request whose nonce is not
the last one this stream sent for its type is stale and ignored, but a delta request never is
(its subscription changes are deltas the client will not repeat); a request with
``error_detail`` is a NACK, logged with the node and not answered (the client keeps its last
good config, pilot does not resend the same thing), though a subscription change it carries
still counts; Listener and Cluster responses carry the full set (absent means deleted),
RouteConfiguration and ClusterLoadAssignment responses only what changed or was newly asked
for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format

from shoal.errors import ConfigError
from shoal.pilot.translate import (
    CLUSTER,
    LISTENER,
    TYPE_URLS,
    MeshSnapshot,
    NodeInfo,
    Resource,
)

log = logging.getLogger("shoal.pilot.xds")

FULL_STATE = frozenset({LISTENER, CLUSTER})  # SotW responses list every resource


def _address(value: object, field_name: str) -> tuple[str, int]:
    text = str(value)
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"expected HOST:PORT, got {text!r}", field=f"node.metadata.{field_name}")
    return host.strip("[]"), int(port)


def node_info(node: Any) -> NodeInfo:
    """Read the Shoal metadata of a Node; a client without any (gRPC) gets the defaults."""
    metadata = json_format.MessageToDict(node.metadata) if node.HasField("metadata") else {}
    service, service_port = str(metadata.get("SERVICE", "")), None
    if ":" in service:
        host, port = _address(service, "SERVICE")
        service, service_port = host, port
    labels = metadata.get("LABELS") or {}
    if not isinstance(labels, dict):
        raise ConfigError("must be a map of strings", field="node.metadata.LABELS")
    info: dict[str, Any] = {}
    for key, name in (
        ("APP_ADDRESS", "app_address"),
        ("INBOUND_ADDRESS", "inbound_address"),
        ("OUTBOUND_ADDRESS", "outbound_address"),
    ):
        if key in metadata:
            info[name] = _address(metadata[key], key)
    return NodeInfo(
        id=str(node.id),
        service=service,
        service_port=service_port,
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
        **info,
    )


class Mesh:
    """The current snapshot and the sessions waiting for the next one."""

    def __init__(self, snapshot: MeshSnapshot) -> None:
        self.snapshot = snapshot
        self.version = 1
        self.sessions: set[Session] = set()
        self.nacks = 0

    def publish(self, snapshot: MeshSnapshot) -> None:
        self.snapshot = snapshot
        self.version += 1
        for session in self.sessions:
            session.wake()


@dataclass(slots=True)
class TypeState:
    names: set[str] = field(default_factory=set)
    wildcard: bool = False
    sent: dict[str, str] = field(default_factory=dict)  # name -> version the client has
    nonce: str = ""
    subscribed: bool = False


class Session:
    """One ADS stream's bookkeeping; ``delta`` picks the incremental variant."""

    def __init__(self, mesh: Mesh, delta: bool, peer: str) -> None:
        self.mesh = mesh
        self.delta = delta
        self.peer = peer
        self.node: NodeInfo | None = None
        self.types: dict[str, TypeState] = {}
        self.nonce = 0
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self._push_pending = False
        self._sidecar: tuple[int, dict[str, dict[str, Resource]]] = (0, {})

    def wake(self) -> None:
        if not self._push_pending:
            self._push_pending = True
            self.queue.put_nowait(None)

    def label(self) -> str:
        return f"{self.node.id if self.node else '?'} ({self.peer})"

    # what the client may see --------------------------------------------------------------

    def view(self, type_url: str, state: TypeState) -> dict[str, Resource]:
        snapshot = self.mesh.snapshot
        found: dict[str, Resource] = {}
        if state.wildcard and self.node is not None and type_url in FULL_STATE:
            found.update(self._sidecar_view(type_url))
        for name in state.names:
            resource = snapshot.lookup(type_url, name)
            if resource is not None:
                found[name] = resource
        return found

    def _sidecar_view(self, type_url: str) -> dict[str, Resource]:
        version, cached = self._sidecar
        if version != self.mesh.version:
            cached = {}
            self._sidecar = (self.mesh.version, cached)
        if type_url not in cached:
            assert self.node is not None
            snapshot = self.mesh.snapshot
            cached[type_url] = (
                snapshot.sidecar_listeners(self.node)
                if type_url == LISTENER
                else snapshot.sidecar_clusters(self.node)
            )
        return cached[type_url]

    def _next_nonce(self) -> str:
        self.nonce += 1
        return str(self.nonce)

    # state of the world ---------------------------------------------------------------------

    def sotw_request(self, request: Any) -> list[Any]:
        type_url = str(request.type_url)
        state = self.types.setdefault(type_url, TypeState())
        if state.nonce and request.response_nonce and request.response_nonce != state.nonce:
            # Stale: answers a response the client has not seen the last of. Before this
            # stream sent anything of the type, a nonce can only be a previous stream's.
            return []
        if request.HasField("error_detail"):
            self._nack(type_url, str(request.version_info), request.error_detail.message)
        names = {str(n) for n in request.resource_names}
        first = not state.subscribed
        wildcard = "*" in names or (
            not names and type_url in FULL_STATE and (first or state.wildcard)
        )
        names.discard("*")
        if not first and names == state.names and wildcard == state.wildcard:
            return []  # an ACK, or a NACK that asks for nothing new
        added = names - state.names
        state.subscribed, state.names, state.wildcard = True, names, wildcard
        response = self._sotw_response(type_url, state, asked=added, force=True)
        return [response] if response is not None else []

    def sotw_push(self) -> list[Any]:
        self._push_pending = False
        responses = []
        for type_url in TYPE_URLS:
            state = self.types.get(type_url)
            if state is not None and state.subscribed:
                response = self._sotw_response(type_url, state, asked=set(), force=False)
                if response is not None:
                    responses.append(response)
        return responses

    def _sotw_response(
        self, type_url: str, state: TypeState, asked: set[str], force: bool
    ) -> Any | None:
        """``asked``: names newly subscribed to, sent even if the client had them before;
        ``force``: answer even with nothing to send (a subscription change)."""
        view = self.view(type_url, state)
        if type_url in FULL_STATE:
            versions = {n: r.version for n, r in view.items()}
            if not force and versions == state.sent:
                return None
            chosen = list(view.values())
            state.sent = versions
        else:
            chosen = [r for n, r in view.items() if n in asked or state.sent.get(n) != r.version]
            if not chosen and not force:
                return None
            state.sent.update((r.name, r.version) for r in chosen)
        state.nonce = self._next_nonce()
        return discovery_pb2.DiscoveryResponse(
            version_info=str(self.mesh.version),
            resources=[r.body for r in chosen],
            type_url=type_url,
            nonce=state.nonce,
        )

    # delta --------------------------------------------------------------------------------

    def delta_request(self, request: Any) -> list[Any]:
        """No nonce check: a stale nonce only means the request crossed a response, and the
        subscription changes in it must still be applied (the protocol doc says so)."""
        type_url = str(request.type_url)
        state = self.types.setdefault(type_url, TypeState())
        if request.HasField("error_detail"):
            self._nack(type_url, "", request.error_detail.message)
        first = not state.subscribed
        subscribe = {str(n) for n in request.resource_names_subscribe}
        unsubscribe = {str(n) for n in request.resource_names_unsubscribe}
        if first:
            state.subscribed = True
            state.wildcard = not subscribe and not unsubscribe and type_url in FULL_STATE
            state.sent = dict(request.initial_resource_versions)
        if "*" in subscribe:
            state.wildcard = True
        if "*" in unsubscribe:
            state.wildcard = False
        state.names = (state.names | subscribe) - unsubscribe - {"*"}
        for name in unsubscribe:
            state.sent.pop(name, None)
        # Sent even if the client has them: what it subscribes to again (it may have dropped
        # them), and names it drops that the wildcard may still cover (it must learn which).
        # On a new stream, what initial_resource_versions lists is known to be held.
        asked = subscribe | (unsubscribe if state.wildcard else set())
        if first:
            asked = {n for n in asked if n != "*" and n not in state.sent}
        elif not asked:
            return []  # an ACK, a NACK, or an unsubscription, which needs no answer
        response = self._delta_response(type_url, state, asked=asked, force=first)
        return [response] if response is not None else []

    def delta_push(self) -> list[Any]:
        self._push_pending = False
        responses = []
        for type_url in TYPE_URLS:
            state = self.types.get(type_url)
            if state is not None and state.subscribed:
                response = self._delta_response(type_url, state, asked=set(), force=False)
                if response is not None:
                    responses.append(response)
        return responses

    def _delta_response(
        self, type_url: str, state: TypeState, asked: set[str], force: bool
    ) -> Any | None:
        view = self.view(type_url, state)
        resend = view.keys() if "*" in asked else asked
        changed = [r for n, r in view.items() if n in resend or state.sent.get(n) != r.version]
        removed = sorted((state.sent.keys() | asked) - view.keys() - {"*"})
        if not changed and not removed and not force:
            return None
        for name in removed:
            state.sent.pop(name, None)
        state.sent.update((r.name, r.version) for r in changed)
        state.nonce = self._next_nonce()
        return discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=str(self.mesh.version),
            resources=[
                discovery_pb2.Resource(name=r.name, version=r.version, resource=r.body)
                for r in changed
            ],
            removed_resources=removed,
            type_url=type_url,
            nonce=state.nonce,
        )

    def _nack(self, type_url: str, version: str, message: str) -> None:
        self.mesh.nacks += 1
        log.warning(
            "NACK from %s for %s version %s: %s",
            self.label(),
            type_url.rsplit(".", 1)[-1],
            version or "-",
            message,
        )


NodeHook = Callable[[NodeInfo], None]


class AggregatedDiscovery(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """The gRPC service; ``connected``/``disconnected`` let pilot register sidecars as
    endpoints of their service while their stream lives."""

    def __init__(self, mesh: Mesh, connected: NodeHook, disconnected: NodeHook) -> None:
        self.mesh = mesh
        self.connected = connected
        self.disconnected = disconnected

    async def StreamAggregatedResources(  # noqa: N802 (gRPC's name)
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        await self._serve(Session(self.mesh, False, context.peer()), requests, context)

    async def DeltaAggregatedResources(  # noqa: N802 (gRPC's name)
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        await self._serve(Session(self.mesh, True, context.peer()), requests, context)

    async def _serve(
        self, session: Session, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        reader = asyncio.create_task(self._read(session, requests))
        self.mesh.sessions.add(session)
        try:
            while True:
                item = await session.queue.get()
                if isinstance(item, BaseException):
                    return  # the client closed its side, or the stream broke
                if item is None:
                    responses = session.delta_push() if session.delta else session.sotw_push()
                else:
                    if session.node is None:
                        session.node = node_info(item.node)
                        log.info("stream from %s (%s)", session.label(), _variant(session))
                        self.connected(session.node)
                    responses = (
                        session.delta_request(item) if session.delta else session.sotw_request(item)
                    )
                for response in responses:
                    await context.write(response)
        except ConfigError as exc:
            log.warning("stream from %s rejected: %s", session.peer, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            self.mesh.sessions.discard(session)
            reader.cancel()
            if session.node is not None:
                log.info("stream from %s closed", session.label())
                self.disconnected(session.node)

    @staticmethod
    async def _read(session: Session, requests: AsyncIterator[Any]) -> None:
        try:
            async for request in requests:
                session.queue.put_nowait(request)
        except Exception as exc:  # the stream broke: end the session
            session.queue.put_nowait(exc)
            return
        session.queue.put_nowait(EOFError())


def _variant(session: Session) -> str:
    return "delta" if session.delta else "state of the world"


__all__ = ["AggregatedDiscovery", "Mesh", "Session", "node_info"]
