"""``GET /tap`` on real ``shoal proxy`` processes: records of finished HTTP requests, RPC
calls and TCP connections streamed as they finish, filters, ``max`` and ``duration``, a
tap held open across a reload, a client that leaves or reads too slowly, and the same
with ``--concurrency`` workers streaming through the supervisor."""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from tests.conftest import (
    Echo,
    Proxy,
    bootstrap,
    free_port,
    http_listener,
    raw_request,
    route_to,
    static_cluster,
)
from tests.integration.rpc_peers import RpcServer, run_client
from tests.rpc_config import action, generic_proxy, matcher, rpc_listener

TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
GREETER = "com.example.Greeter"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
RECORD_KEYS = {
    "ts", "listener", "direction", "protocol", "method", "authority", "path", "status",
    "duration_ms", "upstream_cluster", "upstream_host", "response_flags", "bytes_received",
    "bytes_sent", "downstream_remote", "request_id", "trace_id",
}  # fmt: skip


class TapStream:
    """One ``GET /tap`` held open. The constructor returns once the response head has
    arrived: from then on the tap is open on every process of the proxy."""

    def __init__(self, admin_port: int, query: str, *, rcvbuf: int = 0) -> None:
        sock = socket.socket()
        if rcvbuf:  # before connecting, so that the advertised window stays small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", admin_port))
        self.conn = http.client.HTTPConnection("127.0.0.1", admin_port)
        self.conn.sock = sock
        self.conn.request("GET", f"/tap?{query}")
        self.response = self.conn.getresponse()

    def read_all(self) -> tuple[list[dict[str, Any]], int]:
        """Every record until the final ``{"dropped": N}`` line, and N."""
        records = []
        while line := self.response.readline():
            item = json.loads(line)
            if set(item) == {"dropped"}:
                assert self.response.read() == b""  # the last chunk: the body is complete
                return records, item["dropped"]
            assert set(item) == RECORD_KEYS, item
            records.append(item)
        raise AssertionError(f"the tap ended without its dropped line after {records}")

    def close(self) -> None:
        self.conn.close()


@contextmanager
def tapping(admin_port: int, query: str, **options: Any) -> Iterator[TapStream]:
    stream = TapStream(admin_port, query, **options)
    try:
        yield stream
    finally:
        stream.close()


