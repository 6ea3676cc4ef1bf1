"""The contract every RPC codec implements (MOSN's x-protocol, sans-IO).

A codec turns bytes into :class:`RpcFrame` objects and back, and knows its protocol's
own conventions: how a connection starts (``match``), how requests are told apart on a
shared connection (the request id, and whether the protocol multiplexes at all), what a
heartbeat and its answer look like, and how to say "no upstream", "timeout", "rate
limited" or "circuit open" in the protocol's own status codes (``local_reply``).

The proxy never re-encodes a frame it forwards: it keeps ``raw`` and only patches the
request id in place (``set_request_id``), so bodies pass through untouched, byte for byte.

Adding a protocol is one module that defines an :class:`RpcCodec` subclass and one entry
in :mod:`shoal.codec.rpc.registry` (see docs/protocols.md).
"""

from __future__ import annotations

from enum import Enum
from typing import ClassVar

from mypy_extensions import mypyc_attr

from shoal.errors import RemoteProtocolError

DEFAULT_MAX_FRAME_BYTES = 8 * 1024 * 1024  # Dubbo's default payload limit
ERROR_CONTEXT = 64  # bytes of a bad frame kept for error_reply (headers are shorter)


class Match(Enum):
    """What the first bytes of a connection say about a protocol."""

    MATCH = "match"
    NEED_MORE = "need_more"
    NO = "no"


class RpcErrorKind(Enum):
    """Why the proxy answers a request itself; each codec maps these to its status codes."""

    NO_ROUTE = "no_route"  # no route or cluster for the service/method
    NO_HEALTHY_UPSTREAM = "no_healthy_upstream"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"  # connect failure or connection reset
    TIMEOUT = "timeout"
    RATE_LIMITED = "rate_limited"
    CIRCUIT_OPEN = "circuit_open"  # error-rate breaker or overflow of a threshold
    BAD_REQUEST = "bad_request"  # the request could be framed but not understood


class RpcProtocolError(RemoteProtocolError):
    """The peer sent bytes that are not a valid frame of the protocol; the connection
    cannot continue (a reply is sent first when the protocol has one, see ``error_reply``).

    A decoder sets ``frames`` to the good frames it decoded before the bad one in the same
    ``feed``, and ``at`` to the first bytes of the bad one (at most ``ERROR_CONTEXT``), so
    that nothing before the error is lost and ``error_reply`` can read its request id."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=400)
        self.frames: list[RpcFrame] = []
        self.at = b""

    def located(self, frames: list[RpcFrame], at: bytes | bytearray) -> RpcProtocolError:
        self.frames = frames
        self.at = bytes(at[:ERROR_CONTEXT])
        return self


class RpcFrame:
    """One decoded request or response.

    ``raw`` is the complete frame as it came off the wire. Routing fields (``service``,
    ``method``, ``version``, ``group``, ``headers``) are filled for requests; ``status``
    (protocol-native) and ``ok`` for responses. ``headers`` holds the protocol's string
    key/values (Dubbo attachments, Bolt header map, Motan2 metadata); non-string values
    are left out. ``timeout`` is the protocol's own per-request timeout in seconds, if the
    frame carries one. ``payload`` is what follows the routing fields (arguments,
    content or body), opaque to the proxy.
    """

    __slots__ = (
        "group",
        "headers",
        "heartbeat",
        "is_request",
        "method",
        "ok",
        "oneway",
        "payload",
        "raw",
        "request_id",
        "service",
        "status",
        "timeout",
        "version",
    )

    def __init__(
        self,
        *,
        is_request: bool,
        request_id: int,
        raw: bytes = b"",
        heartbeat: bool = False,
        oneway: bool = False,
        service: str = "",
        method: str = "",
        version: str = "",
        group: str = "",
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        status: int = 0,
        ok: bool = True,
        payload: bytes = b"",
    ) -> None:
        self.is_request = is_request
        self.request_id = request_id
        self.raw = raw
        self.heartbeat = heartbeat
        self.oneway = oneway
        self.service = service
        self.method = method
        self.version = version
        self.group = group
        self.headers = headers if headers is not None else {}
        self.timeout = timeout
        self.status = status
        self.ok = ok
        self.payload = payload

    def __repr__(self) -> str:
        kind = "request" if self.is_request else "response"
        what = "heartbeat" if self.heartbeat else f"{self.service}/{self.method}"
        return f"<RpcFrame {kind} id={self.request_id} {what} status={self.status}>"


# RpcFrame's fields, for code that walks them (a compiled class has no __slots__ to read)
FRAME_FIELDS = (
    "group",
    "headers",
    "heartbeat",
    "is_request",
    "method",
    "ok",
    "oneway",
    "payload",
    "raw",
    "request_id",
    "service",
    "status",
    "timeout",
    "version",
)


@mypyc_attr(allow_interpreted_subclasses=True)  # compiled, yet a new protocol need not be
class FrameDecoder:
    """Per-connection, stateful: ``feed`` bytes, get the complete frames so far.

    Implementations must never allocate from a length field before checking it against
    ``max_frame_bytes`` (which counts the whole frame, header included), and must raise
    only :class:`RpcProtocolError` on bad input, :meth:`~RpcProtocolError.located` at the
    bad frame. A decoder that raised is not fed again: the connection closes.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes

    def feed(self, data: bytes) -> list[RpcFrame]:
        raise NotImplementedError


@mypyc_attr(allow_interpreted_subclasses=True)
class RpcCodec:
    """One RPC protocol. Stateless: decoders carry the per-connection state.

    ``multiplexed``: many requests share a connection, matched by request id (the pool
    rewrites ids); otherwise one request at a time per connection (ping-pong).
    ``magic``: the bytes every frame of the protocol starts with, for documentation and
    detection.
    """

    name: ClassVar[str]
    multiplexed: ClassVar[bool] = True
    magic: ClassVar[bytes]

    def match(self, data: bytes) -> Match:
        """Whether a connection that starts with ``data`` speaks this protocol."""
        if len(data) < len(self.magic):
            return Match.NEED_MORE if self.magic.startswith(data) else Match.NO
        return Match.MATCH if data.startswith(self.magic) else Match.NO

    def decoder(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> FrameDecoder:
        raise NotImplementedError

    def encode(self, frame: RpcFrame) -> bytes:
        """Build a frame from its fields (``raw`` is ignored); ``payload`` goes in as is."""
        raise NotImplementedError

    def set_request_id(self, raw: bytes, request_id: int) -> bytes:
        """``raw`` with its request id replaced; nothing else changes."""
        raise NotImplementedError

    def heartbeat(self, request_id: int) -> bytes:
        """A heartbeat request, for keeping idle upstream connections alive."""
        raise NotImplementedError

    def heartbeat_reply(self, request: RpcFrame) -> bytes:
        """The answer to a heartbeat request, sent by the proxy itself."""
        raise NotImplementedError

    def local_reply(self, request: RpcFrame, kind: RpcErrorKind, message: str) -> bytes:
        """An error response to ``request`` in the protocol's own terms."""
        raise NotImplementedError

    def error_reply(self, data: bytes, message: str) -> bytes | None:
        """What to send before closing a connection whose bytes could not be decoded
        (``data``: the first bytes of the bad frame), or None when the protocol has nothing
        to say (no request id to answer)."""
        return None
