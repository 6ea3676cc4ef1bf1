"""HTTP/2 PING keepalive (``http2_protocol_options.connection_keepalive``), upstream and
downstream: a peer that stops answering PINGs loses its connection after interval +
timeout; one that answers keeps it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from tests.conftest import free_port, route_to, static_cluster
from tests.integration.test_h2_proxy import (
    H2Upstream,
    curl,
    h2_cluster,
    h2_upstream,
    proxy_config,
)

from shoal.codec.http2 import PREFACE, H2Connection

__all__ = ["h2_upstream"]  # the fixture used here

KEEPALIVE = {"connection_keepalive": {"interval": "0.3s", "timeout": "0.3s"}}
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


class SilentServer:
    """An HTTP/2 server that sends its SETTINGS and then never answers anything."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.sendall(EMPTY_SETTINGS)
            self.accepted.append(conn)  # read by nobody: PINGs stay unanswered

    def stop(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.stop()


def keepalive_cluster(name: str, port: int) -> dict[str, Any]:
    key = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    options = {
        "@type": f"type.googleapis.com/{key}",
        "explicit_http_config": {"http2_protocol_options": KEEPALIVE},
    }
    return static_cluster(name, port, typed_extension_protocol_options={key: options})


def test_upstream_that_stops_answering_pings_is_dropped(
    make_proxy: Any, silent_server: SilentServer, h2_upstream: H2Upstream
) -> None:
    port = free_port()
    config = proxy_config(
        port,
        [
            keepalive_cluster("silent", silent_server.port),
            keepalive_cluster("live", h2_upstream.port),
        ],
        [route_to("silent", "/silent", timeout="0s"), route_to("live")],
    )
    proxy = make_proxy(config)
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    failed = curl("--http2-prior-knowledge", "-w", " %{http_code}", f"{base}/silent")
    assert failed.stdout == "keepalive timeout 503"
    assert 0.5 < time.monotonic() - started < 3
    assert curl("--http2-prior-knowledge", f"{base}/a").stdout == "h2 GET /a 0"
    time.sleep(1.2)  # several PING rounds, each answered
    assert curl("--http2-prior-knowledge", f"{base}/b").stdout == "h2 GET /b 0"
    assert proxy.stats()["cluster.live.upstream_cx_total"] == 1


def test_downstream_client_that_stops_answering_pings_is_dropped(
    make_proxy: Any, h2_upstream: H2Upstream
) -> None:
    port = free_port()
    config = proxy_config(
        port,
        [h2_cluster("live", h2_upstream.port)],
        [route_to("live")],
        http2_protocol_options=KEEPALIVE,
    )
    make_proxy(config)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as silent:
        silent.sendall(PREFACE + EMPTY_SETTINGS)
        time.sleep(1.0)  # the proxy's PING waits, unanswered
        received = b""
        while chunk := silent.recv(65536):
            received += chunk
        assert b"shoal-ka" in received  # the PING it sent, before it closed
    client = H2Connection(True)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as answering:
        answering.sendall(client.data_to_send())
        deadline = time.monotonic() + 1.5
        answering.settimeout(0.1)
        while time.monotonic() < deadline:
            try:
                data = answering.recv(65536)
            except TimeoutError:
                continue
            assert data, "the proxy closed a connection that answered its PINGs"
            client.receive_data(data)  # PINGs are answered by the codec
            answering.sendall(client.data_to_send())