def get(port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> int:
    """One request on its own connection (so that workers share them); the status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def http_config(port: int, echo: Echo, admin_port: int = 0, cluster: str = "echo") -> Any:
    routes = [{"name": "all", "domains": ["*"], "routes": [route_to(cluster)]}]
    return bootstrap(
        [http_listener(port, routes, name="outbound")],
        [static_cluster(cluster, echo.port)],
        admin_port or free_port(),
    )


@pytest.fixture
def proxied(make_proxy: Callable[..., Proxy], echo_a: Echo) -> tuple[Proxy, int]:
    port = free_port()
    return make_proxy(http_config(port, echo_a)), port


def test_records_stream_as_requests_finish(proxied: tuple[Proxy, int], echo_a: Echo) -> None:
    proxy, port = proxied
    assert proxy.stats()["server.taps_active"] == 0
    with tapping(proxy.admin_port, "format=json&max=2") as tap:
        assert tap.response.status == 200
        assert tap.response.getheader("transfer-encoding") == "chunked"
        assert tap.response.getheader("content-type") == "application/x-ndjson"
        assert proxy.stats()["server.taps_active"] == 1
        headers = {
            "x-request-id": "req-1",
            "traceparent": f"00-{TRACE_ID}-b7ad6b7169203331-01",
            "host": "shop.local:8080",
        }
        assert get(port, "/items?id=7", headers) == 200
        # the first record comes while the tap is still open, before the second request
        first = json.loads(tap.response.readline())
        assert get(port, "/missing-host", method="DELETE") == 200
        records, dropped = tap.read_all()
    assert dropped == 0
    assert first["ts"].endswith("Z") and time.time() - _epoch(first["ts"]) < 30
    assert first["duration_ms"] >= 0 and first["bytes_sent"] > 0
    assert first["downstream_remote"].startswith("127.0.0.1:")
    del first["ts"], first["duration_ms"], first["bytes_sent"], first["downstream_remote"]
    assert first == {
        "listener": "outbound",
        "direction": "outbound",
        "protocol": "HTTP/1.1",
        "method": "GET",
        "authority": "shop.local:8080",
        "path": "/items?id=7",
        "status": 200,
        "upstream_cluster": "echo",
        "upstream_host": f"127.0.0.1:{echo_a.port}",
        "response_flags": "-",
        "bytes_received": 0,
        "request_id": "req-1",
        "trace_id": TRACE_ID,
    }
    [second] = records
    assert (second["method"], second["path"], second["trace_id"]) == (
        "DELETE",
        "/missing-host",
        None,
    )
    assert second["request_id"]  # the proxy made one up
    wait_for(lambda: proxy.stats()["server.taps_active"] == 0, "the tap to close")


def _epoch(rfc3339: str) -> float:
    return time.mktime(time.strptime(rfc3339[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone


def test_filters_and_concurrent_taps(proxied: tuple[Proxy, int]) -> None:
    proxy, port = proxied
    queries = {
        "service": "service=shop.local&duration=2",
        "authority": "authority=shop.local:8080&duration=2",
        "path": "path_prefix=/keep&duration=2",
        "method": "method=POST&duration=2",
        "all": "service=shop.local&path_prefix=/keep&method=POST&duration=2",
    }
    taps = {name: TapStream(proxy.admin_port, query) for name, query in queries.items()}
    try:
        assert proxy.stats()["server.taps_active"] == len(taps)
        sent = [
            ("GET", "/keep/1", "shop.local:8080"),
            ("POST", "/keep/2", "shop.local"),
            ("POST", "/drop/3", "shop.local:8080"),
            ("POST", "/keep/4", "other.local:8080"),
            ("GET", "/drop/5", "shop.localhost"),
        ]
        for method, path, host in sent:
            assert get(port, path, {"host": host}, method=method) == 200
        seen = {}
        for name, tap in taps.items():
            records, dropped = tap.read_all()
            assert dropped == 0
            seen[name] = [record["path"] for record in records]
    finally:
        for tap in taps.values():
            tap.close()
    assert seen == {
        "service": ["/keep/1", "/keep/2", "/drop/3"],
        "authority": ["/keep/1", "/drop/3"],
        "path": ["/keep/1", "/keep/2", "/keep/4"],
        "method": ["/keep/2", "/drop/3", "/keep/4"],
        "all": ["/keep/2"],
    }
    wait_for(lambda: proxy.stats()["server.taps_active"] == 0, "the taps to close")


def test_duration_ends_a_quiet_tap(proxied: tuple[Proxy, int]) -> None:
    proxy, _ = proxied
    started = time.monotonic()
    with tapping(proxy.admin_port, "duration=0.5") as tap:
        assert tap.read_all() == ([], 0)
    assert 0.4 < time.monotonic() - started < 3


def test_bad_queries_are_refused(proxied: tuple[Proxy, int]) -> None:
    proxy, _ = proxied
    assert proxy.admin("/tap?servce=shop") == (
        400,
        "unknown parameter 'servce'; known: authority, duration, format, max, method, "
        "path_prefix, service\n",
    )
    assert proxy.admin("/tap?max=0")[0] == 400
    assert proxy.admin("/tap?format=prometheus")[0] == 400
    status, listing = proxy.admin("/nope")
    assert status == 404 and "/tap" in listing.splitlines()


def test_a_client_that_leaves_ends_the_tap(proxied: tuple[Proxy, int]) -> None:
    proxy, port = proxied
    tap = TapStream(proxy.admin_port, "duration=300")
    assert proxy.stats()["server.taps_active"] == 1
    tap.close()
    wait_for(lambda: proxy.stats()["server.taps_active"] == 0, "the tap to close")
    assert get(port, "/after") == 200


def test_a_tap_open_across_a_reload_sees_the_new_config(
    make_proxy: Callable[..., Proxy], echo_a: Echo
) -> None:
    port = free_port()
    proxy = make_proxy(http_config(port, echo_a))
    with tapping(proxy.admin_port, "max=2&duration=30") as tap:
        assert get(port, "/before") == 200
        proxy.reconfigure(http_config(port, echo_a, proxy.admin_port, cluster="echo2"))
        wait_for(lambda: proxy.stats()["server.config_version"] == 2, "the reload")
        assert get(port, "/after") == 200
        records, dropped = tap.read_all()
    assert [(r["path"], r["upstream_cluster"]) for r in records] == [
        ("/before", "echo"),
        ("/after", "echo2"),
    ]
    assert dropped == 0


def test_tcp_connections_are_tapped(make_proxy: Callable[..., Proxy], echo_a: Echo) -> None:
    port = free_port()
    listener = {
        "name": "db",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {
                            "@type": TCP_PROXY,
                            "stat_prefix": "db",
                            "cluster": "echo",
                        },
                    }
                ]
            }
        ],
    }
    proxy = make_proxy(bootstrap([listener], [static_cluster("echo", echo_a.port)], free_port()))
    with tapping(proxy.admin_port, "max=1") as tap:
        request = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        answer = raw_request(port, request)
        records, _ = tap.read_all()
    [record] = records
    assert (record["listener"], record["direction"], record["protocol"]) == ("db", "db", "TCP")
    assert record["method"] is record["path"] is record["authority"] is None
    assert record["bytes_received"] == len(request)
    assert record["bytes_sent"] == len(answer)
    assert record["upstream_cluster"] == "echo"


def test_rpc_calls_are_tapped(make_proxy: Callable[..., Proxy]) -> None:
    with RpcServer("dubbo", "v1") as server:
        port = free_port()
        chain = generic_proxy(
            "dubbo", {GREETER: matcher([], default=action("v1"))}, stat_prefix="inbound_dubbo"
        )
        config = bootstrap(
            [rpc_listener(port, ([], chain))], [static_cluster("v1", server.port)], free_port()
        )
        proxy = make_proxy(config)
        with tapping(proxy.admin_port, f"service={GREETER}&method=sayHello&max=2") as tap:
            echoed = run_client("dubbo", port, method="echo", args=["x"])
            hello = run_client("dubbo", port, args=["world"], count=2)
            records, dropped = tap.read_all()
    assert echoed["ok"] == 1 and hello["ok"] == 2 and dropped == 0
    for record in records:
        assert record["listener"] == "inbound_dubbo"
        assert record["direction"] == "inbound"  # from the stat prefix: the listener is "rpc"
        assert record["protocol"] == "dubbo"
        assert (record["method"], record["authority"], record["path"]) == (
            "sayHello",
            GREETER,
            GREETER,
        )
        assert record["status"] == 20  # Dubbo's OK
        assert record["upstream_cluster"] == "v1"
        assert record["upstream_host"] == f"127.0.0.1:{server.port}"
        assert record["bytes_received"] > 0 and record["bytes_sent"] > 0


def test_a_slow_reader_loses_records_not_requests(proxied: tuple[Proxy, int]) -> None:
    """A tap client that stops reading fills the socket, then the tap's buffer; records
    past that are dropped and counted, while requests go on at full speed and a second,
    reading tap gets every record.

    The kernel grows a stalled socket's send buffer to a few MiB: long paths make the
    records big enough to get past that within seconds."""
    proxy, port = proxied
    duration = 8.0
    padding = "x" * 4000
    slow = TapStream(proxy.admin_port, f"max=10000&duration={duration}", rcvbuf=4096)
    fast = TapStream(proxy.admin_port, f"max=10000&duration={duration}")
    fast_result: list[tuple[list[dict[str, Any]], int]] = []
    reader = threading.Thread(target=lambda: fast_result.append(fast.read_all()))
    reader.start()
    try:
        started = time.monotonic()
        latencies = []
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        while len(latencies) < 6000 and time.monotonic() - started < duration - 3:
            begin = time.monotonic()
            conn.request("GET", f"/n/{len(latencies)}/{padding}")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            latencies.append(time.monotonic() - begin)
        conn.close()
        sent = len(latencies)
        records, dropped = slow.read_all()
        reader.join(30)
    finally:
        slow.close()
        fast.close()
    assert sent > 2000, f"only {sent} requests in {duration - 3}s"
    assert dropped > 0 and len(records) + dropped == sent
    assert [r["path"] for r in records] == [f"/n/{n}/{padding}" for n in range(len(records))]
    fast_records, fast_dropped = fast_result[0]
    assert (len(fast_records), fast_dropped) == (sent, 0)
    assert statistics.median(latencies) < 0.02 and max(latencies) < 1.0


# --- --concurrency N: the supervisor asks every worker to stream its records --------------


@pytest.fixture
def workers(make_proxy: Callable[..., Proxy], echo_a: Echo) -> tuple[Proxy, int]:
    port = free_port()
    return make_proxy(http_config(port, echo_a), "--concurrency", "3"), port


def test_workers_stream_their_records_through_the_supervisor(
    workers: tuple[Proxy, int],
) -> None:
    proxy, port = workers
    count = 60
    with tapping(proxy.admin_port, f"path_prefix=/w/&max={count}&duration=60") as tap:
        assert proxy.stats()["server.taps_active"] == 1
        for n in range(count):
            assert get(port, f"/w/{n}") == 200  # new connections: spread over the workers
            assert get(port, f"/other/{n}") == 200
        started = time.monotonic()
        records, dropped = tap.read_all()
    assert time.monotonic() - started < 5  # ended by max, not by duration
    assert sorted(r["path"] for r in records) == sorted(f"/w/{n}" for n in range(count))
    assert dropped == 0
    assert {r["listener"] for r in records} == {"outbound"}
    wait_for(lambda: proxy.stats()["server.taps_active"] == 0, "the workers' taps to close")


def test_workers_max_duration_and_leaving(workers: tuple[Proxy, int]) -> None:
    proxy, port = workers
    with tapping(proxy.admin_port, "max=5&duration=60") as tap:
        for n in range(20):
            assert get(port, f"/m/{n}") == 200
        records, dropped = tap.read_all()
    assert len(records) == 5 and dropped == 0

    started = time.monotonic()
    with tapping(proxy.admin_port, "duration=1") as tap:
        assert get(port, "/d/1") == 200
        records, dropped = tap.read_all()
    assert [r["path"] for r in records] == ["/d/1"] and dropped == 0
    assert 0.9 < time.monotonic() - started < 2.5  # the workers' own ends, not the safety net

    tap = TapStream(proxy.admin_port, "duration=300")
    assert proxy.stats()["server.taps_active"] == 1
    tap.close()
    wait_for(lambda: proxy.stats()["server.taps_active"] == 0, "the workers' taps to close")
    # the control protocol still answers in order after all that
    assert proxy.admin("/healthcheck/fail", method="POST")[0] == 200
    assert proxy.admin("/healthcheck/ok", method="POST")[0] == 200
    assert proxy.stats()["server.concurrency"] == 3
