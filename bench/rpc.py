#!/usr/bin/env python3
"""RPC through the proxy: CPU per request for Dubbo, SOFA Bolt and Motan2 against HTTP/1.1,
all through ONE `shoal proxy` process (one bootstrap, one listener per protocol), in one run.

    python bench/rpc.py [--duration 10] [--warmup 2] [--connections 16] [--runs 3]
                        [--protocols http1,dubbo,bolt,motan2] [--upstream node|replay]
                        [--http-client wrk|asyncio] [--rate 0] [--profile] [--out DIR]

The proxy (``shoal proxy --concurrency 1``, after ``scripts/compile.py`` as the tests run
it) is pinned to the first CPU; the load generator and the upstreams share the last one, as
in bench/run.py. Every protocol gets the same load shape: N connections, one request in
flight on each (closed loop), a warm-up, then a fixed measured window; runs are interleaved
(http1, dubbo, bolt, motan2, http1, ...) and the median of each number is reported. A run
during which other processes used more than ``--max-noise`` % of a core is measured again
(``--retries``), after waiting for the machine to be quiet.

- HTTP/1.1: ``GET /api/items/42`` by wrk (-t1), as bench/run.py, to nginx returning 100
  bytes; the route is one virtual host ("*") with one prefix route, no access log.
- Dubbo, Bolt: the real frames of the Node client (sofa-rpc-node) for
  ``com.example.Greeter.sayHello("world")``, to tests/rpc_peers/server.js (sofa-rpc-node,
  Hessian2), routed by service + method; no access log. ``--upstream replay`` puts a lean
  asyncio server in the Node peer's place that answers every request with the response the
  Node peer gave, so the proxy sees the same bytes at a higher rate than Node can serve.
- Motan2: a request built with Shoal's codec, answered by such a replay server (there is
  no Motan peer here).

RPC load comes from an asyncio (uvloop) generator in this file: pre-encoded frames, a fresh
request id per request (``codec.set_request_id``), every response decoded with the codec
and checked (``frame.ok``, the id it was sent with); a run with any error is invalid. Before
measuring, one request per protocol must come back OK with "hello" in it (HTTP: 200 and the
100-byte body).

CPU µs/request = Δ(utime+stime) of the proxy's process tree over the measured window ÷
requests completed in it. "proxy CPU %" near 100 means the proxy's core was the bottleneck;
well under, the load core (generator + upstream) was, and the proxy ran at a lower load,
with fewer requests per wake-up, which raises its CPU per request: the output says so.
``--http-client asyncio`` drives HTTP/1.1 with the same generator as the RPC protocols, and
``--rate R`` paces every protocol to R requests/s, to compare them at equal load.
``--profile`` samples the proxy with py-spy (--native) under one more run per protocol.

Internal modes (started by the harness itself): ``rpc.py _loadgen SPEC`` and
``rpc.py _replay-upstream PROTOCOL PORT RESPONSE_HEX``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import fcntl
import functools
import itertools
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

from common import free_port, tail
from run import (
    BODY,
    CLK_TCK,
    HIT_HEADERS,
    HIT_PATH,
    children_cpu_s,
    core_times,
    cpu_ticks,
    descendants,
    get,
    nginx_cmd,
    run_wrk,
    spawn,
    stop,
    stop_all,
    wait_ready,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS_DIR = ROOT / "tests" / "rpc_peers"
sys.path.insert(0, str(ROOT))  # for tests.rpc_config (plain dict builders, no pytest)

from tests.rpc_config import action, condition, generic_proxy, matcher, rpc_listener  # noqa: E402

from shoal.codec.rpc.base import RpcCodec, RpcFrame  # noqa: E402
from shoal.codec.rpc.motan2 import M_PROCESS_TIME, simple_encode  # noqa: E402
from shoal.codec.rpc.registry import CODECS  # noqa: E402

PROTOCOLS = ("http1", "dubbo", "bolt", "motan2")
SERVICE, METHOD = "com.example.Greeter", "sayHello"
# com.example.Greeter.sayHello("world") as sofa-rpc-node's client sends it (request id 1)
DUBBO_REQUEST = bytes.fromhex(
    "dabbc20000000000000000010000007e05322e302e3213636f6d2e6578616d706c652e4772656574657205"
    "312e302e300873617948656c6c6f124c6a6176612f6c616e672f537472696e673b05776f726c6448056475"
    "62626f05322e302e320567726f757000047061746813636f6d2e6578616d706c652e477265657465720776"
    "657273696f6e05312e302e305a"
)
BOLT_REQUEST = bytes.fromhex(
    "0101000101000000010100000bb8002c0086000000f4636f6d2e616c697061792e736f66612e7270632e63"
    "6f72652e726571756573742e536f666152657175657374000000077365727669636500000019636f6d2e65"
    "78616d706c652e477265657465723a312e302e3000000015736f66615f686561645f6d6574686f645f6e61"
    "6d650000000873617948656c6c6f00000018736f66615f686561645f7461726765745f7365727669636500"
    "000019636f6d2e6578616d706c652e477265657465723a312e302e304fbc636f6d2e616c697061792e736f"
    "66612e7270632e636f72652e726571756573742e536f666152657175657374950a6d6574686f644e616d65"
    "0d6d6574686f64417267536967731774617267657453657276696365556e697175654e616d650d74617267"
    "65744170704e616d650c7265717565737450726f70736f900873617948656c6c6f567400115b6a6176612e"
    "6c616e672e537472696e676e01106a6176612e6c616e672e537472696e677a19636f6d2e6578616d706c65"
    "2e477265657465723a312e302e304e4d077365727669636519636f6d2e6578616d706c652e477265657465"
    "723a312e302e307a05776f726c64"
)
HTTP_REQUEST = (
    f"GET {HIT_PATH} HTTP/1.1\r\n"
    + "".join(f"{k}: {v}\r\n" for k, v in HIT_HEADERS.items())
    + "\r\n"
).encode()
MAX_ID = (1 << 31) - 1  # Bolt's ids are 32-bit; stay positive everywhere


def motan2_request() -> bytes:
    frame = RpcFrame(
        is_request=True,
        request_id=1,
        service=SERVICE,
        method=METHOD,
        version="1.0.0",
        payload=simple_encode("world"),
    )
    return CODECS["motan2"].encode(frame)


def request_frame(protocol: str) -> bytes:
    return {"dubbo": DUBBO_REQUEST, "bolt": BOLT_REQUEST}.get(protocol) or motan2_request()


def system_ticks(pid: int) -> int:
    """stime of ``pid`` and its descendants: the kernel's share of their CPU time."""
    total = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            raw = Path(f"/proc/{p}/stat").read_text()
            total += int(raw[raw.rindex(")") + 2 :].split()[12])  # field 15, stime
    return total


