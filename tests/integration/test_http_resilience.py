"""Resilience end to end: retries, timeouts, circuit breakers, local replies, load balancing,
pooling, the TCP proxy, upgrades, DNS clusters and IPv6.

Real client sockets → a real ``shoal proxy`` process → real upstreams: the echo sample
service, plus two small upstreams written here — ``Scripted`` (HTTP/1.1 whose behaviour
each path scripts and which counts every hit) and ``TcpUpstream`` (a TCP echo server).
Expectations follow Envoy's semantics; counters come from the admin ``/stats?format=json``.
The same file, pointed at Envoy 1.40 instead of shoal, passes too (except the test marked
as shoal's own behaviour).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from tests.conftest import (
    Echo,
    bootstrap,
    free_port,
    http_listener,
    route_to,
    stop_process,
    wait_for_port,
)

PREVIOUS_HOSTS = {
    "name": "envoy.retry_host_predicates.previous_hosts",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3."
        "PreviousHostsPredicate"
    },
}
TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
OVERFLOW_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"


# --- clients -------------------------------------------------------------------------------


class Reply(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed: float

    @property
    def served_by(self) -> str | None:
        return self.headers.get("x-served-by")

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    port: int,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    host: str = "127.0.0.1",
    source: str | None = None,
    timeout: float = 10.0,
) -> Reply:
    """One request on its own connection."""
    conn = http.client.HTTPConnection(
        host, port, timeout=timeout, source_address=(source, 0) if source else None
    )
    start = time.monotonic()
    try:
        conn.request(method, path, body=body, headers={"Host": "svc", **(headers or {})})
        response = conn.getresponse()
        data = response.read()
        return Reply(
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            data,
            time.monotonic() - start,
        )
    finally:
        conn.close()


def served_by_many(port: int, count: int, path: str = "/", **kwargs: Any) -> Counter[str]:
    """``count`` requests on one keep-alive connection; which upstream served each."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    seen: Counter[str] = Counter()
    try:
        for _ in range(count):
            conn.request("GET", path, headers={"Host": "svc", **kwargs.get("headers", {})})
            response = conn.getresponse()
            response.read()
            assert response.status == 200, response.status
            seen[response.getheader("x-served-by") or "?"] += 1
    finally:
        conn.close()
    return seen


