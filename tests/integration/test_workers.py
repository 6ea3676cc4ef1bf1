"""``--concurrency N`` start-up with real processes: ``/ready`` says LIVE only once every
worker has bound its listeners, and a worker that cannot start (or dies) makes the
supervisor exit 1 with that worker's error instead of hanging or serving at 1/N."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.conftest import (
    Echo,
    bootstrap,
    free_port,
    http_listener,
    route_to,
    static_cluster,
    stop_process,
)

# ``shoal`` with ProxyRuntime.apply held back in workers, so a test can look at the proxy
# while its workers are still starting. On the first apply of a process, the first worker
# to get there creates ``<gate>.first`` and goes on; the others wait for ``<gate>`` to exist.
# With SHOAL_TEST_FAIL_HELD set, a held worker fails as a bind would, once let through.
GATED_SHOAL = textwrap.dedent(
    """
    import asyncio, errno, os, sys
    from shoal.proxy.runtime import ProxyRuntime

    gate = os.environ["SHOAL_TEST_GATE"]
    original = ProxyRuntime.apply

    async def gated_apply(self, *args, **kwargs):
        if self.config_version == 0:
            try:
                os.close(os.open(gate + ".first", os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                while not os.path.exists(gate):
                    await asyncio.sleep(0.02)
                if os.environ.get("SHOAL_TEST_FAIL_HELD"):
                    raise OSError(errno.EADDRINUSE, "address already in use (test)")
        return await original(self, *args, **kwargs)

    ProxyRuntime.apply = gated_apply
    from shoal.cli.main import main
    sys.exit(main(sys.argv[1:]))
    """
)


@dataclass
class Supervisor:
    proc: subprocess.Popen[bytes]
    config: Path
    port: int
    admin_port: int
    gate: Path
    log_path: Path
    seen_workers: set[int] = field(default_factory=set)

    def admin(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers(self) -> list[int]:
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as handle:
            pids = [int(item) for item in handle.read().split()]
        self.seen_workers.update(pids)
        return pids


def config(
    port: int, admin_port: int, echo: Echo, cluster: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Routes everything to cluster ``a``: ``echo`` alone, unless ``cluster`` is given."""
    vhosts = [{"name": "all", "domains": ["*"], "routes": [route_to("a")]}]
    clusters = [cluster or static_cluster("a", echo.port)]
    return bootstrap([http_listener(port, vhosts)], clusters, admin_port)


@pytest.fixture
def launch(tmp_path: Path, echo_a: Echo) -> Iterator[Callable[..., Supervisor]]:
    started: list[Supervisor] = []

    def run(
        *args: str,
        gated: bool = False,
        env: dict[str, str] | None = None,
        cluster: dict[str, Any] | None = None,
    ) -> Supervisor:
        workdir = tmp_path / f"proxy{len(started)}"
        workdir.mkdir()
        port, admin_port = free_port(), free_port()
        path = workdir / "bootstrap.yaml"
        path.write_text(yaml.safe_dump(config(port, admin_port, echo_a, cluster)))
        gate = workdir / "gate"
        log_path = workdir / "proxy.log"
        command = ["-c", GATED_SHOAL] if gated else ["-m", "shoal"]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, *command, "-l", "debug", "proxy", "-c", str(path), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "SHOAL_TEST_GATE": str(gate), **(env or {})},
            )
        supervisor = Supervisor(proc, path, port, admin_port, gate, log_path)
        started.append(supervisor)
        return supervisor

    yield run
    for supervisor in started:
        stop_process(supervisor.proc)
        for pid in supervisor.seen_workers:  # never leave a worker behind, even on failure
            if not gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if condition():
                return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or condition}")


