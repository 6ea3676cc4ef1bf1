"""``shoal proxy``: run the sidecar, one process or a supervisor with N workers.

With ``--concurrency N`` (N > 1) the supervisor forks N workers that each bind every
listener with SO_REUSEPORT (the kernel spreads connections, as Envoy's workers share
them); the supervisor serves the admin API and answers from all workers at once, merging
their stats. Signals: SIGHUP reloads the config file, SIGTERM/SIGINT drain and exit.

The control socket between the supervisor and a worker carries one command per line and
one JSON line back per command, ``{"reply": value}``, in order. ``/tap`` adds streams:
``tap {"id": N, "spec": {...}}`` makes the worker open a local tap and send, as requests
finish, ``{"tap": N, "record": {...}}`` lines between its replies, and finally
``{"tap": N, "dropped": D}`` when its tap ends (by itself, or on ``untap N``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import replace
from typing import Any

import uvloop
import yaml

from shoal import __version__
from shoal.config.envoy import bootstrap_from_dict
from shoal.config.model import Bootstrap, Cluster, Endpoint, Listener
from shoal.errors import ConfigError
from shoal.observe.stats import Snapshot, merge
from shoal.observe.telemetry import TELEMETRY
from shoal.proxy.admin import serve_admin
from shoal.proxy.runtime import ProxyRuntime
from shoal.proxy.tap import Record, Tap, TapSpec, stream

log = logging.getLogger("shoal.proxy")


def read_config(path: str) -> tuple[Bootstrap, dict[str, Any]]:
    """Parse and translate a bootstrap file; raises ConfigError naming file and field."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", source=path) from exc
    try:
        raw = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"not valid YAML/JSON: {exc}", source=path) from exc
    if not isinstance(raw, dict):
        raise ConfigError("the bootstrap must be a mapping", source=path)
    return bootstrap_from_dict(raw, source=path), raw


