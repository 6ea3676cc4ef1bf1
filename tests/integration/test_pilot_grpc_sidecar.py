"""gRPC through the sidecars pilot configures: a grpcio client dials its sidecar's outbound
port in h2c (``:authority`` = the service's ``host:port``), the stream crosses the server's
sidecar (inbound, HTTP/2 to the app) to a grpcio server; HTTP/1.1 through the same outbound
port keeps working."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from tests.conftest import Echo, EnvoyProxy, Proxy
from tests.integration.mesh_helpers import (
    PilotProcess,
    eventually,
    outbound_port,
    served_by,
    sidecar_config,
)

pytestmark = pytest.mark.slow

HOST, PORT = "recs", 50051
SERVICE = "shoal.test.Recs"
SERVICE_ENTRY = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "ServiceEntry",
    "metadata": {"name": HOST},
    "spec": {
        "hosts": [HOST],
        "ports": [{"number": PORT, "name": "grpc", "protocol": "GRPC"}],
        "resolution": "STATIC",  # the instances: the sidecars that register
    },
}


class RecsApp:
    """A grpcio server in the test's process: ``Get`` echoes its request with the caller's
    ``:authority`` view; ``List`` streams back as many messages as the request's length."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handlers = {
            "Get": grpc.unary_unary_rpc_method_handler(self._get),
            "List": grpc.unary_stream_rpc_method_handler(self._list),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _record(self, method: str, context: grpc.ServicerContext) -> None:
        metadata = {str(k): str(v) for k, v in context.invocation_metadata()}
        self.calls.append((method, metadata))

    def _get(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._record("Get", context)
        return b"for " + request

    def _list(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._record("List", context)
        for i in range(len(request)):
            yield b"item %d" % i

    def stop(self) -> None:
        self.server.stop(None).wait()


@pytest.fixture
def app() -> Iterator[RecsApp]:
    server = RecsApp()
    yield server
    server.stop()


@pytest.fixture
def web() -> Iterator[Echo]:
    echo = Echo("web")
    yield echo
    echo.stop()


def grpc_service(pilot: PilotProcess) -> str:
    """Where pilot has the gRPC service from ("" while it does not know it)."""
    return next((s["source"] for s in pilot.debug()["services"] if s["host"] == HOST), "")


def counters(proxy: Proxy) -> dict[str, int]:
    """A sidecar's counters and gauges from ``/stats`` (Shoal's and Envoy's text alike)."""
    found = {}
    for line in proxy.admin("/stats")[1].splitlines():
        name, _, value = line.rpartition(": ")
        if value.isdigit():
            found[name] = int(value)
    return found


def channel(port: int) -> grpc.Channel:
    """A plain grpcio channel to the sidecar's outbound port, naming the service."""
    options = [("grpc.default_authority", f"{HOST}:{PORT}")]
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=options)


@pytest.mark.parametrize("kind", [Proxy, EnvoyProxy], ids=["shoal", "envoy"])
def test_grpc_through_both_sidecars_beside_http(
    pilot: PilotProcess, app: RecsApp, web: Echo, make_proxy: Any, kind: type[Proxy]
) -> None:
    pilot.write_rules("recs.yaml", SERVICE_ENTRY)
    pilot.register("web", web.port, service_port=80)
    # the ServiceEntry first: a sidecar registers its service as HTTP when pilot knows no
    # better, and Envoy keeps a changed EDS cluster warming until its endpoints come again
    eventually(lambda: grpc_service(pilot) == "files")
    app_address = f"127.0.0.1:{app.port}"
    server = sidecar_config(pilot, "recs-1", service=f"{HOST}:{PORT}", app_address=app_address)
    server_proxy = make_proxy(server, kind=kind)
    client = sidecar_config(pilot, "frontend-1")
    client_proxy = make_proxy(client, kind=kind)
    port = outbound_port(client)

    with channel(port) as chan:
        get = chan.unary_unary(f"/{SERVICE}/Get")
        listing = chan.unary_stream(f"/{SERVICE}/List")

        def answers() -> bool:
            try:
                return bool(get(b"product 1", timeout=2) == b"for product 1")
            except grpc.RpcError:
                return False

        eventually(answers, timeout=15)
        for product in range(2, 6):
            assert get(b"product %d" % product, timeout=5) == b"for product %d" % product
        assert list(listing(b"abc", timeout=5)) == [b"item 0", b"item 1", b"item 2"]
        assert list(listing(b"x" * 50, timeout=5)) == [b"item %d" % i for i in range(50)]
        # an unknown method is the app's answer, through both sidecars
        with pytest.raises(grpc.RpcError) as missing:
            chan.unary_unary(f"/{SERVICE}/Nope")(b"", timeout=5)
        assert missing.value.code() is grpc.StatusCode.UNIMPLEMENTED

    # the calls reached the app (through the server's sidecar, its :authority kept)
    assert [method for method, _ in app.calls].count("Get") >= 5
    assert "List" in [method for method, _ in app.calls]
    # HTTP/1.1 on the same outbound port still goes to the HTTP service
    assert served_by(port, "web", 3) == {"web": 3}

    # the streams crossed both sidecars: the client's outbound cluster for recs, the
    # server's inbound cluster (HTTP/2 to the app)
    inbound_port = server["node"]["metadata"]["INBOUND_ADDRESS"].rpartition(":")[2]
    client_stats, server_stats = counters(client_proxy), counters(server_proxy)
    outbound_cluster = f"cluster.outbound|{PORT}||{HOST}.upstream_rq_total"
    inbound_cluster = f"cluster.inbound|{inbound_port}||{HOST}.upstream_rq_total"
    assert client_stats.get(outbound_cluster, 0) >= 8, client_stats
    assert server_stats.get(inbound_cluster, 0) >= 8, server_stats
    if kind is Proxy:  # Shoal names its HTTP/2 sessions' stats as Envoy does
        assert client_stats.get("http.outbound.downstream_rq_total", 0) >= 11
