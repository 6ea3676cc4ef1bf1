"""gRPC telemetry and retries through HTTP/2 listeners, with real grpcio clients and servers:
Istio's standard metrics from two chained sidecars (source and destination reporters, peer
exchange over HTTP/2), Envoy's per-method ``cluster.<name>.grpc.<service>.<method>.*``
stats, and ``retry_on`` with gRPC conditions."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from tests.conftest import bootstrap, free_port, http_listener, route_to, static_cluster
from tests.integration.ratelimit_helpers import HTTP2_OPTIONS
from tests.integration.test_h2_proxy import SERVICE, call, h2_cluster
from tests.integration.test_telemetry import istio_stats, node

from shoal.proxy.h2 import GrpcFrames

REVIEWS_HOST = "reviews.shop.svc.cluster.local"


class Server:
    """A grpcio server: Unary, Missing (NOT_FOUND), Count (server streaming), Echo (bidi)
    and Flaky (UNAVAILABLE for its first ``failures`` calls, then OK)."""

    def __init__(self, failures: int = 0) -> None:
        self.port = free_port()
        self.failures = failures
        self.calls = 0
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(lambda r, c: b"hello " + r),
            "Missing": grpc.unary_unary_rpc_method_handler(self._missing),
            "Count": grpc.unary_stream_rpc_method_handler(self._count),
            "Echo": grpc.stream_stream_rpc_method_handler(self._echo),
            "Flaky": grpc.unary_unary_rpc_method_handler(self._flaky),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    @staticmethod
    def _missing(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    @staticmethod
    def _count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request)):
            yield b"%d" % i

    @staticmethod
    def _echo(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for request in requests:
            yield request.upper()

    def _flaky(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.calls += 1
            fail = self.calls <= self.failures
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return b"ok " + request

    def stop(self) -> None:
        self.server.stop(0)


@pytest.fixture
def server() -> Iterator[Server]:
    running = Server(failures=1)
    yield running
    running.stop()


def sidecar(
    port: int, target: int, reporter: str, direction: str, workload: dict[str, Any]
) -> dict[str, Any]:
    """An HTTP/2 sidecar listener with the istio_stats filter, to cluster ``backend``."""
    vhost = {"name": "all", "domains": ["*"], "routes": [route_to("backend")]}
    listener = http_listener(port, [vhost], name=direction.lower(), codec_type="HTTP2")
    listener["traffic_direction"] = direction
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    manager["http_filters"] = [istio_stats(reporter), *manager["http_filters"]]
    config = bootstrap([listener], [h2_cluster("backend", target)], free_port())
    config["node"] = workload
    return config


def series(text: str, metric: str, **labels: str) -> list[float]:
    """The values of ``metric`` series whose labels include ``labels``."""
    out = []
    for line in text.splitlines():
        match = re.match(rf"{metric}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match[1] for k, v in labels.items()):
            out.append(float(match[2]))
    return out


def test_istio_metrics_for_grpc_through_two_sidecars(make_proxy: Any, server: Server) -> None:
    inbound_port, outbound_port = free_port(), free_port()
    reviews = node("reviews-v2", "reviews", "v2", SERVICE=f"{REVIEWS_HOST}:9080")
    inbound = make_proxy(sidecar(inbound_port, server.port, "destination", "INBOUND", reviews))
    productpage = node("productpage-v1", "productpage", "v1")
    outbound = make_proxy(sidecar(outbound_port, inbound_port, "source", "OUTBOUND", productpage))
    with grpc.insecure_channel(f"127.0.0.1:{outbound_port}") as channel:
        for _ in range(3):
            assert call(channel, "Unary")(b"you", timeout=5) == b"hello you"
        with pytest.raises(grpc.RpcError) as missing:
            call(channel, "Missing")(b"x", timeout=5)
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND
        assert list(call(channel, "Count", "unary_stream")(b"3", timeout=5)) == [b"0", b"1", b"2"]
        echoed = call(channel, "Echo", "stream_stream")(iter([b"a", b"b", b"c", b"d"]), timeout=5)
        assert list(echoed) == [b"A", b"B", b"C", b"D"]

    for proxy, reporter in ((outbound, "source"), (inbound, "destination")):
        status, text = proxy.admin("/stats/prometheus")
        assert status == 200
        common = {
            "reporter": reporter,
            "request_protocol": "grpc",
            "response_code": "200",
            "source_workload": "productpage-v1",
            "source_app": "productpage",
            "destination_workload": "reviews-v2",  # outbound: learnt from the peer's answer
            "destination_app": "reviews",
            "destination_version": "v2",
        }
        assert series(text, "istio_requests_total", **common, grpc_response_status="0") == [5]
        assert series(text, "istio_requests_total", **common, grpc_response_status="5") == [1]
        assert series(text, "istio_requests_total", request_protocol="http") == []
        counts = series(text, "istio_request_duration_milliseconds_count", **common)
        assert sum(counts) == 6
    # the peer header never reaches the app or the client
    _, text = inbound.admin("/stats/prometheus")
    assert 'destination_service="reviews.shop.svc.cluster.local"' in text

    # per-method stats, in /stats and with tags in /stats/prometheus
    stats = outbound.stats()
    prefix = f"cluster.backend.grpc.{SERVICE}."
    assert stats[prefix + "Unary.total"] == 3
    assert stats[prefix + "Unary.success"] == 3
    assert stats[prefix + "Unary.failure"] == 0
    assert stats[prefix + "Missing.failure"] == 1
    assert stats[prefix + "Missing.success"] == 0
    assert stats[prefix + "Count.success"] == 1
    assert stats[prefix + "Count.request_message_count"] == 1
    assert stats[prefix + "Count.response_message_count"] == 3
    assert stats[prefix + "Echo.request_message_count"] == 4
    assert stats[prefix + "Echo.response_message_count"] == 4
    assert stats[prefix + "Echo.total"] == 1
    _, text = outbound.admin("/stats/prometheus")
    tags = {
        "envoy_grpc_bridge_method": "Unary",
        "envoy_grpc_bridge_service": SERVICE,
        "envoy_cluster_name": "backend",
    }
    assert series(text, "envoy_cluster_grpc_success", **tags) == [3]
    assert series(text, "envoy_cluster_grpc_total", **tags) == [3]
    assert series(text, "envoy_cluster_grpc_failure", envoy_grpc_bridge_method="Missing") == [1]


def grpc_retry(retry_on: str, num_retries: int = 2) -> dict[str, Any]:
    return {"retry_on": retry_on, "num_retries": num_retries}


def plain_proxy(port: int, target: int, **action: Any) -> dict[str, Any]:
    vhost = {"name": "all", "domains": ["*"], "routes": [route_to("backend", **action)]}
    listener = http_listener(port, [vhost], codec_type="HTTP2")
    return bootstrap([listener], [h2_cluster("backend", target)], free_port())


def test_retry_on_unavailable(make_proxy: Any, server: Server) -> None:
    port = free_port()
    proxy = make_proxy(plain_proxy(port, server.port, retry_policy=grpc_retry("unavailable")))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert call(channel, "Flaky")(b"now", timeout=5) == b"ok now"
        # NOT_FOUND is not retried
        with pytest.raises(grpc.RpcError) as missing:
            call(channel, "Missing")(b"x", timeout=5)
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    assert server.calls == 2
    stats = proxy.stats()
    assert stats["cluster.backend.upstream_rq_retry"] == 1
    assert stats["cluster.backend.upstream_rq_retry_success"] == 1
    assert stats["cluster.backend.upstream_rq_total"] == 3
    assert stats[f"cluster.backend.grpc.{SERVICE}.Flaky.success"] == 1
    assert stats[f"cluster.backend.grpc.{SERVICE}.Flaky.total"] == 1


def test_no_retry_without_the_condition(make_proxy: Any, server: Server) -> None:
    port = free_port()
    # a policy without unavailable, and then none at all: the client sees UNAVAILABLE
    proxy = make_proxy(plain_proxy(port, server.port, retry_policy=grpc_retry("internal")))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as failed:
            call(channel, "Flaky")(b"now", timeout=5)
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        assert failed.value.details() == "try again"  # the server's, relayed
    assert proxy.stats()["cluster.backend.upstream_rq_retry"] == 0
    server.calls = 0
    other = free_port()
    make_proxy(plain_proxy(other, server.port))
    with grpc.insecure_channel(f"127.0.0.1:{other}") as channel:
        with pytest.raises(grpc.RpcError) as failed:
            call(channel, "Flaky")(b"now", timeout=5)
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE


def test_retries_obey_num_retries(make_proxy: Any) -> None:
    flaky = Server(failures=5)
    try:
        port = free_port()
        proxy = make_proxy(plain_proxy(port, flaky.port, retry_policy=grpc_retry("unavailable", 2)))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as failed:
                call(channel, "Flaky")(b"now", timeout=5)
            assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        assert flaky.calls == 3  # the first try and two retries
        stats = proxy.stats()
        assert stats["cluster.backend.upstream_rq_retry"] == 2
        assert stats["cluster.backend.upstream_rq_retry_success"] == 0
    finally:
        flaky.stop()


def test_retry_on_connect_failure_goes_to_another_host(make_proxy: Any, server: Server) -> None:
    port = free_port()
    dead = free_port()
    cluster = static_cluster(
        "backend", dead, server.port, typed_extension_protocol_options=HTTP2_OPTIONS
    )
    cluster["lb_policy"] = "ROUND_ROBIN"
    action = {"retry_policy": grpc_retry("connect-failure", 1)}
    vhost = {"name": "all", "domains": ["*"], "routes": [route_to("backend", **action)]}
    listener = http_listener(port, [vhost], codec_type="HTTP2")
    proxy = make_proxy(bootstrap([listener], [cluster], free_port()))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for _ in range(4):  # whichever host round robin starts with, every call succeeds
            assert call(channel, "Unary")(b"x", timeout=5) == b"hello x"
    stats = proxy.stats()
    assert stats["cluster.backend.upstream_rq_retry"] >= 1
    assert stats["cluster.backend.upstream_cx_connect_fail"] >= 1


def test_grpc_frames_counts_messages_across_chunks() -> None:
    frames = GrpcFrames()
    body = b"".join(b"\x00" + len(m).to_bytes(4, "big") + m for m in (b"abc", b"", b"x" * 70))
    for i in range(len(body)):  # one byte at a time
        frames.feed(body[i : i + 1])
    assert frames.count == 3
    whole = GrpcFrames()
    whole.feed(body)
    assert whole.count == 3
