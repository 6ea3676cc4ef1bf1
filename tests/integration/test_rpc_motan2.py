"""Motan2 through the proxy. No Motan peer runs here (docs/protocols.md): the client sends
frames built from the published protocol definition and the upstream answers with
Shoal's codec, so these tests show the proxy's routing, request ids, local replies and
heartbeats for Motan2; the codec's bytes are checked against the published definition
in tests/unit/test_codec_motan2.py."""

from __future__ import annotations

import json
import socket
import threading
from typing import Any

from tests.conftest import bootstrap, free_port, static_cluster
from tests.integration.codec_upstream import CodecUpstream
from tests.rpc_config import action, condition, generic_proxy, matcher, rpc_listener

from shoal.codec.rpc.base import RpcFrame
from shoal.codec.rpc.motan2 import M_EXCEPTION, Motan2Codec, simple_decode, simple_encode

CODEC = Motan2Codec()
SERVICE = "com.weibo.Greeter"


def _answer(label: str) -> Any:
    def answer(request: RpcFrame) -> bytes:
        body = simple_encode(f"{label}: {request.method} {simple_decode(request.payload)}")
        response = RpcFrame(is_request=False, request_id=request.request_id, payload=body)
        return CODEC.encode(response)

    return answer


def _request(request_id: int, method: str, arg: str, **headers: str) -> bytes:
    frame = RpcFrame(
        is_request=True,
        request_id=request_id,
        service=SERVICE,
        method=method,
        headers=dict(headers),
        payload=simple_encode(arg),
    )
    return CODEC.encode(frame)


def _call(sock: socket.socket, data: bytes, frames: int = 1) -> list[RpcFrame]:
    sock.sendall(data)
    decoder = CODEC.decoder()
    received: list[RpcFrame] = []
    while len(received) < frames:
        chunk = sock.recv(65536)
        assert chunk, "the proxy closed the connection"
        received.extend(decoder.feed(chunk))
    return received


def _proxy(make_proxy: Any, routes: dict[str, Any], **ports: int) -> int:
    port = free_port()
    config = bootstrap(
        [rpc_listener(port, ([], generic_proxy("motan2", {SERVICE: routes})))],
        [static_cluster(name, p) for name, p in ports.items()],
        free_port(),
    )
    make_proxy(config)
    return port


def test_motan2_routing_ids_and_heartbeats(make_proxy: Any) -> None:
    with (
        CodecUpstream(CODEC, _answer("v1"), delay=0.2) as v1,
        CodecUpstream(CODEC, _answer("v2")) as v2,
    ):
        routes = matcher(
            [([condition("property", "canary", "route")], action("v2"))],
            default=action("v1"),
        )
        port = _proxy(make_proxy, routes, v1=v1.port, v2=v2.port)
        results: dict[str, list[RpcFrame]] = {}

        def client(name: str) -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                results[name] = _call(sock, _request(7, "hello", name))

        # two clients using the same request id at once, on one upstream connection
        threads = [threading.Thread(target=client, args=(n,)) for n in ("ann", "bob")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for name in ("ann", "bob"):
            (answer,) = results[name]
            assert answer.request_id == 7 and answer.ok
            assert simple_decode(answer.payload) == f"v1: hello {name}"
        assert len({f.request_id for f in v1.requests}) == 2
        assert len(v1.connections) == 1
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            (canary,) = _call(sock, _request(1, "hello", "c", route="canary"))
            assert simple_decode(canary.payload) == "v2: hello c"
            (beat,) = _call(sock, CODEC.heartbeat(5))
            assert beat.heartbeat and not beat.is_request and beat.request_id == 5
        assert all(not f.heartbeat for f in v1.requests + v2.requests)


def test_motan2_local_replies_carry_motan_errors(make_proxy: Any) -> None:
    routes = matcher([([condition("method", "hello")], action("down"))])
    port = _proxy(make_proxy, routes, down=free_port())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        no_route, down = _call(sock, _request(1, "bye", "x") + _request(2, "hello", "x"), 2)
    by_id = {f.request_id: f for f in (no_route, down)}
    for request_id, errcode in ((1, 404), (2, 1002)):
        frame = by_id[request_id]
        assert not frame.ok
        error = json.loads(frame.headers[M_EXCEPTION])
        assert error["errcode"] == errcode, error
