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
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format

from shoal.errors import ConfigError
from shoal.net import split_address
from shoal.pilot.model import labels_of
from shoal.pilot.translate import (
    MeshSnapshot,
    NodeInfo,
    Resource,
)
from shoal.xds import CLUSTER, ENDPOINT, LISTENER, ROUTE, TYPE_URLS

log = logging.getLogger("shoal.pilot.xds")

FULL_STATE = frozenset({LISTENER, CLUSTER})  # SotW responses list every resource


def _address(value: object, field_name: str) -> tuple[str, int]:
    try:
        return split_address(str(value), lowest_port=1)
    except ValueError as exc:
        raise ConfigError(str(exc), field=f"node.metadata.{field_name}") from None


def _metadata(node: Any) -> dict[str, Any]:
    return json_format.MessageToDict(node.metadata) if node.HasField("metadata") else {}


def node_info(node: Any) -> NodeInfo:
    """Read the Shoal metadata of a Node; a client without any (gRPC) gets the defaults."""
    metadata = _metadata(node)
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
        ("RPC_OUTBOUND_ADDRESS", "rpc_outbound_address"),
    ):
        if key in metadata:
            info[name] = _address(metadata[key], key)
    return NodeInfo(
        id=str(node.id),
        service=service,
        service_port=service_port,
        labels=labels_of(labels),
        user_agent=str(node.user_agent_name),
        **info,
    )


def admin_address(node: Any) -> tuple[str, int] | None:
    """``ADMIN_ADDRESS``: where the proxy's admin API listens, so pilot can scrape its
    metrics and tap it. Kept on the session, not in :class:`NodeInfo`: translation does not
    depend on it, and sidecars that differ only by it still share their listeners."""
    value = _metadata(node).get("ADMIN_ADDRESS")
    return None if value is None else _address(value, "ADMIN_ADDRESS")


class Mesh:
    """The current snapshot, what changed in the last versions, and the sessions waiting.

    Pushes are cheap at scale because the work per client is small: the names that changed
    are computed once per version (``changed_since``), response bodies are serialized once
    for all clients that get the same resources (``encode``), and subscription name sets are
    shared between clients that ask for the same names (``intern``).
    """

    HISTORY = 64  # versions of change log kept; a session further behind diffs everything
    CONCURRENT_PUSHES = 64  # sessions building and writing a push at once (bounds memory)
    ENCODED_BUDGET = 128 * 1024 * 1024  # bytes of serialized answers kept for reuse

    def __init__(self, snapshot: MeshSnapshot) -> None:
        self.snapshot = snapshot
        self.version = 1
        self.sessions: set[Session] = set()
        self.nacks = 0
        self.changes: dict[int, dict[str, frozenset[str] | None]] = {}
        self._encoded: dict[tuple[Any, ...], bytes] = {}
        self._encoded_bytes = 0
        self._names: dict[frozenset[str], frozenset[str]] = {}
        self._requested: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._versions: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._listed: dict[int, tuple[dict[str, Resource], list[Resource], tuple[str, ...]]] = {}
        self._named_views: dict[tuple[str, int], tuple[frozenset[str], dict[str, Resource]]] = {}
        self.pushing = asyncio.Semaphore(self.CONCURRENT_PUSHES)

    def publish(self, snapshot: MeshSnapshot) -> None:
        old, self.snapshot = self.snapshot, snapshot
        self.version += 1
        self.changes[self.version] = _changes(old, snapshot)
        self.changes.pop(self.version - self.HISTORY, None)
        # What sessions hold stays shared; the next answers share anew.
        caches = (self._encoded, self._names, self._requested, self._versions, self._listed)
        for cache in (*caches, self._named_views):
            cache.clear()
        self._encoded_bytes = 0
        for session in self.sessions:
            session.wake()

    def changed_since(self, version: int, type_url: str) -> frozenset[str] | None:
        """The names of ``type_url`` that changed after ``version``; None when that is not
        known (too old, or a change that touches every named resource of the type)."""
        changed: set[str] = set()
        for step in range(version + 1, self.version + 1):
            names = self.changes[step].get(type_url) if step in self.changes else None
            if names is None:
                return None
            changed |= names
        return frozenset(changed)

    def intern(self, names: frozenset[str]) -> frozenset[str]:
        return self._names.setdefault(names, names)

    def intern_names(self, names: tuple[str, ...]) -> tuple[str, ...]:
        return self._requested.setdefault(names, names)

    def named_view(self, type_url: str, names: frozenset[str]) -> dict[str, Resource]:
        """The resources of these names; clients subscribed to the same (interned) set of
        names share one view per version, computed once."""
        found = self._named_views.get((type_url, id(names)))
        if found is None or found[0] is not names:
            found = (names, _lookup(self.snapshot, type_url, names))
            self._named_views[type_url, id(names)] = found
        return found[1]

    def listed(self, view: dict[str, Resource]) -> tuple[list[Resource], tuple[str, ...]]:
        """A whole answer's resources and their versions; views shared between clients
        (the sidecars' clusters) are listed once, and equal version tuples are one object."""
        found = self._listed.get(id(view))
        if found is None or found[0] is not view:
            chosen = list(view.values())
            versions = tuple(r.version for r in chosen)
            found = (view, chosen, self._versions.setdefault(versions, versions))
            self._listed[id(view)] = found
        return found[1], found[2]

    def encode(self, key: tuple[Any, ...], nonce: str, build: Callable[[], Any]) -> bytes:
        """The serialized response for ``key`` with ``nonce``, built once. Nonces count per
        stream, so clients with the same history (every sidecar's first answers, say) get
        the very same bytes; the body is shared even when the nonce differs."""
        whole = self._encoded.get((key, nonce))
        if whole is None:
            body = self._encoded.get(key)
            if body is None:
                body = self._encoded[key] = build().SerializeToString()
            whole = self._encoded[key, nonce] = body + _nonce_field(nonce)
            self._encoded_bytes += len(body) + len(whole)
            if self._encoded_bytes > self.ENCODED_BUDGET:  # many distinct answers
                self._encoded.clear()
                self._encoded_bytes = 0
        return whole


