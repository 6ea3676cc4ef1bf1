"""The Motan2 codec and the "simple" serialization, against hand-derived golden bytes.

No Motan peer runs here, so every golden frame below was written out byte by byte from
the published sources and the derivation is cited next to each byte group:

- GO = weibocom/motan-go protocol/motanProtocol.go at commit d08de979 (line numbers)
- SIMPLE = weibocom/motan-go serialize/simple.go at d08de979; BYTES = core/bytes.go
- JAVA_HDR = weibocom/motan motan-core/src/main/java/com/weibo/api/motan/protocol/v2motan/
  MotanV2Header.java, JAVA_CODEC = .../v2motan/MotanV2Codec.java (commit b5f3c422)

Every frame is also fed whole, one byte at a time and in random splits, and hypothesis
fuzzes both decoders: any input gives frames/values or RpcProtocolError, nothing else.
"""

from __future__ import annotations

import gzip
import json
import random
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.codec.rpc.base import FRAME_FIELDS, Match, RpcErrorKind, RpcFrame, RpcProtocolError
from shoal.codec.rpc.motan2 import (
    Byte,
    Float32,
    Int16,
    Int32,
    Motan2Codec,
    encode_message,
    simple_decode,
    simple_encode,
)
from shoal.errors import LocalProtocolError

CODEC = Motan2Codec()

# --- golden frames ------------------------------------------------------------------------

# A request as motan-go's client builds it (ConvertToReqMessage, BuildHeader Req, no proxy).
REQUEST = (
    b"\xf1\xf1"  # GO:35 MotanMagic = 0xf1f1, written big-endian by Encode0 (GO:288)
    b"\x00"  # GO:257-266 BuildHeader(Req, proxy=false): mtype 0x00 (bit 0x01 clear = request)
    b"\x08"  # GO:269 status byte 0x08 | Normal(0): version 1 in the high 5 bits
    b"\x30"  # GO:271 Simple (= 6, GO:96-105) << 3
    b"\x01\x02\x03\x04\x05\x06\x07\x08"  # GO:292 request id, uint64 BE
    b"\x00\x00\x00\x3a"  # GO:320 meta size: 4+16+4+6+4+7+4+4+6+3 = 58
    b"M_p\ncom.weibo.Hello\n"  # GO:44 MPath, then GO:305-308 key '\n' value '\n'
    b"M_m\nhello\n"  # GO:45 MMethod
    b"M_g\ngroup1\n"  # GO:49 MGroup
    b"M_v\n1.0\n"  # GO:51 MVersion
    b"M_tmo\n200"  # GO:55 MTimeout (ms); GO:313-317 the last '\n' is dropped
    b"\x00\x00\x00\x0a"  # GO:325 body size 10
    b"\x01\x00\x00\x00\x05world"  # SIMPLE:196-206 sString(1), uint32 length, bytes
)

# A normal response (BuildHeader Res, GO:262-266 sets 0x01), M_pt as motan-go's server adds it.
RESPONSE = (
    b"\xf1\xf1"
    b"\x01"  # GO:265 response bit 0x01
    b"\x08"  # GO:269 version 1, status Normal
    b"\x30"  # GO:271 simple
    b"\x01\x02\x03\x04\x05\x06\x07\x08"
    b"\x00\x00\x00\x06"  # "M_pt\n3": 4+1+1
    b"M_pt\n3"  # GO:47 MProcessTime
    b"\x00\x00\x00\x07"
    b"\x01\x00\x00\x00\x02hi"  # SIMPLE:196-206
)

