"""A live cluster: its hosts, load balancer, circuit-breaker counts, pools and stats.

Connection pooling follows Envoy's HTTP/1.1 pool: a request takes an idle keep-alive
connection if one exists; otherwise it is *pending* (counted against
``max_pending_requests``) and a new connection is opened if ``max_connections`` allows,
or it waits for a connection to be released.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from shoal.config.model import (
    Cluster,
    DiscoveryType,
    DnsLookupFamily,
    Endpoint,
    RetryPolicy,
    SocketAddress,
)
from shoal.observe.stats import Histogram, RouteStats, int_fields
from shoal.transport.tls import UpstreamTls
from shoal.transport.upstream import UpstreamConnection
from shoal.upstream.breaker import ErrorRateBreaker
from shoal.upstream.bridge import carry_over_h2
from shoal.upstream.health import HealthChecker
from shoal.upstream.host import Host
from shoal.upstream.lb import LoadBalancer, build_lb
from shoal.upstream.outlier import OutlierDetector

log = logging.getLogger("shoal.upstream")


class Closeable(Protocol):
    def close(self) -> None: ...


class PoolWaiter(Protocol):
    def pool_ready(self, conn: UpstreamConnection) -> None: ...
    def pool_failure(self, reason: str, transport_reason: str) -> None: ...


@dataclass(slots=True)
class ClusterStats:
    """Envoy's cluster counters, as plain ints (read at scrape time only)."""

    upstream_cx_connect_fail: int = 0
    upstream_cx_connect_timeout: int = 0
    upstream_cx_destroy: int = 0
    upstream_cx_overflow: int = 0
    upstream_cx_total: int = 0
    upstream_rq_active_overflow: int = 0  # max_requests
    upstream_rq_cancelled: int = 0
    upstream_rq_pending_overflow: int = 0
    upstream_rq_pending_total: int = 0
    upstream_rq_per_try_timeout: int = 0
    upstream_rq_retry: int = 0
    upstream_rq_retry_overflow: int = 0
    upstream_rq_retry_success: int = 0
    upstream_rq_rx_reset: int = 0
    upstream_rq_timeout: int = 0
    upstream_rq_total: int = 0
    codes: dict[int, int] = field(default_factory=dict)
    upstream_rq_time: Histogram = field(default_factory=Histogram)


CLUSTER_COUNTERS = int_fields(ClusterStats)