def _lookup(snapshot: MeshSnapshot, type_url: str, names: Iterable[str]) -> dict[str, Resource]:
    """The resources of ``names`` that exist; clusters and endpoints (thousands of names)
    by plain dict lookups."""
    shared = {CLUSTER: snapshot.clusters, ENDPOINT: snapshot.endpoints}.get(type_url)
    if shared is not None:
        return {name: shared[name] for name in names if name in shared}
    found = {}
    for name in names:
        resource = snapshot.lookup(type_url, name)
        if resource is not None:
            found[name] = resource
    return found


def _diff(old: Mapping[str, Resource], new: Mapping[str, Resource]) -> frozenset[str]:
    return frozenset(
        name
        for name in old.keys() | new.keys()
        if (old.get(name) is None) != (new.get(name) is None)
        or old[name].version != new[name].version
    )


def _changes(old: MeshSnapshot, new: MeshSnapshot) -> dict[str, frozenset[str] | None]:
    """What one publish changed, per type. Named gRPC listeners and routes derive from the
    virtual hosts, and sidecar listeners from filters in use and the RPC routes they hold:
    when those move, every name of the type may have changed (None)."""
    routes_same = old.outbound_routes.version == new.outbound_routes.version
    filters_same = (old.fault_used, old.rate_limits, old.rpc_hosts) == (
        new.fault_used,
        new.rate_limits,
        new.rpc_hosts,
    )
    same_shape = routes_same and old.ports == new.ports
    clusters = _diff(old.clusters, new.clusters)
    return {
        CLUSTER: clusters,
        # a changed EDS cluster is warmed by Envoy until its endpoints come again (as Istio
        # does, they are sent with it); an EDS cluster's resource is named like the cluster
        ENDPOINT: _diff(old.endpoints, new.endpoints) | (clusters & new.endpoints.keys()),
        ROUTE: frozenset() if same_shape else None,
        LISTENER: frozenset() if same_shape and filters_same else None,
    }


@dataclass(slots=True)
class TypeState:
    names: frozenset[str] = frozenset()  # interned: clients asking the same share one set
    requested: tuple[str, ...] = ()  # the names as last sent (SotW), to spot ACKs
    names_region: bytes | None = None  # the same, as the request's bytes (split_names)
    wildcard: bool = False
    sent: dict[str, str] = field(default_factory=dict)  # delta: name -> version it has
    sent_versions: tuple[str, ...] = ()  # SotW Listener/Cluster: the versions of the last answer
    nonce: str = ""
    subscribed: bool = False
    acked: str = ""  # the nonce of the last answer the client took
    rejected: str = ""  # why it refused the last one, until it takes one again


