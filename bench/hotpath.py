"""The proxy's Python cost per request, with no sockets: one request and its response pushed
through HttpConnection and UpstreamConnection over in-memory transports, using the
benchmark bootstrap. It isolates what the hot-path work (parsing, routing, header building,
stats, access log) costs from the kernel's share, and runs in seconds:

    .venv/bin/python bench/hotpath.py [--requests 200000] [--profile]

`--profile` prints cProfile's top functions (which inflates the total).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
import yaml

from shoal.config.envoy import bootstrap_from_dict
from shoal.proxy.http import HttpConnection
from shoal.proxy.listeners import HttpListenerContext
from shoal.proxy.runtime import ProxyRuntime
from shoal.transport.upstream import UpstreamConnection
from shoal.upstream.cluster import HostPool

HERE = Path(__file__).resolve().parent
REQUEST = (
    b"GET /api/items/42 HTTP/1.1\r\nHost: bench.local\r\nUser-Agent: wrk\r\nx-tenant: bench\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Wed, 25 Nov 2026 21:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n"
    + b"x"
    * 100
)


class MemoryTransport:
    """Just enough of asyncio.Transport: writes are kept (and dropped between rounds)."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.out: list[bytes] = []
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer, "sockname": ("127.0.0.1", 10000)}.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run(requests: int, profile: bool) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="shoal-hotpath-"))
    text = (HERE / "bootstrap.yaml").read_text()
    for name, value in {
        "{LISTEN_PORT}": _free_port(),
        "{ADMIN_PORT}": _free_port(),
        "{UPSTREAM_PORT}": 9,
        "{ACCESS_LOG}": workdir / "access.log",
    }.items():
        text = text.replace(name, str(value))
    runtime = ProxyRuntime()
    await runtime.apply(bootstrap_from_dict(yaml.safe_load(text), "bench/bootstrap.yaml"))
    context = next(iter(runtime.listeners.values())).context
    assert isinstance(context, HttpListenerContext)
    downstream = HttpConnection(context)
    client = MemoryTransport(("127.0.0.1", 5555))
    downstream.connection_made(client)  # type: ignore[arg-type]
    cluster = runtime.clusters["upstream"]
    host = cluster.hosts[0]
    pool = cluster.pools.setdefault(host.key, HostPool(cluster, host))
    upstream = UpstreamConnection(pool)
    server = MemoryTransport(("127.0.0.1", 9))
    upstream.transport = server  # type: ignore[assignment]
    cluster.cx_active += 1
    pool.idle.append(upstream)

    def one() -> None:
        downstream.data_received(REQUEST)
        upstream.data_received(RESPONSE)

    for _ in range(2000):
        one()
    profiler = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    for _ in range(requests):
        one()
        if len(client.out) > 10000:
            client.out.clear()
            server.out.clear()
    if profiler is not None:
        profiler.disable()
    elapsed = time.perf_counter() - started
    print(f"{elapsed / requests * 1e6:.2f} µs of Python per proxied request ({requests} requests)")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    runtime.access_logs.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run(args.requests, args.profile))


if __name__ == "__main__":
    main()