# An exception response: BuildExceptionResponse (GO:806-817) sets response, version 2 (= 1
# on the wire, GO:39), status Exception, simple; M_e is ExceptionToJSON (GO:819-822) of
# core/motan.go:382-386 {ErrCode `errcode`, ErrMsg `errmsg`, ErrType `errtype`}; M_pt first
# as JAVA_CODEC:110-116 writes it.
EXCEPTION_JSON = b'{"errcode":404,"errmsg":"no route","errtype":1}'  # 47 bytes
EXCEPTION = (
    b"\xf1\xf1"
    b"\x01"  # GO:812 SetRequest(false)
    b"\x09"  # GO:813-814 SetVersion(1) << 3 | SetStatus(Exception = 1, GO:108-111)
    b"\x30"  # GO:815 SetSerialize(Simple)
    b"\x00\x00\x00\x00\x00\x00\x00\x07"
    b"\x00\x00\x00\x3a"  # 5 + 2 + 4 + 47 = 58
    b"M_pt\n0\nM_e\n" + EXCEPTION_JSON + b"\x00\x00\x00\x00"  # no body
)

# motan-go heartbeats: BuildHeartbeat (GO:149-158) = BuildHeader(type, proxy=TRUE, simple)
# then SetHeartbeat (GO:172-178, 0x10); empty metadata and body (Encode0 writes two zeros).
HEARTBEAT = b"\xf1\xf1\x12\x08\x30" + (9).to_bytes(8, "big") + b"\x00" * 8
HEARTBEAT_REPLY = b"\xf1\xf1\x13\x08\x30" + (9).to_bytes(8, "big") + b"\x00" * 8
# Java heartbeats: JAVA_CODEC:190-205 encodeHeartbeat, JAVA_HDR:112-150 toBytes with the
# defaults of JAVA_HDR:30-37 (no proxy flag; serialize 1, so 0x08).
JAVA_HEARTBEAT = b"\xf1\xf1\x10\x08\x08" + (9).to_bytes(8, "big") + b"\x00" * 8
JAVA_HEARTBEAT_REPLY = b"\xf1\xf1\x11\x08\x08" + (9).to_bytes(8, "big") + b"\x00" * 8

ONEWAY = (
    b"\xf1\xf1"
    b"\x04"  # GO:195-201 SetOneWay(true): 0x04
    b"\x08\x30"
    b"\x00\x00\x00\x00\x00\x00\x00\x10"
    b"\x00\x00\x00\x16"  # "M_p\nlog.Sink\nM_m\nwrite": 4+9+4+5 = 22
    b"M_p\nlog.Sink\nM_m\nwrite"
    b"\x00\x00\x00\x06"
    b"\x01\x00\x00\x00\x01x"
)

# A gzip response (GO:183-189 SetGzip: 0x08, plus response 0x01). The body is the gzip of
# nothing (RFC 1952 header, empty final deflate block 03 00, crc32 0, size 0): the decoder
# must pass it through untouched.
GZIP_BODY = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff\x03\x00" + b"\x00" * 8
GZIP = (
    b"\xf1\xf1\x09\x08\x30"
    b"\x00\x00\x00\x00\x00\x00\x00\x11"
    b"\x00\x00\x00\x07M_pt\n12"
    b"\x00\x00\x00\x14" + GZIP_BODY
)

# A request with the proxy flag (GO:207-213, 0x02), as an agent forwards it.
PROXY = (
    b"\xf1\xf1\x02\x08\x30"
    b"\x00\x00\x00\x00\x00\x00\x00\x12"
    b"\x00\x00\x00\x0bM_p\ns\nM_m\nm"  # 4+2+4+1 = 11
    b"\x00\x00\x00\x00"
)

# The same routing keys as an older motan-go Encode (and Java before trimming) wrote them:
# a '\n' after the last value too. Decoders read both the same (GO:452-470).
TRAILING_NEWLINE = (
    b"\xf1\xf1\x00\x08\x30"
    b"\x00\x00\x00\x00\x00\x00\x00\x13"
    b"\x00\x00\x00\x0cM_p\ns\nM_m\nm\n"
    b"\x00\x00\x00\x00"
)

GOLDEN = [
    REQUEST,
    RESPONSE,
    EXCEPTION,
    HEARTBEAT,
    HEARTBEAT_REPLY,
    JAVA_HEARTBEAT,
    JAVA_HEARTBEAT_REPLY,
    ONEWAY,
    GZIP,
    PROXY,
    TRAILING_NEWLINE,
]


