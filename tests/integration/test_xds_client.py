"""The proxy's ADS client against a scripted management server: it warms an EDS cluster
before the listener that uses it goes live, NACKs what it cannot apply (naming the field)
while the last good config keeps serving, and ACKs with the version it applied."""

from __future__ import annotations

import contextlib
import http.client
import queue
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, json_format
from tests.conftest import Echo, Proxy, free_port
from tests.integration.mesh_helpers import eventually

from shoal.pilot.bootstrap import sidecar_bootstrap
from shoal.xds import CLUSTER, ENDPOINT, LISTENER

pytestmark = pytest.mark.slow

HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
# ParseDict finds the typed_config messages by name: their modules must be loaded.
TYPED_CONFIGS = (http_connection_manager_pb2, router_pb2)


class ScriptedServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """Records every request; sends what the test puts in ``responses``."""

    def __init__(self) -> None:
        self.requests: queue.Queue[Any] = queue.Queue()
        self.responses: queue.Queue[Any] = queue.Queue()
        self.pending: dict[str, list[Any]] = {}

    def StreamAggregatedResources(self, requests: Iterator[Any], context: Any) -> Iterator[Any]:
        def read() -> None:
            with contextlib.suppress(grpc.RpcError):
                for request in requests:
                    self.requests.put(request)

        threading.Thread(target=read, daemon=True).start()
        while context.is_active():
            with contextlib.suppress(queue.Empty):
                yield self.responses.get(timeout=0.05)

    def next_request(self, type_url: str, timeout: float = 10.0) -> Any:
        """The next request for ``type_url`` (others wait for their turn)."""
        waiting = self.pending.setdefault(type_url, [])
        while not waiting:
            request = self.requests.get(timeout=timeout)
            self.pending.setdefault(request.type_url, []).append(request)
        return waiting.pop(0)

    def send(self, type_url: str, version: str, nonce: str, *messages: Any) -> None:
        resources = []
        for message in messages:
            packed = any_pb2.Any()
            packed.Pack(message)
            resources.append(packed)
        self.responses.put(
            discovery_pb2.DiscoveryResponse(
                version_info=version, type_url=type_url, nonce=nonce, resources=resources
            )
        )


class NotWaitingProxy(Proxy):
    """The proxy is not ready until its first xDS config: the test decides when."""

    def wait_ready(self, timeout: float = 15.0) -> None:
        return


@pytest.fixture
def server() -> Iterator[tuple[ScriptedServer, int]]:
    scripted = ScriptedServer()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(scripted, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield scripted, port
    grpc_server.stop(0)


def eds_cluster(name: str, **extra: Any) -> Any:
    return json_format.ParseDict(
        {
            "name": name,
            "type": "EDS",
            "eds_cluster_config": {"eds_config": {"ads": {}}, "service_name": name},
            **extra,
        },
        cluster_pb2.Cluster(),
    )


def assignment(name: str, port: int) -> Any:
    address = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    return json_format.ParseDict(
        {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
        endpoint_pb2.ClusterLoadAssignment(),
    )


def listener(port: int, cluster: str) -> Any:
    manager = {
        "@type": HCM,
        "stat_prefix": "app",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}],
                }
            ]
        },
        "http_filters": [{"name": "router", "typed_config": {"@type": ROUTER}}],
    }
    return json_format.ParseDict(
        {
            "name": "app",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "hcm", "typed_config": manager}]}],
        },
        listener_pb2.Listener(),
    )


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def served(port: int) -> tuple[int, str]:
    """Status and the upstream that answered one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("x-served-by", "")
    finally:
        conn.close()


def test_warming_nack_and_ack(server: tuple[ScriptedServer, int], tmp_path: Path) -> None:
    scripted, port = server
    echo = Echo("app")
    config = sidecar_bootstrap(
        "node-1", pilot=("127.0.0.1", port), admin=("127.0.0.1", free_port())
    )
    for source in ("lds_config", "cds_config"):
        config["dynamic_resources"][source]["initial_fetch_timeout"] = "3s"
    workdir = tmp_path / "proxy"
    workdir.mkdir()
    proxy = NotWaitingProxy(config, workdir)
    try:
        first = scripted.next_request(CLUSTER)
        assert first.node.id == "node-1"
        assert first.node.user_agent_name == "shoal"
        scripted.send(CLUSTER, "c1", "n1", eds_cluster("app"))
        ack = scripted.next_request(CLUSTER)
        assert (ack.version_info, ack.response_nonce) == ("c1", "n1")
        assert not ack.HasField("error_detail")
        eds = scripted.next_request(ENDPOINT)
        assert list(eds.resource_names) == ["app"]

        # the listener arrives before the cluster's endpoints: it waits (warming)
        listener_port = free_port()
        scripted.next_request(LISTENER)
        scripted.send(LISTENER, "l1", "n2", listener(listener_port, "app"))
        assert scripted.next_request(LISTENER).response_nonce == "n2"
        with pytest.raises(TimeoutError):
            eventually(lambda: listening(listener_port), timeout=1.0)
        assert proxy.admin("/ready")[0] == 503

        scripted.send(ENDPOINT, "e1", "n3", assignment("app", echo.port))
        eventually(lambda: listening(listener_port))
        assert served(listener_port) == (200, "app")
        eventually(lambda: proxy.admin("/ready")[0] == 200)
        time.sleep(3.5)  # past the fetch timeout: warm in time, so no late warning
        assert "still without endpoints" not in proxy.output()

        # a cluster shoal cannot honour: NACK naming the field; the old config keeps serving
        bad = eds_cluster("app", transport_socket={"name": "tls"})
        scripted.send(CLUSTER, "c2", "n4", bad)
        nack = scripted.next_request(CLUSTER)
        assert nack.response_nonce == "n4"
        assert nack.version_info == "c1"  # the last version applied
        assert "transport_socket" in nack.error_detail.message
        assert served(listener_port) == (200, "app")

        # EDS changes apply in place
        other = Echo("other")
        try:
            scripted.send(ENDPOINT, "e2", "n5", assignment("app", other.port))
            eventually(lambda: served(listener_port) == (200, "other"))
        finally:
            other.stop()
    finally:
        proxy.stop()
        echo.stop()
