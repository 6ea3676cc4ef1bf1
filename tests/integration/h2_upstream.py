"""A tiny h2c (prior knowledge) server on Shoal's own codec, for tests that need a plain
HTTP/2 upstream (grpcio servers only speak gRPC).

``GET /size/<n>`` answers ``n`` bytes; anything else answers ``h2 <method> <path>
<bytes received>`` once the request body has been read (so uploads are counted). Responses
respect the client's flow-control windows. A connection that does not open with the HTTP/2
preface is served as HTTP/1.1 instead (bodiless requests, answered ``h1 <method> <path>``),
so tests can tell which protocol reached the upstream.

Run: ``python -m tests.integration.h2_upstream --port N``.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

from shoal.codec.http2 import (
    PREFACE,
    DataReceived,
    H2Connection,
    RequestReceived,
    StreamReset,
    WindowUpdated,
)


class _Server(asyncio.Protocol):
    def __init__(self) -> None:
        self.codec = H2Connection(False)
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, tuple[bytes, bytes, int]] = {}
        self.pending: dict[int, bytes] = {}
        self.http1: bool | None = None  # None until the first bytes tell
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.http1 is None:
            self.buffer += data
            if PREFACE.startswith(self.buffer) and len(self.buffer) < len(PREFACE):
                return  # maybe the preface: wait for the rest
            self.http1 = not self.buffer.startswith(PREFACE)
            data, self.buffer = self.buffer, b""
            if not self.http1:
                self.transport.write(self.codec.data_to_send())  # our SETTINGS
        if self.http1:
            self._http1(data)
            return
        for event in self.codec.receive_data(data):
            if isinstance(event, RequestReceived):
                headers = dict(event.headers)
                self.requests[event.stream_id] = (headers[b":method"], headers[b":path"], 0)
                if event.end_stream:
                    self._respond(event.stream_id)
            elif isinstance(event, DataReceived):
                self.codec.acknowledge_received_data(len(event.data), event.stream_id)
                method, path, size = self.requests[event.stream_id]
                self.requests[event.stream_id] = (method, path, size + len(event.data))
                if event.end_stream:
                    self._respond(event.stream_id)
            elif isinstance(event, WindowUpdated):
                for stream_id in list(self.pending):
                    self._pump(stream_id)
            elif isinstance(event, StreamReset):
                self.pending.pop(event.stream_id, None)
        assert self.transport is not None
        self.transport.write(self.codec.data_to_send())

    def _http1(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            method, path = head.split(b" ", 2)[:2]
            body = b"h1 %s %s" % (method, path)
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
            )

    def _respond(self, stream_id: int) -> None:
        method, path, size = self.requests.pop(stream_id)
        if path.startswith(b"/size/"):
            body = b"x" * int(path[6:])
        else:
            body = b"h2 %s %s %d" % (method, path, size)
        headers = [(b":status", b"200"), (b"content-type", b"text/plain")]
        headers.append((b"content-length", b"%d" % len(body)))
        self.codec.send_headers(stream_id, headers)
        self.pending[stream_id] = body
        self._pump(stream_id)

    def _pump(self, stream_id: int) -> None:
        body = self.pending[stream_id]
        window = self.codec.local_flow_control_window(stream_id)
        chunk, rest = body[:window], body[window:]
        self.codec.send_data(stream_id, chunk, end_stream=not rest)
        if rest:
            self.pending[stream_id] = rest
        else:
            del self.pending[stream_id]


async def _serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Server, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(_serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