def decode_one(data: bytes) -> RpcFrame:
    frames = CODEC.decoder().feed(data)
    assert len(frames) == 1
    assert frames[0].raw == data
    return frames[0]


def feed_in_pieces(data: bytes, cuts: list[int]) -> list[RpcFrame]:
    decoder = CODEC.decoder()
    frames: list[RpcFrame] = []
    start = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        frames += decoder.feed(data[start:cut])
        start = cut
    frames += decoder.feed(data[start:])
    return frames


def fields(frame: RpcFrame) -> tuple[Any, ...]:
    return tuple(getattr(frame, name) for name in FRAME_FIELDS)


# --- decoding golden frames ---------------------------------------------------------------


def test_request_fields() -> None:
    frame = decode_one(REQUEST)
    assert frame.is_request and not frame.heartbeat and not frame.oneway
    assert frame.request_id == 0x0102030405060708
    assert (frame.service, frame.method, frame.group, frame.version) == (
        "com.weibo.Hello",
        "hello",
        "group1",
        "1.0",
    )
    assert frame.headers == {
        "M_p": "com.weibo.Hello",
        "M_m": "hello",
        "M_g": "group1",
        "M_v": "1.0",
        "M_tmo": "200",
    }
    assert frame.timeout == 0.2
    assert frame.status == 0 and frame.ok
    assert frame.payload == b"\x01\x00\x00\x00\x05world"
    assert simple_decode(frame.payload) == "world"


def test_response_fields() -> None:
    frame = decode_one(RESPONSE)
    assert not frame.is_request and not frame.heartbeat
    assert frame.request_id == 0x0102030405060708
    assert frame.headers == {"M_pt": "3"}
    assert frame.status == 0 and frame.ok
    assert frame.timeout is None
    assert simple_decode(frame.payload) == "hi"


def test_exception_response_fields() -> None:
    frame = decode_one(EXCEPTION)
    assert not frame.is_request
    assert frame.request_id == 7
    assert frame.status == 1 and not frame.ok
    assert frame.headers == {"M_pt": "0", "M_e": EXCEPTION_JSON.decode()}
    assert json.loads(frame.headers["M_e"]) == {"errcode": 404, "errmsg": "no route", "errtype": 1}
    assert frame.payload == b""


@pytest.mark.parametrize(
    ("raw", "is_request"),
    [
        (HEARTBEAT, True),
        (HEARTBEAT_REPLY, False),
        (JAVA_HEARTBEAT, True),
        (JAVA_HEARTBEAT_REPLY, False),
    ],
)
def test_heartbeat_fields(raw: bytes, is_request: bool) -> None:
    frame = decode_one(raw)
    assert frame.heartbeat and frame.is_request is is_request
    assert frame.request_id == 9
    assert frame.headers == {} and frame.payload == b""
    assert frame.ok


def test_oneway_fields() -> None:
    frame = decode_one(ONEWAY)
    assert frame.is_request and frame.oneway and not frame.heartbeat
    assert (frame.service, frame.method, frame.request_id) == ("log.Sink", "write", 0x10)
    assert simple_decode(frame.payload) == "x"


def test_gzip_body_passes_through() -> None:
    frame = decode_one(GZIP)
    assert not frame.is_request and frame.ok and frame.request_id == 0x11
    assert frame.headers == {"M_pt": "12"}
    assert frame.payload == GZIP_BODY
    assert gzip.decompress(frame.payload) == b""  # a real gzip member, not decompressed by us


def test_proxy_flag_and_trailing_newline() -> None:
    proxied = decode_one(PROXY)
    assert proxied.is_request and (proxied.service, proxied.method) == ("s", "m")
    old = decode_one(TRAILING_NEWLINE)
    assert old.headers == {"M_p": "s", "M_m": "m"}


