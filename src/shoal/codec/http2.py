"""HTTP/2 (RFC 9113) connection state machine for both ends: bytes in, events out.

Sans-IO like :mod:`shoal.codec.http1`: the caller feeds received bytes to
:meth:`H2Connection.receive_data`, acts on the events it returns, calls ``send_*`` and
writes :meth:`H2Connection.data_to_send` to the socket. The API follows python-hyper's
``h2`` (same method and event names) so it reads familiarly, but it is built for the
proxy's hot path: plain classes, one flat frame loop, our own HPACK
(:mod:`shoal.codec.h2.hpack`) and no per-frame objects beyond the events themselves.

**Errors never escape ``receive_data``.** Whatever the peer sends, the codec answers in
protocol terms and reports it as an event, so the hot path needs no ``try``:

- a *connection* error queues GOAWAY (with the error code, the last stream we processed
  and a short reason as debug data) and returns :class:`ConnectionTerminated` with
  ``remote=False``; the connection is then dead: later input is ignored, ``send_*`` raise.
  The caller flushes ``data_to_send()`` and closes the transport.
- a *stream* error queues RST_STREAM and returns :class:`StreamReset` with
  ``remote=False``; the rest of the connection carries on. (A reset stream the application
  never saw, such as one refused for concurrency, still gets an event: ignore unknown ids.)

``send_*`` raise :class:`~shoal.errors.LocalProtocolError` subclasses when *we* would
break the protocol (a closed stream, a full flow-control window): bugs or races the caller
checks for (``local_flow_control_window``, ``StreamReset`` events), never peer input.

**Flow control.** Inbound credit is returned to the peer only when the application calls
:meth:`H2Connection.acknowledge_received_data` for bytes it has passed on, so a slow
downstream throttles the sender instead of growing buffers; WINDOW_UPDATE is sent once
half a window has been acknowledged. Outbound, ``send_data`` refuses to exceed
``local_flow_control_window(stream_id)``: the caller keeps the rest and resumes on
:class:`WindowUpdated`. A stream whose peer never opens its window (a zero-window stall) is
in :meth:`H2Connection.blocked_streams`; the codec has no clock, so the proxy arms a timer
(``loop.call_later``) for each stream it holds data for while that stream is blocked,
cancels it on ``WindowUpdated`` for the stream (or for 0, the connection), and on expiry
calls ``reset_stream(stream_id, CANCEL)`` (or ``close_connection`` when stream 0 is what
stalls).

**Attack mitigations** (thresholds are constructor arguments; the codes are what the
peer sees):

=========================  ==============================================================
attack                     answer
=========================  ==============================================================
rapid reset (CVE-2023-     more than ``max_premature_resets`` (50) of the last
44487)                     ``reset_window`` (100) peer-opened streams ended before their
                           response started, by the peer's RST_STREAM or by a stream error
                           the peer caused: GOAWAY ENHANCE_YOUR_CALM
CONTINUATION flood         header block over ``max_header_block_size`` bytes (compressed;
                           defaults to ``max_header_list_size``) or more than
                           ``max_continuation_frames`` (64) CONTINUATIONs: GOAWAY
                           ENHANCE_YOUR_CALM, nothing buffered past the cap
HPACK bomb                 decoded list over ``max_header_list_size`` (RFC 9113 §6.5.2
                           sizes): decoding stops collecting, walks the rest of the block
                           for table state only; a request is answered ``:status 431``,
                           anything else RST_STREAM CANCEL
HPACK table abuse          size update above our SETTINGS_HEADER_TABLE_SIZE, or any
                           broken encoding: GOAWAY COMPRESSION_ERROR
SETTINGS / PING / RST      more than ``max_outbound_control_frames`` (1000) replies
flood (CVE-2019-9512,      (SETTINGS ACK, PING ACK, RST_STREAM) queued and not taken by
9515, 9514)                ``data_to_send()``: GOAWAY ENHANCE_YOUR_CALM. The caller leaves
                           bytes here while its transport is paused, so this counts
                           what a peer that does not read has made us queue (Envoy's
                           max_outbound_control_frames)
empty frames (CVE-2019-    more than ``max_empty_data_frames`` (1) consecutive DATA frames
9518)                      without data or END_STREAM: GOAWAY ENHANCE_YOUR_CALM
too many streams           over our SETTINGS_MAX_CONCURRENT_STREAMS: RST REFUSED_STREAM
stream id misuse           even id from a client, decreasing id, HEADERS on a closed or
                           idle stream, frames on idle streams: GOAWAY PROTOCOL_ERROR;
                           DATA on a closed stream: RST STREAM_CLOSED (frames on a stream
                           we reset are ignored: they were in flight)
malformed messages         bad pseudo-headers, upper-case or invalid names, connection-
                           specific fields, ``te`` other than ``trailers``, content-length
                           mismatch: RST PROTOCOL_ERROR
=========================  ==============================================================

Wire format (RFC 9113 §4.1): every frame is a 9-octet header, then ``length`` octets::

    +-----------------------------------------------+
    |                 Length (24)                   |
    +---------------+---------------+---------------+
    |   Type (8)    |   Flags (8)   |
    +-+-------------+---------------+-------------------------------+
    |R|                 Stream Identifier (31)                      |
    +=+=============================================================+
    |                   Frame Payload (0...)                      ...
    +---------------------------------------------------------------+
"""

from __future__ import annotations

import struct
from typing import ClassVar, Final

from shoal.codec.h2.hpack import Decoder, Encoder, Header, HPACKError
from shoal.errors import LocalProtocolError

Headers = list[Header]

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 §6)
DATA: Final = 0x0
HEADERS: Final = 0x1
PRIORITY: Final = 0x2
RST_STREAM: Final = 0x3
SETTINGS: Final = 0x4
PUSH_PROMISE: Final = 0x5
PING: Final = 0x6
GOAWAY: Final = 0x7
WINDOW_UPDATE: Final = 0x8
CONTINUATION: Final = 0x9

# Flags
FLAG_END_STREAM: Final = 0x1
FLAG_ACK: Final = 0x1
FLAG_END_HEADERS: Final = 0x4
FLAG_PADDED: Final = 0x8
FLAG_PRIORITY: Final = 0x20

# Error codes (RFC 9113 §7)
NO_ERROR: Final = 0x0
PROTOCOL_ERROR: Final = 0x1
INTERNAL_ERROR: Final = 0x2
FLOW_CONTROL_ERROR: Final = 0x3
SETTINGS_TIMEOUT: Final = 0x4
STREAM_CLOSED: Final = 0x5
FRAME_SIZE_ERROR: Final = 0x6
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8
COMPRESSION_ERROR: Final = 0x9
CONNECT_ERROR: Final = 0xA
ENHANCE_YOUR_CALM: Final = 0xB
INADEQUATE_SECURITY: Final = 0xC
HTTP_1_1_REQUIRED: Final = 0xD

