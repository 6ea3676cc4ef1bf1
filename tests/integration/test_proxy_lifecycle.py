"""The proxy's life cycle with real processes: reload (SIGHUP and ``--watch``), drain,
admin endpoints, ``--concurrency``, startup errors, logging, and large bodies in bounded
memory."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.conftest import (
    Echo,
    Proxy,
    bootstrap,
    free_port,
    http_listener,
    route_to,
    static_cluster,
)

LOG_LINE = re.compile(
    r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\]\[(?P<pid>\d+)\]"
    r"\[(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL)\]\[(?P<logger>[\w.]+)\] (?P<msg>.*)$"
)


# --- a small HTTP/1.1 client on raw sockets ------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """One downstream connection; sends requests and reads exactly one response each."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, path: str, host: str = "s", close: bool = False, method: str = "GET") -> None:
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
        if close:
            head += "Connection: close\r\n"
        self.sock.sendall(head.encode() + b"\r\n")

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self._fill():
                raise ConnectionError("closed mid-body")
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError("closed mid-line")
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def read_response(self, method: str = "GET") -> Response:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError(f"closed before a response head: {self.buffer!r}")
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        response = Response(int(lines[0].split(" ", 2)[1]))
        for line in lines[1:]:
            name, _, value = line.partition(":")
            response.headers[name.strip().lower()] = value.strip()
        if method == "HEAD" or response.status in (204, 304) or response.status < 200:
            return response
        if response.headers.get("transfer-encoding") == "chunked":
            parts = []
            while size := int(self._line().split(b";")[0], 16):
                parts.append(self._take(size))
                self._take(2)
            self._line()  # no trailers
            response.body = b"".join(parts)
        elif "content-length" in response.headers:
            response.body = self._take(int(response.headers["content-length"]))
        else:
            while self._fill():
                pass
            response.body, self.buffer = self.buffer, b""
        return response

    def request(self, path: str, host: str = "s", close: bool = False) -> Response:
        self.send(path, host, close)
        return self.read_response()

    def closed_by_peer(self, timeout: float = 3.0) -> bool:
        """True when the proxy closes the connection (EOF) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True


def get(port: int, path: str = "/", host: str = "s") -> Response:
    with Client(port) as client:
        return client.request(path, host, close=True)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if condition():
                return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or condition}")


def refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def log_records(proxy: Proxy) -> list[dict[str, str]]:
    records = []
    for line in proxy.output().splitlines():
        match = LOG_LINE.match(line)
        if match:
            records.append(match.groupdict())
    return records


# --- configs ---------------------------------------------------------------------------------


def versioned_config(
    ports: list[int],
    admin_port: int,
    echo_a: Echo,
    echo_b: Echo,
    *,
    version: str = "v1",
    cluster: str = "a",
) -> dict[str, Any]:
    """Listeners on ``ports``: ``/version`` answers ``version`` itself, the rest goes to
    ``cluster``."""
    vhosts = [
        {
            "name": "all",
            "domains": ["*"],
            "routes": [
                {
                    "match": {"path": "/version"},
                    "direct_response": {"status": 200, "body": {"inline_string": version}},
                },
                route_to(cluster, "/"),
            ],
        }
    ]
    listeners = [
        http_listener(port, vhosts, name="ingress" if index == 0 else f"extra{port}")
        for index, port in enumerate(ports)
    ]
    clusters = [static_cluster("a", echo_a.port), static_cluster("b", echo_b.port)]
    return bootstrap(listeners, clusters, admin_port)


@pytest.fixture
def start(make_proxy: Any, echo_a: Echo, echo_b: Echo) -> Callable[..., Proxy]:
    """Start a proxy on ``versioned_config``; the proxy gets ``port`` and ``make_config``."""

    def run(*args: str, ports: int = 1) -> Proxy:
        listen = [free_port() for _ in range(ports)]
        admin_port = free_port()

        def make_config(version: str = "v1", cluster: str = "a", **kw: Any) -> dict[str, Any]:
            ports = kw.get("ports", listen)
            return versioned_config(
                ports, admin_port, echo_a, echo_b, version=version, cluster=cluster
            )

        proxy = make_proxy(make_config(), "--drain-time-s", "3", *args)
        proxy.port = listen[0]
        proxy.ports = listen
        proxy.make_config = make_config
        return proxy

    return run


def apply(proxy: Proxy, config: dict[str, Any] | str, mode: str) -> None:
    """Write a new config and reload it by SIGHUP, or let ``--watch`` notice the file."""
    text = config if isinstance(config, str) else yaml.safe_dump(config)
    if mode == "sighup":
        proxy.path.write_text(text)
        proxy.proc.send_signal(signal.SIGHUP)
    else:
        # A fresh file renamed over the old one, as config management tools write it;
        # --watch looks at the mtime.
        fresh = proxy.path.with_suffix(".tmp")
        fresh.write_text(text)
        os.replace(fresh, proxy.path)


def in_flight(proxy: Proxy, cluster: str = "a") -> int:
    return proxy.stats()[f"cluster.{cluster}.upstream_rq_active"]


# --- reload ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sighup", "watch"])
def test_reload_switches_new_requests_and_drains_old_connections(
    start: Callable[..., Proxy], mode: str
) -> None:
    proxy = start(*(["--watch"] if mode == "watch" else []))
    assert get(proxy.port, "/version").body == b"v1"
    with Client(proxy.port) as idle, Client(proxy.port) as busy, ThreadPoolExecutor(1) as pool:
        # an idle keep-alive connection, and one with a keep-alive request in flight
        first = idle.request("/x")
        assert first.status == 200 and "connection" not in first.headers
        busy.send("/delay/1500")
        wait_for(lambda: in_flight(proxy) == 1, what="request in flight")
        # and a Connection: close request in flight on a third connection
        closing: Future[Response] = pool.submit(get, proxy.port, "/delay/1500")
        wait_for(lambda: in_flight(proxy) == 2, what="second request in flight")

        apply(proxy, proxy.make_config("v2", cluster="b"), mode)
        wait_for(lambda: get(proxy.port, "/version").body == b"v2", what="v2 served")
        assert not closing.done(), "the reload took longer than the in-flight request"
        fresh = get(proxy.port, "/y")
        assert fresh.headers["x-served-by"] == "b"

        # In-flight requests finish on the config they started with.
        old = closing.result(timeout=5)
        assert old.status == 200 and old.headers["x-served-by"] == "a"
        kept = busy.read_response()
        assert kept.status == 200 and kept.headers["x-served-by"] == "a"
        # The keep-alive connection is closed after its current response ...
        assert kept.headers.get("connection") == "close"
        assert busy.closed_by_peer()
        # ... and an idle keep-alive connection is closed by the reload right away.
        assert idle.closed_by_peer()
    assert "config version 2 applied" in proxy.output()


def _invalid(make_config: Callable[..., dict[str, Any]], kind: str) -> tuple[str, tuple[str, ...]]:
    """An invalid variant of a config and the words its error must contain."""
    config = make_config("v2")
    routes = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]["virtual_hosts"][0]["routes"]
    if kind == "bad_field":
        routes[1]["route"]["foo"] = 1
        return yaml.safe_dump(config), (
            "virtual_hosts[0].routes[1].route.foo",
            "unknown field",
        )
    if kind == "unknown_cluster":
        routes[1]["route"]["cluster"] = "nope"
        return yaml.safe_dump(config), (
            "virtual_hosts[0].routes[1].route.cluster",
            "unknown cluster 'nope'",
        )
    if kind == "bad_yaml":
        return yaml.safe_dump(config) + "  oops: [\n", ("not valid YAML", "line")
    if kind == "bad_duration":
        config["static_resources"]["clusters"][0]["connect_timeout"] = "soon"
        return yaml.safe_dump(config), ("clusters[0].connect_timeout",)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "mode"),
    [
        ("bad_field", "sighup"),
        ("unknown_cluster", "sighup"),
        ("bad_yaml", "sighup"),
        ("bad_duration", "watch"),
        ("unknown_cluster", "watch"),
    ],
)
def test_invalid_reload_is_rejected_and_old_config_keeps_serving(
    start: Callable[..., Proxy], kind: str, mode: str
) -> None:
    proxy = start(*(["--watch"] if mode == "watch" else []))
    text, words = _invalid(proxy.make_config, kind)
    apply(proxy, text, mode)
    wait_for(lambda: "config rejected" in proxy.output(), what="rejection logged")
    rejected = [r for r in log_records(proxy) if "config rejected" in r["msg"]]
    assert len(rejected) == 1
    assert rejected[0]["level"] == "ERROR"
    assert str(proxy.path) in rejected[0]["msg"]
    full = proxy.output()[proxy.output().index("config rejected") :]
    for word in words:
        assert word in full
    assert get(proxy.port, "/version").body == b"v1"
    assert get(proxy.port, "/x").headers["x-served-by"] == "a"
    # a good file afterwards is still picked up
    apply(proxy, proxy.make_config("v3"), mode)
    wait_for(lambda: get(proxy.port, "/version").body == b"v3", what="v3 served")


def test_reload_with_a_port_in_use_is_rejected(start: Callable[..., Proxy]) -> None:
    proxy = start()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy_port = taken.getsockname()[1]
        proxy.reconfigure(proxy.make_config("v2", ports=[proxy.port, busy_port]))
        wait_for(lambda: "config rejected" in proxy.output(), what="rejection logged")
    assert "cannot bind" in proxy.output()
    assert get(proxy.port, "/version").body == b"v1"


def test_reload_adds_and_removes_listeners(start: Callable[..., Proxy]) -> None:
    proxy = start(ports=2)
    main, second = proxy.ports
    third = free_port()
    assert get(second, "/version").body == b"v1"
    with ThreadPoolExecutor(1) as pool:
        slow: Future[Response] = pool.submit(get, second, "/delay/1000")
        wait_for(lambda: in_flight(proxy) == 1, what="request in flight")
        proxy.reconfigure(proxy.make_config("v2", ports=[main, third]))
        wait_for(lambda: get(third, "/version").body == b"v2", what="new listener")
        wait_for(lambda: refuses(second), what="removed listener closed")
        assert not slow.done()
        # a request in flight on the removed listener still completes
        response = slow.result(timeout=5)
        assert response.status == 200 and response.headers["x-served-by"] == "a"
    assert get(main, "/version").body == b"v2"
    proxy.reconfigure(proxy.make_config("v3", ports=[main, second]))
    wait_for(lambda: get(second, "/version").body == b"v3", what="listener re-added")
    wait_for(lambda: refuses(third), what="listener removed")


def test_unchanged_listener_keeps_its_connections_across_a_reload(
    start: Callable[..., Proxy],
) -> None:
    """A reload that leaves a listener's config as it was does not drain that listener's
    keep-alive connections (Envoy's behaviour); a changed listener's are drained."""
    proxy = start()
    request = b"GET /version HTTP/1.1\r\nhost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(request)
        assert sock.recv(65536).endswith(b"v1")
        added = free_port()
        proxy.reconfigure(proxy.make_config("v1", ports=[proxy.port, added]))
        wait_for(lambda: get(added, "/version").body == b"v1", what="the added listener")
        time.sleep(0.5)  # a drain would have closed the idle connection by now
        sock.sendall(request)
        assert sock.recv(65536).endswith(b"v1")
        proxy.reconfigure(proxy.make_config("v2", ports=[proxy.port, added]))
        wait_for(lambda: get(added, "/version").body == b"v2", what="the new version")
        time.sleep(0.5)
        sock.sendall(request)
        assert sock.recv(65536) == b""  # changed: drained, closed after its last response


def test_unchanged_listener_accepts_throughout_a_burst_of_reloads(
    start: Callable[..., Proxy],
) -> None:
    proxy = start(ports=2)
    main, extra = proxy.ports
    stop = threading.Event()
    failures: list[str] = []
    served = [0]

    def loop() -> None:
        while not stop.is_set():
            try:
                response = get(main, "/version")
                if response.status != 200:
                    failures.append(f"status {response.status}")
                served[0] += 1
            except OSError as exc:
                failures.append(repr(exc))

    with ThreadPoolExecutor(2) as pool:
        clients = [pool.submit(loop) for _ in range(2)]
        try:
            for round_ in range(2, 22):
                # the other listener comes and goes, the main one must not blink
                ports = [main, extra] if round_ % 2 else [main]
                proxy.reconfigure(proxy.make_config(f"v{round_}", ports=ports))
                time.sleep(0.05)
            wait_for(lambda: get(main, "/version").body == b"v21", what="last version")
        finally:
            stop.set()
            for client in clients:
                client.result()
    assert not failures, failures[:5]
    assert served[0] > 50
    assert get(extra, "/version").body == b"v21"
    assert proxy.output().count("config version 21 applied") == 1


# --- SIGTERM drain ---------------------------------------------------------------------------


def test_sigterm_drains_in_flight_requests_then_exits_zero(start: Callable[..., Proxy]) -> None:
    proxy = start()
    with Client(proxy.port) as idle, ThreadPoolExecutor(1) as pool:
        assert idle.request("/x").status == 200
        slow: Future[Response] = pool.submit(get, proxy.port, "/delay/1500")
        wait_for(lambda: in_flight(proxy) == 1, what="request in flight")
        signalled = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: refuses(proxy.port), timeout=1, what="listener closed")
        assert idle.closed_by_peer(1)
        response = slow.result(timeout=5)
        assert response.status == 200 and response.headers["x-served-by"] == "a"
        assert response.headers.get("connection") == "close"
    assert proxy.proc.wait(timeout=5) == 0
    elapsed = time.monotonic() - signalled
    assert 1.0 < elapsed < 3.0  # waited for the request, not for the whole drain time
    assert "draining" in proxy.output()


def test_sigterm_gives_up_after_drain_time(start: Callable[..., Proxy]) -> None:
    proxy = start()  # --drain-time-s 3
    with Client(proxy.port) as stuck:
        stuck.send("/delay/20000")
        wait_for(lambda: in_flight(proxy) == 1, what="request in flight")
        signalled = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(timeout=10) == 0
        assert 2.5 < time.monotonic() - signalled < 6


# --- admin -----------------------------------------------------------------------------------


def test_admin_ready_and_server_info(start: Callable[..., Proxy]) -> None:
    proxy = start()
    assert proxy.admin("/ready") == (200, "LIVE\n")
    status, text = proxy.admin("/server_info")
    assert status == 200
    info = json.loads(text)
    assert info["state"] == "LIVE"
    assert info["version"].startswith("shoal/")
    assert info["command_line_options"]["config_path"] == str(proxy.path)
    assert info["command_line_options"]["concurrency"] == 1
    assert info["healthcheck_failed"] is False


def test_admin_errors(start: Callable[..., Proxy]) -> None:
    proxy = start()
    for path in ("/healthcheck/fail", "/healthcheck/ok", "/drain_listeners", "/quitquitquit"):
        assert proxy.admin(path)[0] == 405, path
    status, text = proxy.admin("/nope")
    assert status == 404 and "/ready" in text
    assert get(proxy.port, "/version").status == 200  # nothing changed
    assert proxy.proc.poll() is None


def test_admin_healthcheck_fail_and_ok(start: Callable[..., Proxy]) -> None:
    proxy = start()
    with Client(proxy.port) as before:
        assert "connection" not in before.request("/x").headers
        assert proxy.admin("/healthcheck/fail", "POST") == (200, "OK\n")
        assert before.closed_by_peer()  # idle keep-alive connections are closed
    assert json.loads(proxy.admin("/server_info")[1])["healthcheck_failed"] is True
    with Client(proxy.port) as during:
        response = during.request("/x")
        assert response.status == 200
        assert response.headers.get("connection") == "close"
        assert during.closed_by_peer()
    assert proxy.admin("/healthcheck/ok", "POST") == (200, "OK\n")
    with Client(proxy.port) as after:
        for _ in range(3):
            response = after.request("/x")
            assert response.status == 200 and "connection" not in response.headers


def test_admin_drain_listeners_stops_accepting(start: Callable[..., Proxy]) -> None:
    proxy = start()
    with Client(proxy.port) as before:
        assert before.request("/x").status == 200
        assert proxy.admin("/drain_listeners", "POST") == (200, "OK\n")
        wait_for(lambda: refuses(proxy.port), timeout=2, what="listener closed")
        assert before.closed_by_peer()
    assert proxy.admin("/ready")[0] == 200  # admin itself keeps answering
    assert proxy.proc.poll() is None


def test_admin_quitquitquit_exits(start: Callable[..., Proxy]) -> None:
    proxy = start()
    assert proxy.admin("/quitquitquit", "POST") == (200, "OK\n")
    assert proxy.proc.wait(timeout=5) == 0


def test_admin_stats_text_and_prometheus(start: Callable[..., Proxy]) -> None:
    proxy = start()
    for _ in range(3):
        assert get(proxy.port, "/x").status == 200
    status, text = proxy.admin("/stats")
    assert status == 200
    lines = text.splitlines()
    assert "cluster.a.upstream_rq_200: 3" in lines
    assert "http.ingress.downstream_rq_2xx: 3" in lines
    timing = [line for line in lines if line.startswith("cluster.a.upstream_rq_time: ")]
    assert len(timing) == 1
    assert re.fullmatch(
        r"cluster\.a\.upstream_rq_time: P0\(nan,[\d.e+-]+\) P25\(.*\) P100\(nan,[\d.e+-]+\)",
        timing[0],
    ), timing[0]
    status, text = proxy.admin("/stats/prometheus")
    assert status == 200
    assert "# TYPE envoy_cluster_upstream_rq counter" in text
    assert "# TYPE envoy_cluster_upstream_rq_time histogram" in text
    assert re.search(
        r'^envoy_cluster_upstream_rq_time_bucket\{envoy_cluster_name="a",le="\+Inf"\} 3$',
        text,
        re.M,
    ), text
    assert re.search(
        r'^envoy_cluster_upstream_rq_time_count\{envoy_cluster_name="a"\} 3$', text, re.M
    )
    assert proxy.admin("/stats?format=prometheus")[1] == text


# --- --concurrency 2 -------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(item) for item in handle.read().split()]


def established_per_process(pids: list[int], port: int) -> dict[int, int]:
    """How many ESTABLISHED sockets on local ``port`` each process holds."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as handle:
            for row in handle.read().splitlines()[1:]:
                cols = row.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "01":
                    inodes.add(cols[9])
    counts = {}
    for pid in pids:
        count = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    count += 1
        counts[pid] = count
    return counts


def test_concurrency_two_workers_share_listeners_and_reload(start: Callable[..., Proxy]) -> None:
    proxy = start("--concurrency", "2")
    supervisor = proxy.proc.pid
    workers = children(supervisor)
    assert len(workers) == 2
    assert sorted(json.loads(proxy.admin("/server_info")[1])["workers"]) == sorted(workers)
    wait_for(lambda: get(proxy.port, "/x").status == 200, what="workers listening")

    # Many connections: the kernel spreads them over both workers (SO_REUSEPORT).
    clients = [Client(proxy.port) for _ in range(40)]
    try:
        for client in clients:
            assert client.request("/x").status == 200
        held = established_per_process(workers, proxy.port)
        assert sum(held.values()) == 40
        assert all(held.values()), held
    finally:
        for client in clients:
            client.close()
    stats = proxy.stats()
    assert stats["http.ingress.downstream_rq_total"] == 41
    assert stats["cluster.a.upstream_rq_200"] == 41
    assert stats["server.concurrency"] == 2

    proxy.reconfigure(proxy.make_config("v2"))
    wait_for(
        lambda: all(get(proxy.port, "/version").body == b"v2" for _ in range(20)),
        what="v2 in all workers",
    )
    applied = {r["pid"] for r in log_records(proxy) if "config version 2 applied" in r["msg"]}
    assert applied == {str(pid) for pid in workers}
    assert json.loads(proxy.admin("/config_dump")[1])["configs"][1]["version_info"] == "2"

    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(timeout=10) == 0
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} still there"
    assert refuses(proxy.port)


