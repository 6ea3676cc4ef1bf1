"""The admin listener: Envoy's admin endpoints over plain HTTP/1.1.

It serves whatever ``AdminBackend`` it is given: the runtime itself in a single-process
proxy, or the supervisor that merges its workers' answers with ``--concurrency N``.

A handler answers with a whole body, or with an async generator of pieces (``/tap``),
which goes out chunked as it is produced, at the pace the client reads; the head goes
with the first piece, so a body can hold it back until it is ready (an empty piece).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, Protocol, cast

from shoal.codec.http1 import (
    END,
    LAST_CHUNK,
    RequestDecoder,
    RequestHead,
    encode_chunk,
    status_line,
)
from shoal.errors import RemoteProtocolError
from shoal.observe.stats import Snapshot, render_prometheus, render_text
from shoal.proxy.tap import Record, TapSpec

log = logging.getLogger("shoal.admin")


class AdminBackend(Protocol):
    async def snapshot(self) -> Snapshot: ...
    async def clusters_text(self) -> str: ...
    def config_dump(self) -> dict[str, Any]: ...
    def server_info(self) -> dict[str, Any]: ...
    def server_state(self) -> str: ...
    async def set_healthcheck_failed(self, failed: bool) -> None: ...
    async def drain_listeners(self) -> None: ...
    def quit(self) -> None: ...
    def tap(self, spec: TapSpec) -> AsyncGenerator[Record | None, None]:
        """None once the tap is open on every process (so the client, seeing the head,
        knows that no request it sends from then on is missed), then the records of
        finished requests matching ``spec`` as they come, then ``{"dropped": N}``;
        closing the generator ends the tap."""
        ...


Body = bytes | AsyncGenerator[bytes, None]
Reply = tuple[int, str, Body]
Handler = Callable[[AdminBackend, str], Awaitable[Reply]]

_TEXT = "text/plain; charset=UTF-8"
_JSON = "application/json"
_NDJSON = "application/x-ndjson"


async def _ready(backend: AdminBackend, query: str) -> Reply:
    """Envoy's ``/ready``: the server state's name, 200 only when it is LIVE (503 while
    PRE_INITIALIZING or DRAINING)."""
    state = backend.server_state()
    return (200 if state == "LIVE" else 503), _TEXT, f"{state}\n".encode()


async def _stats(backend: AdminBackend, query: str) -> Reply:
    snapshot = await backend.snapshot()
    if "format=json" in query:
        return 200, _JSON, snapshot.to_json().encode()
    if "format=prometheus" in query:
        return 200, "text/plain; version=0.0.4", render_prometheus(snapshot).encode()
    return 200, _TEXT, render_text(snapshot).encode()


async def _prometheus(backend: AdminBackend, query: str) -> Reply:
    snapshot = await backend.snapshot()
    return 200, "text/plain; version=0.0.4", render_prometheus(snapshot).encode()


async def _clusters(backend: AdminBackend, query: str) -> Reply:
    return 200, _TEXT, (await backend.clusters_text()).encode()


async def _config_dump(backend: AdminBackend, query: str) -> Reply:
    return 200, _JSON, json.dumps(backend.config_dump(), indent=2).encode()


async def _server_info(backend: AdminBackend, query: str) -> Reply:
    return 200, _JSON, json.dumps(backend.server_info(), indent=2).encode()


async def _healthcheck_fail(backend: AdminBackend, query: str) -> Reply:
    await backend.set_healthcheck_failed(True)
    return 200, _TEXT, b"OK\n"


async def _healthcheck_ok(backend: AdminBackend, query: str) -> Reply:
    await backend.set_healthcheck_failed(False)
    return 200, _TEXT, b"OK\n"


async def _drain(backend: AdminBackend, query: str) -> Reply:
    await backend.drain_listeners()
    return 200, _TEXT, b"OK\n"


async def _quit(backend: AdminBackend, query: str) -> Reply:
    asyncio.get_running_loop().call_soon(backend.quit)
    return 200, _TEXT, b"OK\n"


async def _tap(backend: AdminBackend, query: str) -> Reply:
    """Live requests, one JSON object per line as each finishes (docs/architecture.md,
    "Tap"); 400 names a bad parameter."""
    try:
        spec = TapSpec.from_query(query)
    except ValueError as exc:
        return 400, _TEXT, f"{exc}\n".encode()
    if backend.server_state() == "PRE_INITIALIZING":
        return 503, _TEXT, b"the proxy is not live yet: nothing to tap\n"
    return 200, _NDJSON, _json_lines(backend.tap(spec))


async def _json_lines(
    records: AsyncGenerator[Record | None, None],
) -> AsyncGenerator[bytes, None]:
    async with aclosing(records):
        async for record in records:
            yield b"" if record is None else json.dumps(record).encode() + b"\n"


# path → (handler, needs POST): state-changing endpoints require POST, as Envoy's do.
ROUTES: dict[str, tuple[Handler, bool]] = {
    "/ready": (_ready, False),
    "/stats": (_stats, False),
    "/stats/prometheus": (_prometheus, False),
    "/clusters": (_clusters, False),
    "/config_dump": (_config_dump, False),
    "/server_info": (_server_info, False),
    "/tap": (_tap, False),
    "/healthcheck/fail": (_healthcheck_fail, True),
    "/healthcheck/ok": (_healthcheck_ok, True),
    "/drain_listeners": (_drain, True),
    "/quitquitquit": (_quit, True),
}


class AdminConnection(asyncio.Protocol):
    def __init__(self, backend: AdminBackend) -> None:
        self.backend = backend
        self.decoder = RequestDecoder()
        self.transport: asyncio.Transport | None = None
        self.requests: asyncio.Queue[RequestHead | None] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.writable = asyncio.Event()  # cleared while the transport's buffer is full
        self.writable.set()
        self.streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        self.task = asyncio.get_running_loop().create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.decoder.feed(data)
        except RemoteProtocolError as exc:
            self._send(exc.status, _TEXT, str(exc).encode() + b"\n", close=True)
            return
        head: RequestHead | None = None
        for event in events:
            if isinstance(event, RequestHead):
                head = event
            elif event is END and head is not None:
                self.requests.put_nowait(head)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.streaming and self.task is not None:
            self.task.cancel()  # the client left: stop producing (a tap closes with it)
        self.requests.put_nowait(None)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    async def _serve(self) -> None:
        while (head := await self.requests.get()) is not None:
            path, _, query = head.target.decode("latin-1").partition("?")
            route = ROUTES.get(path)
            body: Body
            if route is None:
                listing = "\n".join(sorted(ROUTES)) + "\n"
                status, ctype, body = 404, _TEXT, f"invalid path: {path}\n{listing}".encode()
            elif route[1] and head.method != b"POST":
                status, ctype, body = 405, _TEXT, b"This endpoint requires POST\n"
            else:
                try:
                    status, ctype, body = await route[0](self.backend, query)
                except Exception as exc:  # an admin bug must not kill the proxy
                    log.exception("admin handler %s failed", path)
                    status, ctype, body = 500, _TEXT, f"{exc}\n".encode()
            if isinstance(body, bytes):
                self._send(status, ctype, body, close=not head.keep_alive)
            else:
                await self._stream(status, ctype, body, head)

    def _send(self, status: int, ctype: str, body: bytes, close: bool = False) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(_head(status, ctype, f"content-length: {len(body)}", close) + body)
        if close:
            transport.close()

    async def _stream(
        self, status: int, ctype: str, body: AsyncGenerator[bytes, None], request: RequestHead
    ) -> None:
        """Send each piece of ``body`` as it comes, chunked (to an HTTP/1.0 client: plain,
        ended by closing), the head with the first; wait while the client reads slower
        than ``body`` produces."""
        transport = self.transport
        assert transport is not None
        chunked = request.version == b"1.1"
        close = not (chunked and request.keep_alive)
        head = _head(status, ctype, "transfer-encoding: chunked" if chunked else "", close)
        self.streaming = True
        try:
            async with aclosing(body):
                async for piece in body:
                    if transport.is_closing():
                        return
                    # an empty piece sends no chunk: that would end the body
                    transport.write(head + (encode_chunk(piece) if chunked and piece else piece))
                    head = b""
                    await self.writable.wait()
        except Exception as exc:
            log.exception("admin stream failed")
            if head:  # nothing sent yet
                self._send(500, _TEXT, f"{exc}\n".encode(), close=True)
            else:  # the head is out: cutting the body short is all that is left
                transport.close()
            return
        finally:
            self.streaming = False
        transport.write(head + (LAST_CHUNK if chunked else b""))
        if close:
            transport.close()


def _head(status: int, ctype: str, framing: str, close: bool) -> bytes:
    """A response head (with its blank line); ``framing`` is the body's length header."""
    lines = [
        f"content-type: {ctype}",
        *([framing] if framing else []),
        "cache-control: no-cache, max-age=0",
        "x-content-type-options: nosniff",
        *(["connection: close"] if close else []),
    ]
    return status_line(status) + "".join(f"{line}\r\n" for line in lines).encode() + b"\r\n"


async def serve_admin(backend: AdminBackend, host: str, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: AdminConnection(backend), host, port)
