"""Upstream hosts with their own latency, in a process of their own (so the test's client
threads do not share a GIL with them): ``python -m tests.integration.latency_upstream
300 0 0 0`` serves one port per delay (milliseconds; -1 resets every request) and prints
the ports as a JSON list.

Every request (content-length or chunked) is answered after its host's delay with
``x-served-by: <index>`` and a JSON body giving the request body's size and SHA-256. A
request whose connection closes before its answer is counted ``cancelled`` (a proxy
dropping the losing try). ``GET /__stats`` answers at once with each host's ``hits``,
``answered``, ``cancelled`` and ``active`` (requests waiting for their answer), and is not
counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from typing import Any, cast


class Host:
    def __init__(self, index: int, delay: float) -> None:
        self.index, self.delay = index, delay
        self.hits = self.answered = self.cancelled = self.active = 0

    def counts(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "answered": self.answered,
            "cancelled": self.cancelled,
            "active": self.active,
        }


class Conn(asyncio.Protocol):
    def __init__(self, host: Host, hosts: list[Host]) -> None:
        self.host, self.hosts = host, hosts
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.waiting: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._next()

    def _next(self) -> None:
        if self.waiting is not None:
            return  # one request at a time (the proxy does not pipeline upstream)
        head, sep, rest = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        lines = head.decode("latin-1").split("\r\n")
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip().lower()
        if fields.get("transfer-encoding") == "chunked":
            complete = _dechunk(rest)
            if complete is None:
                return
            body, self.buffer = complete
        else:
            length = int(fields.get("content-length", "0"))
            if len(rest) < length:
                return
            body, self.buffer = rest[:length], rest[length:]
        if lines[0].split(" ")[1] == "/__stats":
            self._answer(json.dumps([h.counts() for h in self.hosts]).encode())
            return
        host = self.host
        host.hits += 1
        if host.delay < 0:
            assert self.transport is not None
            self.transport.abort()  # a host that resets every request
            return
        host.active += 1
        info = {"body_bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        loop = asyncio.get_running_loop()
        self.waiting = loop.call_later(host.delay, self._answered, json.dumps(info).encode())

    def _answered(self, body: bytes) -> None:
        self.waiting = None
        self.host.active -= 1
        self.host.answered += 1
        self._answer(body)
        self._next()

    def _answer(self, body: bytes) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-served-by: %d\r\n"
            b"content-length: %d\r\n\r\n%s" % (self.host.index, len(body), body)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiting is not None:
            self.waiting.cancel()
            self.waiting = None
            self.host.active -= 1
            self.host.cancelled += 1


def _dechunk(data: bytes) -> tuple[bytes, bytes] | None:
    """A chunked body and what follows it, or None while it is incomplete."""
    body = []
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return None
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            trailer_end = data.find(b"\r\n", end + 2)  # no trailers: an empty line
            return None if trailer_end < 0 else (b"".join(body), data[trailer_end + 2 :])
        if len(data) < end + 2 + size + 2:
            return None
        body.append(data[end + 2 : end + 2 + size])
        pos = end + 2 + size + 2


async def main(delays_ms: list[int]) -> None:
    loop = asyncio.get_running_loop()
    hosts = [Host(i, ms / 1000) for i, ms in enumerate(delays_ms)]
    ports = []
    for host in hosts:

        def factory(host: Host = host) -> Conn:
            return Conn(host, hosts)

        server = await loop.create_server(factory, "127.0.0.1", 0, backlog=1024)
        ports.append(cast(Any, server.sockets[0]).getsockname()[1])
    print(json.dumps(ports), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main([int(arg) for arg in sys.argv[1:]]))