# --- encode(decode(x)) == x ---------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [REQUEST, RESPONSE, EXCEPTION, HEARTBEAT, HEARTBEAT_REPLY, ONEWAY],
    ids=["request", "response", "exception", "heartbeat", "heartbeat_reply", "oneway"],
)
def test_encode_of_decode_is_identity(raw: bytes) -> None:
    assert CODEC.encode(decode_one(raw)) == raw


def test_flags_outside_rpcframe_round_trip_through_encode_message() -> None:
    """gzip, proxy and serialization are not RpcFrame fields; encode_message takes them."""
    frame = decode_one(GZIP)
    again = encode_message(
        request_id=frame.request_id,
        metadata=frame.headers,
        body=frame.payload,
        request=False,
        gzip=True,
    )
    assert again == GZIP
    assert CODEC.encode(frame) == GZIP[:2] + b"\x01" + GZIP[3:]  # same minus the gzip bit
    frame = decode_one(PROXY)
    assert encode_message(request_id=0x12, metadata=frame.headers, proxy=True) == PROXY
    frame = decode_one(JAVA_HEARTBEAT)
    assert encode_message(request_id=9, metadata={}, heartbeat=True, serialization=1) == (
        JAVA_HEARTBEAT
    )


def test_encode_builds_request_from_fields() -> None:
    frame = RpcFrame(
        is_request=True,
        request_id=5,
        service="svc",
        method="m",
        group="g",
        headers={"M_p": "overridden", "M_s": "app", "empty": ""},
        timeout=1.5,
        payload=simple_encode(["a", "b"]),
    )
    back = decode_one(CODEC.encode(frame))
    assert (back.service, back.method, back.group, back.version) == ("svc", "m", "g", "")
    assert back.headers == {"M_p": "svc", "M_s": "app", "M_m": "m", "M_g": "g", "M_tmo": "1500"}
    assert back.timeout == 1.5
    assert simple_decode(back.payload) == ["a", "b"]


def test_encode_refuses_what_would_break_framing() -> None:
    with pytest.raises(LocalProtocolError):
        CODEC.encode(RpcFrame(is_request=True, request_id=1, headers={"k": "a\nb"}))
    with pytest.raises(LocalProtocolError):
        CODEC.encode(RpcFrame(is_request=False, request_id=1, status=8))
    with pytest.raises(LocalProtocolError):
        CODEC.encode(RpcFrame(is_request=True, request_id=1 << 64))


# --- codec conventions --------------------------------------------------------------------


def test_identity_and_match() -> None:
    assert (CODEC.name, CODEC.magic, CODEC.multiplexed) == ("motan2", b"\xf1\xf1", True)
    assert CODEC.match(b"") is Match.NEED_MORE
    assert CODEC.match(b"\xf1") is Match.NEED_MORE
    assert CODEC.match(REQUEST) is Match.MATCH
    assert CODEC.match(b"\xda\xbb") is Match.NO  # motan1's magic
    assert CODEC.match(b"GET / HTTP/1.1\r\n") is Match.NO


def test_heartbeat_and_reply_are_motan_go_bytes() -> None:
    assert CODEC.heartbeat(9) == HEARTBEAT
    assert CODEC.heartbeat_reply(decode_one(HEARTBEAT)) == HEARTBEAT_REPLY
    assert CODEC.heartbeat_reply(decode_one(JAVA_HEARTBEAT)) == HEARTBEAT_REPLY


def test_set_request_id_changes_only_the_id_bytes() -> None:
    for raw in GOLDEN:
        patched = CODEC.set_request_id(raw, 0xA1B2C3D4E5F60718)
        assert len(patched) == len(raw)
        assert patched[:5] == raw[:5] and patched[13:] == raw[13:]
        assert patched[5:13] == bytes.fromhex("a1b2c3d4e5f60718")
        assert decode_one(patched).request_id == 0xA1B2C3D4E5F60718


