"""TLS to upstreams (a cluster's ``transport_socket``) and the certificate checks both sides
share.

:class:`UpstreamTls` is built once per cluster config: the ``ssl.SSLContext`` it connects
with (ALPN ``h2`` for an HTTP/2 cluster and ``http/1.1`` otherwise, unless the config names
protocols), the SNI it sends and the subject alt names the server's certificate must show.
:meth:`UpstreamTls.connect` opens a connection for a pool's protocol: the handshake (and
the name check) completes before the protocol sees the connection, so a pool never writes
a request to a server it should not trust. Plaintext clusters have no ``UpstreamTls`` and
connect exactly as before.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from typing import Any, cast

from shoal.config.model import SanMatcher, TlsContext
from shoal.config.tls import client_context, upstream_alpn

# getpeercert()'s subjectAltName kinds → SanMatcher.san_type
_SAN_KINDS = {"DNS": "dns", "URI": "uri", "IP Address": "ip_address", "email": "email"}


def dns_name_match(name: str, pattern: str) -> bool:
    """Whether certificate SAN ``pattern`` (maybe ``*.example.com``) covers ``name``: the
    wildcard stands for exactly one label, as in Envoy."""
    name, pattern = name.lower(), pattern.lower()
    if name == pattern:
        return True
    if pattern.startswith("*."):
        head, dot, rest = name.partition(".")
        return bool(head and dot) and rest == pattern[2:]
    return False


def san_matches(matchers: tuple[SanMatcher, ...], cert: dict[str, Any] | None) -> bool:
    """Whether a verified peer certificate (``SSLObject.getpeercert()``) has a subject alt
    name one of ``matchers`` accepts; no matchers accept any certificate."""
    if not matchers:
        return True
    if not cert:
        return False
    for kind, raw in cert.get("subjectAltName", ()):
        san_type = _SAN_KINDS.get(kind)
        if san_type is None:
            continue
        value = str(raw).strip()
        if san_type == "ip_address":
            try:
                value = str(ipaddress.ip_address(value))
            except ValueError:
                continue
        for matcher in matchers:
            if matcher.san_type != san_type:
                continue
            match = matcher.match
            if san_type == "dns" and match.kind == "exact" and not match.ignore_case:
                if dns_name_match(match.value, value):
                    return True
            elif match.matches(value):
                return True
    return False


def peer_problem(tls: TlsContext, ssl_object: ssl.SSLObject | None) -> str:
    """Why a finished handshake's peer is not acceptable ("" when it is)."""
    if ssl_object is None:
        return "no TLS session"
    if tls.subject_alt_names and not san_matches(tls.subject_alt_names, ssl_object.getpeercert()):
        return "the peer certificate's subject alt names match none expected"
    return ""


class _Handshake(asyncio.Protocol):
    """Holds a connection from the end of its handshake until it is handed to the pool's
    protocol, keeping what arrives meanwhile (a server may speak first)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received: list[bytes] = []
        self.eof = False
        self.lost = False
        self.error: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received.append(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost, self.error = True, exc

    def hand_over(self, protocol: asyncio.Protocol) -> None:
        transport = self.transport
        assert transport is not None
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        for data in self.received:
            protocol.data_received(data)
        if self.eof:
            protocol.eof_received()
        if self.lost:
            protocol.connection_lost(self.error)


class UpstreamTls:
    """A cluster's TLS: contexts built once per cluster config."""

    __slots__ = ("_http1", "config", "context", "http2", "server_hostname")

    def __init__(self, config: TlsContext, http2: bool) -> None:
        self.config = config
        self.http2 = http2
        self.context = client_context(config, upstream_alpn(config, http2))
        self._http1: ssl.SSLContext | None = None
        # "" makes asyncio send no SNI (it would otherwise send the host, as a browser does)
        self.server_hostname = config.sni

    def http1_context(self) -> ssl.SSLContext:
        """The context for HTTP/1.1 health checks (ALPN ``http/1.1`` on any cluster)."""
        if not self.http2 and not self.config.alpn_protocols:
            return self.context
        if self._http1 is None:
            self._http1 = client_context(self.config, ("http/1.1",))
        return self._http1

    async def connect(self, protocol: asyncio.Protocol, host: str, port: int) -> None:
        """Open a TLS connection for ``protocol``; raises ``OSError`` (``ssl.SSLError`` for a
        failed handshake or an unacceptable certificate) as a plaintext connect does."""
        loop = asyncio.get_running_loop()
        transport, handshake = await loop.create_connection(
            _Handshake, host, port, ssl=self.context, server_hostname=self.server_hostname
        )
        problem = peer_problem(self.config, transport.get_extra_info("ssl_object"))
        if problem:
            transport.abort()
            raise ssl.SSLCertVerificationError(1, problem)
        handshake.hand_over(protocol)

    async def open_connection(
        self, host: str, port: int, *, http1: bool = False
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Streams over TLS (health checks), the peer checked as :meth:`connect` does."""
        reader, writer = await asyncio.open_connection(
            host,
            port,
            ssl=self.http1_context() if http1 else self.context,
            server_hostname=self.server_hostname,
        )
        problem = peer_problem(self.config, writer.get_extra_info("ssl_object"))
        if problem:
            writer.transport.abort()
            raise ssl.SSLCertVerificationError(1, problem)
        return reader, writer
