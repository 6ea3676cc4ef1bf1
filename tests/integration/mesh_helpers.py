"""A real `shoal pilot` process, sidecars bootstrapped to it, and requests through them."""

from __future__ import annotations

import contextlib
import http.client
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from tests.conftest import free_port, stop_process

from shoal.pilot.bootstrap import sidecar_bootstrap


class PilotProcess:
    def __init__(
        self,
        workdir: Path,
        *registries: str,
        xds_port: int | None = None,
        options: tuple[str, ...] = (),
    ) -> None:
        """``options``: more of ``shoal pilot``'s, e.g. ``("--scrape-interval", "1s")``."""
        self.workdir = workdir
        self.options = options
        self.config_dir = workdir / "rules"
        self.config_dir.mkdir(exist_ok=True)
        self.xds_port = xds_port or free_port()
        self.http_port = free_port()
        self.registries = registries or (f"embedded:{workdir / 'registry.db'}",)
        self.log_path = workdir / "pilot.log"
        self.start()

    def start(self) -> None:
        self.log = self.log_path.open("ab")
        args = [
            sys.executable, "-m", "shoal", "-l", "debug", "pilot",
            "--config-dir", str(self.config_dir),
            "--xds-address", f"127.0.0.1:{self.xds_port}",
            "--http-address", f"127.0.0.1:{self.http_port}",
        ]  # fmt: skip
        for spec in self.registries:
            args += ["--registry", spec]
        args += self.options
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pilot exited {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError):
                if self.get("/ready")[0] == 200:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"pilot not ready:\n{self.output()}")

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                text = response.read().decode()
                status = response.status
        except urllib.error.HTTPError as exc:
            text, status = exc.read().decode(), exc.code
        with contextlib.suppress(ValueError):
            return status, json.loads(text)
        return status, text

    def get(self, path: str) -> tuple[int, Any]:
        return self.call("GET", path)

    def register(
        self,
        host: str,
        port: int,
        labels: Mapping[str, str] | None = None,
        service_port: int = 0,
        protocol: str = "HTTP",
    ) -> str:
        body: dict[str, Any] = {"address": "127.0.0.1", "port": port, "labels": dict(labels or {})}
        if service_port:
            body["service_port"] = service_port
            body["ports"] = [{"number": service_port, "protocol": protocol}]
        status, answer = self.call("POST", f"/v1/services/{host}/instances", body)
        assert status == 201, answer
        return str(answer["id"])

    def deregister(self, host: str, instance_id: str) -> None:
        status, answer = self.call("DELETE", f"/v1/services/{host}/instances/{instance_id}")
        assert status == 200, answer

    def write_rules(self, name: str, *resources: dict[str, Any]) -> None:
        """Replace a rules file the way editors and kubectl do: write aside, then rename."""
        target = self.config_dir / name
        aside = self.config_dir / f".{name}.tmp"
        aside.write_text(yaml.safe_dump_all(resources))
        aside.rename(target)

    def debug(self) -> dict[str, Any]:
        return dict(self.get("/debug/mesh")[1])


def sidecar_config(pilot: PilotProcess, node_id: str, **metadata: Any) -> dict[str, Any]:
    """A bootstrap for shoal proxy or Envoy; ``outbound_port`` is in the returned config's
    node metadata."""
    outbound = metadata.pop("outbound_port", None) or free_port()
    config = sidecar_bootstrap(
        node_id,
        pilot=("127.0.0.1", pilot.xds_port),
        outbound_address=f"127.0.0.1:{outbound}",
        inbound_address=f"127.0.0.1:{metadata.pop('inbound_port', None) or free_port()}",
        admin=("127.0.0.1", free_port()),
        **metadata,
    )
    return config


def outbound_port(config: dict[str, Any]) -> int:
    return int(config["node"]["metadata"]["OUTBOUND_ADDRESS"].rpartition(":")[2])


def served_by(
    port: int, authority: str, count: int, path: str = "/", headers: dict[str, str] | None = None
) -> Counter[str]:
    """Send ``count`` requests for ``authority`` through a sidecar's outbound listener on one
    keep-alive connection; count the echo names that answered (or the status when not 200)."""
    seen: Counter[str] = Counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for _ in range(count):
            conn.request("GET", path, headers={"Host": authority, **(headers or {})})
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                seen[response.getheader("x-served-by", "?")] += 1
            else:
                seen[str(response.status)] += 1
    finally:
        conn.close()
    return seen


def eventually(check: Callable[[], bool], timeout: float = 10.0, interval: float = 0.1) -> float:
    """Wait until ``check()`` holds; returns how long it took."""
    start = time.monotonic()
    while True:
        with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
            if check():
                return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)


# --- Istio rules as tests write them -------------------------------------------------------------


def destination_rule(host: str, label: str, *subsets: str) -> dict[str, Any]:
    """A DestinationRule whose subsets are named after the ``label`` value they select."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": host},
        "spec": {
            "host": host,
            "subsets": [{"name": name, "labels": {label: name}} for name in subsets],
        },
    }


def virtual_service(host: str, *http: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": host},
        "spec": {"hosts": [host], "http": list(http)},
    }


def to(host: str, subset: str, weight: int | None = None) -> dict[str, Any]:
    """One route destination: ``host``'s ``subset``, with a weight if given."""
    destination: dict[str, Any] = {"destination": {"host": host, "subset": subset}}
    if weight is not None:
        destination["weight"] = weight
    return destination