EXPECTED_ERRCODES = {
    RpcErrorKind.NO_ROUTE: 404,
    RpcErrorKind.NO_HEALTHY_UPSTREAM: 1001,
    RpcErrorKind.UPSTREAM_UNAVAILABLE: 1002,
    RpcErrorKind.TIMEOUT: 10003,
    RpcErrorKind.RATE_LIMITED: 10002,
    RpcErrorKind.CIRCUIT_OPEN: 10002,
    RpcErrorKind.BAD_REQUEST: 400,
}


@pytest.mark.parametrize("kind", list(RpcErrorKind))
def test_local_reply_is_a_motan_exception(kind: RpcErrorKind) -> None:
    request = decode_one(REQUEST)
    message = 'no "upstream"\nfor ünïcode'
    reply = decode_one(CODEC.local_reply(request, kind, message))
    assert not reply.is_request and not reply.heartbeat
    assert reply.request_id == request.request_id
    assert reply.status == 1 and not reply.ok
    assert reply.payload == b""
    assert reply.headers["M_pt"] == "0"
    assert json.loads(reply.headers["M_e"]) == {
        "errcode": EXPECTED_ERRCODES[kind],
        "errmsg": message,
        "errtype": 1,
    }


def test_local_reply_golden() -> None:
    request = decode_one(CODEC.set_request_id(REQUEST, 7))
    assert CODEC.local_reply(request, RpcErrorKind.NO_ROUTE, "no route") == EXCEPTION


def test_error_reply() -> None:
    reply = CODEC.error_reply(REQUEST[:13] + b"garbage", "bad metadata")
    assert reply is not None
    frame = decode_one(reply)
    assert frame.request_id == 0x0102030405060708 and frame.status == 1
    assert json.loads(frame.headers["M_e"])["errcode"] == 400
    assert CODEC.error_reply(REQUEST[:12], "short") is None
    assert CODEC.error_reply(RESPONSE, "a response") is None
    assert CODEC.error_reply(ONEWAY, "nobody waits for an answer") is None
    assert CODEC.error_reply(b"\x00" * 40, "not motan2") is None
    assert CODEC.error_reply(b"\xf1\xf1\x00\x00\x30" + b"\x00" * 16, "version 0") is None


# --- feeding ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", GOLDEN)
def test_byte_at_a_time_and_random_splits(raw: bytes) -> None:
    whole = [fields(f) for f in CODEC.decoder().feed(raw)]
    decoder = CODEC.decoder()
    frames: list[RpcFrame] = []
    for i in range(len(raw)):
        frames += decoder.feed(raw[i : i + 1])
        assert len(frames) == (1 if i == len(raw) - 1 else 0)
    assert [fields(f) for f in frames] == whole
    rng = random.Random(raw)
    for _ in range(50):
        cuts = [rng.randrange(len(raw) + 1) for _ in range(rng.randrange(1, 6))]
        assert [fields(f) for f in feed_in_pieces(raw, cuts)] == whole


def test_many_frames_in_one_feed() -> None:
    stream = b"".join(GOLDEN)
    frames = CODEC.decoder().feed(stream)
    assert [f.raw for f in frames] == GOLDEN
    decoder = CODEC.decoder()
    assert [f.raw for f in decoder.feed(stream + REQUEST[:20])] == GOLDEN
    assert [f.raw for f in decoder.feed(REQUEST[20:])] == [REQUEST]


def test_truncated_frames_wait() -> None:
    for raw in GOLDEN:
        for end in range(len(raw)):
            assert CODEC.decoder().feed(raw[:end]) == []


# --- bad input ----------------------------------------------------------------------------


def test_wrong_magic() -> None:
    with pytest.raises(RpcProtocolError, match="magic"):
        CODEC.decoder().feed(b"\xf1\xf2")  # known bad after two bytes, no need to wait
    decoder = CODEC.decoder()
    assert len(decoder.feed(REQUEST)) == 1
    with pytest.raises(RpcProtocolError, match="magic"):
        decoder.feed(b"\xda\xbb" + REQUEST[2:])


