"""Pilot's HTTP server and the registry's REST API, over real sockets, and the
``shoal register / deregister / services`` commands as real processes against it.

The server runs in this process: ``serve_http`` with ``registry_routes`` (plus a few test
routes for the server itself) in an event loop on a background thread, on a real SQLite
file. The commands run as ``python -m shoal.cli.registry``, the same ``add_parsers``
commands ``shoal`` has.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import free_port, raw_request

from shoal.pilot.http import MAX_BODY, Reply, Routes, json_reply, serve_http
from shoal.pilot.model import (
    Instance,
    MergedRegistries,
    Registry,
    RegistrySnapshot,
    Service,
    ServicePort,
)
from shoal.pilot.registry.embedded import EmbeddedRegistry
from shoal.pilot.rest import registry_routes


class Fixed(Registry):
    """Another registry's view, as `shoal services` shows it next to the embedded one."""

    name = "files"

    def __init__(self, snapshot: RegistrySnapshot) -> None:
        self._snapshot = snapshot

    async def run(self, changed: Callable[[], None]) -> None:
        await asyncio.Event().wait()

    def snapshot(self) -> RegistrySnapshot:
        return self._snapshot


RATINGS = RegistrySnapshot(
    (Service("ratings", (ServicePort(9080),), source="files"),),
    (Instance("ratings", 9080, "10.1.0.1", 9080, (("version", "v1"),), source="files"),),
)


async def _echo(method: str, path: str, query: str, body: bytes) -> Reply:
    return json_reply(200, {"method": method, "path": path, "query": query, "size": len(body)})


async def _broken(method: str, path: str, query: str, body: bytes) -> Reply:
    raise RuntimeError("handler bug")


class Pilot:
    """The REST API on a free port, served from its own thread's event loop; the embedded
    registry's expiry loop runs too."""

    def __init__(self, db: Path) -> None:
        self.db = str(db)
        self.port = 0
        self.changes = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),))
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("pilot's HTTP server did not start")

    async def _main(self) -> None:
        registry = EmbeddedRegistry(self.db)
        merged = MergedRegistries([registry, Fixed(RATINGS)])
        routes: Routes = {
            **registry_routes(registry, merged.snapshot),
            ("POST", "/test/echo"): _echo,
            ("GET", "/test/echo"): _echo,
            ("GET", "/test/broken"): _broken,
        }
        server = await serve_http("127.0.0.1", 0, routes)
        expiry = asyncio.create_task(registry.run(self._changed))
        self.port = server.sockets[0].getsockname()[1]
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            expiry.cancel()
            server.close()
            await server.wait_closed()
            registry.close()

    def _changed(self) -> None:
        self.changes += 1

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def pilot(tmp_path: Path) -> Iterator[Pilot]:
    server = Pilot(tmp_path / "registry.db")
    yield server
    server.stop()