def concurrently(*calls: Callable[[], Reply], stagger: float = 0.0) -> list[Reply]:
    """Start the calls in order (``stagger`` seconds apart) on threads; their replies."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = []
        for call in calls:
            futures.append(pool.submit(call))
            if stagger:
                time.sleep(stagger)
        return [future.result() for future in futures]


def key() -> str:
    return uuid.uuid4().hex[:12]


# --- upstreams written for these tests -----------------------------------------------------


class Scripted:
    """A threaded HTTP/1.1 upstream. Paths: ``/fail/KEY/N`` answers 503 the first N hits,
    ``/slow-once/KEY/MS`` waits MS on the first hit only, ``/fail-then-slow/KEY/MS`` answers
    503 once and then waits MS before each 200, ``/status/N``; anything else 200.
    ``status`` forces every answer; ``close_reused`` closes a kept-alive connection when
    its second request arrives (after reading its body), without answering: those requests
    are counted in ``dropped``. Every hit is counted by path, and a request whose body
    ended short (the sender closed first) is listed in ``short_bodies``."""

    def __init__(self, name: str, *, status: int | None = None, close_reused: bool = False):
        self.name = name
        self.status = status
        self.close_reused = close_reused
        self.hits: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.short_bodies: list[str] = []
        self.headers: dict[str, dict[str, str]] = {}  # the last request's, by path
        self.connections = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.open: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with self.lock:
                self.connections += 1
                self.open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        served = 0
        try:
            while True:
                line = reader.readline()
                if not line:
                    return
                target = line.split(b" ")[1].decode()
                headers = {}
                while (header := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                self.headers[target] = headers
                length = int(headers.get("content-length", 0))
                if length and len(reader.read(length)) < length:
                    with self.lock:
                        self.short_bodies.append(target)
                    return
                served += 1
                if self.close_reused and served > 1:
                    with self.lock:
                        self.dropped[target] += 1
                    return
                status, delay = self._decide(target)
                if delay:
                    time.sleep(delay)
                body = json.dumps({"server": self.name, "path": target}).encode()
                conn.sendall(
                    b"HTTP/1.1 %d X\r\ncontent-length: %d\r\nx-served-by: %s\r\n\r\n%s"
                    % (status, len(body), self.name.encode(), body)
                )
        except OSError:
            return
        finally:
            reader.close()
            conn.close()

    def _decide(self, target: str) -> tuple[int, float]:
        with self.lock:
            self.hits[target] += 1
            seen = self.hits[target]
        if self.status is not None:
            return self.status, 0.0
        parts = target.split("?", maxsplit=1)[0].strip("/").split("/")
        if parts[0] == "fail":
            return (503 if seen <= int(parts[2]) else 200), 0.0
        if parts[0] == "slow-once":
            return 200, (int(parts[2]) / 1000 if seen == 1 else 0.0)
        if parts[0] == "fail-then-slow":
            return (503, 0.0) if seen == 1 else (200, int(parts[2]) / 1000)
        if parts[0] == "status":
            return int(parts[1]), 0.0
        return 200, 0.0

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()
        with self.lock:
            for conn in self.open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()


class TcpUpstream:
    """A threaded TCP server: optionally sends ``banner`` on accept, echoes every byte, and
    when the client half-closes, sends ``b"bye"`` and closes."""

    def __init__(self, banner: bytes = b"") -> None:
        self.banner = banner
        self.connections = 0
        self.stopping = threading.Event()
        self.open: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            self.connections += 1
            self.open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.banner:
                conn.sendall(self.banner)
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.sendall(b"bye")
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()
        for conn in self.open:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


@pytest.fixture(scope="module")
def echo_c() -> Iterator[Echo]:
    echo = Echo("c")
    yield echo
    echo.stop()


@pytest.fixture
def scripted() -> Iterator[Callable[..., Scripted]]:
    started: list[Scripted] = []

    def start(name: str = "s", **kwargs: Any) -> Scripted:
        server = Scripted(name, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def tcp_upstream() -> Iterator[Callable[..., TcpUpstream]]:
    started: list[TcpUpstream] = []

    def start(banner: bytes = b"") -> TcpUpstream:
        server = TcpUpstream(banner)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# --- config builders -------------------------------------------------------------------------


def endpoint(
    port: int, address: str = "127.0.0.1", *, weight: int | None = None, health: str = ""
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "endpoint": {"address": {"socket_address": {"address": address, "port_value": port}}}
    }
    if weight is not None:
        entry["load_balancing_weight"] = weight
    if health:
        entry["health_status"] = health
    return entry


def cluster(
    name: str, *endpoints: dict[str, Any], levels: list[list[dict[str, Any]]] | None = None, **extra
) -> dict[str, Any]:
    """A cluster of ``endpoints`` (one locality), or of ``levels`` (priority 0, 1, ...)."""
    groups = [{"lb_endpoints": list(endpoints)}] if endpoints else []
    if levels is not None:
        groups = [{"priority": i, "lb_endpoints": level} for i, level in enumerate(levels)]
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": groups},
        **extra,
    }


def breakers(**limits: int) -> dict[str, Any]:
    return {"circuit_breakers": {"thresholds": [limits]}}


def retry(retry_on: str, num_retries: int = 1, **extra: Any) -> dict[str, Any]:
    return {"retry_on": retry_on, "num_retries": num_retries, **extra}


def start_proxy(
    make_proxy: Any,
    tmp_path: Path,
    routes: list[dict[str, Any]],
    clusters: list[dict[str, Any]],
    **hcm: Any,
) -> Any:
    port = free_port()
    log = tmp_path / f"access-{port}.log"
    vhosts = [{"name": "all", "domains": ["*"], "routes": routes}]
    listener = http_listener(port, vhosts, access_log=str(log), **hcm)
    proxy = make_proxy(bootstrap([listener], clusters, free_port()))
    proxy.port = port
    proxy.access_log = log
    return proxy


def tcp_listener(
    port: int, access_log: Path, cluster_name: str = "", **extra: Any
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": TCP_PROXY,
        "stat_prefix": "tcp_in",
        "access_log": [
            {"name": "file", "typed_config": {"@type": FILE_LOG, "path": str(access_log)}}
        ],
        **extra,
    }
    if cluster_name:
        config["cluster"] = cluster_name
    return {
        "name": "tcp_in",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": config}]}
        ],
    }


def start_tcp_proxy(
    make_proxy: Any, tmp_path: Path, clusters: list[dict[str, Any]], **tcp: Any
) -> Any:
    port = free_port()
    log = tmp_path / "tcp-access.log"
    proxy = make_proxy(bootstrap([tcp_listener(port, log, **tcp)], clusters, free_port()))
    proxy.port = port
    proxy.access_log = log
    return proxy


def log_lines(proxy: Any, needle: str) -> list[str]:
    """Access-log lines containing ``needle``. Stops the proxy first: that flushes the logs
    at once (a running proxy flushes them each second), so call it last."""
    proxy.stop()
    text = proxy.access_log.read_text() if proxy.access_log.exists() else ""
    lines = [line for line in text.splitlines() if needle in line]
    assert lines, f"no access-log line with {needle!r}:\n{text}"
    return lines


def flags_of(line: str) -> str:
    """RESPONSE_FLAGS of a default-format line: the field after the status code."""
    return line.split('" ', 1)[1].split()[1]


def counter(proxy: Any, name: str) -> int:
    return proxy.stats().get(name, 0)


# --- retries ---------------------------------------------------------------------------------


def test_retry_on_5xx_turns_one_503_into_200(make_proxy: Any, tmp_path: Path, echo_a: Echo) -> None:
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("r", retry_policy=retry("5xx"))],
        [cluster("r", endpoint(echo_a.port))],
    )
    reply = request(proxy.port, f"/fail/{key()}/1")
    assert reply.status == 200 and reply.served_by == "a"
    stats = proxy.stats()
    assert stats["cluster.r.upstream_rq_retry"] == 1
    assert stats["cluster.r.upstream_rq_retry_success"] == 1
    assert stats["cluster.r.upstream_rq_200"] == 1
    assert stats.get("cluster.r.upstream_rq_503", 0) == 0  # the retried 503 is not final

    # the body is replayed on the retry
    reply = request(proxy.port, f"/fail/{key()}/1", method="POST", body=b"p" * 5000)
    assert reply.status == 200 and reply.json()["body_bytes"] == 5000
    assert counter(proxy, "cluster.r.upstream_rq_retry") == 2


def test_no_retry_without_a_policy(make_proxy: Any, tmp_path: Path, scripted: Any) -> None:
    upstream = scripted("s")
    proxy = start_proxy(
        make_proxy, tmp_path, [route_to("s")], [cluster("s", endpoint(upstream.port))]
    )
    path = f"/fail/{key()}/1"
    reply = request(proxy.port, path)
    assert reply.status == 503 and reply.served_by == "s"
    assert upstream.hits[path] == 1
    assert counter(proxy, "cluster.s.upstream_rq_retry") == 0
    assert flags_of(log_lines(proxy, path)[0]) == "-"


@pytest.mark.parametrize("num_retries", [0, 1, 3])
def test_num_retries_is_exact(
    make_proxy: Any, tmp_path: Path, scripted: Any, num_retries: int
) -> None:
    upstream = scripted("s")
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("s", retry_policy=retry("5xx", num_retries))],
        [cluster("s", endpoint(upstream.port))],
    )
    # fails exactly as often as there are retries: the last try succeeds
    just_enough = f"/fail/{key()}/{num_retries}"
    assert request(proxy.port, just_enough).status == 200
    assert upstream.hits[just_enough] == num_retries + 1
    # fails once more than that: the client sees the upstream's 503
    too_many = f"/fail/{key()}/{num_retries + 1}"
    reply = request(proxy.port, too_many)
    assert reply.status == 503 and reply.served_by == "s"
    assert upstream.hits[too_many] == num_retries + 1
    assert counter(proxy, "cluster.s.upstream_rq_retry") == 2 * num_retries
    # Envoy flags a retriable response that ran out of retries URX (even with 0 retries)
    assert flags_of(log_lines(proxy, too_many)[0]) == "URX"


def test_retry_on_gateway_error_only_502_503_504(
    make_proxy: Any, tmp_path: Path, echo_a: Echo
) -> None:
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("g", retry_policy=retry("gateway-error", 2))],
        [cluster("g", endpoint(echo_a.port))],
    )
    for code in (502, 503, 504):
        before = counter(proxy, "cluster.g.upstream_rq_retry")
        assert request(proxy.port, f"/status/{code}").status == code
        assert counter(proxy, "cluster.g.upstream_rq_retry") == before + 2
    assert request(proxy.port, "/status/500").status == 500
    assert counter(proxy, "cluster.g.upstream_rq_retry") == 6  # 500 is not a gateway error
    assert flags_of(log_lines(proxy, "/status/500")[0]) == "-"
    assert flags_of(log_lines(proxy, "/status/502")[0]) == "URX"


def test_retry_on_reset(make_proxy: Any, tmp_path: Path, echo_a: Echo) -> None:
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [
            route_to("r", "/reset", retry_policy=retry("reset", 2)),
            route_to("r", "/", retry_policy=retry("reset", 2)),
        ],
        [cluster("r", endpoint(echo_a.port))],
    )
    reply = request(proxy.port, "/reset")
    assert reply.status == 503
    assert reply.body.startswith(b"upstream connect error or disconnect/reset before headers.")
    assert b"connection termination" in reply.body
    assert counter(proxy, "cluster.r.upstream_rq_retry") == 2
    # "reset" does not cover a 5xx response
    assert request(proxy.port, "/status/503").status == 503
    assert counter(proxy, "cluster.r.upstream_rq_retry") == 2
    # Envoy lists flags in the order it sets them: out of retries, then the reset
    assert flags_of(log_lines(proxy, "/reset")[0]) == "URX,UC"


def test_retry_on_connect_failure_reaches_the_live_host(
    make_proxy: Any, tmp_path: Path, echo_a: Echo
) -> None:
    dead = free_port()
    hosts = [endpoint(dead), endpoint(echo_a.port)]
    policy = retry(
        "connect-failure",
        1,
        retry_host_predicate=[PREVIOUS_HOSTS],
        host_selection_retry_max_attempts=30,  # Envoy redraws at random: make it certain
    )
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("with", "/retried", retry_policy=policy), route_to("without", "/plain")],
        [
            cluster("with", *hosts, lb_policy="RANDOM"),
            cluster("without", *hosts, lb_policy="RANDOM"),
        ],
    )
    for _ in range(20):
        reply = request(proxy.port, "/retried")
        assert reply.status == 200 and reply.served_by == "a"
    stats = proxy.stats()
    assert stats["cluster.with.upstream_cx_connect_fail"] >= 1  # 20 coin flips
    assert stats["cluster.with.upstream_rq_retry"] == stats["cluster.with.upstream_cx_connect_fail"]

    statuses = Counter(request(proxy.port, "/plain").status for _ in range(20))
    assert set(statuses) == {200, 503}
    assert statuses[503] == counter(proxy, "cluster.without.upstream_cx_connect_fail")
    assert counter(proxy, "cluster.without.upstream_rq_retry") == 0


def test_all_hosts_dead_gives_503_uf_urx(make_proxy: Any, tmp_path: Path) -> None:
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("dead", retry_policy=retry("connect-failure", 1))],
        [cluster("dead", endpoint(free_port()), endpoint(free_port()))],
    )
    reply = request(proxy.port, "/nothing-listens")
    assert reply.status == 503
    assert reply.body.startswith(b"upstream connect error or disconnect/reset before headers.")
    assert b"connection failure" in reply.body
    stats = proxy.stats()
    assert stats["cluster.dead.upstream_cx_connect_fail"] == 2
    assert stats["cluster.dead.upstream_rq_retry"] == 1
    line = log_lines(proxy, "/nothing-listens")[0]
    assert '"GET /nothing-listens HTTP/1.1" 503 URX,UF ' in line


def test_retriable_4xx_retries_409_only(make_proxy: Any, tmp_path: Path, echo_a: Echo) -> None:
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("c", retry_policy=retry("retriable-4xx", 1))],
        [cluster("c", endpoint(echo_a.port))],
    )
    assert request(proxy.port, "/status/409").status == 409
    assert counter(proxy, "cluster.c.upstream_rq_retry") == 1
    assert request(proxy.port, "/status/404").status == 404
    assert request(proxy.port, "/status/503").status == 503
    assert counter(proxy, "cluster.c.upstream_rq_retry") == 1


def test_retriable_status_codes(make_proxy: Any, tmp_path: Path, echo_a: Echo) -> None:
    policy = retry("retriable-status-codes", 2, retriable_status_codes=[418, 429])
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("c", retry_policy=policy)],
        [cluster("c", endpoint(echo_a.port))],
    )
    assert request(proxy.port, "/status/418").status == 418
    assert counter(proxy, "cluster.c.upstream_rq_retry") == 2
    assert request(proxy.port, "/status/429").status == 429
    assert counter(proxy, "cluster.c.upstream_rq_retry") == 4
    # retries that end in a retriable answer are no success, even a 4xx one
    assert counter(proxy, "cluster.c.upstream_rq_retry_success") == 0
    for code in (503, 409, 200):
        assert request(proxy.port, f"/status/{code}").status == code
    assert counter(proxy, "cluster.c.upstream_rq_retry") == 4


def test_per_try_timeout(make_proxy: Any, tmp_path: Path, scripted: Any) -> None:
    upstream = scripted("s")
    policy = retry("5xx", 1, per_try_timeout="0.3s")
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("s", retry_policy=policy, timeout="5s")],
        [cluster("s", endpoint(upstream.port))],
    )
    # the first try hangs, the retry answers at once
    path = f"/slow-once/{key()}/2000"
    reply = request(proxy.port, path)
    assert reply.status == 200
    assert reply.elapsed < 1.5
    assert upstream.hits[path] == 2
    assert upstream.headers[path]["x-envoy-expected-rq-timeout-ms"] == "300"  # per try
    stats = proxy.stats()
    assert stats["cluster.s.upstream_rq_per_try_timeout"] == 1
    assert stats["cluster.s.upstream_rq_retry"] == 1

    # every try hangs: 504 after two per-try timeouts, long before the route timeout
    path = f"/fail-then-slow/{key()}/2000"
    upstream.hits[path] = 1  # skip its 503: every hit now waits 2 s
    reply = request(proxy.port, path)
    assert reply.status == 504 and reply.body == b"upstream request timeout"
    assert 0.55 < reply.elapsed < 1.8
    stats = proxy.stats()
    assert stats["cluster.s.upstream_rq_per_try_timeout"] == 3
    assert stats["cluster.s.upstream_rq_retry"] == 2
    assert flags_of(log_lines(proxy, path)[0]) == "URX,UT"


def test_retry_back_off_base_interval(make_proxy: Any, tmp_path: Path, scripted: Any) -> None:
    upstream = scripted("s")
    slow = retry("5xx", 3, retry_back_off={"base_interval": "0.1s", "max_interval": "0.1s"})
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("s", retry_policy=slow)],
        [cluster("s", endpoint(upstream.port))],
    )
    # each request waits 3 fully jittered back-offs, each uniform in [0, 100 ms)
    total = 0.0
    for _ in range(4):
        reply = request(proxy.port, f"/fail/{key()}/3")
        assert reply.status == 200
        assert reply.elapsed < 0.3 + 0.25
        total += reply.elapsed
    assert total > 0.15  # 12 back-offs averaging 50 ms: never all near zero
    assert counter(proxy, "cluster.s.upstream_rq_retry") == 12


def test_retry_host_predicate_moves_the_retry_to_another_host(
    make_proxy: Any, tmp_path: Path, scripted: Any, echo_a: Echo
) -> None:
    bad = scripted("bad", status=503)
    hash_on_user = [{"header": {"header_name": "x-user"}}]
    other_host = retry(
        "5xx", 1, retry_host_predicate=[PREVIOUS_HOSTS], host_selection_retry_max_attempts=10
    )
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [
            route_to("h", "/same", hash_policy=hash_on_user, retry_policy=retry("5xx", 1)),
            route_to("h", "/other", hash_policy=hash_on_user, retry_policy=other_host),
        ],
        [cluster("h", endpoint(bad.port), endpoint(echo_a.port), lb_policy="RING_HASH")],
    )
    # Without the predicate the hash sends the retry to the same host, as in Envoy: find
    # users that hash to the failing host.
    users = []
    for i in range(40):
        path = f"/same/{key()}"
        reply = request(proxy.port, path, headers={"x-user": f"user-{i}"})
        if reply.served_by == "bad":
            assert reply.status == 503
            assert bad.hits[path] == 2  # first try and retry
            users.append(f"user-{i}")
        else:
            assert reply.status == 200 and reply.served_by == "a"
            assert bad.hits[path] == 0
    assert users, "no user hashed to the failing host in 40 tries"
    # With previous_hosts the retry lands on the other host.
    for user in users:
        path = f"/other/{key()}"
        reply = request(proxy.port, path, headers={"x-user": user})
        assert reply.status == 200 and reply.served_by == "a"
        assert bad.hits[path] == 1


def test_previous_hosts_redraws_up_to_host_selection_retry_max_attempts(
    make_proxy: Any, tmp_path: Path, three: Any
) -> None:
    """Each echo fails a /fail/KEY/1 key once (its counter is per process, so once per
    host). With previous_hosts, a retry's pick is redrawn (here up to 10 times) while it
    is any host already tried, not only the last one: the three tries meet three hosts,
    all fail, and the request ends 503. Were only the last host avoided, the second retry
    would go back to the first host half of the time and get its 200."""
    policy = retry(
        "5xx",
        2,
        retry_host_predicate=[PREVIOUS_HOSTS],
        host_selection_retry_max_attempts=10,
        retry_back_off={"base_interval": "0.01s"},
    )
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("r", retry_policy=policy)],
        [cluster("r", *(endpoint(e.port) for e in three), lb_policy="RANDOM")],
    )
    statuses: Counter[int] = Counter()
    last: Counter[str | None] = Counter()
    for _ in range(50):
        reply = request(proxy.port, f"/fail/{key()}/1")
        statuses[reply.status] += 1
        last[reply.served_by] += 1
    # a 503 means three distinct hosts each answered their one failure; a repeated host
    # would have answered 200 (2**-11 per request with 10 redraws)
    assert statuses[503] >= 45 and statuses[503] + statuses[200] == 50, statuses
    assert set(last) == {"a", "b", "c"}, last
    stats = proxy.stats()
    assert stats["cluster.r.upstream_rq_retry"] == 100  # two retries for every request
    assert stats["cluster.r.upstream_rq_total"] == 150


def test_max_retries_circuit_breaker(make_proxy: Any, tmp_path: Path, scripted: Any) -> None:
    upstream = scripted("s")
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("s", retry_policy=retry("5xx", 1, retry_back_off={"base_interval": "0.01s"}))],
        [cluster("s", endpoint(upstream.port), **breakers(max_retries=1))],
    )
    first, second = f"/fail-then-slow/{key()}/1000", f"/fail-then-slow/{key()}/1000"
    # The first request's retry is in flight (its retried try takes 1 s) when the second
    # request's first try fails: a retry stays outstanding until its try completes, so the
    # second request may not retry and gets the upstream's 503, flagged UO.
    replies = concurrently(
        lambda: request(proxy.port, first), lambda: request(proxy.port, second), stagger=0.4
    )
    assert [r.status for r in replies] == [200, 503]
    assert replies[1].elapsed < 0.5
    assert upstream.hits[second] == 1
    stats = proxy.stats()
    assert stats["cluster.s.upstream_rq_retry"] == 1
    assert stats["cluster.s.upstream_rq_retry_overflow"] == 1
    assert flags_of(log_lines(proxy, second)[0]) == "UO"


# --- timeouts --------------------------------------------------------------------------------


def test_route_timeout_504_ut(make_proxy: Any, tmp_path: Path, echo_a: Echo) -> None:
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("t", timeout="0.3s")],
        [cluster("t", endpoint(echo_a.port))],
    )
    reply = request(proxy.port, "/delay/3000")
    assert reply.status == 504
    assert reply.body == b"upstream request timeout"
    assert 0.25 < reply.elapsed < 1.5
    assert counter(proxy, "cluster.t.upstream_rq_timeout") == 1
    assert counter(proxy, "cluster.t.upstream_rq_504") == 1
    # a fast answer is untouched, and the upstream learns the deadline
    reply = request(proxy.port, "/fast")
    assert reply.status == 200
    assert reply.json()["headers"]["x-envoy-expected-rq-timeout-ms"] == "300"
    line = log_lines(proxy, "/delay/3000")[0]
    assert '"GET /delay/3000 HTTP/1.1" 504 UT ' in line


def test_timeout_zero_disables_the_route_timeout(
    make_proxy: Any, tmp_path: Path, echo_a: Echo
) -> None:
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("t", "/off", timeout="0s"), route_to("t", "/")],
        [cluster("t", endpoint(echo_a.port))],
    )
    reply = request(proxy.port, "/off/delay/600")
    assert reply.status == 200
    assert "x-envoy-expected-rq-timeout-ms" not in reply.json()["headers"]
    # the default (15 s) applies when the route sets nothing
    reply = request(proxy.port, "/default")
    assert reply.json()["headers"]["x-envoy-expected-rq-timeout-ms"] == "15000"
    assert counter(proxy, "cluster.t.upstream_rq_timeout") == 0


def test_hcm_idle_timeout_closes_idle_keep_alive_connection(
    make_proxy: Any, tmp_path: Path, echo_a: Echo
) -> None:
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("a")],
        [cluster("a", endpoint(echo_a.port))],
        common_http_protocol_options={"idle_timeout": "0.5s"},
        drain_timeout="0.1s",  # Envoy closes an idle HTTP/1 connection after draining it
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        # a request longer than the idle timeout is not cut: the connection is not idle
        sock.sendall(b"GET /delay/800 HTTP/1.1\r\nHost: s\r\n\r\n")
        response = _read_response(sock)
        assert response.startswith(b"HTTP/1.1 200")
        assert b"connection: close" not in response.lower()
        idle_since = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the proxy while idle
        assert 0.35 < time.monotonic() - idle_since < 2.5
    assert counter(proxy, "http.ingress.downstream_cx_idle_timeout") == 1


def _read_response(sock: socket.socket) -> bytes:
    """One response with a content-length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return head + b"\r\n\r\n" + body


