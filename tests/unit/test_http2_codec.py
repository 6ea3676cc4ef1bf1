"""The sans-IO HTTP/2 codec against hand-built frames: every rule of RFC 9113 it enforces,
the error code each break earns, and the attack mitigations.

The peer's frames are built here byte by byte and its header blocks with the ``hpack``
package (an independent implementation); what the codec sends is parsed back the same way.
The behaviours follow h2's own test suite (test_basic_logic, test_invalid_headers,
test_flow_control_window, test_closed_streams, test_settings, ...), checked against this
codec's API. Whole exchanges are also fed one byte at a time and must give the same events.
"""

from __future__ import annotations

import struct
from typing import Any

import hpack
import pytest

from shoal.codec import http2 as h2c
from shoal.codec.http2 import (
    CANCEL,
    COMPRESSION_ERROR,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    NO_ERROR,
    PREFACE,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    STREAM_CLOSED,
    ConnectionTerminated,
    DataReceived,
    Event,
    FlowControlError,
    H2Connection,
    InformationalResponseReceived,
    PingAckReceived,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    SettingsAcknowledged,
    StreamClosedError,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from shoal.errors import LocalProtocolError

DATA, HEADERS, PRIORITY, RST, SETTINGS, PUSH, PING, GOAWAY, WINDOW, CONT = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIO = 0x1, 0x1, 0x4, 0x8, 0x20

GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]
POST = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"a"), (b":path", b"/u")]
OK = [(b":status", b"200")]


# --- wire helpers --------------------------------------------------------------------------------


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    size = len(payload)
    return struct.pack(">BHBBL", size >> 16, size & 0xFFFF, ftype, flags, stream_id) + payload


def settings(**values: int) -> bytes:
    ids = {"header_table_size": 1, "enable_push": 2, "max_concurrent_streams": 3}
    ids |= {"initial_window_size": 4, "max_frame_size": 5, "max_header_list_size": 6}
    payload = b"".join(struct.pack(">HL", ids[name], value) for name, value in values.items())
    return frame(SETTINGS, 0, 0, payload)


def u32(value: int) -> bytes:
    return struct.pack(">L", value)


def parse(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Frames (type, flags, stream id, payload) in ``data``; it must hold whole frames."""
    frames = []
    pos = 0
    while pos < len(data):
        hi, lo, ftype, flags, stream_id = struct.unpack_from(">BHBBL", data, pos)
        size = (hi << 16) | lo
        frames.append((ftype, flags, stream_id, data[pos + 9 : pos + 9 + size]))
        pos += 9 + size
    assert pos == len(data)
    return frames


class Peer:
    """The other end, speaking raw frames; decodes what the codec sends."""

    def __init__(self) -> None:
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()

    def headers(
        self,
        stream_id: int,
        headers: list[tuple[bytes, bytes]],
        end_stream: bool = True,
        flags: int = 0,
        prefix: bytes = b"",
    ) -> bytes:
        block = self.encoder.encode(headers)
        flags |= END_HEADERS | (END_STREAM if end_stream else 0)
        return frame(HEADERS, flags, stream_id, prefix + block)

    def read(self, conn: H2Connection) -> list[tuple[int, int, int, Any]]:
        """The codec's output; HEADERS payloads decoded, RST/GOAWAY reduced to codes."""
        out: list[tuple[int, int, int, Any]] = []
        for ftype, flags, stream_id, payload in parse(conn.data_to_send()):
            value: Any = payload
            if ftype == HEADERS:
                value = [tuple(h) for h in self.decoder.decode(payload, raw=True)]
            elif ftype == RST:
                value = struct.unpack(">L", payload)[0]
            elif ftype == GOAWAY:
                value = struct.unpack_from(">LL", payload)
            out.append((ftype, flags, stream_id, value))
        return out


def server(**options: Any) -> tuple[H2Connection, Peer]:
    """A server past the preface (ours and the client's, both acknowledged)."""
    conn = H2Connection(False, **options)
    conn.receive_data(PREFACE + settings() + frame(SETTINGS, ACK, 0))
    conn.data_to_send()
    return conn, Peer()


def client(**options: Any) -> tuple[H2Connection, Peer]:
    conn = H2Connection(True, **options)
    conn.receive_data(settings() + frame(SETTINGS, ACK, 0))
    conn.data_to_send()
    return conn, Peer()


def kinds(events: list[Event]) -> list[str]:
    return [type(event).__name__ for event in events]


def goaway_code(events: list[Event]) -> int:
    """The code of the GOAWAY we sent for a connection error (the event must be last)."""
    last = events[-1]
    assert isinstance(last, ConnectionTerminated), events
    assert not last.remote
    return last.error_code


def sent_goaway(conn: H2Connection, peer: Peer) -> int:
    frames = [f for f in peer.read(conn) if f[0] == GOAWAY]
    assert len(frames) == 1
    return int(frames[0][3][1])


def reset_code(events: list[Event], stream_id: int) -> int:
    resets = [e for e in events if isinstance(e, StreamReset) and e.stream_id == stream_id]
    assert len(resets) == 1, events
    assert not resets[0].remote
    return resets[0].error_code


# --- preface and settings ------------------------------------------------------------------------


def test_server_sends_settings_then_acknowledges_the_clients() -> None:
    conn = H2Connection(False, max_concurrent_streams=7, initial_window_size=1000)
    sent = parse(conn.data_to_send())
    assert sent[0][:3] == (SETTINGS, 0, 0)
    ours = dict(struct.iter_unpack(">HL", sent[0][3]))
    assert ours == {1: 4096, 2: 0, 3: 7, 4: 1000, 5: 16384, 6: 65536}
    assert sent[1][:3] == (WINDOW, 0, 0)  # the connection window raised to 1 MiB
    assert struct.unpack(">L", sent[1][3])[0] == 1024 * 1024 - 65535
    events = conn.receive_data(PREFACE + settings(max_concurrent_streams=5))
    assert kinds(events) == ["RemoteSettingsChanged"]
    assert isinstance(events[0], RemoteSettingsChanged)
    assert events[0].changed == {3: 5}
    assert parse(conn.data_to_send()) == [(SETTINGS, ACK, 0, b"")]
    assert kinds(conn.receive_data(frame(SETTINGS, ACK, 0))) == ["SettingsAcknowledged"]


def test_client_preface_starts_with_the_magic() -> None:
    conn = H2Connection(True)
    data = conn.data_to_send()
    assert data.startswith(PREFACE)
    assert parse(data[len(PREFACE) :])[0][0] == SETTINGS


def test_preface_split_anywhere() -> None:
    conn = H2Connection(False)
    data = PREFACE + settings() + Peer().headers(1, GET)
    events: list[Event] = []
    for i in range(len(data)):
        events += conn.receive_data(data[i : i + 1])
    assert kinds(events) == ["RemoteSettingsChanged", "RequestReceived"]


@pytest.mark.parametrize(
    "data",
    [b"GET / HTTP/1.1\r\n\r\n", PREFACE[:10] + b"X", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\r"],
)
def test_invalid_preface_is_a_protocol_error(data: bytes) -> None:
    conn = H2Connection(False)
    conn.data_to_send()
    events = conn.receive_data(data)
    assert goaway_code(events) == PROTOCOL_ERROR
    assert conn.closed
    assert conn.receive_data(PREFACE + settings()) == []  # dead: input ignored


@pytest.mark.parametrize("client_side", [False, True])
def test_first_frame_must_be_settings(client_side: bool) -> None:
    conn = H2Connection(client_side)
    preface = b"" if client_side else PREFACE
    events = conn.receive_data(preface + frame(PING, 0, 0, b"12345678"))
    assert goaway_code(events) == PROTOCOL_ERROR


def test_settings_ack_we_did_not_ask_for() -> None:
    conn, _ = server()
    assert goaway_code(conn.receive_data(frame(SETTINGS, ACK, 0))) == PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (settings(enable_push=2), PROTOCOL_ERROR),
        (settings(max_frame_size=16383), PROTOCOL_ERROR),
        (settings(max_frame_size=1 << 24), PROTOCOL_ERROR),
        (settings(initial_window_size=1 << 31), FLOW_CONTROL_ERROR),
        (frame(SETTINGS, 0, 0, b"\0\1\0\0\0"), FRAME_SIZE_ERROR),
        (frame(SETTINGS, 0, 1, b""), PROTOCOL_ERROR),
        (frame(SETTINGS, ACK, 0, b"\0" * 6), FRAME_SIZE_ERROR),
    ],
)
def test_invalid_settings(data: bytes, code: int) -> None:
    conn, _ = server()
    assert goaway_code(conn.receive_data(data)) == code


