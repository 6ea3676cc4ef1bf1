"""SOFA Bolt v1 and v2, the transport of SOFA-RPC (Java sofa-bolt, sofa-bolt-node, MOSN).

Every frame is a fixed big-endian header that carries all lengths, then the class name,
a header map and the content (hessian2 or protobuf). Framing never looks inside the
content; routing reads the header map, and the head of a hessian2 SofaRequest content
only when the header map does not name the method (see below).

Bolt v1 (protocol code 0x01), request: 22-byte fixed header::

    0     1     2           4     5                       9     10                      14
    +-----+-----+-----------+-----+-----------------------+-----+-----------------------+
    |proto| type|  cmdcode  | ver2|       requestId       |codec|        timeout        |
    +-----+-----+-----------+-----+-----------------------+-----+-----------------------+
    14          16          18                      22
    +-----------+-----------+-----------------------+-----------+--------+---------+
    |  classLen | headerLen |       contentLen      | className | header | content |
    +-----------+-----------+-----------------------+-----------+--------+---------+

Bolt v1 response: 20 bytes, ``timeout(4)`` replaced by ``respStatus(2)``::

    proto(1) type(1) cmdcode(2) ver2(1) requestId(4) codec(1) respStatus(2)
    classLen(2) headerLen(2) contentLen(4) | className | header | content

Bolt v2 (protocol code 0x02) adds ``ver1`` after the code and a ``switch`` byte after the
codec. Request, 24-byte fixed header (a response has ``respStatus(2)`` for ``timeout(4)``,
22 bytes)::

    0      1      2      3             5      6                           10     11     12
    +------+------+------+-------------+------+---------------------------+------+------+
    |proto | ver1 | type |   cmdcode   | ver2 |         requestId         |codec |switch|
    +------+------+------+-------------+------+---------------------------+------+------+
    12                          16            18            20                          24
    +---------------------------+-------------+-------------+---------------------------+
    |          timeout          |   classLen  |  headerLen  |         contentLen        |
    +---------------------------+-------------+-------------+---------------------------+
    then className, header map, content, and CRC32(4) when it is on

The CRC32 (zlib's, over every byte before it) is present when ``ver1 == 2`` and bit 0 of
``switch`` is set: that is Java sofa-bolt's rule (``RpcCommandEncoderV2`` /
``RpcCommandDecoderV2``). sofa-bolt-node appends it whenever ``switch == 1``, even with
``ver1 == 1``; Java never writes such a frame and would misread it, so we follow Java.

``type``: 0x00 response, 0x01 request, 0x02 oneway request. ``cmdcode``: 0x0000
heartbeat (request and ack), 0x0001 RPC request, 0x0002 RPC response. ``codec``: 1
hessian2, 11 protobuf. Integers are big-endian; ``timeout`` is signed milliseconds
(0 or negative: none); ids are unsigned 32-bit (the proxy's ids wrap at 2**32).

The header map (SOFA-RPC's ``SimpleMapSerializer``) is repeated ``keyLen(int32) key
valueLen(int32) value`` in UTF-8; a negative length is Java's null and the pair is
dropped. SOFA-RPC Java clients send ``service``, ``sofa_head_target_service``
(``interface:version[:uniqueId]``), ``sofa_head_method_name``, ``sofa_head_target_app``
and the flattened request props; sofa-rpc-node's hessian2 requests carry only
``service`` (same format), with the method inside the hessian2 body. Routing reads
``interface`` as the service, ``version`` as the version and ``uniqueId`` (SOFA's
service group) as the group, from ``sofa_head_target_service`` or else ``service``.

A request (two-way or oneway) with codec hessian2 and class SofaRequest whose header map
has no ``sofa_head_method_name`` takes its method from the ``methodName`` field of the
SofaRequest object its content starts with, and, if ``sofa_head_target_service`` is
missing too, its target from ``targetServiceUniqueName`` (``service`` remains the
fallback for a null one). ``Hessian2Reader.read_object_fields`` reads both dialects
that clients write: the Hessian 2 draft of sofa-hessian-node's default encoder (``O``
class definition, ``o`` instance, as below) and Hessian 2.0 (``C``, then ``O`` or
``0x60``: sofa-bolt-node with ``hessianVersion`` 4.0, SOFA-RPC Java). It stops after the
last field it needs: the arguments, which follow the object, are never read. A content
that is not such an object is an ``RpcProtocolError`` (CODEC_EXCEPTION). What
sofa-rpc-node 2.10 writes for ``sayHello("world")`` on ``com.example.Greeter:1.0.0``::

    4f bc "com.alipay.sofa.rpc.core.request.SofaRequest"          'O', name length 44
    95 0a "methodName" 0d "methodArgSigs" 17 "targetServiceUniqueName"   5 fields
       0d "targetAppName" 0c "requestProps"
    6f 90                                                          'o', class 0
    08 "sayHello"                                                  methodName
    56 74 0011 "[java.lang.String" 6e 01 10 "java.lang.String" 7a  methodArgSigs
    19 "com.example.Greeter:1.0.0"                                 targetServiceUniqueName
    4e                                                             targetAppName: null
    4d 07 "service" 19 "com.example.Greeter:1.0.0" 7a              requestProps
    05 "world"                                                     the argument

Local replies (``local_reply``) and their status, chosen by what the clients surface:

=========================================  ========================  ==================
Shoal reason                               Bolt status               Java SOFA-RPC sees
=========================================  ========================  ==================
NO_ROUTE                                   SERVER_EXCEPTION 0x0002   our message
NO_HEALTHY_UPSTREAM, UPSTREAM_UNAVAILABLE  CONNECTION_CLOSED 0x0010  CLIENT_NETWORK
TIMEOUT                                    TIMEOUT 0x0007            SofaTimeOutException
RATE_LIMITED, CIRCUIT_OPEN                 THREADPOOL_BUSY 0x0004    SERVER_BUSY
BAD_REQUEST (and ``error_reply``)          CODEC_EXCEPTION 0x0009    CodecException
=========================================  ========================  ==================

NO_ROUTE is SERVER_EXCEPTION, not MOSN's NO_PROCESSOR: it is what a Bolt server answers
for an unknown request class, and the only non-success status whose message the Java
client keeps (the others get a fixed client-side text); SOFA servers report an unknown
service with a message too. The content is what Java's ``RpcCommandFactory.
createExceptionResponse`` sends: class ``com.alipay.remoting.rpc.exception.
RpcServerException`` with a hessian2 ``RpcServerException`` whose ``detailMessage`` is
the message (sofa-bolt-node decodes it for any non-success status and rejects with
``"com.alipay.remoting.rpc.exception.RpcServerException: <message>"``). It is written in
the sofa-hessian 3.x dialect (``O`` class definition, ``o`` instance) that SOFA-RPC 5 and
sofa-bolt-node's default hessian read. Protobuf requests get the message as raw UTF-8,
as sofa-bolt-node does.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Mapping
from enum import IntEnum
from typing import ClassVar, Final, NamedTuple

from shoal.codec.rpc.base import (
    DEFAULT_MAX_FRAME_BYTES,
    FrameDecoder,
    Match,
    RpcCodec,
    RpcErrorKind,
    RpcFrame,
    RpcProtocolError,
)
from shoal.codec.rpc.hessian2 import Hessian2Reader
from shoal.errors import LocalProtocolError

PROTO_V1: Final = 0x01
PROTO_V2: Final = 0x02

TYPE_RESPONSE: Final = 0x00
TYPE_REQUEST: Final = 0x01
TYPE_ONEWAY: Final = 0x02

CMD_HEARTBEAT: Final = 0x0000
CMD_REQUEST: Final = 0x0001
CMD_RESPONSE: Final = 0x0002

CODEC_HESSIAN2: Final = 1
CODEC_PROTOBUF: Final = 11

HEAD_SERVICE: Final = "service"
HEAD_TARGET_SERVICE: Final = "sofa_head_target_service"
HEAD_METHOD_NAME: Final = "sofa_head_method_name"
HEAD_RESPONSE_ERROR: Final = "sofa_head_response_error"

SOFA_REQUEST_CLASS: Final = "com.alipay.sofa.rpc.core.request.SofaRequest"
SOFA_RESPONSE_CLASS: Final = "com.alipay.sofa.rpc.core.response.SofaResponse"
RPC_SERVER_EXCEPTION_CLASS: Final = "com.alipay.remoting.rpc.exception.RpcServerException"

# SofaRequest fields routing reads from a hessian2 content without a method header.
FIELD_METHOD_NAME: Final = "methodName"
FIELD_TARGET_SERVICE: Final = "targetServiceUniqueName"
_METHOD_FIELD: Final = frozenset({FIELD_METHOD_NAME})
_ROUTING_FIELDS: Final = frozenset({FIELD_METHOD_NAME, FIELD_TARGET_SERVICE})
_SOFA_REQUEST_NAME: Final = SOFA_REQUEST_CLASS.encode()


class BoltStatus(IntEnum):
    """``com.alipay.remoting.ResponseStatus`` values (note the jump from 0x0009 to 0x0010)."""

    SUCCESS = 0x0000
    ERROR = 0x0001
    SERVER_EXCEPTION = 0x0002
    UNKNOWN = 0x0003
    SERVER_THREADPOOL_BUSY = 0x0004
    ERROR_COMM = 0x0005
    NO_PROCESSOR = 0x0006
    TIMEOUT = 0x0007
    CLIENT_SEND_ERROR = 0x0008
    CODEC_EXCEPTION = 0x0009
    CONNECTION_CLOSED = 0x0010
    SERVER_SERIAL_EXCEPTION = 0x0011
    SERVER_DESERIAL_EXCEPTION = 0x0012


STATUS_FOR_KIND: Final[Mapping[RpcErrorKind, BoltStatus]] = {
    RpcErrorKind.NO_ROUTE: BoltStatus.SERVER_EXCEPTION,
    RpcErrorKind.NO_HEALTHY_UPSTREAM: BoltStatus.CONNECTION_CLOSED,
    RpcErrorKind.UPSTREAM_UNAVAILABLE: BoltStatus.CONNECTION_CLOSED,
    RpcErrorKind.TIMEOUT: BoltStatus.TIMEOUT,
    RpcErrorKind.RATE_LIMITED: BoltStatus.SERVER_THREADPOOL_BUSY,
    RpcErrorKind.CIRCUIT_OPEN: BoltStatus.SERVER_THREADPOOL_BUSY,
    RpcErrorKind.BAD_REQUEST: BoltStatus.CODEC_EXCEPTION,
}

_HEAD_V1 = struct.Struct(">BBHBIB")  # proto type cmdcode ver2 requestId codec
_HEAD_V2 = struct.Struct(">BBBHBIBB")  # proto ver1 type cmdcode ver2 requestId codec switch
_REQ_TAIL = struct.Struct(">iHHI")  # timeout classLen headerLen contentLen
_RESP_TAIL = struct.Struct(">HHHI")  # respStatus classLen headerLen contentLen
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")

_ID_MASK: Final = 0xFFFFFFFF
_MAX_SHORT_LEN: Final = 0x7FFF  # Java reads classLen/headerLen as a signed short
_MAX_TIMEOUT_MS: Final = 0x7FFFFFFF
# (type, cmdcode) pairs a Bolt peer sends; anything else is not Bolt.
_VALID_COMMANDS: Final = frozenset(
    {
        (TYPE_REQUEST, CMD_REQUEST),
        (TYPE_REQUEST, CMD_HEARTBEAT),
        (TYPE_ONEWAY, CMD_REQUEST),
        (TYPE_ONEWAY, CMD_HEARTBEAT),
        (TYPE_RESPONSE, CMD_RESPONSE),
        (TYPE_RESPONSE, CMD_HEARTBEAT),
    }
)


class BoltWire(NamedTuple):
    """How one connection speaks Bolt: protocol code, v2's ver1 and switch, and codec."""

    proto: int = PROTO_V1
    ver1: int = 1
    switch: int = 0
    codec: int = CODEC_HESSIAN2

    @property
    def crc(self) -> bool:
        return self.proto == PROTO_V2 and self.ver1 == 2 and bool(self.switch & 1)

    @classmethod
    def of(cls, raw: bytes) -> BoltWire:
        """The wire a frame was sent with, so replies mirror it (v1 hessian2 if unknown)."""
        if raw[:1] == b"\x02" and len(raw) >= _HEAD_V2.size:
            return cls(PROTO_V2, raw[1], raw[11], raw[10])
        if raw[:1] == b"\x01" and len(raw) >= _HEAD_V1.size:
            return cls(PROTO_V1, 1, 0, raw[9])
        return cls()


