"""An HTTPS upstream for TLS tests: HTTP/1.1 or HTTP/2 by the ALPN the client negotiated,
answering every request with what it saw of the connection::

    <protocol> sni=<name or -> alpn=<protocol or -> client=<client URI SAN or -> path=<path>

With ``--ca`` it asks for a client certificate (and verifies it against that CA); with
``--require-client-cert`` it insists on one.

Run: ``python -m tests.integration.tls_upstream --port N --cert C --key K [--ca CA]``.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
from typing import Any, cast

from shoal.codec.http2 import DataReceived, H2Connection, RequestReceived


def _describe(ssl_object: Any, protocol: str, path: str) -> bytes:
    cert = ssl_object.getpeercert() or {}
    uris = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
    sni = getattr(ssl_object, "seen_sni", None)
    alpn = ssl_object.selected_alpn_protocol()
    client = uris[0] if uris else "-"
    return f"{protocol} sni={sni or '-'} alpn={alpn or '-'} client={client} path={path}".encode()


class _Server(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.ssl_object: Any = None
        self.h2: H2Connection | None = None
        self.buffer = b""
        self.paths: dict[int, str] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.ssl_object = transport.get_extra_info("ssl_object")
        if self.ssl_object.selected_alpn_protocol() == "h2":
            self.h2 = H2Connection(False)
            self.transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.h2 is not None:
            self._h2(data)
            return
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            self.buffer = rest  # the tests send no request bodies
            path = head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
            body = _describe(self.ssl_object, "HTTP/1.1", path)
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
                % (len(body), body)
            )

    def _h2(self, data: bytes) -> None:
        codec = self.h2
        assert codec is not None and self.transport is not None
        for event in codec.receive_data(data):
            if isinstance(event, RequestReceived):
                self.paths[event.stream_id] = dict(event.headers)[b":path"].decode()
                if event.end_stream:
                    self._respond(event.stream_id)
            elif isinstance(event, DataReceived):
                codec.acknowledge_received_data(len(event.data), event.stream_id)
                if event.end_stream:
                    self._respond(event.stream_id)
        self.transport.write(codec.data_to_send())

    def _respond(self, stream_id: int) -> None:
        codec = self.h2
        assert codec is not None
        body = _describe(self.ssl_object, "HTTP/2", self.paths.pop(stream_id))
        codec.send_headers(
            stream_id,
            [
                (b":status", b"200"),
                (b"content-type", b"text/plain"),
                (b"content-length", b"%d" % len(body)),
            ],
        )
        codec.send_data(stream_id, body, end_stream=True)


def _remember_sni(ssl_object: Any, server_name: str | None, _: ssl.SSLContext) -> None:
    ssl_object.seen_sni = server_name


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca")
    parser.add_argument("--require-client-cert", action="store_true")
    args = parser.parse_args()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    context.set_alpn_protocols(["h2", "http/1.1"])
    if args.ca:
        context.load_verify_locations(args.ca)
        context.verify_mode = ssl.CERT_REQUIRED if args.require_client_cert else ssl.CERT_OPTIONAL
    context.sni_callback = _remember_sni
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Server, "127.0.0.1", args.port, ssl=context)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