class ProxyProcess:
    """One proxy process: the runtime plus reload, watch and shutdown; also the admin
    backend when it is the only process."""

    def __init__(self, path: str, reuse_port: bool, drain_time: float, watch: bool) -> None:
        self.path = path
        self.runtime = ProxyRuntime(reuse_port=reuse_port)
        self.drain_time = drain_time
        self.watch = watch
        self.stopped = asyncio.Event()
        self.started_at = time.time()
        self._mtime = 0.0
        self.state = "PRE_INITIALIZING"
        self.static = Bootstrap()
        self.dynamic: tuple[tuple[Listener, ...], tuple[Cluster, ...]] = ((), ())
        self.xds: Any = None  # the AdsClient when the bootstrap has dynamic_resources

    async def start(self, bootstrap: Bootstrap, raw: dict[str, Any]) -> None:
        self._mtime = _mtime(self.path)
        self.static = bootstrap
        TELEMETRY.configure(bootstrap.node)  # who this proxy is, before listeners are built
        await self.runtime.apply(bootstrap, raw)
        if bootstrap.ads is not None:
            await self._start_xds(bootstrap)
        # Everything loaded so far (modules, protos, config) lives as long as the process:
        # move it out of the collector's sight, so a full collection scans only what
        # requests allocate and never pauses the loop for milliseconds (p99).
        gc.collect()
        gc.freeze()
        self.state = "LIVE"
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: _spawn(self.reload()))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.quit)
        if self.watch:
            _spawn(self._watch())

    async def _start_xds(self, bootstrap: Bootstrap) -> None:
        """Subscribe to the management server and wait (up to the initial fetch timeout) for
        a first config, as Envoy's init manager does before the server is LIVE."""
        from shoal.xds.client import AdsClient  # noqa: PLC0415 (gRPC only when used)

        assert bootstrap.ads is not None
        self.xds = client = AdsClient(bootstrap.ads, bootstrap.node, self)
        _spawn(client.run())
        try:
            await asyncio.wait_for(client.initialized.wait(), bootstrap.ads.initial_fetch_timeout)
        except TimeoutError:
            log.warning("no config from the management server yet: serving the static part")

    def _composed(self) -> Bootstrap:
        listeners, clusters = self.dynamic
        return replace(
            self.static,
            listeners=self.static.listeners + listeners,
            clusters=self.static.clusters + clusters,
        )

    # XdsSink ------------------------------------------------------------------------------

    async def apply_dynamic(
        self, listeners: tuple[Listener, ...], clusters: tuple[Cluster, ...]
    ) -> None:
        static_names = {c.name for c in self.static.clusters}
        if clash := sorted(static_names & {c.name for c in clusters}):
            raise ConfigError(f"cluster {clash[0]!r} is static and cannot come from CDS")
        previous = self.dynamic
        self.dynamic = (listeners, clusters)
        try:
            await self.runtime.apply(self._composed())
        except BaseException:
            self.dynamic = previous
            raise

    def update_assignment(self, service_name: str, endpoints: tuple[Endpoint, ...]) -> None:
        self.runtime.update_assignment(service_name, endpoints)

    def server_address(self, cluster: str) -> tuple[str, int] | None:
        return self.runtime.service_address(cluster)

    async def reload(self) -> bool:
        """Apply the file again; an invalid file is logged and the running config stays."""
        self._mtime = _mtime(self.path)
        try:
            bootstrap, raw = read_config(self.path)
            previous, self.static = self.static, bootstrap
            try:
                await self.runtime.apply(self._composed(), raw)
            except BaseException:
                self.static = previous
                raise
        except ConfigError as exc:
            log.error("config rejected, keeping version %d: %s", self.runtime.config_version, exc)
            return False
        except OSError as exc:
            log.error(
                "config rejected, keeping version %d: %s: cannot bind: %s",
                self.runtime.config_version,
                self.path,
                exc,
            )
            return False
        return True

    async def _watch(self) -> None:
        while not self.stopped.is_set():
            await asyncio.sleep(0.5)
            if _mtime(self.path) != self._mtime:
                await self.reload()

    def quit(self) -> None:
        if self.state != "DRAINING":
            self.state = "DRAINING"
            _spawn(self._shutdown())

    async def _shutdown(self) -> None:
        log.info("draining (up to %.1fs) and exiting", self.drain_time)
        await self.runtime.shutdown(self.drain_time)
        await TELEMETRY.close()  # spans still queued go out
        self.stopped.set()

    # AdminBackend ---------------------------------------------------------------------------

    async def snapshot(self) -> Snapshot:
        return self.stats()

    def stats(self) -> Snapshot:
        """The runtime's stats plus Istio's series and the tracing exporters' counters."""
        snapshot = self.runtime.snapshot()
        TELEMETRY.contribute(snapshot)
        return snapshot

    async def clusters_text(self) -> str:
        return self.runtime.clusters_text()

    def config_dump(self) -> dict[str, Any]:
        dynamic = self.xds.config_dump() if self.xds is not None else None
        return config_dump(self.runtime.raw_config, self.runtime.config_version, dynamic)

    def server_info(self) -> dict[str, Any]:
        return {
            "version": f"shoal/{__version__}",
            "state": self.state,
            "uptime_current_epoch": f"{int(time.time() - self.started_at)}s",
            "command_line_options": {"config_path": self.path, "concurrency": 1},
            "config_version": self.runtime.config_version,
            "healthcheck_failed": self.runtime.healthcheck_failed,
        }

    def server_state(self) -> str:
        return self.state

    async def set_healthcheck_failed(self, failed: bool) -> None:
        self.runtime.set_healthcheck_failed(failed)

    async def drain_listeners(self) -> None:
        self.runtime.drain_listeners()

    def tap(self, spec: TapSpec) -> AsyncGenerator[Record | None, None]:
        return stream(self.runtime.taps, spec)


# gauges that are copies in every worker, not per-worker quantities to add up
_SHARED_GAUGES = (
    ".membership_total",
    ".membership_healthy",
    ".health_check.healthy",
    ".health_check.degraded",
    ".circuit_breaker.state",  # each worker has its own breaker: the highest state code
    ".backup_request.delay_ms",  # each worker learns its own delay: the longest
    "server.taps_active",  # every worker takes part in each tap
)


