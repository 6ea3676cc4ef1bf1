"""Span exporters: a bounded queue per collector, flushed by a timer, sent off the request.

Finished spans wait in memory (at most :data:`MAX_QUEUE`; more are dropped and counted).
Every :data:`FLUSH_INTERVAL` seconds, or as soon as :data:`BATCH` spans wait, the queue
is encoded and sent by a background task: Zipkin v2 JSON or OTLP/HTTP as one HTTP/1.1
POST, OTLP/gRPC through grpcio (imported only by a proxy that exports over gRPC). One send
is in flight at a time; what queues meanwhile goes with the next. A failed send drops its
spans and counts them, without retrying: a collector that is down must not grow the
proxy's memory. Exporters outlive config versions: each new listener context points its
exporter at the current clusters.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from shoal import __version__
from shoal.config.model import OpenTelemetryTracer, ZipkinTracer
from shoal.observe.tracing import PendingSpan, finished, otlp_request, zipkin_json

log = logging.getLogger("shoal.tracing")

MAX_QUEUE = 8192
BATCH = 512
FLUSH_INTERVAL = 1.0
_OTLP_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"

# the collector cluster's current host, or None when it has none (or is gone)
Resolve = Callable[[], tuple[str, int] | None]


class ExportError(Exception):
    """The collector did not accept a report."""


class SpanExporter:
    """The queue and sender of one collector (a provider config)."""

    def __init__(self, provider: ZipkinTracer | OpenTelemetryTracer, service_name: str) -> None:
        self.provider = provider
        self.kind = "zipkin" if isinstance(provider, ZipkinTracer) else "opentelemetry"
        self.service_name = service_name
        self.resolve: Resolve = lambda: None
        self.queue: list[PendingSpan] = []
        self.counters = dict.fromkeys(
            (
                "spans_sent",
                "spans_dropped",
                "reports_sent",
                "reports_failed",
                "reports_skipped_no_cluster",
                "timer_flushed",
            ),
            0,
        )
        self.loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._sending: asyncio.Task[None] | None = None
        self._channel: Any = None  # grpc.aio.Channel, for OTLP/gRPC
        self._target: tuple[str, int] | None = None

    def add(self, pending: PendingSpan) -> None:
        """Queue a span (the request path's only cost: an append, sometimes a timer)."""
        queue = self.queue
        if len(queue) >= MAX_QUEUE:
            self.counters["spans_dropped"] += 1
            return
        queue.append(pending)
        if len(queue) == BATCH and self._sending is None:
            self.loop.call_soon(self._flush)
        elif self._timer is None:
            self._timer = self.loop.call_later(FLUSH_INTERVAL, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.counters["timer_flushed"] += 1
        self._flush()

    def _flush(self) -> None:
        if self._sending is not None or not self.queue:
            return
        batch, self.queue = self.queue, []
        self._sending = self.loop.create_task(self._send(batch))
        self._sending.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending = None
        if self.queue and self._timer is None:
            self._timer = self.loop.call_later(FLUSH_INTERVAL, self._on_timer)

    async def _send(self, batch: list[PendingSpan]) -> None:
        address = self.resolve()
        if address is None:
            self.counters["reports_skipped_no_cluster"] += 1
            return
        try:
            await self._deliver(address, batch)
        except (OSError, TimeoutError, ExportError, ValueError) as exc:
            self.counters["reports_failed"] += 1
            log.debug("%s: %d spans not exported: %s", self.kind, len(batch), exc)
            return
        except Exception as exc:  # grpc.RpcError and friends; never kill the loop
            self.counters["reports_failed"] += 1
            log.debug("%s: %d spans not exported: %r", self.kind, len(batch), exc)
            return
        self.counters["reports_sent"] += 1
        self.counters["spans_sent"] += len(batch)

    async def _deliver(self, address: tuple[str, int], batch: list[PendingSpan]) -> None:
        spans = [finished(pending) for pending in batch]
        provider = self.provider
        if isinstance(provider, ZipkinTracer):
            host = provider.hostname or provider.cluster
            body = zipkin_json(spans, self.service_name)
            await _post(address, host, provider.endpoint, b"application/json", body, timeout=5.0)
            return
        body = otlp_request(spans, self.service_name, __version__)
        if provider.path:
            host = provider.authority or provider.cluster
            content = b"application/x-protobuf"
            await _post(address, host, provider.path, content, body, timeout=provider.timeout)
            return
        await self._grpc(address, provider.timeout)(body, timeout=provider.timeout)

    def _grpc(self, address: tuple[str, int], timeout: float) -> Any:
        """The Export method on a channel to ``address`` (a new one when it moved)."""
        import grpc  # noqa: PLC0415 (grpcio only in proxies that export over gRPC)

        if address != self._target or self._channel is None:
            if self._channel is not None:
                self.loop.create_task(self._channel.close())
            self._target = address
            self._channel = grpc.aio.insecure_channel(f"{address[0]}:{address[1]}")
        return self._channel.unary_unary(_OTLP_EXPORT)

    async def close(self, timeout: float = 2.0) -> None:
        """Send what is queued (within ``timeout``), then close the channel."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            async with asyncio.timeout(timeout):
                while self.queue or self._sending is not None:
                    if self._sending is None:
                        self._flush()
                    sending = self._sending
                    if sending is not None:
                        await asyncio.wait([sending])
        except TimeoutError:
            log.warning("%s: %d spans not exported at shutdown", self.kind, len(self.queue))
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


async def _post(
    address: tuple[str, int],
    host: str,
    path: str,
    content_type: bytes,
    body: bytes,
    *,
    timeout: float,
) -> None:
    """One HTTP/1.1 POST on a fresh connection; a non-2xx answer is an ExportError."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(*address)
        try:
            writer.write(
                b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s"
                % (path.encode(), host.encode(), content_type, len(body), body)
            )
            status_line = await reader.readline()
            await reader.read()
        finally:
            writer.close()
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[1].startswith(b"2"):
        raise ExportError(status_line.decode("latin-1").strip() or "no answer")


class Exporters:
    """Every exporter of the process, one per provider config, kept across reloads."""

    def __init__(self) -> None:
        self.by_provider: dict[ZipkinTracer | OpenTelemetryTracer, SpanExporter] = {}

    def get(
        self, provider: ZipkinTracer | OpenTelemetryTracer, service_name: str, resolve: Resolve
    ) -> SpanExporter:
        """The provider's exporter, now resolving its collector with ``resolve``."""
        exporter = self.by_provider.get(provider)
        if exporter is None:
            exporter = self.by_provider[provider] = SpanExporter(provider, service_name)
        exporter.resolve = resolve
        return exporter

    def counters(self) -> dict[str, int]:
        """``tracing.<zipkin|opentelemetry>.<counter>``, summed over collectors."""
        out: dict[str, int] = {}
        for exporter in self.by_provider.values():
            for name, value in exporter.counters.items():
                key = f"tracing.{exporter.kind}.{name}"
                out[key] = out.get(key, 0) + value
        return out

    async def close(self) -> None:
        for exporter in self.by_provider.values():
            await exporter.close()


EXPORTERS = Exporters()