V1_HESSIAN2: Final = BoltWire()


def unique_name(service: str, version: str = "", group: str = "") -> str:
    """SOFA's ``interface:version[:uniqueId]`` (``ConfigUniqueNameGenerator``)."""
    if group:
        return f"{service}:{version}:{group}"
    return f"{service}:{version}" if version else service


def encode_header_map(headers: Mapping[str, str]) -> bytes:
    """SOFA-RPC's ``SimpleMapSerializer`` format; lengths are UTF-8 byte counts."""
    parts: list[bytes] = []
    for key, value in headers.items():
        k = key.encode()
        v = value.encode()
        parts += (_I32.pack(len(k)), k, _I32.pack(len(v)), v)
    return b"".join(parts)


def encode_request(
    request_id: int,
    *,
    headers: Mapping[str, str] | None = None,
    content: bytes = b"",
    class_name: str = SOFA_REQUEST_CLASS,
    timeout_ms: int = 0,
    oneway: bool = False,
    heartbeat: bool = False,
    wire: BoltWire = V1_HESSIAN2,
) -> bytes:
    """A request frame; a heartbeat has no class, header or content."""
    if heartbeat:
        cls, hdr, content = b"", b"", b""
    else:
        cls, hdr = class_name.encode(), encode_header_map(headers or {})
    timeout = max(-_MAX_TIMEOUT_MS, min(timeout_ms, _MAX_TIMEOUT_MS))
    kind = TYPE_ONEWAY if oneway else TYPE_REQUEST
    cmd = CMD_HEARTBEAT if heartbeat else CMD_REQUEST
    return _pack(wire, kind, cmd, request_id=request_id, field=timeout, body=(cls, hdr, content))


