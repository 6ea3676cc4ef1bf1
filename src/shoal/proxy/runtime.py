"""The proxy runtime of one process: clusters, listeners, reload and drain.

A new config is built completely (clusters resolved, route tables compiled) before it is
swapped in; listeners whose address stays keep their socket, so a reload never drops a
connection. Connections accepted before the swap finish on the config they started with.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any, cast

from shoal.codec.detect import detect
from shoal.codec.rpc.registry import CODECS
from shoal.config.envoy import plaintext_service_problem
from shoal.config.model import (
    Bootstrap,
    Cluster,
    DiscoveryType,
    Endpoint,
    HttpConnectionManager,
    Listener,
    NetworkFilter,
    RpcProxy,
)
from shoal.errors import ConfigError
from shoal.filters.base import HttpFilter
from shoal.filters.chain import build_filters
from shoal.observe.stats import ROUTE_STATS, Histogram, Snapshot
from shoal.proxy.h2 import GRPC_STATS, H2Session, HttpSniffer
from shoal.proxy.http import HttpConnection
from shoal.proxy.listeners import (
    HTTP_COUNTERS,
    HTTP_GAUGES,
    AccessLogs,
    HttpListenerContext,
    HttpStats,
    TcpListenerContext,
)
from shoal.proxy.rpc import (
    METHOD_COUNTERS,
    RPC_COUNTERS,
    RPC_GAUGES,
    RpcListenerContext,
    RpcSession,
    RpcStats,
)
from shoal.proxy.tap import TapHub, TapTarget
from shoal.proxy.tcp import TCP_COUNTERS, TcpSession, TcpStats
from shoal.proxy.tls import (
    HANDSHAKE_TIMEOUT,
    TlsAccept,
    TlsListenerContext,
    TlsStats,
    chain_context,
    front_context,
)
from shoal.upstream.backup import ROUTE_BACKUPS
from shoal.upstream.breaker import ROUTE_BREAKERS
from shoal.upstream.cluster import CLUSTER_COUNTERS, ClusterRuntime, ClusterStats

log = logging.getLogger("shoal.proxy")

# Envoy's listener_filters_timeout: a connection that says too little is closed
SNIFF_TIMEOUT = 15.0

ChainContext = HttpListenerContext | TcpListenerContext | RpcListenerContext


class DetectingContext:
    """A listener with several filter chains, chosen by the protocol a connection's first
    bytes show (``filter_chain_match.application_protocols``); ``default`` otherwise."""

    __slots__ = ("by_protocol", "default", "draining")

    def __init__(self, default: ChainContext, by_protocol: dict[str, ChainContext]) -> None:
        self.default = default
        self.by_protocol = by_protocol
        self.draining = False

    def contexts(self) -> list[ChainContext]:
        return [self.default, *self.by_protocol.values()]

    @property
    def connections(self) -> set[Any]:
        return set().union(*(c.connections for c in self.contexts()))


Context = ChainContext | DetectingContext | TlsListenerContext


class ProtocolSniffer(asyncio.Protocol):
    """Holds a new connection until its first bytes tell its protocol, then hands it, with
    those bytes, to the session of the matching filter chain."""

    __slots__ = ("buffer", "ctx", "timer", "transport")

    def __init__(self, ctx: DetectingContext) -> None:
        self.ctx = ctx
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(SNIFF_TIMEOUT, self.transport.close)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        protocol = detect(self.buffer)
        if protocol is None:
            return
        if self.timer is not None:
            self.timer.cancel()
        ctx = self.ctx
        session = _session(ctx.by_protocol.get(protocol, ctx.default))
        transport = self.transport
        assert transport is not None
        transport.set_protocol(session)
        session.connection_made(transport)
        session.data_received(self.buffer)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


class ListenerSlot:
    """A bound socket whose protocol factory reads the *current* context."""

    def __init__(self, config: Listener, context: Context) -> None:
        self.config = config
        self.context = context
        self.server: asyncio.Server | None = None
        # a TLS listener's socket is served with this context for its life (proxy/tls.py)
        self.front: ssl.SSLContext | None = None

    def set_context(self, config: Listener, context: Context) -> None:
        """A new config version for the same socket."""
        self.config, self.context = config, context
        if self.front is not None and isinstance(context, TlsListenerContext):
            context.configure_front(self.front)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        _drain_context(self.context)


class ProxyRuntime:
    def __init__(self, reuse_port: bool = False) -> None:
        self.reuse_port = reuse_port
        self.bootstrap: Bootstrap | None = None
        self.raw_config: dict[str, Any] = {}
        self.clusters: dict[str, ClusterRuntime] = {}
        self.listeners: dict[str, ListenerSlot] = {}
        self.http_stats: dict[str, HttpStats] = {}
        self.tcp_stats: dict[str, TcpStats] = {}
        self.rpc_stats: dict[str, RpcStats] = {}
        self.access_logs = AccessLogs()
        self.draining = False
        self.healthcheck_failed = False
        self.config_version = 0
        self._flush_timer: asyncio.TimerHandle | None = None
        self.downstream_rq_time: dict[str, Histogram] = {}
        self.filters: dict[str, HttpFilter] = {}  # by stat prefix
        self.assignments: dict[str, tuple[Endpoint, ...]] = {}  # EDS, by service name
        self.tls_stats: dict[str, TlsStats] = {}  # by listener name
        self.taps = TapHub(self._tap_targets)

    # applying config ---------------------------------------------------------------------------

    async def apply(self, bootstrap: Bootstrap, raw: dict[str, Any] | None = None) -> None:
        """Install ``bootstrap``; on any error nothing changes and the error propagates."""
        self._check_tls_toggle(bootstrap)
        clusters = await self._build_clusters(bootstrap.clusters)
        # a listener whose config did not change keeps its context and its connections (as
        # in Envoy); it only sees the new clusters
        unchanged = {
            listener.name
            for listener in bootstrap.listeners
            if (slot := self.listeners.get(listener.name)) is not None and slot.config == listener
        }
        contexts = {
            listener.name: self._context(listener, clusters)
            for listener in bootstrap.listeners
            if listener.name not in unchanged
        }
        fresh: dict[str, ListenerSlot] = {}
        try:
            for listener in bootstrap.listeners:
                slot = self.listeners.get(listener.name)
                if slot is None or slot.config.address != listener.address:
                    fresh[listener.name] = slot = ListenerSlot(listener, contexts[listener.name])
                    slot.server = await self._bind(slot)
        except OSError:
            for slot in fresh.values():
                slot.close()
            for name, cluster in clusters.items():
                if self.clusters.get(name) is not cluster:
                    cluster.close()
            raise
        old_clusters = self.clusters
        self.clusters = clusters
        for name, cluster in old_clusters.items():
            if clusters.get(name) is not cluster:
                cluster.close()
        old_slots = self.listeners
        self.listeners = {}
        for listener in bootstrap.listeners:
            previous = old_slots.pop(listener.name, None)
            slot = fresh.get(listener.name) or previous
            assert slot is not None
            if listener.name in unchanged:
                _use_clusters(slot.context, clusters)
            elif slot is previous:
                _drain_context(slot.context)
                slot.set_context(listener, contexts[listener.name])
            elif previous is not None:
                previous.close()
            self.listeners[listener.name] = slot
        for slot in old_slots.values():
            slot.close()
        ROUTE_STATS.retain(self._route_stat_keys())
        # before the first await: no request on the new contexts escapes an open tap
        self.taps.attach(self._tap_targets())
        for slot in fresh.values():
            assert slot.server is not None
            await slot.server.start_serving()
        self.bootstrap = bootstrap
        if raw is not None:
            self.raw_config = raw
        self.config_version += 1
        if self._flush_timer is None:
            self._schedule_flush()
        log.info(
            "config version %d applied: %d listeners, %d clusters",
            self.config_version,
            len(self.listeners),
            len(self.clusters),
        )

    def _route_stat_keys(self) -> set[tuple[str, str]]:
        """(virtual host, stat_prefix) of every route with stats in the live config."""
        return {
            (vhost.name, route.stat_prefix)
            for slot in self.listeners.values()
            for context in _contexts(slot.context)
            if isinstance(context, HttpListenerContext)
            for vhost in context.config.route_config.virtual_hosts
            for route in vhost.routes
            if route.stat_prefix
        }

    def _check_tls_toggle(self, bootstrap: Bootstrap) -> None:
        """A listener keeps its socket across reloads, and a socket is served with TLS or
        without it for its life: turning TLS on or off needs a new address. (Also: no TLS
        cluster behind a client that would talk to it in plaintext, for xDS configs.)"""
        problem = plaintext_service_problem(bootstrap.listeners, bootstrap.clusters)
        if problem is not None:
            name = bootstrap.listeners[problem[0]].name
            raise ConfigError(f"listener {name!r}: {problem[1]}", source=bootstrap.source)
        for listener in bootstrap.listeners:
            slot = self.listeners.get(listener.name)
            if (
                slot is not None
                and slot.config.address == listener.address
                and (slot.config.tls is None) != (listener.tls is None)
            ):
                state = "on" if listener.tls is not None else "off"
                raise ConfigError(
                    f"listener {listener.name!r}: turning TLS {state} on a bound address is not"
                    " supported (the socket is kept across reloads); use a new address or"
                    " restart",
                    source=bootstrap.source,
                )

    def _tap_targets(self) -> Iterator[TapTarget]:
        for name, slot in self.listeners.items():
            for context in _contexts(slot.context):
                yield name, context.config.stat_prefix, context.access_logs

    async def _build_clusters(self, configs: tuple[Cluster, ...]) -> dict[str, ClusterRuntime]:
        clusters: dict[str, ClusterRuntime] = {}
        started: list[ClusterRuntime] = []
        try:
            for config in configs:
                current = self.clusters.get(config.name)
                if current is not None and current.config == config:
                    clusters[config.name] = current
                    continue
                runtime = ClusterRuntime(config)
                if current is not None:
                    runtime.inherit_stats(current)  # counters survive a config change
                if config.type is DiscoveryType.EDS:
                    runtime.set_endpoints(self.assignments.get(config.eds_service_name, ()))
                started.append(runtime)
                await runtime.start()
                clusters[config.name] = runtime
        except BaseException:
            for runtime in started:
                runtime.close()
            raise
        return clusters

    def update_assignment(self, service_name: str, endpoints: tuple[Endpoint, ...]) -> None:
        """EDS: new endpoints for the clusters following ``service_name``, applied in place
        (no rebuild, so pools, outlier and health state of staying hosts are kept)."""
        self.assignments[service_name] = endpoints
        for cluster in self.clusters.values():
            if cluster.config.eds_service_name == service_name:
                cluster.set_endpoints(endpoints)

    def service_address(self, cluster_name: str) -> tuple[str, int] | None:
        """A host of a service cluster (the rate limit service), from the current config."""
        cluster = self.clusters.get(cluster_name)
        host = cluster.lb.choose() if cluster is not None else None
        return (host.address.host, host.address.port) if host is not None else None

    def _context(self, listener: Listener, clusters: dict[str, ClusterRuntime]) -> Context:
        default = self._chain_context(listener, listener.filter, clusters)
        context: Context = default
        if listener.tls is not None:
            context = self._tls_context(listener, default, clusters)
        elif listener.protocol_chains:
            context = DetectingContext(
                default,
                {
                    protocol: self._chain_context(listener, chain.filter, clusters)
                    for chain in listener.protocol_chains
                    for protocol in chain.application_protocols
                },
            )
        draining = self.draining or self.healthcheck_failed
        for each in _contexts(context):
            each.draining = draining
        context.draining = draining
        return context

    def _tls_context(
        self, listener: Listener, default: ChainContext, clusters: dict[str, ClusterRuntime]
    ) -> TlsListenerContext:
        """Each chain's SSL context, pointing at the chain's own listener context (the
        default chain may also be the first SNI chain: they share one)."""
        assert listener.tls is not None
        named = {}
        for chain in listener.server_name_chains:
            target = (
                default
                if chain.filter is listener.filter
                else self._chain_context(listener, chain.filter, clusters)
            )
            ssl_context = chain_context(chain.tls, target)
            for name in chain.server_names:
                named[name] = ssl_context
        stats = self.tls_stats.setdefault(listener.name, TlsStats())
        return TlsListenerContext(chain_context(listener.tls, default), named, stats)

    def _chain_context(
        self, listener: Listener, config: NetworkFilter, clusters: dict[str, ClusterRuntime]
    ) -> ChainContext:
        if isinstance(config, HttpConnectionManager):
            stats = self.http_stats.setdefault(config.stat_prefix, HttpStats())
            chain, instances = build_filters(
                config.stat_prefix, config.http_filters, self.filters, self.service_address
            )
            self.filters.update(instances)
            return HttpListenerContext(
                listener, config, clusters, stats, self.access_logs, filters=chain
            )
        if isinstance(config, RpcProxy):
            rpc_stats = self.rpc_stats.setdefault(config.stat_prefix, RpcStats())
            return RpcListenerContext(
                config, CODECS[config.protocol], clusters, rpc_stats, self.access_logs
            )
        tcp_stats = self.tcp_stats.setdefault(config.stat_prefix, TcpStats())
        return TcpListenerContext(config, clusters, tcp_stats, self.access_logs)

    async def _bind(self, slot: ListenerSlot) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        address = slot.config.address
        context = slot.context
        tls: dict[str, Any] = {}
        if isinstance(context, TlsListenerContext):
            slot.front = front_context(lambda: slot.context)
            context.configure_front(slot.front)
            tls = {"ssl": slot.front, "ssl_handshake_timeout": HANDSHAKE_TIMEOUT}
        return await loop.create_server(
            _protocol_factory(slot),
            host=address.host,
            port=address.port,
            family=socket.AF_INET6 if address.is_ipv6 else socket.AF_INET,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
            backlog=1024,
            start_serving=False,
            **tls,
        )

    # drain and shutdown ------------------------------------------------------------------------

    def set_healthcheck_failed(self, failed: bool) -> None:
        self.healthcheck_failed = failed
        for slot in self.listeners.values():
            for context in _contexts(slot.context):
                context.draining = failed or self.draining
            if failed:
                _drain_context(slot.context)

    def drain_listeners(self) -> None:
        """Stop accepting; keep-alive connections close after their current response."""
        self.draining = True
        for slot in self.listeners.values():
            slot.close()

    def active_connections(self) -> int:
        return sum(len(slot.context.connections) for slot in self.listeners.values())

    async def shutdown(self, drain_time: float) -> None:
        self.drain_listeners()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_time
        while self.active_connections() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for cluster in self.clusters.values():
            cluster.close()
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        self.access_logs.close()

    def _schedule_flush(self) -> None:
        self.access_logs.flush()
        self._flush_timer = asyncio.get_running_loop().call_later(1.0, self._schedule_flush)

    # stats ---------------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        counters: dict[str, int] = {}
        gauges: dict[str, int] = {}
        histograms: dict[str, Histogram] = {}
        for name, cluster in self.clusters.items():
            prefix = f"cluster.{name}."
            stats: ClusterStats = cluster.stats
            for counter in CLUSTER_COUNTERS:
                counters[prefix + counter] = getattr(stats, counter)
            classes = [0] * 6
            for code, count in stats.codes.items():
                counters[f"{prefix}upstream_rq_{code}"] = count
                if 1 <= code // 100 <= 5:
                    classes[code // 100] += count
            for klass in range(1, 6):
                counters[f"{prefix}upstream_rq_{klass}xx"] = classes[klass]
            counters[prefix + "upstream_rq_completed"] = sum(classes)
            gauges[prefix + "upstream_cx_active"] = cluster.cx_active
            gauges[prefix + "upstream_rq_active"] = cluster.rq_active
            gauges[prefix + "upstream_rq_pending_active"] = cluster.rq_pending
            gauges[prefix + "membership_total"] = len(cluster.hosts)
            gauges[prefix + "membership_healthy"] = sum(h.healthy for h in cluster.hosts)
            histograms[prefix + "upstream_rq_time"] = stats.upstream_rq_time
            outlier = cluster.outlier
            if outlier is not None:
                for counter, value in outlier.counters.items():
                    counters[f"{prefix}outlier_detection.{counter}"] = value
                gauges[prefix + "outlier_detection.ejections_active"] = outlier.ejections_active
            health = cluster.health
            if health is not None:
                for counter, value in health.counters.items():
                    counters[f"{prefix}health_check.{counter}"] = value
                gauges[prefix + "health_check.healthy"] = health.healthy_count()
                gauges[prefix + "health_check.degraded"] = 0
            breaker = cluster.breaker
            if breaker is not None:
                for counter, value in breaker.counters.items():
                    counters[f"{prefix}circuit_breaker.{counter}"] = value
                gauges[prefix + "circuit_breaker.state"] = breaker.state_code
        counters.update(GRPC_STATS.counters())  # cluster.<name>.grpc.<service>.<method>.*
        ROUTE_STATS.report(counters, histograms)  # vhost.<vhost>.route.<stat_prefix>.*
        for route_name, breaker in ROUTE_BREAKERS.breakers.items():
            prefix = f"route.{route_name}.circuit_breaker."
            for counter, value in breaker.counters.items():
                counters[prefix + counter] = value
            gauges[prefix + "state"] = breaker.state_code
        for route_name, backup in ROUTE_BACKUPS.routes.items():
            prefix = f"route.{route_name}.backup_request."
            for counter, value in backup.counters.items():
                counters[prefix + counter] = value
            gauges[prefix + "delay_ms"] = backup.delay_ms()
        for prefix_name, http in self.http_stats.items():
            prefix = f"http.{prefix_name}."
            for counter in HTTP_COUNTERS:
                counters[prefix + counter] = getattr(http, counter)
            for gauge in HTTP_GAUGES:
                gauges[prefix + gauge] = getattr(http, gauge)
            for klass in range(1, 6):
                counters[f"{prefix}downstream_rq_{klass}xx"] = http.downstream_rq_xx[klass]
            counters[prefix + "downstream_rq_completed"] = sum(http.downstream_rq_xx)
            histograms[prefix + "downstream_rq_time"] = http.downstream_rq_time
        for prefix, instance in self.filters.items():
            for name, value in instance.counters().items():
                counters[prefix + name] = value
            for name, value in instance.gauges().items():
                gauges[prefix + name] = value
        for prefix_name, rpc in self.rpc_stats.items():
            prefix = f"generic_proxy.{prefix_name}."
            for counter in RPC_COUNTERS:
                counters[prefix + counter] = getattr(rpc, counter)
            for gauge in RPC_GAUGES:
                gauges[prefix + gauge] = getattr(rpc, gauge)
            histograms[prefix + "downstream_rq_time"] = rpc.downstream_rq_time
            for (service, method), per_method in rpc.methods.items():
                method_prefix = f"{prefix}rpc.{service}.{method}."
                for counter in METHOD_COUNTERS:
                    counters[method_prefix + counter] = getattr(per_method, counter)
                histograms[method_prefix + "rq_time"] = per_method.rq_time
        for prefix_name, tcp in self.tcp_stats.items():
            for counter in TCP_COUNTERS:
                counters[f"tcp.{prefix_name}.{counter}"] = getattr(tcp, counter)
        for listener_name, tls in self.tls_stats.items():
            slot = self.listeners.get(listener_name)
            if slot is not None:  # Envoy's listener.<address>.ssl.*
                address = slot.config.address
                prefix = f"listener.{address.host}_{address.port}.ssl."
                for counter, value in tls.counters().items():
                    counters[prefix + counter] = value
        gauges["server.live"] = int(not self.draining)
        gauges["server.concurrency"] = 1
        gauges["server.taps_active"] = len(self.taps.taps)
        counters["server.config_version"] = self.config_version
        return Snapshot(counters=counters, gauges=gauges, histograms=histograms)

    def clusters_text(self) -> str:
        """Envoy's ``/clusters`` text output."""
        lines: list[str] = []
        for name, cluster in self.clusters.items():
            limits = cluster.config.circuit_breakers
            lines.append(
                f"{name}::default_priority::max_connections::{limits.max_connections}\n"
                f"{name}::default_priority::max_pending_requests::{limits.max_pending_requests}\n"
                f"{name}::default_priority::max_requests::{limits.max_requests}\n"
                f"{name}::default_priority::max_retries::{limits.max_retries}"
            )
            for host in cluster.hosts:
                pool = cluster.pools.get(host.key)
                idle = len(pool.idle) if pool is not None else 0
                base = f"{name}::{host.key}::"
                lines.append(
                    f"{base}cx_idle::{idle}\n{base}rq_active::{host.active_requests}\n"
                    f"{base}health_flags::{host.health_flags()}\n"
                    f"{base}weight::{host.weight}\n{base}priority::{host.priority}\n"
                    f"{base}hostname::{host.hostname}"
                )
        return "\n".join(lines) + "\n"