# --- circuit breakers ------------------------------------------------------------------------


def _overflowed(reply: Reply) -> bool:
    return (
        reply.status == 503
        and reply.headers.get("x-envoy-overloaded") == "true"
        and reply.body == OVERFLOW_BODY
    )


def test_max_requests_overflow(make_proxy: Any, tmp_path: Path, echo_a: Echo) -> None:
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("cb")],
        [cluster("cb", endpoint(echo_a.port), **breakers(max_requests=2))],
    )
    replies = concurrently(
        *(lambda: request(proxy.port, "/delay/600") for _ in range(3)), stagger=0.1
    )
    assert [r.status for r in replies] == [200, 200, 503]
    assert _overflowed(replies[2]) and replies[2].elapsed < 0.3
    stats = proxy.stats()
    assert stats["cluster.cb.upstream_rq_active_overflow"] == 1
    assert stats.get("cluster.cb.upstream_rq_pending_overflow", 0) == 0
    assert request(proxy.port, "/after").status == 200  # the breaker closes again
    assert '" 503 UO ' in log_lines(proxy, " 503 ")[0]


def test_max_pending_requests_overflow(make_proxy: Any, tmp_path: Path, echo_a: Echo) -> None:
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("cb")],
        [
            cluster(
                "cb",
                endpoint(echo_a.port),
                **breakers(max_connections=1, max_pending_requests=1),
            )
        ],
    )
    # one request on the only connection, one pending for it, the third overflows
    replies = concurrently(
        *(lambda: request(proxy.port, "/delay/500") for _ in range(3)), stagger=0.15
    )
    assert [r.status for r in replies] == [200, 200, 503]
    assert replies[1].elapsed > 0.6  # waited for the first request's connection
    assert _overflowed(replies[2]) and replies[2].elapsed < 0.3
    stats = proxy.stats()
    assert stats["cluster.cb.upstream_rq_pending_overflow"] == 1
    assert stats["cluster.cb.upstream_cx_overflow"] >= 1
    assert stats["cluster.cb.upstream_cx_total"] == 1
    assert stats["cluster.cb.upstream_rq_pending_active"] == 0