def encode_response(
    request_id: int,
    *,
    status: int = BoltStatus.SUCCESS,
    headers: Mapping[str, str] | None = None,
    content: bytes = b"",
    class_name: str = SOFA_RESPONSE_CLASS,
    heartbeat: bool = False,
    wire: BoltWire = V1_HESSIAN2,
) -> bytes:
    """A response frame; a heartbeat ack has no class, header or content."""
    if heartbeat:
        cls, hdr, content = b"", b"", b""
    else:
        cls, hdr = class_name.encode(), encode_header_map(headers or {})
    if not 0 <= status <= 0xFFFF:
        raise LocalProtocolError(f"bolt: response status {status} does not fit 16 bits")
    cmd = CMD_HEARTBEAT if heartbeat else CMD_RESPONSE
    return _pack(
        wire, TYPE_RESPONSE, cmd, request_id=request_id, field=status, body=(cls, hdr, content)
    )


def _pack(
    wire: BoltWire,
    kind: int,
    cmd: int,
    *,
    request_id: int,
    field: int,
    body: tuple[bytes, bytes, bytes],
) -> bytes:
    """Fixed header (``field`` is the timeout or the status), body, and the CRC if on."""
    cls, hdr, content = body
    if len(cls) > _MAX_SHORT_LEN or len(hdr) > _MAX_SHORT_LEN or len(content) > 0x7FFFFFFF:
        raise LocalProtocolError("bolt: class name, header map or content too long")
    tail_struct = _RESP_TAIL if kind == TYPE_RESPONSE else _REQ_TAIL
    tail = tail_struct.pack(field, len(cls), len(hdr), len(content))
    rid = request_id & _ID_MASK
    if wire.proto == PROTO_V2:
        head = _HEAD_V2.pack(PROTO_V2, wire.ver1, kind, cmd, 1, rid, wire.codec, wire.switch)
    else:
        head = _HEAD_V1.pack(PROTO_V1, kind, cmd, 1, rid, wire.codec)
    frame = b"".join((head, tail, cls, hdr, content))
    return frame + _U32.pack(zlib.crc32(frame)) if wire.crc else frame