def call(pilot: Pilot, method: str, path: str, body: object = None) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(pilot.url + path, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        assert exc.headers["content-type"] == "application/json"
        return exc.code, json.loads(exc.read())


def embedded(pilot: Pilot, host: str = "reviews") -> list[dict[str, Any]]:
    for service in call(pilot, "GET", "/v1/services")[1]:
        if service["host"] == host:
            return list(service["instances"])
    return []


# --- the REST API ---------------------------------------------------------------------------


def test_register_list_renew_deregister(pilot: Pilot) -> None:
    body = {"address": "10.0.0.1", "port": 9080, "labels": {"version": "v1"}, "ttl": 60}
    assert call(pilot, "POST", "/v1/services/reviews/instances", body) == (
        201,
        {"id": "10.0.0.1:9080"},
    )
    ports = [{"number": 9090, "name": "grpc", "protocol": "GRPC"}]
    second = {"address": "10.0.0.2", "port": 9090, "ports": ports, "id": "r-2", "weight": 3}
    assert call(pilot, "POST", "/v1/services/reviews/instances", second) == (201, {"id": "r-2"})

    status, services = call(pilot, "GET", "/v1/services")
    assert status == 200
    assert [(s["host"], s["source"]) for s in services] == [
        ("ratings", "files"),
        ("reviews", "embedded"),
    ]
    reviews = services[1]
    assert reviews["ports"] == [
        {"number": 9080, "name": "http", "protocol": "HTTP"},
        {"number": 9090, "name": "grpc", "protocol": "GRPC"},
    ]
    first, other = reviews["instances"]
    assert first["id"] == "10.0.0.1:9080"
    assert first["labels"] == {"version": "v1"}
    assert first["ttl"] == 60
    assert 59 <= first["expires_in"] <= 60
    assert (other["id"], other["service_port"], other["weight"]) == ("r-2", 9090, 3)
    assert other["ttl"] == 30  # pilot's default
    assert "id" not in services[0]["instances"][0]  # only the embedded registry has ids

    assert call(pilot, "PUT", "/v1/services/reviews/instances/r-2/heartbeat")[0] == 200
    status, error = call(pilot, "PUT", "/v1/services/reviews/instances/r-9/heartbeat")
    assert status == 404
    assert error == {"error": "no instance r-9 of reviews in the embedded registry"}

    assert call(pilot, "DELETE", "/v1/services/reviews/instances/r-2")[0] == 200
    assert call(pilot, "DELETE", "/v1/services/reviews/instances/r-2")[0] == 404
    assert [i["id"] for i in embedded(pilot)] == ["10.0.0.1:9080"]
    assert call(pilot, "DELETE", "/v1/services/reviews") == (200, {"host": "reviews"})
    assert call(pilot, "DELETE", "/v1/services/reviews")[0] == 404
    assert [s["host"] for s in call(pilot, "GET", "/v1/services")[1]] == ["ratings"]
    assert pilot.changes == 4  # two registrations, two removals; the heartbeat is no change


def test_ids_in_paths_are_percent_decoded(pilot: Pilot) -> None:
    body = {"address": "::1", "port": 8080}
    assert call(pilot, "POST", "/v1/services/v6/instances", body) == (201, {"id": "[::1]:8080"})
    assert call(pilot, "PUT", "/v1/services/v6/instances/%5B%3A%3A1%5D%3A8080/heartbeat")[0] == 200
    assert call(pilot, "DELETE", "/v1/services/v6/instances/%5B%3A%3A1%5D%3A8080")[0] == 200


def test_instances_expire_without_heartbeats(pilot: Pilot) -> None:
    body = {"address": "10.0.0.1", "port": 9080, "ttl": 0.3}
    assert call(pilot, "POST", "/v1/services/reviews/instances", body)[0] == 201
    deadline = time.monotonic() + 3
    while embedded(pilot) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert embedded(pilot) == []
    assert call(pilot, "PUT", "/v1/services/reviews/instances/10.0.0.1:9080/heartbeat")[0] == 404


def test_registrations_survive_a_restart(tmp_path: Path) -> None:
    first = Pilot(tmp_path / "registry.db")
    try:
        body = {"address": "10.0.0.1", "port": 9080, "ttl": 0, "labels": {"version": "v2"}}
        call(first, "POST", "/v1/services/reviews/instances", body)
    finally:
        first.stop()
    second = Pilot(tmp_path / "registry.db")
    try:
        (instance,) = embedded(second)
        assert (instance["id"], instance["labels"], instance["ttl"]) == (
            "10.0.0.1:9080",
            {"version": "v2"},
            None,
        )
    finally:
        second.stop()


VALID = {"address": "10.0.0.1", "port": 80}


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{", "body: not JSON"),
        ([], "body: must be a JSON object"),
        ({"port": 80}, "address: required"),
        ({**VALID, "tll": 5}, "tll: unknown field"),
        ({**VALID, "port": "80"}, "port: must be an integer from 1 to 65535"),
        ({**VALID, "port": 70000}, "port: must be an integer"),
        ({**VALID, "address": "10.0.0.1 "}, "address: must be an IP address or a DNS name"),
        ({**VALID, "ports": {"number": 80}}, "ports: must be a list"),
        (
            {**VALID, "ports": [{"number": 80, "protocol": "UDP"}]},
            "ports[0].protocol: must be one of HTTP, HTTP2, GRPC, TCP",
        ),
        ({**VALID, "ports": [{"number": 80, "tls": True}]}, "ports[0].tls: unknown field"),
        ({**VALID, "labels": {"version": 2}}, "labels.version: must be a string"),
        ({**VALID, "weight": True}, "weight: must be an integer"),
        ({**VALID, "ttl": "30s"}, "ttl: must be a number"),
    ],
)
def test_invalid_input_is_a_400_naming_the_field(pilot: Pilot, body: object, error: str) -> None:
    status, reply = call(pilot, "POST", "/v1/services/reviews/instances", body)
    assert status == 400
    assert reply["error"].startswith(error)
    status, reply = call(pilot, "POST", "/v1/services/Reviews/instances", VALID)
    assert status == 400
    assert reply["error"].startswith("host: 'Reviews' is not a DNS name")
    assert embedded(pilot) == []