def test_max_connections_queues_rather_than_rejects(
    make_proxy: Any, tmp_path: Path, echo_a: Echo
) -> None:
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("cb")],
        [cluster("cb", endpoint(echo_a.port), **breakers(max_connections=1))],
    )
    replies = concurrently(*(lambda: request(proxy.port, "/delay/300") for _ in range(3)))
    assert [r.status for r in replies] == [200, 200, 200]
    assert max(r.elapsed for r in replies) > 0.85  # served one after another
    stats = proxy.stats()
    assert stats["cluster.cb.upstream_cx_total"] == 1
    assert stats["cluster.cb.upstream_cx_overflow"] >= 1
    assert stats.get("cluster.cb.upstream_rq_pending_overflow", 0) == 0


# --- local replies ---------------------------------------------------------------------------


def test_no_hosts_is_503_no_healthy_upstream(make_proxy: Any, tmp_path: Path) -> None:
    proxy = start_proxy(make_proxy, tmp_path, [route_to("empty")], [cluster("empty")])
    reply = request(proxy.port, "/x")
    assert reply.status == 503 and reply.body == b"no healthy upstream"
    assert '"GET /x HTTP/1.1" 503 UH ' in log_lines(proxy, "/x")[0]


def test_all_unhealthy_hosts_are_used_in_panic_mode(
    make_proxy: Any, tmp_path: Path, echo_a: Echo, echo_b: Echo
) -> None:
    """0% healthy is below Envoy's 50% panic threshold: the load balancer ignores health
    and uses every host rather than answering "no healthy upstream"."""
    hosts = [endpoint(echo_a.port, health="UNHEALTHY"), endpoint(echo_b.port, health="UNHEALTHY")]
    proxy = start_proxy(make_proxy, tmp_path, [route_to("u")], [cluster("u", *hosts)])
    assert served_by_many(proxy.port, 10) == {"a": 5, "b": 5}
    assert proxy.stats()["cluster.u.membership_healthy"] == 0


