"""TLS termination for listeners (a filter chain's ``transport_socket``).

A TLS listener's socket is served with one *front* ``ssl.SSLContext`` for its whole life
(reloads keep the socket, as for plaintext listeners). The front context has no
certificate: its SNI callback, which OpenSSL runs for every ClientHello (with or without a
server name), switches the connection to the context of the chain that the listener's
*current* config picks for that name (:class:`TlsListenerContext`). That context carries
the chain's certificate, ALPN protocols and trusted CA, so a reload that rotates a
certificate takes effect for the next handshake. What OpenSSL settles before the SNI
callback (the protocol versions and whether a client certificate is asked for) is set on
the front context at each reload; the config check makes every chain of a listener agree
on it.

After the handshake, :class:`TlsAccept` (the protocol asyncio gives the connection) checks
the client certificate (required, subject alt names) and hands the connection to the
chain's session: for an HTTP connection manager with ``codec_type: AUTO``, ALPN ``h2``
picks HTTP/2 and ``http/1.1`` (or ``http/1.0``) HTTP/1.1; without ALPN the first bytes
decide, as on plaintext. Nothing here runs for plaintext listeners.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, cast

from shoal.config.model import TlsContext
from shoal.config.tls import configure_server, set_versions, verify_mode
from shoal.transport.tls import san_matches

# Envoy's listener_filters_timeout spirit: a client that does not finish its handshake
HANDSHAKE_TIMEOUT = 15.0

MakeSession = Callable[[Any, str | None], asyncio.Protocol]


class ChainSSLContext(ssl.SSLContext):
    """A filter chain's server context, knowing the chain it serves."""

    target: Any  # the chain's listener context (HTTP, TCP or RPC)
    tls: TlsContext


def chain_context(tls: TlsContext, target: object) -> ChainSSLContext:
    context = ChainSSLContext(ssl.PROTOCOL_TLS_SERVER)
    configure_server(context, tls, tls.alpn_protocols)
    context.target = target
    context.tls = tls
    return context


class TlsStats:
    """``listener.<name>.ssl.*`` counters (Envoy's names), shared by a listener's versions."""

    __slots__ = ("fail_verify_no_cert", "fail_verify_san", "handshake")

    def __init__(self) -> None:
        self.handshake = 0
        self.fail_verify_no_cert = 0
        self.fail_verify_san = 0

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class TlsListenerContext:
    """One config version of a TLS listener: each chain's SSL context, by server name."""

    __slots__ = ("by_name", "default", "draining", "stats", "wildcards")

    def __init__(
        self, default: ChainSSLContext, named: dict[str, ChainSSLContext], stats: TlsStats
    ) -> None:
        self.default = default
        self.by_name = {k: v for k, v in named.items() if not k.startswith("*.")}
        # "*.example.com" stored as ".example.com"
        self.wildcards = {k[1:]: v for k, v in named.items() if k.startswith("*.")}
        self.stats = stats
        self.draining = False

    def select(self, server_name: str | None) -> ChainSSLContext:
        """Envoy's order: the exact name, then wildcards from the longest suffix."""
        if not server_name:
            return self.default
        name = server_name.lower()
        found = self.by_name.get(name)
        if found is not None:
            return found
        if self.wildcards:
            dot = name.find(".", 1)
            while 0 < dot < len(name) - 1:
                found = self.wildcards.get(name[dot:])
                if found is not None:
                    return found
                dot = name.find(".", dot + 1)
        return self.default

    def contexts(self) -> list[Any]:
        """The chains' listener contexts, each once."""
        seen: dict[int, Any] = {}
        for chain in (self.default, *self.by_name.values(), *self.wildcards.values()):
            seen.setdefault(id(chain.target), chain.target)
        return list(seen.values())

    @property
    def connections(self) -> set[Any]:
        return set().union(*(c.connections for c in self.contexts()))

    def configure_front(self, front: ssl.SSLContext) -> None:
        """What OpenSSL decides before the SNI callback, from this version's config."""
        tls = self.default.tls
        set_versions(front, tls)
        front.verify_mode = verify_mode(tls)


def front_context(current: Callable[[], object]) -> ssl.SSLContext:
    """The context a TLS listener's socket is served with; ``current`` returns the
    listener's live context (a :class:`TlsListenerContext`)."""
    front = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    def pick(ssl_object: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        context = current()
        if isinstance(context, TlsListenerContext):
            ssl_object.context = context.select(server_name)

    front.sni_callback = pick
    return front


class TlsAccept(asyncio.Protocol):
    """A TLS connection whose handshake just finished: check the client, pick the session."""

    __slots__ = ("make_session", "stats")

    def __init__(self, make_session: MakeSession, stats: TlsStats) -> None:
        self.make_session = make_session
        self.stats = stats

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = cast(asyncio.Transport, transport)
        stats = self.stats
        ssl_object = tcp.get_extra_info("ssl_object")
        chain = ssl_object.context if ssl_object is not None else None
        if not isinstance(chain, ChainSSLContext):
            tcp.close()
            return
        tls = chain.tls
        if tls.trusted_ca:
            cert = ssl_object.getpeercert()
            if not cert and tls.require_client_certificate:
                # OpenSSL refuses these itself; this covers a handshake begun before a
                # reload changed the listener's settings
                stats.fail_verify_no_cert += 1
                tcp.close()
                return
            if cert and not san_matches(tls.subject_alt_names, cert):
                stats.fail_verify_san += 1
                tcp.close()
                return
        stats.handshake += 1
        session = self.make_session(chain.target, ssl_object.selected_alpn_protocol())
        tcp.set_protocol(session)
        session.connection_made(tcp)

    def data_received(self, data: bytes) -> None:  # never: the session has the connection
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        pass
