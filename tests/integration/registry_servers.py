"""Real registry servers for the registry tests: a throwaway etcd and a standalone
ZooKeeper (Debian's ``etcd-server`` and ``zookeeper``, which ``make setup`` installs), each
on free loopback ports in its own directory and stopped by PID. The Debian services, if any
run, are never used.

``start_etcd``/``start_zookeeper`` are the one-line forms (yield the client address);
``EtcdServer``/``ZooKeeperServer`` also restart on the same port and data, for outage tests.
``Running`` runs a registry in the test's event loop and watches what it reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import pytest
from tests.conftest import free_port, stop_process

from shoal.pilot.model import Registry, RegistrySnapshot

ZOOKEEPER_JAR = Path("/usr/share/java/zookeeper.jar")


def _require(path: str | None, what: str) -> str:
    """Skip where a server is not installed, except in CI, where that is a setup bug."""
    if path is None:
        message = f"{what} is not installed (make setup as root installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


class EtcdServer:
    """A single-member etcd on 127.0.0.1; ``stop``/``start`` keep its ports and data."""

    def __init__(self, workdir: Path) -> None:
        self.binary = _require(shutil.which("etcd"), "etcd (Debian etcd-server)")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        client = f"http://{self.endpoint}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        with (self.workdir / "etcd.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "--name", "shoal-test",
                    "--data-dir", str(self.workdir / "data"),
                    "--listen-client-urls", client, "--advertise-client-urls", client,
                    "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", f"shoal-test={peer}",
                    "--logger", "zap", "--log-level", "warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError, ValueError):
                url = f"http://{self.endpoint}/health"
                with urllib.request.urlopen(url, timeout=1) as response:
                    if json.load(response).get("health") == "true":
                        return
            time.sleep(0.05)
        raise TimeoutError(f"etcd not healthy:\n{self.output()}")

    def output(self) -> str:
        return (self.workdir / "etcd.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


class ZooKeeperServer:
    """A standalone ZooKeeper on 127.0.0.1 (tick 500 ms, so sessions may be as short as
    1 s); ``stop``/``start`` keep its port and data."""

    def __init__(self, workdir: Path) -> None:
        java = shutil.which("java") if ZOOKEEPER_JAR.exists() else None
        self.java = _require(java, "ZooKeeper (Debian zookeeper)")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = self.workdir / "zoo.cfg"
        self.config.write_text(
            "tickTime=500\n"
            f"dataDir={self.workdir / 'data'}\n"
            f"clientPort={self.port}\n"
            "clientPortAddress=127.0.0.1\n"
            "admin.enableServer=false\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        with (self.workdir / "zookeeper.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.java, "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                    "-Dzookeeper.root.logger=WARN,CONSOLE",
                    "-cp", f"/etc/zookeeper/conf:{ZOOKEEPER_JAR}",
                    "org.apache.zookeeper.server.ZooKeeperServerMain", str(self.config),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            self._wait_serving(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_serving(self, timeout: float) -> None:
        """Until ``srvr`` (a four-letter command allowed by default) reports a version: the
        port opens before the server takes sessions."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"ZooKeeper exited {self.proc.returncode}:\n{self.output()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock,
            ):
                sock.sendall(b"srvr")
                if b"Zookeeper version" in sock.recv(4096):
                    return
            time.sleep(0.05)
        raise TimeoutError(f"ZooKeeper not serving:\n{self.output()}")

    def output(self) -> str:
        return (self.workdir / "zookeeper.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


@contextlib.contextmanager
def start_etcd(workdir: Path) -> Iterator[str]:
    """An etcd for the duration of the block; yields its ``host:port``."""
    server = EtcdServer(workdir / "etcd")
    try:
        yield server.endpoint
    finally:
        server.stop()


@contextlib.contextmanager
def start_zookeeper(workdir: Path) -> Iterator[str]:
    """A ZooKeeper for the duration of the block; yields its ``host:port`` (kazoo hosts)."""
    server = ZooKeeperServer(workdir / "zookeeper")
    try:
        yield server.hosts
    finally:
        server.stop()


class Running:
    """``registry.run`` as a task of the current loop, for ``async with``; counts the
    ``changed`` calls and notes any made off the loop's thread (the contract forbids it)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.changes = 0
        self.foreign_threads: list[str] = []
        self._thread = threading.get_ident()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        self._task = asyncio.create_task(self.registry.run(self._changed))
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        assert not self.foreign_threads, f"changed() called on {self.foreign_threads}"

    def _changed(self) -> None:
        if threading.get_ident() != self._thread:
            self.foreign_threads.append(threading.current_thread().name)
        self.changes += 1

    async def until(
        self, predicate: Callable[[RegistrySnapshot], bool], timeout: float = 10.0
    ) -> RegistrySnapshot:
        """The first snapshot that satisfies ``predicate``; fails after ``timeout`` or if
        ``run`` ended."""
        assert self._task is not None
        deadline = time.monotonic() + timeout
        while True:
            snapshot = self.registry.snapshot()
            if predicate(snapshot):
                await asyncio.sleep(0)  # a registry may call changed() on the next iteration
                return snapshot
            if self._task.done():
                self._task.result()
                raise AssertionError(f"{self.registry.name}: run returned")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.registry.name}: not reached in {timeout} s: {snapshot}"
                )
            await asyncio.sleep(0.02)