# RpcServerException(detailMessage, stackTrace=[], cause=null) around the message, in
# sofa-hessian 3.x's hessian2: 'O' <len> <class> <3 fields> 'o' <def 0> <values>. The
# bytes match what sofa-bolt-node writes for an Error without a stack.
_EXCEPTION_HEAD: Final = (
    b"O\xc8\x34"
    + RPC_SERVER_EXCEPTION_CLASS.encode()
    + b"\x93\x0ddetailMessage\x0astackTrace\x05cause"
    + b"o\x90"
)
_EXCEPTION_TAIL: Final = b"Vt\x00\x1c[java.lang.StackTraceElementn\x00zN"
_MAX_MESSAGE_UNITS: Final = 0x8000  # one hessian2 string chunk, as hessian.js writes
_NOT_BMP = re.compile("[\U00010000-\U0010ffff]")


def _surrogate_pair(match: re.Match[str]) -> str:
    point = ord(match.group()) - 0x10000
    return chr(0xD800 | point >> 10) + chr(0xDC00 | point & 0x3FF)


def _hessian_string(text: str) -> bytes:
    """A hessian2 string: the length counts UTF-16 units, each written as UTF-8 (as Java
    does, so a non-BMP character is two 3-byte surrogates); longer text is cut."""
    units = _NOT_BMP.sub(_surrogate_pair, text)[:_MAX_MESSAGE_UNITS]
    if units and 0xD800 <= ord(units[-1]) <= 0xDBFF:
        units = units[:-1]  # never end on half a pair
    data = units.encode("utf-8", "surrogatepass")
    if len(units) <= 31:
        return bytes((len(units),)) + data
    return b"S" + len(units).to_bytes(2, "big") + data


