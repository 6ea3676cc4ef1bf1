"""Pilot's HTTP/1.1 server: a small router for the REST API and whatever else pilot serves.

It speaks through Shoal's own codec, like the proxy's admin listener, but is its own code:
pilot never imports the proxy layer. Handlers get the request whole (bodies are small,
at most ``MAX_BODY`` bytes) and answer whole, or with a :class:`Stream` sent as it is made
(the merged tap); errors are JSON ``{"error": "..."}``. Requests on one connection are
answered in order (pipelining works).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mimetypes
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast
from urllib.parse import unquote

from shoal.codec.http1 import (
    CONTINUE_RESPONSE,
    END,
    LAST_CHUNK,
    Event,
    RequestDecoder,
    RequestHead,
    encode_chunk,
    status_line,
)
from shoal.errors import RemoteProtocolError

log = logging.getLogger("shoal.pilot.http")

MAX_BODY = 1024 * 1024
LINGER = 2.0  # seconds a refused connection keeps reading (and dropping) what the client sends
JSON = "application/json"

Reply = tuple[int, str, bytes]  # status, content type, body


@dataclass(frozen=True, slots=True)
class Stream:
    """An answer sent while it is made: each piece ``body`` yields goes out at once (chunked
    for HTTP/1.1), and the connection closes after the last. The client leaving cancels
    ``body`` where it waits, so its ``finally`` releases what it holds at once; a client
    that reads slowly holds ``body`` back at its next yield (bounded write buffer)."""

    status: int
    content_type: str
    body: AsyncGenerator[bytes, None]


Answer = Reply | Stream
Handler = Callable[[str, str, str, bytes], Awaitable[Answer]]  # method, path, query, body
Routes = Mapping[tuple[str, str], Handler]  # (method, path prefix) -> handler


def json_reply(status: int, value: object) -> Reply:
    return status, JSON, json.dumps(value, indent=2).encode() + b"\n"


def error_reply(status: int, message: str) -> Reply:
    return json_reply(status, {"error": message})


def _matches(prefix: str, path: str) -> bool:
    """A prefix covers whole path segments: ``/v1/services`` covers ``/v1/services/x``,
    not ``/v1/servicesx``. The root covers only itself: it is a page (the dashboard), and
    a catch-all would answer 405 instead of 404 for other methods on unknown paths."""
    if prefix == "/":
        return path == "/"
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")


def _route(routes: Routes, method: str, path: str) -> Handler | Reply:
    """The handler of the longest matching prefix for this method (HEAD uses GET's), or
    the error to answer: 405 when only other methods match the path, else 404."""
    wanted = "GET" if method == "HEAD" else method
    best: tuple[int, Handler] | None = None
    allowed: set[str] = set()
    for (route_method, prefix), handler in routes.items():
        if not _matches(prefix, path):
            continue
        if route_method != wanted:
            allowed.add(route_method)
        elif best is None or len(prefix) > best[0]:
            best = len(prefix), handler
    if best is not None:
        return best[1]
    if allowed:
        return error_reply(
            405, f"{method} not allowed on {path} (allowed: {', '.join(sorted(allowed))})"
        )
    return error_reply(404, f"nothing at {path}")


@dataclass(slots=True)
class _Request:
    head: RequestHead
    body: bytes


@dataclass(slots=True)
class _Refusal:
    """A request that cannot be served (bad framing, body too large): answered in turn,
    then the connection closes, since what follows on it can't be trusted."""

    reply: Reply


class _Connection(asyncio.Protocol):
    def __init__(self, routes: Routes) -> None:
        self.routes = routes
        self.decoder = RequestDecoder()
        self.transport: asyncio.Transport | None = None
        self.queue: asyncio.Queue[_Request | _Refusal | None] = asyncio.Queue()
        self.head: RequestHead | None = None
        self.body: list[bytes] = []
        self.body_size = 0
        self.refused = False
        self.task: asyncio.Task[None] | None = None  # held: the loop keeps tasks weakly
        self.streaming = False
        self.writable = asyncio.Event()  # cleared while the transport's buffer is full
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.task = asyncio.get_running_loop().create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        try:
            events = self.decoder.feed(data)
        except RemoteProtocolError as exc:
            self._take(self.decoder.completed_before_error)
            self._refuse(error_reply(exc.status, str(exc)))
            return
        self._take(events)

    def _take(self, events: list[Event]) -> None:
        for event in events:
            if self.refused:
                return
            if isinstance(event, RequestHead):
                self.head, self.body, self.body_size = event, [], 0
                if event.content_length > MAX_BODY:
                    self._refuse_too_large()
                elif event.expect_continue and self.transport is not None:
                    self.transport.write(CONTINUE_RESPONSE)
            elif isinstance(event, bytes):
                self.body.append(event)
                self.body_size += len(event)
                if self.body_size > MAX_BODY:
                    self._refuse_too_large()
            elif event is END and self.head is not None:
                self.queue.put_nowait(_Request(self.head, b"".join(self.body)))
                self.head, self.body = None, []

    def _refuse_too_large(self) -> None:
        self._refuse(error_reply(413, f"request body larger than {MAX_BODY} bytes"))

    def _refuse(self, reply: Reply) -> None:
        self.refused = True
        self.queue.put_nowait(_Refusal(reply))

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue.put_nowait(None)
        self.writable.set()
        if self.streaming and self.task is not None:
            self.task.cancel()  # a stream may wait long for its next piece: stop it now

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    async def _serve(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # cancelled: the client left
            await self._answer_each()

    async def _answer_each(self) -> None:
        while (item := await self.queue.get()) is not None:
            if isinstance(item, _Refusal):
                self._refuse_and_linger(item.reply)
                return
            head = item.head
            method = head.method.decode("latin-1")
            path, _, query = head.target.decode("latin-1").partition("?")
            found = _route(self.routes, method, path)
            reply: Answer
            if isinstance(found, tuple):
                reply = found
            else:
                try:
                    reply = await found(method, path, query, item.body)
                except Exception as exc:  # a handler's bug answers 500, the server goes on
                    log.exception("%s %s failed", method, path)
                    reply = error_reply(500, f"{type(exc).__name__}: {exc}")
            if isinstance(reply, Stream):
                await self._stream(
                    reply, chunked=head.version == b"1.1", head_only=method == "HEAD"
                )
                return
            self._send(reply, close=not head.keep_alive, head_only=method == "HEAD")
            if not head.keep_alive:
                if self.transport is not None:
                    self.transport.close()
                return

    def _refuse_and_linger(self, reply: Reply) -> None:
        """Answer, then half-close and drop what still arrives for a while: closing outright
        with unread input makes the kernel reset the connection, and a client still sending
        its body would lose the answer."""
        self._send(reply, close=True, head_only=False)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if transport.can_write_eof():
                transport.write_eof()
            asyncio.get_running_loop().call_later(LINGER, transport.close)

    async def _stream(self, stream: Stream, *, chunked: bool, head_only: bool) -> None:
        """Send ``stream`` piece by piece, then close; an HTTP/1.0 client gets the body
        unframed, ended by the close."""
        body = stream.body
        try:
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            transport.write(
                status_line(stream.status)
                + (
                    f"content-type: {stream.content_type}\r\n"
                    + ("transfer-encoding: chunked\r\n" if chunked else "")
                    + "cache-control: no-cache, max-age=0\r\nx-content-type-options: nosniff\r\n"
                    "connection: close\r\n\r\n"
                ).encode("latin-1")
            )
            if head_only:
                return
            self.streaming = True
            async for piece in body:
                if transport.is_closing():
                    return
                if piece:
                    transport.write(encode_chunk(piece) if chunked else piece)
                await self.writable.wait()
            if chunked:
                transport.write(LAST_CHUNK)
        finally:
            self.streaming = False
            await body.aclose()
            if self.transport is not None:
                self.transport.close()

    def _send(self, reply: Reply, *, close: bool, head_only: bool) -> None:
        """Write one answer; ``close`` says in it that the connection ends (the caller ends
        it)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        status, ctype, body = reply
        head = status_line(status) + (
            f"content-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
            "cache-control: no-cache, max-age=0\r\nx-content-type-options: nosniff\r\n"
            + ("connection: close\r\n" if close else "")
            + "\r\n"
        ).encode("latin-1")
        transport.write(head if head_only else head + body)


async def serve_http(host: str, port: int, routes: Routes) -> asyncio.Server:
    """Listen on ``host:port`` (port 0: any free port) and serve ``routes``."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Connection(routes), host, port)


def static_routes(directory: Path, missing: str) -> dict[tuple[str, str], Handler]:
    """``GET /`` answers ``directory/index.html`` and ``GET /static/PATH`` the file PATH
    under ``directory`` (nothing outside it); ``missing`` is the 404's text while the
    directory does not exist (files are read per request: a rebuild shows at once)."""

    async def serve(name: str) -> Reply:
        if not directory.is_dir():
            return 404, "text/plain; charset=utf-8", missing.encode() + b"\n"
        root = directory.resolve()
        target = (root / name).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            return error_reply(404, f"no such file: {name}")
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith(("javascript", "json")):
            ctype += "; charset=utf-8"
        return 200, ctype, await asyncio.to_thread(target.read_bytes)

    async def index(method: str, path: str, query: str, body: bytes) -> Reply:
        return await serve("index.html")

    async def static(method: str, path: str, query: str, body: bytes) -> Reply:
        return await serve(unquote(path.removeprefix("/static/")))

    return {("GET", "/"): index, ("GET", "/static/"): static}