# --- the load generator (a subprocess on the load core) --------------------------------------


class Load:
    """Counters shared by a generator's connections; only the measured window is recorded."""

    def __init__(self, interval: float) -> None:
        self.interval = interval  # seconds between one connection's sends (0: unpaced)
        self.recording = False
        self.stopping = False
        self.ok = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.latencies_ns: list[int] = []
        self.in_flight = 0
        self.drained = asyncio.Event()

    def record(self, ok: bool, latency_ns: int, why: str) -> None:
        if not self.recording:
            return
        if ok:
            self.ok += 1
            self.latencies_ns.append(latency_ns)
        else:
            self.errors += 1
            if len(self.error_samples) < 5:
                self.error_samples.append(why)


class Client(asyncio.Protocol):
    """One connection, one request in flight; the next goes out when the answer is in."""

    def __init__(self, load: Load, start_at: float) -> None:
        self.load = load
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.next_at = start_at  # pacing (with --rate): when the next request may go
        self.sent_ns = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.schedule()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.load.stopping:
            self.load.errors += 1
            self.load.error_samples.append(f"connection lost: {exc}")
        self.transport = None

    def schedule(self) -> None:
        if self.load.stopping or self.transport is None:
            self.load.in_flight -= 1
            if self.load.in_flight == 0:
                self.load.drained.set()
            return
        if self.load.interval:
            self.next_at += self.load.interval
            delay = self.next_at - self.loop.time()
            if delay > 0:
                self.loop.call_later(delay, self.send)
                return
        self.send()

    def send(self) -> None:
        if self.transport is None:
            return
        self.sent_ns = time.perf_counter_ns()
        self.transport.write(self.request())

    def answered(self, ok: bool, why: str = "") -> None:
        self.load.record(ok, time.perf_counter_ns() - self.sent_ns, why)
        self.schedule()

    def request(self) -> bytes:
        raise NotImplementedError


