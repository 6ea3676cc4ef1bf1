"""``make demo``: a small shop on a local mesh, with a dashboard, a steady load and rules to try.

    shoppers ──► frontend ──► catalog v1 / v2      (HTTP; the canary: examples/canary-50.yaml)
       (load)       │   ├───► reviews ──► ratings  (HTTP; the fault: examples/ratings-fault.yaml)
                    │   └───► recommendations      (gRPC, a grpcio server)
                    └───────► payments             (Dubbo, a Node.js provider)

Every workload is an app behind its own ``shoal proxy`` sidecar, and every arrow crosses
two sidecars: the caller's outbound listener (HTTP, and gRPC in h2c on the same port, or
its RPC listener for Dubbo), then the callee's inbound listener. ``shoal pilot``
configures them all over xDS, from its embedded registry (each sidecar registers its app)
and the rules in a watched directory, which starts as a copy of ``examples/shop/``. Pilot
also serves the dashboard.

Everything listens on 127.0.0.1, on fixed ports from 15100 to 15199 (see ``LAYOUT``), so
the printed commands always work. The demo prints the dashboard URL first, waits until
every sidecar is in sync and the first page and checkout succeed, prints ``ready`` and the
commands to try, and then a load summary every 10 seconds. Ctrl-C, SIGTERM or SIGHUP stops
every process it started, each in its own process group, by PID; and should the demo be
killed outright, each of them gets SIGTERM from the kernel (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import yaml

from shoal.demo.load import GOOD_CARD, Load, Shop
from shoal.demo.shop import PAYMENTS, RECOMMENDATIONS
from shoal.pilot.bootstrap import sidecar_bootstrap

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples"
SHOP_RULES = EXAMPLES / "shop"
PAYMENTS_JS = Path(__file__).resolve().parent / "payments.js"
# payments.js runs on the Node packages that `make setup` installs for the RPC tests.
NODE_MODULES = REPO / "tests" / "rpc_peers" / "node_modules"

# Fixed, like the ports, so that the commands to try (and docs/getting-started.md) are the
# same every time; short, for those commands; and ignored by git.
DEFAULT_WORKDIR = REPO / ".demo"

HOST = "127.0.0.1"
PILOT_XDS, PILOT_HTTP = 15100, 15101
STARTUP_TIMEOUT = 45.0  # seconds; a set-up machine needs a few
STOP_TIMEOUT = 10.0  # seconds each process gets after SIGTERM before SIGKILL
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # HUP: the terminal closed
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_PRCTL = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)  # Linux only


@dataclass(frozen=True)
class Workload:
    """One app and its sidecar; ports from ``base``: app, inbound, outbound, admin, and
    (with ``rpc``) the outbound RPC listener."""

    name: str  # the sidecar's node id, and the app's log
    service: str  # SERVICE: host:port
    labels: dict[str, str]
    base: int
    rpc: bool = False

    @property
    def app(self) -> int:
        return self.base

    @property
    def inbound(self) -> int:
        return self.base + 1

    @property
    def outbound(self) -> int:
        return self.base + 2

    @property
    def admin(self) -> int:
        return self.base + 3

    @property
    def rpc_outbound(self) -> int:
        return self.base + 4 if self.rpc else 0

    @property
    def ports(self) -> list[int]:
        return [self.app, self.inbound, self.outbound, self.admin] + (
            [self.rpc_outbound] if self.rpc else []
        )

    def bootstrap(self) -> dict[str, Any]:
        return sidecar_bootstrap(
            self.name,
            pilot=(HOST, PILOT_XDS),
            service=self.service,
            labels=self.labels,
            app_address=f"{HOST}:{self.app}",
            inbound_address=f"{HOST}:{self.inbound}",
            outbound_address=f"{HOST}:{self.outbound}",
            rpc_outbound_address=f"{HOST}:{self.rpc_outbound}" if self.rpc else "",
            admin=(HOST, self.admin),
        )


LAYOUT = [
    Workload("frontend", "frontend:80", {"app": "frontend", "version": "v1"}, 15110, rpc=True),
    Workload("catalog-v1", "catalog:80", {"app": "catalog", "version": "v1"}, 15120),
    Workload("catalog-v2", "catalog:80", {"app": "catalog", "version": "v2"}, 15130),
    Workload("reviews", "reviews:80", {"app": "reviews", "version": "v1"}, 15140),
    Workload("ratings", "ratings:80", {"app": "ratings", "version": "v1"}, 15150),
    Workload(
        "recommendations", RECOMMENDATIONS, {"app": "recommendations", "version": "v1"}, 15170
    ),
    Workload("payments", f"{PAYMENTS}:20880", {"app": "payments", "version": "v1"}, 15160),
]
FRONTEND = LAYOUT[0]
DEMO_PORTS = [PILOT_XDS, PILOT_HTTP] + [port for w in LAYOUT for port in w.ports]


class DemoError(Exception):
    """The demo cannot start, or a workload died; the message says why (and where the
    log is)."""


def payments_runnable() -> str:
    """Why payments cannot run here, or "" when it can."""
    if shutil.which("node") is None:
        return "node (Node.js) is not installed"
    if not (NODE_MODULES / "sofa-rpc-node").is_dir():
        return f"{NODE_MODULES} is missing (`make setup` installs it when npm is present)"
    return ""


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
        return True
    return False


def http_get(port: int, path: str) -> tuple[int, bytes]:
    """Status and body, or (0, b"") when nothing answers."""
    conn = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return 0, b""
    finally:
        conn.close()


def started(workload: Workload) -> bool:
    """The app listens and its sidecar has its first config from pilot."""
    return listening(workload.app) and http_get(workload.admin, "/ready")[0] == 200


def die_with_the_demo(demo: int) -> None:
    """In each child between fork and exec: SIGTERM when the demo's process dies, however it
    dies (SIGKILL included), so that nothing it started outlives it on the fixed ports."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != demo:  # it died before the request took effect
        os._exit(1)