def test_wrong_version() -> None:
    bad = REQUEST[:3] + b"\x10" + REQUEST[4:]  # version 2 (GO:423-428 accepts only 1)
    with pytest.raises(RpcProtocolError, match="version"):
        CODEC.decoder().feed(bad)


def huge(size_at: int) -> bytes:
    """A request header whose metadata (17) or body (21) size field says 4 GiB - 1."""
    return REQUEST[:13] + (b"\x00\x00\x00\x00" if size_at == 21 else b"") + b"\xff\xff\xff\xff"


@pytest.mark.parametrize("size_at", [17, 21])
def test_absurd_sizes_raise_at_once_without_allocating(size_at: int) -> None:
    data = huge(size_at)
    assert len(data) == size_at
    tracemalloc.start()
    try:
        with pytest.raises(RpcProtocolError, match="exceeds"):
            CODEC.decoder().feed(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_max_frame_bytes_bounds_the_whole_frame() -> None:
    assert len(CODEC.decoder(max_frame_bytes=len(REQUEST)).feed(REQUEST)) == 1
    with pytest.raises(RpcProtocolError):
        CODEC.decoder(max_frame_bytes=len(REQUEST) - 1).feed(REQUEST)
    with pytest.raises(RpcProtocolError):  # the metadata alone is too big: refused at 17 bytes
        CODEC.decoder(max_frame_bytes=21 + 57).feed(REQUEST[:17])


def with_metadata(meta: bytes) -> bytes:
    return REQUEST[:13] + len(meta).to_bytes(4, "big") + meta + b"\x00\x00\x00\x00"


@pytest.mark.parametrize(
    "meta",
    [b"M_p", b"M_p\ns\nM_m", b"M_p\n\xff\xfe", b"\xc3(\nx", b"\ns", b"\n", b"a\nb\n\nc"],
    ids=["one", "three", "bad-utf8-value", "bad-utf8-key", "empty-key", "lone-newline", "mid"],
)
def test_bad_metadata(meta: bytes) -> None:
    with pytest.raises(RpcProtocolError, match="metadata"):
        CODEC.decoder().feed(with_metadata(meta))


def test_metadata_edge_cases_motan_go_accepts() -> None:
    # GO:452-470: a key right before the end (after a '\n') gets an empty value.
    assert decode_one(with_metadata(b"M_p\ns\nk\n")).headers == {"M_p": "s", "k": ""}
    assert decode_one(with_metadata(b"k\nv\nk\nw")).headers == {"k": "w"}  # Store: last wins


def test_timeout_parsing() -> None:
    for value, expected in [(b"150", 0.15), (b"0", None), (b"-5", None), (b"1e3", None)]:
        frame = decode_one(with_metadata(b"M_tmo\n" + value))
        assert frame.timeout == expected


# --- fuzz ---------------------------------------------------------------------------------


def frames_or_protocol_error(data: bytes, cuts: list[int]) -> list[RpcFrame] | None:
    try:
        return feed_in_pieces(data, cuts)
    except RpcProtocolError:
        return None


@settings(max_examples=400)
@given(st.binary(max_size=200), st.lists(st.integers(0, 250), max_size=6))
def test_fuzz_any_bytes(data: bytes, cuts: list[int]) -> None:
    frames_or_protocol_error(b"\xf1\xf1" + data, cuts)
    frames_or_protocol_error(data, cuts)


@settings(max_examples=400)
@given(
    st.sampled_from(GOLDEN),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4),
    st.lists(st.integers(0, 250), max_size=6),
)
def test_fuzz_mutated_golden_frames(
    raw: bytes, edits: list[tuple[int, int]], cuts: list[int]
) -> None:
    data = bytearray(raw + REQUEST)
    for index, value in edits:
        data[index % len(data)] = value
    split = frames_or_protocol_error(bytes(data), cuts)
    whole = frames_or_protocol_error(bytes(data), [])
    # splitting never changes the outcome
    assert (split is None) == (whole is None)
    if split is not None and whole is not None:
        assert [fields(f) for f in split] == [fields(f) for f in whole]


