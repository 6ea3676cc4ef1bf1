"""`make demo`: the shop on a local mesh (pilot, seven apps behind shoal proxy sidecars, a
gRPC service and a Dubbo provider in Node.js among them, a load generator, the dashboard),
the examples it tells you to apply, and a clean stop; and the echo app the rest of the
suite proxies to."""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import free_port, stop_process, wait_for_port
from tests.integration.mesh_helpers import eventually

from shoal.demo.__main__ import (
    DEMO_PORTS,
    EXAMPLES,
    FRONTEND,
    LAYOUT,
    PILOT_HTTP,
    SHOP_RULES,
    listening,
)
from shoal.demo.load import DECLINED_CARD, GOOD_CARD, Shop

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_INDEX = REPO / "src" / "shoal" / "pilot" / "dashboard" / "dist" / "index.html"
SHOAL = [sys.executable, "-m", "shoal"]
CATALOG_V2 = next(w for w in LAYOUT if w.name == "catalog-v2")
RECOMMENDATIONS = next(w for w in LAYOUT if w.name == "recommendations")


@dataclass
class DemoRun:
    """``python -m shoal.demo`` in a subprocess; its output is read as it comes (with
    ``os.read``: a buffered reader would hide lines from ``select``)."""

    process: subprocess.Popen[bytes]
    workdir: Path
    text: str = ""

    @property
    def rules(self) -> Path:
        return self.workdir / "rules"

    def read_until(self, pattern: str, timeout: float) -> re.Match[str]:
        """Read until the output has a line matching ``pattern``."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while not (found := re.search(pattern, self.text, re.MULTILINE)):
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no line matching {pattern!r} in:\n{self.text}")
                if selector.select(left):
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        code = self.process.wait(30)
                        pytest.fail(f"the demo exited ({code}) before {pattern!r}:\n{self.text}")
                    self.text += chunk.decode()
        return found

    def output(self) -> str:
        """Everything it printed, once it has exited."""
        assert self.process.stdout is not None
        self.text += self.process.stdout.read().decode()
        return self.text


def start_demo(workdir: Path, *args: str, env: dict[str, str] | None = None) -> DemoRun:
    busy = [port for port in DEMO_PORTS if listening(port)]
    if busy:
        pytest.fail(f"the demo's ports are in use ({busy}): is a demo running on this machine?")
    process = subprocess.Popen(
        [sys.executable, "-m", "shoal.demo", "--workdir", str(workdir), *args],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    return DemoRun(process, workdir)


def stop_demo(run: DemoRun, sig: signal.Signals = signal.SIGINT) -> str:
    """Stop the demo as a user would and check it left nothing listening."""
    if run.process.poll() is None:
        run.process.send_signal(sig)
    try:
        assert run.process.wait(30) == 0, run.output()
    finally:
        if run.process.poll() is None:  # stuck: the kernel stops its children (PDEATHSIG)
            run.process.kill()
    output = run.output()
    still = [port for port in DEMO_PORTS if listening(port)]
    assert still == [], f"listening after the demo stopped: {still}\n{output}"
    return output


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[DemoRun]:
    run = start_demo(tmp_path / "demo", "--rate", "20")
    try:
        yield run
    finally:
        if run.process.poll() is None:
            run.process.send_signal(signal.SIGINT)
            try:
                run.process.wait(30)
            except subprocess.TimeoutExpired:
                run.process.kill()


def get(port: int, path: str) -> tuple[int, str, bytes]:
    """Status, content type and body."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.headers["content-type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["content-type"], exc.read()


def stats(admin: int) -> dict[str, int]:
    """A sidecar's counters and gauges (histograms left out)."""
    found = {}
    for line in get(admin, "/stats")[2].decode().splitlines():
        name, _, value = line.rpartition(": ")
        if value.isdigit():
            found[name] = int(value)
    return found