def config_dump(
    raw: dict[str, Any], version: int, dynamic: dict[str, list[dict[str, Any]]] | None = None
) -> dict[str, Any]:
    """Envoy-shaped ``/config_dump``: the bootstrap, static listeners and clusters, and
    (with xDS) the dynamic listeners, routes, clusters and endpoints as accepted."""
    static = raw.get("static_resources", {})
    extra = dynamic or {}
    configs: list[dict[str, Any]] = [
        {"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump", "bootstrap": raw},
        {
            "@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
            "version_info": str(version),
            "static_listeners": [{"listener": item} for item in static.get("listeners", [])],
            **({"dynamic_listeners": extra["dynamic_listeners"]} if dynamic else {}),
        },
        {
            "@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
            "version_info": str(version),
            "static_clusters": [{"cluster": item} for item in static.get("clusters", [])],
            **({"dynamic_active_clusters": extra["dynamic_active_clusters"]} if dynamic else {}),
        },
    ]
    if dynamic is not None:
        configs.append(
            {
                "@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
                "dynamic_route_configs": dynamic["dynamic_route_configs"],
            }
        )
        configs.append(
            {
                "@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump",
                "dynamic_endpoint_configs": dynamic["dynamic_endpoint_configs"],
            }
        )
    return {"configs": configs}


_background: set[asyncio.Task[Any]] = set()


def _spawn(work: Coroutine[Any, Any, Any]) -> None:
    """Run ``work`` in the background, holding a reference so it is not collected."""
    task = asyncio.get_running_loop().create_task(work)
    _background.add(task)
    task.add_done_callback(_background.discard)


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


class FatalError(Exception):
    """The proxy stops with exit status 1: it (or a worker) could not start, or a worker
    died; the message says why."""


def startup_error(exc: BaseException) -> str:
    """One line for an exception raised while starting: the config or bind error."""
    if isinstance(exc, ConfigError):
        return f"invalid config: {exc}"
    if isinstance(exc, OSError):
        return f"cannot bind: {exc}"
    return f"{type(exc).__name__}: {exc}"


async def _run_single(path: str, drain_time: float, watch: bool) -> int:
    """Admin comes up first, as in Envoy: ``/ready`` says PRE_INITIALIZING while the proxy
    waits for its first xDS config."""
    process = ProxyProcess(path, reuse_port=False, drain_time=drain_time, watch=watch)
    try:
        bootstrap, raw = read_config(path)
    except ConfigError as exc:
        raise FatalError(startup_error(exc)) from exc
    admin = None
    if bootstrap.admin is not None:
        address = bootstrap.admin.address
        try:
            admin = await serve_admin(process, address.host, address.port)
        except OSError as exc:
            raise FatalError(f"admin: {startup_error(exc)}") from exc
    try:
        await process.start(bootstrap, raw)
    except (ConfigError, OSError) as exc:
        if admin is not None:
            admin.close()
        await process.runtime.shutdown(0)
        raise FatalError(startup_error(exc)) from exc
    log.info("shoal proxy ready (pid %d)", os.getpid())
    await process.stopped.wait()
    if admin is not None:
        admin.close()
    return 0


# --- workers ------------------------------------------------------------------------------------


def _message(value: Any) -> bytes:
    return json.dumps(value).encode() + b"\n"


async def _worker_main(path: str, drain_time: float, control: socket.socket) -> int:
    """A worker: bind the listeners, then report on ``control`` -- ``{"ready": pid}`` once
    every listener is bound and serving, or ``{"error": ...}`` and exit 1 -- and from then
    on answer the supervisor's questions there, one ``{"reply": ...}`` line per command,
    with the records of open taps in between."""
    reader, writer = await asyncio.open_connection(sock=control)
    process = ProxyProcess(path, reuse_port=True, drain_time=drain_time, watch=False)
    try:
        bootstrap, raw = read_config(path)
        await process.start(bootstrap, raw)
    except Exception as exc:
        if not isinstance(exc, ConfigError | OSError):
            log.exception("worker cannot start")
        writer.write(_message({"error": startup_error(exc)}))
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()
        return 1
    writer.write(_message({"ready": os.getpid()}))
    await writer.drain()
    taps = process.runtime.taps
    forwarding: dict[int, Tap] = {}

    async def forward(tap_id: int, tap: Tap) -> None:
        """Send a tap's records as they come, then what it dropped. A supervisor reading
        slower than requests finish fills the tap's buffer: records are dropped here, not
        queued up in the worker."""
        try:
            with contextlib.suppress(ConnectionError):  # the supervisor is gone
                async for record in tap.records():
                    writer.write(_message({"tap": tap_id, "record": record}))
                    await writer.drain()
        finally:
            del forwarding[tap_id]
            taps.close(tap)
        if not writer.is_closing():
            writer.write(_message({"tap": tap_id, "dropped": tap.dropped}))

    async def answer() -> None:
        while line := await reader.readline():
            command, _, argument = line.decode().strip().partition(" ")
            reply: Any = None
            if command == "stats":
                reply = process.stats().to_json()
            elif command == "clusters":
                reply = process.runtime.clusters_text()
            elif command == "reload":
                reply = await process.reload()
            elif command in ("hc_fail", "hc_ok"):
                process.runtime.set_healthcheck_failed(command == "hc_fail")
            elif command == "drain":
                process.runtime.drain_listeners()
            elif command == "tap":
                request = json.loads(argument)
                # opened before the reply: the supervisor misses nothing after it
                tap = forwarding[request["id"]] = taps.open(TapSpec(**request["spec"]))
                _spawn(forward(request["id"], tap))
                reply = True
            elif command == "untap" and (ending := forwarding.get(int(argument))) is not None:
                ending.close()  # forward() ends and reports what the tap dropped
            writer.write(_message({"reply": reply}))
            await writer.drain()
        # The supervisor is gone (its end closed): do not serve on without it.
        process.quit()

    _spawn(answer())
    await process.stopped.wait()
    return 0