def test_concurrency_watch_reloads_every_worker(start: Callable[..., Proxy]) -> None:
    proxy = start("--concurrency", "2", "--watch")
    wait_for(lambda: get(proxy.port, "/x").status == 200, what="workers listening")
    apply(proxy, proxy.make_config("v2", cluster="b"), "watch")
    wait_for(
        lambda: all(get(proxy.port, "/version").body == b"v2" for _ in range(20)),
        what="v2 in all workers",
    )
    assert all(get(proxy.port, "/x").headers["x-served-by"] == "b" for _ in range(20))
    applied = {r["pid"] for r in log_records(proxy) if "config version 2 applied" in r["msg"]}
    assert len(applied) == 2


def test_concurrency_admin_controls_reach_every_worker(start: Callable[..., Proxy]) -> None:
    proxy = start("--concurrency", "2")
    wait_for(lambda: get(proxy.port, "/x").status == 200, what="workers listening")
    assert proxy.admin("/healthcheck/fail", "POST")[0] == 200
    for _ in range(10):
        assert get(proxy.port, "/x").headers.get("connection") == "close"
    with Client(proxy.port) as client:
        assert client.request("/x").headers.get("connection") == "close"
    assert proxy.admin("/healthcheck/ok", "POST")[0] == 200
    with Client(proxy.port) as client:
        for _ in range(3):
            assert "connection" not in client.request("/x").headers
    assert proxy.admin("/drain_listeners", "POST")[0] == 200
    wait_for(lambda: all(refuses(proxy.port) for _ in range(10)), timeout=2, what="drained")
    assert proxy.admin("/quitquitquit", "POST")[0] == 200
    assert proxy.proc.wait(timeout=10) == 0


