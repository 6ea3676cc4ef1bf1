"""Pilot's ADS server against the xDS protocol: a real grpc.aio server on loopback, driven by a
real gRPC client sending hand-made requests, state of the world and delta.

Silence is checked without sleeping: ``Stream.drain`` sends a request on a type no test uses
(Secret) that the server always answers, and returns what came before that answer; the server
handles a stream's requests and pushes in order, so whatever it sent unasked (or in answer to
an ACK) arrives first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from shoal.pilot.api.model import RuleSet
from shoal.pilot.model import Instance, RegistrySnapshot, Service, ServicePort
from shoal.pilot.translate import NodeInfo, Translator
from shoal.pilot.xds import AggregatedDiscovery, Mesh, add_to_server
from shoal.xds import CLUSTER, ENDPOINT, LISTENER, ROUTE

BARRIER = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
MESSAGES: dict[str, Any] = {
    LISTENER: listener_pb2.Listener,
    CLUSTER: cluster_pb2.Cluster,
    ROUTE: route_pb2.RouteConfiguration,
    ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
}
REVIEWS = "outbound|9080||reviews"
RATINGS = "outbound|9080||ratings"
GREETER = "outbound|50051||greeter"
OUTBOUND_CLUSTERS = {REVIEWS, RATINGS, GREETER}
INBOUND = "inbound|15006||productpage"
SIDECAR = {"SERVICE": "productpage", "APP_ADDRESS": "127.0.0.1:9080"}
WAIT = 5.0

VARIANTS = pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])


def registry(reviews: Iterable[str] = ("10.0.0.1",), ratings: bool = True) -> RegistrySnapshot:
    services = [
        Service("reviews", (ServicePort(9080),)),
        Service("greeter", (ServicePort(50051, "grpc", "GRPC"),)),
    ]
    instances = [Instance("reviews", 9080, address, 9080) for address in reviews]
    instances.append(Instance("greeter", 50051, "10.0.2.1", 50051))
    if ratings:
        services.append(Service("ratings", (ServicePort(9080),)))
        instances.append(Instance("ratings", 9080, "10.0.1.1", 9080))
    return RegistrySnapshot(tuple(services), tuple(instances))


def node(node_id: str, **metadata: Any) -> base_pb2.Node:
    struct = struct_pb2.Struct()
    struct.update(metadata)
    return base_pb2.Node(id=node_id, metadata=struct)


def contents(response: Any) -> dict[str, Any]:
    """The resources of a SotW or delta response, unpacked, by the name they carry."""
    found = {}
    for resource in response.resources:
        delta = isinstance(resource, discovery_pb2.Resource)
        message = MESSAGES[response.type_url]()
        assert (resource.resource if delta else resource).Unpack(message)
        name = message.cluster_name if response.type_url == ENDPOINT else message.name
        assert not delta or resource.name == name
        assert name not in found, "no name twice in a response"
        found[name] = message
    return found


def names(response: Any) -> set[str]:
    return set(contents(response))


def endpoint_addresses(response: Any, cluster: str) -> list[str]:
    return sorted(
        lb.endpoint.address.socket_address.address
        for group in contents(response)[cluster].endpoints
        for lb in group.lb_endpoints
    )


class Pilot:
    """The ADS service on a loopback port, and what its hooks were called with."""

    def __init__(self, snapshot: RegistrySnapshot) -> None:
        self.translator = Translator()
        self.mesh = Mesh(self.translator.translate(snapshot, RuleSet()))
        self.connected: list[NodeInfo] = []
        self.disconnected: list[NodeInfo] = []
        self.stub: Any = None

    def publish(self, snapshot: RegistrySnapshot) -> None:
        self.mesh.publish(self.translator.translate(snapshot, RuleSet()))

    def stream(self, delta: bool) -> Stream:
        return Stream(self, delta)

    async def until(self, check: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not check():
                await asyncio.sleep(0.01)


@asynccontextmanager
async def running(snapshot: RegistrySnapshot) -> AsyncIterator[Pilot]:
    pilot = Pilot(snapshot)
    server = grpc.aio.server()
    service = AggregatedDiscovery(pilot.mesh, pilot.connected.append, pilot.disconnected.append)
    add_to_server(server, service)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    pilot.stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
    try:
        yield pilot
    finally:
        await channel.close()
        await server.stop(None)


def scenario(
    test: Callable[[Pilot], Awaitable[None]], snapshot: RegistrySnapshot | None = None
) -> None:
    """Run ``test`` against a fresh server in a fresh event loop."""

    async def main() -> None:
        async with running(snapshot or registry()) as pilot:
            await asyncio.wait_for(test(pilot), 15)

    asyncio.run(main())


class Stream:
    """One ADS stream driven by hand. ``send`` writes a request (SotW fields, or delta fields
    when the stream is delta), ``recv`` returns the next response, ``drain`` what the server
    sent before answering a barrier request."""

    def __init__(self, pilot: Pilot, delta: bool) -> None:
        self.delta = delta
        method = (
            pilot.stub.DeltaAggregatedResources if delta else pilot.stub.StreamAggregatedResources
        )
        self.call = method()
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())
        self.nonces: list[str] = []
        self.barriers = 0
        self.barrier_nonce = ""

    async def _read(self) -> None:
        try:
            while (response := await self.call.read()) is not grpc.aio.EOF:
                self.inbox.put_nowait(response)
            self.inbox.put_nowait(grpc.aio.EOF)
        except grpc.aio.AioRpcError as exc:
            self.inbox.put_nowait(exc)

    async def send(
        self,
        type_url: str,
        names: Iterable[str] = (),
        *,
        node: base_pb2.Node | None = None,
        nonce: str = "",
        version: str = "",
        error: str = "",
        unsubscribe: Iterable[str] = (),
        initial: dict[str, str] | None = None,
    ) -> None:
        fields: dict[str, Any] = {"type_url": type_url, "response_nonce": nonce}
        if node is not None:
            fields["node"] = node
        if error:
            fields["error_detail"] = status_pb2.Status(code=3, message=error)
        if self.delta:
            request: Any = discovery_pb2.DeltaDiscoveryRequest(
                resource_names_subscribe=list(names),
                resource_names_unsubscribe=list(unsubscribe),
                initial_resource_versions=initial or {},
                **fields,
            )
        else:
            request = discovery_pb2.DiscoveryRequest(
                resource_names=list(names), version_info=version, **fields
            )
        await self.call.write(request)

    async def ack(self, response: Any, names: Iterable[str] = ()) -> None:
        """Accept ``response``: SotW repeats the subscription, delta sends only the nonce."""
        version = "" if self.delta else response.version_info
        names = () if self.delta else names
        await self.send(response.type_url, names, nonce=response.nonce, version=version)

    async def recv(self) -> Any:
        item = await asyncio.wait_for(self.inbox.get(), WAIT)
        assert item is not grpc.aio.EOF and not isinstance(item, grpc.aio.AioRpcError), item
        assert item.nonce and item.nonce not in self.nonces, "every response has a new nonce"
        self.nonces.append(item.nonce)
        return item

    async def drain(self) -> list[Any]:
        """Everything the server sends before answering a fresh barrier subscription."""
        self.barriers += 1
        name = f"barrier-{self.barriers}"
        if self.delta:
            await self.send(BARRIER, [name])
        else:
            await self.send(BARRIER, [name], nonce=self.barrier_nonce)
        responses = []
        while (response := await self.recv()).type_url != BARRIER:
            responses.append(response)
        self.barrier_nonce = response.nonce
        return responses

    async def outcome(self) -> Any:
        """How the RPC ended: ``grpc.aio.EOF`` or the error."""
        while True:
            item = await asyncio.wait_for(self.inbox.get(), WAIT)
            if isinstance(item, grpc.aio.AioRpcError) or item is grpc.aio.EOF:
                return item

    async def close(self) -> None:
        await self.call.done_writing()
        assert await self.outcome() is grpc.aio.EOF

    async def subscribe_all(self, sidecar: base_pb2.Node) -> dict[str, Any]:
        """Envoy's start: wildcard CDS, then EDS for every cluster, wildcard LDS, RDS
        ``outbound``; every response ACKed. Returns the last response of each type."""
        last: dict[str, Any] = {}
        await self.send(CLUSTER, node=sidecar)
        last[CLUSTER] = await self.recv()
        await self.ack(last[CLUSTER])
        await self.send(ENDPOINT, sorted(OUTBOUND_CLUSTERS))
        last[ENDPOINT] = await self.recv()
        await self.ack(last[ENDPOINT], sorted(OUTBOUND_CLUSTERS))
        await self.send(LISTENER)
        last[LISTENER] = await self.recv()
        await self.ack(last[LISTENER])
        await self.send(ROUTE, ["outbound"])
        last[ROUTE] = await self.recv()
        await self.ack(last[ROUTE], ["outbound"])
        assert await self.drain() == []
        return last


def by_type(responses: list[Any]) -> dict[str, Any]:
    found = {r.type_url: r for r in responses}
    assert len(found) == len(responses), "one response per type"
    return found


def removed(response: Any) -> set[str]:
    return set(response.removed_resources)


# --- what a client gets ------------------------------------------------------------------------


@VARIANTS
def test_wildcard_cds_and_lds_follow_the_node_of_the_first_request(delta: bool) -> None:
    async def test(pilot: Pilot) -> None:
        sidecar = pilot.stream(delta)
        await sidecar.send(CLUSTER, node=node("productpage-1", **SIDECAR))
        clusters = await sidecar.recv()
        assert names(clusters) == OUTBOUND_CLUSTERS | {INBOUND}
        inbound = contents(clusters)[INBOUND]
        app = inbound.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
        assert (app.socket_address.address, app.socket_address.port_value) == ("127.0.0.1", 9080)
        await sidecar.send(LISTENER)  # no node: only the first request carries it
        listeners = await sidecar.recv()
        assert names(listeners) == {"outbound", "inbound"}

        plain = pilot.stream(delta)
        await plain.send(CLUSTER, node=node("client-1"))
        assert names(await plain.recv()) == OUTBOUND_CLUSTERS
        await plain.send(LISTENER)
        assert names(await plain.recv()) == {"outbound"}
        assert [n.id for n in pilot.connected] == ["productpage-1", "client-1"]

    scenario(test)


def test_two_nodes_get_their_own_listeners() -> None:
    async def test(pilot: Pilot) -> None:
        first, second = pilot.stream(False), pilot.stream(False)
        await first.send(
            LISTENER,
            node=node("productpage-1", **SIDECAR, INBOUND_ADDRESS="127.0.0.1:16006"),
        )
        await second.send(
            LISTENER,
            node=node(
                "reviews-1",
                SERVICE="reviews:9080",
                APP_ADDRESS="127.0.0.1:9081",
                OUTBOUND_ADDRESS="127.0.0.1:16001",
                LABELS={"version": "v1"},
            ),
        )

        def addresses(response: Any) -> dict[str, int]:
            listeners = contents(response).items()
            return {name: item.address.socket_address.port_value for name, item in listeners}

        assert addresses(await first.recv()) == {"outbound": 15001, "inbound": 16006}
        assert addresses(await second.recv()) == {"outbound": 16001, "inbound": 15006}
        await first.send(CLUSTER)
        await second.send(CLUSTER)
        assert names(await first.recv()) == OUTBOUND_CLUSTERS | {"inbound|16006||productpage"}
        assert names(await second.recv()) == OUTBOUND_CLUSTERS | {"inbound|15006||reviews"}
        reviews = next(n for n in pilot.connected if n.id == "reviews-1")
        assert (reviews.service, reviews.service_port) == ("reviews", 9080)
        assert reviews.labels == (("version", "v1"),)

    scenario(test)


@VARIANTS
def test_named_subscriptions_grpc_style(delta: bool) -> None:
    async def test(pilot: Pilot) -> None:
        client = pilot.stream(delta)
        wanted = ["greeter:50051", "greeter", "nosuch:80"]
        await client.send(LISTENER, wanted, node=node("grpc-client"))
        listeners = await client.recv()
        assert names(listeners) == {"greeter:50051", "greeter"}
        assert all(item.HasField("api_listener") for item in contents(listeners).values())
        if delta:
            assert removed(listeners) == {"nosuch:80"}, "delta says the name does not exist"
        await client.ack(listeners, wanted)

        await client.send(ROUTE, ["greeter:50051", "outbound"])
        routes = await client.recv()
        assert names(routes) == {"greeter:50051", "outbound"}
        await client.ack(routes, ["greeter:50051", "outbound"])

        await client.send(CLUSTER, [GREETER])
        assert names(await client.recv()) == {GREETER}
        await client.send(ENDPOINT, [GREETER, REVIEWS])
        endpoints = await client.recv()
        assert names(endpoints) == {GREETER, REVIEWS}
        assert endpoint_addresses(endpoints, GREETER) == ["10.0.2.1"]
        assert pilot.connected[0].id == "grpc-client"

    scenario(test)


def test_sotw_subscription_change_sends_the_added_names() -> None:
    """EDS is not full state: a newly asked name brings that resource (even if the client
    had it before), the names it already has are not sent again."""

    async def test(pilot: Pilot) -> None:
        client = pilot.stream(False)
        await client.send(ENDPOINT, [REVIEWS, RATINGS], node=node("grpc-client"))
        first = await client.recv()
        await client.ack(first, [REVIEWS, RATINGS])
        await client.send(ENDPOINT, [REVIEWS], nonce=first.nonce, version=first.version_info)
        dropped = await client.recv()
        assert names(dropped) == set()
        await client.send(ENDPOINT, [REVIEWS, RATINGS, GREETER], nonce=dropped.nonce, version="1")
        assert names(await client.recv()) == {RATINGS, GREETER}

    scenario(test)


def test_sotw_nack_that_changes_the_subscription_is_answered() -> None:
    """Envoy sends its current names with every ACK or NACK; a new name in a NACK would
    otherwise wait for an unrelated change. The rejected resource is not sent again."""

    async def test(pilot: Pilot) -> None:
        client = pilot.stream(False)
        await client.send(ENDPOINT, [REVIEWS], node=node("grpc-client"))
        first = await client.recv()
        await client.send(ENDPOINT, [REVIEWS, GREETER], nonce=first.nonce, error="bad")
        assert [names(r) for r in await client.drain()] == [{GREETER}]
        assert pilot.mesh.nacks == 1

    scenario(test)


@VARIANTS
def test_a_missing_resource_is_sent_once_it_appears(delta: bool) -> None:
    async def test(pilot: Pilot) -> None:
        client = pilot.stream(delta)
        await client.send(LISTENER, ["ratings:9080"], node=node("grpc-client"))
        answer = await client.recv()
        assert names(answer) == set()
        if delta:
            assert removed(answer) == {"ratings:9080"}
        await client.ack(answer, ["ratings:9080"])
        pilot.publish(registry())
        assert [names(r) for r in await client.drain()] == [{"ratings:9080"}]

    scenario(test, registry(ratings=False))


# --- versions, nonces, ACK and NACK ------------------------------------------------------------


@VARIANTS
def test_ack_gets_no_response(delta: bool) -> None:
    async def test(pilot: Pilot) -> None:
        sidecar = pilot.stream(delta)
        last = await sidecar.subscribe_all(node("productpage-1", **SIDECAR))  # ACKs inside
        assert last[CLUSTER].nonce != last[LISTENER].nonce
        if not delta:
            assert last[CLUSTER].version_info == str(pilot.mesh.version)
        await sidecar.ack(last[ROUTE], ["outbound"])  # a repeated ACK
        assert await sidecar.drain() == []

    scenario(test)


def test_sotw_request_with_a_stale_nonce_is_ignored() -> None:
    async def test(pilot: Pilot) -> None:
        client = pilot.stream(False)
        await client.send(ENDPOINT, [REVIEWS], node=node("grpc-client"))
        first = await client.recv()
        await client.ack(first, [REVIEWS])
        pilot.publish(registry(reviews=["10.0.0.1", "10.0.0.9"]))
        (pushed,) = await client.drain()
        assert names(pushed) == {REVIEWS}
        # Answers the first response, which the push superseded: ignored, names and all.
        await client.send(ENDPOINT, [REVIEWS, RATINGS], nonce=first.nonce, version="1")
        assert await client.drain() == []
        pilot.publish(registry(reviews=["10.0.0.1"]))
        (again,) = await client.drain()
        assert names(again) == {REVIEWS}, "the stale subscription did not take"

    scenario(test)


def test_delta_subscription_change_with_a_stale_nonce_is_honoured() -> None:
    """Delta requests carry subscription deltas; dropping one would lose it for good."""

    async def test(pilot: Pilot) -> None:
        client = pilot.stream(True)
        await client.send(ENDPOINT, [REVIEWS], node=node("grpc-client"))
        first = await client.recv()
        await client.ack(first)
        pilot.publish(registry(reviews=["10.0.0.1", "10.0.0.9"]))
        (pushed,) = await client.drain()
        assert names(pushed) == {REVIEWS}
        await client.send(ENDPOINT, [RATINGS], nonce=first.nonce)  # stale ACK + subscribe
        (answer,) = await client.drain()
        assert names(answer) == {RATINGS}
        await client.send(ENDPOINT, nonce=first.nonce)  # stale ACK alone
        assert await client.drain() == []

    scenario(test)


@VARIANTS
def test_nack_is_logged_counted_and_not_answered(
    delta: bool, caplog: pytest.LogCaptureFixture
) -> None:
    async def test(pilot: Pilot) -> None:
        sidecar = pilot.stream(delta)
        await sidecar.send(CLUSTER, node=node("productpage-1", **SIDECAR))
        clusters = await sidecar.recv()
        await sidecar.send(
            CLUSTER, nonce=clusters.nonce, error="cluster inbound: connect_timeout too short"
        )
        assert await sidecar.drain() == []
        assert pilot.mesh.nacks == 1
        (status,) = [s.status() for s in pilot.mesh.sessions]
        assert status["rejected"] == {"Cluster": "cluster inbound: connect_timeout too short"}
        assert not status["in_sync"]
        # The next snapshot still reaches the client; taking it clears the refusal.
        pilot.publish(registry(ratings=False))
        (pushed,) = await sidecar.drain()
        await sidecar.ack(pushed)
        await sidecar.drain()
        (status,) = [s.status() for s in pilot.mesh.sessions]
        assert status["rejected"] == {}
        assert status["in_sync"]
        assert pushed.type_url == CLUSTER
        if delta:
            assert removed(pushed) == {RATINGS}
        else:
            assert names(pushed) == {REVIEWS, GREETER, INBOUND}

    with caplog.at_level(logging.WARNING, logger="shoal.pilot.xds"):
        scenario(test)
    (record,) = [r for r in caplog.records if "NACK" in r.getMessage()]
    assert "productpage-1" in record.getMessage()
    assert "connect_timeout too short" in record.getMessage()
    assert "Cluster" in record.getMessage()


# --- pushes ------------------------------------------------------------------------------------


@VARIANTS
def test_endpoint_change_pushes_only_the_changed_assignment(delta: bool) -> None:
    async def test(pilot: Pilot) -> None:
        sidecar = pilot.stream(delta)
        await sidecar.subscribe_all(node("productpage-1", **SIDECAR))
        pilot.publish(registry(reviews=["10.0.0.1", "10.0.0.2"]))
        (pushed,) = await sidecar.drain()
        assert pushed.type_url == ENDPOINT
        assert (pushed.system_version_info if delta else pushed.version_info) == "2"
        assert names(pushed) == {REVIEWS}
        assert endpoint_addresses(pushed, REVIEWS) == ["10.0.0.1", "10.0.0.2"]
        await sidecar.ack(pushed, sorted(OUTBOUND_CLUSTERS))
        pilot.publish(registry(reviews=["10.0.0.1", "10.0.0.2"]))  # same content
        assert await sidecar.drain() == []

    scenario(test)


@VARIANTS
def test_cluster_removal(delta: bool) -> None:
    async def test(pilot: Pilot) -> None:
        sidecar = pilot.stream(delta)
        await sidecar.subscribe_all(node("productpage-1", **SIDECAR))
        pilot.publish(registry(ratings=False))
        pushed = by_type(await sidecar.drain())
        assert set(pushed) == ({CLUSTER, ENDPOINT, ROUTE} if delta else {CLUSTER, ROUTE})
        if delta:
            assert names(pushed[CLUSTER]) == set()
            assert removed(pushed[CLUSTER]) == {RATINGS}
            assert names(pushed[ENDPOINT]) == set()
            assert removed(pushed[ENDPOINT]) == {RATINGS}
        else:
            assert names(pushed[CLUSTER]) == {REVIEWS, GREETER, INBOUND}
        routes = contents(pushed[ROUTE])["outbound"]
        assert {v.name for v in routes.virtual_hosts} == {"reviews:9080", "greeter:50051"}

    scenario(test)


def test_delta_initial_resource_versions_are_not_resent() -> None:
    async def test(pilot: Pilot) -> None:
        first = pilot.stream(True)
        sidecar = node("productpage-1", **SIDECAR)
        await first.send(CLUSTER, node=sidecar)
        clusters = {r.name: r.version for r in (await first.recv()).resources}
        await first.send(ENDPOINT, sorted(OUTBOUND_CLUSTERS))
        endpoints = {r.name: r.version for r in (await first.recv()).resources}
        await first.close()

        pilot.publish(registry(reviews=["10.0.0.1", "10.0.0.2"], ratings=False))
        second = pilot.stream(True)
        await second.send(CLUSTER, node=sidecar, initial={**clusters, "outbound|1||gone": "x"})
        resync = await second.recv()
        assert names(resync) == set()
        assert removed(resync) == {RATINGS, "outbound|1||gone"}
        await second.send(ENDPOINT, sorted(OUTBOUND_CLUSTERS), initial=endpoints)
        resync = await second.recv()
        assert names(resync) == {REVIEWS}
        assert removed(resync) == {RATINGS}

    scenario(test)


# --- reconnects --------------------------------------------------------------------------------


@pytest.mark.parametrize("old_nonce", [False, True], ids=["fresh", "previous-stream-nonce"])
def test_sotw_reconnect_gets_the_full_current_state(old_nonce: bool) -> None:
    """A new stream knows nothing of the old one: its first requests are answered in full,
    even when they name the old stream's version or (as some clients do) its nonce."""

    async def test(pilot: Pilot) -> None:
        sidecar = node("productpage-1", **SIDECAR)
        first = pilot.stream(False)
        last = await first.subscribe_all(sidecar)
        await first.close()
        pilot.publish(registry(reviews=["10.0.0.1", "10.0.0.2"]))

        second = pilot.stream(False)
        expected = {
            CLUSTER: ([], OUTBOUND_CLUSTERS | {INBOUND}),
            ENDPOINT: (sorted(OUTBOUND_CLUSTERS), OUTBOUND_CLUSTERS),
            LISTENER: ([], {"outbound", "inbound"}),
            ROUTE: (["outbound"], {"outbound"}),
        }
        for type_url, (wanted, found) in expected.items():
            await second.send(
                type_url,
                wanted,
                node=sidecar if type_url == CLUSTER else None,
                version=last[type_url].version_info,
                nonce=last[type_url].nonce if old_nonce else "",
            )
            response = await second.recv()
            assert names(response) == found
            if type_url == ENDPOINT:
                assert endpoint_addresses(response, REVIEWS) == ["10.0.0.1", "10.0.0.2"]
        assert pilot.mesh.version == 2

    scenario(test)