def test_unknown_settings_are_ignored() -> None:
    conn, _ = server()
    events = conn.receive_data(frame(SETTINGS, 0, 0, struct.pack(">HL", 0x99, 7)))
    assert kinds(events) == ["RemoteSettingsChanged"]


def test_client_refuses_push_enabled_by_a_server() -> None:
    conn = H2Connection(True)
    assert goaway_code(conn.receive_data(settings(enable_push=1))) == PROTOCOL_ERROR


def test_peer_initial_window_change_moves_open_streams() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, GET))
    conn.send_headers(1, OK)
    assert conn.local_flow_control_window(1) == 65535
    events = conn.receive_data(settings(initial_window_size=100_000))
    assert kinds(events) == ["WindowUpdated", "RemoteSettingsChanged"]
    assert conn.local_flow_control_window(1) == 65535  # the connection window still limits
    conn.receive_data(frame(WINDOW, 0, 0, u32(1_000_000)))
    assert conn.local_flow_control_window(1) == 100_000
    conn.receive_data(settings(initial_window_size=10))
    assert conn.local_flow_control_window(1) == 10


def test_initial_window_change_overflowing_a_stream_is_a_flow_control_error() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, GET))
    conn.send_headers(1, OK)
    conn.receive_data(frame(WINDOW, 0, 1, u32((1 << 31) - 1 - 65535)))
    events = conn.receive_data(settings(initial_window_size=65536))
    assert goaway_code(events) == FLOW_CONTROL_ERROR


def test_peer_header_table_size_zero_turns_indexing_off() -> None:
    conn, peer = server()
    conn.receive_data(settings(header_table_size=0) + peer.headers(1, GET))
    conn.data_to_send()
    conn.send_headers(1, [(b":status", b"200"), (b"x-a", b"b")], end_stream=True)
    ((_, _, _, block),) = parse(conn.data_to_send())
    # a size update to 0 first (001 00000), :status 200 from the static table, then x-a as
    # a literal without indexing (0000 0000): nothing may enter a 0-byte table
    assert block[:3] == b"\x20\x88\x00"
    peer.decoder.header_table_size = 0
    assert peer.decoder.decode(block, raw=True) == [(b":status", b"200"), (b"x-a", b"b")]


def test_peer_max_frame_size_lets_us_send_bigger_frames() -> None:
    conn, peer = server()
    conn.receive_data(settings(max_frame_size=40000, initial_window_size=100_000))
    conn.receive_data(frame(WINDOW, 0, 0, u32(100_000)) + peer.headers(1, GET))
    conn.send_headers(1, OK)
    conn.send_data(1, b"x" * 50000, end_stream=True)
    sizes = [len(f[3]) for f in peer.read(conn) if f[0] == DATA]
    assert sizes == [40000, 10000]


# --- requests, responses, frames -----------------------------------------------------------------


def test_request_and_response() -> None:
    conn, peer = server()
    events = conn.receive_data(peer.headers(1, [*GET, (b"user-agent", b"t")]))
    assert len(events) == 1
    request = events[0]
    assert isinstance(request, RequestReceived)
    assert (request.stream_id, request.end_stream) == (1, True)
    assert request.headers == [*GET, (b"user-agent", b"t")]
    conn.send_headers(1, [*OK, (b"content-length", b"2")])
    conn.send_data(1, b"hi", end_stream=True)
    assert peer.read(conn) == [
        (HEADERS, END_HEADERS, 1, [(b":status", b"200"), (b"content-length", b"2")]),
        (DATA, END_STREAM, 1, b"hi"),
    ]
    assert conn.open_streams == 0


def test_request_with_body_and_trailers() -> None:
    conn, peer = server()
    data = peer.headers(1, POST, end_stream=False) + frame(DATA, 0, 1, b"abc")
    data += peer.headers(1, [(b"x-checksum", b"1")], end_stream=True)
    events = conn.receive_data(data)
    assert kinds(events) == ["RequestReceived", "DataReceived", "TrailersReceived"]
    assert isinstance(events[1], DataReceived)
    assert (events[1].data, events[1].end_stream) == (b"abc", False)
    assert isinstance(events[2], TrailersReceived)
    assert events[2].headers == [(b"x-checksum", b"1")]


def test_response_trailers_and_informational_responses_client_side() -> None:
    conn, peer = client()
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(stream_id, GET, end_stream=True)
    data = peer.headers(1, [(b":status", b"100")], end_stream=False)
    data += peer.headers(1, [(b":status", b"103"), (b"link", b"</a>")], end_stream=False)
    data += peer.headers(1, OK, end_stream=False) + frame(DATA, 0, 1, b"body")
    data += peer.headers(1, [(b"grpc-status", b"0")], end_stream=True)
    events = conn.receive_data(data)
    assert kinds(events) == [
        "InformationalResponseReceived",
        "InformationalResponseReceived",
        "ResponseReceived",
        "DataReceived",
        "TrailersReceived",
    ]
    assert isinstance(events[1], InformationalResponseReceived)
    assert events[1].headers == [(b":status", b"103"), (b"link", b"</a>")]
    assert conn.open_streams == 0


