"""Request mirroring (``request_mirror_policies``) and generated hash-policy cookies (cookie
``ttl``), end to end: real clients → a real ``shoal proxy`` → the echo service, with a
``Recorder`` upstream here that keeps every request it gets (the mirror's copies) and can be
slow or never answer."""

from __future__ import annotations

import http.client
import re
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from tests.conftest import Echo, bootstrap, free_port, http_listener, raw_request, route_to
from tests.integration.mesh_helpers import eventually
from tests.integration.test_http_resilience import cluster, endpoint, request, start_proxy

from shoal.proxy.cookies import generated_value

# --- the mirror's upstream -------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]  # names lower-cased
    body: bytes


def read_request(rfile: BinaryIO) -> Seen | None:
    """One HTTP/1.1 request (content-length or chunked body), None at the end of input."""
    line = rfile.readline()
    if not line:
        return None
    method, target, _ = line.decode("latin-1").split(" ", 2)
    headers = {}
    while (raw := rfile.readline()) not in (b"\r\n", b""):
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = b""
    if "content-length" in headers:
        body = rfile.read(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while size := int(rfile.readline().split(b";")[0], 16):
            body += rfile.read(size)
            rfile.readline()
        rfile.readline()
    return Seen(method, target, headers, body)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64  # each copy to a busy mirror opens a connection at once


class Recorder:
    """Keeps every request it gets and answers 200 ``ok`` after ``delay`` seconds; with
    ``delay=None`` it never answers."""

    def __init__(self, delay: float | None = 0.0) -> None:
        self.seen: list[Seen] = []
        self.stopping = threading.Event()
        recorder = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while (seen := read_request(self.rfile)) is not None:
                    recorder.seen.append(seen)
                    if recorder.stopping.wait(delay):  # None: until stopped
                        return
                    self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paths(self) -> list[str]:
        return [seen.target for seen in self.seen]

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder() -> Iterator[Callable[..., Recorder]]:
    started: list[Recorder] = []

    def start(delay: float | None = 0.0) -> Recorder:
        started.append(Recorder(delay))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def mirror_to(*clusters: str, numerator: int | None = None) -> list[dict[str, Any]]:
    policies: list[dict[str, Any]] = [{"cluster": name} for name in clusters]
    if numerator is not None:
        for policy in policies:
            policy["runtime_fraction"] = {"default_value": {"numerator": numerator}}
    return policies


def settled(proxy: Any, *clusters: str) -> Callable[[], bool]:
    """No mirrored request still in flight on ``clusters``."""

    def check() -> bool:
        stats = proxy.stats()
        return all(stats.get(f"cluster.{name}.upstream_rq_active", 0) == 0 for name in clusters)

    return check


def keep_alive_requests(port: int, path: str, count: int) -> list[tuple[int, str, float]]:
    """``count`` requests on one connection: status, who served it, seconds taken."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    results = []
    try:
        for _ in range(count):
            started = time.monotonic()
            conn.request("GET", path, headers={"Host": "svc"})
            response = conn.getresponse()
            response.read()
            took = time.monotonic() - started
            results.append((response.status, response.getheader("x-served-by") or "", took))
    finally:
        conn.close()
    return results


# --- mirroring -----------------------------------------------------------------------------


def test_every_request_is_copied_with_a_shadow_host(
    make_proxy: Any, tmp_path: Path, echo_a: Echo, recorder: Callable[..., Recorder]
) -> None:
    shadow = recorder()
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [route_to("main", prefix_rewrite="/v2/", request_mirror_policies=mirror_to("shadow"))],
        [cluster("main", endpoint(echo_a.port)), cluster("shadow", endpoint(shadow.port))],
    )
    replies = [
        request(
            proxy.port, f"/items/{i}?q={i}", headers={"Host": "reviews:9080", "x-user": f"u{i}"}
        )
        for i in range(10)
    ]
    body = bytes(range(256)) * 8
    replies.append(
        request(proxy.port, "/upload", method="POST", headers={"Host": "reviews"}, body=body)
    )
    chunked = raw_request(
        proxy.port,
        b"POST /chunks HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    assert chunked.startswith(b"HTTP/1.1 200")
    assert all(r.status == 200 and r.served_by == "a" for r in replies)  # the main answers
    eventually(lambda: len(shadow.seen) == 12)
    eventually(settled(proxy, "shadow"))
    copies = {seen.target: seen for seen in shadow.seen}
    for i, reply in enumerate(replies[:10]):
        main = reply.json()
        copy = copies[f"/v2/items/{i}?q={i}"]
        assert main["path"] == copy.target and main["method"] == copy.method == "GET"
        # the same headers (request id included) but Host, and the mark of an internal request
        expected = {**main["headers"], "host": "reviews-shadow:9080", "x-envoy-internal": "true"}
        assert copy.headers == expected
    upload = copies["/v2/upload"]
    assert upload.method == "POST" and upload.body == body
    assert upload.headers["host"] == "reviews-shadow"
    assert replies[10].json()["body_bytes"] == len(body)
    assert copies["/v2/chunks"].body == b"hello world"
    stats = proxy.stats()
    assert stats["cluster.shadow.upstream_rq_total"] == 12
    assert stats["cluster.shadow.upstream_rq_200"] == 12
    assert stats["cluster.shadow.upstream_rq_completed"] == 12
    assert stats["cluster.main.upstream_rq_total"] == 12
    assert stats["http.ingress.downstream_rq_total"] == 12  # copies are no downstream requests


def test_runtime_fraction_mirrors_a_share(
    make_proxy: Any, tmp_path: Path, echo_a: Echo, recorder: Callable[..., Recorder]
) -> None:
    shadow, other = recorder(), recorder()
    both = [*mirror_to("shadow"), *mirror_to("other")]
    both[1]["runtime_fraction"] = {"runtime_key": "ignored", "default_value": {"numerator": 100}}
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [
            route_to("main", "/half", request_mirror_policies=mirror_to("shadow", numerator=50)),
            route_to("main", "/never", request_mirror_policies=mirror_to("shadow", numerator=0)),
            route_to("main", "/both", request_mirror_policies=both),
        ],
        [
            cluster("main", endpoint(echo_a.port)),
            cluster("shadow", endpoint(shadow.port)),
            cluster("other", endpoint(other.port)),
        ],
    )
    for path, count in (("/half", 400), ("/never", 50), ("/both", 5)):
        assert all(r[:2] == (200, "a") for r in keep_alive_requests(proxy.port, path, count))
    eventually(settled(proxy, "shadow", "other"))
    halves = shadow.paths().count("/half")
    assert 140 <= halves <= 260, halves  # 200 expected; 6 standard deviations either way
    assert shadow.paths().count("/never") == 0
    assert shadow.paths().count("/both") == other.paths().count("/both") == 5
    assert proxy.stats()["cluster.shadow.upstream_rq_total"] == halves + 5


def test_a_mirror_down_slow_or_silent_never_delays_the_main_request(
    make_proxy: Any, tmp_path: Path, echo_a: Echo, recorder: Callable[..., Recorder]
) -> None:
    slow, silent = recorder(delay=3.0), recorder(delay=None)
    proxy = start_proxy(
        make_proxy,
        tmp_path,
        [
            route_to("main", "/down", request_mirror_policies=mirror_to("dead")),
            route_to("main", "/slow", request_mirror_policies=mirror_to("slow")),
            route_to("main", "/silent", timeout="2s", request_mirror_policies=mirror_to("silent")),
        ],
        [
            cluster("main", endpoint(echo_a.port)),
            cluster("dead", endpoint(free_port())),  # nothing listens there
            cluster("slow", endpoint(slow.port)),
            cluster("silent", endpoint(silent.port)),
        ],
    )
    for path in ("/down", "/slow", "/silent"):
        results = keep_alive_requests(proxy.port, path, 10)
        assert all(status == 200 and by == "a" for status, by, _ in results), results
        slowest = max(took for _, _, took in results)
        assert slowest < 1.0, (path, slowest)  # the copies take 2-3 s, or forever
    eventually(lambda: len(slow.seen) == 10 and len(silent.seen) == 10)

    def counted() -> bool:
        stats = proxy.stats()
        return (
            stats.get("cluster.dead.upstream_rq_503", 0) == 10  # connect failures
            and stats.get("cluster.slow.upstream_rq_200", 0) == 10  # answered after 3 s
            and stats.get("cluster.silent.upstream_rq_504", 0) == 10  # the route's 2 s timeout
        )

    eventually(counted, timeout=15)
    stats = proxy.stats()
    assert stats["cluster.dead.upstream_cx_connect_fail"] >= 1
    assert stats["cluster.silent.upstream_rq_timeout"] == 10
    assert stats["cluster.main.upstream_rq_200"] == 30
    assert all(stats[f"cluster.{name}.upstream_rq_active"] == 0 for name in ("slow", "silent"))


def test_bodies_beyond_the_buffer_limit_are_not_mirrored(
    make_proxy: Any, echo_a: Echo, recorder: Callable[..., Recorder]
) -> None:
    """Shoal's own limit (Envoy 1.40 streams bodies to its copies): a copy is sent whole,
    so only a body within per_connection_buffer_limit_bytes is kept for it."""
    shadow = recorder()
    port = free_port()
    vhosts = [
        {
            "name": "all",
            "domains": ["*"],
            "routes": [route_to("main", request_mirror_policies=mirror_to("shadow"))],
        }
    ]
    listener = http_listener(port, vhosts)
    listener["per_connection_buffer_limit_bytes"] = 1024
    clusters = [cluster("main", endpoint(echo_a.port)), cluster("shadow", endpoint(shadow.port))]
    proxy = make_proxy(bootstrap([listener], clusters, free_port()))
    small = request(port, "/small", method="POST", body=b"s" * 1000)
    large = request(port, "/large", method="POST", body=b"l" * 5000)
    assert small.json()["body_bytes"] == 1000 and large.json()["body_bytes"] == 5000
    eventually(settled(proxy, "shadow"))
    assert [(s.target, len(s.body)) for s in shadow.seen] == [("/small", 1000)]


# --- cookies the hash policy generates --------------------------------------------------------

_SET_COOKIE = re.compile(r'sticky="([0-9a-f]{16})"; Max-Age=3600; Path=/; HttpOnly')


@pytest.fixture(scope="module")
def echo_c() -> Iterator[Echo]:
    echo = Echo("c")
    yield echo
    echo.stop()


@pytest.fixture
def sticky(make_proxy: Any, tmp_path: Path, echo_a: Echo, echo_b: Echo, echo_c: Echo) -> Any:
    policy = [{"cookie": {"name": "sticky", "ttl": "3600s", "path": "/"}}]
    hosts = [endpoint(echo.port) for echo in (echo_a, echo_b, echo_c)]
    return start_proxy(
        make_proxy,
        tmp_path,
        [
            route_to("ring", "/ring", hash_policy=policy),
            route_to("rr", "/rr", hash_policy=policy),
            {
                **route_to("ring", "/stripped", hash_policy=policy),
                "response_headers_to_remove": ["set-cookie"],
            },
        ],
        [cluster("ring", *hosts, lb_policy="RING_HASH"), cluster("rr", *hosts)],
    )


def on_new_connection(port: int, path: str, cookie: str = "") -> tuple[str, str | None, str]:
    """One request on a fresh connection: who served it, its set-cookie, and the value the
    proxy should generate for this connection (Envoy's: from both addresses)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        client = f"127.0.0.1:{sock.getsockname()[1]}"
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.sock = sock
        conn.request("GET", path, headers={"Host": "svc", **({"cookie": cookie} if cookie else {})})
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        served_by = response.getheader("x-served-by") or ""
        return (
            served_by,
            response.getheader("set-cookie"),
            generated_value(client, f"127.0.0.1:{port}"),
        )


def test_a_generated_cookie_is_set_and_then_sticks(sticky: Any) -> None:
    served_by, set_cookie, expected = on_new_connection(sticky.port, "/ring")
    assert set_cookie is not None
    match = _SET_COOKIE.fullmatch(set_cookie)
    assert match is not None, set_cookie
    assert match.group(1) == expected
    # a browser sends it back quoted, as it was set; either form reaches the same host
    for cookie in (f'sticky="{expected}"', f"theme=dark; sticky={expected}") * 10:
        by, again, _ = on_new_connection(sticky.port, "/ring", cookie)
        assert (by, again) == (served_by, None)


def test_requests_without_the_cookie_spread_and_each_cookie_sticks(sticky: Any) -> None:
    first = [on_new_connection(sticky.port, "/ring") for _ in range(30)]
    for _, set_cookie, value in first:
        assert set_cookie == f'sticky="{value}"; Max-Age=3600; Path=/; HttpOnly'
    assert len({value for _, _, value in first}) == 30  # one per connection
    assert len({by for by, _, _ in first}) >= 2
    for by, _, value in first[:10]:
        assert on_new_connection(sticky.port, "/ring", f'sticky="{value}"')[0] == by


def test_one_connection_gets_one_cookie(sticky: Any) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", sticky.port, timeout=10)
    seen = set()
    for _ in range(5):
        conn.request("GET", "/ring", headers={"Host": "svc"})
        response = conn.getresponse()
        response.read()
        seen.add((response.getheader("x-served-by"), response.getheader("set-cookie")))
    conn.close()
    assert len(seen) == 1, seen


def test_a_balancer_without_hashing_generates_no_cookie(sticky: Any) -> None:
    """As in Envoy: hash policies are evaluated only for RING_HASH and MAGLEV."""
    assert on_new_connection(sticky.port, "/rr")[1] is None


def test_route_edits_apply_to_the_generated_cookie(sticky: Any) -> None:
    """Envoy adds the cookie before the route's response edits, which may remove it."""
    assert on_new_connection(sticky.port, "/stripped")[1] is None