# --- the simple serialization -------------------------------------------------------------

SIMPLE_GOLDEN: list[tuple[Any, bytes]] = [
    (None, b"\x00"),  # SIMPLE:13-14 sNull = 0, serializeBuf writes the tag alone
    ("abc", b"\x01\x00\x00\x00\x03abc"),  # SIMPLE:196-206 tag, uint32 length, bytes
    ("", b"\x01\x00\x00\x00\x00"),
    ("é", b"\x01\x00\x00\x00\x02\xc3\xa9"),  # []byte(s): UTF-8 length
    # SIMPLE:208-220 sStringMap(2): uint32 total, then untagged (len, key)(len, value)
    ({"k": "v"}, b"\x02\x00\x00\x00\x0a\x00\x00\x00\x01k\x00\x00\x00\x01v"),
    ({}, b"\x02\x00\x00\x00\x00"),
    (b"\x00\xff", b"\x03\x00\x00\x00\x02\x00\xff"),  # SIMPLE:222-226 sByteArray(3)
    # SIMPLE:228-239 sStringArray(4): total 5 + 6 = 11
    (["a", "bc"], b"\x04\x00\x00\x00\x0b\x00\x00\x00\x01a\x00\x00\x00\x02bc"),
    (True, b"\x05\x01"),  # SIMPLE:241-248
    (False, b"\x05\x00"),
    (Byte(255), b"\x06\xff"),  # SIMPLE:290-293
    (Int16(-2), b"\x07\xff\xfe"),  # SIMPLE:295-298 WriteUint16(uint16(i)): two's complement
    (Int16(258), b"\x07\x01\x02"),
    # SIMPLE:300-303 + BYTES:140-158: zigzag32 then 7-bit little-endian groups
    (Int32(-1), b"\x08\x01"),  # zigzag(-1) = 1
    (Int32(300), b"\x08\xd8\x04"),  # zigzag 600 = 0x258: 0x58|0x80, 0x04
    (Int32(-(2**31)), b"\x08\xff\xff\xff\xff\x0f"),  # zigzag 2^32 - 1
    # SIMPLE:305-308 sInt64(9) + BYTES:144-146 zigzag64
    (0, b"\x09\x00"),
    (1, b"\x09\x02"),
    (-64, b"\x09\x7f"),  # zigzag 127
    (64, b"\x09\x80\x01"),  # zigzag 128
    (-(2**63), b"\x09" + b"\xff" * 9 + b"\x01"),  # zigzag 2^64 - 1: ten bytes
    (Float32(1.5), b"\x0a\x3f\xc0\x00\x00"),  # SIMPLE:310-313 Float32bits, uint32 BE
    (1.5, b"\x0b\x3f\xf8\x00\x00\x00\x00\x00\x00"),  # SIMPLE:315-318 Float64bits
    (-0.0, b"\x0b\x80" + b"\x00" * 7),
    # SIMPLE:250-270 sMap(20): total, then tagged key, tagged value: 6 + 2 = 8
    ({"k": 1}, b"\x14\x00\x00\x00\x08\x01\x00\x00\x00\x01k\x09\x02"),
    ({1: None}, b"\x14\x00\x00\x00\x03\x09\x02\x00"),
    # SIMPLE:272-288 sArray(21): total, tagged items: 2 + 6 = 8
    ([1, "a"], b"\x15\x00\x00\x00\x08\x09\x02\x01\x00\x00\x00\x01a"),
    ([[None]], b"\x15\x00\x00\x00\x06\x15\x00\x00\x00\x01\x00"),
]


@pytest.mark.parametrize(("value", "raw"), SIMPLE_GOLDEN, ids=[r.hex() for _, r in SIMPLE_GOLDEN])
def test_simple_golden(value: Any, raw: bytes) -> None:
    assert simple_encode(value) == raw
    decoded = simple_decode(raw)
    assert decoded == value
    assert type(decoded) is type(value)
    assert simple_encode(decoded) == raw