ERROR_NAMES: Final[dict[int, str]] = {
    NO_ERROR: "NO_ERROR",
    PROTOCOL_ERROR: "PROTOCOL_ERROR",
    INTERNAL_ERROR: "INTERNAL_ERROR",
    FLOW_CONTROL_ERROR: "FLOW_CONTROL_ERROR",
    SETTINGS_TIMEOUT: "SETTINGS_TIMEOUT",
    STREAM_CLOSED: "STREAM_CLOSED",
    FRAME_SIZE_ERROR: "FRAME_SIZE_ERROR",
    REFUSED_STREAM: "REFUSED_STREAM",
    CANCEL: "CANCEL",
    COMPRESSION_ERROR: "COMPRESSION_ERROR",
    CONNECT_ERROR: "CONNECT_ERROR",
    ENHANCE_YOUR_CALM: "ENHANCE_YOUR_CALM",
    INADEQUATE_SECURITY: "INADEQUATE_SECURITY",
    HTTP_1_1_REQUIRED: "HTTP_1_1_REQUIRED",
}

# Settings (RFC 9113 §6.5.2)
SETTINGS_HEADER_TABLE_SIZE: Final = 0x1
SETTINGS_ENABLE_PUSH: Final = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS: Final = 0x3
SETTINGS_INITIAL_WINDOW_SIZE: Final = 0x4
SETTINGS_MAX_FRAME_SIZE: Final = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE: Final = 0x6

DEFAULT_WINDOW: Final = 65535
MAX_WINDOW: Final = (1 << 31) - 1
MIN_FRAME_SIZE: Final = 16384
MAX_FRAME_SIZE: Final = (1 << 24) - 1
MAX_STREAM_ID: Final = (1 << 31) - 1

_FRAME_HEADER: Final = struct.Struct(">BHBBL")  # length as 8 + 16 bits, type, flags, id
_U32: Final = struct.Struct(">L")
_U32_PAIR: Final = struct.Struct(">LL")
_SETTING: Final = struct.Struct(">HL")

# Where a stream's headers stand, each way.
_NONE: Final = 0
_INFORMATIONAL: Final = 1  # 1xx seen; the final response is still to come
_FINAL: Final = 2  # request or final response; data and trailers may follow
_TRAILERS: Final = 3

# Request pseudo-headers (RFC 9113 §8.3.1) as bits, to spot duplicates and missing ones.
_METHOD: Final = 1
_SCHEME: Final = 2
_AUTHORITY: Final = 4
_PATH: Final = 8
_REQUEST_PSEUDO: Final[dict[bytes, int]] = {
    b":method": _METHOD,
    b":scheme": _SCHEME,
    b":authority": _AUTHORITY,
    b":path": _PATH,
}
# Fields that only mean something on one HTTP/1.1 hop (RFC 9113 §8.2.2).
_CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_MALFORMED: Final = -2  # from the header checks: the message is malformed
_STATUS_431: Final[Headers] = [(b":status", b"431")]
_RECENT_RESETS: Final = 128  # closed-by-reset streams remembered, to ignore their late frames


# --- errors ----------------------------------------------------------------------------------


class StreamClosedError(LocalProtocolError):
    """The stream cannot carry what we tried to send: unknown, reset, or already ended."""

    def __init__(self, stream_id: int, message: str = "stream is closed") -> None:
        super().__init__(f"stream {stream_id}: {message}")
        self.stream_id = stream_id


class FlowControlError(LocalProtocolError):
    """More data than the peer's window allows; wait for :class:`WindowUpdated`."""


