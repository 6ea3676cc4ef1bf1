"""A small HTTP/1.1 sample service: echoes what it received, and misbehaves on request.

Paths: ``/status/N`` answers N; ``/delay/MS`` waits; ``/bytes/N`` streams N bytes
(``?chunked=1`` for chunked framing); ``/reset`` closes without answering;
``/fail/KEY/N`` answers 503 the first N times for KEY; ``/upgrade`` switches protocols and
echoes bytes. Anything else returns JSON describing the request, including the body size
(bodies are counted, never stored, so 1 GB uploads need no memory).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from typing import Any, cast

import uvloop

from shoal.codec.http1 import END, RequestDecoder, RequestHead, Upgrade, encode_chunk
from shoal.errors import RemoteProtocolError

_CHUNK = b"x" * 65536

log = logging.getLogger("shoal.demo.echo")


class EchoServer(asyncio.Protocol):
    failures: dict[str, int] = {}

    def __init__(self, name: str) -> None:
        self.name = name
        self.decoder = RequestDecoder(1 << 20)
        self.transport: asyncio.Transport | None = None
        self.head: RequestHead | None = None
        self.body_bytes = 0
        self.queue: list[tuple[RequestHead, int]] = []
        self.task: asyncio.Task[None] | None = None  # the one serving this connection
        self.tunnel = False
        self.can_write = asyncio.Event()
        self.can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue.clear()  # pipelined requests nobody will read
        self.can_write.set()  # a response paused on backpressure stops instead of waiting

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.tunnel:
            self.transport.write(data)
            return
        try:
            events = self.decoder.feed(data)
        except RemoteProtocolError as exc:
            self.transport.write(b"HTTP/1.1 %d Bad\r\ncontent-length: 0\r\n\r\n" % exc.status)
            self.transport.close()
            return
        for event in events:
            if isinstance(event, RequestHead):
                self.head, self.body_bytes = event, 0
            elif isinstance(event, bytes):
                self.body_bytes += len(event)
            elif event is END and self.head is not None and not self.head.upgrade:
                # (an upgrade request's END precedes its Upgrade event: it gets the 101 only)
                self.queue.append((self.head, self.body_bytes))
                if self.task is None:
                    self.task = asyncio.get_running_loop().create_task(self._serve())
                    self.task.add_done_callback(self._served)
            elif isinstance(event, Upgrade) and self.head is not None:
                self.tunnel = True
                self.transport.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n"
                    b"upgrade: " + (self.head.header(b"upgrade") or b"x") + b"\r\n\r\n" + event.rest
                )

    async def _serve(self) -> None:
        transport = self.transport
        assert transport is not None
        try:
            while self.queue and not transport.is_closing():
                head, body_bytes = self.queue.pop(0)
                await self._respond(head, body_bytes)
        finally:
            self.task = None  # before any new request can arrive: the next one starts a task

    def _served(self, task: asyncio.Task[None]) -> None:
        """The serving task's end: its exception is logged here, not left unretrieved."""
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("echo %s: request failed", self.name, exc_info=exc)
            if self.transport is not None:
                self.transport.abort()

    async def _respond(self, head: RequestHead, body_bytes: int) -> None:
        transport = self.transport
        assert transport is not None
        path = head.target.decode("latin-1")
        parts = path.split("?")[0].strip("/").split("/")
        status = 200
        if parts[0] == "reset":
            transport.abort()
            return
        if parts[0] == "delay" and len(parts) > 1:
            await asyncio.sleep(int(parts[1]) / 1000)
        if parts[0] == "status" and len(parts) > 1:
            status = int(parts[1])
        if parts[0] == "fail" and len(parts) > 2:
            seen = self.failures.get(parts[1], 0)
            self.failures[parts[1]] = seen + 1
            if seen < int(parts[2]):
                status = 503
        if parts[0] == "bytes" and len(parts) > 1:
            await self._stream(int(parts[1]), "chunked=1" in path, head)
            return
        info: dict[str, Any] = {
            "service": self.name,
            "method": head.method.decode(),
            "path": path,
            "headers": {k.decode(): v.decode("latin-1") for k, v in head.headers},
            "body_bytes": body_bytes,
        }
        body = json.dumps(info).encode() + b"\n"
        close = not head.keep_alive
        lines = [
            b"HTTP/1.1 %d X\r\n" % status,
            b"content-type: application/json\r\n",
            b"x-served-by: %s\r\n" % self.name.encode(),
        ]
        if status in (204, 304):
            lines.append(b"\r\n")
        else:
            lines.append(b"content-length: %d\r\n" % len(body))
            lines.append(b"connection: close\r\n\r\n" if close else b"\r\n")
            if head.method != b"HEAD":
                lines.append(body)
        if transport.is_closing():
            return  # the client (a proxy's timeout, say) gave up during the delay
        transport.write(b"".join(lines))
        if close:
            transport.close()

    async def _stream(self, size: int, chunked: bool, head: RequestHead) -> None:
        transport = self.transport
        assert transport is not None
        framing = b"transfer-encoding: chunked" if chunked else b"content-length: %d" % size
        transport.write(b"HTTP/1.1 200 OK\r\n%s\r\n\r\n" % framing)
        if head.method == b"HEAD":
            return
        left = size
        while left > 0:
            await self.can_write.wait()
            if transport.is_closing():
                return
            piece = _CHUNK[: min(left, len(_CHUNK))]
            left -= len(piece)
            transport.write(encode_chunk(piece) if chunked else piece)
        if chunked and not transport.is_closing():
            transport.write(b"0\r\n\r\n")


async def serve(host: str, port: int, name: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: EchoServer(name), host, port, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"echo {name} listening on {host}:{port}", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="echo")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.host, args.port, args.name))


if __name__ == "__main__":
    main()