def error_content(message: str, codec: int = CODEC_HESSIAN2) -> bytes:
    """The content of an error response that SOFA clients turn into an error with ``message``."""
    if codec == CODEC_PROTOBUF:
        return message.encode(errors="replace")
    return _EXCEPTION_HEAD + _hessian_string(message) + _EXCEPTION_TAIL


def _error_response(wire: BoltWire, request_id: int, status: int, message: str) -> bytes:
    headers = {HEAD_RESPONSE_ERROR: "true"} if wire.codec == CODEC_PROTOBUF else None
    return encode_response(
        request_id,
        status=status,
        headers=headers,
        content=error_content(message, wire.codec),
        class_name=RPC_SERVER_EXCEPTION_CLASS,
        wire=wire,
    )


def decode_header_map(raw: bytes, start: int, stop: int) -> dict[str, str]:
    """The header map in ``raw[start:stop]``; pairs with a null key or value are dropped.

    Key and value are read inline (not by a helper) because this loop is most of the
    cost of decoding a SOFA-RPC Java request.
    """
    headers: dict[str, str] = {}
    unpack = _I32.unpack_from
    pos = start
    while pos < stop:
        if stop - pos < 8:
            raise RpcProtocolError("bolt: header map entry runs past the header")
        (length,) = unpack(raw, pos)
        pos += 4
        key: str | None = None if length < 0 else ""
        if length > 0:
            end = pos + length
            if end + 4 > stop:
                raise RpcProtocolError("bolt: header map entry runs past the header")
            key = raw[pos:end].decode("utf-8", "replace")
            pos = end
        (length,) = unpack(raw, pos)
        pos += 4
        if length > 0:
            end = pos + length
            if end > stop:
                raise RpcProtocolError("bolt: header map entry runs past the header")
            if key is not None:
                headers[key] = raw[pos:end].decode("utf-8", "replace")
            pos = end
        elif length == 0 and key is not None:
            headers[key] = ""
    return headers


def _content_routing(content: bytes, target: str | None) -> tuple[str, str | None]:
    """The method, and the target service unless the header map named it, from the
    SofaRequest object a hessian2 content starts with (the arguments after it are not read)."""
    wanted = _METHOD_FIELD if target else _ROUTING_FIELDS
    fields = Hessian2Reader(content).read_object_fields(SOFA_REQUEST_CLASS, wanted)
    return fields.get(FIELD_METHOD_NAME, ""), target or fields.get(FIELD_TARGET_SERVICE)


