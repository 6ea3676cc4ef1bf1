"""Motan2 (Weibo Mesh): a 13-byte header, newline-separated string metadata, opaque body.

Wire format, all integers big-endian::

    0      2       3        4        5                   13           17           17+m
    +------+-------+--------+--------+-------------------+------------+------------+
    | F1F1 | type  | ver|st | ser|0  | request id (u64)  | meta size m| metadata   |
    +------+-------+--------+--------+-------------------+------------+------------+
    17+m         21+m         21+m+b
    +------------+------------+
    | body size b| body       |
    +------------+------------+

    type   0x10 heartbeat, 0x08 gzip (body is gzipped), 0x04 oneway, 0x02 proxy,
           0x01 response (clear: request); 0xE0 unused
    ver|st version << 3 | status: version 1 is motan2, so 0x08 normal, 0x09 exception
    ser|0  serialization << 3: 0 hessian2, 1 grpc-pb, 2 json, 3 msgpack, 4 hprose, 5 pb,
           6 simple (the default), 7 grpc-pb-json, 8 breeze; low 3 bits unused
    metadata  UTF-8 ``key\\nvalue\\nkey\\nvalue``; encoders drop the last ``\\n`` (older
           ones kept it, both decode the same). Reserved keys: M_p service, M_m method,
           M_g group, M_v version, M_tmo timeout (ms), M_e exception JSON, M_pt process
           time (ms), M_pp proxy protocol, M_md method description, M_s source.

A heartbeat is a bare header (type 0x12, answer 0x13) with empty metadata and body. An
exception response has status 1, no body, and ``M_e`` =
``{"errcode":<int>,"errmsg":"<text>","errtype":<0 framework|1 service|2 biz>}``; clients
retry on another node unless errtype is 2.

Published sources (the golden bytes in tests/unit/test_codec_motan2.py are derived from
these by hand, cited there line by line):

- weibocom/motan-go ``protocol/motanProtocol.go`` (commit d08de979): header layout and
  flags (``SetHeartbeat``..``SetSerialize``, ``BuildHeader``), ``BuildHeartbeat``,
  ``Encode0`` (metadata, trailing newline dropped), ``DecodeWithTime`` (magic, version 1
  only, size limits, metadata pairing), ``BuildExceptionResponse``, reserved ``M_*`` keys.
- weibocom/motan-go ``serialize/simple.go`` and ``core/bytes.go`` (zigzag varints): the
  "simple" serialization.
- weibocom/motan-go ``core/motan.go`` (``Exception`` JSON) and ``core/constants.go``
  (error codes 404, 1001, 1002); weibocom/motan ``motan-core/.../exception/
  MotanErrorMsgConstant.java`` (10002 reject, 10003 timeout) and ``util/ExceptionUtil.java``.
- weibocom/motan ``motan-core/.../protocol/v2motan/MotanV2Header.java`` and
  ``MotanV2Codec.java``: the Java side of the same format (its heartbeat is type 0x10 with
  serialization 1; it always writes ``M_pt`` in responses).

The proxy forwards ``raw``; ``encode`` only builds frames from fields (serialization
"simple", no gzip, no proxy flag), so it reproduces a decoded frame byte for byte only
when the frame had those defaults. :func:`encode_message` takes every header field.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

from shoal.codec.rpc.base import (
    DEFAULT_MAX_FRAME_BYTES,
    FrameDecoder,
    RpcCodec,
    RpcErrorKind,
    RpcFrame,
    RpcProtocolError,
)
from shoal.errors import LocalProtocolError

__all__ = [
    "Byte",
    "Float32",
    "Int16",
    "Int32",
    "Motan2Codec",
    "Motan2Decoder",
    "encode_message",
    "simple_decode",
    "simple_encode",
]

MAGIC = b"\xf1\xf1"
HEADER_LEN = 13
_FIXED_LEN = HEADER_LEN + 8  # header, metadata size and body size
_PREFIX = struct.Struct(">HBBBQI")  # header + metadata size: the first 17 bytes
_U32 = struct.Struct(">I")

FLAG_HEARTBEAT = 0x10
FLAG_GZIP = 0x08
FLAG_ONEWAY = 0x04
FLAG_PROXY = 0x02
FLAG_RESPONSE = 0x01

VERSION = 1
STATUS_NORMAL = 0
STATUS_EXCEPTION = 1
SERIALIZATION_SIMPLE = 6

M_PATH = "M_p"
M_METHOD = "M_m"
M_GROUP = "M_g"
M_VERSION = "M_v"
M_TIMEOUT = "M_tmo"
M_EXCEPTION = "M_e"
M_PROCESS_TIME = "M_pt"

# errtype in M_e (motan-go core/constants.go): 0 framework, 1 service, 2 biz. Every local
# reply is a service exception so that clients count it and fail over (they never retry
# biz exceptions).
_SERVICE_EXCEPTION = 1
_ERRCODES: dict[RpcErrorKind, int] = {
    RpcErrorKind.NO_ROUTE: 404,  # motan-go EProviderNotExist, Java PROVIDER_NOT_EXIST
    RpcErrorKind.NO_HEALTHY_UPSTREAM: 1001,  # motan-go ENoEndpoints (failoverHA)
    RpcErrorKind.UPSTREAM_UNAVAILABLE: 1002,  # motan-go ENoChannel (no connection)
    RpcErrorKind.TIMEOUT: 10003,  # Java SERVICE_TIMEOUT_ERROR_CODE
    RpcErrorKind.RATE_LIMITED: 10002,  # Java SERVICE_REJECT_ERROR_CODE
    RpcErrorKind.CIRCUIT_OPEN: 10002,  # Java SERVICE_REJECT_ERROR_CODE
    RpcErrorKind.BAD_REQUEST: 400,  # motan-go agent getDefaultResponse("bad request: ...")
}


def encode_message(
    *,
    request_id: int,
    metadata: Mapping[str, str],
    body: bytes = b"",
    request: bool = True,
    heartbeat: bool = False,
    oneway: bool = False,
    gzip: bool = False,
    proxy: bool = False,
    status: int = STATUS_NORMAL,
    serialization: int = SERIALIZATION_SIMPLE,
) -> bytes:
    """One Motan2 frame from every header field.

    Entries with an empty key or value are left out, as motan-go's ``Encode0`` does (its
    decoder reads an empty key as "no key yet"); a newline in either would shift every
    later pair, so it is refused.
    """
    if not 0 <= request_id < 1 << 64:
        raise LocalProtocolError(f"motan2 request id out of range: {request_id}")
    if not 0 <= status <= 7 or not 0 <= serialization <= 31:
        raise LocalProtocolError(f"motan2 status {status} / serialization {serialization}")
    pairs = [(k, v) for k, v in metadata.items() if k and v]
    if any("\n" in k or "\n" in v for k, v in pairs):
        raise LocalProtocolError("motan2 metadata key or value contains a newline")
    meta = "\n".join(f"{k}\n{v}" for k, v in pairs).encode()
    msg_type = (
        (FLAG_HEARTBEAT if heartbeat else 0)
        | (FLAG_GZIP if gzip else 0)
        | (FLAG_ONEWAY if oneway else 0)
        | (FLAG_PROXY if proxy else 0)
        | (0 if request else FLAG_RESPONSE)
    )
    head = _PREFIX.pack(
        0xF1F1, msg_type, VERSION << 3 | status, serialization << 3, request_id, len(meta)
    )
    return b"".join((head, meta, _U32.pack(len(body)), body))


def _exception_response(request_id: int, errcode: int, message: str) -> bytes:
    """A status-1 response whose ``M_e`` is motan's exception JSON (``core/motan.go``)."""
    exception = json.dumps(
        {"errcode": errcode, "errmsg": message, "errtype": _SERVICE_EXCEPTION},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return encode_message(
        request_id=request_id,
        metadata={M_PROCESS_TIME: "0", M_EXCEPTION: exception},
        request=False,
        status=STATUS_EXCEPTION,
    )


def _parse_metadata(meta: bytes) -> dict[str, str]:
    try:
        items = meta.decode().split("\n")
    except UnicodeDecodeError:
        raise RpcProtocolError("motan2 metadata is not UTF-8") from None
    if len(items) % 2 and items[-1] == "":
        items.pop()  # a trailing newline after the last value
    if len(items) % 2:
        raise RpcProtocolError("motan2 metadata has an odd number of items")
    keys = items[::2]
    if "" in keys:
        raise RpcProtocolError("motan2 metadata has an empty key")
    return dict(zip(keys, items[1::2], strict=True))


def _timeout(value: str | None) -> float | None:
    """``M_tmo`` in seconds: positive decimal milliseconds, else absent (motan ignores it)."""
    if value is None or not (value.isascii() and value.isdigit()):
        return None
    millis = int(value)
    return millis / 1000 if millis > 0 else None


def _frame(
    raw: bytes, msg_type: int, version_status: int, request_id: int, meta_size: int
) -> RpcFrame:
    headers = _parse_metadata(raw[_PREFIX.size : _PREFIX.size + meta_size]) if meta_size else {}
    status = version_status & 0x07
    return RpcFrame(
        is_request=not msg_type & FLAG_RESPONSE,
        request_id=request_id,
        raw=raw,
        heartbeat=bool(msg_type & FLAG_HEARTBEAT),
        oneway=bool(msg_type & FLAG_ONEWAY),
        service=headers.get(M_PATH, ""),
        method=headers.get(M_METHOD, ""),
        version=headers.get(M_VERSION, ""),
        group=headers.get(M_GROUP, ""),
        headers=headers,
        timeout=_timeout(headers.get(M_TIMEOUT)),
        status=status,
        ok=status == STATUS_NORMAL,
        payload=raw[_FIXED_LEN + meta_size :],
    )


class Motan2Decoder(FrameDecoder):
    """Frames Motan2 bytes. ``max_frame_bytes`` bounds the whole frame (header, metadata
    and body), checked as soon as each size field arrives, before anything is buffered
    for it. After an error the connection is unusable and so is the decoder."""

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        super().__init__(max_frame_bytes)
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[RpcFrame]:
        buf = self._buf
        buf += data
        end = len(buf)
        limit = self.max_frame_bytes
        frames: list[RpcFrame] = []
        pos = 0
        try:
            while end - pos >= 2:
                if buf[pos : pos + 2] != MAGIC:
                    raise RpcProtocolError(f"motan2: bad magic {bytes(buf[pos : pos + 2]).hex()}")
                if end - pos < _PREFIX.size:
                    break
                _, msg_type, version_status, _, request_id, meta_size = _PREFIX.unpack_from(
                    buf, pos
                )
                if version_status >> 3 != VERSION:
                    raise RpcProtocolError(f"motan2: unsupported version {version_status >> 3}")
                if _FIXED_LEN + meta_size > limit:
                    raise RpcProtocolError(f"motan2: metadata of {meta_size} bytes exceeds {limit}")
                body_size_at = pos + _PREFIX.size + meta_size
                if end < body_size_at + 4:
                    break
                (body_size,) = _U32.unpack_from(buf, body_size_at)
                size = _FIXED_LEN + meta_size + body_size
                if size > limit:
                    raise RpcProtocolError(f"motan2: frame of {size} bytes exceeds {limit}")
                if end - pos < size:
                    break
                raw = bytes(buf[pos : pos + size])
                frames.append(_frame(raw, msg_type, version_status, request_id, meta_size))
                pos += size
        except RpcProtocolError as exc:
            raise exc.located(frames, buf[pos:]) from None
        del buf[:pos]
        return frames


class Motan2Codec(RpcCodec):
    """Weibo Mesh's Motan2: multiplexed by a 64-bit request id at bytes 5..13."""

    name = "motan2"
    magic = MAGIC
    multiplexed = True

    def decoder(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Motan2Decoder:
        return Motan2Decoder(max_frame_bytes)

    def encode(self, frame: RpcFrame) -> bytes:
        """Fields win over ``headers``: a request's M_p/M_m/M_g/M_v come from service,
        method, group and version (empty means absent), M_tmo from ``timeout``; the
        status bits from ``status``. Heartbeats are bare, as :meth:`heartbeat` builds them."""
        if frame.heartbeat:
            if frame.is_request:
                return self.heartbeat(frame.request_id)
            return self.heartbeat_reply(frame)
        metadata = dict(frame.headers)
        if frame.is_request:
            metadata[M_PATH] = frame.service
            metadata[M_METHOD] = frame.method
            metadata[M_GROUP] = frame.group
            metadata[M_VERSION] = frame.version
            if frame.timeout is not None:
                metadata[M_TIMEOUT] = str(round(frame.timeout * 1000))
        return encode_message(
            request_id=frame.request_id,
            metadata=metadata,
            body=frame.payload,
            request=frame.is_request,
            oneway=frame.oneway,
            status=frame.status,
        )

    def set_request_id(self, raw: bytes, request_id: int) -> bytes:
        return raw[:5] + request_id.to_bytes(8, "big") + raw[HEADER_LEN:]

    def heartbeat(self, request_id: int) -> bytes:
        """motan-go's ``BuildHeartbeat(id, Req)``: proxy and heartbeat flags, nothing else."""
        return encode_message(request_id=request_id, metadata={}, heartbeat=True, proxy=True)

    def heartbeat_reply(self, request: RpcFrame) -> bytes:
        """motan-go's ``BuildHeartbeat(id, Res)``, which its server sends back."""
        return encode_message(
            request_id=request.request_id, metadata={}, request=False, heartbeat=True, proxy=True
        )

    def local_reply(self, request: RpcFrame, kind: RpcErrorKind, message: str) -> bytes:
        return _exception_response(request.request_id, _ERRCODES[kind], message)

    def error_reply(self, data: bytes, message: str) -> bytes | None:
        """A bad-request exception when ``data`` starts with a motan2 request header that
        expects an answer (not oneway); the request id is all we need from it."""
        if len(data) < HEADER_LEN or not data.startswith(MAGIC) or data[3] >> 3 != VERSION:
            return None
        if data[2] & (FLAG_RESPONSE | FLAG_ONEWAY):
            return None
        request_id = int.from_bytes(data[5:HEADER_LEN], "big")
        return _exception_response(request_id, _ERRCODES[RpcErrorKind.BAD_REQUEST], message)


# --- the "simple" serialization (motan-go serialize/simple.go) -----------------------------
#
# Implemented tags, all of simple.go's: 0 nil, 1 string, 2 map[string]string, 3 []byte,
# 4 []string, 5 bool, 6 byte, 7 int16, 8 int32, 9 int64, 10 float32, 11 float64,
# 20 map (tagged keys and values), 21 array (tagged items). Sizes are u32 BE; int16 is
# two's complement u16 BE; int32/int64 are zigzag varints; floats are IEEE BE. Python
# ints and floats encode as int64 and float64; the marker types below pick the narrower
# tags and are what decoding returns for them, so decode-then-encode is exact. A list or
# dict of only strings (including an empty one) uses tag 4 / 2, anything else 21 / 20.


class Byte(int):
    """An int sent with tag 6 (one unsigned byte)."""


class Int16(int):
    """An int sent with tag 7."""


class Int32(int):
    """An int sent with tag 8."""


class Float32(float):
    """A float sent with tag 10."""


_MAX_DEPTH = 100  # nested arrays/maps; bounds recursion on hostile input
_INT_TAGS: dict[type, tuple[int, int]] = {Byte: (6, 8), Int16: (7, 16), Int32: (8, 32)}
_F32 = struct.Struct(">Bf")
_F64 = struct.Struct(">Bd")


def simple_encode(value: object) -> bytes:
    """``value`` in motan's simple serialization (one value, as ``Serialize`` writes it)."""
    out = bytearray()
    _put(out, value, 0)
    return bytes(out)


def _put(out: bytearray, value: object, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise LocalProtocolError("simple: nesting too deep")
    if value is None:
        out.append(0)
    elif isinstance(value, str):
        _put_sized(out, 1, value.encode())
    elif isinstance(value, bytes | bytearray):
        _put_sized(out, 3, value)
    elif isinstance(value, bool):
        out += bytes((5, value))
    elif isinstance(value, int):
        _put_int(out, value)
    elif isinstance(value, Float32):
        try:
            out += _F32.pack(10, value)
        except OverflowError:
            raise LocalProtocolError(f"simple: {value} does not fit a float32") from None
    elif isinstance(value, float):
        out += _F64.pack(11, value)
    elif isinstance(value, list | tuple):
        if all(isinstance(item, str) for item in value):
            _put_strings(out, 4, value)
        else:
            _put_values(out, 21, value, depth)
    elif isinstance(value, dict):
        if all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            _put_strings(out, 2, [text for pair in value.items() for text in pair])
        else:
            _put_values(out, 20, [x for pair in value.items() for x in pair], depth)
    else:
        raise LocalProtocolError(f"simple: cannot serialize {type(value).__name__}")


def _put_sized(out: bytearray, tag: int, data: bytes | bytearray) -> None:
    out.append(tag)
    out += _U32.pack(len(data))
    out += data


def _put_int(out: bytearray, value: int) -> None:
    tag, bits = _INT_TAGS.get(type(value), (9, 64))
    low, high = (0, 0xFF) if tag == 6 else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    if not low <= value <= high:
        raise LocalProtocolError(f"simple: {value} does not fit {type(value).__name__}")
    out.append(tag)
    if tag == 6:
        out.append(value)
    elif tag == 7:
        out += value.to_bytes(2, "big", signed=True)
    else:
        zigzag = (value << 1) ^ (value >> (bits - 1))
        while zigzag >= 0x80:
            out.append(zigzag & 0x7F | 0x80)
            zigzag >>= 7
        out.append(zigzag)


def _put_strings(out: bytearray, tag: int, texts: list[str] | tuple[str, ...]) -> None:
    """Tags 2 and 4: a u32 total, then untagged u32-sized strings."""
    out.append(tag)
    start = len(out)
    out += bytes(4)
    for text in texts:
        data = text.encode()
        out += _U32.pack(len(data))
        out += data
    out[start : start + 4] = _U32.pack(len(out) - start - 4)


def _put_values(
    out: bytearray, tag: int, values: list[object] | tuple[object, ...], depth: int
) -> None:
    """Tags 20 and 21: a u32 total, then tagged values."""
    out.append(tag)
    start = len(out)
    out += bytes(4)
    for value in values:
        _put(out, value, depth + 1)
    out[start : start + 4] = _U32.pack(len(out) - start - 4)


def simple_decode(data: bytes) -> Any:
    """The one value in ``data`` (empty data is nil, as in ``DeSerialize``); bytes left
    over or any malformed part raise :class:`RpcProtocolError`."""
    if not data:
        return None
    value, pos = _get(data, 0, len(data), 0)
    if pos != len(data):
        raise RpcProtocolError(f"simple: {len(data) - pos} bytes after the value")
    return value


def _need(pos: int, size: int, end: int) -> None:
    if pos + size > end:
        raise RpcProtocolError("simple: truncated value")


def _get_sized(data: bytes, pos: int, end: int) -> tuple[bytes, int]:
    _need(pos, 4, end)
    (size,) = _U32.unpack_from(data, pos)
    pos += 4
    _need(pos, size, end)
    return data[pos : pos + size], pos + size


def _get_text(data: bytes, pos: int, end: int) -> tuple[str, int]:
    raw, pos = _get_sized(data, pos, end)
    try:
        return raw.decode(), pos
    except UnicodeDecodeError:
        raise RpcProtocolError("simple: string is not UTF-8") from None


def _get_zigzag(data: bytes, pos: int, end: int, bits: int) -> tuple[int, int]:
    """A zigzag varint of at most 10 bytes (``ReadVarint``), truncated to ``bits``."""
    value = shift = 0
    while shift < 64:
        _need(pos, 1, end)
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            value &= (1 << bits) - 1
            return (value >> 1) ^ -(value & 1), pos
        shift += 7
    raise RpcProtocolError("simple: varint longer than 10 bytes")


def _get(data: bytes, pos: int, end: int, depth: int) -> tuple[Any, int]:
    """The value at ``pos``, reading no further than ``end``; returns it and the next pos."""
    if depth > _MAX_DEPTH:
        raise RpcProtocolError("simple: nesting too deep")
    _need(pos, 1, end)
    tag = data[pos]
    pos += 1
    if tag == 0:
        return None, pos
    if tag == 1:
        return _get_text(data, pos, end)
    if tag == 3:
        return _get_sized(data, pos, end)
    if tag in (5, 6):
        _need(pos, 1, end)
        return (data[pos] == 1 if tag == 5 else Byte(data[pos])), pos + 1
    if tag == 7:
        _need(pos, 2, end)
        return Int16(int.from_bytes(data[pos : pos + 2], "big", signed=True)), pos + 2
    if tag == 8:
        value, pos = _get_zigzag(data, pos, end, 32)
        return Int32(value), pos
    if tag == 9:
        return _get_zigzag(data, pos, end, 64)
    if tag == 10:
        _need(pos, 4, end)
        return Float32(_F32.unpack_from(data, pos - 1)[1]), pos + 4
    if tag == 11:
        _need(pos, 8, end)
        return _F64.unpack_from(data, pos - 1)[1], pos + 8
    if tag not in (2, 4, 20, 21):
        raise RpcProtocolError(f"simple: unknown type tag {tag}")
    # containers: a u32 total size; every item must end exactly there (ErrWrongSize)
    _need(pos, 4, end)
    (total,) = _U32.unpack_from(data, pos)
    pos += 4
    stop = pos + total
    _need(pos, total, end)
    items: list[Any] = []
    while pos < stop:
        if tag in (2, 4):
            item, pos = _get_text(data, pos, stop)
        else:
            item, pos = _get(data, pos, stop, depth + 1)
        items.append(item)
    if tag in (4, 21):
        return items, pos
    if len(items) % 2:
        raise RpcProtocolError("simple: map with a key and no value")
    try:
        return dict(zip(items[::2], items[1::2], strict=True)), pos
    except TypeError:
        raise RpcProtocolError("simple: map key is not hashable") from None