def _session(context: ChainContext, alpn: str | None = None) -> asyncio.Protocol:
    """The session of a new connection; ``alpn`` is what a TLS handshake negotiated (for
    ``codec_type: AUTO`` it picks the HTTP version; without it the first bytes do)."""
    if isinstance(context, HttpListenerContext):
        codec = context.config.codec_type
        if codec == "http1":
            return HttpConnection(context)
        if codec == "http2" or alpn == "h2":
            return H2Session(context)
        if alpn in ("http/1.1", "http/1.0"):
            return HttpConnection(context)
        return HttpSniffer(context)
    if isinstance(context, RpcListenerContext):
        return RpcSession(context)
    return TcpSession(context)


def _protocol_factory(slot: ListenerSlot) -> Callable[[], Any]:
    """The factory reads the slot's context at accept time, so a reload can swap it."""

    if slot.front is not None:  # TLS for the socket's life (a reload cannot turn it off)

        def make_tls() -> Any:
            # the chain is picked by SNI during the handshake: proxy/tls.py
            context = slot.context
            assert isinstance(context, TlsListenerContext)
            return TlsAccept(_session, context.stats)

        return make_tls

    def make() -> Any:
        context = slot.context
        if isinstance(context, DetectingContext):
            return ProtocolSniffer(context)
        return _session(context)  # type: ignore[arg-type]  # never TLS: see make_tls

    return make


def _contexts(context: Context) -> list[ChainContext]:
    if isinstance(context, DetectingContext | TlsListenerContext):
        return context.contexts()
    return [context]


def _use_clusters(context: Context, clusters: dict[str, ClusterRuntime]) -> None:
    """New requests on an unchanged listener go to the current clusters."""
    for each in _contexts(context):
        each.clusters = clusters
        if isinstance(each, HttpListenerContext):
            each.breakers = any(c.breaker is not None for c in clusters.values())


def _drain_context(context: Context) -> None:
    context.draining = True
    for each in _contexts(context):
        each.draining = True
        for connection in list(each.connections):
            connection.drain()