class Session:
    """One ADS stream's bookkeeping; ``delta`` picks the incremental variant."""

    def __init__(self, mesh: Mesh, delta: bool, peer: str) -> None:
        self.mesh = mesh
        self.delta = delta
        self.peer = peer
        self.node: NodeInfo | None = None
        self.admin: tuple[str, int] | None = None  # the node's ADMIN_ADDRESS
        self.types: dict[str, TypeState] = {}
        self.nonce = 0
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.synced = mesh.version  # the version the last push brought this client to
        self._push_pending = False

    def wake(self) -> None:
        if not self._push_pending:
            self._push_pending = True
            self.queue.put_nowait(None)

    def label(self) -> str:
        return f"{self.node.id if self.node else '?'} ({self.peer})"

    # what the client may see --------------------------------------------------------------

    def view(
        self, type_url: str, state: TypeState, only: Iterable[str] | None = None
    ) -> dict[str, Resource]:
        """The resources of the type this client sees; ``only``: just those of these names
        (what a push changed)."""
        snapshot = self.mesh.snapshot
        found: dict[str, Resource] = {}
        wildcard = state.wildcard and self.node is not None and type_url in FULL_STATE
        names: Iterable[str] = state.names
        if only is None:
            if not wildcard:
                return self.mesh.named_view(type_url, state.names)
            if not state.names:
                return self._sidecar_view(type_url)  # shared, never modified
            found.update(self._sidecar_view(type_url))
        else:
            if wildcard:
                sidecar = self._sidecar_view(type_url)
                found.update((n, sidecar[n]) for n in only if n in sidecar)
            names = [n for n in only if n in state.names]
        found.update(_lookup(snapshot, type_url, names))
        return found

    def _sidecar_view(self, type_url: str) -> dict[str, Resource]:
        assert self.node is not None
        snapshot = self.mesh.snapshot
        if type_url == LISTENER:
            return snapshot.sidecar_listeners(self.node)
        return snapshot.sidecar_clusters(self.node)

    def _next_nonce(self) -> str:
        self.nonce += 1
        return str(self.nonce)

    def _changed(self, since: int, type_url: str) -> frozenset[str] | None:
        """What a push must look at for this type: the changed names, or None for all."""
        changed = self.mesh.changed_since(since, type_url)
        if changed is None or type_url not in FULL_STATE:
            return changed
        # A full-state type is answered whole: look at everything if anything moved.
        return None if changed else changed

    def push(self) -> list[bytes]:
        """Bring the client to the mesh's current version: per type, in Envoy's order, what
        changed since its last push and concerns it."""
        self._push_pending = False
        since, self.synced = self.synced, self.mesh.version
        responses = []
        for type_url in TYPE_URLS:
            state = self.types.get(type_url)
            if state is None or not state.subscribed:
                continue
            changed = (
                self.mesh.changed_since(since, type_url)
                if self.delta
                else self._changed(since, type_url)
            )
            if changed is not None and not changed:
                continue
            if self.delta and type_url == ENDPOINT:
                # endpoints that come with a changed cluster are sent even if the client
                # has them: Envoy warms the new cluster until they arrive
                clusters = self.mesh.changed_since(since, CLUSTER)
                current = self.mesh.snapshot.endpoints.keys()  # removed ones stay, to be removed
                stale = current if clusters is None else current & clusters
                for name in stale & state.sent.keys():
                    del state.sent[name]
            respond = self._delta_response if self.delta else self._sotw_response
            response = respond(type_url, state, set(), False, changed)
            if response is not None:
                responses.append(response)
        return responses

    # state of the world ---------------------------------------------------------------------

    def sotw_request(
        self, request: Any, raw: bytes = b"", region: bytes | None = None
    ) -> list[bytes]:
        """With ``region`` (see :func:`split_names`), ``request`` lacks its names: an ACK
        is recognised from their bytes, and anything else parses ``raw`` whole."""
        type_url = str(request.type_url)
        state = self.types.setdefault(type_url, TypeState())
        if state.nonce and request.response_nonce and request.response_nonce != state.nonce:
            # Stale: answers a response the client has not seen the last of. Before this
            # stream sent anything of the type, a nonce can only be a previous stream's.
            return []
        self._note_reply(type_url, state, request, str(request.version_info))
        if state.subscribed and region is not None and region == state.names_region:
            return []  # an ACK (or a NACK) that asks for nothing new: the common case
        state.names_region = region
        if region:
            request = discovery_pb2.DiscoveryRequest.FromString(raw)
        requested = tuple(request.resource_names)
        if state.subscribed and requested == state.requested:
            return []
        requested = self.mesh.intern_names(requested)
        names = set(requested)
        first = not state.subscribed
        wildcard = "*" in names or (
            not names and type_url in FULL_STATE and (first or state.wildcard)
        )
        names.discard("*")
        state.requested = requested
        if not first and names == state.names and wildcard == state.wildcard:
            return []
        added = names - state.names
        state.subscribed, state.wildcard = True, wildcard
        state.names = self.mesh.intern(frozenset(names))
        response = self._sotw_response(type_url, state, asked=added, force=True)
        return [response] if response is not None else []

    def _sotw_response(
        self,
        type_url: str,
        state: TypeState,
        asked: set[str],
        force: bool,
        only: frozenset[str] | None = None,
    ) -> bytes | None:
        """``asked``: names newly subscribed to; ``force``: answer even with nothing to send
        (a subscription change); ``only``: the names a push changed (None: everything).

        Listener and Cluster answers are whole, and sent when their versions moved.
        RouteConfiguration and ClusterLoadAssignment answers carry what was asked for or
        changed: pushes follow the mesh's change log, so a client is always as current as
        its last push and nothing per resource needs remembering per client."""
        if type_url in FULL_STATE:
            view = self.view(type_url, state)
            chosen, versions = self.mesh.listed(view)
            if not force and versions == state.sent_versions:
                return None
            state.sent_versions = versions
        else:
            everything = force and asked >= state.names  # a first subscription, say
            view = self.view(type_url, state, None if everything else asked if force else only)
            if everything:
                chosen, versions = self.mesh.listed(view)
            else:
                chosen = list(view.values())
                if not chosen and not force:
                    return None
                versions = tuple(r.version for r in chosen)
        version = str(self.mesh.version)
        key = ("sotw", type_url, version, versions)

        def build() -> Any:
            resources = [r.body for r in chosen]
            return discovery_pb2.DiscoveryResponse(
                version_info=version, resources=resources, type_url=type_url
            )

        state.nonce = self._next_nonce()
        return self.mesh.encode(key, state.nonce, build)

    # delta --------------------------------------------------------------------------------

    def delta_request(self, request: Any) -> list[bytes]:
        """No nonce check: a stale nonce only means the request crossed a response, and the
        subscription changes in it must still be applied (the protocol doc says so)."""
        type_url = str(request.type_url)
        state = self.types.setdefault(type_url, TypeState())
        self._note_reply(type_url, state, request, "")
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
        state.names = self.mesh.intern(frozenset((state.names | subscribe) - unsubscribe - {"*"}))
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

    def _delta_response(
        self,
        type_url: str,
        state: TypeState,
        asked: set[str],
        force: bool,
        only: frozenset[str] | None = None,
    ) -> bytes | None:
        view = self.view(type_url, state, only)
        resend = view.keys() if "*" in asked else asked
        changed = [r for n, r in view.items() if n in resend or state.sent.get(n) != r.version]
        held = state.sent.keys() if only is None else only & state.sent.keys()
        removed = sorted((held | asked) - view.keys() - {"*"})
        if not changed and not removed and not force:
            return None
        for name in removed:
            state.sent.pop(name, None)
        state.sent.update((r.name, r.version) for r in changed)
        version = str(self.mesh.version)
        key = ("delta", type_url, version, tuple(r.version for r in changed), tuple(removed))

        def build() -> Any:
            return discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=version,
                resources=[
                    discovery_pb2.Resource(name=r.name, version=r.version, resource=r.body)
                    for r in changed
                ],
                removed_resources=removed,
                type_url=type_url,
            )

        state.nonce = self._next_nonce()
        return self.mesh.encode(key, state.nonce, build)

    def _note_reply(self, type_url: str, state: TypeState, request: Any, version: str) -> None:
        """Whether the client took or refused this type's last answer: a NACK is logged
        with the node and kept for ``status()`` until the client takes an answer again."""
        if request.HasField("error_detail"):
            state.rejected = str(request.error_detail.message)
            self.mesh.nacks += 1
            log.warning(
                "NACK from %s for %s version %s: %s",
                self.label(),
                type_url.rsplit(".", 1)[-1],
                version or "-",
                state.rejected,
            )
        elif request.response_nonce:
            state.acked, state.rejected = str(request.response_nonce), ""

    def status(self) -> dict[str, Any]:
        """For ``/debug/mesh`` and ``shoal check``: in sync when the client has taken the
        last answer of every type and has had the last push."""
        answered = [s for t, s in self.types.items() if s.nonce and t in TYPE_URLS]
        return {
            "node": self.node.id if self.node else "",
            "peer": self.peer,
            "variant": _variant(self),
            "in_sync": self.synced == self.mesh.version
            and all(s.acked == s.nonce for s in answered),
            "rejected": {
                type_url.rsplit(".", 1)[-1]: s.rejected
                for type_url, s in self.types.items()
                if s.rejected
            },
        }