def _parse(buf: bytearray, pos: int, limit: int) -> tuple[RpcFrame, int] | None:
    """The frame at ``buf[pos:]`` and where the next one starts, or None if incomplete."""
    avail = len(buf) - pos
    proto = buf[pos]
    if proto == PROTO_V1:
        type_at, head = pos + 1, _HEAD_V1.size
    elif proto == PROTO_V2:
        if avail < 2:
            return None
        if buf[pos + 1] not in (1, 2):
            raise RpcProtocolError(f"bolt: unknown v2 protocol version {buf[pos + 1]}")
        type_at, head = pos + 2, _HEAD_V2.size
    else:
        raise RpcProtocolError(f"bolt: unknown protocol code 0x{proto:02x}")
    if type_at >= len(buf):
        return None
    kind = buf[type_at]
    if kind == TYPE_RESPONSE:
        tail = _RESP_TAIL
    elif kind in (TYPE_REQUEST, TYPE_ONEWAY):
        tail = _REQ_TAIL
    else:
        raise RpcProtocolError(f"bolt: unknown command type 0x{kind:02x}")
    fixed = head + tail.size
    if avail < fixed:
        return None
    cmd = (buf[type_at + 1] << 8) | buf[type_at + 2]
    if (kind, cmd) not in _VALID_COMMANDS:
        raise RpcProtocolError(f"bolt: command code {cmd} is not valid for type {kind}")
    (request_id,) = _U32.unpack_from(buf, type_at + 4)
    field, class_len, header_len, content_len = tail.unpack_from(buf, pos + head)
    body = class_len + header_len + content_len
    if body > limit:
        raise RpcProtocolError(f"bolt: frame body of {body} bytes exceeds the {limit} limit")
    crc = 4 if proto == PROTO_V2 and buf[pos + 1] == 2 and buf[pos + 11] & 1 else 0
    total = fixed + body + crc
    if avail < total:
        return None
    raw = bytes(buf[pos : pos + total])
    if crc and zlib.crc32(memoryview(raw)[:-4]) != _U32.unpack_from(raw, total - 4)[0]:
        raise RpcProtocolError("bolt: CRC32 check failed")
    header_at = fixed + class_len
    content_at = header_at + header_len
    headers = decode_header_map(raw, header_at, content_at) if header_len else {}
    payload = raw[content_at : content_at + content_len]
    if kind == TYPE_RESPONSE:
        frame = RpcFrame(
            is_request=False,
            request_id=request_id,
            raw=raw,
            heartbeat=cmd == CMD_HEARTBEAT,
            headers=headers,
            status=field,
            ok=field == BoltStatus.SUCCESS,
            payload=payload,
        )
    else:
        method = headers.get(HEAD_METHOD_NAME)
        target = headers.get(HEAD_TARGET_SERVICE)
        if (
            method is None
            and cmd == CMD_REQUEST
            and buf[type_at + 8] == CODEC_HESSIAN2
            and raw[fixed:header_at] == _SOFA_REQUEST_NAME
        ):
            method, target = _content_routing(payload, target)
        target = target or headers.get(HEAD_SERVICE, "")
        service, _, rest = target.partition(":")
        version, _, group = rest.partition(":")
        frame = RpcFrame(
            is_request=True,
            request_id=request_id,
            raw=raw,
            heartbeat=cmd == CMD_HEARTBEAT,
            oneway=kind == TYPE_ONEWAY,
            service=service,
            method=method or "",
            version=version,
            group=group,
            headers=headers,
            timeout=field / 1000 if field > 0 else None,
            payload=payload,
        )
    return frame, pos + total


class BoltDecoder(FrameDecoder):
    """Bolt v1 and v2 frames, in any mix, from one connection's byte stream."""

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        super().__init__(max_frame_bytes)
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[RpcFrame]:
        buf = self._buf
        buf += data
        frames: list[RpcFrame] = []
        pos = 0
        try:
            while pos < len(buf):
                parsed = _parse(buf, pos, self.max_frame_bytes)
                if parsed is None:
                    break
                frame, pos = parsed
                frames.append(frame)
        except RpcProtocolError as exc:
            raise exc.located(frames, buf[pos:]) from None
        finally:
            # On an error the buffer starts at the bad frame, for error_reply.
            del buf[:pos]
        return frames