def test_upstream_reset_before_headers_is_503_uc(
    make_proxy: Any, tmp_path: Path, echo_a: Echo
) -> None:
    proxy = start_proxy(
        make_proxy, tmp_path, [route_to("a")], [cluster("a", endpoint(echo_a.port))]
    )
    reply = request(proxy.port, "/reset")
    assert reply.status == 503
    assert reply.body == (
        b"upstream connect error or disconnect/reset before headers. "
        b"reset reason: connection termination"
    )
    assert request(proxy.port, "/still-fine").status == 200
    assert '"GET /reset HTTP/1.1" 503 UC ' in log_lines(proxy, "/reset")[0]


def test_connect_failure_is_503_uf(make_proxy: Any, tmp_path: Path) -> None:
    proxy = start_proxy(
        make_proxy, tmp_path, [route_to("d")], [cluster("d", endpoint(free_port()))]
    )
    reply = request(proxy.port, "/x")
    assert reply.status == 503
    assert reply.body.startswith(b"upstream connect error or disconnect/reset before headers.")
    assert b"connection failure" in reply.body
    assert counter(proxy, "cluster.d.upstream_cx_connect_fail") == 1
    assert '"GET /x HTTP/1.1" 503 UF ' in log_lines(proxy, "/x")[0]


# --- load balancing --------------------------------------------------------------------------