def test_server_sends_informational_then_final_then_trailers() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, POST, end_stream=False))
    conn.send_headers(1, [(b":status", b"100")])
    conn.send_headers(1, OK)
    conn.send_data(1, b"x")
    conn.send_trailers(1, [(b"grpc-status", b"0")])
    sent = peer.read(conn)
    assert [(f[0], f[1]) for f in sent] == [
        (HEADERS, END_HEADERS),
        (HEADERS, END_HEADERS),
        (DATA, 0),
        (HEADERS, END_HEADERS | END_STREAM),
    ]
    with pytest.raises(StreamClosedError):
        conn.send_data(1, b"late")


def test_padded_data_and_headers_with_priority() -> None:
    conn, peer = server()
    block = peer.encoder.encode(POST)
    prefix = bytes([3]) + u32(0) + b"\x10"  # pad length 3, depends on 0, weight 16
    events = conn.receive_data(
        frame(HEADERS, PADDED | PRIO | END_HEADERS, 1, prefix + block + b"\0\0\0")
    )
    assert kinds(events) == ["RequestReceived"]
    events = conn.receive_data(frame(DATA, PADDED | END_STREAM, 1, b"\x05hello\0\0\0\0\0"))
    (data,) = events
    assert isinstance(data, DataReceived)
    assert (data.data, data.flow_controlled_length, data.end_stream) == (b"hello", 11, True)


@pytest.mark.parametrize(
    "data",
    [
        frame(DATA, PADDED, 1, b"\x05abc"),
        frame(DATA, PADDED, 1, b""),
        frame(HEADERS, PADDED | END_HEADERS, 3, b"\x09abc"),
    ],
)
def test_padding_longer_than_the_frame(data: bytes) -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, POST, end_stream=False))
    assert goaway_code(conn.receive_data(data)) == PROTOCOL_ERROR


def test_priority_frames_are_ignored_but_checked() -> None:
    conn, peer = server()
    assert conn.receive_data(frame(PRIORITY, 0, 3, u32(1) + b"\x10")) == []  # idle is fine
    conn.receive_data(peer.headers(1, POST, end_stream=False))
    events = conn.receive_data(frame(PRIORITY, 0, 1, u32(1) + b"\x10"))  # depends on itself
    assert reset_code(events, 1) == PROTOCOL_ERROR
    assert goaway_code(conn.receive_data(frame(PRIORITY, 0, 5, b"1234"))) == FRAME_SIZE_ERROR


def test_headers_depending_on_their_own_stream() -> None:
    conn, peer = server()
    events = conn.receive_data(peer.headers(1, GET, flags=PRIO, prefix=u32(1) + b"\x10"))
    assert reset_code(events, 1) == PROTOCOL_ERROR


def test_ping_is_answered_and_our_ping_acknowledged() -> None:
    conn, peer = server()
    assert conn.receive_data(frame(PING, 0, 0, b"abcdefgh")) == []
    assert peer.read(conn) == [(PING, ACK, 0, b"abcdefgh")]
    conn.ping(b"12345678")
    assert peer.read(conn) == [(PING, 0, 0, b"12345678")]
    (ack,) = conn.receive_data(frame(PING, ACK, 0, b"12345678"))
    assert isinstance(ack, PingAckReceived)
    assert ack.ping_data == b"12345678"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(PING, 0, 0, b"short"), FRAME_SIZE_ERROR),
        (frame(PING, 0, 1, b"12345678"), PROTOCOL_ERROR),
        (frame(WINDOW, 0, 0, b"123"), FRAME_SIZE_ERROR),
        (frame(WINDOW, 0, 0, u32(0)), PROTOCOL_ERROR),
        (frame(RST, 0, 0, u32(0)), PROTOCOL_ERROR),
        (frame(RST, 0, 1, b"12345"), FRAME_SIZE_ERROR),
        (frame(GOAWAY, 0, 0, b"1234"), FRAME_SIZE_ERROR),
        (frame(GOAWAY, 0, 1, u32(0) + u32(0)), PROTOCOL_ERROR),
        (frame(PRIORITY, 0, 0, u32(0) + b"\0"), PROTOCOL_ERROR),
        (frame(DATA, 0, 0, b"x"), PROTOCOL_ERROR),
        (frame(HEADERS, END_HEADERS, 0, b"\x82"), PROTOCOL_ERROR),
        (frame(CONT, END_HEADERS, 1, b"\x82"), PROTOCOL_ERROR),
        (frame(PUSH, END_HEADERS, 1, u32(2) + b"\x82"), PROTOCOL_ERROR),
        (frame(DATA, 0, 1, b"x" * 16385), FRAME_SIZE_ERROR),
    ],
)
def test_frame_rules(data: bytes, code: int) -> None:
    conn, _ = server()
    assert goaway_code(conn.receive_data(data)) == code


def test_unknown_frame_types_are_ignored() -> None:
    conn, peer = server()
    assert conn.receive_data(frame(0x42, 0xFF, 1, b"whatever")) == []
    assert kinds(conn.receive_data(peer.headers(1, GET))) == ["RequestReceived"]


def test_continuation_frames_assemble_one_block() -> None:
    conn, peer = server()
    block = peer.encoder.encode([*GET, (b"x-long", b"v" * 100)])
    data = frame(HEADERS, END_STREAM, 1, block[:5]) + frame(CONT, 0, 1, block[5:20])
    data += frame(CONT, END_HEADERS, 1, block[20:])
    (request,) = conn.receive_data(data)
    assert isinstance(request, RequestReceived)
    assert request.headers[-1] == (b"x-long", b"v" * 100)
    assert request.end_stream


@pytest.mark.parametrize(
    "interruption",
    [frame(PING, 0, 0, b"12345678"), frame(CONT, END_HEADERS, 3, b""), frame(0x42, 0, 0)],
)
def test_header_block_must_not_be_interrupted(interruption: bytes) -> None:
    conn, peer = server()
    block = peer.encoder.encode(GET)
    events = conn.receive_data(frame(HEADERS, END_STREAM, 1, block[:2]) + interruption)
    assert goaway_code(events) == PROTOCOL_ERROR