def test_unknown_paths_and_methods(pilot: Pilot) -> None:
    assert call(pilot, "GET", "/v2/services") == (404, {"error": "nothing at /v2/services"})
    assert call(pilot, "GET", "/v1/servicesx")[0] == 404
    assert call(pilot, "GET", "/v1/services/a/b/c/d/e")[0] == 404
    assert call(pilot, "GET", "/v1/services/reviews/instances") == (
        405,
        {"error": "GET not allowed on /v1/services/reviews/instances (allowed: POST)"},
    )
    assert call(pilot, "PATCH", "/test/echo")[1] == {
        "error": "PATCH not allowed on /test/echo (allowed: GET, POST)"
    }


# --- the HTTP server --------------------------------------------------------------------------


def exchange(pilot: Pilot, data: bytes) -> bytes:
    return raw_request(pilot.port, data, timeout=5)


def test_pipelined_requests_are_answered_in_order(pilot: Pilot) -> None:
    answer = exchange(
        pilot,
        b"POST /test/echo?a=1 HTTP/1.1\r\nhost: p\r\ncontent-length: 3\r\n\r\nabc"
        b"GET /test/broken HTTP/1.1\r\nhost: p\r\n\r\n"
        b"HEAD /v1/services HTTP/1.1\r\nhost: p\r\n\r\n"
        b"GET /test/echo HTTP/1.1\r\nhost: p\r\nconnection: close\r\n\r\n",
    )
    assert re.findall(rb"HTTP/1\.1 [^\r]*", answer) == [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 500 Internal Server Error",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK",
    ]
    assert b'"query": "a=1",\n  "size": 3' in answer
    assert b'{\n  "error": "RuntimeError: handler bug"\n}' in answer
    assert answer.endswith(b'"size": 0\n}\n')
    assert answer.count(b"connection: close") == 1


def test_chunked_bodies_and_expect_continue(pilot: Pilot) -> None:
    with socket.create_connection(("127.0.0.1", pilot.port), timeout=5) as sock:
        sock.sendall(
            b"POST /test/echo HTTP/1.1\r\nhost: p\r\nexpect: 100-continue\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        assert b'"size": 11' in sock.recv(4096)


def test_bodies_over_one_mib_are_413(pilot: Pilot) -> None:
    too_long = MAX_BODY + 1
    answer = exchange(
        pilot,
        b"POST /test/echo HTTP/1.1\r\nhost: p\r\nexpect: 100-continue\r\n"
        b"content-length: %d\r\n\r\n" % too_long,
    )
    assert answer.startswith(b"HTTP/1.1 413 Payload Too Large\r\n")
    assert b"100 Continue" not in answer
    assert b"connection: close" in answer
    # a client that sends the body anyway still reads the answer
    request = urllib.request.Request(pilot.url + "/test/echo", data=b"x" * too_long)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)
    assert caught.value.code == 413
    assert json.loads(caught.value.read()) == {"error": "request body larger than 1048576 bytes"}
    # chunked: refused once the chunks add up to too much
    chunk = b"x" * 65536
    answer = exchange(
        pilot,
        b"POST /test/echo HTTP/1.1\r\nhost: p\r\ntransfer-encoding: chunked\r\n\r\n"
        + (b"10000\r\n" + chunk + b"\r\n") * 17,
    )
    assert answer.startswith(b"HTTP/1.1 413 Payload Too Large\r\n")
    # exactly 1 MiB is fine
    status, reply = call(pilot, "POST", "/test/echo", b"x" * MAX_BODY)
    assert (status, reply["size"]) == (200, MAX_BODY)