class _ConnectionError(Exception):
    """Internal: unwinds frame handling to the loop, which answers with GOAWAY."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# --- events ----------------------------------------------------------------------------------


class Event:
    """Base of what ``receive_data`` returns; each kind lists its fields in ``_fields``."""

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({args})"


class RequestReceived(Event):
    """A request's headers (server side). Names are lower-case, pseudo-headers first."""

    __slots__ = ("end_stream", "headers", "stream_id")
    _fields = ("stream_id", "headers", "end_stream")

    def __init__(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.end_stream = end_stream


class ResponseReceived(Event):
    """A final response's headers (client side)."""

    __slots__ = ("end_stream", "headers", "stream_id")
    _fields = ("stream_id", "headers", "end_stream")

    def __init__(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.end_stream = end_stream


class InformationalResponseReceived(Event):
    """A 1xx response (client side); the final response follows on the same stream."""

    __slots__ = ("headers", "stream_id")
    _fields = ("stream_id", "headers")

    def __init__(self, stream_id: int, headers: Headers) -> None:
        self.stream_id = stream_id
        self.headers = headers


class TrailersReceived(Event):
    """Trailers; they always end the stream (from the peer's side)."""

    __slots__ = ("headers", "stream_id")
    _fields = ("stream_id", "headers")

    def __init__(self, stream_id: int, headers: Headers) -> None:
        self.stream_id = stream_id
        self.headers = headers


class DataReceived(Event):
    """Body bytes. Acknowledge ``len(data)`` once passed on (padding is credited here)."""

    __slots__ = ("data", "end_stream", "flow_controlled_length", "stream_id")
    _fields = ("stream_id", "data", "flow_controlled_length", "end_stream")

    def __init__(
        self, stream_id: int, data: bytes, flow_controlled_length: int, end_stream: bool
    ) -> None:
        self.stream_id = stream_id
        self.data = data
        self.flow_controlled_length = flow_controlled_length
        self.end_stream = end_stream


class StreamReset(Event):
    """A stream ended abnormally: by the peer's RST_STREAM (``remote``), by a GOAWAY that
    excluded it (``remote``, REFUSED_STREAM: safe to retry), or by us for a stream error."""

    __slots__ = ("error_code", "remote", "stream_id")
    _fields = ("stream_id", "error_code", "remote")

    def __init__(self, stream_id: int, error_code: int, remote: bool) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        self.remote = remote


class WindowUpdated(Event):
    """The peer gave more send window on ``stream_id`` (0: the connection)."""

    __slots__ = ("delta", "stream_id")
    _fields = ("stream_id", "delta")

    def __init__(self, stream_id: int, delta: int) -> None:
        self.stream_id = stream_id
        self.delta = delta


class ConnectionTerminated(Event):
    """GOAWAY: received (``remote``) or sent by us for a connection error. Streams up to
    ``last_stream_id`` may complete after a remote NO_ERROR GOAWAY; after ours for an
    error, the connection is dead."""

    __slots__ = ("additional_data", "error_code", "last_stream_id", "remote")
    _fields = ("error_code", "last_stream_id", "additional_data", "remote")

    def __init__(
        self, error_code: int, last_stream_id: int, additional_data: bytes, remote: bool
    ) -> None:
        self.error_code = error_code
        self.last_stream_id = last_stream_id
        self.additional_data = additional_data
        self.remote = remote


class PingAckReceived(Event):
    """The answer to our :meth:`H2Connection.ping` (pings from the peer are answered
    inside the codec, without an event)."""

    __slots__ = ("ping_data",)
    _fields = ("ping_data",)

    def __init__(self, ping_data: bytes) -> None:
        self.ping_data = ping_data


class SettingsAcknowledged(Event):
    """The peer applied our SETTINGS."""

    __slots__ = ()


class RemoteSettingsChanged(Event):
    """The peer's SETTINGS, applied: ``changed`` maps setting id to new value."""

    __slots__ = ("changed",)
    _fields = ("changed",)

    def __init__(self, changed: dict[int, int]) -> None:
        self.changed = changed


# --- streams ---------------------------------------------------------------------------------


class _Stream:
    """One stream's state. It is closed when both sides ended; it stays in the table
    after that only while the application still owes acknowledgements for its data."""

    __slots__ = (
        "content_length",
        "headers_in",
        "headers_out",
        "local_ended",
        "no_body",
        "pending_update",
        "received",
        "recv_window",
        "remote",
        "remote_ended",
        "send_window",
        "stream_id",
        "unacked",
    )

    def __init__(self, stream_id: int, remote: bool, send_window: int, recv_window: int) -> None:
        self.stream_id = stream_id
        self.remote = remote  # opened by the peer
        self.remote_ended = False
        self.local_ended = False
        self.headers_in = _NONE
        self.headers_out = _NONE
        self.send_window = send_window
        self.recv_window = recv_window  # what the peer may still send
        self.unacked = 0  # delivered to the application, not yet acknowledged
        self.pending_update = 0  # acknowledged, not yet returned in a WINDOW_UPDATE
        self.content_length = -1
        self.received = 0
        self.no_body = False  # a HEAD response, 204 or 304: content-length is not framing


# --- the connection --------------------------------------------------------------------------


class H2Connection:
    """One HTTP/2 connection, client or server side. See the module docstring.

    The preface (client magic, our SETTINGS, a connection WINDOW_UPDATE when the
    connection window is larger than the default) is queued by the constructor:
    ``data_to_send()`` returns it first.

    Our SETTINGS: ``max_concurrent_streams``, ``initial_window_size`` (per stream: what a
    slow reader may have buffered for it), ``max_frame_size``, ``max_header_list_size``,
    ``header_table_size``, and ENABLE_PUSH 0; ``connection_window_size`` bounds what all
    streams together may have in flight. The flood limits are described in the module
    docstring; ``max_header_block_size`` 0 means ``max_header_list_size`` (an encoded
    block longer than the decoded list limit can only decode to more than the limit).
    """

    __slots__ = (
        "_block",
        "_block_end_stream",
        "_block_frames",
        "_block_invalid",
        "_block_size",
        "_block_stream",
        "_client",
        "_closed",
        "_conn_pending",
        "_conn_unacked",
        "_conn_window",
        "_control_frames",
        "_decoder",
        "_empty_frames",
        "_encoder",
        "_goaway_received",
        "_goaway_sent_id",
        "_header_table_size",
        "_inbuf",
        "_last_remote_id",
        "_max_concurrent_streams",
        "_max_continuation_frames",
        "_max_empty_data_frames",
        "_max_frame_size",
        "_max_header_block_size",
        "_max_header_list_size",
        "_max_outbound_control_frames",
        "_max_premature_resets",
        "_need",
        "_next_stream_id",
        "_open_local",
        "_open_remote",
        "_out",
        "_outcomes",
        "_outcomes_at",
        "_peer_initial_window",
        "_peer_max_concurrent",
        "_peer_max_frame_size",
        "_peer_settings_seen",
        "_preface_left",
        "_premature",
        "_recent_resets",
        "_recv_window",
        "_send_window",
        "_settings_acks_due",
        "_stream_window",
        "_streams",
        "streams_opened",
    )

    def __init__(
        self,
        client_side: bool,
        *,
        max_concurrent_streams: int = 100,
        initial_window_size: int = 256 * 1024,
        connection_window_size: int = 1024 * 1024,
        max_frame_size: int = MIN_FRAME_SIZE,
        max_header_list_size: int = 64 * 1024,
        header_table_size: int = 4096,
        max_header_block_size: int = 0,
        max_continuation_frames: int = 64,
        max_outbound_control_frames: int = 1000,
        max_empty_data_frames: int = 1,
        reset_window: int = 100,
        max_premature_resets: int = 50,
    ) -> None:
        if not MIN_FRAME_SIZE <= max_frame_size <= MAX_FRAME_SIZE:
            raise ValueError("max_frame_size must be within 2^14 .. 2^24-1")
        if not 0 < initial_window_size <= MAX_WINDOW:
            raise ValueError("initial_window_size must be within 1 .. 2^31-1")
        if not DEFAULT_WINDOW <= connection_window_size <= MAX_WINDOW:
            raise ValueError("connection_window_size must be within 65535 .. 2^31-1")
        if reset_window < 1:
            raise ValueError("reset_window must be positive")
        self._client = client_side
        self._closed = False
        self._out = bytearray()
        self._inbuf = bytearray()
        self._need = 0  # bytes _inbuf must hold before the next frame can be parsed
        self._preface_left = b"" if client_side else PREFACE
        self._peer_settings_seen = False
        self._streams: dict[int, _Stream] = {}
        self._next_stream_id = 1 if client_side else 2
        self._last_remote_id = 0
        self._open_local = 0
        self._open_remote = 0
        self.streams_opened = 0  # by the peer, over the connection's life (for stats)
        self._goaway_received = False
        self._goaway_sent_id = -1  # last_stream_id of the GOAWAY we sent; -1: none yet
        # Our settings: what we accept.
        self._max_concurrent_streams = max_concurrent_streams
        self._stream_window = initial_window_size
        self._max_frame_size = max_frame_size
        self._max_header_list_size = max_header_list_size
        self._header_table_size = header_table_size
        self._max_header_block_size = max_header_block_size or max_header_list_size
        self._max_continuation_frames = max_continuation_frames
        self._max_outbound_control_frames = max_outbound_control_frames
        self._max_empty_data_frames = max_empty_data_frames
        self._max_premature_resets = max_premature_resets
        # The peer's settings: what we may send. Defaults until its SETTINGS arrive.
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_max_frame_size = MIN_FRAME_SIZE
        self._peer_max_concurrent = MAX_STREAM_ID
        # Connection windows: send is the peer's credit to us; recv what the peer may send.
        self._send_window = DEFAULT_WINDOW
        self._recv_window = connection_window_size
        self._conn_window = connection_window_size
        self._conn_unacked = 0
        self._conn_pending = 0
        # The header block being assembled from HEADERS + CONTINUATION (stream 0: none).
        self._block_stream = 0
        self._block: list[bytes] = []
        self._block_size = 0
        self._block_frames = 0
        self._block_end_stream = False
        self._block_invalid = False  # e.g. the HEADERS named its own stream as a dependency
        # HPACK. Until our SETTINGS are acknowledged the peer may use the default 4096.
        self._decoder = Decoder(max(header_table_size, 4096))
        self._encoder = Encoder()
        self._settings_acks_due = 1
        # Flood accounting.
        self._control_frames = 0  # replies queued since the last data_to_send()
        self._empty_frames = 0
        self._outcomes = bytearray(reset_window)  # ring: 1 = the stream ended prematurely
        self._outcomes_at = 0
        self._premature = 0
        self._recent_resets: dict[int, None] = {}  # insertion-ordered, bounded

        if client_side:
            self._out += PREFACE
        payload = _SETTING.pack(SETTINGS_HEADER_TABLE_SIZE, header_table_size)
        payload += _SETTING.pack(SETTINGS_ENABLE_PUSH, 0)
        payload += _SETTING.pack(SETTINGS_MAX_CONCURRENT_STREAMS, max_concurrent_streams)
        payload += _SETTING.pack(SETTINGS_INITIAL_WINDOW_SIZE, initial_window_size)
        payload += _SETTING.pack(SETTINGS_MAX_FRAME_SIZE, max_frame_size)
        payload += _SETTING.pack(SETTINGS_MAX_HEADER_LIST_SIZE, max_header_list_size)
        self._frame(SETTINGS, 0, 0, payload)
        if connection_window_size > DEFAULT_WINDOW:
            self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(connection_window_size - DEFAULT_WINDOW))

    # --- queries ---------------------------------------------------------------------------

    @property
    def client_side(self) -> bool:
        return self._client

    @property
    def closed(self) -> bool:
        """True once a connection error (ours or the peer's GOAWAY with an error) ended it."""
        return self._closed

    @property
    def open_streams(self) -> int:
        """Streams not yet closed, both directions (a graceful drain ends at 0)."""
        return self._open_local + self._open_remote

    @property
    def open_outbound_streams(self) -> int:
        return self._open_local

    @property
    def open_inbound_streams(self) -> int:
        return self._open_remote

    @property
    def remote_max_concurrent_streams(self) -> int:
        return self._peer_max_concurrent

    @property
    def max_outbound_frame_size(self) -> int:
        return self._peer_max_frame_size

    @property
    def last_stream_id(self) -> int:
        """The highest stream id the peer opened (what a GOAWAY from us would carry)."""
        return self._last_remote_id

    @property
    def goaway_received(self) -> bool:
        """The peer sent GOAWAY: open no new streams on this connection."""
        return self._goaway_received

    @property
    def outbound_buffer_size(self) -> int:
        return len(self._out)

    def local_flow_control_window(self, stream_id: int) -> int:
        """How many DATA bytes ``send_data`` accepts now on ``stream_id``."""
        stream = self._sendable(stream_id)
        return min(stream.send_window, self._send_window)

    def blocked_streams(self) -> list[int]:
        """Streams that still may send but have no window (stream's or connection's): the
        candidates for a zero-window stall timer."""
        conn_blocked = self._send_window <= 0
        return [
            stream.stream_id
            for stream in self._streams.values()
            if not stream.local_ended
            and stream.headers_out >= _FINAL
            and (conn_blocked or stream.send_window <= 0)
        ]

    def get_next_available_stream_id(self) -> int:
        if not self._client:
            raise LocalProtocolError("a server does not open streams (push is disabled)")
        if self._next_stream_id > MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted: open a new connection")
        return self._next_stream_id

    def data_to_send(self) -> bytes:
        """Everything queued for the wire, emptying the queue.

        Leave the bytes here while the transport is paused for writing: the flood limit
        counts the replies queued since the last call.
        """
        self._control_frames = 0
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    # --- sending ---------------------------------------------------------------------------

    def _frame(self, frame_type: int, flags: int, stream_id: int, payload: bytes) -> None:
        size = len(payload)
        self._out += _FRAME_HEADER.pack(size >> 16, size & 0xFFFF, frame_type, flags, stream_id)
        self._out += payload

    def _header_frames(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        """HEADERS, split into CONTINUATION frames when the block exceeds a frame."""
        limit = self._peer_max_frame_size
        flags = FLAG_END_STREAM if end_stream else 0
        if len(block) <= limit:
            self._frame(HEADERS, flags | FLAG_END_HEADERS, stream_id, block)
            return
        self._frame(HEADERS, flags, stream_id, block[:limit])
        for start in range(limit, len(block), limit):
            last = start + limit >= len(block)
            chunk = block[start : start + limit]
            self._frame(CONTINUATION, FLAG_END_HEADERS if last else 0, stream_id, chunk)

    def _check_open(self) -> None:
        if self._closed:
            raise LocalProtocolError("the connection is closed")

    def _sendable(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_ended:
            raise StreamClosedError(stream_id)
        return stream

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> None:
        """Send a request (client, opening the stream), a response (server; 1xx first if
        any), or trailers (after the final headers; must end the stream).

        Header lists go out as given: the caller sends lower-case names with
        pseudo-headers first and no connection-specific fields (the proxy strips
        hop-by-hop headers when it translates a message).
        """
        self._check_open()
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._open_stream(stream_id, headers)
        elif stream.local_ended:
            raise StreamClosedError(stream_id)
        elif stream.headers_out >= _FINAL:
            if not end_stream:
                raise LocalProtocolError("trailers must end the stream")
            stream.headers_out = _TRAILERS
        else:  # a server's response to a request
            informational = _status_of(headers).startswith(b"1")
            if informational and end_stream:
                raise LocalProtocolError("a 1xx response cannot end the stream")
            stream.headers_out = _INFORMATIONAL if informational else _FINAL
        self._header_frames(stream_id, self._encoder.encode(headers), end_stream)
        if end_stream:
            self._end_local(stream)

    def _open_stream(self, stream_id: int, headers: Headers) -> _Stream:
        if not self._client:
            raise StreamClosedError(stream_id, "no request on this stream")
        if stream_id < self._next_stream_id or not stream_id & 1 or stream_id > MAX_STREAM_ID:
            raise LocalProtocolError(f"stream id {stream_id} is not a new client stream id")
        if self._goaway_received:
            raise LocalProtocolError("the peer sent GOAWAY: no new streams")
        if self._open_local >= self._peer_max_concurrent:
            raise LocalProtocolError("the peer's SETTINGS_MAX_CONCURRENT_STREAMS is reached")
        stream = _Stream(stream_id, False, self._peer_initial_window, self._stream_window)
        stream.headers_out = _FINAL
        for name, value in headers:
            if name == b":method":
                stream.no_body = value == b"HEAD"
                break
        self._streams[stream_id] = stream
        self._next_stream_id = stream_id + 2
        self._open_local += 1
        return stream

    def send_trailers(self, stream_id: int, headers: Headers) -> None:
        self.send_headers(stream_id, headers, end_stream=True)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Send body bytes, split into frames of the peer's max frame size. Raises
        :class:`FlowControlError` when ``data`` is larger than
        ``local_flow_control_window(stream_id)``."""
        self._check_open()
        stream = self._sendable(stream_id)
        if stream.headers_out < _FINAL:
            raise LocalProtocolError("data before the headers")
        size = len(data)
        if size > stream.send_window or size > self._send_window:
            raise FlowControlError(
                f"{size} bytes exceed the window "
                f"({min(stream.send_window, self._send_window)}) on stream {stream_id}"
            )
        if not size and not end_stream:
            return  # an empty frame says nothing, and peers count them as a flood
        stream.send_window -= size
        self._send_window -= size
        flags = FLAG_END_STREAM if end_stream else 0
        limit = self._peer_max_frame_size
        if size <= limit:
            self._frame(DATA, flags, stream_id, data)
        else:
            view = memoryview(data)
            for start in range(0, size, limit):
                last = start + limit >= size
                chunk = bytes(view[start : start + limit])
                self._frame(DATA, flags if last else 0, stream_id, chunk)
        if end_stream:
            self._end_local(stream)

    def end_stream(self, stream_id: int) -> None:
        """End our side with an empty DATA frame."""
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, error_code: int = NO_ERROR) -> None:
        """RST_STREAM. Resetting a stream that is already closed does nothing (it may have
        ended in the same batch of events)."""
        if self._closed:
            return
        stream = self._streams.get(stream_id)
        if stream is None or (stream.local_ended and stream.remote_ended):
            if self._idle(stream_id):
                raise LocalProtocolError(f"stream {stream_id} is idle")
            return
        self._frame(RST_STREAM, 0, stream_id, _U32.pack(error_code))
        self._discard(stream, premature=False)

    def ping(self, data: bytes = b"\0" * 8) -> None:
        if len(data) != 8:
            raise LocalProtocolError("PING data is 8 bytes")
        self._check_open()
        self._frame(PING, 0, 0, data)

    def close_connection(
        self,
        error_code: int = NO_ERROR,
        last_stream_id: int = -1,
        additional_data: bytes = b"",
    ) -> None:
        """GOAWAY. With NO_ERROR this starts a graceful drain: streams the peer opens past
        ``last_stream_id`` (default: the last one it opened) are ignored, open ones finish;
        close the transport when ``open_streams`` reaches 0. Call again with a lower id to
        tighten it (the two-GOAWAY shutdown). Any other code ends the connection now. A
        dead connection ignores the call."""
        if self._closed:
            return
        if last_stream_id < 0:
            last_stream_id = self._last_remote_id
        self._goaway_sent_id = last_stream_id
        self._frame(GOAWAY, 0, 0, _U32_PAIR.pack(last_stream_id, error_code) + additional_data)
        if error_code != NO_ERROR:
            self._closed = True

    def acknowledge_received_data(self, size: int, stream_id: int) -> None:
        """The application passed ``size`` bytes of ``stream_id`` on: return them to the
        peer's windows (batched: WINDOW_UPDATE once half a window is due). Amounts beyond
        what was delivered are ignored, and so are acknowledgements for reset streams (the
        codec released their credit when they were reset)."""
        if self._closed or size <= 0:
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        size = min(size, stream.unacked)
        stream.unacked -= size
        self._conn_unacked -= size
        self._credit(size)
        if stream.remote_ended:
            if stream.local_ended and not stream.unacked:
                del self._streams[stream_id]
            return
        self._credit_stream(stream, size)

    # --- stream lifecycle ------------------------------------------------------------------

    def _idle(self, stream_id: int) -> bool:
        if (stream_id & 1) == int(self._client):  # our parity: client odd, server even
            return stream_id >= self._next_stream_id
        return stream_id > self._last_remote_id

    def _end_local(self, stream: _Stream) -> None:
        stream.local_ended = True
        if stream.remote_ended:
            self._close(stream)

    def _end_remote(self, stream: _Stream) -> None:
        stream.remote_ended = True
        if stream.local_ended:
            self._close(stream)

    def _close(self, stream: _Stream) -> None:
        """Both sides ended. The stream leaves the table once its data is acknowledged."""
        if stream.remote:
            self._open_remote -= 1
            self._record_outcome(premature=False)
        else:
            self._open_local -= 1
        if not stream.unacked:
            del self._streams[stream.stream_id]

    def _discard(self, stream: _Stream, premature: bool) -> None:
        """Forget a reset stream: credit its unacknowledged bytes back to the connection,
        and remember its id so frames still in flight are ignored."""
        if not (stream.local_ended and stream.remote_ended):
            if stream.remote:
                self._open_remote -= 1
                self._record_outcome(premature)
            else:
                self._open_local -= 1
        stream.local_ended = stream.remote_ended = True
        if stream.unacked:
            self._credit(stream.unacked)
            self._conn_unacked -= stream.unacked
            stream.unacked = 0
        del self._streams[stream.stream_id]
        self._remember_reset(stream.stream_id)

    def _ignored(self, stream_id: int) -> bool:
        """Frames on a (non-idle) stream we reset, or on one the peer opened after our
        GOAWAY, are dropped: they were in flight."""
        return stream_id in self._recent_resets or 0 <= self._goaway_sent_id < stream_id

    def _remember_reset(self, stream_id: int) -> None:
        resets = self._recent_resets
        resets[stream_id] = None
        if len(resets) > _RECENT_RESETS:
            del resets[next(iter(resets))]

    def _credit(self, size: int) -> None:
        """Return connection credit: acknowledged bytes, and bytes the application never
        sees (padding, data on reset or closed streams)."""
        self._conn_pending += size
        if self._conn_pending >= self._conn_window >> 1:
            self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._conn_pending))
            self._recv_window += self._conn_pending
            self._conn_pending = 0

    def _credit_stream(self, stream: _Stream, size: int) -> None:
        stream.pending_update += size
        if stream.pending_update >= self._stream_window >> 1:
            self._frame(WINDOW_UPDATE, 0, stream.stream_id, _U32.pack(stream.pending_update))
            stream.recv_window += stream.pending_update
            stream.pending_update = 0

    def _record_outcome(self, premature: bool) -> None:
        """Slide the rapid-reset window over the peer's last ``reset_window`` streams."""
        outcomes = self._outcomes
        at = self._outcomes_at
        self._premature += premature - outcomes[at]
        outcomes[at] = premature
        self._outcomes_at = (at + 1) % len(outcomes)
        if self._premature > self._max_premature_resets:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "too many streams reset early")

    def _control_frame(self) -> None:
        self._control_frames += 1
        if self._control_frames > self._max_outbound_control_frames:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "peer does not read its replies")

    def _stream_error(self, stream_id: int, code: int, events: list[Event]) -> None:
        """RST_STREAM for a broken stream and tell the application."""
        self._frame(RST_STREAM, 0, stream_id, _U32.pack(code))
        events.append(StreamReset(stream_id, code, False))
        stream = self._streams.get(stream_id)
        if stream is not None:
            # before the response started: it counts against the rapid-reset budget
            self._discard(stream, premature=stream.headers_out < _FINAL)
        else:
            self._remember_reset(stream_id)
        self._control_frame()

    # --- receiving -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Parse ``data`` (any split of the byte stream) and return the events, in order."""
        events: list[Event] = []
        if self._closed:
            return events
        if self._preface_left:
            size = min(len(data), len(self._preface_left))
            if data[:size] != self._preface_left[:size]:
                self._fail(PROTOCOL_ERROR, "invalid connection preface", events)
                return events
            self._preface_left = self._preface_left[size:]
            data = data[size:]
        if self._inbuf:
            self._inbuf += data
            if len(self._inbuf) < self._need:
                return events
            data = bytes(self._inbuf)
            self._inbuf.clear()
        end = len(data)
        pos = 0
        try:
            while end - pos >= 9:
                hi, lo, frame_type, flags, stream_id = _FRAME_HEADER.unpack_from(data, pos)
                length = (hi << 16) | lo
                if length > self._max_frame_size:
                    raise _ConnectionError(FRAME_SIZE_ERROR, "frame larger than max_frame_size")
                start = pos + 9
                stop = start + length
                if stop > end:
                    break
                pos = stop
                self._on_frame(
                    frame_type, flags, stream_id & MAX_STREAM_ID, data[start:stop], events
                )
        except _ConnectionError as error:
            self._fail(error.code, error.reason, events)
            return events
        if pos < end:
            self._inbuf += data[pos:]
            if end - pos >= 9:
                self._need = 9 + ((data[pos] << 16) | (data[pos + 1] << 8) | data[pos + 2])
            else:
                self._need = 9
        return events

    def _fail(self, code: int, reason: str, events: list[Event]) -> None:
        """A connection error: GOAWAY, then ignore everything the peer sends."""
        debug = reason.encode()
        self._frame(GOAWAY, 0, 0, _U32_PAIR.pack(self._last_remote_id, code) + debug)
        self._closed = True
        self._inbuf.clear()
        events.append(ConnectionTerminated(code, self._last_remote_id, debug, False))

    def _on_frame(
        self, frame_type: int, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        if self._block_stream:
            if frame_type != CONTINUATION:
                raise _ConnectionError(PROTOCOL_ERROR, "header block interrupted")
            self._on_continuation(flags, stream_id, payload, events)
            return
        if not self._peer_settings_seen:
            if frame_type != SETTINGS or flags & FLAG_ACK:
                raise _ConnectionError(PROTOCOL_ERROR, "the preface must start with SETTINGS")
            self._peer_settings_seen = True
        if frame_type == DATA:
            self._on_data(flags, stream_id, payload, events)
        elif frame_type == HEADERS:
            self._on_headers(flags, stream_id, payload, events)
        elif frame_type == WINDOW_UPDATE:
            self._on_window_update(stream_id, payload, events)
        elif frame_type == RST_STREAM:
            self._on_rst_stream(stream_id, payload, events)
        elif frame_type == SETTINGS:
            self._on_settings(flags, stream_id, payload, events)
        elif frame_type == PING:
            self._on_ping(flags, stream_id, payload, events)
        elif frame_type == GOAWAY:
            self._on_goaway(stream_id, payload, events)
        elif frame_type == PRIORITY:
            self._on_priority(stream_id, payload, events)
        elif frame_type == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR, "PUSH_PROMISE with push disabled")
        elif frame_type == CONTINUATION:
            raise _ConnectionError(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        # other types are extensions we do not know: ignored (RFC 9113 §4.1)

    def _on_data(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if not stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        length = len(payload)
        if length > self._recv_window:
            raise _ConnectionError(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self._recv_window -= length
        data = payload
        if flags & FLAG_PADDED:
            if not length or payload[0] >= length:
                raise _ConnectionError(PROTOCOL_ERROR, "padding longer than the frame")
            data = payload[1 : length - payload[0]]
        end_stream = bool(flags & FLAG_END_STREAM)
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_ended:
            if stream is None and self._idle(stream_id):
                raise _ConnectionError(PROTOCOL_ERROR, "DATA on an idle stream")
            self._credit(length)
            if not self._ignored(stream_id):
                self._stream_error(stream_id, STREAM_CLOSED, events)
            return
        if stream.headers_in != _FINAL:
            self._credit(length)
            self._stream_error(stream_id, PROTOCOL_ERROR, events)
            return
        if length > stream.recv_window:
            self._credit(length)
            self._stream_error(stream_id, FLOW_CONTROL_ERROR, events)
            return
        stream.recv_window -= length
        size = len(data)
        if size < length:  # padding: nobody downstream holds it, credit it now
            self._credit(length - size)
            self._credit_stream(stream, length - size)
        if size:
            self._empty_frames = 0
            stream.received += size
        elif not end_stream:
            self._empty_frames += 1
            if self._empty_frames > self._max_empty_data_frames:
                raise _ConnectionError(ENHANCE_YOUR_CALM, "too many empty DATA frames")
        if (0 <= stream.content_length < stream.received and not stream.no_body) or (
            end_stream and not self._length_ok(stream)
        ):
            self._credit(size)
            self._stream_error(stream_id, PROTOCOL_ERROR, events)
            return
        stream.unacked += size
        self._conn_unacked += size
        events.append(DataReceived(stream_id, data, length, end_stream))
        if end_stream:
            self._end_remote(stream)

    @staticmethod
    def _length_ok(stream: _Stream) -> bool:
        return (
            stream.content_length < 0
            or stream.no_body
            or (stream.received == stream.content_length)
        )

    def _on_headers(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if not stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on stream 0")
        self._empty_frames = 0
        start = 0
        stop = len(payload)
        if flags & FLAG_PADDED:
            if not stop:
                raise _ConnectionError(FRAME_SIZE_ERROR, "HEADERS too short")
            start = 1
            stop -= payload[0]
        invalid = False
        if flags & FLAG_PRIORITY:
            if stop - start < 5:
                raise _ConnectionError(FRAME_SIZE_ERROR, "HEADERS too short for priority")
            invalid = (_U32.unpack_from(payload, start)[0] & MAX_STREAM_ID) == stream_id
            start += 5
        if stop < start:
            raise _ConnectionError(PROTOCOL_ERROR, "padding longer than the frame")
        fragment = payload if (start == 0 and stop == len(payload)) else payload[start:stop]
        if len(fragment) > self._max_header_block_size:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "header block too large")
        end_stream = bool(flags & FLAG_END_STREAM)
        if flags & FLAG_END_HEADERS:
            self._on_header_block(stream_id, fragment, end_stream, invalid, events)
            return
        self._block_stream = stream_id
        self._block = [fragment]
        self._block_size = len(fragment)
        self._block_frames = 0
        self._block_end_stream = end_stream
        self._block_invalid = invalid

    def _on_continuation(
        self, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        if stream_id != self._block_stream:
            raise _ConnectionError(PROTOCOL_ERROR, "CONTINUATION on another stream")
        self._block_frames += 1
        self._block_size += len(payload)
        if self._block_frames > self._max_continuation_frames:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "too many CONTINUATION frames")
        if self._block_size > self._max_header_block_size:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "header block too large")
        self._block.append(payload)
        if flags & FLAG_END_HEADERS:
            block = b"".join(self._block)
            self._block = []
            self._block_stream = 0
            self._on_header_block(
                stream_id, block, self._block_end_stream, self._block_invalid, events
            )

    def _on_header_block(
        self, stream_id: int, block: bytes, end_stream: bool, invalid: bool, events: list[Event]
    ) -> None:
        """A complete header block: decode it (always: HPACK state is per connection), then
        open a stream, or deliver a response, 1xx or trailers."""
        decoder = self._decoder
        try:
            headers = decoder.decode(block, self._max_header_list_size)
        except HPACKError as error:
            raise _ConnectionError(COMPRESSION_ERROR, str(error)) from None
        invalid = invalid or decoder.invalid
        stream = self._streams.get(stream_id)
        if stream is None:
            if not self._client and stream_id & 1 and stream_id > self._last_remote_id:
                self._open_remote_stream(stream_id, headers, end_stream, invalid, events)
                return
            if not self._idle(stream_id) and self._ignored(stream_id):
                return
            # An idle stream the peer may not open (an even id from a client, any id from a
            # server), or a lower id than the last one: a reused id is PROTOCOL_ERROR
            # (RFC 9113 §5.1.1), and a closed stream cannot be told from one.
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on a closed or idle stream")
        if stream.remote_ended:
            self._stream_error(stream_id, STREAM_CLOSED, events)
        elif decoder.oversized:
            self._stream_error(stream_id, CANCEL, events)
        elif invalid:
            self._stream_error(stream_id, PROTOCOL_ERROR, events)
        elif stream.headers_in == _FINAL:
            if not end_stream or not _trailers_ok(headers) or not self._length_ok(stream):
                self._stream_error(stream_id, PROTOCOL_ERROR, events)
                return
            stream.headers_in = _TRAILERS
            events.append(TrailersReceived(stream_id, headers))
            self._end_remote(stream)
        else:  # client side: a response to our request
            status = _response_status(headers)
            if status < 0 or (status < 200 and end_stream):
                self._stream_error(stream_id, PROTOCOL_ERROR, events)
            elif status < 200:
                stream.headers_in = _INFORMATIONAL
                events.append(InformationalResponseReceived(stream_id, headers))
            else:
                content_length = _content_length(headers)
                if content_length == _MALFORMED:
                    self._stream_error(stream_id, PROTOCOL_ERROR, events)
                    return
                stream.headers_in = _FINAL
                stream.content_length = content_length
                if status in (204, 304):
                    stream.no_body = True
                if end_stream and not self._length_ok(stream):
                    self._stream_error(stream_id, PROTOCOL_ERROR, events)
                    return
                events.append(ResponseReceived(stream_id, headers, end_stream))
                if end_stream:
                    self._end_remote(stream)

    def _open_remote_stream(
        self,
        stream_id: int,
        headers: Headers,
        end_stream: bool,
        invalid: bool,
        events: list[Event],
    ) -> None:
        """A request on a new stream (server side)."""
        self._last_remote_id = stream_id
        if 0 <= self._goaway_sent_id < stream_id:
            return  # after our GOAWAY: ignored, the peer retries elsewhere
        self.streams_opened += 1
        if self._open_remote >= self._max_concurrent_streams:
            self._stream_error(stream_id, REFUSED_STREAM, events)
            self._record_outcome(premature=True)
            return
        if self._decoder.oversized:
            self._refuse_large_request(stream_id, end_stream)
            return
        content_length = _MALFORMED if invalid else _request_content_length(headers)
        if content_length == _MALFORMED:
            self._stream_error(stream_id, PROTOCOL_ERROR, events)
            self._record_outcome(premature=True)
            return
        stream = _Stream(stream_id, True, self._peer_initial_window, self._stream_window)
        stream.headers_in = _FINAL
        stream.content_length = content_length
        self._streams[stream_id] = stream
        self._open_remote += 1
        if end_stream and not self._length_ok(stream):
            self._stream_error(stream_id, PROTOCOL_ERROR, events)
            return
        events.append(RequestReceived(stream_id, headers, end_stream))
        if end_stream:
            stream.remote_ended = True

    def _refuse_large_request(self, stream_id: int, end_stream: bool) -> None:
        """Request headers over max_header_list_size: answer 431 (RFC 9113 §10.5.1) and stop
        the upload, without the application ever seeing the request."""
        self._header_frames(stream_id, self._encoder.encode(_STATUS_431), True)
        if not end_stream:
            self._frame(RST_STREAM, 0, stream_id, _U32.pack(NO_ERROR))
        self._remember_reset(stream_id)
        self._record_outcome(premature=True)
        self._control_frame()

    def _on_rst_stream(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if not stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "RST_STREAM is 4 bytes")
        stream = self._streams.get(stream_id)
        if stream is None:
            if self._idle(stream_id):
                raise _ConnectionError(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            return
        if stream.local_ended and stream.remote_ended:
            return  # closed, kept only for acknowledgements
        code = _U32.unpack(payload)[0]
        events.append(StreamReset(stream_id, code, True))
        self._discard(stream, premature=stream.remote and stream.headers_out < _FINAL)

    def _on_window_update(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "WINDOW_UPDATE is 4 bytes")
        increment = _U32.unpack(payload)[0] & MAX_WINDOW
        if not stream_id:
            if not increment:
                raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            events.append(WindowUpdated(0, increment))
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            if self._idle(stream_id):
                raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return
        if stream.local_ended:
            return  # nothing more to send on it
        if not increment:
            self._stream_error(stream_id, PROTOCOL_ERROR, events)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._stream_error(stream_id, FLOW_CONTROL_ERROR, events)
            return
        events.append(WindowUpdated(stream_id, increment))

    def _on_settings(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & FLAG_ACK:
            if payload:
                raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            if not self._settings_acks_due:
                raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS ACK we did not ask for")
            self._settings_acks_due -= 1
            self._decoder.set_settings_max(self._header_table_size)
            events.append(SettingsAcknowledged())
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        changed: dict[int, int] = {}
        for offset in range(0, len(payload), 6):
            setting, value = _SETTING.unpack_from(payload, offset)
            if setting == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "initial window above 2^31-1")
                self._apply_initial_window(value, events)
            elif setting == SETTINGS_MAX_FRAME_SIZE:
                if not MIN_FRAME_SIZE <= value <= MAX_FRAME_SIZE:
                    raise _ConnectionError(PROTOCOL_ERROR, "max frame size out of range")
                self._peer_max_frame_size = value
            elif setting == SETTINGS_HEADER_TABLE_SIZE:
                self._encoder.set_max_table_size(value)
            elif setting == SETTINGS_MAX_CONCURRENT_STREAMS:
                self._peer_max_concurrent = value
            elif setting == SETTINGS_ENABLE_PUSH and (value > 1 or (value and self._client)):
                raise _ConnectionError(PROTOCOL_ERROR, "invalid ENABLE_PUSH")
            changed[setting] = value
        self._frame(SETTINGS, FLAG_ACK, 0, b"")
        self._control_frame()
        events.append(RemoteSettingsChanged(changed))

    def _apply_initial_window(self, value: int, events: list[Event]) -> None:
        """RFC 9113 §6.9.2: a new initial window shifts every stream's send window."""
        delta = value - self._peer_initial_window
        self._peer_initial_window = value
        if not delta:
            return
        for stream in self._streams.values():
            stream.send_window += delta
            if stream.send_window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "stream window above 2^31-1")
            if delta > 0 and not stream.local_ended:
                events.append(WindowUpdated(stream.stream_id, delta))

    def _on_ping(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise _ConnectionError(FRAME_SIZE_ERROR, "PING is 8 bytes")
        if flags & FLAG_ACK:
            events.append(PingAckReceived(payload))
            return
        self._frame(PING, FLAG_ACK, 0, payload)
        self._control_frame()

    def _on_goaway(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise _ConnectionError(FRAME_SIZE_ERROR, "GOAWAY too short")
        last_stream_id, code = _U32_PAIR.unpack_from(payload)
        last_stream_id &= MAX_STREAM_ID
        self._goaway_received = True
        events.append(ConnectionTerminated(code, last_stream_id, payload[8:], True))
        # Our streams past last_stream_id were never processed: safe to retry elsewhere.
        for stream in list(self._streams.values()):
            if not stream.remote and stream.stream_id > last_stream_id:
                if not (stream.local_ended and stream.remote_ended):
                    events.append(StreamReset(stream.stream_id, REFUSED_STREAM, True))
                self._discard(stream, premature=False)

    def _on_priority(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        """PRIORITY is deprecated (RFC 9113 §5.3.2); only its framing rules apply."""
        if not stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            raise _ConnectionError(FRAME_SIZE_ERROR, "PRIORITY is 5 bytes")
        if (_U32.unpack_from(payload)[0] & MAX_STREAM_ID) == stream_id:
            if self._idle(stream_id):
                raise _ConnectionError(PROTOCOL_ERROR, "stream depends on itself")
            if not self._ignored(stream_id):
                self._stream_error(stream_id, PROTOCOL_ERROR, events)


# --- message checks (RFC 9113 §8) ------------------------------------------------------------


def _status_of(headers: Headers) -> bytes:
    for name, value in headers:
        if name == b":status":
            return value
    return b""


def _content_length(headers: Headers) -> int:
    """The content-length of a field section (-1: none), or _MALFORMED."""
    result = -1
    for name, value in headers:
        if name == b"content-length":
            if not value.isdigit() or (result >= 0 and int(value) != result):
                return _MALFORMED
            result = int(value)
    return result


def _request_content_length(headers: Headers) -> int:
    """Check a request's field section (RFC 9113 §8.3.1, §8.2.2); return its content-length
    (-1: none), or _MALFORMED."""
    seen = 0
    regular = False
    path = b""
    method = b""
    content_length = -1
    for name, value in headers:
        if name[0] == 0x3A:  # ':'
            bit = _REQUEST_PSEUDO.get(name, 0)
            if regular or not bit or seen & bit:
                return _MALFORMED
            seen |= bit
            if bit == _METHOD:
                method = value
            elif bit == _PATH:
                path = value
            continue
        regular = True
        if name in _CONNECTION_SPECIFIC:
            return _MALFORMED
        if name == b"te":
            if value != b"trailers":
                return _MALFORMED
        elif name == b"content-length":
            if not value.isdigit() or (content_length >= 0 and int(value) != content_length):
                return _MALFORMED
            content_length = int(value)
    if method == b"CONNECT":  # §8.5: only :method and :authority
        return content_length if seen == _METHOD | _AUTHORITY else _MALFORMED
    if seen & (_METHOD | _SCHEME | _PATH) != _METHOD | _SCHEME | _PATH or not path:
        return _MALFORMED
    return content_length


def _response_status(headers: Headers) -> int:
    """Check a response's field section; return its status, or -1 when malformed (a 101
    included: HTTP/2 has no protocol switch)."""
    status = -1
    regular = False
    for name, value in headers:
        if name[0] == 0x3A:
            if regular or name != b":status" or status >= 0:
                return -1
            if len(value) != 3 or not value.isdigit():
                return -1
            status = int(value)
            continue
        regular = True
        if name in _CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
            return -1
    if status < 100 or status == 101:
        return -1
    return status


def _trailers_ok(headers: Headers) -> bool:
    for name, value in headers:
        if name[0] == 0x3A or name in _CONNECTION_SPECIFIC:
            return False
        if name == b"te" and value != b"trailers":
            return False
    return True