class BoltCodec(RpcCodec):
    """SOFA Bolt v1/v2; replies mirror the request's protocol version, switch and codec."""

    name: ClassVar[str] = "bolt"
    multiplexed: ClassVar[bool] = True
    magic: ClassVar[bytes] = bytes((PROTO_V1,))  # v2 frames start with 0x02 instead

    def match(self, data: bytes) -> Match:
        """Bolt only if the protocol code, v2's version, the type and the command code agree."""
        if not data:
            return Match.NEED_MORE
        if data[0] == PROTO_V1:
            type_at = 1
        elif data[0] == PROTO_V2:
            if len(data) < 2:
                return Match.NEED_MORE
            if data[1] not in (1, 2):
                return Match.NO
            type_at = 2
        else:
            return Match.NO
        if len(data) <= type_at:
            return Match.NEED_MORE
        cmd = data[type_at + 1 : type_at + 3]
        if len(cmd) < 2:
            if data[type_at] in (TYPE_RESPONSE, TYPE_REQUEST, TYPE_ONEWAY) and cmd in (b"", b"\0"):
                return Match.NEED_MORE
            return Match.NO
        valid = (data[type_at], int.from_bytes(cmd)) in _VALID_COMMANDS
        return Match.MATCH if valid else Match.NO

    def decoder(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> BoltDecoder:
        return BoltDecoder(max_frame_bytes)

    def encode(self, frame: RpcFrame) -> bytes:
        """A v1 hessian2 frame from the fields, through ``encode_request``/``encode_response``.

        A request's header map is ``frame.headers`` with ``service`` and
        ``sofa_head_target_service`` set from service/version/group and
        ``sofa_head_method_name`` from method, when those are given; the class is
        SofaRequest. A response carries SofaResponse as its class when it has a payload.
        """
        if not frame.is_request:
            return encode_response(
                frame.request_id,
                status=frame.status,
                headers=frame.headers,
                content=frame.payload,
                class_name=SOFA_RESPONSE_CLASS if frame.payload else "",
                heartbeat=frame.heartbeat,
            )
        headers = dict(frame.headers)
        if frame.service:
            target = unique_name(frame.service, frame.version, frame.group)
            headers[HEAD_SERVICE] = headers[HEAD_TARGET_SERVICE] = target
        if frame.method:
            headers[HEAD_METHOD_NAME] = frame.method
        return encode_request(
            frame.request_id,
            headers=headers,
            content=frame.payload,
            timeout_ms=round(frame.timeout * 1000) if frame.timeout else 0,
            oneway=frame.oneway,
            heartbeat=frame.heartbeat,
        )

    def set_request_id(self, raw: bytes, request_id: int) -> bytes:
        """Patch the id in place (offset 5 in v1, 6 in v2) and recompute a v2 CRC32."""
        if raw[:1] == b"\x01":
            at = 5
        elif raw[:1] == b"\x02":
            at = 6
        else:
            raise LocalProtocolError("bolt: set_request_id on a frame that is not Bolt")
        out = bytearray(raw)
        _U32.pack_into(out, at, request_id & _ID_MASK)
        if BoltWire.of(raw).crc:
            _U32.pack_into(out, len(out) - 4, zlib.crc32(memoryview(out)[:-4]))
        return bytes(out)

    def heartbeat(self, request_id: int) -> bytes:
        """A v1 hessian2 heartbeat request, as sofa-bolt's ``RpcHeartbeatTrigger`` sends."""
        return encode_request(request_id, heartbeat=True)

    def heartbeat_reply(self, request: RpcFrame) -> bytes:
        return encode_response(request.request_id, heartbeat=True, wire=BoltWire.of(request.raw))

    def local_reply(self, request: RpcFrame, kind: RpcErrorKind, message: str) -> bytes:
        """An error response in the request's wire; see the module docstring for the table."""
        wire = BoltWire.of(request.raw)
        return _error_response(wire, request.request_id, STATUS_FOR_KIND[kind], message)

    def error_reply(self, data: bytes, message: str) -> bytes | None:
        """CODEC_EXCEPTION for a two-way request whose fixed header is readable."""
        if data[:1] == b"\x01":
            type_at, fixed = 1, _HEAD_V1.size + _REQ_TAIL.size
        elif data[:1] == b"\x02" and len(data) > 1 and data[1] in (1, 2):
            type_at, fixed = 2, _HEAD_V2.size + _REQ_TAIL.size
        else:
            return None
        if len(data) < fixed or data[type_at] != TYPE_REQUEST:
            return None
        if (TYPE_REQUEST, int.from_bytes(data[type_at + 1 : type_at + 3])) not in _VALID_COMMANDS:
            return None
        (request_id,) = _U32.unpack_from(data, type_at + 4)
        return _error_response(BoltWire.of(data), request_id, BoltStatus.CODEC_EXCEPTION, message)