def test_large_response_headers_are_sent_with_continuation() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, GET))
    big = [*OK, (b"x-big", b"y" * 40000)]
    conn.send_headers(1, big, end_stream=True)
    sent = parse(conn.data_to_send())
    assert [(f[0], f[1]) for f in sent] == [
        (HEADERS, END_STREAM),
        (CONT, 0),
        (CONT, END_HEADERS),
    ]
    block = b"".join(f[3] for f in sent)
    assert [tuple(h) for h in peer.decoder.decode(block, raw=True)] == big


def test_client_rejects_push_promise() -> None:
    conn, peer = client()
    conn.send_headers(1, GET, end_stream=True)
    data = frame(PUSH, END_HEADERS, 1, u32(2) + peer.encoder.encode(GET))
    assert goaway_code(conn.receive_data(data)) == PROTOCOL_ERROR


# --- stream states and ids -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        frame(DATA, 0, 1, b"x"),  # idle stream
        frame(WINDOW, 0, 1, u32(1)),
        frame(RST, 0, 1, u32(CANCEL)),
        frame(DATA, 0, 2, b"x"),
    ],
)
def test_frames_on_idle_streams(data: bytes) -> None:
    conn, _ = server()
    assert goaway_code(conn.receive_data(data)) == PROTOCOL_ERROR


def test_client_may_not_use_even_stream_ids() -> None:
    conn, peer = server()
    assert goaway_code(conn.receive_data(peer.headers(2, GET))) == PROTOCOL_ERROR


def test_stream_ids_must_increase() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(5, GET))
    assert goaway_code(conn.receive_data(peer.headers(3, GET))) == PROTOCOL_ERROR
    assert conn.last_stream_id == 5


def test_skipped_stream_ids_are_closed() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(5, GET))
    events = conn.receive_data(frame(DATA, 0, 3, b"x"))
    assert reset_code(events, 3) == STREAM_CLOSED


def test_server_reads_stream_ids_from_its_own_side_as_idle() -> None:
    conn, peer = client()
    conn.send_headers(1, GET, end_stream=True)
    assert goaway_code(conn.receive_data(peer.headers(3, OK))) == PROTOCOL_ERROR


def test_data_after_end_stream_is_stream_closed() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, GET))
    events = conn.receive_data(frame(DATA, 0, 1, b"late"))
    assert reset_code(events, 1) == STREAM_CLOSED
    assert peer.read(conn) == [(RST, 0, 1, STREAM_CLOSED)]


def test_headers_after_end_stream_is_stream_closed() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, GET))
    events = conn.receive_data(peer.headers(1, [(b"x-t", b"1")]))
    assert reset_code(events, 1) == STREAM_CLOSED


def test_data_on_a_fully_closed_stream() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, GET))
    conn.send_headers(1, OK, end_stream=True)
    assert conn.open_streams == 0
    events = conn.receive_data(frame(DATA, 0, 1, b"x"))
    assert reset_code(events, 1) == STREAM_CLOSED


def test_headers_on_a_fully_closed_stream_is_a_connection_error() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, GET))
    conn.send_headers(1, OK, end_stream=True)
    assert goaway_code(conn.receive_data(peer.headers(1, GET))) == PROTOCOL_ERROR


def test_frames_in_flight_after_our_reset_are_ignored_but_decoded() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, POST, end_stream=False))
    conn.reset_stream(1, CANCEL)
    assert peer.read(conn) == [(RST, 0, 1, CANCEL)]
    # still in flight: data, and trailers that add an entry to the HPACK table
    late = frame(DATA, 0, 1, b"x" * 100) + peer.headers(1, [(b"x-new", b"entry")])
    late += frame(WINDOW, 0, 1, u32(5)) + frame(RST, 0, 1, u32(CANCEL))
    assert conn.receive_data(late) == []
    assert peer.read(conn) == []
    # the next block refers to the entry the ignored trailers added
    events = conn.receive_data(peer.headers(3, [*GET, (b"x-new", b"entry")]))
    assert isinstance(events[0], RequestReceived)
    assert events[0].headers[-1] == (b"x-new", b"entry")


def test_peer_reset() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, POST, end_stream=False))
    (reset,) = conn.receive_data(frame(RST, 0, 1, u32(CANCEL)))
    assert isinstance(reset, StreamReset)
    assert (reset.stream_id, reset.error_code, reset.remote) == (1, CANCEL, True)
    assert conn.open_streams == 0
    with pytest.raises(StreamClosedError):
        conn.send_headers(1, OK)
    assert conn.receive_data(frame(RST, 0, 1, u32(CANCEL))) == []  # closed: ignored


def test_reset_of_a_closed_stream_is_a_no_op_and_of_an_idle_one_an_error() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, GET))
    conn.send_headers(1, OK, end_stream=True)
    peer.read(conn)
    conn.reset_stream(1)
    assert peer.read(conn) == []
    with pytest.raises(LocalProtocolError):
        conn.reset_stream(9)


# --- message validation (RFC 9113 §8) ------------------------------------------------------------

M, S, A, P = GET


@pytest.mark.parametrize(
    "headers",
    [
        [S, A, P],  # no :method
        [M, A, P],  # no :scheme
        [M, S, A],  # no :path
        [M, S, A, (b":path", b"")],
        [M, M, S, A, P],  # duplicate
        [M, S, A, P, (b":path", b"/b")],
        [M, S, A, P, (b":foo", b"x")],  # unknown pseudo-header
        [M, S, A, P, (b":status", b"200")],  # response pseudo-header
        [M, S, A, (b"a", b"b"), P],  # pseudo after regular
        [*GET, (b"X-Upper", b"v")],
        [*GET, (b"bad name", b"v")],
        [*GET, (b"", b"v")],
        [*GET, (b"a:b", b"v")],
        [*GET, (b"x", b" leading")],
        [*GET, (b"x", b"trailing\t")],
        [*GET, (b"x", b"a\r\nb")],
        [*GET, (b"x", b"nul\0")],
        [*GET, (b"connection", b"close")],
        [*GET, (b"keep-alive", b"1")],
        [*GET, (b"proxy-connection", b"x")],
        [*GET, (b"transfer-encoding", b"chunked")],
        [*GET, (b"upgrade", b"h2c")],
        [*GET, (b"te", b"gzip")],
        [*GET, (b"content-length", b"12a")],
        [*GET, (b"content-length", b"1"), (b"content-length", b"2")],
        [(b":method", b"CONNECT"), A, P],  # CONNECT takes no :path
        [(b":method", b"CONNECT"), S],  # and needs :authority
    ],
)
def test_malformed_requests_are_reset(headers: list[tuple[bytes, bytes]]) -> None:
    conn, peer = server()
    events = conn.receive_data(peer.headers(1, headers))
    assert reset_code(events, 1) == PROTOCOL_ERROR
    assert not [e for e in events if isinstance(e, RequestReceived)]
    assert peer.read(conn) == [(RST, 0, 1, PROTOCOL_ERROR)]
    # the connection carries on
    assert kinds(conn.receive_data(peer.headers(3, GET))) == ["RequestReceived"]