# Control lines can be long: a stats snapshot of many clusters, a record with a long path.
CONTROL_LINE_LIMIT = 16 * 1024 * 1024
# How long past its duration a tap waits for the workers' last records and drop counts
# (a worker that died sends none).
TAP_END_WAIT = 2.0


class WorkerChannel:
    """The supervisor's end of one worker's control socket.

    Answers come back in command order, but tap records arrive between them at any time;
    so once the workers are up, :meth:`read` runs for the channel's life and routes every
    line: a reply to the oldest waiting :meth:`ask`, a tap event to ``on_tap``.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_tap: Callable[[dict[str, Any]], None],
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.on_tap = on_tap
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.closed = False

    async def ask(self, command: str) -> Any:
        """The worker's answer to ``command``; None once the worker is gone."""
        if self.closed:
            return None
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting.append(answer)
        self.writer.write(command.encode() + b"\n")
        await self.writer.drain()
        return await answer

    async def read(self) -> None:
        try:
            while line := await self.reader.readline():
                message = json.loads(line)
                if "tap" in message:
                    self.on_tap(message)
                elif self.waiting:
                    answer = self.waiting.popleft()
                    if not answer.done():  # its asker may have been cancelled
                        answer.set_result(message["reply"])
        finally:
            self.closed = True
            for answer in self.waiting:
                if not answer.done():
                    answer.set_result(None)
            self.waiting.clear()


class MergedTap:
    """One ``/tap`` across the workers: their records merge into ``tap``, bounded like
    any tap, and each worker reports what it dropped when its part ends.

    The workers' parts time the tap: each ends ``duration`` after it opened, and every
    record it sent comes before its end on the control socket, so the merged tap finishes
    when the last worker's part has ended and loses nothing in flight. Its own deadline,
    ``TAP_END_WAIT`` later, only covers a worker that never reports.
    """

    def __init__(self, spec: TapSpec) -> None:
        self.tap = Tap(replace(spec, duration=spec.duration + TAP_END_WAIT))
        self.workers: int | None = None  # how many workers tap; None until they said so
        self.ended = 0
        self.worker_dropped = 0
        self.all_ended = asyncio.Event()

    def expect(self, workers: int) -> None:
        self.workers = workers
        self._check()

    def worker_ended(self, dropped: int) -> None:
        self.ended += 1
        self.worker_dropped += dropped
        self._check()

    def _check(self) -> None:
        if self.workers is not None and self.ended >= self.workers:
            self.all_ended.set()
            self.tap.finish()

    @property
    def dropped(self) -> int:
        return self.tap.dropped + self.worker_dropped