class RpcClient(Client):
    def __init__(self, load: Load, start_at: float, codec: RpcCodec, frame: bytes) -> None:
        super().__init__(load, start_at)
        self.codec = codec
        self.frame = frame
        self.decoder = codec.decoder()
        self.ids = itertools.count(1)
        self.expected = 0

    def request(self) -> bytes:
        self.expected = next(self.ids) & MAX_ID or 1
        return self.codec.set_request_id(self.frame, self.expected)

    def data_received(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            if frame.heartbeat:
                continue
            if frame.request_id != self.expected:
                self.answered(False, f"id {frame.request_id}, expected {self.expected}")
            elif not frame.ok:
                self.answered(False, f"status {frame.status}: {frame.raw[-200:]!r}")
            else:
                self.answered(True)


class HttpClient(Client):
    def __init__(self, load: Load, start_at: float) -> None:
        super().__init__(load, start_at)
        self.buf = bytearray()

    def request(self) -> bytes:
        return HTTP_REQUEST

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while (end := buf.find(b"\r\n\r\n")) >= 0:
            head = bytes(buf[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            if at < 0:
                buf.clear()
                self.answered(False, f"no content-length: {head[:200]!r}")
                return
            eol = head.find(b"\r\n", at + 2)
            size = end + 4 + int(head[at + 17 : eol if eol >= 0 else len(head)])
            if len(buf) < size:
                return
            status = head[9:12]
            del buf[:size]
            self.answered(status == b"200", f"HTTP {status.decode()}")


async def generate(options: dict[str, Any]) -> dict[str, Any]:
    """Run the load and sample CPU at the edges of the measured window, from here, so the
    window is exactly the one the requests are counted in."""
    protocol, port, conns = options["protocol"], options["port"], options["connections"]
    interval = conns / options["rate"] if options["rate"] else 0.0
    load = Load(interval)
    loop = asyncio.get_running_loop()
    start = loop.time()

    def make(i: int) -> Client:
        start_at = start + i * interval / conns - interval  # staggered when paced
        if protocol == "http1":
            return HttpClient(load, start_at)
        return RpcClient(load, start_at, CODECS[protocol], request_frame(protocol))

    load.in_flight = conns
    for i in range(conns):
        await loop.create_connection(functools.partial(make, i), "127.0.0.1", port)
    await asyncio.sleep(options["warmup"])
    watched: dict[str, list[int]] = options["watch"]

    def sample() -> dict[str, Any]:
        ticks = {name: sum(cpu_ticks(p) for p in pids) for name, pids in watched.items()}
        own = os.times()
        ticks["generator"] = round((own.user + own.system) * CLK_TCK)
        ticks["proxy_sys"] = system_ticks(watched["proxy"][0])
        return {"ticks": ticks, "cores": core_times(), "t": time.monotonic()}

    before = sample()
    load.recording = True
    await asyncio.sleep(options["duration"])
    load.recording = False
    after = sample()
    load.stopping = True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(load.drained.wait(), 5)
    lat = sorted(load.latencies_ns) or [0]
    return {
        "requests": load.ok,
        "errors": load.errors,
        "error_samples": load.error_samples,
        "p50_us": lat[len(lat) // 2] / 1000,
        "p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000,
        "before": before,
        "after": after,
    }


def loadgen_main(spec: str) -> None:
    import uvloop

    result = uvloop.run(generate(json.loads(spec)))
    print("BENCH_JSON " + json.dumps(result), flush=True)


# --- a replay upstream: Motan2's (there is no Motan peer here), or --upstream replay --------


def motan2_response() -> bytes:
    frame = RpcFrame(
        is_request=False,
        request_id=0,
        headers={M_PROCESS_TIME: "0"},
        payload=simple_encode("motan2: hello world"),
    )
    return CODECS["motan2"].encode(frame)


class ReplayUpstream(asyncio.Protocol):
    """Answers every request with one recorded response, under the request's id."""

    def __init__(self, codec: RpcCodec, answer: bytes) -> None:
        self.codec = codec
        self.answer = answer
        self.decoder = codec.decoder()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        out = []
        for frame in self.decoder.feed(data):
            if frame.heartbeat:
                out.append(self.codec.heartbeat_reply(frame))
            elif not frame.oneway:
                out.append(self.codec.set_request_id(self.answer, frame.request_id))
        self.transport.write(b"".join(out))


def replay_upstream_main(protocol: str, port: int, answer: bytes) -> None:
    import uvloop

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        codec = CODECS[protocol]
        server = await loop.create_server(lambda: ReplayUpstream(codec, answer), "127.0.0.1", port)
        print(f"READY {port}", flush=True)
        stopped = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stopped.set)
        async with server:
            await stopped.wait()

    uvloop.run(serve())


# --- the harness -------------------------------------------------------------------------


CoreTimes = dict[int, tuple[int, int, int, int]]  # run.core_times()


@dataclass
class Run:
    protocol: str
    error: str = ""  # could not be measured
    invalid: list[str] = field(default_factory=list)
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_us_per_req: float = 0.0
    sys_us_per_req: float = 0.0  # the kernel's part of it (stime): syscalls, network stack
    proxy_cpu_pct: float = 0.0  # proxy CPU time / wall time: 100 = its core saturated
    load_core_pct: float = 0.0  # how busy the generator + upstream core was
    generator_cpu_pct: float = 0.0
    upstream_cpu_pct: float = 0.0
    others_on_proxy_core_pct: float = 0.0  # other processes' CPU there: noise
    others_on_load_core_pct: float = 0.0  # same on the load core (besides generator, upstream)
    attempts: int = 1  # measured again while other processes used the cores
    ratio: float | None = None  # CPU µs/req ÷ HTTP/1.1's


@dataclass
class Setup:
    args: argparse.Namespace
    proxy_pid: int
    ports: dict[str, int]
    upstream_pids: dict[str, list[int]]


def bootstrap(ports: dict[str, int], upstreams: dict[str, list[int]], admin: int) -> dict[str, Any]:
    """One listener per protocol, each with one route to its own cluster."""
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "http1",
            "route_config": {
                "name": "http1",
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "http1"}}],
                    }
                ],
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3."
                        "Router"
                    },
                }
            ],
        },
    }
    listeners = []
    for protocol, port in ports.items():
        if protocol == "http1":
            address = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
            listeners.append(
                {"name": "http1", "address": address, "filter_chains": [{"filters": [hcm]}]}
            )
        else:
            routes = matcher([([condition("method", METHOD)], action(protocol))])
            proxy = generic_proxy(protocol, {SERVICE: routes}, stat_prefix=protocol)
            listeners.append(rpc_listener(port, ([], proxy), name=protocol))
    clusters = [
        {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {"address": "127.0.0.1", "port_value": p}
                                    }
                                }
                            }
                            for p in hosts
                        ]
                    }
                ],
            },
        }
        for name, hosts in upstreams.items()
    ]
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def wait_line(proc: subprocess.Popen[bytes], log: Path, prefix: str, timeout: float) -> None:
    """Wait until ``log`` (the process's stdout) has a line starting with ``prefix``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}; {log}:\n{tail(log)}")
        with contextlib.suppress(OSError):
            if any(line.startswith(prefix) for line in log.read_text().splitlines()):
                return
        time.sleep(0.05)
    raise RuntimeError(f"no {prefix!r} within {timeout:.0f}s; {log}:\n{tail(log)}")


def start_upstreams(protocol: str, args: argparse.Namespace) -> tuple[list[int], list[int]]:
    """``args.upstreams`` servers for ``protocol`` on the load core: (ports, pids). The Node
    peers (server.js) for Dubbo and Bolt, unless ``--upstream replay``: then, and always
    for Motan2, a :class:`ReplayUpstream` answering with the response a Node peer gave
    (Motan2: one built with Shoal's codec)."""
    servers = []
    if protocol != "motan2" and args.upstream == "node":
        servers = [start_server(protocol, "node", i, b"", args) for i in range(args.upstreams)]
    else:
        answer = motan2_response()
        if protocol != "motan2":
            port, capture = start_server(protocol, "node", -1, b"", args)
            answer = call_once(protocol, port)
            stop(capture)
        servers = [start_server(protocol, "replay", i, answer, args) for i in range(args.upstreams)]
    return [port for port, _ in servers], [proc.pid for _, proc in servers]


def start_server(
    protocol: str, kind: str, i: int, answer: bytes, args: argparse.Namespace
) -> tuple[int, subprocess.Popen[bytes]]:
    """One upstream on a free port, once it printed READY: (port, process)."""
    port, log = free_port(), args.out / f"upstream-{protocol}-{kind}{i}.log"
    if kind == "node":
        cmd = ["node", str(PEERS_DIR / "server.js"), f"--protocol={protocol}"]
        cmd += [f"--port={port}", f"--label={kind}{i}"]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "_replay-upstream", protocol]
        cmd += [str(port), answer.hex()]
    proc = spawn(cmd, log, args.load_cpu)
    wait_line(proc, log, "READY", 20)
    return port, proc