def pages(count: int) -> list[dict[str, Any]]:
    """``count`` product pages through the frontend's sidecar (the demo's entry point)."""
    shop = Shop(FRONTEND.inbound)
    try:
        found = []
        for i in range(count):
            status, page = shop.request("GET", f"/products/{i % 5 + 1}")
            if status == 200:
                found.append(page)
        return found
    finally:
        shop.close()


@pytest.mark.slow
def test_the_demo_runs_the_shop_and_the_examples_apply(demo: DemoRun) -> None:
    found = demo.read_until(r"^ready in ([\d.]+) s", timeout=60)
    assert float(found.group(1)) < 30  # a few seconds on a set-up machine
    dashboard = f"http://127.0.0.1:{PILOT_HTTP}/"
    assert demo.text.startswith(f"Shoal demo: dashboard at {dashboard}\n")  # the URL first
    demo.read_until(r"Ctrl-C stops everything", timeout=5)
    banner = demo.text
    for command in ("shoal stat", "shoal top", "shoal tap frontend"):
        assert f"\n  {command} " in banner
    assert f"SHOAL_PILOT=http://127.0.0.1:{PILOT_HTTP}\n" in banner
    rules = demo.rules
    for command in (  # as printed, with the rules dir the way the demo shows it
        r"cp examples/canary-50\.yaml (\S+)/catalog-route\.yaml",
        r"cp examples/ratings-fault\.yaml (\S+)/$",
        r"rm (\S+)/ratings-fault\.yaml",
    ):
        shown = re.search(f"^  {command}", banner, re.MULTILINE)
        assert shown is not None, command
        assert Path(shown.group(1)).expanduser() == rules
    for workload in LAYOUT:
        assert f"http://127.0.0.1:{workload.admin}/stats" in banner

    # the dashboard, served by pilot once `make setup` has built it
    status, kind, body = get(PILOT_HTTP, "/")
    if DASHBOARD_INDEX.is_file():
        assert status == 200
        assert kind.startswith("text/html")
        assert b"<title>Shoal</title>" in body
    else:
        assert status == 404
        assert b"dashboard not built" in body

    # every sidecar in sync with pilot, nothing refused, every rule valid
    mesh = json.loads(get(PILOT_HTTP, "/debug/mesh")[2])
    assert {s["node"] for s in mesh["streams"] if s["in_sync"]} == {w.name for w in LAYOUT}
    assert mesh["rule_errors"] == []
    check = subprocess.run(
        [*SHOAL, "check", "--pilot", f"http://127.0.0.1:{PILOT_HTTP}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr

    # the load reaches every app through its sidecar (but catalog v2, dark until the
    # canary), the Dubbo one included: payments' sidecar sees the charges, and the
    # declined cards as errors
    served = "http.inbound.downstream_rq_2xx"
    charges = "generic_proxy.inbound_dubbo.rpc.com.shoal.demo.Payments.charge.rq_"

    def every_sidecar_served() -> bool:
        counts = {w.name: stats(w.admin) for w in LAYOUT}
        http = [w.name for w in LAYOUT if w.name not in ("catalog-v2", "payments")]
        payments = counts["payments"]
        return (
            all(counts[name].get(served, 0) > 0 for name in http)
            and payments.get(charges + "success", 0) > 0
            and payments.get(charges + "error", 0) > 0
        )

    eventually(every_sidecar_served, timeout=15)
    assert stats(CATALOG_V2.admin).get(served, 0) == 0

    # the gRPC path: the frontend's grpcio client → its sidecar's outbound port (h2c) →
    # recommendations' sidecar → the grpcio server, for every product page
    assert all(page["recommendations"] for page in pages(5)), pages(1)
    counts = stats(RECOMMENDATIONS.admin)
    inbound_cluster = f"cluster.inbound|{RECOMMENDATIONS.inbound}||recommendations."
    assert counts.get(inbound_cluster + "upstream_rq_total", 0) > 0
    assert counts.get(inbound_cluster + "grpc.shoal.demo.Recommendations.For.success", 0) > 0
    grpc_cluster = "cluster.outbound|50051||recommendations.upstream_rq_total"
    assert stats(FRONTEND.admin).get(grpc_cluster, 0) > 0

    def stat_lists_recommendations() -> bool:
        stat = subprocess.run(
            [*SHOAL, "stat", "--pilot", f"http://127.0.0.1:{PILOT_HTTP}", "-o", "json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        rows = {row["service"]: row for row in json.loads(stat.stdout or "[]")}
        return rows.get("recommendations", {}).get("requests", 0) > 0

    eventually(stat_lists_recommendations, timeout=15, interval=1)

    # the Dubbo path from the frontend: its app → its sidecar's RPC listener → payments'
    # sidecar → the Node.js provider, and back
    shop = Shop(FRONTEND.inbound)
    status, paid = shop.request("POST", f"/checkout/2?card={GOOD_CARD}")
    assert status == 200, paid
    assert re.fullmatch(r"receipt order-\d+: 2500 cents", paid["receipt"]), paid
    status, declined = shop.request("POST", f"/checkout/2?card={DECLINED_CARD}")
    assert status == 402, declined
    assert "card declined" in declined["error"]
    shop.close()

    # the canary: every page from v1, then (examples/canary-50.yaml) from both
    assert {page["product"]["version"] for page in pages(20)} == {"v1"}
    shutil.copy(EXAMPLES / "canary-50.yaml", rules / "catalog-route.yaml")
    eventually(lambda: {p["product"]["version"] for p in pages(20)} == {"v1", "v2"}, timeout=15)
    split = Counter(page["product"]["version"] for page in pages(100))
    assert min(split.values()) > 25, split  # 50/50; off by this much: 1 in 10^6
    assert stats(CATALOG_V2.admin)[served] > 0

    # the fault: ratings fails half its calls, so reviews does, and the frontend's breaker
    # on reviews opens; the pages come without reviews
    shutil.copy(EXAMPLES / "ratings-fault.yaml", rules)
    breaker = "cluster.outbound|80||reviews.circuit_breaker."
    eventually(lambda: stats(FRONTEND.admin).get(breaker + "opened", 0) > 0, timeout=15)
    assert stats(FRONTEND.admin)[breaker + "state"] == 1  # open
    assert all(page["reviews"] is None for page in pages(5))
    # the fault filter runs on HTTP/1.1 only: gRPC through the same sidecars still works
    assert all(page["recommendations"] for page in pages(5))

    # the load's summary, every 10 s since ready
    demo.read_until(r"^load: \d+ requests in 10s \(200: \d+, .*\)  catalog v1 \d+%", 15)

    output = stop_demo(demo, signal.SIGINT)
    assert f"stopped {2 * len(LAYOUT) + 1} processes" in output


@pytest.mark.slow
def test_sigterm_while_starting_stops_what_was_started(tmp_path: Path) -> None:
    run = start_demo(tmp_path / "demo", "--no-load")
    try:
        run.read_until(r"^starting the shop", timeout=60)  # pilot is up, the rest starting
    finally:
        output = stop_demo(run, signal.SIGTERM)
    assert "ready in" not in output
    assert "stopping ..." in output


@pytest.mark.slow
def test_a_killed_demo_takes_its_processes_along(tmp_path: Path) -> None:
    """SIGKILL leaves the demo no time to stop anything: each child asked Linux for a
    SIGTERM when the demo dies (PR_SET_PDEATHSIG), and gets it."""
    run = start_demo(tmp_path / "demo", "--no-load")
    try:
        run.read_until(r"^ready in", timeout=60)
    finally:
        run.process.kill()
        run.process.wait()
    eventually(lambda: not any(listening(port) for port in DEMO_PORTS), timeout=15)


@pytest.mark.slow
def test_without_node_the_shop_runs_without_payments(tmp_path: Path) -> None:
    bare = tmp_path / "bin"  # a PATH with no node on it (the demo runs Python by its path)
    bare.mkdir()
    run = start_demo(tmp_path / "demo", "--no-load", env={**os.environ, "PATH": str(bare)})
    try:
        run.read_until(r"^ready in", timeout=60)
        run.read_until(r"payments \(Dubbo\): not started, node \(Node.js\) is not installed", 5)
        assert len(pages(3)) == 3  # the rest of the shop works
        assert not listening(LAYOUT[-1].inbound)
    finally:
        output = stop_demo(run)
    assert f"stopped {2 * (len(LAYOUT) - 1) + 1} processes" in output


def test_the_demo_refuses_to_start_on_busy_ports(tmp_path: Path) -> None:
    if any(listening(port) for port in DEMO_PORTS):
        pytest.fail("the demo's ports are in use: is a demo running on this machine?")
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # after other demos
        squatter.bind(("127.0.0.1", PILOT_HTTP))
        squatter.listen()
        result = subprocess.run(
            [sys.executable, "-m", "shoal.demo", "--workdir", str(tmp_path / "demo")],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert f"ports in use on 127.0.0.1: {PILOT_HTTP} (is another demo running?)" in result.stderr
    assert not any(listening(port) for port in DEMO_PORTS)


def analyze(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SHOAL, "analyze", str(directory)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_rules_the_demo_starts_with_and_each_step_it_suggests_are_valid(
    tmp_path: Path,
) -> None:
    """What pilot reads at each step the banner and docs/getting-started.md give: the
    starting rules (examples/shop/), the canary over catalog-route.yaml, then the fault."""
    rules = tmp_path / "rules"
    shutil.copytree(SHOP_RULES, rules)
    steps = [
        (None, None),
        (EXAMPLES / "canary-50.yaml", rules / "catalog-route.yaml"),
        (SHOP_RULES / "catalog-route.yaml", rules),  # roll back
        (EXAMPLES / "ratings-fault.yaml", rules),
    ]
    for source, target in steps:
        if source is not None and target is not None:
            shutil.copy(source, target)
        result = analyze(rules)
        assert result.returncode == 0, result.stdout
        assert result.stdout.startswith("✔ No validation issues"), result.stdout


def _abandon(port: int, request: bytes, *, reset: bool, wait: float = 0.05) -> None:
    """Send ``request`` and go away before the answer: FIN, or RST when ``reset``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(request)
    time.sleep(wait)
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_echo_stays_quiet_when_the_client_gives_up_first(tmp_path: Path) -> None:
    """A proxy's timeout closes the upstream connection while the echo waits in /delay
    (or streams /bytes): the echo must not write to the closed transport, and must leave
    no 'Task exception was never retrieved' behind."""
    port = free_port()
    stderr = (tmp_path / "echo.err").open("w+b")
    echo = subprocess.Popen(
        [sys.executable, "-m", "shoal.demo.echo", "--port", str(port), "--name", "q"],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    try:
        wait_for_port(port)
        for reset in (False, True):
            _abandon(port, b"GET /delay/200 HTTP/1.1\r\nHost: e\r\n\r\n", reset=reset)
            # pipelined: /bytes is queued behind the delay
            two = b"GET /delay/200 HTTP/1.1\r\nHost: e\r\n\r\n"
            _abandon(port, two + b"GET /bytes/10 HTTP/1.1\r\nHost: e\r\n\r\n", reset=reset)
            # a large response stalled on backpressure
            stream = b"GET /bytes/100000000?chunked=1 HTTP/1.1\r\nHost: e\r\n\r\n"
            _abandon(port, stream, reset=reset, wait=0.3)
        time.sleep(0.5)  # every delay is over and has tried to answer
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/after", timeout=5) as response:
            assert response.status == 200
            assert json.loads(response.read())["service"] == "q"
    finally:
        stop_process(echo)
    assert echo.returncode == 0
    stderr.seek(0)
    assert stderr.read().decode(errors="replace") == ""
