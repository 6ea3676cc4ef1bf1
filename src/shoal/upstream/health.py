"""Active health checking: Envoy's HTTP, TCP and gRPC health checkers, one session per host.

Follows Envoy's ``health_checker_impl.cc`` / ``health_checker_base_impl.cc``:

- With health checking configured, a new host starts *failed* (``FAILED_ACTIVE_HC``) and is
  checked at once (after a random ``initial_jitter``); the cluster is not ready until every
  host had its first result (Envoy's cluster warming). The first success makes a host
  healthy at once; after that it takes ``healthy_threshold`` successes in a row.
- A failed host check: a network failure (connect failure, reset, timeout) or a
  ``retriable_statuses`` answer counts toward ``unhealthy_threshold``; any other answer
  outside ``expected_statuses`` (default: 200 only) marks the host unhealthy at once.
- The next check is due an interval after the result: ``interval`` while healthy,
  ``unhealthy_interval`` while failed, the ``*_edge_interval`` while a change is pending
  (threshold not reached yet), and ``no_traffic_interval`` /
  ``no_traffic_healthy_interval`` (default 60 s) until the cluster has opened its first
  upstream connection for traffic; plus a random jitter of up to ``interval_jitter`` and
  ``interval_jitter_percent``.
- HTTP checks send ``GET <path>`` (or ``method``) with ``host: <host or cluster name>`` and
  ``user-agent: Envoy/HC`` on their own keep-alive connection (``reuse_connection``), not on
  the proxy's pool. TCP checks connect, write ``send`` and wait until every ``receive``
  block was seen, in order (without ``receive``, connecting is enough).
- gRPC checks (Envoy's ``health_checkers/grpc``) call ``grpc.health.v1.Health/Check`` with
  ``service_name`` on a grpcio channel per host, ``:authority`` the ``authority`` or the
  cluster name: only status OK with ``SERVING`` passes; any other answer, a gRPC error
  status included, marks the host unhealthy at once. grpcio is imported by the first gRPC
  check, so a proxy without one does not carry it.

Counters are Envoy's ``health_check.*``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING, Final, Protocol

from google.protobuf import wrappers_pb2
from google.protobuf.message import DecodeError

from shoal.codec.http1 import END, ResponseDecoder, ResponseHead
from shoal.config.model import (
    GrpcHealthCheck,
    HeaderValueOption,
    HealthCheck,
    HttpHealthCheck,
    TcpHealthCheck,
)
from shoal.errors import RemoteProtocolError
from shoal.transport.tls import UpstreamTls
from shoal.upstream.host import Host

if TYPE_CHECKING:
    import grpc

log = logging.getLogger("shoal.upstream.health")

HEALTH_CHECK_COUNTERS: Final = (
    "attempt",
    "success",
    "failure",
    "passive_failure",
    "network_failure",
    "verify_cluster",
)

# check results
_OK: Final = "ok"
_NETWORK: Final = "network"  # connect failure, reset, timeout: counts toward the threshold
_RETRIABLE: Final = "retriable"  # a retriable_statuses answer: counts toward the threshold
_ACTIVE: Final = "active"  # the host answered unhealthy: failed at once

# Envoy's HealthTransition
_UNCHANGED: Final = 0
_CHANGED: Final = 1
_PENDING: Final = 2

_GRPC_CHECK: Final = "/grpc.health.v1.Health/Check"
_SERVING: Final = 1  # HealthCheckResponse.ServingStatus
# Envoy's user-agent (grpcio appends its own), and no retries: Envoy makes one attempt
_GRPC_CHANNEL_OPTIONS: Final = (("grpc.primary_user_agent", "Envoy/HC"), ("grpc.enable_retries", 0))


class CheckedCluster(Protocol):
    """The cluster as the health checker sees it."""

    @property
    def hosts(self) -> list[Host]: ...

    def refresh_health(self) -> None:
        """Host health flags changed: rebuild the load balancer."""
        ...

    def has_traffic(self) -> bool:
        """Whether the cluster has opened an upstream connection for traffic yet."""
        ...

    def health_check_passed(self, host: Host) -> None:
        """A check of ``host`` succeeded (outlier detection may return it)."""
        ...


class _Session:
    __slots__ = (
        "channel",
        "conn",
        "first_check",
        "first_done",
        "host",
        "num_healthy",
        "num_unhealthy",
    )

    def __init__(self, host: Host) -> None:
        self.host = host
        self.first_check = True
        self.first_done = asyncio.Event()
        self.num_healthy = 0
        self.num_unhealthy = 0
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.channel: grpc.aio.Channel | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn[1].close()
            self.conn = None

    async def close_channel(self) -> None:
        """A grpcio channel closes with a coroutine, so the session's task closes it."""
        channel, self.channel = self.channel, None
        if channel is not None:
            await channel.close()