def call_once(protocol: str, port: int) -> bytes:
    """One request to ``port``; the response frame. Raises if it is not a success with
    "hello" in it."""
    codec = CODECS[protocol]
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(codec.set_request_id(request_frame(protocol), 7))
        decoder = codec.decoder()
        frames: list[RpcFrame] = []
        while not frames:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the connection was closed before an answer")
            frames = decoder.feed(data)
    frame = frames[0]
    if frame.request_id != 7 or not frame.ok or b"hello" not in frame.payload:
        raise RuntimeError(f"wrong answer: {frame!r} ok={frame.ok} payload={frame.payload!r}")
    return frame.raw


@contextlib.contextmanager
def current_build() -> Iterator[None]:
    """Bring the mypyc-compiled hot path up to date as the tests do (scripts/compile.py: a
    no-op when current), then hold build.lock shared so that no build removes the modules
    while the proxy imports them."""
    compiler = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compile.py")],
        capture_output=True,
        text=True,
        check=False,
    )
    if compiler.returncode != 0:
        raise RuntimeError(f"scripts/compile.py failed:\n{compiler.stderr[-2000:]}")
    with (ROOT / "build.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield


def compiled_modules() -> list[str]:
    """Shoal's modules built by mypyc: Python imports them instead of their sources."""
    src = ROOT / "src"
    return sorted(
        ".".join(path.relative_to(src).with_name(path.name.split(".")[0]).parts)
        for path in (src / "shoal").rglob("*.so")
    )


def verify(proxy: subprocess.Popen[bytes], protocol: str, port: int, timeout: float) -> None:
    """One request of ``protocol`` through the proxy must succeed (retried until ready)."""
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        if proxy.poll() is not None:
            raise RuntimeError(f"the proxy exited with {proxy.returncode}")
        try:
            if protocol == "http1":
                status, body = get(port, HIT_PATH, HIT_HEADERS)
                last = "" if status == 200 and body == BODY else f"HTTP {status}: {body[:80]!r}"
            else:
                call_once(protocol, port)
                last = ""
        except (OSError, RuntimeError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if not last:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{protocol} through the proxy does not work: {last}")


def measure_wrk(setup: Setup) -> Run:
    args, run = setup.args, Run("http1")
    port, upstream = setup.ports["http1"], setup.upstream_pids["http1"]
    run_wrk(port, args.warmup, args.connections, args.load_cpu)
    cores0, t0 = core_times(), time.monotonic()
    cpu0, sys0 = cpu_ticks(setup.proxy_pid), system_ticks(setup.proxy_pid)
    up0, gen0 = sum(cpu_ticks(p) for p in upstream), children_cpu_s()
    w = run_wrk(port, args.duration, args.connections, args.load_cpu)
    up1, gen1 = sum(cpu_ticks(p) for p in upstream), children_cpu_s()
    cpu1, sys1 = cpu_ticks(setup.proxy_pid), system_ticks(setup.proxy_pid)
    t1, cores1 = time.monotonic(), core_times()
    run.requests = int(w["requests"])
    run.errors = int(w["non2xx"]) + int(w["socket_errors"])
    run.seconds = t1 - t0
    run.p50_ms, run.p99_ms = w["p50_us"] / 1000, w["p99_us"] / 1000
    ticks = {"proxy": cpu1 - cpu0, "proxy_sys": sys1 - sys0, "upstream": up1 - up0}
    finish(run, setup, ticks, gen1 - gen0, (cores0, cores1))
    run.rps = run.requests / (w["duration_us"] / 1e6)
    if run.errors:
        run.invalid.append(f"{w['non2xx']} non-2xx responses, {w['socket_errors']} socket errors")
    return run


def measure_asyncio(setup: Setup, protocol: str) -> Run:
    args, run = setup.args, Run(protocol)
    spec = {
        "protocol": protocol,
        "port": setup.ports[protocol],
        "connections": args.connections,
        "duration": args.duration,
        "warmup": args.warmup,
        "rate": args.rate,
        "watch": {"proxy": [setup.proxy_pid], "upstream": setup.upstream_pids[protocol]},
    }
    cmd = ["taskset", "-c", str(args.load_cpu), sys.executable, str(Path(__file__).resolve())]
    cmd += ["_loadgen", json.dumps(spec)]
    timeout = args.warmup + args.duration + 60
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if line is None:
        run.error = f"load generator failed (exit {out.returncode}): {out.stderr[-2000:]}"
        return run
    g = json.loads(line.removeprefix("BENCH_JSON "))
    before, after = g["before"], g["after"]
    run.requests, run.errors = g["requests"], g["errors"]
    run.seconds = after["t"] - before["t"]
    run.p50_ms, run.p99_ms = g["p50_us"] / 1000, g["p99_us"] / 1000
    ticks = {k: after["ticks"][k] - before["ticks"][k] for k in before["ticks"]}
    cores0: CoreTimes = {int(c): (v[0], v[1], v[2], v[3]) for c, v in before["cores"].items()}
    cores1: CoreTimes = {int(c): (v[0], v[1], v[2], v[3]) for c, v in after["cores"].items()}
    finish(run, setup, ticks, ticks["generator"] / CLK_TCK, (cores0, cores1))
    run.rps = run.requests / run.seconds
    if run.errors:
        run.invalid.append(f"{run.errors} failed requests, e.g. {g['error_samples'][:3]}")
    return run


def finish(
    run: Run,
    setup: Setup,
    ticks: dict[str, int],
    generator_s: float,
    cores: tuple[CoreTimes, CoreTimes],
) -> None:
    """The derived numbers of a run, from CPU ticks and per-core times around its window."""
    args, (cores0, cores1) = setup.args, cores
    busy = ticks["proxy"] / CLK_TCK
    run.cpu_us_per_req = busy / max(run.requests, 1) * 1e6
    run.sys_us_per_req = ticks["proxy_sys"] / CLK_TCK / max(run.requests, 1) * 1e6
    run.proxy_cpu_pct = 100 * busy / run.seconds
    run.upstream_cpu_pct = 100 * ticks["upstream"] / CLK_TCK / run.seconds
    run.generator_cpu_pct = 100 * generator_s / run.seconds
    d = {c: [b - a for a, b in zip(cores0[c], cores1[c], strict=True)] for c in cores1}
    proxy, load = d[args.proxy_cpu], d[args.load_cpu]
    run.load_core_pct = 100 * load[0] / max(load[3], 1)
    run.others_on_proxy_core_pct = max(0.0, 100 * (proxy[1] - ticks["proxy"]) / max(proxy[3], 1))
    ours = ticks["upstream"] + generator_s * CLK_TCK
    run.others_on_load_core_pct = max(0.0, 100 * (load[1] - ours) / max(load[3], 1))
    if run.requests == 0:
        run.invalid.append("no requests completed")


def noise(run: Run) -> float:
    return max(run.others_on_proxy_core_pct, run.others_on_load_core_pct)


def wait_quiet(args: argparse.Namespace, longest: float = 60.0) -> None:
    """Wait (up to ``longest`` s) for a second in which neither core is busier than
    ``--max-noise`` %, our processes being idle between runs."""
    deadline = time.monotonic() + longest
    while time.monotonic() < deadline:
        before = core_times()
        time.sleep(1.0)
        after = core_times()
        busy = [
            100 * (after[c][0] - before[c][0]) / max(after[c][3] - before[c][3], 1)
            for c in (args.proxy_cpu, args.load_cpu)
        ]
        if max(busy) < args.max_noise:
            return


def measure(setup: Setup, protocol: str) -> Run:
    """One run; measured again (up to ``--retries`` times, after waiting for quiet) while
    other processes used more than ``--max-noise`` % of a core. The quietest attempt wins."""
    args = setup.args
    wrk = protocol == "http1" and args.http_client == "wrk"
    attempts: list[Run] = []
    while True:
        run = measure_wrk(setup) if wrk else measure_asyncio(setup, protocol)
        attempts.append(run)
        if run.error or noise(run) <= args.max_noise or len(attempts) > args.retries:
            break
        print(
            f"  {protocol}: other processes used {noise(run):.0f}% of a core: measuring again",
            flush=True,
        )
        wait_quiet(args)
    best = min(attempts, key=lambda r: (bool(r.error), noise(r)))
    best.attempts = len(attempts)
    return best


def profile(setup: Setup, protocol: str, top: int = 12) -> str:
    """Sample the proxy with py-spy (on the load core) under one more run of ``protocol``;
    the raw stacks go to profile-<protocol>.txt; returns the top frames as Markdown."""
    args = setup.args
    raw, log = args.out / f"profile-{protocol}.txt", args.out / f"py-spy-{protocol}.log"
    spy = [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(setup.proxy_pid)]
    spy += ["-d", str(args.warmup + args.duration + 1), "-r", "200"]
    spy += ["--native", "-f", "raw", "-o", str(raw)]
    sampler = spawn(spy, log, args.load_cpu)
    if protocol == "http1" and args.http_client == "wrk":
        measure_wrk(setup)
    else:
        measure_asyncio(setup, protocol)
    sampler.wait(30)
    stop(sampler)
    return summarize(raw, protocol, top) or f"\n## py-spy, {protocol}: no samples: {tail(log, 3)}\n"


def summarize(raw: Path, protocol: str, top: int = 12) -> str:
    """py-spy's raw (collapsed) stacks as Markdown: the top frames by own samples, and
    Shoal's functions by inclusive samples; "" when there are none."""
    stacks = []
    with contextlib.suppress(OSError):
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            stacks.append(([_frame_name(f) for f in stack.split(";")], int(count)))
    # waiting in epoll is idle time py-spy did not tell apart: left out of the shares
    busy = [(frames, n) for frames, n in stacks if not frames[-1].startswith(IDLE)]
    total = sum(n for _, n in busy)
    if not total:
        return ""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    for frames, n in busy:
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for name in {f for f in frames if is_shoal(f) and not f.endswith(OUTER)}:
            inclusive[name] = inclusive.get(name, 0) + n
    lines = [
        f"\n## py-spy --native, {protocol}: {total} busy samples (raw stacks: {raw.name})",
        "",
        "| self % | frame (Python and native) | | incl. % | Shoal function |",
        "|--:|---|---|--:|---|",
    ]
    by_own = sorted(own.items(), key=lambda kv: -kv[1])[:top]
    by_incl = sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]
    for (name, n), (iname, i) in itertools.zip_longest(by_own, by_incl, fillvalue=("", 0)):
        self_cell = f"{100 * n / total:.1f} | `{name}`" if name else " | "
        incl_cell = f"{100 * i / total:.1f} | `{iname}`" if iname else " | "
        lines.append(f"| {self_cell} | | {incl_cell} |")
    return "\n".join(lines) + "\n"


IDLE = ("epoll_wait (", "epoll_pwait (")
OUTER = ("(shoal/cli/main.py)", "(shoal/proxy/server.py)")  # under every sample


def is_shoal(frame: str) -> bool:
    """A frame of Shoal's code, interpreted or compiled."""
    return "(shoal/" in frame or frame.endswith("(mypyc)")


def _frame_name(frame: str) -> str:
    """``func (…/shoal/proxy/rpc.py:123)`` → ``func (shoal/proxy/rpc.py)``, ``write
    (libc.so.6)`` as is, ``CPyDef_proxy___rpc___RpcCall___start (…)`` → ``proxy.rpc.RpcCall
    .start (mypyc)``: the lines of one function merged."""
    name, _, where = frame.partition(" (")
    if name.startswith("CPyDef_"):  # a mypyc-compiled function: module___Class___method
        return f"{name.removeprefix('CPyDef_').replace('___', '.')} (mypyc)"
    if name.startswith("0x"):
        return "(native code without symbols, e.g. mypyc-compiled modules)"
    if not where:
        return name
    path = where.removesuffix(")").rsplit(":", 1)[0]
    at = path.rfind("shoal/")
    return f"{name} ({path[at:] if at >= 0 else Path(path).name})"


def median_of(runs: list[Run]) -> Run:
    done = [r for r in runs if not r.error]
    if not done:
        return runs[0]
    res = Run(runs[0].protocol)
    for name in ("requests", "errors"):
        setattr(res, name, int(statistics.median(getattr(r, name) for r in done)))
    for name in (
        "seconds",
        "rps",
        "p50_ms",
        "p99_ms",
        "cpu_us_per_req",
        "sys_us_per_req",
        "proxy_cpu_pct",
        "load_core_pct",
        "generator_cpu_pct",
        "upstream_cpu_pct",
        "others_on_proxy_core_pct",
        "others_on_load_core_pct",
    ):
        setattr(res, name, float(statistics.median(getattr(r, name) for r in done)))
    for i, r in enumerate(runs, 1):
        res.invalid += [f"run {i}: {m}" for m in ([r.error] if r.error else []) + r.invalid]
    return res


def report(results: list[Run], runs: dict[str, list[Run]], args: argparse.Namespace) -> str:
    driver = {"wrk": "wrk -t1", "asyncio": "the asyncio generator"}[args.http_client]
    pace = f", paced to {args.rate:,.0f} req/s" if args.rate else " (closed loop, unpaced)"
    upstream = {"node": "Node peers (sofa-rpc-node)", "replay": "replay servers"}[args.upstream]
    lines = [
        f"# Shoal: RPC vs HTTP/1.1 through one proxy, {args.connections} connections x 1 "
        f"request in flight{pace}",
        "",
        f"- One `shoal proxy --concurrency 1` with a listener per protocol, pinned to CPU "
        f"{args.proxy_cpu}; load generator and upstreams on CPU {args.load_cpu}.",
        f"- HTTP/1.1 by {driver} to nginx (100-byte body); RPC by the asyncio generator "
        f"(pre-encoded frames, fresh id per request, every response decoded and checked). "
        f"Dubbo/Bolt upstreams: {upstream} x{args.upstreams}; Motan2: a replay server.",
        "- Modules the proxy ran compiled (mypyc): "
        + (", ".join(m.removeprefix("shoal.") for m in args.compiled) or "none")
        + ".",
        f"- Commit {args.commit}, {time.strftime('%Y-%m-%d %H:%M %Z')}. "
        f"{args.warmup}s warm-up + {args.duration}s measured per run; {args.runs} runs "
        "interleaved by protocol; medians. CPU µs/req = proxy utime+stime over the window ÷ "
        "requests completed in it.",
        "",
        "| protocol | req/s | p50 ms | p99 ms | CPU µs/req | user + sys µs | x HTTP/1.1 "
        "| proxy CPU % | load core % | generator CPU % | upstream CPU % | CPU µs/req per run |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in results:
        per_run = ", ".join(f"{x.cpu_us_per_req:.1f}" for x in runs[r.protocol] if not x.error)
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(
            f"| {r.protocol}{' (INVALID)' if r.invalid else ''} | {r.rps:,.0f} "
            f"| {r.p50_ms:.3f} | {r.p99_ms:.3f} | {r.cpu_us_per_req:.1f} "
            f"| {r.cpu_us_per_req - r.sys_us_per_req:.1f} + {r.sys_us_per_req:.1f} | {ratio} "
            f"| {r.proxy_cpu_pct:.0f} | {r.load_core_pct:.0f} | {r.generator_cpu_pct:.0f} "
            f"| {r.upstream_cpu_pct:.0f} | {per_run} |"
        )
    notes = []
    for r in results:
        if r.invalid:
            notes.append(f"- **{r.protocol}** INVALID: {'; '.join(r.invalid)}")
        if r.proxy_cpu_pct < 90 and not args.rate:
            side = "upstream" if r.upstream_cpu_pct > r.generator_cpu_pct else "generator"
            notes.append(
                f"- **{r.protocol}**: proxy not saturated ({r.proxy_cpu_pct:.0f}% of its core); "
                f"the load core was the bottleneck ({r.load_core_pct:.0f}% busy: generator "
                f"{r.generator_cpu_pct:.0f}%, upstream {r.upstream_cpu_pct:.0f}%, mostly the "
                f"{side}). CPU/request is valid but at a lower load than a saturated proxy's, "
                "i.e. fewer requests per wake-up."
            )
        if noise(r) > 3:
            notes.append(
                f"- **{r.protocol}**: other processes used {r.others_on_proxy_core_pct:.0f}% "
                f"of CPU {args.proxy_cpu} and {r.others_on_load_core_pct:.0f}% of CPU "
                f"{args.load_cpu} (median over runs; noise)"
            )
    http = next((r for r in results if r.protocol == "http1"), None)
    if http is not None:
        verdicts = [
            f"{r.protocol} {r.ratio:.2f}x {'PASS' if r.ratio <= 1 else 'FAIL'}"
            + (" (invalid run)" if r.invalid or http.invalid else "")
            for r in results
            if r.protocol != "http1" and r.ratio is not None
        ]
        if verdicts:
            lines += ["", "Target, RPC CPU µs/req ≤ HTTP/1.1's: " + "; ".join(verdicts) + "."]
    if notes:
        lines += ["", "Notes:", "", *notes]
    lines += ["", f"Command: `{args.command}`"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds measured per run")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of load before each run")
    ap.add_argument("--connections", type=int, default=16, help="connections, 1 request each")
    ap.add_argument("--runs", type=int, default=3, help="interleaved runs; medians reported")
    ap.add_argument(
        "--protocols",
        default=",".join(PROTOCOLS),
        help="comma-separated subset of " + ",".join(PROTOCOLS),
    )
    ap.add_argument("--upstreams", type=int, default=1, help="upstream servers per protocol")
    ap.add_argument(
        "--upstream",
        choices=("node", "replay"),
        default="node",
        help="Dubbo/Bolt upstreams: the Node peers (default), or a lean asyncio server\n"
        "replaying the response a Node peer gave (for more load than Node can answer)",
    )
    ap.add_argument(
        "--http-client",
        choices=("wrk", "asyncio"),
        default="wrk",
        help="HTTP/1.1 load: wrk (default) or this file's generator, as for the RPC protocols",
    )
    ap.add_argument(
        "--rate",
        type=float,
        default=0,
        help="pace every run to this many req/s in all (0: unpaced; needs --http-client asyncio)",
    )
    ap.add_argument(
        "--max-noise",
        type=float,
        default=10.0,
        help="%% of a core other processes may use during a run before it is measured again",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after the runs, sample the proxy with py-spy under one more run per protocol",
    )
    ap.add_argument("--retries", type=int, default=2, help="extra attempts of a noisy run")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "rpc", help="results and logs")
    args = ap.parse_args(argv)
    args.out = args.out.resolve()  # nginx -p needs absolute paths
    args.protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    if unknown := set(args.protocols) - set(PROTOCOLS):
        ap.error(f"unknown protocols {sorted(unknown)}; choose from {', '.join(PROTOCOLS)}")
    if args.rate and args.http_client == "wrk" and "http1" in args.protocols:
        ap.error("--rate needs --http-client asyncio (wrk cannot pace)")
    needed = ["taskset"]
    spy = Path(sys.executable).parent / "py-spy"
    if args.profile and not spy.is_file():
        ap.error(f"--profile needs {spy} (pip install py-spy into this venv)")
    needed += ["node"] if {"dubbo", "bolt"} & set(args.protocols) else []
    needed += (
        ["nginx", *(["wrk"] if args.http_client == "wrk" else [])]
        if "http1" in args.protocols
        else []
    )
    for tool in needed:
        if shutil.which(tool) is None:
            ap.error(f"{tool} not found")
    if {"dubbo", "bolt"} & set(args.protocols) and not (PEERS_DIR / "node_modules").is_dir():
        ap.error(f"{PEERS_DIR}/node_modules is missing: run `make setup`")
    git = ["git", "-C", str(ROOT), "describe", "--always", "--dirty"]
    described = subprocess.run(git, capture_output=True, text=True, check=False)
    args.commit = described.stdout.strip() or "?"
    args.compiled = []
    python = (
        os.path.relpath(sys.executable)
        if sys.executable.startswith(os.getcwd())
        else sys.executable
    )
    args.command = shlex.join([python, os.path.relpath(Path(__file__).resolve()), *argv])
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["_loadgen"]:
        loadgen_main(argv[1])
        return 0
    if argv[:1] == ["_replay-upstream"]:
        replay_upstream_main(argv[1], int(argv[2]), bytes.fromhex(argv[3]))
        return 0
    args = parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    args.proxy_cpu, args.load_cpu = cpus[0], cpus[-1]
    if len(cpus) < 2:
        print("warning: one CPU only: proxy and load share it", file=sys.stderr)
    os.sched_setaffinity(0, {args.load_cpu})  # this harness stays off the proxy's core
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=args.out))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    atexit.register(stop_all)  # runs first: processes, then their files
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    ports = {p: free_port() for p in args.protocols}
    upstream_ports: dict[str, list[int]] = {}
    upstream_pids: dict[str, list[int]] = {}
    try:
        for protocol in args.protocols:
            if protocol == "http1":
                port = free_port()
                values = {"UPSTREAM_PORT": port, "WORK": work, "BODY": BODY.decode()}
                cmd = nginx_cmd(work, "nginx-upstream", values)
                proc = spawn(cmd, args.out / "upstream-http1.log", args.load_cpu)
                if err := wait_ready(proc, port, 10):
                    raise RuntimeError(f"nginx upstream: {err}")
                upstream_ports[protocol], upstream_pids[protocol] = [port], [proc.pid]
            else:
                upstream_ports[protocol], upstream_pids[protocol] = start_upstreams(protocol, args)
        config = args.out / "bootstrap.yaml"
        config.write_text(yaml.safe_dump(bootstrap(ports, upstream_ports, free_port())))
        shoal = Path(sys.executable).parent / "shoal"
        cmd = [str(shoal), "proxy", "-c", str(config), "--concurrency", "1"]
        with current_build():
            proxy = spawn(cmd, args.out / "proxy.log", args.proxy_cpu)
            for protocol in args.protocols:
                verify(proxy, protocol, ports[protocol], timeout=20)
            args.compiled = compiled_modules()
        print(f"each protocol answered through the proxy: {', '.join(args.protocols)}", flush=True)
        setup = Setup(args, proxy.pid, ports, upstream_pids)
        runs: dict[str, list[Run]] = {p: [] for p in args.protocols}
        for i in range(1, args.runs + 1):
            for protocol in args.protocols:
                run = measure(setup, protocol)
                if proxy.poll() is not None:
                    raise RuntimeError(f"the proxy exited: {tail(args.out / 'proxy.log')}")
                runs[protocol].append(run)
                print(
                    f"run {i}/{args.runs} {protocol}: {run.rps:,.0f} req/s, "
                    f"{run.cpu_us_per_req:.1f} µs CPU/req, proxy {run.proxy_cpu_pct:.0f}%"
                    + (f" ERROR {run.error}" if run.error else "")
                    + (f" INVALID {run.invalid}" if run.invalid else ""),
                    flush=True,
                )
        profiles = [profile(setup, p) for p in args.protocols] if args.profile else []
    except RuntimeError as exc:
        print(f"error: {exc}\n{args.out / 'proxy.log'}:\n{tail(args.out / 'proxy.log')}")
        return 1
    finally:
        stop_all()
    results = [median_of(runs[p]) for p in args.protocols]
    http = next((r for r in results if r.protocol == "http1" and not r.error), None)
    for r in results:
        if http is not None and http.cpu_us_per_req:
            r.ratio = r.cpu_us_per_req / http.cpu_us_per_req
    text = report(results, runs, args) + "".join(profiles)
    print("\n" + text)
    (args.out / "results.md").write_text(text)
    doc = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": args.command,
        "commit": args.commit,
        "compiled_modules": args.compiled,
        "results": [asdict(r) for r in results],
        "runs": {p: [asdict(r) for r in rs] for p, rs in runs.items()},
    }
    (args.out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if all(not r.invalid and not r.error for r in results) else 1


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit("interrupted")
