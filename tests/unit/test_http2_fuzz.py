"""Fuzzing the HTTP/2 codec: whatever bytes arrive, in whatever split, ``receive_data``
returns events (a GOAWAY among them when the input is bad) and never raises; once it has
sent GOAWAY for an error, it stays quiet. Random bytes rarely get past the preface, so valid
exchanges are also mutated frame by frame (flags, types, stream ids, lengths, payload bytes).
"""

from __future__ import annotations

import itertools
import struct

import hpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.codec.http2 import PREFACE, ConnectionTerminated, Event, H2Connection

GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    size = len(payload)
    return struct.pack(">BHBBL", size >> 16, size & 0xFFFF, ftype, flags, stream_id) + payload


def valid_frames() -> list[bytes]:
    """A client's side of a busy exchange, one entry per frame (blocks encoded in order)."""
    encoder = hpack.Encoder()
    get = encoder.encode(GET)
    block = encoder.encode([*GET, (b"x-big", b"v" * 50)])
    post = encoder.encode([(b":method", b"POST"), *GET[1:]])
    trailers = encoder.encode([(b"x-trailer", b"1")])
    return [
        frame(4, 0, 0, struct.pack(">HLHL", 4, 100_000, 1, 4096)),
        frame(4, 1, 0),
        frame(1, 0x5, 1, get),
        frame(1, 0x0, 3, block[:10]),
        frame(9, 0x4, 3, block[10:]),
        frame(0, 0x8, 3, b"\x03abc\0\0\0"),
        frame(1, 0x24, 5, struct.pack(">LB", 3, 16) + post),
        frame(0, 0, 5, b"body"),
        frame(8, 0, 5, struct.pack(">L", 1000)),
        frame(6, 0, 0, b"12345678"),
        frame(1, 0x5, 3, trailers),
        frame(3, 0, 5, struct.pack(">L", 8)),
        frame(2, 0, 7, struct.pack(">LB", 0, 1)),
        frame(7, 0, 0, struct.pack(">LL", 0, 0)),
    ]


def test_the_unmutated_exchange_is_valid() -> None:
    events = H2Connection(False).receive_data(PREFACE + b"".join(valid_frames()))
    names = [type(event).__name__ for event in events]
    assert names == [
        "RemoteSettingsChanged",
        "SettingsAcknowledged",
        "RequestReceived",
        "RequestReceived",
        "DataReceived",
        "RequestReceived",
        "DataReceived",
        "WindowUpdated",
        "TrailersReceived",
        "StreamReset",
        "ConnectionTerminated",
    ]
    assert isinstance(events[-1], ConnectionTerminated)
    assert events[-1].remote


def run(conn: H2Connection, data: bytes, cuts: list[int]) -> list[Event]:
    """Feed ``data`` split at ``cuts``; check the invariants after every piece."""
    events: list[Event] = []
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for start, stop in itertools.pairwise(bounds):
        was_closed = conn.closed
        new = conn.receive_data(data[start:stop])
        if was_closed:
            assert new == []
        for event in new:
            if isinstance(event, ConnectionTerminated) and not event.remote:
                assert conn.closed
                assert event is new[-1]  # nothing after our GOAWAY
        events += new
        conn.data_to_send()
    return events


@FUZZ
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=20))
def test_random_bytes_without_a_preface(data: bytes, cuts: list[int]) -> None:
    run(H2Connection(False), data, cuts)
    run(H2Connection(True), data, cuts)


@FUZZ
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=20))
def test_random_bytes_after_a_valid_preface(data: bytes, cuts: list[int]) -> None:
    server = H2Connection(False)
    run(server, PREFACE + valid_frames()[0] + data, cuts)
    client = H2Connection(True)
    client.send_headers(1, GET)
    run(client, valid_frames()[0] + data, cuts)


mutation = st.tuples(
    st.integers(0, 13),  # which frame
    st.sampled_from(["type", "flags", "stream", "length", "byte", "drop", "repeat"]),
    st.integers(0, 2**32 - 1),
)


def mutate(frames: list[bytes], changes: list[tuple[int, str, int]]) -> bytes:
    frames = list(frames)
    for which, kind, value in changes:
        index = which % len(frames)
        raw = bytearray(frames[index])
        if len(raw) < 9:  # dropped earlier
            continue
        if kind == "type":
            raw[3] = value % 12
        elif kind == "flags":
            raw[4] = value & 0xFF
        elif kind == "stream":
            raw[5:9] = struct.pack(">L", value % 12)
        elif kind == "length":
            size = value % (len(raw) + 20)
            raw[0:3] = size.to_bytes(3, "big")
        elif kind == "byte" and len(raw) > 9:
            raw[9 + value % (len(raw) - 9)] = (value >> 8) & 0xFF
        elif kind == "drop":
            raw = bytearray()
        elif kind == "repeat":
            raw = raw * (2 + value % 3)
        frames[index] = bytes(raw)
    return b"".join(frames)


@FUZZ
@given(st.lists(mutation, min_size=1, max_size=6), st.lists(st.integers(0, 600), max_size=10))
def test_mutated_exchanges_to_a_server(
    changes: list[tuple[int, str, int]], cuts: list[int]
) -> None:
    run(H2Connection(False), PREFACE + mutate(valid_frames(), changes), cuts)


@FUZZ
@given(st.lists(mutation, min_size=1, max_size=6), st.lists(st.integers(0, 600), max_size=10))
def test_mutated_exchanges_to_a_client(
    changes: list[tuple[int, str, int]], cuts: list[int]
) -> None:
    client = H2Connection(True)
    for stream_id in (1, 3, 5):
        client.send_headers(stream_id, GET)
    run(client, mutate(valid_frames(), changes), cuts)


@FUZZ
@given(st.binary(max_size=300))
def test_random_header_blocks(block: bytes) -> None:
    server = H2Connection(False)
    data = PREFACE + valid_frames()[0] + frame(1, 0x5, 1, block) + frame(1, 0x5, 3, block)
    run(server, data, [])
    client = H2Connection(True)
    client.send_headers(1, GET)
    run(client, valid_frames()[0] + frame(1, 0x4, 1, block) + frame(1, 0x5, 1, block), [])