@pytest.mark.parametrize(
    "headers",
    [
        [*GET, (b"te", b"trailers")],
        [(b":method", b"CONNECT"), (b":authority", b"h:443")],
        [*GET, (b"content-length", b"0"), (b"content-length", b"0")],
        [(b":method", b"OPTIONS"), S, A, (b":path", b"*")],
        [*GET, (b"x", b"")],
        [*GET, (b"x", b"inner space")],
    ],
)
def test_well_formed_requests(headers: list[tuple[bytes, bytes]]) -> None:
    conn, peer = server()
    assert kinds(conn.receive_data(peer.headers(1, headers))) == ["RequestReceived"]


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"x", b"y")],
        [(b":status", b"20")],
        [(b":status", b"2000")],
        [(b":status", b"abc")],
        [(b":status", b"101")],
        [(b":status", b"200"), (b":status", b"200")],
        [(b":status", b"200"), (b":path", b"/")],
        [(b"x", b"y"), (b":status", b"200")],
        [(b":status", b"200"), (b"connection", b"close")],
        [(b":status", b"200"), (b"content-length", b"x")],
    ],
)
def test_malformed_responses_are_reset(headers: list[tuple[bytes, bytes]]) -> None:
    conn, peer = client()
    conn.send_headers(1, GET, end_stream=True)
    events = conn.receive_data(peer.headers(1, headers))
    assert reset_code(events, 1) == PROTOCOL_ERROR


def test_informational_response_must_not_end_the_stream() -> None:
    conn, peer = client()
    conn.send_headers(1, GET, end_stream=True)
    events = conn.receive_data(peer.headers(1, [(b":status", b"103")], end_stream=True))
    assert reset_code(events, 1) == PROTOCOL_ERROR


def test_data_before_the_final_response() -> None:
    conn, peer = client()
    conn.send_headers(1, GET, end_stream=True)
    data = peer.headers(1, [(b":status", b"100")], end_stream=False) + frame(DATA, 0, 1, b"x")
    events = conn.receive_data(data)
    assert reset_code(events, 1) == PROTOCOL_ERROR


@pytest.mark.parametrize(
    "trailers",
    [[(b":status", b"200")], [(b"connection", b"x")], [(b"te", b"gzip")]],
)
def test_malformed_trailers(trailers: list[tuple[bytes, bytes]]) -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, POST, end_stream=False))
    events = conn.receive_data(peer.headers(1, trailers))
    assert reset_code(events, 1) == PROTOCOL_ERROR


def test_trailers_must_end_the_stream() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, POST, end_stream=False))
    events = conn.receive_data(peer.headers(1, [(b"x", b"1")], end_stream=False))
    assert reset_code(events, 1) == PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("length", "chunks"),
    [(b"3", [b"ab", b"cd"]), (b"5", [b"ab", b"cd"]), (b"0", [b"a"]), (b"2", [])],
)
def test_content_length_must_match_the_data(length: bytes, chunks: list[bytes]) -> None:
    conn, peer = server()
    headers = [*POST, (b"content-length", length)]
    data = peer.headers(1, headers, end_stream=False)
    data += b"".join(frame(DATA, 0, 1, chunk) for chunk in chunks)
    data += frame(DATA, END_STREAM, 1, b"")
    events = conn.receive_data(data)
    assert reset_code(events, 1) == PROTOCOL_ERROR
    assert not [e for e in events if isinstance(e, DataReceived) and e.end_stream]


def test_content_length_matching_over_several_frames_and_trailers() -> None:
    conn, peer = server()
    data = peer.headers(1, [*POST, (b"content-length", b"4")], end_stream=False)
    data += frame(DATA, 0, 1, b"ab") + frame(DATA, 0, 1, b"cd") + peer.headers(1, [(b"x", b"y")])
    assert kinds(conn.receive_data(data))[-1] == "TrailersReceived"


@pytest.mark.parametrize(
    ("method", "status"), [(b"HEAD", b"200"), (b"GET", b"304"), (b"GET", b"204")]
)
def test_content_length_is_not_framing_for_head_204_304(method: bytes, status: bytes) -> None:
    conn, peer = client()
    conn.send_headers(1, [(b":method", method), S, A, P], end_stream=True)
    response = [(b":status", status), (b"content-length", b"1234")]
    events = conn.receive_data(peer.headers(1, response, end_stream=True))
    assert kinds(events) == ["ResponseReceived"]


# --- flow control --------------------------------------------------------------------------------


def test_inbound_window_reopens_only_when_data_is_acknowledged() -> None:
    conn, peer = server(initial_window_size=1000, connection_window_size=65535)
    conn.receive_data(peer.headers(1, POST, end_stream=False))
    events = conn.receive_data(frame(DATA, 0, 1, b"x" * 1000))
    assert kinds(events) == ["DataReceived"]
    assert peer.read(conn) == []  # no credit back until the application says so
    events = conn.receive_data(frame(DATA, 0, 1, b"y"))
    assert reset_code(events, 1) == FLOW_CONTROL_ERROR


def test_acknowledged_data_comes_back_as_window_updates() -> None:
    conn, peer = server(initial_window_size=1000, connection_window_size=65535)
    conn.receive_data(peer.headers(1, POST, end_stream=False))
    conn.receive_data(frame(DATA, 0, 1, b"x" * 1000))
    conn.acknowledge_received_data(400, 1)
    assert peer.read(conn) == []  # below half a window: batched
    conn.acknowledge_received_data(600, 1)
    assert peer.read(conn) == [(WINDOW, 0, 1, u32(1000))]
    conn.acknowledge_received_data(5000, 1)  # more than was delivered: ignored
    assert peer.read(conn) == []
    assert kinds(conn.receive_data(frame(DATA, 0, 1, b"x" * 1000))) == ["DataReceived"]


def test_connection_window_is_shared_and_enforced() -> None:
    conn, peer = server(initial_window_size=60000, connection_window_size=65535)
    conn.receive_data(peer.headers(1, POST, end_stream=False) + peer.headers(3, POST, False))
    conn.receive_data(frame(DATA, 0, 1, b"x" * 16384) + frame(DATA, 0, 1, b"x" * 16384))
    conn.receive_data(frame(DATA, 0, 3, b"x" * 16384) + frame(DATA, 0, 3, b"x" * 16383))
    events = conn.receive_data(frame(DATA, 0, 3, b"x"))
    assert goaway_code(events) == FLOW_CONTROL_ERROR