@pytest.fixture
def three(echo_a: Echo, echo_b: Echo, echo_c: Echo) -> tuple[Echo, Echo, Echo]:
    return echo_a, echo_b, echo_c


def test_round_robin_even_and_weighted(make_proxy: Any, tmp_path: Path, three: Any) -> None:
    a, b, c = three
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("even", "/even"), route_to("weighted", "/weighted")],
        [
            cluster("even", endpoint(a.port), endpoint(b.port), endpoint(c.port)),
            cluster("weighted", endpoint(a.port, weight=1), endpoint(b.port, weight=2)),
        ],
    )
    assert served_by_many(proxy.port, 30, "/even") == {"a": 10, "b": 10, "c": 10}
    weighted = served_by_many(proxy.port, 30, "/weighted")
    assert abs(weighted["a"] - 10) <= 1 and abs(weighted["b"] - 20) <= 1


def test_random(make_proxy: Any, tmp_path: Path, three: Any) -> None:
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("r")],
        [cluster("r", *(endpoint(e.port) for e in three), lb_policy="RANDOM")],
    )
    seen = served_by_many(proxy.port, 300)
    assert set(seen) == {"a", "b", "c"}
    assert all(50 <= n <= 150 for n in seen.values()), seen  # expected 100 each


def test_least_request_avoids_busy_hosts(make_proxy: Any, tmp_path: Path, three: Any) -> None:
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("lr")],
        [
            cluster(
                "lr",
                *(endpoint(e.port) for e in three),
                lb_policy="LEAST_REQUEST",
                least_request_lb_config={"choice_count": 50},
            )
        ],
    )
    with ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(request, proxy.port, "/delay/1000")]
        time.sleep(0.2)
        slow.append(pool.submit(request, proxy.port, "/delay/1000"))
        time.sleep(0.2)
        quick = served_by_many(proxy.port, 20)
        busy = {future.result().served_by for future in slow}
    assert len(busy) == 2  # the second slow request avoided the first one's host
    assert len(quick) == 1 and not busy & set(quick), (busy, quick)


@pytest.mark.parametrize("policy", ["RING_HASH", "MAGLEV"])
def test_hash_policies_are_sticky(make_proxy: Any, tmp_path: Path, three: Any, policy: str) -> None:
    routes = [
        route_to("h", "/header", hash_policy=[{"header": {"header_name": "x-user"}}]),
        route_to("h", "/cookie", hash_policy=[{"cookie": {"name": "session"}}]),
        route_to("h", "/ip", hash_policy=[{"connection_properties": {"source_ip": True}}]),
    ]
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        routes,
        [cluster("h", *(endpoint(e.port) for e in three), lb_policy=policy)],
    )

    def hosts_for(path: str, **kwargs: Any) -> set[str | None]:
        return {request(proxy.port, path, **kwargs).served_by for _ in range(4)}

    spread: dict[str, set[str | None]] = {"header": set(), "cookie": set(), "ip": set()}
    for i in range(15):
        by_header = hosts_for("/header", headers={"x-user": f"u{i}"})
        by_cookie = hosts_for("/cookie", headers={"cookie": f"a=1; session=s{i}"})
        by_ip = hosts_for("/ip", source=f"127.0.0.{i + 2}")
        for kind, found in (("header", by_header), ("cookie", by_cookie), ("ip", by_ip)):
            assert len(found) == 1, (kind, i, found)  # the same key, the same host
            spread[kind] |= found
    for kind, hosts in spread.items():
        assert len(hosts) >= 2, (kind, hosts)  # different keys spread over the hosts


def test_weighted_clusters_split(
    make_proxy: Any, tmp_path: Path, echo_a: Echo, echo_b: Echo
) -> None:
    split = {"clusters": [{"name": "a", "weight": 80}, {"name": "b", "weight": 20}]}
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [{"match": {"prefix": "/"}, "route": {"weighted_clusters": split}}],
        [cluster("a", endpoint(echo_a.port)), cluster("b", endpoint(echo_b.port))],
    )
    seen = served_by_many(proxy.port, 300)
    assert 205 <= seen["a"] <= 275 and seen["a"] + seen["b"] == 300, seen  # expected 240
    stats = proxy.stats()
    assert stats["cluster.a.upstream_rq_200"] == seen["a"]
    assert stats["cluster.b.upstream_rq_200"] == seen["b"]