def test_delta_reconnect_without_initial_versions_gets_everything() -> None:
    async def test(pilot: Pilot) -> None:
        sidecar = node("productpage-1", **SIDECAR)
        first = pilot.stream(True)
        await first.subscribe_all(sidecar)
        first.call.cancel()
        pilot.publish(registry(ratings=False))
        second = pilot.stream(True)
        await second.send(CLUSTER, node=sidecar)
        resync = await second.recv()
        assert names(resync) == {REVIEWS, GREETER, INBOUND}
        assert removed(resync) == set()

    scenario(test)


# --- delta subscriptions -----------------------------------------------------------------------


def test_delta_subscribing_again_resends() -> None:
    """The client may have dropped a resource it still seems subscribed to."""

    async def test(pilot: Pilot) -> None:
        client = pilot.stream(True)
        await client.send(CLUSTER, [GREETER], node=node("grpc-client"))
        first = await client.recv()
        assert names(first) == {GREETER}
        await client.ack(first)
        await client.send(CLUSTER, [GREETER])
        assert [names(r) for r in await client.drain()] == [{GREETER}]

    scenario(test)


def test_delta_wildcard_subscribed_to_later_and_dropped() -> None:
    async def test(pilot: Pilot) -> None:
        client = pilot.stream(True)
        await client.send(CLUSTER, [GREETER], node=node("grpc-client"))
        await client.ack(await client.recv())
        await client.send(CLUSTER, ["*"])
        (everything,) = await client.drain()
        assert names(everything) == OUTBOUND_CLUSTERS
        # Dropping a name the wildcard also covers: the client must learn that it stays.
        await client.send(CLUSTER, unsubscribe=[GREETER], nonce=everything.nonce)
        assert [names(r) for r in await client.drain()] == [{GREETER}]
        # Dropping the wildcard needs no answer.
        await client.send(CLUSTER, unsubscribe=["*"])
        assert await client.drain() == []

    scenario(test)


