"""The ``shoal ratelimit`` process: the gRPC ``RateLimitService``, its HTTP endpoint
(``/stats``, ``/ready``, ``/healthcheck``) and the signals (``SIGTERM`` stops, ``SIGHUP``
reloads the config).

When Redis cannot be reached the service answers OK (fail open), counts
``redis_error`` and logs the outage once (then every 10 s while it lasts), so a Redis
restart lets traffic through instead of rejecting it; ``--on-redis-error unavailable``
returns gRPC UNAVAILABLE instead and leaves the choice to the proxy (Envoy's
``failure_mode_deny``), as the reference service does.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, cast

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from shoal.codec.http1 import END, RequestDecoder, RequestHead, status_line
from shoal.errors import ConfigError, RemoteProtocolError
from shoal.net import split_address
from shoal.ratelimit.config import describe, load_config
from shoal.ratelimit.limiter import RateLimiter, RequestError
from shoal.ratelimit.stats import ServiceStats
from shoal.ratelimit.store import STORE_ERRORS, CounterStore, RedisStore

log = logging.getLogger("shoal.ratelimit")

REDIS_LOG_INTERVAL = 10.0  # seconds between "still failing open" lines


class StartError(Exception):
    """The service cannot start (an address in use, say)."""


@dataclass(frozen=True, slots=True)
class Settings:
    config: tuple[str, ...]
    grpc_address: str = "127.0.0.1:8081"
    http_address: str = "127.0.0.1:8082"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout: float = 1.0
    key_prefix: str = ""
    shadow_mode: bool = False
    on_redis_error: str = "ok"  # or "unavailable"
    grace: float = 5.0


class RateLimitServicer:
    """``envoy.service.ratelimit.v3.RateLimitService`` (registered by duck typing)."""

    def __init__(
        self,
        limiter: RateLimiter,
        store: CounterStore,
        stats: ServiceStats,
        on_redis_error: str = "ok",
    ) -> None:
        self.limiter = limiter
        self.store = store
        self.stats = stats
        self.on_redis_error = on_redis_error
        self._failing_since: float | None = None
        self._failures = 0
        self._last_log = 0.0

    async def ShouldRateLimit(  # noqa: N802 (the gRPC method's name)
        self, request: rls_pb2.RateLimitRequest, context: Any
    ) -> rls_pb2.RateLimitResponse:
        started = time.perf_counter()
        self.stats.total_requests += 1
        try:
            plan = self.limiter.plan(request, time.time_ns())
        except RequestError as exc:
            self.stats.service_error += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # abort raises; this only tells the type checker
        if not plan.checks:
            response = self.limiter.respond(plan, [])
        else:
            try:
                counts = await self.store.increment(plan.increments())
            except STORE_ERRORS as exc:
                self.stats.redis_error += 1
                self._store_failed(exc)
                if self.on_redis_error == "unavailable":
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"redis: {exc}")
                response = self.limiter.fail_open(plan)
            else:
                if self._failing_since is not None:
                    self._store_recovered()
                response = self.limiter.respond(plan, counts)
        self.stats.response_time.record((time.perf_counter() - started) * 1000.0)
        return response

    def _store_failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._failures += 1
        if self._failing_since is None:
            self._failing_since = self._last_log = now
            action = "answering OK" if self.on_redis_error == "ok" else "answering UNAVAILABLE"
            log.error("redis is unreachable (%s): %s until it is back", _reason(exc), action)
        elif now - self._last_log >= REDIS_LOG_INTERVAL:
            self._last_log = now
            log.error(
                "redis still unreachable after %.0fs (%s), %d requests failed open so far",
                now - self._failing_since,
                _reason(exc),
                self._failures,
            )

    def _store_recovered(self) -> None:
        assert self._failing_since is not None
        log.warning(
            "redis is reachable again after %.1fs (%d requests answered without it)",
            time.monotonic() - self._failing_since,
            self._failures,
        )
        self._failing_since = None
        self._failures = 0


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# --- the HTTP endpoint -------------------------------------------------------------------------

_TEXT = "text/plain; charset=UTF-8"
_PROMETHEUS = "text/plain; version=0.0.4; charset=UTF-8"


class _State:
    def __init__(self, stats: ServiceStats) -> None:
        self.stats = stats
        self.state = "PRE_INITIALIZING"  # → LIVE → DRAINING


def _answer(state: _State, head: RequestHead) -> tuple[int, str, bytes]:
    path, _, query = head.target.decode("latin-1").partition("?")
    if head.method not in (b"GET", b"HEAD"):
        return 405, _TEXT, b"method not allowed\n"
    if path == "/stats":
        if "format=text" in query:
            return 200, _TEXT, state.stats.render_text().encode()
        return 200, _PROMETHEUS, state.stats.render_prometheus().encode()
    if path == "/ready":
        return (200 if state.state == "LIVE" else 503), _TEXT, f"{state.state}\n".encode()
    if path == "/healthcheck":  # the reference service's health endpoint
        live = state.state == "LIVE"
        return (200 if live else 500), _TEXT, b"OK\n" if live else b"NOT OK\n"
    return 404, _TEXT, b"not found: try /stats, /stats?format=text, /ready, /healthcheck\n"


class _HttpConnection(asyncio.Protocol):
    def __init__(self, state: _State) -> None:
        self.state = state
        self.decoder = RequestDecoder()
        self.transport: asyncio.Transport | None = None
        self.head: RequestHead | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.decoder.feed(data)
        except RemoteProtocolError as exc:
            self._send(exc.status, _TEXT, f"{exc}\n".encode(), close=True, head_only=False)
            return
        for event in events:
            if isinstance(event, RequestHead):
                self.head = event
            elif event is END and self.head is not None:
                head, self.head = self.head, None
                status, ctype, body = _answer(self.state, head)
                self._send(
                    status, ctype, body, close=not head.keep_alive, head_only=head.method == b"HEAD"
                )

    def _send(self, status: int, ctype: str, body: bytes, close: bool, head_only: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        head = status_line(status) + (
            f"content-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
            "cache-control: no-cache, max-age=0\r\n"
            + ("connection: close\r\n" if close else "")
            + "\r\n"
        ).encode("latin-1")
        transport.write(head if head_only else head + body)
        if close:
            transport.close()


# --- the process ------------------------------------------------------------------------------


def run_ratelimit(settings: Settings) -> int:
    """Entry point of ``shoal ratelimit``; returns the exit code (0 after SIGTERM, 2 for
    an invalid config or arguments, 1 when it cannot start)."""
    try:
        config = load_config(settings.config)
    except ConfigError as exc:
        print(f"shoal ratelimit: invalid config: {exc}", file=sys.stderr)
        return 2
    try:
        split_address(settings.grpc_address, require_host=False)
        split_address(settings.http_address, require_host=False)
    except ValueError as exc:
        print(f"shoal ratelimit: {exc}", file=sys.stderr)
        return 2
    stats = ServiceStats()
    stats.config_load_success += 1
    limiter = RateLimiter(config, stats, settings.key_prefix, settings.shadow_mode)
    log.info("loaded %s:\n%s", ", ".join(config.sources), describe(config))
    try:
        return asyncio.run(_serve(settings, limiter, stats))
    except StartError as exc:
        print(f"shoal ratelimit: {exc}", file=sys.stderr)
        return 1


def _reload(settings: Settings, limiter: RateLimiter, stats: ServiceStats) -> None:
    try:
        config = load_config(settings.config)
    except ConfigError as exc:
        stats.config_load_error += 1
        log.error("reload rejected, the running config stays: %s", exc)
        return
    limiter.set_config(config)
    stats.config_load_success += 1
    log.info("reloaded %s:\n%s", ", ".join(config.sources), describe(config))


async def _serve(settings: Settings, limiter: RateLimiter, stats: ServiceStats) -> int:
    loop = asyncio.get_running_loop()
    state = _State(stats)
    store = RedisStore(settings.redis_url, settings.redis_timeout)
    servicer = RateLimitServicer(limiter, store, stats, settings.on_redis_error)
    # No SO_REUSEPORT: a second service on the same port must fail, not share it.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(servicer, server)
    try:
        grpc_port = server.add_insecure_port(settings.grpc_address)
    except RuntimeError as exc:
        grpc_port = 0
        log.debug("add_insecure_port: %s", exc)
    if not grpc_port:
        await store.close()
        raise StartError(f"cannot listen on {settings.grpc_address} (gRPC)")
    host, port = split_address(settings.http_address, require_host=False)
    host = host or "0.0.0.0"
    try:
        http = await loop.create_server(lambda: _HttpConnection(state), host, port)
    except OSError as exc:
        await server.stop(None)
        await store.close()
        raise StartError(f"cannot listen on {settings.http_address} (HTTP): {exc}") from exc
    await server.start()
    http_port = http.sockets[0].getsockname()[1]
    try:
        await store.ping()
    except STORE_ERRORS as exc:
        log.warning(
            "redis at %s is not reachable yet (%s): answering OK until it is",
            settings.redis_url,
            _reason(exc),
        )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, settings, limiter, stats)
    state.state = "LIVE"
    log.info(
        "serving RateLimitService on %s (gRPC port %d), stats on http://%s:%d/stats",
        settings.grpc_address,
        grpc_port,
        host,
        http_port,
    )
    await stop.wait()
    state.state = "DRAINING"
    log.info("stopping: finishing in-flight calls (up to %.1fs)", settings.grace)
    await server.stop(settings.grace)
    http.close()
    await store.close()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)
    return 0