def test_priorities_fail_over(make_proxy: Any, tmp_path: Path, three: Any) -> None:
    a, b, c = three
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("down", "/down"), route_to("half", "/half")],
        [
            # P0's only host is unhealthy: everything goes to P1
            cluster("down", levels=[[endpoint(a.port, health="UNHEALTHY")], [endpoint(b.port)]]),
            # P0 is half healthy: its health is 1/2 * 140% = 70%, P1 takes the other 30%
            cluster(
                "half",
                levels=[
                    [endpoint(a.port), endpoint(c.port, health="UNHEALTHY")],
                    [endpoint(b.port)],
                ],
            ),
        ],
    )
    assert served_by_many(proxy.port, 20, "/down") == {"b": 20}
    seen = served_by_many(proxy.port, 300, "/half")
    assert seen["c"] == 0
    assert 170 <= seen["a"] <= 250, seen  # expected 210


# --- upstream connection pooling -------------------------------------------------------------


def test_keep_alive_pool_reuses_upstream_connections(
    make_proxy: Any, tmp_path: Path, echo_a: Echo
) -> None:
    proxy = start_proxy(
        make_proxy, tmp_path, [route_to("p")], [cluster("p", endpoint(echo_a.port))]
    )
    for i in range(30):  # a new downstream connection each time
        assert request(proxy.port, f"/seq/{i}").status == 200
    assert counter(proxy, "cluster.p.upstream_cx_total") == 1

    with ThreadPoolExecutor(4) as pool:
        counts = list(pool.map(lambda _: served_by_many(proxy.port, 15), range(4)))
    assert sum(sum(c.values()) for c in counts) == 60
    stats = proxy.stats()
    assert stats["cluster.p.upstream_cx_total"] <= 4
    assert stats["cluster.p.upstream_rq_total"] == 90


def test_stale_pooled_connection_is_retried_for_idempotent_requests(
    make_proxy: Any, tmp_path: Path, scripted: Any
) -> None:
    """Shoal's own behaviour: Envoy answers 503 UC here unless a retry policy covers it."""
    upstream = scripted("s", close_reused=True)
    proxy = start_proxy(
        make_proxy, tmp_path, [route_to("s")], [cluster("s", endpoint(upstream.port))]
    )
    assert request(proxy.port, "/one").status == 200
    # the pooled connection is dead by the time it carries /two: a new one is opened
    reply = request(proxy.port, "/two")
    assert reply.status == 200 and reply.served_by == "s"
    assert upstream.hits["/two"] == 1
    assert upstream.connections == 2
    stats = proxy.stats()
    assert stats["cluster.s.upstream_cx_total"] == 2
    assert stats["cluster.s.upstream_rq_retry"] == 0
    # a POST may have had effects upstream: it is not replayed
    reply = request(proxy.port, "/three", method="POST", body=b"x")
    assert reply.status == 503
    assert upstream.connections == 2


def test_stale_pooled_connection_never_resends_a_body_it_did_not_keep(
    make_proxy: Any, tmp_path: Path, scripted: Any
) -> None:
    """A PUT is idempotent, but without a retry policy its body is streamed, not kept:
    it cannot go again, so the stale connection's failure is the client's 503 UC."""
    upstream = scripted("s", close_reused=True)
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("s", timeout="3s")],
        [cluster("s", endpoint(upstream.port))],
    )
    assert request(proxy.port, "/one").status == 200
    path = f"/put/{key()}"
    reply = request(proxy.port, path, method="PUT", body=b"b" * 1000)
    assert reply.status == 503, reply  # not a 504 after waiting on a re-sent bodiless PUT
    assert reply.elapsed < 1.5
    assert reply.body.startswith(b"upstream connect error or disconnect/reset before headers.")
    assert b"connection termination" in reply.body
    # the PUT reached the upstream once, whole, on the stale connection; nothing more
    assert upstream.dropped[path] == 1 and upstream.hits[path] == 0
    assert upstream.connections == 1
    stats = proxy.stats()
    assert stats["cluster.s.upstream_rq_total"] == 2
    assert stats["cluster.s.upstream_cx_total"] == 1
    assert flags_of(log_lines(proxy, path)[0]) == "UC"
    assert upstream.short_bodies == []


def test_stale_resend_happens_at_most_once(make_proxy: Any, tmp_path: Path, scripted: Any) -> None:
    """Three pooled connections, all stale: a GET goes on one, is re-sent once on another,
    and then is the client's 503 UC; it does not walk the whole pool."""
    upstream = scripted("s", close_reused=True)
    proxy = start_proxy(
        make_proxy, tmp_path, [route_to("s")], [cluster("s", endpoint(upstream.port))]
    )
    warm = [f"/slow-once/{key()}/300" for _ in range(3)]
    replies = concurrently(*(lambda path=path: request(proxy.port, path) for path in warm))
    assert [r.status for r in replies] == [200, 200, 200]
    assert upstream.connections == 3  # each served one request: all stale now
    path = f"/get/{key()}"
    reply = request(proxy.port, path)
    assert reply.status == 503
    assert b"connection termination" in reply.body
    assert upstream.dropped[path] == 2  # the first try and exactly one re-send
    assert upstream.hits[path] == 0
    assert upstream.connections == 3  # no third try on a fresh connection
    stats = proxy.stats()
    assert stats["cluster.s.upstream_rq_total"] == 3 + 2
    assert stats["cluster.s.upstream_rq_retry"] == 0
    assert flags_of(log_lines(proxy, path)[0]) == "UC"


# --- TCP proxy -------------------------------------------------------------------------------


def test_tcp_proxy_bytes_both_ways_and_half_close(
    make_proxy: Any, tmp_path: Path, tcp_upstream: Any
) -> None:
    upstream = tcp_upstream()
    proxy = start_tcp_proxy(
        make_proxy, tmp_path, [cluster("t", endpoint(upstream.port))], cluster_name="t"
    )
    payload = bytes(range(256)) * 4096  # 1 MiB
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        received = bytearray()

        def read_all() -> None:
            while chunk := sock.recv(65536):
                received.extend(chunk)

        reader = threading.Thread(target=read_all)
        reader.start()
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # half-close: the upstream must still answer
        reader.join(10)
    assert not reader.is_alive()
    assert bytes(received) == payload + b"bye"
    # both directions ended: the session closes (its upstream connection too)
    deadline = time.monotonic() + 3
    while counter(proxy, "cluster.t.upstream_cx_active") and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = proxy.stats()
    assert stats["cluster.t.upstream_cx_active"] == 0
    assert stats["tcp.tcp_in.downstream_cx_total"] == 1
    assert stats["cluster.t.upstream_cx_total"] == 1
    assert '"- - -" 0 - 1048576 1048579 ' in log_lines(proxy, "127.0.0.1")[0]


