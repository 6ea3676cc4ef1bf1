"""Per-listener contexts: what a connection needs, fixed for one config version.

A connection captures its context when accepted, so a reload never changes the config
under an in-flight request; the old context is marked draining and its keep-alive
connections close after their current response.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from shoal.config.model import (
    AccessLog,
    HttpConnectionManager,
    Listener,
    TcpProxy,
    Tracing,
    ZipkinTracer,
)
from shoal.filters.base import HttpFilter
from shoal.observe.accesslog import (
    DEFAULT_FORMAT,
    AccessLogRecord,
    AccessLogWriter,
    compile_json_format,
    compile_text_format,
)
from shoal.observe.export import Resolve
from shoal.observe.istio import IstioReporter
from shoal.observe.stats import Histogram, int_fields
from shoal.observe.telemetry import TELEMETRY
from shoal.observe.tracing import Tracer
from shoal.proxy.routes import RouteTable
from shoal.proxy.tcp import TcpStats
from shoal.upstream.cluster import ClusterRuntime

LogSink = Callable[[Any], None]


class Drainable(Protocol):
    def drain(self) -> None: ...


@dataclass(slots=True)
class HttpStats:
    """``http.<stat_prefix>.*`` counters of one connection manager; the two ``*_active``
    fields are gauges."""

    downstream_cx_idle_timeout: int = 0
    downstream_cx_protocol_error: int = 0
    downstream_cx_total: int = 0
    downstream_cx_rx_bytes_total: int = 0
    downstream_cx_tx_bytes_total: int = 0
    downstream_rq_header_timeout: int = 0
    downstream_rq_total: int = 0
    downstream_cx_active: int = 0
    downstream_rq_active: int = 0
    downstream_rq_xx: list[int] = field(default_factory=lambda: [0] * 6)
    downstream_rq_time: Histogram = field(default_factory=Histogram)

    def count_status(self, status: int) -> None:
        klass = status // 100
        if 1 <= klass <= 5:
            self.downstream_rq_xx[klass] += 1


HTTP_GAUGES = ("downstream_cx_active", "downstream_rq_active")
HTTP_COUNTERS = tuple(name for name in int_fields(HttpStats) if name not in HTTP_GAUGES)


class AccessLogs:
    """Writers shared by every config version that names the same file."""

    def __init__(self) -> None:
        self.writers: dict[str, AccessLogWriter] = {}

    def sink(self, config: AccessLog) -> LogSink:
        writer = self.writers.get(config.path)
        if writer is None:
            writer = self.writers[config.path] = AccessLogWriter(config.path)
        if config.json_format is not None:
            formatter = compile_json_format(config.json_format)
        else:
            formatter = compile_text_format(config.text_format or DEFAULT_FORMAT)
        write = writer.write

        def log(record: AccessLogRecord) -> None:
            write(formatter(record))

        return log

    def flush(self) -> None:
        for writer in self.writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


class HttpListenerContext:
    __slots__ = (
        "access_logs",
        "breakers",
        "buffer_limit",
        "clusters",
        "config",
        "connections",
        "draining",
        "filters",
        "istio",
        "listener",
        "routes",
        "server_header",
        "server_name",
        "stats",
        "tracer",
    )

    def __init__(
        self,
        listener: Listener,
        config: HttpConnectionManager,
        clusters: dict[str, ClusterRuntime],
        stats: HttpStats,
        logs: AccessLogs,
        *,
        filters: tuple[HttpFilter, ...] = (),
    ) -> None:
        self.listener = listener
        self.config = config
        self.routes = RouteTable(config.route_config)
        self.filters = filters
        # whether any cluster has an error-rate breaker (routes' own are on CompiledRoute)
        self.breakers = any(c.breaker is not None for c in clusters.values())
        self.clusters = clusters
        self.stats = stats
        self.access_logs = [logs.sink(a) for a in config.access_logs]
        self.server_name = config.server_name.encode("latin-1")
        self.server_header = b"server: %s\r\n" % self.server_name
        self.buffer_limit = listener.per_connection_buffer_limit_bytes
        self.connections: set[Drainable] = set()
        self.draining = False
        stats_config = config.istio_stats
        self.istio = (
            IstioReporter(stats_config, TELEMETRY.workload, TELEMETRY.service)
            if stats_config is not None
            else None
        )
        self.tracer = (
            _tracer(config.tracing, listener, clusters) if config.tracing is not None else None
        )


def _tracer(config: Tracing, listener: Listener, clusters: dict[str, ClusterRuntime]) -> Tracer:
    """The listener's tracer, with the process's exporter for its collector, which from now
    on finds the collector among these clusters."""
    provider = config.provider
    info = TELEMETRY.info
    if isinstance(provider, ZipkinTracer):
        service_name = info.cluster or "unknown"  # Zipkin's service: the node's cluster
    else:
        service_name = provider.service_name
    exporter = TELEMETRY.exporters.get(
        provider, service_name, _resolver(clusters, provider.cluster)
    )
    return Tracer(config, listener.traffic_direction == "outbound", info, exporter)


def _resolver(clusters: dict[str, ClusterRuntime], name: str) -> Resolve:
    def resolve() -> tuple[str, int] | None:
        cluster = clusters.get(name)
        host = cluster.lb.choose(None, None) if cluster is not None else None
        return (host.address.host, host.address.port) if host is not None else None

    return resolve


class TcpListenerContext:
    __slots__ = ("access_logs", "clusters", "config", "connections", "draining", "stats")

    def __init__(
        self,
        config: TcpProxy,
        clusters: dict[str, ClusterRuntime],
        stats: TcpStats,
        logs: AccessLogs,
    ) -> None:
        self.config = config
        self.clusters = clusters
        self.stats = stats
        self.access_logs = [logs.sink(a) for a in config.access_logs]
        if config.istio_stats is not None:
            # a connection is reported as it closes, as Istio does without peer metadata
            reporter = IstioReporter(config.istio_stats, TELEMETRY.workload, TELEMETRY.service)
            self.access_logs.append(reporter.record_tcp)
        self.connections: set[Drainable] = set()
        self.draining = False