def say(line: str, file: TextIO | None = None) -> None:
    """``print``, except that a terminal gone (SIGHUP) or a pipe closed early never stops the
    demo from stopping what it started."""
    with contextlib.suppress(OSError):
        print(line, file=file, flush=True)


def shown(path: Path) -> str:
    """``path`` for a command line: relative to the current directory when under it, else
    with ``~`` for the home directory when under that."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    with contextlib.suppress(ValueError):
        return str(Path("~") / path.relative_to(Path.home()))
    return str(path)


@dataclass
class Child:
    """A process the demo started, and where its output goes."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class Demo:
    """One run: its work directory, what it started (in order) and whether to stop."""

    workdir: Path
    with_payments: bool
    children: list[Child] = field(default_factory=list)
    stop_requested: bool = False

    @property
    def rules(self) -> Path:
        return self.workdir / "rules"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    @property
    def workloads(self) -> list[Workload]:
        return [w for w in LAYOUT if self.with_payments or w.name != "payments"]

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler: only a flag, checked by every wait (see ``wait_until``)."""
        self.stop_requested = True

    # starting -----------------------------------------------------------------------------

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Start a process in its own session (so the terminal's Ctrl-C reaches only the
        demo, which then stops everything in order), its output in ``logs/<name>.log``.
        Only the main thread spawns, before the load starts: ``preexec_fn`` needs that."""
        log = self.logs / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=partial(die_with_the_demo, os.getpid()),  # noqa: PLW1509 (one thread)
                env={**os.environ, **(env or {})},
            )
        self.children.append(Child(name, process, log))

    def check_children(self) -> None:
        """A process that exits on its own ends the demo, with the end of its log: the
        shop is not the shop without it."""
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                tail = child.log.read_text(errors="replace").strip().splitlines()[-15:]
                raise DemoError(
                    f"{child.name} exited with {code} (log: {child.log})\n  " + "\n  ".join(tail)
                )

    def wait_until(self, ready: Callable[[], bool], what: str, deadline: float) -> None:
        while not ready():
            self.check_children()
            if self.stop_requested:  # a stop signal while starting
                raise KeyboardInterrupt
            if time.monotonic() > deadline:
                raise DemoError(f"timed out waiting for {what} (logs: {self.logs})")
            time.sleep(0.05)

    def start(self) -> None:
        busy = [port for port in DEMO_PORTS if listening(port)]
        if busy:
            raise DemoError(
                f"ports in use on {HOST}: {', '.join(map(str, busy))} (is another demo "
                "running?); the demo needs 15100-15199"
            )
        self.reset_workdir()
        python = sys.executable
        pilot = [python, "-m", "shoal", "-l", "warning", "pilot", "--config-dir", str(self.rules)]
        pilot += ["--xds-address", f"{HOST}:{PILOT_XDS}", "--http-address", f"{HOST}:{PILOT_HTTP}"]
        pilot += ["--registry", f"embedded:{self.workdir / 'registry.db'}"]
        pilot += ["--scrape-interval", "2s"]  # livelier numbers than the default 5s
        self.spawn("pilot", pilot)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        self.wait_until(lambda: http_get(PILOT_HTTP, "/ready")[0] == 200, "pilot", deadline)
        say(f"Shoal demo: dashboard at http://{HOST}:{PILOT_HTTP}/")
        say(
            f"starting the shop: {len(self.workloads)} workloads, each behind a shoal proxy "
            "sidecar ..."
        )
        for workload in self.workloads:
            self.spawn(workload.name, self.app_command(workload), self.app_env(workload))
            config = self.workdir / f"{workload.name}.yaml"
            config.write_text(yaml.safe_dump(workload.bootstrap()))
            proxy = [python, "-m", "shoal", "-l", "warning", "proxy", "-c", str(config)]
            proxy += ["--drain-time-s", "1"]  # the load stops first: nothing is in flight
            self.spawn(f"{workload.name}-sidecar", proxy)
        for workload in self.workloads:
            self.wait_until(partial(started, workload), workload.name, deadline)
        self.wait_until(self.in_sync, "every sidecar to be in sync with pilot", deadline)
        self.wait_until(self.shop_works, "the first page and checkout to succeed", deadline)

    def reset_workdir(self) -> None:
        """Last run's rules, logs and registry go: each demo starts from examples/shop/.
        Only what the demo writes there is removed."""
        for directory in (self.rules, self.logs):
            shutil.rmtree(directory, ignore_errors=True)
        for stale in self.workdir.glob("registry.db*"):
            stale.unlink()
        self.logs.mkdir(parents=True)
        shutil.copytree(SHOP_RULES, self.rules)

    def app_command(self, workload: Workload) -> list[str]:
        if workload.name == "payments":
            return ["node", str(PAYMENTS_JS), "--port", str(workload.app)]
        command = [sys.executable, "-m", "shoal.demo.shop", workload.labels["app"]]
        command += ["--port", str(workload.app), "--version", workload.labels["version"]]
        command += ["--outbound", str(workload.outbound)]
        command += ["--rpc-outbound", str(workload.rpc_outbound)]
        return command

    def app_env(self, workload: Workload) -> dict[str, str] | None:
        return {"NODE_PATH": str(NODE_MODULES)} if workload.name == "payments" else None

    def in_sync(self) -> bool:
        """Pilot has a stream from every sidecar, and each has taken the latest push."""
        status, body = http_get(PILOT_HTTP, "/debug/mesh")
        if status != 200:
            return False
        streams = json.loads(body)["streams"]
        synced = {s["node"] for s in streams if s["in_sync"]}
        return synced >= {w.name for w in self.workloads}

    def shop_works(self) -> bool:
        """A product page with its reviews, and (with payments) a checkout, through the
        frontend's sidecar: every hop is routed and every endpoint known."""
        shop = Shop(FRONTEND.inbound, timeout=2)
        try:
            status, page = shop.request("GET", "/products/1")
            if status != 200 or page.get("reviews") is None:
                return False
            if page.get("recommendations") is None:  # the gRPC hop
                return False
            if not self.with_payments:
                return True
            status, _ = shop.request("POST", f"/checkout/1?card={GOOD_CARD}")
            return status == 200
        finally:
            shop.close()

    # running ------------------------------------------------------------------------------

    def banner(self) -> str:
        """The shop, where everything is, and the commands to try."""
        rules, examples = shown(self.rules), shown(EXAMPLES)
        payments = (
            f"payments (Dubbo, Node.js), via frontend's RPC listener :{FRONTEND.rpc_outbound}"
            if self.with_payments
            else f"payments (Dubbo): not started, {payments_runnable()}"
        )
        rows = "\n".join(
            f"  {w.name:<15} {w.app:<6} {w.inbound:<8} {w.outbound:<9} "
            f"http://{HOST}:{w.admin}/stats"
            for w in self.workloads
        )
        return f"""
  frontend ──► catalog v1, v2 (HTTP)   all of it to v1: {examples}/shop/catalog-route.yaml
     │   ├───► reviews ──► ratings (HTTP)
     ├───────► recommendations (gRPC, h2c through frontend's outbound :{FRONTEND.outbound})
     └───────► {payments}

  workload        app    inbound  outbound  sidecar admin
{rows}
  rules (pilot watches them): {rules}    logs: {shown(self.logs)}

Try, in another terminal in this directory:
  export PATH="{Path(sys.executable).parent}:$PATH" SHOAL_PILOT=http://{HOST}:{PILOT_HTTP}
  shoal stat           success rate, requests/s and latency of every service
  shoal top            the same, refreshed live
  shoal tap frontend   requests through frontend's sidecar as they happen
  shoal check          pilot, rules, sidecars in sync, endpoints
  # the canary: half of catalog's requests to v2; then roll back
  cp {examples}/canary-50.yaml {rules}/catalog-route.yaml
  cp {examples}/shop/catalog-route.yaml {rules}/
  # a fault: ratings fails half its calls, frontend's breaker on reviews opens; then heal
  cp {examples}/ratings-fault.yaml {rules}/
  rm {rules}/ratings-fault.yaml

Walkthrough: docs/getting-started.md. Ctrl-C stops everything.
"""

    def run(self, duration: float | None) -> None:
        """Until Ctrl-C, SIGTERM or ``duration`` seconds; a workload that dies ends it."""
        deadline = None if duration is None else time.monotonic() + duration
        while not self.stop_requested and (deadline is None or time.monotonic() < deadline):
            self.check_children()
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM to each process group we started (while its leader is ours to signal:
        not yet reaped, so the PID cannot have been reused), then SIGKILL to stragglers."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for child in self.children:
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"demo: {child.name} ignored SIGTERM; killing it", sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=5.0, help="shopper requests a second")
    parser.add_argument("--no-load", action="store_true", help="no shoppers: bring your own")
    parser.add_argument("--duration", type=float, help="stop after SECONDS once ready")
    parser.add_argument(
        "--workdir",
        default=DEFAULT_WORKDIR,
        help="its rules/, logs/, registry and sidecar configs (default: .demo/ in the "
        "repository); rules/ and logs/ are replaced at each start",
    )
    args = parser.parse_args()
    if args.rate <= 0:
        parser.error("--rate must be positive")
    workdir = Path(args.workdir).expanduser().resolve()
    demo = Demo(workdir, with_payments=not payments_runnable())
    for sig in STOP_SIGNALS:
        signal.signal(sig, demo.request_stop)
    load: Load | None = None
    started = time.monotonic()
    try:
        demo.start()
        shop = f"the shop at http://{HOST}:{FRONTEND.inbound}/products/1"
        if args.no_load:
            say(f"ready in {time.monotonic() - started:.1f} s: {shop} (no load)")
        else:
            load = Load(
                FRONTEND.inbound,
                args.rate,
                checkout=demo.with_payments,
                report=say,
            )
            load.start()
            say(
                f"ready in {time.monotonic() - started:.1f} s: {args.rate:g} requests a second "
                f"to {shop}"
            )
        say(demo.banner())
        demo.run(args.duration)
        return 0
    except KeyboardInterrupt:
        return 0
    except DemoError as exc:
        say(f"demo: {exc}", sys.stderr)
        return 1
    finally:
        if load is not None:
            load.stop.set()
            load.join()
        if demo.children:
            say("stopping ...")
            demo.stop()
            say(f"stopped {len(demo.children)} processes; logs in {shown(demo.logs)}")


if __name__ == "__main__":
    sys.exit(main())