def split_names(raw: bytes) -> tuple[Any, bytes] | None:
    """A received DiscoveryRequest without its ``resource_names`` (parsed), and the bytes
    of those names. Serializers write fields in number order, so the names (field 3) sit
    between ``version_info`` (1) and ``type_url`` (4): two requests with the same bytes
    there ask for the same names, and an ACK is known without parsing a thousand names.
    None when the layout is not that (a stream's first request carries the node)."""
    start = 0
    if raw[:1] == b"\x0a":  # version_info
        if len(raw) < 2 or raw[1] >= 0x80:
            return None
        start = 2 + raw[1]
    if raw[start : start + 1] == b"\x12":  # a node
        return None
    end = raw.find(_TYPE_PREFIX, start) - 2  # type_url's tag and one-byte length first
    if end < start or raw[end] != 4 << 3 | 2:
        return None
    rest = discovery_pb2.DiscoveryRequest.FromString(raw[:start] + raw[end:])
    return rest, raw[start:end]


_TYPE_PREFIX = b"type.googleapis.com/"


def _nonce_field(nonce: str) -> bytes:
    """Field 5 (``nonce``) of DiscoveryResponse and DeltaDiscoveryResponse, serialized: a
    shared response body plus this is that response with this stream's nonce (protobuf
    merges concatenated messages)."""
    data = nonce.encode()
    return bytes((5 << 3 | 2, len(data))) + data  # nonces are short: a one-byte length


