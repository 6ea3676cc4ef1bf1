"""The real Dubbo and SOFA Bolt peers themselves, client straight to server (no proxy):
what the proxy's RPC tests rely on them for."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest
from tests.conftest import free_port
from tests.integration.rpc_peers import (
    CLIENT_JS,
    CODE_APPLICATION,
    CODE_NO_PROVIDER,
    CODE_TIMEOUT,
    PEERS_DIR,
    PROTOCOLS,
    Protocol,
    RpcServer,
    node_binary,
    run_client,
    whoami,
)

# The response status of a failed call, as each protocol puts it in the response frame.
SERVER_ERROR = {"dubbo": 80, "bolt": 2}  # Dubbo SERVER_ERROR / Bolt SERVER_EXCEPTION
OK_STATUS = {"dubbo": 20, "bolt": 0}


@pytest.fixture(scope="module", params=PROTOCOLS)
def server(request: pytest.FixtureRequest) -> Iterator[RpcServer]:
    with RpcServer(request.param, "v1") as running:
        yield running


def test_say_hello_returns_the_servers_label(server: RpcServer) -> None:
    report = run_client(server.protocol, server.address, method="sayHello", args=["world"])

    assert report["errors"] == []
    assert report["ok"] == 1
    assert report["results"] == ["v1: hello world"]
    assert len(report["latency_ms"]) == 1


def test_whoami_shows_the_attachments_sent(server: RpcServer) -> None:
    sent = {"route": "canary", "x-user": "alice"}

    info = whoami(server.protocol, server.address, attachments=sent)

    assert info["label"] == "v1"
    assert info["protocol"] == server.protocol
    assert (info["interface"], info["version"], info["group"]) == (
        "com.example.Greeter",
        "1.0.0",
        "",
    )
    assert info["service"] == "com.example.Greeter:1.0.0"
    assert sent.items() <= info["attachments"].items()
    if server.protocol == "dubbo":
        assert info["attachments"]["path"] == "com.example.Greeter"
        assert info["attachments"]["version"] == "1.0.0"
        assert info["headers"] is None
    else:
        # Bolt: also in the header map, next to what Java SOFARPC puts there.
        assert sent.items() <= info["headers"].items()
        assert info["headers"]["service"] == "com.example.Greeter:1.0.0"
        assert info["headers"]["sofa_head_method_name"] == "whoami"
        assert info["timeout"] == 3000


def test_boom_surfaces_a_remote_error(server: RpcServer) -> None:
    report = run_client(server.protocol, server.address, method="boom")

    assert report["ok"] == 0
    [error] = report["errors"]
    assert "v1: boom" in error["message"]
    assert error["code"] == CODE_APPLICATION
    assert error["status"] == SERVER_ERROR[server.protocol]


def test_app_exception_arrives_in_an_ok_response(server: RpcServer) -> None:
    report = run_client(server.protocol, server.address, method="appException")

    [error] = report["errors"]
    assert "v1: appException" in error["message"]
    assert error["status"] == OK_STATUS[server.protocol]


def test_slow_call_past_the_timeout_is_a_timeout_error(server: RpcServer) -> None:
    report = run_client(server.protocol, server.address, method="slow", args=[3000], timeout_ms=300)

    [error] = report["errors"]
    assert error["code"] == CODE_TIMEOUT
    assert error["name"] == "RpcResponseTimeoutError"
    assert error["status"] is None
    assert 300 <= report["latency_ms"][0] < 2000


def test_slow_call_within_the_timeout_answers(server: RpcServer) -> None:
    report = run_client(server.protocol, server.address, method="slow", args=[200], timeout_ms=3000)

    assert report["results"] == ["v1: slept 200ms"]
    assert report["latency_ms"][0] >= 200


def test_fifty_calls_ten_in_flight_all_succeed(server: RpcServer) -> None:
    report = run_client(server.protocol, server.address, args=["crowd"], count=50, concurrency=10)

    assert report["errors"] == []
    assert report["ok"] == 50
    assert report["results"] == ["v1: hello crowd"] * 50
    assert len(report["latency_ms"]) == 50


def test_calls_overlap_on_the_one_connection(server: RpcServer) -> None:
    started = time.monotonic()
    report = run_client(
        server.protocol, server.address, method="slow", args=[300], count=10, concurrency=10
    )
    took = time.monotonic() - started

    assert report["ok"] == 10
    assert took < 10 * 0.3  # one after another would take 3 s


def test_echo_returns_a_structure_as_sent(server: RpcServer) -> None:
    value = ["text", "", 42, 0, 1.5, True, False, None, [1, "a"], {"k": "v", "n": 7}]

    report = run_client(server.protocol, server.address, method="echo", args=[value])

    assert report["results"] == [value]


@pytest.mark.parametrize("value", [0, "", False, None])
def test_echo_returns_falsy_values_as_sent(server: RpcServer, value: object) -> None:
    report = run_client(server.protocol, server.address, method="echo", args=[value])

    assert report["results"] == [value]


def test_heartbeat_is_acknowledged(server: RpcServer) -> None:
    report = run_client(server.protocol, server.address, heartbeat=True, count=0)

    assert report["heartbeat"]["ok"] is True
    assert report["ok"] == 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_version_and_group_must_match_the_servers(protocol: Protocol) -> None:
    with RpcServer(protocol, "v2", version="2.0.0", group="blue") as server:
        right = run_client(protocol, server.address, args=["x"], version="2.0.0", group="blue")
        wrong_version = run_client(protocol, server.address, version="1.0.0", group="blue")
        wrong_group = run_client(protocol, server.address, version="2.0.0", group="green")
        info = whoami(protocol, server.address, version="2.0.0", group="blue")

    assert right["results"] == ["v2: hello x"]
    for report in (wrong_version, wrong_group):
        [error] = report["errors"]
        assert "not found service" in error["message"]
    assert (info["label"], info["version"], info["group"]) == ("v2", "2.0.0", "blue")
    if protocol == "dubbo":
        assert info["attachments"]["group"] == "blue"
    else:
        assert info["service"] == "com.example.Greeter:2.0.0:blue"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_fail_method_and_delay(protocol: Protocol) -> None:
    with RpcServer(protocol, "bad", fail_methods=["sayHello"], delay_ms=150) as server:
        failed = run_client(protocol, server.address, args=["x"])
        fine = run_client(protocol, server.address, method="echo", args=["still here"])

    [error] = failed["errors"]
    assert "bad: sayHello" in error["message"]
    assert fine["results"] == ["still here"]
    assert fine["latency_ms"][0] >= 150


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_restart_keeps_the_port_and_stop_is_clean(protocol: Protocol) -> None:
    server = RpcServer(protocol, "v1")
    with server:
        port = server.port
        server.stop()
        assert server.proc is not None and server.proc.returncode == 0
        down = run_client(protocol, port, timeout_ms=500)
        server.start()
        up = run_client(protocol, port, args=["again"])

    assert server.port == port
    assert down["errors"][0]["code"] == CODE_NO_PROVIDER
    assert up["results"] == ["v1: hello again"]


def test_unreachable_address_is_a_no_provider_error() -> None:
    report = run_client("bolt", free_port(), timeout_ms=500)

    assert report["ok"] == 0
    assert report["errors"][0]["code"] == CODE_NO_PROVIDER


def test_usage_errors_exit_2() -> None:
    for args in (
        ["--protocol", "thrift", "--address", "127.0.0.1:1", "--method", "m"],
        ["--protocol", "bolt", "--address", "127.0.0.1:1"],
        ["--protocol", "bolt", "--address", "127.0.0.1:1", "--method", "m", "--args", "{}"],
        ["--protocol", "bolt", "--address", "nowhere", "--method", "m"],
    ):
        done = subprocess.run(
            [node_binary(), str(CLIENT_JS), *args], capture_output=True, text=True, check=False
        )
        assert done.returncode == 2, (args, done.stderr)
        assert "usage" in done.stderr
    done = subprocess.run(
        [node_binary(), str(PEERS_DIR / "server.js"), "--protocol", "bolt"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2


def test_run_client_raises_with_stderr_when_the_client_cannot_run() -> None:
    with pytest.raises(RuntimeError, match="--count must be"):
        run_client("dubbo", 1, count=-1)


def test_missing_node_says_to_run_make_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda _name: None)

    with pytest.raises(pytest.fail.Exception, match="make setup"):
        node_binary()