class Supervisor:
    """Forks workers, serves admin for all of them, forwards reload and shutdown.

    Admin is served at once, but ``/ready`` answers 503 ``PRE_INITIALIZING`` until every
    worker has reported that its listeners are bound; a worker that cannot start (a port in
    use, say) stops the others and the supervisor exits 1 with that worker's error.
    """

    def __init__(self, path: str, concurrency: int, drain_time: float, watch: bool) -> None:
        self.path = path
        self.concurrency = concurrency
        self.drain_time = drain_time
        self.watch = watch
        self.workers: list[tuple[int, socket.socket]] = []
        self.channels: list[WorkerChannel] = []
        self.taps: dict[int, MergedTap] = {}
        self._tap_ids = itertools.count(1)
        self.lock = asyncio.Lock()
        self.stopped = asyncio.Event()
        self.state = "PRE_INITIALIZING"
        self.workers_ready = False
        self.failure: str | None = None
        self.raw: dict[str, Any] = {}
        self.version = 1
        self.started_at = time.time()
        self.healthcheck_failed = False

    def fork_workers(self) -> None:
        for _ in range(self.concurrency):
            parent_end, child_end = socket.socketpair()
            pid = os.fork()
            if pid == 0:
                parent_end.close()
                for _, other in self.workers:
                    other.close()
                code = 1
                try:
                    code = run_on_uvloop(_worker_main(self.path, self.drain_time, child_end))
                except Exception:
                    log.exception("worker failed")
                finally:
                    os._exit(code)
            child_end.close()
            self.workers.append((pid, parent_end))

    async def ask(self, command: str) -> list[Any]:
        """Each worker's answer to ``command``; waits while the workers start, and is
        empty when they never did."""
        async with self.lock:
            if not self.workers_ready:
                return []
            return [await channel.ask(command) for channel in self.channels]

    async def run(self) -> int:
        bootstrap, self.raw = read_config(self.path)
        for _, sock in self.workers:
            reader, writer = await asyncio.open_connection(sock=sock, limit=CONTROL_LINE_LIMIT)
            self.channels.append(WorkerChannel(reader, writer, self._tap_event))
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: _spawn(self.reload()))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.quit)
        admin = None
        if bootstrap.admin is not None:
            address = bootstrap.admin.address
            try:
                admin = await serve_admin(self, address.host, address.port)
            except OSError as exc:
                self._fail(f"admin: {startup_error(exc)}")
        if self.state == "PRE_INITIALIZING":
            await self._wait_for_workers()
        if self.state == "LIVE":
            log.info("shoal proxy ready: %d workers (pid %d)", self.concurrency, os.getpid())
            if self.watch:
                _spawn(self._watch())
            _spawn(self._reap())
        await self.stopped.wait()
        if admin is not None:
            admin.close()
        if self.failure is not None:
            raise FatalError(self.failure)
        return 0

    async def _wait_for_workers(self) -> None:
        """Wait for every worker's first line on its control socket, holding ``lock`` so
        that no question is asked before it; LIVE when all are ready, else fail on the
        first error (or early exit) without waiting for the rest."""
        async with self.lock:
            pending = {
                asyncio.ensure_future(_startup_report(pid, channel.reader))
                for (pid, _), channel in zip(self.workers, self.channels, strict=True)
            }
            try:
                while pending and self.state == "PRE_INITIALIZING":
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        error = task.result()
                        if error is not None and self.state == "PRE_INITIALIZING":
                            self._fail(error)
            finally:
                for task in pending:
                    task.cancel()
            if self.state == "PRE_INITIALIZING":
                self.workers_ready = True
                self.state = "LIVE"
                for channel in self.channels:
                    _spawn(channel.read())

    def _fail(self, message: str) -> None:
        """Stop every worker and exit 1 with ``message`` (the first failure wins)."""
        log.error("%s; shutting down", message)
        if self.failure is None:
            self.failure = message
        self.quit()

    async def reload(self) -> None:
        try:
            _, raw = read_config(self.path)
        except ConfigError as exc:
            log.error("config rejected, keeping version %d: %s", self.version, exc)
            return
        answers = await self.ask("reload")
        if answers and all(answers):
            self.raw = raw
            self.version += 1

    async def _watch(self) -> None:
        seen = _mtime(self.path)
        while not self.stopped.is_set():
            await asyncio.sleep(0.5)
            if _mtime(self.path) != seen:
                seen = _mtime(self.path)
                await self.reload()

    async def _reap(self) -> None:
        """A worker that dies takes the proxy down: better than serving at 1/N capacity
        silently (a supervisor such as the agent or Kubernetes restarts us)."""
        while self.state == "LIVE":
            await asyncio.sleep(0.5)
            for pid, _ in self.workers:
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    continue
                if done and self.state == "LIVE":
                    code = os.waitstatus_to_exitcode(status)
                    self._fail(f"worker {pid} exited with status {code}")

    def quit(self) -> None:
        if self.state == "DRAINING":
            return
        self.state = "DRAINING"
        _spawn(self._shutdown())

    async def _shutdown(self) -> None:
        for pid, _ in self.workers:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.drain_time + 5
        for pid, _ in self.workers:
            while time.monotonic() < deadline:
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if done:
                    break
                await asyncio.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)
        self.stopped.set()

    # AdminBackend --------------------------------------------------------------------------------

    async def snapshot(self) -> Snapshot:
        # while the workers start, admin answers without them rather than wait
        answers = await self.ask("stats") if self.workers_ready else []
        snapshots = [Snapshot.from_json(text) for text in answers if text]
        merged = merge(snapshots)
        for name in merged.gauges:
            if name.endswith(_SHARED_GAUGES):
                # every worker holds the same cluster membership: report it once
                merged.gauges[name] = max(snap.gauges.get(name, 0) for snap in snapshots)
        merged.gauges["server.concurrency"] = self.concurrency
        merged.gauges["server.live"] = int(self.state == "LIVE")
        return merged

    async def clusters_text(self) -> str:
        answers = await self.ask("clusters") if self.workers_ready else []
        return answers[0] if answers and answers[0] else ""

    def config_dump(self) -> dict[str, Any]:
        return config_dump(self.raw, self.version)

    def server_info(self) -> dict[str, Any]:
        return {
            "version": f"shoal/{__version__}",
            "state": self.state,
            "uptime_current_epoch": f"{int(time.time() - self.started_at)}s",
            "command_line_options": {"config_path": self.path, "concurrency": self.concurrency},
            "workers": [pid for pid, _ in self.workers],
            "healthcheck_failed": self.healthcheck_failed,
        }

    def server_state(self) -> str:
        return self.state

    async def set_healthcheck_failed(self, failed: bool) -> None:
        self.healthcheck_failed = failed
        await self.ask("hc_fail" if failed else "hc_ok")

    async def drain_listeners(self) -> None:
        await self.ask("drain")

    async def tap(self, spec: TapSpec) -> AsyncGenerator[Record | None, None]:
        """Every worker taps with ``spec`` and streams its records here; the merged tap
        enforces ``max`` and ``duration`` across all of them (each worker also stops at
        its own, a safety net should this end of the tap go away unnoticed)."""
        tap_id = next(self._tap_ids)
        merged = self.taps[tap_id] = MergedTap(spec)
        untapped = False
        try:
            answers = await self.ask("tap " + json.dumps({"id": tap_id, "spec": spec.to_dict()}))
            merged.expect(sum(answer is True for answer in answers))
            yield None  # every worker taps now
            async for record in merged.tap.records():
                yield record
            if not merged.all_ended.is_set():  # max reached (or a worker is silent)
                await self.ask(f"untap {tap_id}")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TAP_END_WAIT):
                        await merged.all_ended.wait()
            untapped = True
            yield {"dropped": merged.dropped}
        finally:
            del self.taps[tap_id]
            merged.tap.close()
            if not untapped:  # the client left: stop the workers' parts
                _spawn(self.ask(f"untap {tap_id}"))

    def _tap_event(self, message: dict[str, Any]) -> None:
        merged = self.taps.get(message["tap"])
        if merged is None:
            return  # a record after the tap ended here
        if "record" in message:
            merged.tap.offer(message["record"])
        else:
            merged.worker_ended(message["dropped"])


def run_proxy(
    path: str, concurrency: int = 1, drain_time: float = 10.0, watch: bool = False
) -> int:
    """Entry point of ``shoal proxy``; returns the exit code."""
    try:
        read_config(path)  # fail fast, before forking, with the file and field named
    except ConfigError as exc:
        print(f"shoal proxy: invalid config: {exc}", file=sys.stderr)
        return 2
    try:
        if concurrency <= 1:
            return run_on_uvloop(_run_single(path, drain_time, watch))
        supervisor = Supervisor(path, concurrency, drain_time, watch)
        supervisor.fork_workers()
        return run_on_uvloop(supervisor.run())
    except FatalError as exc:
        print(f"shoal proxy: {exc}", file=sys.stderr)
        return 1


async def _startup_report(pid: int, reader: asyncio.StreamReader) -> str | None:
    """None when the worker says it is ready, else why it is not."""
    line = await reader.readline()
    if not line:
        return f"worker {pid} exited before it was ready"
    report = json.loads(line)
    if "error" in report:
        return f"worker {pid}: {report['error']}"
    return None


def run_on_uvloop(main: Coroutine[Any, Any, int]) -> int:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