def test_connection_credit_returns_for_data_nobody_will_acknowledge() -> None:
    conn, peer = server(initial_window_size=60000, connection_window_size=65535)
    conn.receive_data(peer.headers(1, POST, end_stream=False))
    conn.receive_data(frame(DATA, 0, 1, b"x" * 16384) + frame(DATA, 0, 1, b"x" * 16384))
    conn.reset_stream(1, CANCEL)  # the application drops what it held
    sent = peer.read(conn)
    assert (WINDOW, 0, 0, u32(32768)) in sent  # half the connection window: sent at once
    conn.acknowledge_received_data(32768, 1)  # too late: the reset released it already
    assert peer.read(conn) == []


def test_send_data_respects_the_window_and_resumes_on_window_update() -> None:
    conn, peer = server()
    conn.receive_data(settings(initial_window_size=10) + peer.headers(1, GET))
    conn.send_headers(1, OK)
    assert conn.local_flow_control_window(1) == 10
    with pytest.raises(FlowControlError):
        conn.send_data(1, b"x" * 11)
    conn.send_data(1, b"x" * 10)
    assert conn.local_flow_control_window(1) == 0
    assert conn.blocked_streams() == [1]
    (update,) = conn.receive_data(frame(WINDOW, 0, 1, u32(5)))
    assert isinstance(update, WindowUpdated)
    assert (update.stream_id, update.delta) == (1, 5)
    assert conn.blocked_streams() == []
    conn.send_data(1, b"y" * 5, end_stream=True)
    assert [f[3] for f in peer.read(conn) if f[0] == DATA] == [b"x" * 10, b"y" * 5]


def test_connection_send_window() -> None:
    conn, peer = server()
    conn.receive_data(settings(initial_window_size=100_000) + peer.headers(1, GET))
    conn.send_headers(1, OK)
    conn.send_data(1, b"x" * 65535)
    assert conn.local_flow_control_window(1) == 0
    assert conn.blocked_streams() == [1]
    (update,) = conn.receive_data(frame(WINDOW, 0, 0, u32(100)))
    assert isinstance(update, WindowUpdated)
    assert update.stream_id == 0
    assert conn.local_flow_control_window(1) == 100


def test_empty_data_goes_out_only_to_end_the_stream() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, GET))
    conn.send_headers(1, OK)
    peer.read(conn)
    conn.send_data(1, b"")
    assert peer.read(conn) == []
    conn.end_stream(1)
    assert peer.read(conn) == [(DATA, END_STREAM, 1, b"")]


def test_send_data_splits_at_the_peer_max_frame_size() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, GET))
    conn.send_headers(1, OK)
    conn.send_data(1, b"x" * 40000, end_stream=True)
    sent = [(f[1], len(f[3])) for f in peer.read(conn) if f[0] == DATA]
    assert sent == [(0, 16384), (0, 16384), (END_STREAM, 7232)]


@pytest.mark.parametrize("stream_id", [0, 1])
def test_window_overflow_is_a_flow_control_error(stream_id: int) -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, GET))
    conn.send_headers(1, OK)
    events = conn.receive_data(frame(WINDOW, 0, stream_id, u32((1 << 31) - 65535)))
    if stream_id:
        assert reset_code(events, 1) == FLOW_CONTROL_ERROR
    else:
        assert goaway_code(events) == FLOW_CONTROL_ERROR


def test_zero_window_update_on_a_stream_is_a_stream_error() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, GET))
    conn.send_headers(1, OK)
    assert reset_code(conn.receive_data(frame(WINDOW, 0, 1, u32(0))), 1) == PROTOCOL_ERROR


# --- GOAWAY --------------------------------------------------------------------------------------


def test_goaway_received_refuses_the_streams_it_did_not_process() -> None:
    conn, peer = client()
    for stream_id in (1, 3, 5):
        conn.send_headers(stream_id, GET, end_stream=True)
    events = conn.receive_data(frame(GOAWAY, 0, 0, u32(3) + u32(NO_ERROR) + b"bye"))
    assert kinds(events) == ["ConnectionTerminated", "StreamReset"]
    goaway, reset = events
    assert isinstance(goaway, ConnectionTerminated)
    assert (goaway.error_code, goaway.last_stream_id, goaway.additional_data) == (0, 3, b"bye")
    assert goaway.remote
    assert isinstance(reset, StreamReset)
    assert (reset.stream_id, reset.error_code, reset.remote) == (5, REFUSED_STREAM, True)
    assert conn.goaway_received
    with pytest.raises(LocalProtocolError):
        conn.send_headers(7, GET)
    # streams up to 3 still complete
    assert kinds(conn.receive_data(peer.headers(3, OK))) == ["ResponseReceived"]


def test_graceful_close_drains_open_streams_and_ignores_new_ones() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, GET) + peer.headers(3, POST, end_stream=False))
    conn.close_connection()
    assert peer.read(conn) == [(GOAWAY, 0, 0, (3, NO_ERROR))]
    assert conn.receive_data(peer.headers(5, [*GET, (b"x-after", b"1")])) == []  # ignored
    assert kinds(conn.receive_data(frame(DATA, END_STREAM, 3, b"x"))) == ["DataReceived"]
    conn.send_headers(1, OK, end_stream=True)
    assert conn.open_streams == 1
    conn.send_headers(3, OK, end_stream=True)
    assert conn.open_streams == 0
    peer.read(conn)
    # later frames of the ignored stream are dropped too, not answered
    late = frame(DATA, 0, 5, b"x") + peer.headers(5, [(b"x-trailer", b"1")])
    assert conn.receive_data(late) == []
    assert peer.read(conn) == []
    assert not conn.closed


def test_close_connection_with_an_error_ends_it() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, GET))
    conn.close_connection(ENHANCE_YOUR_CALM, additional_data=b"calm")
    assert peer.read(conn) == [(GOAWAY, 0, 0, (1, ENHANCE_YOUR_CALM))]
    assert conn.closed
    with pytest.raises(LocalProtocolError):
        conn.send_headers(1, OK)
    conn.close_connection()  # no-op on a dead connection
    assert conn.receive_data(peer.headers(3, GET)) == []


def test_connection_error_goaway_carries_the_last_stream_and_a_reason() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(7, GET))
    events = conn.receive_data(frame(PING, 0, 0, b"x"))
    assert isinstance(events[-1], ConnectionTerminated)
    assert events[-1].last_stream_id == 7
    (goaway,) = parse(conn.data_to_send())
    assert goaway[3][:8] == u32(7) + u32(FRAME_SIZE_ERROR)
    assert goaway[3][8:] == b"PING is 8 bytes"


# --- local misuse --------------------------------------------------------------------------------


