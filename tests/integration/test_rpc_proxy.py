"""Real Dubbo and SOFA Bolt clients → shoal proxy → real servers (Node.js peers), and the
proxy's own answers: routing by method, version and attachment, canary weights, errors
in the protocol's terms, per-method limits and breakers, heartbeats, retries, one port
for HTTP and every RPC protocol."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import bootstrap, free_port, http_listener, static_cluster
from tests.integration.rpc_peers import (
    CODE_TIMEOUT,
    RpcServer,
    run_client,
    whoami,
)
from tests.rpc_config import LOCAL_RATE_LIMIT, action, condition, generic_proxy, matcher
from tests.rpc_config import rpc_listener as listener_config

from shoal.codec.rpc.registry import CODECS

GREETER = "com.example.Greeter"
FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
PROTOCOLS = ["dubbo", "bolt"]


@pytest.fixture(params=PROTOCOLS)
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def servers(protocol: str) -> Iterator[dict[str, RpcServer]]:
    with RpcServer(protocol, "v1") as v1, RpcServer(protocol, "v2") as v2:
        yield {"v1": v1, "v2": v2}


def _proxy(
    make_proxy: Any,
    protocol: str,
    servers: dict[str, RpcServer],
    routes: dict[str, Any],
    access_log: Path | None = None,
) -> tuple[Any, int]:
    port = free_port()
    log = None
    if access_log is not None:
        fields = {
            key: f"%{op}%"
            for key, op in (
                ("method", "REQ(:METHOD)"),
                ("service", "REQ(:PATH)"),
                ("protocol", "PROTOCOL"),
                ("status", "RESPONSE_CODE"),
                ("flags", "RESPONSE_FLAGS"),
                ("upstream", "UPSTREAM_HOST"),
                ("user", "REQ(user)"),
            )
        }
        log = {
            "name": "envoy.access_loggers.file",
            "typed_config": {"@type": FILE_LOG, "path": str(access_log), "json_format": fields},
        }
    cluster_list = [static_cluster(name, server.port) for name, server in servers.items()]
    config = bootstrap(
        [listener_config(port, ([], generic_proxy(protocol, {GREETER: routes}, access_log=log)))],
        cluster_list,
        free_port(),
    )
    return make_proxy(config), port


def _labels(report: dict[str, Any]) -> list[str]:
    return [str(result).split(":")[0] for result in report["results"]]


def test_routes_by_method_and_attachment(
    make_proxy: Any, protocol: str, servers: dict[str, RpcServer]
) -> None:
    routes = matcher(
        [
            (
                [condition("method", "sayHello"), condition("property", "alice", "user")],
                action("v2"),
            ),
            ([condition("method", "echo")], action("v2")),
        ],
        default=action("v1"),
    )
    proxy, port = _proxy(make_proxy, protocol, servers, routes)
    plain = run_client(protocol, port, args=["world"], count=5, concurrency=5)
    assert plain["ok"] == 5 and set(_labels(plain)) == {"v1"}
    alice = run_client(
        protocol, port, args=["alice"], count=5, concurrency=5, attachments={"user": "alice"}
    )
    assert alice["ok"] == 5 and set(_labels(alice)) == {"v2"}
    echoed = run_client(
        protocol, port, method="echo", args=[{"$class": "java.lang.String", "$": "x"}]
    )
    assert echoed["ok"] == 1 and echoed["results"] == ["x"]
    served = whoami(protocol, port, attachments={"user": "bob"})
    assert served["label"] == "v1" and served["attachments"]["user"] == "bob"
    stats = proxy.stats()
    assert stats[f"generic_proxy.rpc.rpc.{GREETER}.sayHello.rq_success"] == 10
    assert stats[f"generic_proxy.rpc.rpc.{GREETER}.echo.rq_total"] == 1
    assert stats["cluster.v2.upstream_rq_total"] == 6
    assert stats["generic_proxy.rpc.downstream_rq_active"] == 0


def test_weighted_canary(make_proxy: Any, protocol: str, servers: dict[str, RpcServer]) -> None:
    _, port = _proxy(
        make_proxy, protocol, servers, matcher([], default=action(weights={"v1": 80, "v2": 20}))
    )
    report = run_client(protocol, port, args=["w"], count=400, concurrency=20)
    assert report["ok"] == 400
    share = _labels(report).count("v2") / 400
    assert 0.12 <= share <= 0.28, share


def test_application_errors_pass_through_and_count(
    make_proxy: Any, protocol: str, servers: dict[str, RpcServer]
) -> None:
    proxy, port = _proxy(make_proxy, protocol, servers, matcher([], default=action("v1")))
    report = run_client(protocol, port, method="boom", count=2)
    assert report["ok"] == 0 and len(report["errors"]) == 2
    assert "boom" in report["errors"][0]["message"]
    assert proxy.stats()[f"generic_proxy.rpc.rpc.{GREETER}.boom.rq_error"] == 2


def test_local_replies_are_protocol_errors(
    make_proxy: Any, protocol: str, servers: dict[str, RpcServer], tmp_path: Path
) -> None:
    """No route, an upstream that is down and a route timeout: each is an error response
    the real client reads, on a connection that stays usable."""
    routes = matcher(
        [
            ([condition("method", "slow")], action("v1", timeout="0.2s")),
            ([condition("method", "whoami")], action("v2")),
            ([condition("method", "sayHello")], action("v1")),
        ]
    )
    log = tmp_path / "access.log"
    proxy, port = _proxy(make_proxy, protocol, servers, routes, access_log=log)
    servers["v2"].stop()
    no_route = run_client(protocol, port, method="echo", args=["x"])
    assert "no route" in no_route["errors"][0]["message"]
    down = run_client(protocol, port, method="whoami")
    assert "connection" in down["errors"][0]["message"].lower()
    started = time.monotonic()
    slow = run_client(protocol, port, method="slow", args=[2000], timeout_ms=5000)
    assert time.monotonic() - started < 1.8
    assert "timeout" in slow["errors"][0]["message"].lower()
    assert slow["errors"][0]["code"] != CODE_TIMEOUT  # the proxy answered, not the client
    fine = run_client(protocol, port, args=["w"], attachments={"user": "ann"})
    assert fine["ok"] == 1
    proxy.admin("/stats")  # the access log is flushed every second
    time.sleep(1.2)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["method"], e["flags"]) for e in entries] == [
        ("echo", "NR"),
        ("whoami", "UF"),
        ("slow", "UT"),
        ("sayHello", "-"),
    ]
    last = entries[-1]
    assert last["service"] == GREETER and last["protocol"] == protocol and last["user"] == "ann"
    assert last["upstream"] == f"127.0.0.1:{servers['v1'].port}"
    stats = proxy.stats()
    assert stats["generic_proxy.rpc.downstream_rq_local"] == 3
    assert stats["cluster.v1.upstream_rq_timeout"] == 1
    assert stats["cluster.v2.upstream_cx_connect_fail"] >= 1


def test_per_method_rate_limit(
    make_proxy: Any, protocol: str, servers: dict[str, RpcServer]
) -> None:
    bucket = {"max_tokens": 5, "tokens_per_fill": 5, "fill_interval": "60s"}
    limit = {"lim": {"@type": LOCAL_RATE_LIMIT, "stat_prefix": "hello", "token_bucket": bucket}}
    routes = matcher(
        [([condition("method", "sayHello")], action("v1", per_filter_config=limit))],
        default=action("v1"),
    )
    proxy, port = _proxy(make_proxy, protocol, servers, routes)
    report = run_client(protocol, port, args=["w"], count=20, concurrency=4)
    assert report["ok"] == 5
    assert all("rate limited" in e["message"] for e in report["errors"])
    assert run_client(protocol, port, method="whoami")["ok"] == 1  # other methods: no limit
    assert proxy.stats()["generic_proxy.rpc.downstream_rq_rate_limited"] == 15


def test_per_method_breaker_opens_on_errors(
    make_proxy: Any, protocol: str, servers: dict[str, RpcServer]
) -> None:
    breaker = {
        "window_size": 10,
        "minimum_requests": 5,
        "error_ratio": 0.5,
        "open_duration": "30s",
    }
    routes = matcher(
        [
            (
                [condition("method", "boom")],
                action(
                    "v1",
                    name="boom",
                    metadata={"filter_metadata": {"shoal.circuit_breaker": breaker}},
                ),
            )
        ],
        default=action("v1"),
    )
    proxy, port = _proxy(make_proxy, protocol, servers, routes)
    report = run_client(protocol, port, method="boom", count=12)
    messages = [e["message"] for e in report["errors"]]
    assert len(messages) == 12
    assert sum("circuit breaker open" in m for m in messages) == 7
    assert run_client(protocol, port, args=["w"])["ok"] == 1
    stats = proxy.stats()
    assert stats["route.rpc.boom.circuit_breaker.opened"] == 1
    assert stats["cluster.v1.upstream_rq_total"] == 6


def test_retries_on_connect_failure_go_to_another_host(
    make_proxy: Any, protocol: str, servers: dict[str, RpcServer]
) -> None:
    """A cluster of a dead and a live host: with retry_on connect-failure every call is
    answered; without it, the calls sent to the dead host fail."""
    dead = free_port()
    port = free_port()
    retry = {"num_retries": 2, "retry_on": "connect-failure"}
    routes = matcher(
        [([condition("method", "sayHello")], action("both", retry_policy=retry))],
        default=action("both"),
    )
    config = bootstrap(
        [listener_config(port, ([], generic_proxy(protocol, {GREETER: routes})))],
        [static_cluster("both", dead, servers["v1"].port)],
        free_port(),
    )
    proxy = make_proxy(config)
    assert run_client(protocol, port, args=["w"], count=10)["ok"] == 10
    unretried = run_client(protocol, port, method="whoami", count=10)
    assert 0 < unretried["ok"] < 10
    assert proxy.stats()["cluster.both.upstream_rq_retry"] >= 1


def test_heartbeats_are_answered_by_the_proxy(make_proxy: Any, protocol: str) -> None:
    port = free_port()
    config = bootstrap(
        [
            listener_config(
                port, ([], generic_proxy(protocol, {GREETER: matcher([], default=action("none"))}))
            )
        ],
        [static_cluster("none", free_port())],
        free_port(),
    )
    proxy = make_proxy(config)
    report = run_client(protocol, port, heartbeat=True)
    assert report["heartbeat"]["ok"], report
    assert proxy.stats()["generic_proxy.rpc.downstream_rq_heartbeat"] == 1


def test_one_port_for_http_and_every_rpc_protocol(make_proxy: Any) -> None:
    port = free_port()
    web = http_listener(
        port,
        [
            {
                "name": "all",
                "domains": ["*"],
                "routes": [
                    {
                        "match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"inline_string": "http ok"}},
                    }
                ],
            }
        ],
    )
    chains: list[tuple[list[str], dict[str, Any]]] = [([], web["filter_chains"][0]["filters"][0])]
    with RpcServer("dubbo", "dubbo-v1") as dubbo, RpcServer("bolt", "bolt-v1") as bolt:
        for name in PROTOCOLS:
            routes = matcher([], default=action(name))
            chains.append(([name], generic_proxy(name, {GREETER: routes}, stat_prefix=name)))
        config = bootstrap(
            [listener_config(port, *chains)],
            [static_cluster("dubbo", dubbo.port), static_cluster("bolt", bolt.port)],
            free_port(),
        )
        make_proxy(config)
        assert run_client("dubbo", port, args=["d"])["results"] == ["dubbo-v1: hello d"]
        assert run_client("bolt", port, args=["b"])["results"] == ["bolt-v1: hello b"]
        body = subprocess.run(
            ["curl", "-s", f"http://127.0.0.1:{port}/"], capture_output=True, check=True
        ).stdout
        assert body == b"http ok"


# A request header whose length field claims 4 GB, per protocol (wire layouts in each codec)
HUGE = {
    "dubbo": b"\xda\xbb\xc2\x00" + (7).to_bytes(8, "big") + b"\xff\xff\xff\xff",
    "bolt": b"\x01\x01\x00\x01\x01"
    + (7).to_bytes(4, "big")
    + b"\x01\x00\x00\x0b\xb8"
    + b"\x00\x00\x00\x00\xff\xff\xff\xff",
    "motan2": b"\xf1\xf1\x00\x08\x30" + (7).to_bytes(8, "big") + b"\xff\xff\xff\xff",
}


@pytest.mark.parametrize("name", sorted(CODECS))
def test_bad_bytes_close_the_connection_and_nothing_else(make_proxy: Any, name: str) -> None:
    """Garbage after a good frame, and a frame claiming 4 GB: the connection is answered
    where the protocol can and closed at once; the proxy keeps serving."""
    codec = CODECS[name]
    port = free_port()
    routes = matcher([], default=action("none"))
    config = bootstrap(
        [listener_config(port, ([], generic_proxy(name, routes=routes)))],
        [static_cluster("none", free_port())],
        free_port(),
    )
    proxy = make_proxy(config)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        # the heartbeat before the garbage, in the same read, is still answered
        sock.sendall(codec.heartbeat(9) + b"\x00garbage, not a frame" * 4)
        (beat,) = codec.decoder().feed(_read_until_closed(sock))
        assert beat.heartbeat and not beat.is_request and beat.request_id == 9
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(HUGE[name])
        _read_until_closed(sock)
        assert time.monotonic() - started < 1.0
    assert proxy.stats()["generic_proxy.rpc.downstream_cx_protocol_error"] == 2
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(codec.heartbeat(3))
        assert codec.decoder().feed(sock.recv(65536))[0].request_id == 3


def _read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_outlier_detection_ejects_a_failing_host(make_proxy: Any, protocol: str) -> None:
    """A host whose every answer is an error is ejected after consecutive errors, and
    the rest of the calls go to the healthy one."""
    port = free_port()
    outlier = {
        "consecutive_5xx": 3,
        "interval": "10s",
        "base_ejection_time": "30s",
        "max_ejection_percent": 50,
    }
    with (
        RpcServer(protocol, "good") as good,
        RpcServer(protocol, "bad", fail_methods=["sayHello"]) as bad,
    ):
        config = bootstrap(
            [
                listener_config(
                    port,
                    ([], generic_proxy(protocol, {GREETER: matcher([], default=action("both"))})),
                )
            ],
            [static_cluster("both", good.port, bad.port, outlier_detection=outlier)],
            free_port(),
        )
        proxy = make_proxy(config)
        report = run_client(protocol, port, args=["w"], count=40)
        assert len(report["errors"]) == 3
        assert set(_labels(report)) == {"good"}
        stats = proxy.stats()
        assert stats["cluster.both.outlier_detection.ejections_enforced_total"] == 1


def test_malformed_dubbo_body_gets_bad_request_and_close(make_proxy: Any) -> None:
    """A Dubbo request whose hessian2 body is not hessian2: status 40 for its request id,
    then the connection is closed."""
    port = free_port()
    routes = matcher([], default=action("none"))
    config = bootstrap(
        [listener_config(port, ([], generic_proxy("dubbo", routes=routes)))],
        [static_cluster("none", free_port())],
        free_port(),
    )
    make_proxy(config)
    body = b"\x05" + b"2.0.2" + b"\xff" * 10  # a string, then bytes that are no hessian2 tag
    header = b"\xda\xbb\xc2\x00" + (77).to_bytes(8, "big") + len(body).to_bytes(4, "big")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(header + body)
        frames = CODECS["dubbo"].decoder().feed(_read_until_closed(sock))
    assert [(f.request_id, f.status, f.is_request) for f in frames] == [(77, 40, False)]