class HostPool:
    """Keep-alive connections to one host."""

    __slots__ = ("cluster", "connecting", "host", "idle", "waiters")

    def __init__(self, cluster: ClusterRuntime, host: Host) -> None:
        self.cluster = cluster
        self.host = host
        self.idle: list[UpstreamConnection] = []
        self.waiters: deque[PoolWaiter] = deque()
        self.connecting = 0

    def connection_ready(self, conn: UpstreamConnection) -> None:
        self.connecting -= 1
        self.release(conn)

    def connection_closed(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        cluster = self.cluster
        cluster.cx_active -= 1
        cluster.stats.upstream_cx_destroy += 1
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        cluster.serve_waiters()

    def release(self, conn: UpstreamConnection) -> None:
        """A connection is free again: give it to the oldest waiter, else keep it idle."""
        if conn.closed:
            return
        max_requests = self.cluster.config.max_requests_per_connection
        if max_requests is not None and conn.requests >= max_requests:
            conn.close()
            return
        if self.waiters:
            waiter = self.waiters.popleft()
            self.cluster.rq_pending -= 1
            waiter.pool_ready(conn)
        elif self.cluster.waiting_elsewhere():
            conn.close()  # another host needs the connection slot
        else:
            self.idle.append(conn)

    def connect(self) -> None:
        cluster = self.cluster
        cluster.cx_active += 1
        cluster.stats.upstream_cx_total += 1
        self.connecting += 1
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        cluster = self.cluster
        address = self.host.address
        loop = asyncio.get_running_loop()
        tls = cluster.tls
        try:
            async with asyncio.timeout(cluster.config.connect_timeout):
                if tls is None:
                    await loop.create_connection(
                        lambda: UpstreamConnection(self), address.host, address.port
                    )
                else:  # the handshake is part of the connect, and of its timeout
                    await tls.connect(UpstreamConnection(self), address.host, address.port)
        except (OSError, TimeoutError) as exc:
            self.connecting -= 1
            cluster.cx_active -= 1
            cluster.stats.upstream_cx_connect_fail += 1
            # Envoy's reset reason and transport failure reason, as its local replies say
            if isinstance(exc, TimeoutError):
                cluster.stats.upstream_cx_connect_timeout += 1
                reason, transport_reason = "connection timeout", ""
            else:
                detail = exc.strerror or str(exc)
                reason, transport_reason = (
                    "remote connection failure",
                    (f"delayed connect error: {detail}"),
                )
            if self.waiters:
                waiter = self.waiters.popleft()
                cluster.rq_pending -= 1
                waiter.pool_failure(reason, transport_reason)
            cluster.serve_waiters()


class ClusterRuntime:
    __slots__ = (
        "_dns_task",
        "breaker",
        "config",
        "cx_active",
        "health",
        "hosts",
        "lb",
        "on_hosts_changed",
        "outlier",
        "pools",
        "retries_active",
        "rpc_pools",
        "rq_active",
        "rq_pending",
        "stats",
        "tls",
    )

    def __init__(self, config: Cluster) -> None:
        self.config = config
        self.stats = ClusterStats()
        # transport_socket TLS: contexts built once per cluster config
        self.tls: UpstreamTls | None = None
        if config.tls is not None:
            self.tls = UpstreamTls(config.tls, config.http2)
        self.pools: dict[str, HostPool] = {}
        # RPC protocols' pools, by (protocol, host key): shoal.transport.rpc.RpcHostPool
        self.rpc_pools: dict[tuple[str, str], Closeable] = {}
        self.rq_active = 0
        self.rq_pending = 0
        self.cx_active = 0
        self.retries_active = 0
        self.on_hosts_changed: Callable[[], None] | None = None
        self._dns_task: asyncio.Task[None] | None = None
        self.hosts: list[Host] = []
        self.lb: LoadBalancer = build_lb(config, [])
        # passive and active health checking (Envoy's outlier_detection / health_checks)
        self.outlier: OutlierDetector | None = None
        if config.outlier_detection is not None:
            self.outlier = OutlierDetector(config.outlier_detection, self)
        # the error-rate breaker (Shoal's metadata "shoal.circuit_breaker"); the proxy asks it
        self.breaker: ErrorRateBreaker | None = None
        if config.breaker is not None:
            self.breaker = ErrorRateBreaker(config.breaker, config.name)
        self.health: HealthChecker | None = None
        if config.health_checks:
            self.health = HealthChecker(config.health_checks[0], self, config.name, tls=self.tls)
        if config.type is DiscoveryType.STATIC:
            self.set_endpoints(config.endpoints)

    def set_endpoints(self, endpoints: tuple[Endpoint, ...]) -> None:
        """An EDS update: the cluster's endpoints as the management server lists them."""
        self.set_hosts([_host(ep, ep.address) for ep in endpoints])

    def set_hosts(self, hosts: list[Host]) -> None:
        """Install a new host set, keeping the live state of hosts that stay. With active
        health checking, a new host starts failed until its first check passes (Envoy)."""
        old = {h.key: h for h in self.hosts}
        merged = []
        for fresh in hosts:
            host = old.get(fresh.key)
            if host is None:
                host = fresh
                host.hc_failed = self.health is not None
            else:
                host.weight, host.priority = fresh.weight, fresh.priority
                host.locality, host.eds_unhealthy = fresh.locality, fresh.eds_unhealthy
            host.update_health()
            merged.append(host)
        self.hosts = merged
        self.lb = build_lb(self.config, merged)
        if self.outlier is not None:
            self.outlier.hosts_changed(merged)
        if self.health is not None:
            self.health.hosts_changed(merged)
        keys = {h.key for h in merged}
        for key in [k for k in self.pools if k not in keys]:
            for conn in self.pools.pop(key).idle:
                conn.close()
        for rpc_key in [k for k in self.rpc_pools if k[1] not in keys]:
            self.rpc_pools.pop(rpc_key).close()
        if self.on_hosts_changed is not None:
            self.on_hosts_changed()

    # health ---------------------------------------------------------------------------------

    def refresh_health(self) -> None:
        """A host's health flags changed (health check, outlier ejection or return): the
        balancer is rebuilt from the hosts' ``healthy`` (and panics as Envoy does when too
        few are healthy)."""
        self.lb = build_lb(self.config, self.hosts)

    def has_traffic(self) -> bool:
        """Whether an upstream connection was ever opened for traffic (health checks use
        their slower no-traffic intervals until then, as in Envoy)."""
        return self.stats.upstream_cx_total > 0

    def health_check_passed(self, host: Host) -> None:
        if self.outlier is not None:
            self.outlier.health_check_passed(host)

    def inherit_stats(self, previous: ClusterRuntime) -> None:
        """Counters survive a config change of the cluster (gauges are recomputed)."""
        self.stats = previous.stats
        if self.outlier is not None and previous.outlier is not None:
            self.outlier.counters = previous.outlier.counters
        if self.health is not None and previous.health is not None:
            self.health.counters = previous.health.counters
        if self.breaker is not None and previous.breaker is not None:
            self.breaker.inherit(previous.breaker)

    # circuit breakers and pools -------------------------------------------------------------

    def acquire(self, host: Host, waiter: PoolWaiter) -> UpstreamConnection | bool | None:
        """An idle connection, or None when ``waiter`` will be called back, or False on
        pending overflow (the caller answers 503 UO)."""
        if self.config.http2:
            return carry_over_h2(self, host, waiter)  # HTTP/1.1 over one HTTP/2 stream
        pool = self.pools.get(host.key)
        if pool is None:
            pool = self.pools[host.key] = HostPool(self, host)
        idle = pool.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        breakers = self.config.circuit_breakers
        if self.rq_pending >= breakers.max_pending_requests:
            self.stats.upstream_rq_pending_overflow += 1
            return False
        self.rq_pending += 1
        self.stats.upstream_rq_pending_total += 1
        pool.waiters.append(waiter)
        if pool.connecting < len(pool.waiters):
            if self.cx_active < breakers.max_connections:
                pool.connect()
            else:
                self.stats.upstream_cx_overflow += 1
                self._close_one_idle()
        return None

    def cancel(self, host: Host, waiter: PoolWaiter) -> None:
        pool = self.pools.get(host.key)
        if pool is not None:
            try:
                pool.waiters.remove(waiter)
            except ValueError:
                return
            self.rq_pending -= 1

    def release(self, host: Host, conn: UpstreamConnection) -> None:
        pool = self.pools.get(host.key)
        if pool is None:
            conn.close()
        else:
            pool.release(conn)

    def retry_limit(self) -> int:
        """Concurrent retries allowed: max_retries, or with a retry budget a share of the
        active and pending requests (at least min_retry_concurrency), as Envoy computes."""
        limits = self.config.circuit_breakers
        if limits.retry_budget is None:
            return limits.max_retries
        budget = int(limits.retry_budget * (self.rq_active + self.rq_pending))
        return max(limits.min_retry_concurrency, budget)

    def admit_retry(self) -> bool:
        """A retry may start now: it is counted and holds one of the concurrent-retry slots
        (``retry_limit``) until ``release_retry``; or it is refused, counted as overflow."""
        if self.retries_active >= self.retry_limit():
            self.stats.upstream_rq_retry_overflow += 1
            return False
        self.retries_active += 1
        self.stats.upstream_rq_retry += 1
        return True

    def try_retry(self, retries_left: int, route: RouteStats | None) -> str:
        """A retry the route's policy wants: "" when it may start (counted, holding a slot
        until ``release_retry``), else the response flag saying why not, URX (no retries
        left) or UO (the retry limit), counted on the route's stats too."""
        if retries_left <= 0:
            if route is not None:
                route.upstream_rq_retry_limit_exceeded += 1
            return "URX"
        if not self.admit_retry():
            if route is not None:
                route.upstream_rq_retry_overflow += 1
            return "UO"
        if route is not None:
            route.upstream_rq_retry += 1
        return ""

    def release_retry(self) -> None:
        self.retries_active -= 1

    def waiting_elsewhere(self) -> bool:
        return (
            self.rq_pending > 0 and self.cx_active >= self.config.circuit_breakers.max_connections
        )

    def serve_waiters(self) -> None:
        """A connection slot freed up: open connections for pools that still wait."""
        if not self.rq_pending:
            return
        limit = self.config.circuit_breakers.max_connections
        for pool in self.pools.values():
            while pool.connecting < len(pool.waiters) and self.cx_active < limit:
                pool.connect()

    def _close_one_idle(self) -> None:
        for pool in self.pools.values():
            if pool.idle:
                pool.idle.pop().close()
                return

    # DNS ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Warm the cluster as Envoy does: resolve DNS clusters once (then keep refreshing),
        start outlier detection, and wait for the first health check of every host."""
        if self.config.type in (DiscoveryType.STRICT_DNS, DiscoveryType.LOGICAL_DNS):
            await self._resolve()
            self._dns_task = asyncio.get_running_loop().create_task(self._refresh())
        if self.outlier is not None:
            self.outlier.start()
        if self.health is not None:
            await self.health.start()

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.config.dns_refresh_rate)
            await self._resolve()

    async def _resolve(self) -> None:
        loop = asyncio.get_running_loop()
        lookup_family = self.config.dns_lookup_family
        family = {
            "v4_only": socket.AF_INET,
            "v6_only": socket.AF_INET6,
        }.get(lookup_family, socket.AF_UNSPEC)
        logical = self.config.type is DiscoveryType.LOGICAL_DNS
        hosts: list[Host] = []
        for endpoint in self.config.endpoints:
            address = endpoint.address
            try:
                infos = await loop.getaddrinfo(
                    address.host, address.port, family=family, type=socket.SOCK_STREAM
                )
            except OSError as exc:
                log.warning("cluster %s: cannot resolve %s: %s", self.config.name, address, exc)
                continue
            ips = select_addresses(
                lookup_family, [str(info[4][0]) for info in infos], logical=logical
            )
            hosts.extend(
                _host(endpoint, SocketAddress(ip, address.port), address.host) for ip in ips
            )
        if [h.key for h in hosts] != [h.key for h in self.hosts]:
            self.set_hosts(hosts)

    def close(self) -> None:
        if self._dns_task is not None:
            self._dns_task.cancel()
        if self.outlier is not None:
            self.outlier.close()
        if self.health is not None:
            self.health.close()
        for pool in self.pools.values():
            for conn in pool.idle:
                conn.close()
            pool.idle.clear()
        for rpc_pool in self.rpc_pools.values():
            rpc_pool.close()
        self.rpc_pools.clear()


_GATEWAY_ERRORS = frozenset({502, 503, 504})


def retry_on_status(policy: RetryPolicy, status: int) -> bool:
    """Whether the route's ``retry_on`` names an answer with this HTTP status."""
    on = policy.retry_on
    if status >= 500 and "5xx" in on:
        return True
    if status in _GATEWAY_ERRORS and "gateway-error" in on:
        return True
    if status == 409 and "retriable-4xx" in on:
        return True
    return "retriable-status-codes" in on and status in policy.retriable_status_codes


def retry_delay(policy: RetryPolicy, attempt: int) -> float:
    """Envoy's back-off before retry number ``attempt`` (1, 2, ...): uniform in
    [0, base * (2^attempt - 1)], capped at max_interval, at least up to base."""
    ceiling = min(policy.base_interval * ((1 << attempt) - 1), policy.max_interval)
    return random.uniform(0, max(ceiling, policy.base_interval))


def select_addresses(
    lookup_family: DnsLookupFamily, addresses: Iterable[str], *, logical: bool = False
) -> list[str]:
    """The addresses a DNS cluster uses from one resolution, as Envoy's resolvers choose them.

    ``auto``: the IPv6 addresses if there are any, else the IPv4 ones (Envoy's AUTO is "v6
    preferred"); ``v4_preferred``: the IPv4 addresses if any, else the IPv6 ones; ``all``: both,
    IPv6 first then IPv4 (the order of Envoy's getaddrinfo resolver); ``v4_only`` /
    ``v6_only``: that family only. Duplicates are dropped; within a family the resolver's order
    is kept. A LOGICAL_DNS cluster (``logical``) uses only the first chosen address, as
    Envoy's logical host does; a STRICT_DNS cluster makes a host of each.
    """
    unique = list(dict.fromkeys(addresses))
    v4 = [ip for ip in unique if ":" not in ip]
    v6 = [ip for ip in unique if ":" in ip]
    if lookup_family == "v4_only":
        chosen = v4
    elif lookup_family == "v6_only":
        chosen = v6
    elif lookup_family == "v4_preferred":
        chosen = v4 or v6
    elif lookup_family == "all":
        chosen = v6 + v4
    else:  # auto
        chosen = v6 or v4
    return chosen[:1] if logical else chosen


def _host(endpoint: Endpoint, address: SocketAddress, dns_name: str = "") -> Host:
    """A host; its hostname is the endpoint's ``hostname`` or, for DNS clusters, the name
    resolved (what auto_host_rewrite sends, as in Envoy)."""
    return Host(
        address,
        weight=endpoint.weight,
        priority=endpoint.priority,
        locality=endpoint.locality,
        healthy=endpoint.healthy,
        hostname=endpoint.hostname or dns_name,
    )