def test_malformed_requests_are_json_errors(pilot: Pilot) -> None:
    answer = exchange(pilot, b"GET /test/echo HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert answer.endswith(b'{\n  "error": "missing Host header"\n}\n')
    answer = exchange(
        pilot,
        b"GET /test/echo HTTP/1.1\r\nhost: p\r\n\r\nGET /test/echo HTTP/1.1\r\nhost p\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")  # the good request before is served
    assert b"HTTP/1.1 400 Bad Request\r\n" in answer


def test_http_1_0_closes_after_the_answer(pilot: Pilot) -> None:
    answer = exchange(pilot, b"GET /test/echo HTTP/1.0\r\n\r\nGET /test/echo HTTP/1.0\r\n\r\n")
    assert answer.count(b"HTTP/1.1 200 OK") == 1
    assert b"connection: close" in answer


# --- the commands -----------------------------------------------------------------------------


def shoal(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli.registry", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_register_services_deregister_commands(pilot: Pilot) -> None:
    at = ("--pilot", pilot.url)
    done = shoal("register", "reviews", "10.0.0.1:9080", "--label", "version=v1", *at)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == "registered 10.0.0.1:9080 as an instance of reviews, permanently\n"
    done = shoal(
        *("register", "reviews", "[::1]:9081", "--service-port", "9080", "--label", "version=v2"),
        *("--label", "zone=a", "--weight", "2", "--ttl", "60", "--id", "r-2", *at),
    )
    assert done.stdout == "registered r-2 as an instance of reviews, for 60s unless renewed\n"
    done = shoal("register", "grpc-api", "10.0.0.3:50051", "--protocol", "GRPC", *at)
    assert done.returncode == 0

    table = shoal("services", "--pilot", pilot.url.removeprefix("http://")).stdout
    lines = table.splitlines()
    assert lines[0].split() == ["HOST", "PORTS", "SOURCE", "INSTANCES"]
    assert lines[1].split() == ["grpc-api", "50051/GRPC", "embedded", "10.0.0.3:50051", "permanent"]
    assert lines[2].split() == ["ratings", "9080/HTTP", "files", "10.1.0.1:9080", "version=v1"]
    assert lines[3].split() == [
        "reviews",
        "9080/HTTP",
        "embedded",
        "10.0.0.1:9080",
        "version=v1",
        "permanent",
    ]
    assert lines[4].split()[:5] == ["[::1]:9081", "for", "port", "9080", "version=v2,zone=a"]
    assert lines[4].split()[5:8] == ["weight=2", "id=r-2", "expires"]
    assert len(lines) == 5
    assert lines[1].index("10.0.0.3") == lines[4].index("[::1]")  # one column

    listed = json.loads(shoal("services", "-o", "json", *at).stdout)
    assert [s["host"] for s in listed] == ["grpc-api", "ratings", "reviews"]

    done = shoal("deregister", "reviews", "r-2", *at)
    assert (done.returncode, done.stdout) == (0, "deregistered r-2 of reviews\n")
    assert shoal("deregister", "grpc-api", *at).stdout == "deregistered grpc-api\n"
    assert [i["id"] for i in embedded(pilot)] == ["10.0.0.1:9080"]
    done = shoal("deregister", "grpc-api", *at)
    assert done.returncode == 1
    assert done.stderr == (
        "shoal deregister: pilot refused: no service grpc-api in the embedded registry\n"
    )


def test_commands_report_refusals_and_a_pilot_that_is_down(pilot: Pilot) -> None:
    done = shoal("register", "Reviews", "10.0.0.1:9080", "--pilot", pilot.url)
    assert done.returncode == 1
    assert done.stderr.startswith("shoal register: pilot refused: host: 'Reviews' is not a DNS")
    done = shoal("register", "reviews", "10.0.0.1", "--pilot", pilot.url)
    assert done.returncode == 2
    assert "expected ADDRESS:PORT, not '10.0.0.1'" in done.stderr

    down = f"http://127.0.0.1:{free_port()}"
    for args in (("services",), ("register", "reviews", "10.0.0.1:80"), ("deregister", "x")):
        done = shoal(*args, "--pilot", down)
        assert done.returncode == 3
        assert done.stdout == ""
        assert done.stderr.count("\n") == 1
        assert done.stderr.startswith(f"shoal {args[0]}: cannot reach pilot at {down}: ")


def test_no_services_at_all(tmp_path: Path) -> None:
    from shoal.cli.registry import format_services

    assert format_services([]) == "no services"
