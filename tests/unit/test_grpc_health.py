"""gRPC active health checking (``grpc_health_check``): the encoding of
``grpc.health.v1`` messages, then the checker against a real grpcio server in this process
(and a raw socket that records what goes on the wire).

Expectations follow Envoy's gRPC health checker: only OK with SERVING passes, any other
answer (NOT_SERVING, SERVICE_UNKNOWN, an error status) fails the host at once, timeouts
and lost connections are network failures that count toward the threshold.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from tests.integration.grpc_apps.health import (
    NOT_SERVING,
    SERVICE_UNKNOWN,
    SERVING,
    UNKNOWN,
    HealthServer,
)
from tests.unit.test_health import FakeCluster, http_check, run, until

from shoal.config.model import GrpcHealthCheck, HeaderValueOption, HealthCheck
from shoal.upstream.health import HealthChecker, _grpc_request, _grpc_serving

SERVICE = "shoal.test.Echo"


def grpc_check(**fields: Any) -> HealthCheck:
    """A gRPC check of SERVICE (``grpc`` gives GrpcHealthCheck's fields), other fields
    as in test_health's ``http_check``."""
    checker = GrpcHealthCheck(**fields.pop("grpc", {"service_name": SERVICE}))
    return http_check(checker=checker, **fields)


# --- the messages ------------------------------------------------------------------------------


def health_messages() -> tuple[Any, Any]:
    """grpc.health.v1's HealthCheckRequest and HealthCheckResponse, built from their
    definition (health.proto) in a pool of their own."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="grpc/health/v1/health.proto", package="grpc.health.v1", syntax="proto3"
    )
    field = descriptor_pb2.FieldDescriptorProto
    request = proto.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    response = proto.message_type.add(name="HealthCheckResponse")
    statuses = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"]):
        statuses.value.add(name=name, number=number)
    response.field.add(
        name="status",
        number=1,
        type=field.TYPE_ENUM,
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
        label=field.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return tuple(
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"grpc.health.v1.{name}"))
        for name in ("HealthCheckRequest", "HealthCheckResponse")
    )


@pytest.mark.parametrize("service", ["", SERVICE, "é" * 100, "x" * 300])
def test_request_is_a_health_check_request(service: str) -> None:
    request_type, _ = health_messages()
    assert _grpc_request(service) == request_type(service=service).SerializeToString()
    assert request_type.FromString(_grpc_request(service)).service == service


def test_only_serving_passes() -> None:
    _, response_type = health_messages()
    for status in (UNKNOWN, SERVING, NOT_SERVING, SERVICE_UNKNOWN, 7):
        wire = response_type(status=status).SerializeToString()
        assert _grpc_serving(wire) is (status == SERVING)
    assert _grpc_serving(b"\x08\x01") and not _grpc_serving(b"")  # empty: UNKNOWN


def test_response_parsing_is_protobufs() -> None:
    assert _grpc_serving(b"\x10\x05\x08\x01")  # an unknown field (2) is skipped
    assert _grpc_serving(b"\x08\x02\x08\x01")  # the last value of a field wins
    assert not _grpc_serving(b"\x08\x01\x08\x02")
    for garbage in (b"\x08", b"\x08\x81", b"\x0a\x05ab", b"\xff\xff"):
        assert not _grpc_serving(garbage)


# --- against a real gRPC server ------------------------------------------------------------------


def test_serving_passes_and_not_serving_fails_at_once() -> None:
    async def scenario() -> None:
        server = HealthServer({SERVICE: SERVING}).start()
        cluster = FakeCluster(server.port)
        host = cluster.hosts[0]
        metadata = (HeaderValueOption("x-probe", "1"), HeaderValueOption("x-probe", "2"))
        config = grpc_check(
            unhealthy_threshold=3,
            healthy_threshold=3,
            grpc={"service_name": SERVICE, "initial_metadata": metadata},
        )
        checker = HealthChecker(config, cluster, "web")
        await checker.start()
        assert not host.hc_failed  # the first success heals at once

        server.statuses[SERVICE] = NOT_SERVING  # an answer: unhealthy at once, no threshold
        await until(lambda: host.hc_failed)
        assert checker.counters["failure"] == 1
        assert checker.counters["network_failure"] == 0

        server.statuses[SERVICE] = SERVING  # healthy_threshold successes in a row
        successes = checker.counters["success"]
        await until(lambda: not host.hc_failed)
        assert checker.counters["success"] - successes == 3
        checker.close()
        await asyncio.sleep(0.05)
        server.stop()

        service, sent, _ = server.requests[0]
        assert service == SERVICE
        assert [v for k, v in sent if k == "x-probe"] == ["1", "2"]
        assert dict(sent)["user-agent"].startswith("Envoy/HC ")  # grpcio adds its own
        assert len(server.peers()) == 1  # one connection for every check

    run(scenario)


@pytest.mark.parametrize(
    ("statuses", "error"),
    [
        ({SERVICE: SERVICE_UNKNOWN}, None),
        ({SERVICE: UNKNOWN}, None),
        ({"": SERVING}, None),  # the service is unknown: NOT_FOUND, as grpc's HealthServicer
        ({SERVICE: SERVING}, grpc.StatusCode.UNIMPLEMENTED),
        ({SERVICE: SERVING}, grpc.StatusCode.UNAVAILABLE),  # sent by the host: an answer too
    ],
    ids=["SERVICE_UNKNOWN", "UNKNOWN", "NOT_FOUND", "UNIMPLEMENTED", "UNAVAILABLE"],
)
def test_any_other_answer_fails_at_once(
    statuses: dict[str, int], error: grpc.StatusCode | None
) -> None:
    async def scenario() -> None:
        server = HealthServer({SERVICE: SERVING}).start()
        cluster = FakeCluster(server.port)
        host = cluster.hosts[0]
        checker = HealthChecker(grpc_check(unhealthy_threshold=5), cluster, "web")
        await checker.start()
        server.statuses, server.error = statuses, error
        await until(lambda: host.hc_failed)
        assert checker.counters["failure"] == 1
        assert checker.counters["network_failure"] == 0
        checker.close()
        server.stop()

    run(scenario)


def test_server_down_counts_to_the_threshold_and_a_restart_heals_at_once() -> None:
    """A refused connection is a network failure. After one, the next check connects
    afresh, as Envoy does, rather than waiting out grpcio's reconnect backoff (1 s and up)."""

    async def scenario() -> None:
        server = HealthServer({SERVICE: SERVING}).start()
        cluster = FakeCluster(server.port)
        host = cluster.hosts[0]
        checker = HealthChecker(grpc_check(unhealthy_threshold=3), cluster, "web")
        await checker.start()
        server.stop()
        await until(lambda: host.hc_failed)
        assert checker.counters["network_failure"] == 3
        assert checker.counters["failure"] == 3
        # refused checks for 1.3 s: a kept channel would have failed its second connection
        # attempt (1 s ± 20% after the first) and would wait 1.6 s ± 20% for its third
        await asyncio.sleep(1.3)
        server.start()
        loop = asyncio.get_running_loop()
        restarted = loop.time()
        await until(lambda: not host.hc_failed)  # healthy_threshold (2) checks
        assert loop.time() - restarted < 0.9
        checker.close()
        server.stop()

    run(scenario)


def test_timeout_is_a_network_failure() -> None:
    async def scenario() -> None:
        server = HealthServer({SERVICE: SERVING}).start()
        cluster = FakeCluster(server.port)
        host = cluster.hosts[0]
        checker = HealthChecker(grpc_check(timeout=0.1, unhealthy_threshold=2), cluster, "web")
        await checker.start()
        server.delay = 1.0
        await until(lambda: host.hc_failed)
        assert checker.counters["network_failure"] == 2
        assert checker.counters["failure"] == 2
        checker.close()
        server.stop()

    run(scenario)


def test_reuse_connection_false_connects_for_each_check() -> None:
    async def scenario() -> None:
        server = HealthServer({SERVICE: SERVING}).start()
        checker = HealthChecker(grpc_check(reuse_connection=False), FakeCluster(server.port), "web")
        await checker.start()
        await until(lambda: checker.counters["success"] >= 4)
        assert len(server.peers()) >= 4
        assert checker.counters["failure"] == 0
        checker.close()
        server.stop()

    run(scenario)


class Recorder:
    """A TCP server that sends an empty HTTP/2 SETTINGS frame, then records all it gets and
    never answers. grpcio's HPACK sends header names and values as plain literals."""

    def __init__(self) -> None:
        self.data = b""
        self.port = 0

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        while data := await reader.read(65536):
            self.data += data
        writer.close()


@pytest.mark.parametrize(("authority", "sent"), [("", b"web"), ("svc.local", b"svc.local")])
def test_the_request_on_the_wire(authority: str, sent: bytes) -> None:
    """What Envoy sends: POST /grpc.health.v1.Health/Check, :authority the ``authority``
    or the cluster name, grpc-timeout the check's timeout, the request as one gRPC frame."""

    async def scenario() -> None:
        recorder = Recorder()
        server = await recorder.start()
        cluster = FakeCluster(recorder.port)
        config = grpc_check(timeout=0.2, grpc={"service_name": "svc", "authority": authority})
        checker = HealthChecker(config, cluster, "web")
        await checker.start()  # the check times out
        assert checker.counters["network_failure"] == 1
        checker.close()
        server.close()
        data = recorder.data
        assert data.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        assert b"\x05:path\x1c/grpc.health.v1.Health/Check" in data
        assert b"\x0a:authority" + bytes([len(sent)]) + sent in data
        assert b"\x0ccontent-type\x10application/grpc" in data
        timeout = re.search(rb"\x0cgrpc-timeout.(\d+)m", data)  # 200 ms, less what passed
        assert timeout is not None and 150 < int(timeout[1]) <= 201  # grpcio rounds up
        assert b"Envoy/HC" in data
        # a gRPC frame: not compressed, 5 bytes, HealthCheckRequest{service: "svc"}
        assert b"\x00\x00\x00\x00\x05\x0a\x03svc" in data

    run(scenario)


def test_grpcio_is_imported_only_for_grpc_checks() -> None:
    """grpcio costs a proxy ~8 MB: only a cluster with a gRPC check loads it."""
    script = textwrap.dedent(
        """
        import asyncio, sys
        from shoal.config.model import GrpcHealthCheck, TcpHealthCheck
        from shoal.upstream.health import HealthChecker
        from tests.unit.test_health import FakeCluster, http_check

        async def check(checker):
            cluster = FakeCluster(1)  # nothing listens on port 1: a refused connection
            health = HealthChecker(http_check(checker=checker), cluster, "web")
            await health.start()
            health.close()
            return "grpc" in sys.modules

        print(asyncio.run(check(TcpHealthCheck())), asyncio.run(check(GrpcHealthCheck())))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.stdout.split() == ["False", "True"]
