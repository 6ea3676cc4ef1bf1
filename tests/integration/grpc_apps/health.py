"""``grpc.health.v1.Health/Check`` on a real grpcio server in the test's own process (its own
threads), answering what the test sets.

Raw bytes with a generic handler: grpcio's ``grpc_health`` package is not installed, and
encoding by hand here keeps the test independent of the checker's own encoding. As grpc's
HealthServicer does, a service missing from ``statuses`` gets a NOT_FOUND error. The server
also answers the rate limit service's ``ShouldRateLimit`` with OK, and counts the calls: the
rate limit filter's calls are the gRPC traffic a proxy sends to a cluster.
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc

UNKNOWN, SERVING, NOT_SERVING, SERVICE_UNKNOWN = 0, 1, 2, 3


class HealthServer:
    """``statuses``: service name → the ServingStatus it reports ("" is the whole server).
    ``error``: answer this status code instead; ``delay``: seconds before answering. Each
    request is recorded as (service, metadata, peer): the peer's port tells connections
    apart."""

    def __init__(self, statuses: dict[str, int] | None = None, port: int = 0) -> None:
        self.statuses = statuses if statuses is not None else {"": SERVING}
        self.port = port
        self.error: grpc.StatusCode | None = None
        self.delay = 0.0
        self.requests: list[tuple[str, list[tuple[str, str]], str]] = []
        self.rate_limit_calls = 0
        self._server: grpc.Server | None = None
        self._stopping = threading.Event()

    def start(self) -> HealthServer:
        self._stopping.clear()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        check = grpc.unary_unary_rpc_method_handler(self._check)
        limit = grpc.unary_unary_rpc_method_handler(self._should_rate_limit)
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler("grpc.health.v1.Health", {"Check": check}),
                grpc.method_handlers_generic_handler(
                    "envoy.service.ratelimit.v3.RateLimitService", {"ShouldRateLimit": limit}
                ),
            )
        )
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """Stop listening and drop every connection (the port stays this server's)."""
        self._stopping.set()
        if self._server is not None:
            self._server.stop(None).wait()
            self._server = None

    def peers(self) -> set[str]:
        return {peer for _, _, peer in self.requests}

    def _check(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        # HealthCheckRequest: field 1 (tag 0x0a), then a one-byte length (names < 128 bytes)
        service = request[2:].decode()
        metadata = [(str(key), str(value)) for key, value in context.invocation_metadata()]
        self.requests.append((service, metadata, context.peer()))
        if self.delay:
            self._stopping.wait(self.delay)
        if self.error is not None:
            context.abort(self.error, "set by the test")
        status = self.statuses.get(service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        # HealthCheckResponse: field 1 as a varint (tag 0x08); UNKNOWN (0) is the empty message
        return bytes([0x08, status]) if status else b""

    def _should_rate_limit(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.rate_limit_calls += 1
        return b"\x08\x01"  # RateLimitResponse{overall_code: OK}