def test_concurrency_invalid_reload_keeps_every_worker_on_old_config(
    start: Callable[..., Proxy],
) -> None:
    proxy = start("--concurrency", "2")
    wait_for(lambda: get(proxy.port, "/x").status == 200, what="workers listening")
    text, _ = _invalid(proxy.make_config, "unknown_cluster")
    apply(proxy, text, "sighup")
    wait_for(lambda: "config rejected" in proxy.output(), what="rejection logged")
    time.sleep(0.2)
    assert all(get(proxy.port, "/version").body == b"v1" for _ in range(20))
    assert proxy.proc.poll() is None


# --- startup errors and logging --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bad_field", "unknown_cluster", "bad_yaml", "bad_duration"])
@pytest.mark.parametrize("concurrency", ["1", "2"])
def test_startup_with_invalid_config_exits_nonzero(
    tmp_path: Path, echo_a: Echo, echo_b: Echo, kind: str, concurrency: str
) -> None:
    config = versioned_config([free_port()], free_port(), echo_a, echo_b)
    text, words = _invalid(lambda *args: config, kind)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "shoal", "proxy", "-c", str(path), "--concurrency", concurrency],
        check=False,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"shoal proxy: invalid config: {path}: ")
    for word in words:
        assert word in result.stderr


def test_startup_with_missing_file_exits_nonzero(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "shoal", "proxy", "-c", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 2
    assert str(path) in result.stderr and "No such file" in result.stderr


def test_log_lines_carry_time_pid_level_and_logger(start: Callable[..., Proxy]) -> None:
    proxy = start()
    text, _ = _invalid(proxy.make_config, "bad_field")
    apply(proxy, text, "sighup")
    wait_for(lambda: "config rejected" in proxy.output(), what="rejection logged")
    records = log_records(proxy)
    applied = [r for r in records if "config version 1 applied" in r["msg"]]
    assert applied and applied[0]["level"] == "INFO"
    assert applied[0]["logger"] == "shoal.proxy"
    assert applied[0]["pid"] == str(proxy.proc.pid)
    assert {r["level"] for r in records} >= {"INFO", "ERROR"}
    # every line that starts a record has the structured prefix
    for line in proxy.output().splitlines():
        if line.startswith("["):
            assert LOG_LINE.match(line), line


# --- large bodies in bounded memory ----------------------------------------------------------

GIB = 1 << 30
RSS_HEADROOM = 100 << 20


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class RssSampler:
    """Samples a process's resident set size in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.idle = rss(pid)
        self.peak = self.idle
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, rss(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.idle


@pytest.fixture
def big_proxy(make_proxy: Any, echo_a: Echo) -> Iterator[Proxy]:
    port = free_port()
    vhosts = [{"name": "all", "domains": ["*"], "routes": [route_to("a", "/", timeout="0s")]}]
    proxy = make_proxy(
        bootstrap([http_listener(port, vhosts)], [static_cluster("a", echo_a.port)], free_port())
    )
    proxy.port = port
    for _ in range(20):  # warm up, then measure idle
        assert get(port, "/warm").status == 200
    yield proxy


def body_pieces(size: int, chunked: bool, piece: int = 1 << 20) -> Iterator[bytes]:
    block = b"u" * piece
    left = size
    while left:
        part = block[: min(piece, left)]
        left -= len(part)
        yield b"%x\r\n%s\r\n" % (len(part), part) if chunked else part
    if chunked:
        yield b"0\r\n\r\n"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_1gb_upload_in_bounded_memory(big_proxy: Proxy, chunked: bool) -> None:
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {GIB}"
    with RssSampler(big_proxy.proc.pid) as sampler, Client(big_proxy.port, timeout=60) as client:
        client.sock.sendall(f"POST /upload HTTP/1.1\r\nHost: s\r\n{framing}\r\n\r\n".encode())
        for piece in body_pieces(GIB, chunked):
            client.sock.sendall(piece)
        response = client.read_response()
    assert response.status == 200
    assert response.json()["body_bytes"] == GIB
    assert sampler.growth < RSS_HEADROOM, f"RSS grew {sampler.growth >> 20} MiB"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_1gb_download_in_bounded_memory(big_proxy: Proxy, chunked: bool) -> None:
    path = f"/bytes/{GIB}" + ("?chunked=1" if chunked else "")
    with RssSampler(big_proxy.proc.pid) as sampler, Client(big_proxy.port, timeout=60) as client:
        client.send(path)
        while b"\r\n\r\n" not in client.buffer:
            assert client._fill()
        head, _, rest = client.buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        if not chunked:
            assert f"content-length: {GIB}".encode() in head.lower()
            received = len(rest)
            while received < GIB:
                data = client.sock.recv(1 << 20)
                assert data, f"closed after {received} bytes"
                received += len(data)
            assert received == GIB
        else:
            assert b"transfer-encoding: chunked" in head.lower()
            client.buffer = rest
            received = 0
            while size := int(client._line().split(b";")[0], 16):
                while size:  # count without keeping the body
                    if not client.buffer:
                        assert client._fill()
                    taken = min(size, len(client.buffer))
                    client.buffer = client.buffer[taken:]
                    size -= taken
                    received += taken
                assert client._take(2) == b"\r\n"
            assert client._line() == b""
            assert received == GIB
    assert sampler.growth < RSS_HEADROOM, f"RSS grew {sampler.growth >> 20} MiB"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_slow_reader_is_backpressured(big_proxy: Proxy) -> None:
    with RssSampler(big_proxy.proc.pid) as sampler:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", big_proxy.port))
        with sock:
            sock.sendall(f"GET /bytes/{GIB} HTTP/1.1\r\nHost: s\r\n\r\n".encode())
            received = 0
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                data = sock.recv(16 << 10)
                assert data
                received += len(data)
                time.sleep(0.01)  # about 1.5 MB/s, far slower than the upstream
    assert received < 50 << 20
    assert sampler.growth < RSS_HEADROOM, f"RSS grew {sampler.growth >> 20} MiB"
    # the abandoned download is cleaned up and the proxy keeps serving
    wait_for(lambda: big_proxy.stats()["cluster.a.upstream_rq_active"] == 0, what="cleanup")
    assert get(big_proxy.port, "/after").status == 200