# --- node metadata and stream lifecycle --------------------------------------------------------


@VARIANTS
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("APP_ADDRESS", "nonsense"),
        ("INBOUND_ADDRESS", "127.0.0.1:70000"),
        ("SERVICE", "reviews:http"),
        ("LABELS", "version=v1"),
    ],
)
def test_invalid_node_metadata_aborts_the_stream(delta: bool, key: str, value: str) -> None:
    async def test(pilot: Pilot) -> None:
        stream = pilot.stream(delta)
        metadata = {**SIDECAR, key: value}
        await stream.send(CLUSTER, node=node("productpage-1", **metadata))
        error = await stream.outcome()
        assert isinstance(error, grpc.aio.AioRpcError)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"node.metadata.{key}" in (error.details() or "")
        assert pilot.connected == [] and pilot.disconnected == []
        await pilot.until(lambda: not pilot.mesh.sessions)

    scenario(test)


@VARIANTS
def test_connected_and_disconnected_fire_once_per_stream(delta: bool) -> None:
    async def test(pilot: Pilot) -> None:
        sidecar = node("productpage-1", **SIDECAR)
        closed, cancelled = pilot.stream(delta), pilot.stream(delta)
        await closed.subscribe_all(sidecar)
        await cancelled.subscribe_all(sidecar)
        info = pilot.connected[0]
        assert info.id == "productpage-1" and info.has_inbound
        assert pilot.connected == [info, info]
        assert pilot.disconnected == []

        await closed.close()  # the client ends its side: the server ends the stream
        await pilot.until(lambda: len(pilot.disconnected) == 1)
        cancelled.call.cancel()
        await pilot.until(lambda: len(pilot.disconnected) == 2)
        await pilot.until(lambda: not pilot.mesh.sessions)
        assert pilot.disconnected == [info, info]
        assert pilot.connected == [info, info]

    scenario(test)