NodeHook = Callable[[NodeInfo], None]


class AggregatedDiscovery:
    """The gRPC service; ``connected``/``disconnected`` let pilot register sidecars as
    endpoints of their service while their stream lives. Responses leave as bytes (see
    :meth:`Mesh.encode`), so the service is registered with :func:`add_to_server`."""

    def __init__(self, mesh: Mesh, connected: NodeHook, disconnected: NodeHook) -> None:
        self.mesh = mesh
        self.connected = connected
        self.disconnected = disconnected

    async def stream(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        await self._serve(Session(self.mesh, False, context.peer()), requests, context)

    async def delta(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
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
                    async with self.mesh.pushing:
                        for response in session.push():
                            await context.write(response)
                    continue
                raw, region = b"", None
                if isinstance(item, bytes):
                    raw = item
                    split = split_names(raw)
                    if split is None:
                        item = discovery_pb2.DiscoveryRequest.FromString(raw)
                    else:
                        item, region = split
                if session.node is None:
                    session.node = node_info(item.node)
                    session.admin = admin_address(item.node)
                    log.info("stream from %s (%s)", session.label(), _variant(session))
                    self.connected(session.node)
                responses = (
                    session.delta_request(item)
                    if session.delta
                    else session.sotw_request(item, raw, region)
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


def add_to_server(server: grpc.aio.Server, service: AggregatedDiscovery) -> None:
    """Register the ADS methods: requests parsed as usual, responses already bytes."""
    handlers = {
        "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
            service.stream,
            request_deserializer=bytes,  # parsed by the session, which keeps the bytes too
            response_serializer=bytes,
        ),
        "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
            service.delta,
            request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
            response_serializer=bytes,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))


_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


def _variant(session: Session) -> str:
    return "delta" if session.delta else "state of the world"


__all__ = ["AggregatedDiscovery", "Mesh", "Session", "add_to_server", "admin_address", "node_info"]