class HealthChecker:
    def __init__(
        self,
        config: HealthCheck,
        cluster: CheckedCluster,
        cluster_name: str,
        rng: random.Random | None = None,
        tls: UpstreamTls | None = None,
    ) -> None:
        self.config = config
        self.tls = tls  # the cluster's transport_socket: HTTP and TCP checks use it
        self.cluster_name = cluster_name
        self._cluster = cluster
        self._rng = rng if rng is not None else random.Random()
        self.counters: dict[str, int] = dict.fromkeys(HEALTH_CHECK_COUNTERS, 0)
        self._sessions: dict[str, tuple[_Session, asyncio.Task[None]]] = {}
        self._started = False
        # built once: what each check sends, and for gRPC the channel options and metadata
        checker = config.checker
        self._request = b""
        self._grpc_options: tuple[tuple[str, str | int], ...] = ()
        self._grpc_metadata: tuple[tuple[str, str], ...] = ()
        if isinstance(checker, HttpHealthCheck):
            self._request = _http_request(checker, cluster_name)
        elif isinstance(checker, GrpcHealthCheck):
            self._request = _grpc_request(checker.service_name)
            authority = checker.authority or cluster_name
            self._grpc_options = (("grpc.default_authority", authority), *_GRPC_CHANNEL_OPTIONS)
            self._grpc_metadata = tuple(_add_headers([], checker.initial_metadata))

    # lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Check every host, and return once each had its first result."""
        self._started = True
        self.hosts_changed(self._cluster.hosts)
        firsts = [session.first_done.wait() for session, _ in self._sessions.values()]
        await asyncio.gather(*firsts)

    def hosts_changed(self, hosts: list[Host]) -> None:
        """Check new hosts, stop checking removed ones."""
        if not self._started:
            return
        current = {host.key: host for host in hosts}
        for key in [k for k, (s, _) in self._sessions.items() if current.get(k) is not s.host]:
            session, task = self._sessions.pop(key)
            task.cancel()
            session.close()
        loop = asyncio.get_running_loop()
        for key, host in current.items():
            if key not in self._sessions:
                session = _Session(host)
                self._sessions[key] = session, loop.create_task(self._run(session))

    def close(self) -> None:
        self._started = False
        for session, task in self._sessions.values():
            task.cancel()
            session.close()
        self._sessions.clear()

    def healthy_count(self) -> int:
        """Hosts passing active health checking (Envoy's ``health_check.healthy`` gauge)."""
        return sum(not host.hc_failed for host in self._cluster.hosts)

    # one host ---------------------------------------------------------------------------------

    async def _run(self, session: _Session) -> None:
        config = self.config
        try:
            if config.initial_jitter > 0:
                await asyncio.sleep(self._rng.random() * config.initial_jitter)
            while True:
                self.counters["attempt"] += 1
                result = await self._check(session)
                healthy, transition = self._handle(session, result)
                session.first_done.set()
                await asyncio.sleep(self._interval(healthy, transition))
        finally:
            session.close()
            session.first_done.set()  # nobody waits forever for a host no longer checked
            await session.close_channel()

    async def _check(self, session: _Session) -> str:
        checker = self.config.checker
        try:
            async with asyncio.timeout(self.config.timeout):
                if isinstance(checker, HttpHealthCheck):
                    return await self._check_http(session, checker)
                if isinstance(checker, GrpcHealthCheck):
                    return await self._check_grpc(session)
                return await self._check_tcp(session, checker)
        except (OSError, TimeoutError, RemoteProtocolError) as exc:
            log.debug("cluster %s: health check of %s: %r", self.cluster_name, session.host, exc)
            session.close()
            return _NETWORK
        except Exception:
            log.exception("cluster %s: health check of %s failed", self.cluster_name, session.host)
            session.close()
            return _NETWORK

    async def _open(
        self, host: Host, *, http1: bool
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to ``host``, over the cluster's TLS if it has one (ALPN http/1.1
        for HTTP checks, whatever the cluster's protocol)."""
        address = host.address
        if self.tls is None:
            return await asyncio.open_connection(address.host, address.port)
        return await self.tls.open_connection(address.host, address.port, http1=http1)

    async def _check_http(self, session: _Session, checker: HttpHealthCheck) -> str:
        reused = session.conn is not None and not session.conn[0].at_eof()
        if not reused:
            session.close()
            session.conn = await self._open(session.host, http1=True)
        try:
            head = await self._exchange(session, checker)
        except (OSError, RemoteProtocolError):
            if not reused:
                raise
            # the upstream closed the idle connection just now: Envoy would have seen the
            # close and connected afresh, so that is no failure
            session.close()
            session.conn = await self._open(session.host, http1=True)
            head = await self._exchange(session, checker)
        if not self.config.reuse_connection or not head.keep_alive:
            session.close()
        status = head.status
        if checker.expected(status):
            return _OK
        if checker.retriable(status):
            return _RETRIABLE
        return _ACTIVE

    async def _exchange(self, session: _Session, checker: HttpHealthCheck) -> ResponseHead:
        """Send the request on the session's connection; the response head, once the whole
        response is in."""
        assert session.conn is not None
        reader, writer = session.conn
        writer.write(self._request)
        decoder = ResponseDecoder()
        decoder.expect_head_response(checker.method == "HEAD")
        head: ResponseHead | None = None
        done = False
        while not done:
            data = await reader.read(65536)
            if not data:
                if head is None:
                    raise ConnectionResetError("connection closed before a response")
                session.close()  # a close-delimited body ends here
                break
            for event in decoder.feed(data):
                if isinstance(event, ResponseHead):
                    head = event
                elif event is END:
                    done = True
        assert head is not None
        return head

    async def _check_tcp(self, session: _Session, checker: TcpHealthCheck) -> str:
        reader, writer = await self._open(session.host, http1=False)
        session.conn = reader, writer
        if checker.send:
            writer.write(checker.send)
            await writer.drain()
        received = b""
        while not _tcp_match(checker.receive, received):
            data = await reader.read(65536)
            if not data:
                raise ConnectionResetError("connection closed before the expected data")
            received += data
        session.close()
        return _OK

    async def _check_grpc(self, session: _Session) -> str:
        """One ``Health/Check`` call on the host's channel. A timeout is a network failure,
        and so is a lost connection, after which the next check opens a new channel: Envoy
        connects afresh, where a kept channel could wait out a reconnect backoff of up to
        two minutes. A status the host sent, UNAVAILABLE included, fails it at once."""
        import grpc  # noqa: PLC0415 (grpcio, ~8 MB of RSS, only for clusters with gRPC checks)

        if session.channel is None:
            address = session.host.address
            target = f"ipv{6 if address.is_ipv6 else 4}:{address}"
            session.channel = grpc.aio.insecure_channel(target, options=self._grpc_options)
        check = session.channel.unary_unary(_GRPC_CHECK)
        try:
            response = await check(
                self._request, timeout=self.config.timeout, metadata=self._grpc_metadata
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            log.debug(
                "cluster %s: gRPC health check of %s: %s",
                self.cluster_name,
                session.host,
                exc.details(),
            )
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return _NETWORK
            ready = grpc.ChannelConnectivity.READY
            if code is grpc.StatusCode.UNAVAILABLE and session.channel.get_state() is not ready:
                await session.close_channel()
                return _NETWORK
            return _ACTIVE
        finally:
            if not self.config.reuse_connection:
                await session.close_channel()
        return _OK if _grpc_serving(response) else _ACTIVE

    def _handle(self, session: _Session, result: str) -> tuple[bool, int]:
        """Apply one result to the host (Envoy's handleSuccess / setUnhealthy)."""
        host = session.host
        config = self.config
        transition = _UNCHANGED
        first = session.first_check
        session.first_check = False
        if result == _OK:
            session.num_unhealthy = 0
            if host.hc_failed:
                if not first:
                    session.num_healthy += 1
                if first or session.num_healthy == config.healthy_threshold:
                    host.hc_failed = False
                    transition = _CHANGED
                else:
                    transition = _PENDING
            self.counters["success"] += 1
        else:
            session.num_healthy = 0
            if not host.hc_failed:
                if result != _ACTIVE:
                    session.num_unhealthy += 1
                if result == _ACTIVE or session.num_unhealthy == config.unhealthy_threshold:
                    host.hc_failed = True
                    transition = _CHANGED
                else:
                    transition = _PENDING
            self.counters["failure"] += 1
            if result == _NETWORK:
                self.counters["network_failure"] += 1
        if transition == _CHANGED:
            log.info(
                "cluster %s: host %s is %s (active health check)",
                self.cluster_name,
                host.key,
                "unhealthy" if host.hc_failed else "healthy",
            )
            host.update_health()
            self._cluster.refresh_health()
        if result == _OK:
            self._cluster.health_check_passed(host)
        return result == _OK, transition

    def _interval(self, healthy: bool, transition: int) -> float:
        """Seconds until the next check (Envoy's HealthCheckerImplBase::interval)."""
        config = self.config
        pending = transition == _PENDING
        if self._cluster.has_traffic():
            if healthy:
                base = config.healthy_edge_interval if pending else config.interval
            else:
                base = config.unhealthy_edge_interval if pending else config.unhealthy_interval
        elif healthy and not pending:
            base = config.no_traffic_healthy_interval
        else:
            base = config.no_traffic_interval
        base_ms = int(base * 1000)
        jitter_ms = 0
        percent_span = config.interval_jitter_percent * base_ms // 100
        if percent_span > 0:
            jitter_ms += self._rng.randrange(percent_span)
        jitter_span = int(config.interval_jitter * 1000)
        if jitter_span > 0:
            jitter_ms += self._rng.randrange(jitter_span)
        return (base_ms + jitter_ms) / 1000


def _http_request(checker: HttpHealthCheck, cluster_name: str) -> bytes:
    """The request head, built once: Envoy's headers, then the configured removals and
    additions."""
    headers = [("host", checker.host or cluster_name), ("user-agent", "Envoy/HC")]
    headers = [(k, v) for k, v in headers if k not in checker.request_headers_to_remove]
    headers = _add_headers(headers, checker.request_headers_to_add)
    lines = [f"{checker.method} {checker.path} HTTP/1.1\r\n"]
    lines += [f"{k}: {v}\r\n" for k, v in headers]
    if checker.method in ("POST", "PUT", "PATCH"):
        lines.append("content-length: 0\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def _add_headers(
    headers: list[tuple[str, str]], options: tuple[HeaderValueOption, ...]
) -> list[tuple[str, str]]:
    """``headers`` with the options applied in order, by Envoy's append actions."""
    for option in options:
        present = any(k == option.key for k, _ in headers)
        if option.action == "add_if_absent" and present:
            continue
        if option.action == "overwrite_if_exists" and not present:
            continue
        if option.action.startswith("overwrite"):
            headers = [(k, v) for k, v in headers if k != option.key]
        headers.append((option.key, option.value))
    return headers


def _grpc_request(service_name: str) -> bytes:
    """A serialized ``HealthCheckRequest{service}``: one string in field 1, the wire form of
    ``StringValue`` (no grpc.health.v1 code needed)."""
    return bytes(wrappers_pb2.StringValue(value=service_name).SerializeToString())


def _grpc_serving(response: bytes) -> bool:
    """Whether a serialized ``HealthCheckResponse`` says SERVING. Its one field, the status
    enum in field 1, has the wire form of ``Int32Value``; a response that does not parse is
    a failure, as in Envoy."""
    try:
        return bool(wrappers_pb2.Int32Value.FromString(response).value == _SERVING)
    except DecodeError:
        return False


def _tcp_match(expected: tuple[bytes, ...], received: bytes) -> bool:
    """Every expected block found in ``received``, in order (Envoy's TcpHealthCheckMatcher:
    not necessarily contiguous)."""
    start = 0
    for block in expected:
        at = received.find(block, start)
        if at < 0:
            return False
        start = at + len(block)
    return True
