"""Real processes for the global rate limit tests: a throwaway ``redis-server`` (Debian's
binary, on a free loopback port, no persistence, its own temp dir; the system service is
never used) and a ``shoal ratelimit`` process, plus a small gRPC client."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from tests.conftest import (
    bootstrap,
    free_port,
    http_listener,
    static_cluster,
    stop_process,
    wait_for_port,
)

OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT


def redis_server_binary() -> str:
    """The redis-server binary; skips the test where it is missing, except in CI
    (``make setup`` installs Debian's redis-server when run as root)."""
    path = shutil.which("redis-server")
    if path is None:
        message = "redis-server is not installed (make setup as root installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


class RedisServer:
    """A ``redis-server`` process on 127.0.0.1; ``stop``/``start`` keep its port."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.binary = redis_server_binary()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.workdir / "redis.log").open("ab")
        # fmt: off
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                "--daemonize", "no", "--logfile", "",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        # fmt: on
        log.close()
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=0)


class RateLimitService:
    """A real ``shoal ratelimit`` process."""

    def __init__(self, config: Sequence[Path], redis_url: str, workdir: Path, *args: str) -> None:
        self.grpc_port = free_port()
        self.http_port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"ratelimit-{self.grpc_port}.log"
        self.log = self.log_path.open("wb")
        configs = [arg for path in config for arg in ("--config", str(path))]
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "shoal", "-l", "debug", "ratelimit", *configs,
                "--grpc-address", f"127.0.0.1:{self.grpc_port}",
                "--http-address", f"127.0.0.1:{self.http_port}",
                "--redis-url", redis_url,
                *args,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.channel: grpc.Channel | None = None
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        self.stub = rls_pb2_grpc.RateLimitServiceStub(self.channel)

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"shoal ratelimit exited {self.proc.returncode}:\n{self.output()}"
                )
            with contextlib.suppress(OSError):
                if self.http("/ready")[0] == 200:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"shoal ratelimit not ready:\n{self.output()}")

    def http(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def stats(self) -> dict[str, int]:
        """The dotted counters of ``/stats?format=text``."""
        out = {}
        for line in self.http("/stats?format=text")[1].splitlines():
            name, _, value = line.partition(": ")
            if value.isdigit():
                out[name] = int(value)
        return out

    def check(
        self,
        domain: str,
        *descriptors: Sequence[tuple[str, str]] | ratelimit_pb2.RateLimitDescriptor,
        hits_addend: int = 0,
    ) -> rls_pb2.RateLimitResponse:
        request = rls_pb2.RateLimitRequest(
            domain=domain,
            descriptors=[
                d if isinstance(d, ratelimit_pb2.RateLimitDescriptor) else descriptor(*d)
                for d in descriptors
            ],
            hits_addend=hits_addend,
        )
        return self.stub.ShouldRateLimit(request, timeout=5)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        stop_process(self.proc)
        self.log.close()
        return self.proc.returncode


def descriptor(*entries: tuple[str, str], hits_addend: int | None = None) -> Any:
    """A ``RateLimitDescriptor`` of ``(key, value)`` entries."""
    d = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
    )
    if hits_addend is not None:
        d.hits_addend.value = hits_addend
    return d


def sleep_to_window_start(seconds: int = 1, margin: float = 0.02) -> None:
    """Sleep until just after the next fixed window of ``seconds`` starts, so what
    follows has (nearly) the whole window."""
    now = time.time()
    time.sleep(seconds - now % seconds + margin)


RATELIMIT_FILTER = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit"
HTTP2_OPTIONS = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}


def rate_limited_proxy_config(
    upstream_port: int, rls_port: int, rate_limits: list[dict[str, Any]], **filter_fields: Any
) -> tuple[dict[str, Any], int]:
    """A bootstrap whose one route goes to cluster ``a`` through the rate limit filter,
    asking the service at ``rls_port`` (cluster ``rls``, HTTP/2) about domain ``shop``;
    returns it with the listener's port."""
    port = free_port()
    route = {"match": {"prefix": "/"}, "route": {"cluster": "a"}}
    listener = http_listener(port, [{"name": "v", "domains": ["*"], "routes": [route]}])
    limit = {
        "@type": RATELIMIT_FILTER,
        "domain": "shop",
        "rate_limit_service": {
            "grpc_service": {"envoy_grpc": {"cluster_name": "rls"}},
            "transport_api_version": "V3",
        },
        "rate_limits": rate_limits,
        **filter_fields,
    }
    chain = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    chain.insert(0, {"name": "envoy.filters.http.ratelimit", "typed_config": limit})
    clusters = [
        static_cluster("a", upstream_port),
        static_cluster("rls", rls_port, typed_extension_protocol_options=HTTP2_OPTIONS),
    ]
    return bootstrap([listener], clusters, free_port()), port
