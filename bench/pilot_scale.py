#!/usr/bin/env python3
"""Control-plane scale benchmark: ``shoal pilot`` serving N services x M endpoints to C
simulated Envoy sidecars over ADS (state of the world), pilot pinned to one core.

    python bench/pilot_scale.py [--services 1000] [--endpoints 10] [--clients 2000]
                                [--changes 5] [--full-pushes 2] [--workers 1]
                                [--clients-per-channel 1] [--profile] [--out bench/out]

Phases: (a) every client connects at once; time until each has its full config (CDS, the
EDS of every cluster, LDS, RDS). (b) One endpoint of svc-0 is added or removed over the REST
API; time until each client's EDS shows it, and which response types were sent. (c) A new
service appears (CDS + EDS + RDS change); time until every client has all of it. Pilot's CPU
seconds and RSS per phase come from /proc; the clients run in separate processes on the
other core(s). See bench/README.md for the setup and caveats.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from common import free_port, tail

HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
WORKER, PROFILED = "_clients", "_pilot"  # hidden first arguments: this script's child roles
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SHORT = {CLUSTER: "CDS", ENDPOINT: "EDS", LISTENER: "LDS", ROUTE: "RDS"}
SERVICE_PORT, INSTANCE_PORT = 80, 8080
# Targets from the issue (1,000 services x 10 endpoints, 2,000 clients, one core).
RSS_LIMIT_MB = 1024.0
FULL_PUSH_LIMIT_S = 5.0
ENDPOINT_P99_LIMIT_S = 1.0


def cluster_of(host: str) -> str:
    return f"outbound|{SERVICE_PORT}||{host}"


def address_of(k: int) -> str:
    """The k-th distinct address in 10.0.0.0/8 (k from 1)."""
    return f"10.{k >> 16 & 255}.{k >> 8 & 255}.{k & 255}"


# --- the simulated sidecars (worker processes) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decoded:
    """What a client needs of one resource: its name and what it refers to (a cluster's EDS
    service name, a listener's RDS names, an assignment's endpoints, a route table's virtual
    hosts)."""

    name: str
    refs: frozenset[str]


_decoded: dict[str, dict[bytes, Decoded]] = {t: {} for t in SHORT}


def _decoders() -> dict[str, Callable[[bytes], Decoded]]:
    """Per type, bytes → Decoded (imported here: the coordinator does not need the protos)."""
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    def cluster(value: bytes) -> Decoded:
        c = cluster_pb2.Cluster.FromString(value)
        eds = c.eds_cluster_config.service_name or c.name
        return Decoded(
            c.name, frozenset([eds]) if c.type == cluster_pb2.Cluster.EDS else frozenset()
        )

    def assignment(value: bytes) -> Decoded:
        a = endpoint_pb2.ClusterLoadAssignment.FromString(value)
        return Decoded(
            a.cluster_name,
            frozenset(
                f"{e.endpoint.address.socket_address.address}:"
                f"{e.endpoint.address.socket_address.port_value}"
                for group in a.endpoints
                for e in group.lb_endpoints
            ),
        )

    def listener(value: bytes) -> Decoded:
        lis = listener_pb2.Listener.FromString(value)
        names = set()
        for chain in lis.filter_chains:
            for f in chain.filters:
                if f.typed_config.type_url.endswith(".HttpConnectionManager"):
                    hcm = hcm_pb2.HttpConnectionManager.FromString(f.typed_config.value)
                    if hcm.HasField("rds"):
                        names.add(hcm.rds.route_config_name)
        return Decoded(lis.name, frozenset(names))

    def routes(value: bytes) -> Decoded:
        r = route_pb2.RouteConfiguration.FromString(value)
        return Decoded(r.name, frozenset(v.name for v in r.virtual_hosts))

    return {CLUSTER: cluster, ENDPOINT: assignment, LISTENER: listener, ROUTE: routes}


_responses: dict[tuple[Any, ...], list[Decoded]] = {}


def _decode_all(response: Any, decode: Callable[[bytes], Decoded]) -> list[Decoded]:
    """The decoded resources of a response. Thousands of simulated clients share one core
    here, where real sidecars each have their own: a response whose version, type and
    resources another client already decoded is not decoded again (the key's end bytes
    make equal-sized, equal-version answers with other contents distinct)."""
    items = response.resources
    key = (response.type_url, response.version_info, len(items))
    if items:
        key += (items[0].value, items[-1].value)
    found = _responses.get(key)
    if found is None:
        cache = _decoded[response.type_url]
        found = []
        for any_ in items:
            value = any_.value
            item = cache.get(value)
            if item is None:
                item = cache[value] = decode(value)
            found.append(item)
        _responses[key] = found
    return found


@dataclass(frozen=True, slots=True)
class Expectation:
    """What a client must see after a change: ``address`` in (or, ``present`` False, not in)
    the endpoints of ``cluster``; with ``vhost``, also the cluster in CDS and the virtual
    host in a route table (a new service)."""

    cluster: str
    address: str
    present: bool = True
    vhost: str = ""

    def met_by(self, client: SimClient) -> bool:
        assignment = client.endpoints.get(self.cluster)
        if (assignment is not None and self.address in assignment.refs) != self.present:
            return False
        if self.vhost:
            return self.cluster in client.clusters and any(
                self.vhost in r.refs for r in client.routes.values()
            )
        return True


class SimClient:
    """One sidecar: its own ADS stream, subscribing and ACKing like Envoy (CDS wildcard; EDS
    for the EDS clusters; LDS wildcard once the clusters are warm; RDS for the listeners'
    route tables; subscription changes before the ACK that caused them)."""

    def __init__(self, index: int, pool: ClientPool) -> None:
        self.node_id = f"sim-{index}"
        self.pool = pool
        self.clusters: dict[str, Decoded] = {}
        self.endpoints: dict[str, Decoded] = {}
        self.listeners: dict[str, Decoded] = {}
        self.routes: dict[str, Decoded] = {}
        self.names: dict[str, list[str]] = {}  # subscribed type -> names ([] = wildcard)
        self.version: dict[str, str] = {}
        self.nonce: dict[str, str] = {}
        self.full_at: float | None = None
        self.met_at: float | None = None
        self.counts: Counter[str] = Counter()  # responses by type since the last arm
        self._call: Any = None
        self._node_sent = False

    async def run(self, channel: Any) -> None:
        """Keep a stream open; when it breaks, open another after a jittered exponential
        backoff (as Envoy does: 0.5 s base, 30 s cap) and subscribe afresh."""
        attempt = 0
        while True:
            try:
                await self._stream(channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                code, details = getattr(exc, "code", None), getattr(exc, "details", None)
                if callable(code) and callable(details):  # AioRpcError: skip the debug string
                    error = f"{code().name}: {details()}"
                else:
                    error = f"{type(exc).__name__}: {exc}"[:300]
                self.pool.broke(error, time.monotonic())
            attempt += 1
            await asyncio.sleep(random.uniform(0, min(30.0, 0.5 * 2**attempt)))

    async def _stream(self, channel: Any) -> None:
        import grpc
        from envoy.service.discovery.v3 import ads_pb2_grpc

        self.names, self.version, self.nonce, self._node_sent = {}, {}, {}, False
        self._call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(
            channel
        ).StreamAggregatedResources()
        await self._request(CLUSTER, [])
        while True:
            response = await self._call.read()
            if response is grpc.aio.EOF:
                raise ConnectionError("pilot ended the stream")
            await self._on_response(response, time.monotonic())

    async def _request(self, type_url: str, names: list[str]) -> None:
        from envoy.service.discovery.v3 import discovery_pb2

        self.names[type_url] = names
        request = discovery_pb2.DiscoveryRequest(
            version_info=self.version.get(type_url, ""),
            response_nonce=self.nonce.get(type_url, ""),
            type_url=type_url,
            resource_names=names,
        )
        if not self._node_sent:  # like Envoy: the node goes with the first request only
            request.node.id, request.node.cluster = self.node_id, "sim"
            self._node_sent = True
        await self._call.write(request)

    async def _on_response(self, response: Any, now: float) -> None:
        type_url = str(response.type_url)
        resources = _decode_all(response, self.pool.decoders[type_url])
        self.counts[SHORT[type_url]] += 1
        self.counts[SHORT[type_url] + " resources"] += len(resources)
        self.counts[SHORT[type_url] + " bytes"] += response.ByteSize()
        self.version[type_url], self.nonce[type_url] = response.version_info, response.nonce
        follow: list[tuple[str, list[str]]] = []  # requests that go before this ACK
        if type_url == CLUSTER:
            self.clusters = {r.name: r for r in resources}
            eds = sorted({n for r in resources for n in r.refs})
            if eds != self.names.get(ENDPOINT):
                follow.append((ENDPOINT, eds))
        elif type_url == ENDPOINT:
            self.endpoints.update((r.name, r) for r in resources)
        elif type_url == LISTENER:
            self.listeners = {r.name: r for r in resources}
            rds = sorted({n for r in resources for n in r.refs})
            if rds != self.names.get(ROUTE):
                follow.append((ROUTE, rds))
        else:
            self.routes.update((r.name, r) for r in resources)
        if LISTENER not in self.names and self._warm():
            follow.append((LISTENER, []))
        self._check(now)
        for follow_type, names in follow:
            await self._request(follow_type, names)
        await self._request(type_url, self.names[type_url])  # the ACK

    def _warm(self) -> bool:
        eds = self.names.get(ENDPOINT)
        return eds is not None and all(n in self.endpoints for n in eds)

    def _check(self, now: float) -> None:
        if self.full_at is None and self._warm() and self.listeners:
            rds = self.names.get(ROUTE)
            if rds is not None and all(n in self.routes for n in rds):
                self.full_at = now
                self.pool.done_one("full")
        expect = self.pool.expect
        if expect is not None and self.met_at is None and expect.met_by(self):
            self.met_at = now
            self.pool.done_one("met")


class ClientPool:
    """The clients of one worker process, driven by JSON-line commands on stdin:
    ``connect``, ``arm`` (an expectation), ``collect`` (wait for it), ``quit``."""

    def __init__(self, target: str, first: int, count: int, per_channel: int) -> None:
        self.target = target
        self.per_channel = per_channel
        self.decoders = _decoders()
        self.clients = [SimClient(first + i, self) for i in range(count)]
        self.expect: Expectation | None = None
        self.breaks: list[tuple[str, float]] = []  # (error, when) of every broken stream
        self._breaks_before = 0
        self._counting = "full"  # what _done counts: clients with "full" config, or "met"
        self._done = 0
        self._all_done = asyncio.Event()
        self._channels: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []

    def done_one(self, kind: str) -> None:
        if kind == self._counting:
            self._done += 1
            if self._done >= len(self.clients):
                self._all_done.set()

    def broke(self, error: str, when: float) -> None:
        self.breaks.append((error, when))

    async def _wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_done.wait(), timeout)

    async def connect(self, timeout: float) -> dict[str, Any]:
        import grpc

        options = [
            ("grpc.max_receive_message_length", 256 * 1024 * 1024),
            # channels with equal arguments share one TCP connection through gRPC's global
            # subchannel pool; a sidecar has a connection of its own
            ("grpc.use_local_subchannel_pool", 1),
        ]
        self._counting, self._done, self._all_done = "full", 0, asyncio.Event()
        for i, client in enumerate(self.clients):
            if i % self.per_channel == 0:
                self._channels.append(grpc.aio.insecure_channel(self.target, options=options))
            self._tasks.append(asyncio.create_task(client.run(self._channels[-1])))
        await self._wait(timeout)
        return {
            "full_at": [c.full_at for c in self.clients],
            "breaks": self.breaks,
            "counts": self._counts(),
        }

    def arm(self, expect: Expectation) -> dict[str, Any]:
        self.expect = expect
        self._counting, self._done, self._all_done = "met", 0, asyncio.Event()
        for client in self.clients:
            client.met_at, client.counts = None, Counter()
        self._breaks_before = len(self.breaks)
        met = sum(1 for c in self.clients if expect.met_by(c))
        return {"already": met, "clients": len(self.clients)}

    async def collect(self, timeout: float, grace: float) -> dict[str, Any]:
        await self._wait(timeout)
        await asyncio.sleep(grace)  # responses of other types that come later still count
        self.expect = None
        return {
            "met_at": [c.met_at for c in self.clients if c.met_at is not None],
            "missing": sum(1 for c in self.clients if c.met_at is None),
            "breaks": self.breaks[self._breaks_before :],
            "counts": self._counts(),
        }

    def _counts(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for client in self.clients:
            total.update(client.counts)
        return dict(total)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in self._channels:
            await channel.close()


async def worker_main(argv: list[str]) -> int:
    """``_clients TARGET FIRST COUNT PER_CHANNEL``: run COUNT clients, obey stdin."""
    target, first, count, per_channel = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    pool = ClientPool(target, first, count, per_channel)
    reply({"op": "loaded"})
    try:
        while line := await asyncio.to_thread(sys.stdin.readline):
            cmd = json.loads(line)
            op = cmd.pop("op")
            if op == "connect":
                reply(await pool.connect(cmd["timeout"]))
            elif op == "arm":
                reply(pool.arm(Expectation(**cmd)))
            elif op == "collect":
                reply(await pool.collect(cmd["timeout"], cmd["grace"]))
            elif op == "quit":
                break
    finally:
        await pool.close()
    return 0


def reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


# --- pilot under cProfile ---------------------------------------------------------------------


def profiled_pilot(argv: list[str]) -> int:
    """``_pilot DIR ARGS...``: ``shoal ARGS`` under cProfile. SIGUSR1 writes what ran since
    the previous one to DIR/<n>.prof and starts afresh, so each phase has its own profile."""
    import cProfile

    from shoal.cli.main import main as shoal_main

    out, count = Path(argv[0]), 0
    profiler = cProfile.Profile()

    def dump() -> None:
        nonlocal count
        profiler.disable()
        profiler.dump_stats(out / "next.tmp")
        os.replace(out / "next.tmp", out / f"{count}.prof")  # appears complete
        count += 1

    def next_phase(signum: int, frame: object) -> None:
        nonlocal profiler
        dump()
        profiler = cProfile.Profile()
        profiler.enable()

    signal.signal(signal.SIGUSR1, next_phase)
    profiler.enable()
    try:
        return shoal_main(argv[1:])
    finally:
        dump()


# --- the coordinator: processes and /proc -----------------------------------------------------

_started: list[subprocess.Popen[bytes]] = []


def spawn(cmd: list[str], cpus: str, log: Path, pipes: bool = False) -> subprocess.Popen[bytes]:
    """Start ``cmd`` pinned to ``cpus`` (taskset execs it, so the pid is the command's)."""
    with log.open("wb") as err:
        proc = subprocess.Popen(
            ["taskset", "-c", cpus, *cmd],
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else err,
            stderr=err,
        )
    _started.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> bool:
    """SIGTERM, SIGKILL after ``timeout``; True when SIGTERM was enough."""
    clean = True
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            clean = False
            proc.kill()
            proc.wait(timeout)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()
    if proc in _started:
        _started.remove(proc)
    return clean


def cpu_s(pid: int) -> float:
    """utime + stime of a process, all its threads, in seconds (0 once it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    f = raw[raw.rindex(")") + 2 :].split()  # f[0] is field 3 (state)
    return (int(f[11]) + int(f[12])) / CLK_TCK


def status_mb(pid: int, key: str) -> float:
    """A /proc/<pid>/status size (VmRSS, VmHWM) in MB."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def status_field(pid: int, key: str) -> str:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return line.split(":", 1)[1].strip()
    return "?"


def core_busy_s(cpus: Iterable[int]) -> float:
    """user + nice + system seconds of the given cores since boot: process time only, not
    the softirq work of loopback traffic, which belongs to no process (as in bench/run.py)."""
    total = 0
    wanted = {f"cpu{c}" for c in cpus}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *vals = line.split()
        if name in wanted:
            total += int(vals[0]) + int(vals[1]) + int(vals[2])
    return total / CLK_TCK


def pilot_source() -> str:
    """Which pilot was measured: the commit, plus the files of src/shoal/pilot that differ
    from it (others may be editing them while this runs)."""
    root = HERE.parent

    def git(*argv: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["git", *argv], cwd=root, capture_output=True, text=True, timeout=10, check=True
            )
            return out.stdout.strip()
        return ""

    head = git("rev-parse", "--short", "HEAD") or "unknown commit"
    status = git("status", "--porcelain", "--", "src/shoal/pilot")
    dirty = [line.split(maxsplit=1)[-1] for line in status.splitlines()]
    return head + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")


def rest(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One call to pilot's REST API; the decoded JSON answer (raises unless 2xx)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        text = resp.read()
    finally:
        conn.close()
    if not 200 <= resp.status < 300:
        raise RuntimeError(f"{method} {path}: HTTP {resp.status} {text[:200]!r}")
    return json.loads(text) if text.strip() else None


def wait_ready(proc: subprocess.Popen[bytes], port: int, timeout: float) -> str:
    """Poll pilot's /ready; "" when it answers 200, else why not."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with code {proc.returncode}"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/ready")
            status = conn.getresponse().status
            if status == 200:
                return ""
            last = f"HTTP {status}"
        except (OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
        time.sleep(0.1)
    return f"not ready after {timeout:.0f}s ({last})"


# --- the coordinator: setup, phases, report ---------------------------------------------------


def populate(path: Path, services: int, endpoints: int) -> float:
    """Write the registry file through EmbeddedRegistry's public ``register``; seconds."""
    from shoal.pilot.registry.embedded import EmbeddedRegistry

    start = time.perf_counter()
    registry = EmbeddedRegistry(str(path))
    try:
        for i in range(services):
            for j in range(endpoints):
                k = 1 + i * endpoints + j
                registry.register(
                    f"svc-{i}",
                    address_of(k),
                    INSTANCE_PORT,
                    service_port=SERVICE_PORT,
                    ttl=0,
                )
    finally:
        registry.close()
    return time.perf_counter() - start


@dataclass
class Phase:
    """One measured step: wall time, pilot's CPU and RSS, client latencies (s, one per
    client that got there), and the responses the clients received, by type."""

    name: str
    repeats: int = 1
    wall_s: float = 0.0  # measured windows (for changes: until 0.5 s after the last client)
    pilot_cpu_s: float = 0.0
    clients_cpu_s: float = 0.0
    others_on_pilot_core_s: float = 0.0
    pilot_rss_mb: float = 0.0  # the highest VmRSS sampled (every 50 ms) during the phase
    latencies: list[float] = field(default_factory=list)
    missing: int = 0  # clients that never got there within the timeout
    expected: int = 0  # clients that should have (summed over repeats)
    breaks: int = 0  # streams that broke (the client reconnected)
    counts: dict[str, int] = field(default_factory=dict)
    rest_ms: float = 0.0  # the REST call that made the change
    worst: list[float] = field(default_factory=list)  # per change: when the last client had it
    note: str = ""

    def pct(self, q: float) -> float | None:
        """The q-quantile over every client expected to get there; inf for those that did
        not."""
        ordered = sorted(self.latencies) + [float("inf")] * self.missing
        if not ordered:
            return None
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


class Bench:
    """Pilot, the client workers, and the measurements around each phase."""

    def __init__(self, args: argparse.Namespace, pilot: subprocess.Popen[bytes]) -> None:
        self.args = args
        self.pilot = pilot
        self.workers: list[subprocess.Popen[bytes]] = []
        self.profiles: list[str] = []  # phase names, in the order of pilot's profile dumps

    # talking to the workers
    def send(self, message: dict[str, Any]) -> None:
        for w in self.workers:
            assert w.stdin is not None
            w.stdin.write((json.dumps(message) + "\n").encode())
            w.stdin.flush()

    def receive(self) -> list[dict[str, Any]]:
        answers = []
        for w in self.workers:
            assert w.stdout is not None
            line = w.stdout.readline()
            if not line:
                raise RuntimeError(f"client worker {w.pid} exited (code {w.poll()})")
            answers.append(json.loads(line))
        return answers

    # measuring
    def measure(self, phase: Phase, action: Callable[[], None]) -> Phase:
        """Run ``action`` and add its wall time, CPU seconds and peak RSS to ``phase``. The
        window includes what pilot does after the last client has the change (ACKs)."""
        pilot_pid, clients = self.pilot.pid, [w.pid for w in self.workers]
        done = threading.Event()

        def sample_rss() -> None:  # VmHWM only knows the peak of the whole run
            while not done.wait(0.05):
                phase.pilot_rss_mb = max(phase.pilot_rss_mb, status_mb(pilot_pid, "VmRSS"))

        sampler = threading.Thread(target=sample_rss, daemon=True)
        core0, cpu0 = core_busy_s(self.args.pilot_cpus), cpu_s(pilot_pid)
        client0, t0 = sum(cpu_s(p) for p in clients), time.monotonic()
        sampler.start()
        try:
            action()
        finally:
            done.set()
            sampler.join()
        t1, cpu1 = time.monotonic(), cpu_s(pilot_pid)
        client1, core1 = sum(cpu_s(p) for p in clients), core_busy_s(self.args.pilot_cpus)
        phase.wall_s += t1 - t0
        phase.pilot_cpu_s += cpu1 - cpu0
        phase.clients_cpu_s += client1 - client0
        phase.others_on_pilot_core_s += max(0.0, (core1 - core0) - (cpu1 - cpu0))
        phase.pilot_rss_mb = max(phase.pilot_rss_mb, status_mb(pilot_pid, "VmRSS"))
        return phase

    def profile_mark(self, name: str) -> None:
        """Close pilot's profile of the phase ``name`` (with --profile)."""
        if not self.args.profile:
            return
        index = len(self.profiles)
        self.profiles.append(name)
        self.pilot.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 60
        while not (self.args.profile_dir / f"{index}.prof").exists():
            if time.monotonic() > deadline or self.pilot.poll() is not None:
                raise RuntimeError("pilot wrote no profile after SIGUSR1")
            time.sleep(0.05)

    # the phases
    def connect(self) -> Phase:
        phase = Phase("(a) connect + full config")
        answers: list[dict[str, Any]] = []

        def run() -> None:
            start = time.monotonic()
            self.send({"op": "connect", "timeout": self.args.timeout})
            answers.extend(self.receive())
            for a in answers:
                phase.latencies += [t - start for t in a["full_at"] if t is not None]
                phase.missing += sum(1 for t in a["full_at"] if t is None)
                phase.counts = dict(Counter(phase.counts) + Counter(a["counts"]))
            self.note_breaks(phase, [b for a in answers for b in a["breaks"]], start)

        phase.expected = self.args.clients
        self.measure(phase, run)
        return phase

    @staticmethod
    def note_breaks(phase: Phase, breaks: list[tuple[str, float]], start: float) -> None:
        """Count broken streams and say why and when, in the phase's note."""
        if not breaks:
            return
        phase.breaks += len(breaks)
        when = [t - start for _, t in breaks]
        errors = Counter(e for e, _ in breaks)
        phase.note += (
            f" {len(breaks)} streams broke (and reconnected), {min(when):.1f} to "
            f"{max(when):.1f} s after the start: "
            + "; ".join(f"{n} x {e}" for e, n in errors.most_common())
            + ";"
        )

    def change(self, phase: Phase, expect: Expectation, make: Callable[[], object]) -> None:
        """Arm the clients with ``expect``, make the change, wait until every client saw it."""
        self.send({"op": "arm", **asdict(expect)})
        armed = self.receive()
        already = sum(a["already"] for a in armed)
        phase.expected += sum(a["clients"] for a in armed)
        if already:
            phase.note += f" {already} clients met the expectation before the change;"
        latencies: list[float] = []

        def run() -> None:
            start = time.monotonic()
            make()
            phase.rest_ms = max(phase.rest_ms, (time.monotonic() - start) * 1000)
            self.send({"op": "collect", "timeout": self.args.timeout, "grace": 0.5})
            for a in self.receive():
                latencies.extend(t - start for t in a["met_at"])
                phase.missing += a["missing"]
                self.note_breaks(phase, a["breaks"], start)
                phase.counts = dict(Counter(phase.counts) + Counter(a["counts"]))

        self.measure(phase, run)
        phase.latencies += latencies
        worst = max(latencies) if latencies else float("nan")
        phase.worst.append(worst)
        print(
            f"   {expect.cluster} {expect.address} present={expect.present}: all in {worst:.3f} s",
            flush=True,
        )

    def endpoint_changes(self) -> Phase:
        """Add an endpoint to svc-0, remove it, add another, ... (``--changes`` in all)."""
        phase = Phase(f"(b) one endpoint of svc-0 changed, x{self.args.changes}")
        phase.repeats = max(1, self.args.changes)
        port, cluster = self.args.http_port, cluster_of("svc-0")
        for n in range(self.args.changes):
            address = address_of((254 << 16) + n // 2 + 1)  # 10.254.0.1, 10.254.0.2, ...
            instances = "/v1/services/svc-0/instances"
            if n % 2 == 0:
                body = {"address": address, "port": INSTANCE_PORT, "service_port": SERVICE_PORT}
                make = partial(rest, port, "POST", instances, {**body, "ttl": 0})
            else:
                make = partial(rest, port, "DELETE", f"{instances}/{address}:{INSTANCE_PORT}")
            expect = Expectation(cluster, f"{address}:{INSTANCE_PORT}", present=n % 2 == 0)
            self.change(phase, expect, make)
            time.sleep(0.3)
        return phase

    def full_pushes(self) -> Phase:
        """Register ``--full-pushes`` new services, one at a time."""
        phase = Phase(f"(c) new service (CDS+EDS+RDS), x{self.args.full_pushes}")
        phase.repeats = max(1, self.args.full_pushes)
        for n in range(self.args.full_pushes):
            host, address = f"svc-new-{n}", address_of((253 << 16) + n + 1)
            expect = Expectation(
                cluster_of(host), f"{address}:{INSTANCE_PORT}", vhost=f"{host}:{SERVICE_PORT}"
            )
            body = {"address": address, "port": INSTANCE_PORT, "service_port": SERVICE_PORT}
            path = f"/v1/services/{host}/instances"
            self.change(
                phase, expect, partial(rest, self.args.http_port, "POST", path, {**body, "ttl": 0})
            )
            time.sleep(0.3)
        return phase


def fmt_s(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    return "never" if value == float("inf") else f"{value:.3f}{unit}"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "**FAIL**")


def report(args: argparse.Namespace, info: dict[str, Any], phases: list[Phase]) -> str:
    connect, endpoint, full = phases
    channels = (
        "one gRPC channel (TCP connection) per client"
        if args.clients_per_channel == 1
        else f"{args.clients_per_channel} clients (HTTP/2 streams) per gRPC channel"
    )
    lines = [
        f"# shoal pilot at scale: {args.services} services x {args.endpoints} endpoints, "
        f"{args.clients} ADS clients (SotW)",
        "",
        f"Command: `{info['command']}`",
        "",
        f"Pilot on CPU {info['pilot_cpus_allowed']} (Cpus_allowed_list), clients in "
        f"{args.workers} process(es) on CPU {info['client_cpus']}, {channels}; registry "
        f"written in {info['setup_s']:.1f} s, pilot ready in {info['startup_s']:.1f} s "
        f"({info['idle_rss_mb']:.0f} MB RSS before clients); pilot source: {info['source']}"
        + ("; **pilot under cProfile: times are inflated**" if args.profile else ""),
        "",
        "| phase | wall s | pilot CPU s (each) | pilot CPU % | clients CPU % | reached "
        "| p50 s | p99 s | max s | xDS received: responses (resources, MB) | pilot peak RSS MB |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|",
    ]
    for p in phases:
        wall = max(p.wall_s, 1e-9)
        counts = ", ".join(
            f"{t} {p.counts.get(t, 0)} ({p.counts.get(t + ' resources', 0)}, "
            f"{p.counts.get(t + ' bytes', 0) / 2**20:.1f})"
            for t in ("CDS", "EDS", "LDS", "RDS")
        )
        each = f" ({p.pilot_cpu_s / p.repeats:.2f})" if p.repeats > 1 else ""
        broke = f", {p.breaks} broke" if p.breaks else ""
        lines.append(
            f"| {p.name} | {p.wall_s:.2f} | {p.pilot_cpu_s:.2f}{each} "
            f"| {100 * p.pilot_cpu_s / wall:.0f} | {100 * p.clients_cpu_s / wall:.0f} "
            f"| {len(p.latencies)}/{p.expected}{broke} | {fmt_s(p.pct(0.5))} "
            f"| {fmt_s(p.pct(0.99))} | {fmt_s(p.pct(1.0))} | {counts} | {p.pilot_rss_mb:.0f} |"
        )
    lines.append(
        f"| idle with the clients, 2 s | 2.00 | {info['idle_cpu_s']:.2f} "
        f"| {50 * info['idle_cpu_s']:.0f} | | | | | | | {info['idle_clients_rss_mb']:.0f} |"
    )
    lines += [
        f"\n{p.name[:3]} per change, the last client had it after (s): "
        + ", ".join(fmt_s(w) for w in p.worst)
        for p in phases
        if p.worst
    ]
    other_types = sum(endpoint.counts.get(t, 0) for t in ("CDS", "LDS", "RDS"))
    eds = endpoint.counts.get("EDS", 0)
    peak = info["peak_rss_mb"]
    cpus = info["pilot_cpus_allowed"]

    def within(p: Phase, q: float, limit: float, ran: bool) -> bool | None:
        value = p.pct(q)
        return None if not ran or value is None else value <= limit

    rows = [
        (
            f"pilot RSS ≤ 1 GB with {args.clients} clients",
            f"peak (VmHWM) {peak:.0f} MB, idle with clients {info['idle_clients_rss_mb']:.0f} MB",
            peak <= RSS_LIMIT_MB,
        ),
        ("pilot on one core", f"CPU {cpus}", cpus.isdigit()),
        (
            "full config reaches every client ≤ 5 s (all connect at once)",
            f"last client {fmt_s(connect.pct(1.0), ' s')}",
            within(connect, 1.0, FULL_PUSH_LIMIT_S, True),
        ),
        (
            "full push (new service) reaches every client ≤ 5 s",
            f"last client {fmt_s(full.pct(1.0), ' s')}",
            within(full, 1.0, FULL_PUSH_LIMIT_S, args.full_pushes > 0),
        ),
        (
            "one endpoint change reaches all clients ≤ 1 s p99",
            f"p99 {fmt_s(endpoint.pct(0.99), ' s')}",
            within(endpoint, 0.99, ENDPOINT_P99_LIMIT_S, args.changes > 0),
        ),
        (
            "an endpoint change is EDS only, one response per client",
            f"CDS+LDS+RDS {other_types}, EDS {eds} ({endpoint.counts.get('EDS resources', 0)} "
            f"resources) for {endpoint.expected} clients x changes",
            None if not args.changes else other_types == 0 and eds == endpoint.expected,
        ),
    ]
    lines += ["", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {text} | {value} | {verdict(ok)} |" for text, value, ok in rows]
    lines += [
        "",
        "*reached*: clients that got there / all clients, summed over the changes (*broke*: "
        "streams that broke and reconnected); a client that never got there counts as never "
        "in p99 and max. Latencies run from just before the REST call that made the change (it "
        f"took at most {endpoint.rest_ms:.0f} ms in (b), {full.rest_ms:.0f} ms in (c); pilot "
        "then debounces 0.1 s) until the client received the response that completed it; (a) "
        "from the moment the clients were told to connect. Istio's published reference: istiod "
        "uses 1 vCPU and 1.5 GB for 1,000 services and 2,000 sidecars.",
    ]
    notes = [f"- {p.name}: {p.note.strip()}" for p in phases if p.note]
    if info["warnings"]:
        notes += [f"- {w}" for w in info["warnings"]]
    if notes:
        lines += ["", "Problems:", "", *notes]
    return "\n".join(lines) + "\n"


def summarize_profiles(directory: Path, names: list[str], out: Path) -> None:
    """Each phase's profile as text: top functions by own time and by cumulative time."""
    import io
    import pstats

    text = io.StringIO()
    for index, name in enumerate([*names, "shutdown"]):
        path = directory / f"{index}.prof"
        if not path.exists():
            continue
        stats = pstats.Stats(str(path), stream=text)
        text.write(f"\n===== {name} ({path}) =====\n")
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(40)
    out.write_text(text.getvalue())


def run(args: argparse.Namespace, work: Path) -> int:
    cpus = sorted(os.sched_getaffinity(0))
    args.pilot_cpus = [cpus[0]]
    client_cpus = cpus[1:] or cpus[:1]
    os.sched_setaffinity(0, client_cpus)  # this process too: pilot's core is pilot's alone
    info: dict[str, Any] = {
        "command": " ".join([".venv/bin/python", "bench/pilot_scale.py", *sys.argv[1:]]),
        "client_cpus": ",".join(map(str, client_cpus)),
        "warnings": [] if len(cpus) > 1 else ["one CPU only: pilot and the clients share it"],
    }
    info["source"] = pilot_source()
    db = work / "registry.db"
    print(f"== registry: {args.services} services x {args.endpoints} endpoints", flush=True)
    info["setup_s"] = populate(db, args.services, args.endpoints)
    (work / "rules").mkdir()
    xds_port, args.http_port = free_port(), free_port()
    pilot_args = [
        "pilot",
        "--config-dir",
        str(work / "rules"),
        "--xds-address",
        f"127.0.0.1:{xds_port}",
        "--http-address",
        f"127.0.0.1:{args.http_port}",
        "--registry",
        f"embedded:{db}",
    ]
    if args.profile:
        args.profile_dir = args.out / "pilot-profile"
        shutil.rmtree(args.profile_dir, ignore_errors=True)
        args.profile_dir.mkdir(parents=True)
        cmd = [sys.executable, __file__, PROFILED, str(args.profile_dir), *pilot_args]
    else:
        cmd = [sys.executable, "-m", "shoal", *pilot_args]
    log = args.out / "pilot-scale-pilot.log"
    print(f"== pilot: {' '.join(cmd[1:])}", flush=True)
    start = time.monotonic()
    pilot = spawn(cmd, str(args.pilot_cpus[0]), log)
    bench = Bench(args, pilot)
    try:
        if err := wait_ready(pilot, args.http_port, args.start_timeout):
            print(f"pilot failed to start: {err}\n{tail(log)}", file=sys.stderr)
            return 1
        info["startup_s"] = time.monotonic() - start
        info["pilot_cpus_allowed"] = status_field(pilot.pid, "Cpus_allowed_list")
        time.sleep(0.5)
        info["idle_rss_mb"] = status_mb(pilot.pid, "VmRSS")
        bench.profile_mark("startup")

        per_worker = [
            args.clients // args.workers + (i < args.clients % args.workers)
            for i in range(args.workers)
        ]
        first = 0
        for i, count in enumerate(per_worker):
            cmd = [
                sys.executable,
                __file__,
                WORKER,
                f"127.0.0.1:{xds_port}",
                str(first),
                str(count),
                str(args.clients_per_channel),
            ]
            bench.workers.append(
                spawn(cmd, info["client_cpus"], args.out / f"pilot-scale-clients-{i}.log", True)
            )
            first += count
        bench.receive()  # "loaded": imports done, nothing connected yet

        print(f"== (a) {args.clients} clients connect", flush=True)
        connect = bench.connect()
        print(f"   all full in {fmt_s(connect.pct(1.0), ' s')}", flush=True)
        bench.profile_mark("connect")
        time.sleep(1.0)
        cpu0 = cpu_s(pilot.pid)
        time.sleep(2.0)
        info["idle_cpu_s"] = cpu_s(pilot.pid) - cpu0
        info["idle_clients_rss_mb"] = status_mb(pilot.pid, "VmRSS")
        bench.profile_mark("idle")

        print(f"== (b) {args.changes} endpoint changes", flush=True)
        endpoint = bench.endpoint_changes()
        bench.profile_mark("endpoint changes")
        print(f"== (c) {args.full_pushes} new services", flush=True)
        full = bench.full_pushes()
        bench.profile_mark("full pushes")
        info["peak_rss_mb"] = status_mb(pilot.pid, "VmHWM")
        if pilot.poll() is not None:
            info["warnings"].append(f"pilot exited during the run (code {pilot.returncode})")
        nacks = rest(args.http_port, "GET", "/debug/mesh").get("nacks", 0)
        if nacks:
            info["warnings"].append(f"pilot counted {nacks} NACKs")
        phases = [connect, endpoint, full]
        busy = {p.name: p.others_on_pilot_core_s / max(p.wall_s, 1e-9) for p in phases}
        info["warnings"] += [
            f"other processes used {100 * share:.0f}% of pilot's core during {name}"
            for name, share in busy.items()
            if share > 0.05
        ]
    finally:
        with contextlib.suppress(Exception):
            bench.send({"op": "quit"})
        for w in bench.workers:
            stop(w, timeout=10.0)
        if not stop(pilot):
            print("pilot did not exit within 15 s of SIGTERM: killed", file=sys.stderr)
    table = report(args, info, phases)
    print("\n" + table)
    (args.out / "pilot_scale.md").write_text(table)
    doc = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "info": info,
        "phases": [asdict(p) for p in phases],
    }
    (args.out / "pilot_scale.json").write_text(json.dumps(doc, indent=2) + "\n")
    if args.profile:
        summarize_profiles(args.profile_dir, bench.profiles, args.out / "pilot-profile.txt")
        print(f"profiles: {args.profile_dir}/<n>.prof, summary {args.out / 'pilot-profile.txt'}")
    print(f"wrote {args.out / 'pilot_scale.md'} and {args.out / 'pilot_scale.json'}")
    return 0


def main() -> int:
    if sys.argv[1:2] == [WORKER]:
        return asyncio.run(worker_main(sys.argv[2:]))
    if sys.argv[1:2] == [PROFILED]:
        return profiled_pilot(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--services", type=int, default=1000, help="services svc-<i>, port 80")
    ap.add_argument("--endpoints", type=int, default=10, help="endpoints per service")
    ap.add_argument("--clients", type=int, default=2000, help="simulated sidecars (ADS streams)")
    ap.add_argument("--changes", type=int, default=5, help="endpoint changes in phase (b)")
    ap.add_argument("--full-pushes", type=int, default=2, help="new services in phase (c)")
    ap.add_argument("--workers", type=int, default=1, help="client processes")
    ap.add_argument(
        "--clients-per-channel",
        type=int,
        default=1,
        help="ADS streams sharing one gRPC channel (TCP connection)",
    )
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait per phase")
    ap.add_argument("--start-timeout", type=float, default=120.0, help="seconds for pilot to start")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="run pilot under cProfile, one profile per phase (slows it down)",
    )
    ap.add_argument("--out", type=Path, default=HERE / "out", help="results and logs")
    args = ap.parse_args()
    if min(args.services, args.endpoints, args.clients, args.workers) < 1:
        ap.error("--services, --endpoints, --clients and --workers must be at least 1")
    if args.services * args.endpoints >= 1 << 24:
        ap.error("at most 16,777,215 endpoints (one 10.0.0.0/8)")
    if shutil.which("taskset") is None:
        ap.error("taskset not found (Debian package util-linux)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # every client is a socket in pilot and in a worker; children inherit
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    args.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="pilot-scale-", dir=args.out))
    try:
        return run(args, work)
    finally:
        for proc in list(_started):
            stop(proc, timeout=5.0)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the finally blocks have stopped every process by now
        sys.exit("interrupted")
