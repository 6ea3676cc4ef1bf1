"""The admin listener: Envoy's admin endpoints over plain HTTP/1.1.

It serves whatever ``AdminBackend`` it is given: the runtime itself in a single-process
proxy, or the supervisor that merges its workers' answers with ``--concurrency N``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

from shoal.codec.http1 import END, RequestDecoder, RequestHead, status_line
from shoal.errors import RemoteProtocolError
from shoal.observe.stats import Snapshot, render_prometheus, render_text

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


Reply = tuple[int, str, bytes]
Handler = Callable[[AdminBackend, str], Awaitable[Reply]]

_TEXT = "text/plain; charset=UTF-8"
_JSON = "application/json"


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


# path → (handler, needs POST): state-changing endpoints require POST, as Envoy's do.
ROUTES: dict[str, tuple[Handler, bool]] = {
    "/ready": (_ready, False),
    "/stats": (_stats, False),
    "/stats/prometheus": (_prometheus, False),
    "/clusters": (_clusters, False),
    "/config_dump": (_config_dump, False),
    "/server_info": (_server_info, False),
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
        self.requests.put_nowait(None)

    async def _serve(self) -> None:
        while (head := await self.requests.get()) is not None:
            path, _, query = head.target.decode("latin-1").partition("?")
            route = ROUTES.get(path)
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
            self._send(status, ctype, body, close=not head.keep_alive)

    def _send(self, status: int, ctype: str, body: bytes, close: bool = False) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        head = (
            status_line(status)
            + (
                f"content-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
                f"cache-control: no-cache, max-age=0\r\nx-content-type-options: nosniff\r\n"
            ).encode()
        )
        if close:
            head += b"connection: close\r\n"
        transport.write(head + b"\r\n" + body)
        if close:
            transport.close()


async def serve_admin(backend: AdminBackend, host: str, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: AdminConnection(backend), host, port)
