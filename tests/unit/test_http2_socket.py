"""Real sockets: the server side of the codec behind a tiny asyncio server (loopback only),
talking to curl (``--http2-prior-knowledge``, h2c) and to nghttp2's h2load.

The server is the smallest correct use of the codec: feed what arrives, act on the events,
acknowledge request bodies as they are consumed, write ``data_to_send()``.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
from pathlib import Path

from shoal.codec.http2 import (
    ConnectionTerminated,
    DataReceived,
    H2Connection,
    RequestReceived,
    StreamReset,
)


class EchoServer(asyncio.Protocol):
    """GET answers with a fixed body; POST answers with the sha256 of what it received."""

    def __init__(self) -> None:
        self.conn = H2Connection(False)
        self.transport: asyncio.Transport | None = None
        self.bodies: dict[int, hashlib._Hash] = {}
        self.paths: dict[int, bytes] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        for event in conn.receive_data(data):
            if isinstance(event, RequestReceived):
                self.paths[event.stream_id] = dict(event.headers)[b":path"]
                self.bodies[event.stream_id] = hashlib.sha256()
                if event.end_stream:
                    self.respond(event.stream_id)
            elif isinstance(event, DataReceived):
                self.bodies[event.stream_id].update(event.data)
                conn.acknowledge_received_data(len(event.data), event.stream_id)
                if event.end_stream:
                    self.respond(event.stream_id)
            elif isinstance(event, StreamReset):
                self.bodies.pop(event.stream_id, None)
            elif isinstance(event, ConnectionTerminated):
                break
        self.flush()

    def respond(self, stream_id: int) -> None:
        digest = self.bodies.pop(stream_id).hexdigest().encode()
        body = b"hello over h2c " + self.paths.pop(stream_id) + b"\n" + digest + b"\n"
        headers = [
            (b":status", b"200"),
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(body)).encode()),
        ]
        self.conn.send_headers(stream_id, headers)
        self.conn.send_data(stream_id, body, end_stream=True)  # far below any window

    def flush(self) -> None:
        assert self.transport is not None
        out = self.conn.data_to_send()
        if out:
            self.transport.write(out)
        if self.conn.closed:
            self.transport.close()


async def run_against_server(*command: str) -> tuple[int, str, str]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoServer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    argv = [part.replace("PORT", str(port)) for part in command]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
    finally:
        server.close()
        await server.wait_closed()
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed (scripts/setup.sh installs it)"
    return path


def test_curl_get_over_h2c() -> None:
    code, out, err = asyncio.run(
        run_against_server(
            tool("curl"), "-sS", "-v", "--http2-prior-knowledge", "http://127.0.0.1:PORT/hi"
        )
    )
    assert code == 0, err
    assert "< HTTP/2 200" in err
    assert out.startswith("hello over h2c /hi\n")
    assert hashlib.sha256(b"").hexdigest() in out


def test_curl_post_of_a_large_body(tmp_path: Path) -> None:
    body = bytes(range(256)) * 8192  # 2 MiB: several windows' worth
    path = tmp_path / "body.bin"
    path.write_bytes(body)
    code, out, err = asyncio.run(
        run_against_server(
            tool("curl"),
            "-sS",
            "--http2-prior-knowledge",
            "--data-binary",
            f"@{path}",
            "http://127.0.0.1:PORT/upload",
        )
    )
    assert code == 0, err
    assert out == f"hello over h2c /upload\n{hashlib.sha256(body).hexdigest()}\n"


def test_h2load_many_streams_over_few_connections() -> None:
    code, out, err = asyncio.run(
        run_against_server(
            tool("h2load"), "-n", "3000", "-c", "4", "-m", "50", "http://127.0.0.1:PORT/load"
        )
    )
    assert code == 0, out + err
    done = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded", out)
    assert done, out
    assert done.groups() == ("3000", "3000", "3000", "3000"), out
    assert "status codes: 3000 2xx" in out