def test_local_protocol_errors() -> None:
    conn, _ = client()
    assert conn.get_next_available_stream_id() == 1
    conn.send_headers(1, GET)
    assert conn.get_next_available_stream_id() == 3
    with pytest.raises(LocalProtocolError):
        conn.send_headers(2, GET)  # even: not a client stream
    with pytest.raises(LocalProtocolError):
        conn.send_headers(1, [(b"x", b"y")])  # trailers must end the stream
    with pytest.raises(StreamClosedError):
        conn.send_data(9, b"x")
    with pytest.raises(LocalProtocolError):
        conn.ping(b"short")
    srv, _ = server()
    with pytest.raises(StreamClosedError):
        srv.send_headers(1, OK)
    with pytest.raises(LocalProtocolError):
        srv.get_next_available_stream_id()


def test_client_respects_the_peer_concurrency_limit() -> None:
    conn = H2Connection(True)
    conn.receive_data(settings(max_concurrent_streams=1))
    conn.send_headers(1, GET, end_stream=True)
    with pytest.raises(LocalProtocolError):
        conn.send_headers(3, GET, end_stream=True)


def test_server_response_rules() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, POST, end_stream=False))
    with pytest.raises(LocalProtocolError):
        conn.send_data(1, b"before headers")
    with pytest.raises(LocalProtocolError):
        conn.send_headers(1, [(b":status", b"100")], end_stream=True)
    conn.send_headers(1, OK)
    with pytest.raises(LocalProtocolError):
        conn.send_headers(1, [(b"x", b"trailers without end")])


# --- attack mitigations --------------------------------------------------------------------------


def test_rapid_reset_is_answered_with_enhance_your_calm() -> None:
    conn, peer = server()
    events: list[Event] = []
    stream_id = 1
    while not conn.closed and stream_id < 1000:
        events = conn.receive_data(peer.headers(stream_id, GET) + frame(RST, 0, stream_id, u32(8)))
        stream_id += 2
    assert goaway_code(events) == ENHANCE_YOUR_CALM
    assert stream_id == 2 * 51 + 1  # the 51st premature reset of the last 100 streams


def test_resets_after_the_response_started_are_normal() -> None:
    conn, peer = server()
    for stream_id in range(1, 600, 2):
        conn.receive_data(peer.headers(stream_id, POST, end_stream=False))
        conn.send_headers(stream_id, OK)
        conn.receive_data(frame(RST, 0, stream_id, u32(CANCEL)))
        conn.data_to_send()
    assert not conn.closed


def test_some_early_resets_among_normal_streams_are_tolerated() -> None:
    conn, peer = server()
    for i, stream_id in enumerate(range(1, 2000, 2)):
        conn.receive_data(peer.headers(stream_id, POST, end_stream=False))
        if i % 3 == 0:  # a third cancelled early: below half of any 100 streams
            conn.receive_data(frame(RST, 0, stream_id, u32(CANCEL)))
        else:
            conn.send_headers(stream_id, OK, end_stream=True)
            conn.receive_data(frame(DATA, END_STREAM, stream_id, b""))
        conn.data_to_send()
    assert not conn.closed


def test_malformed_requests_count_as_early_resets() -> None:
    conn, peer = server()
    events: list[Event] = []
    for stream_id in range(1, 200, 2):
        events = conn.receive_data(peer.headers(stream_id, [*GET, (b"connection", b"x")]))
        conn.data_to_send()
        if conn.closed:
            break
    assert goaway_code(events) == ENHANCE_YOUR_CALM


def test_continuation_flood_by_frame_count() -> None:
    conn, peer = server()
    events = conn.receive_data(frame(HEADERS, 0, 1, peer.encoder.encode(GET)))
    for _ in range(64):
        events = conn.receive_data(frame(CONT, 0, 1, b""))
        assert events == []
    events = conn.receive_data(frame(CONT, 0, 1, b""))
    assert goaway_code(events) == ENHANCE_YOUR_CALM


def test_continuation_flood_by_size_buffers_nothing_past_the_cap() -> None:
    conn, _ = server(max_header_list_size=20000)
    events = conn.receive_data(frame(HEADERS, 0, 1, b"\x00" * 16000))
    events = conn.receive_data(frame(CONT, 0, 1, b"\x00" * 4000))
    assert events == []
    events = conn.receive_data(frame(CONT, 0, 1, b"\x00" * 1))
    assert goaway_code(events) == ENHANCE_YOUR_CALM
    assert conn.receive_data(frame(CONT, 0, 1, b"\x00" * 16000)) == []  # nothing kept


def test_hpack_bomb_is_answered_431_without_materializing() -> None:
    conn, peer = server()
    # one 4 KB entry in the table, then one block naming it 200 times (~800 KB decoded)
    big = (b"x-bomb", b"b" * 4000)
    events = conn.receive_data(peer.headers(1, [*GET, big]))
    assert kinds(events) == ["RequestReceived"]
    conn.send_headers(1, OK, end_stream=True)
    peer.read(conn)
    block = peer.encoder.encode([*GET, *[big] * 200])
    assert len(block) < 1000
    events = conn.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 3, block))
    assert events == []  # the application never sees it
    assert peer.read(conn) == [(HEADERS, END_HEADERS | END_STREAM, 3, [(b":status", b"431")])]
    # the decoder stayed in step: the next request on the connection works
    assert kinds(conn.receive_data(peer.headers(5, [*GET, big]))) == ["RequestReceived"]


def test_oversized_request_with_a_body_is_refused_and_its_body_ignored() -> None:
    conn, peer = server(max_header_list_size=1000)
    data = peer.headers(1, [*POST, (b"x-big", b"v" * 1000)], end_stream=False)
    assert conn.receive_data(data) == []
    assert [f[:3] for f in peer.read(conn)] == [
        (HEADERS, END_HEADERS | END_STREAM, 1),
        (RST, 0, 1),
    ]
    assert conn.receive_data(frame(DATA, END_STREAM, 1, b"body")) == []


def test_oversized_response_headers_are_cancelled() -> None:
    conn, peer = client(max_header_list_size=1000)
    conn.send_headers(1, GET, end_stream=True)
    events = conn.receive_data(peer.headers(1, [*OK, (b"x-big", b"v" * 1000)]))
    assert reset_code(events, 1) == CANCEL


def test_table_size_update_above_our_setting_is_a_compression_error() -> None:
    conn, peer = server(header_table_size=4096)
    # size update (001xxxxx) to 31 + 0x62 + (0x1F << 7) = 4097
    block = bytes([0x3F, 0xE2, 0x1F]) + peer.encoder.encode(GET)
    events = conn.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
    assert goaway_code(events) == COMPRESSION_ERROR