def listening_pids(port: int, pids: list[int]) -> set[int]:
    """Which of ``pids`` hold a LISTEN socket on local ``port``."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as handle:
            for row in handle.read().splitlines()[1:]:
                cols = row.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":
                    inodes.add(cols[9])
    holders = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        holders.add(pid)
    return holders


def gone(pid: int) -> bool:
    """The process has exited (a zombie left to a reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def get_status(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def admin_answers(supervisor: Supervisor) -> bool:
    return supervisor.admin("/server_info")[0] == 200


# --- readiness -------------------------------------------------------------------------------


def test_ready_is_503_pre_initializing_until_every_worker_is_listening(
    launch: Callable[..., Supervisor],
) -> None:
    supervisor = launch("--concurrency", "2", gated=True)
    wait_for(lambda: admin_answers(supervisor), what="admin")
    workers = supervisor.workers()
    assert len(workers) == 2
    # one worker is through and listening, the other is held before binding
    wait_for(lambda: len(listening_pids(supervisor.port, workers)) == 1, what="one listening")
    time.sleep(0.3)
    assert supervisor.admin("/ready") == (503, "PRE_INITIALIZING\n")
    info = json.loads(supervisor.admin("/server_info")[1])
    assert info["state"] == "PRE_INITIALIZING"
    # admin answers without waiting for the workers meanwhile
    stats = json.loads(supervisor.admin("/stats?format=json")[1])
    assert stats["gauges"]["server.live"] == 0
    assert supervisor.admin("/clusters")[0] == 200

    supervisor.gate.touch()
    wait_for(lambda: supervisor.admin("/ready")[0] == 200, what="LIVE")
    # the moment the supervisor says LIVE, every worker has bound the listener
    assert listening_pids(supervisor.port, workers) == set(workers)
    assert supervisor.admin("/ready") == (200, "LIVE\n")
    assert json.loads(supervisor.admin("/server_info")[1])["state"] == "LIVE"
    assert all(get_status(supervisor.port) == 200 for _ in range(20))
    assert (
        json.loads(supervisor.admin("/stats?format=json")[1])["counters"][
            "cluster.a.upstream_rq_200"
        ]
        == 20
    )


def test_membership_gauges_count_each_host_once(
    launch: Callable[..., Supervisor], echo_a: Echo
) -> None:
    """Every worker holds the whole cluster: membership is reported once, not summed over
    the workers as per-worker gauges are."""
    cluster = static_cluster("a", echo_a.port, free_port(), free_port())
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    endpoints[2]["health_status"] = "UNHEALTHY"
    supervisor = launch("--concurrency", "2", cluster=cluster)
    wait_for(lambda: supervisor.admin("/ready")[0] == 200, what="LIVE")
    assert len(supervisor.workers()) == 2
    gauges = json.loads(supervisor.admin("/stats?format=json")[1])["gauges"]
    assert gauges["server.concurrency"] == 2
    assert gauges["cluster.a.membership_total"] == 3
    assert gauges["cluster.a.membership_healthy"] == 2
    text = supervisor.admin("/stats")[1].splitlines()
    assert "cluster.a.membership_total: 3" in text
    assert "cluster.a.membership_healthy: 2" in text


def test_sigterm_while_workers_start_exits_zero(launch: Callable[..., Supervisor]) -> None:
    supervisor = launch("--concurrency", "2", gated=True)
    wait_for(lambda: admin_answers(supervisor), what="admin")
    workers = supervisor.workers()
    wait_for(lambda: len(listening_pids(supervisor.port, workers)) == 1, what="one listening")
    supervisor.proc.send_signal(signal.SIGTERM)
    assert supervisor.proc.wait(timeout=15) == 0, supervisor.output()
    wait_for(lambda: all(gone(pid) for pid in workers), what="workers gone")


# --- a worker that cannot start ------------------------------------------------------------


def run_shoal(path: Path, concurrency: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal", "proxy", "-c", str(path), "--concurrency", concurrency],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("concurrency", ["1", "2"])
def test_listener_port_in_use_exits_one_with_the_error(
    tmp_path: Path, echo_a: Echo, concurrency: str
) -> None:
    admin_port = free_port()
    path = tmp_path / "bootstrap.yaml"
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))  # no SO_REUSEPORT: no worker can share it
        blocker.listen()
        port = blocker.getsockname()[1]
        path.write_text(yaml.safe_dump(config(port, admin_port, echo_a)))
        result = run_shoal(path, concurrency)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    prefix = "shoal proxy: worker " if concurrency == "2" else "shoal proxy: cannot bind: "
    assert last.startswith(prefix), result.stderr
    assert "cannot bind: " in last and "address already in use" in last, last
    assert f"('127.0.0.1', {port})" in last
    assert "Traceback" not in result.stderr
    with socket.socket() as probe:  # nothing left holding the admin port
        probe.bind(("127.0.0.1", admin_port))


@pytest.mark.parametrize("concurrency", ["1", "2"])
def test_admin_port_in_use_exits_one_and_releases_the_listeners(
    tmp_path: Path, echo_a: Echo, concurrency: str
) -> None:
    port = free_port()
    path = tmp_path / "bootstrap.yaml"
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        admin_port = blocker.getsockname()[1]
        path.write_text(yaml.safe_dump(config(port, admin_port, echo_a)))
        result = run_shoal(path, concurrency)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("shoal proxy: admin: cannot bind: "), result.stderr
    assert "Traceback" not in result.stderr
    with socket.socket() as probe:  # the workers let go of the listener
        probe.bind(("127.0.0.1", port))


def test_workers_exit_when_the_supervisor_is_killed(launch: Callable[..., Supervisor]) -> None:
    supervisor = launch("--concurrency", "2")
    wait_for(lambda: supervisor.admin("/ready")[0] == 200, what="LIVE")
    workers = supervisor.workers()
    supervisor.proc.kill()
    supervisor.proc.wait()
    # orphaned, each worker sees its control socket close and drains out
    wait_for(lambda: all(gone(pid) for pid in workers), what="workers gone")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", supervisor.port))


def test_one_worker_failing_stops_the_ones_already_serving(
    launch: Callable[..., Supervisor],
) -> None:
    supervisor = launch("--concurrency", "2", gated=True, env={"SHOAL_TEST_FAIL_HELD": "1"})
    wait_for(lambda: admin_answers(supervisor), what="admin")
    workers = supervisor.workers()
    wait_for(lambda: len(listening_pids(supervisor.port, workers)) == 1, what="one listening")
    assert supervisor.admin("/ready")[0] == 503
    supervisor.gate.touch()
    assert supervisor.proc.wait(timeout=15) == 1, supervisor.output()
    last = supervisor.output().strip().splitlines()[-1]
    assert last.startswith("shoal proxy: worker "), supervisor.output()
    assert last.endswith("cannot bind: [Errno 98] address already in use (test)")
    wait_for(lambda: all(gone(pid) for pid in workers), what="workers gone")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", supervisor.port))


def test_worker_dying_after_start_exits_one(launch: Callable[..., Supervisor]) -> None:
    supervisor = launch("--concurrency", "2")
    wait_for(lambda: supervisor.admin("/ready")[0] == 200, what="LIVE")
    first, second = supervisor.workers()
    os.kill(first, signal.SIGKILL)
    assert supervisor.proc.wait(timeout=15) == 1, supervisor.output()
    last = supervisor.output().strip().splitlines()[-1]
    assert last == f"shoal proxy: worker {first} exited with status -9"
    wait_for(lambda: gone(second), what="the other worker gone")