def test_tcp_proxy_upstream_unavailable_closes_downstream(make_proxy: Any, tmp_path: Path) -> None:
    proxy = start_tcp_proxy(
        make_proxy, tmp_path, [cluster("t", endpoint(free_port()))], cluster_name="t"
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"anyone?")
        start = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1024) == b""
        assert time.monotonic() - start < 2
    assert counter(proxy, "cluster.t.upstream_cx_connect_fail") == 1
    # Envoy flags URX as well, even with the default max_connect_attempts of 1
    assert flags_of(log_lines(proxy, "127.0.0.1")[0]) == "UF,URX"


def test_tcp_proxy_weighted_clusters(make_proxy: Any, tmp_path: Path, tcp_upstream: Any) -> None:
    one, two = tcp_upstream(b"one\n"), tcp_upstream(b"two\n")
    weighted = {"clusters": [{"name": "one", "weight": 3}, {"name": "two", "weight": 1}]}
    proxy = start_tcp_proxy(
        make_proxy,
        tmp_path,
        [cluster("one", endpoint(one.port)), cluster("two", endpoint(two.port))],
        weighted_clusters=weighted,
    )
    seen: Counter[bytes] = Counter()
    for _ in range(80):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            seen[sock.recv(4)] += 1
    assert seen[b"one\n"] + seen[b"two\n"] == 80
    assert 45 <= seen[b"one\n"] <= 75, seen  # expected 60


def test_tcp_proxy_idle_timeout(make_proxy: Any, tmp_path: Path, tcp_upstream: Any) -> None:
    upstream = tcp_upstream()
    proxy = start_tcp_proxy(
        make_proxy,
        tmp_path,
        [cluster("t", endpoint(upstream.port))],
        cluster_name="t",
        idle_timeout="0.5s",
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        for i in range(5):  # traffic every 0.25 s keeps the session alive past 0.5 s
            sock.sendall(b"ping%d" % i)
            assert sock.recv(64) == b"ping%d" % i
            time.sleep(0.25)
        idle_since = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(64) == b""
        assert 0.1 < time.monotonic() - idle_since < 2.0
    assert counter(proxy, "tcp.tcp_in.idle_timeout") == 1


# --- upgrades --------------------------------------------------------------------------------

UPGRADE = (
    b"GET /upgrade HTTP/1.1\r\nHost: s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


def test_websocket_upgrade_tunnels_bytes(make_proxy: Any, tmp_path: Path, echo_a: Echo) -> None:
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("a")],
        [cluster("a", endpoint(echo_a.port))],
        upgrade_configs=[{"upgrade_type": "websocket"}],
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(UPGRADE)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, head
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        lowered = head.lower()
        assert b"upgrade: websocket" in lowered and b"connection: upgrade" in lowered
        assert rest == b""
        for message in (b"hello", b"\x81\x05world", bytes(range(256)) * 64):
            sock.sendall(message)
            echoed = b""
            while len(echoed) < len(message):
                chunk = sock.recv(65536)
                assert chunk
                echoed += chunk
            assert echoed == message


def test_upgrade_without_upgrade_configs_is_403(
    make_proxy: Any, tmp_path: Path, echo_a: Echo
) -> None:
    proxy = start_proxy(
        make_proxy, tmp_path, [route_to("a")], [cluster("a", endpoint(echo_a.port))]
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(UPGRADE)
        response = _read_response(sock)
    assert response.startswith(b"HTTP/1.1 403")
    assert counter(proxy, "cluster.a.upstream_rq_total") == 0


# --- DNS clusters and IPv6 -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["STRICT_DNS", "LOGICAL_DNS"])
def test_dns_cluster_on_localhost(make_proxy: Any, tmp_path: Path, echo_a: Echo, kind: str) -> None:
    dns = cluster(
        "dns",
        endpoint(echo_a.port, "localhost"),
        type=kind,
        dns_lookup_family="V4_ONLY",
    )
    routes = [route_to("dns", "/auto", auto_host_rewrite=True), route_to("dns")]
    proxy = start_proxy(make_proxy, tmp_path, routes, [dns])
    for _ in range(5):
        reply = request(proxy.port, "/dns")
        assert reply.status == 200 and reply.served_by == "a"
        assert reply.json()["headers"]["host"] == "svc"
    # auto_host_rewrite sends the name the host was resolved from
    seen = request(proxy.port, "/auto").json()["headers"]
    assert seen["host"] == "localhost" and seen["x-envoy-original-host"] == "svc"
    assert proxy.stats()["cluster.dns.membership_total"] == 1
    clusters = proxy.admin("/clusters")[1]
    assert f"dns::127.0.0.1:{echo_a.port}::hostname::localhost" in clusters


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_available(), reason="no IPv6 loopback")
def test_ipv6_listener_and_upstream(make_proxy: Any, tmp_path: Path) -> None:
    echo_port = free_port(socket.AF_INET6)
    echo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shoal.demo.echo",
            "--host",
            "::1",
            "--port",
            str(echo_port),
            "--name",
            "v6",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for_port(echo_port, host="::1")
        port = free_port(socket.AF_INET6)
        log = tmp_path / "v6.log"
        vhosts = [{"name": "all", "domains": ["*"], "routes": [route_to("v6")]}]
        listener = http_listener(port, vhosts, address="::1", access_log=str(log))
        proxy = make_proxy(
            bootstrap([listener], [cluster("v6", endpoint(echo_port, "::1"))], free_port())
        )
        proxy.access_log = log
        reply = request(port, "/six", host="::1")
        assert reply.status == 200 and reply.served_by == "v6"
        echoed = reply.json()
        assert echoed["path"] == "/six"
        line = log_lines(proxy, "/six")[0]
        assert f'"[::1]:{echo_port}"' in line
    finally:
        stop_process(echo)