@pytest.mark.parametrize("block", [b"\x80", b"\xff\xff\xff\xff\xff\x0f", b"\x40\x85abc", b"\xbf"])
def test_broken_hpack_is_a_compression_error(block: bytes) -> None:
    conn, _ = server()
    events = conn.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
    assert goaway_code(events) == COMPRESSION_ERROR


@pytest.mark.parametrize("kind", ["settings", "ping"])
def test_reply_flood_from_a_peer_that_does_not_read(kind: str) -> None:
    conn, _ = server(max_outbound_control_frames=100)
    flood = settings() if kind == "settings" else frame(PING, 0, 0, b"12345678")
    for _ in range(100):
        conn.receive_data(flood)
        assert not conn.closed
    events = conn.receive_data(flood)
    assert goaway_code(events) == ENHANCE_YOUR_CALM


@pytest.mark.parametrize("kind", ["settings", "ping"])
def test_replies_taken_away_in_time_are_no_flood(kind: str) -> None:
    conn, _ = server(max_outbound_control_frames=100)
    flood = settings() if kind == "settings" else frame(PING, 0, 0, b"12345678")
    for _ in range(1000):
        conn.receive_data(flood * 50)
        conn.data_to_send()
    assert not conn.closed


def test_reset_flood_counts_our_rst_streams() -> None:
    conn, peer = server(max_outbound_control_frames=10, max_premature_resets=1000)
    events: list[Event] = []
    for stream_id in range(1, 30, 2):
        events = conn.receive_data(peer.headers(stream_id, [*GET, (b"te", b"x")]))
        if conn.closed:
            break
    assert goaway_code(events) == ENHANCE_YOUR_CALM


def test_empty_data_frame_flood() -> None:
    conn, peer = server()
    conn.receive_data(peer.headers(1, POST, end_stream=False))
    assert kinds(conn.receive_data(frame(DATA, 0, 1, b""))) == ["DataReceived"]
    assert kinds(conn.receive_data(frame(DATA, 0, 1, b"x"))) == ["DataReceived"]  # resets
    assert kinds(conn.receive_data(frame(DATA, 0, 1, b""))) == ["DataReceived"]
    assert goaway_code(conn.receive_data(frame(DATA, 0, 1, b""))) == ENHANCE_YOUR_CALM


def test_too_many_concurrent_streams_are_refused() -> None:
    conn, peer = server(max_concurrent_streams=2)
    events = conn.receive_data(
        peer.headers(1, POST, end_stream=False)
        + peer.headers(3, POST, end_stream=False)
        + peer.headers(5, POST, end_stream=False)
    )
    assert kinds(events) == ["RequestReceived", "RequestReceived", "StreamReset"]
    assert reset_code(events, 5) == REFUSED_STREAM
    assert conn.open_inbound_streams == 2
    conn.send_headers(1, OK, end_stream=True)
    conn.receive_data(frame(DATA, END_STREAM, 1, b""))
    assert kinds(conn.receive_data(peer.headers(7, GET))) == ["RequestReceived"]


def test_zero_window_stall_is_visible() -> None:
    conn, peer = server()
    conn.receive_data(settings(initial_window_size=0) + peer.headers(1, GET) + peer.headers(3, GET))
    conn.send_headers(1, OK)
    conn.send_headers(3, OK, end_stream=True)
    assert conn.local_flow_control_window(1) == 0
    assert conn.blocked_streams() == [1]  # 3 has ended: nothing to wait for
    conn.reset_stream(1, CANCEL)  # what the proxy's stall timer does
    assert conn.blocked_streams() == []


# --- byte-at-a-time ------------------------------------------------------------------------------


def describe(events: list[Event]) -> list[Any]:
    """Comparable events; consecutive DataReceived chunks on a stream are merged."""
    out: list[Any] = []
    for event in events:
        if (
            isinstance(event, DataReceived)
            and out
            and out[-1][0] == "data"
            and (out[-1][1] == event.stream_id and not out[-1][3])
        ):
            out[-1] = ("data", event.stream_id, out[-1][2] + event.data, event.end_stream)
        elif isinstance(event, DataReceived):
            out.append(("data", event.stream_id, event.data, event.end_stream))
        else:
            out.append(repr(event))
    return out


def exchange() -> bytes:
    peer = Peer()
    data = PREFACE + settings(initial_window_size=70000) + frame(SETTINGS, ACK, 0)
    data += peer.headers(1, POST, end_stream=False)
    data += frame(DATA, PADDED, 1, b"\x02abc\0\0") + frame(PING, 0, 0, b"pingpong")
    data += peer.headers(3, GET) + frame(WINDOW, 0, 0, u32(1000))
    data += frame(DATA, 0, 1, b"d" * 3000) + peer.headers(1, [(b"x-trailer", b"t")])
    data += frame(PRIORITY, 0, 9, u32(0) + b"\x01") + frame(0x30, 0, 0, b"ext")
    data += frame(RST, 0, 3, u32(CANCEL)) + frame(GOAWAY, 0, 0, u32(0) + u32(0))
    return data


def test_every_split_gives_the_same_events() -> None:
    whole = H2Connection(False)
    expected = describe(whole.receive_data(exchange()))
    assert len(expected) > 8
    bytewise = H2Connection(False)
    events: list[Event] = []
    data = exchange()
    for i in range(len(data)):
        events += bytewise.receive_data(data[i : i + 1])
    assert describe(events) == expected
    assert bytewise.data_to_send() == whole.data_to_send()


def test_state_stays_bounded_over_many_streams() -> None:
    conn, peer = server()
    for stream_id in range(1, 20_000, 2):
        if stream_id % 3:
            conn.receive_data(peer.headers(stream_id, GET))
            conn.send_headers(stream_id, OK, end_stream=True)
        else:
            conn.receive_data(peer.headers(stream_id, POST, end_stream=False))
            conn.reset_stream(stream_id, CANCEL)
        conn.data_to_send()
    assert not conn.closed
    assert conn.open_streams == 0
    assert conn.streams_opened == 10_000
    assert len(conn._streams) == 0
    assert len(conn._recent_resets) <= 128


def test_client_stream_ids_run_out() -> None:
    conn, _ = client()
    conn.send_headers((1 << 31) - 1, GET, end_stream=True)
    with pytest.raises(LocalProtocolError):
        conn.get_next_available_stream_id()


def test_module_exports_error_names() -> None:
    assert h2c.ERROR_NAMES[ENHANCE_YOUR_CALM] == "ENHANCE_YOUR_CALM"
    assert repr(SettingsAcknowledged()) == "SettingsAcknowledged()"
    assert (
        repr(ResponseReceived(1, [], True))
        == "ResponseReceived(stream_id=1, headers=[], end_stream=True)"
    )