def test_simple_decode_edges() -> None:
    assert simple_decode(b"") is None  # DeSerialize of an empty body is nil
    assert simple_decode(b"\x05\x02") is False  # SIMPLE:320-335: only 1 is true
    assert simple_decode(b"\x15\x00\x00\x00\x00") == []  # an empty generic array
    assert simple_encode(("a",)) == simple_encode(["a"])


@pytest.mark.parametrize(
    "raw",
    [
        b"\x01\x00\x00\x00\x05abc",  # string shorter than its length
        b"\x01\x00\x00\x00\x01\xff",  # not UTF-8
        b"\x02\x00\x00\x00\x05\x00\x00\x00\x01k",  # string map: key, no value
        b"\x04\x00\x00\x00\x04\x00\x00\x00\x01a",  # item runs past the total (ErrWrongSize)
        b"\x09" + b"\x80" * 10,  # varint over 10 bytes (BYTES ReadVarint: ErrOverflow)
        b"\x09\x80",  # truncated varint
        b"\x07\x01",  # truncated int16
        b"\x0c",  # unknown tag
        b"\x14\x00\x00\x00\x08\x15\x00\x00\x00\x01\x00\x09\x02",  # key [nil]: 6 + 2
        b"\x14\x00\x00\x00\x02\x09\x02",  # map: key, no value
        b"\x00\x00",  # bytes after the value
        b"\x15\x00\x00\x00\xff",  # total beyond the data
    ],
)
def test_simple_decode_rejects(raw: bytes) -> None:
    with pytest.raises(RpcProtocolError):
        simple_decode(raw)


def test_simple_varints_truncate_like_go() -> None:
    """BYTES:223-239: a 10-byte varint keeps 64 bits, ReadZigzag32 keeps 32."""
    assert simple_decode(b"\x09" + b"\xff" * 9 + b"\x7f") == -(2**63)
    assert simple_decode(b"\x08\xff\xff\xff\xff\x1f") == -(2**31)


def nested_arrays(depth: int) -> bytes:
    raw = b"\x00"
    for _ in range(depth):
        raw = b"\x15" + len(raw).to_bytes(4, "big") + raw
    return raw


def test_simple_nesting_is_bounded() -> None:
    """Deep nesting is refused as a protocol error, never a RecursionError."""
    value = simple_decode(nested_arrays(100))
    for _ in range(100):
        (value,) = value
    assert value is None
    for depth in (101, 5000):
        with pytest.raises(RpcProtocolError, match="deep"):
            simple_decode(nested_arrays(depth))
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep, 1]
    with pytest.raises(LocalProtocolError, match="deep"):
        simple_encode(deep)


@pytest.mark.parametrize(
    "value",
    [Byte(256), Byte(-1), Int16(1 << 15), Int32(1 << 31), 1 << 63, Float32(1e39), object()],
)
def test_simple_encode_rejects(value: object) -> None:
    with pytest.raises(LocalProtocolError):
        simple_encode(value)


simple_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.integers(0, 255).map(Byte)
    | st.integers(-(2**15), 2**15 - 1).map(Int16)
    | st.integers(-(2**31), 2**31 - 1).map(Int32)
    | st.floats(allow_nan=False)
    | st.floats(width=32, allow_nan=False).map(Float32)
    | st.text()
    | st.binary(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(), inner, max_size=4)
        | st.dictionaries(st.integers(-5, 5), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(simple_values)
def test_simple_round_trip(value: Any) -> None:
    raw = simple_encode(value)
    assert simple_decode(raw) == value
    assert simple_encode(simple_decode(raw)) == raw


@settings(max_examples=400)
@given(st.binary(max_size=64))
def test_simple_fuzz(data: bytes) -> None:
    try:
        simple_decode(data)
    except RpcProtocolError:
        pass
