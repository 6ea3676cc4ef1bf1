"""Dubbo 2 (the ``dubbo://`` protocol of Apache Dubbo 2.x/3.x) with hessian2 bodies.

Every frame is a 16-byte header and a body::

     0      2      3        4                            12              16
    +------+------+--------+----------------------------+---------------+-------------+
    | da bb| flag | status |  request id (u64, BE)      | body length   | body ...    |
    +------+------+--------+----------------------------+---------------+-------------+
    flag:   0x80 request | 0x40 two-way | 0x20 event | low 5 bits: serialization (2 = hessian2)
    status: responses only (20 OK, 30/31 client/server timeout, 40 bad request, 50 bad
            response, 60 service not found, 70 service error, 80 server error, 90 client
            error, 100 server thread pool exhausted)

    request body (hessian2 values, one after another):
        dubbo-version  path  version  method  param-types  arg*  attachments
        (param-types is a JVM descriptor, "Ljava/lang/String;I" = two args)
    response body:
        status 20: response type (int 0-5: exception, value, null, and the same three with
                   attachments after them), then the value or exception
        otherwise: the error message (string)
    heartbeat: an event frame (request, or response with status 20) whose body is null 'N'

Decoding reads only the routing strings and the attachments; the arguments are stepped
over with :meth:`Hessian2Reader.skip`. ``service`` is the path, which is what the provider
looks its exporter up by, even when the attachments also carry an ``interface`` (they differ
when one interface is exported under several paths). Attachments with string values become
``headers``; ``group`` and ``timeout`` (milliseconds, a number or a numeric string) come
from them.

Only hessian2 bodies can be read: a request in any other serialization raises
:class:`RpcProtocolError` (its routing fields are unreadable, so it cannot be routed).
Responses in other serializations are still framed, with ``ok`` from the status alone;
they only arise if an upstream answers in a serialization it was not asked in.

Local replies use the statuses a Dubbo client knows. Java's DefaultFuture raises a
TimeoutException for 30/31 and a RemotingException carrying the message for any other
non-20 status, so beyond timeouts the status is for logs and metrics, and the message is
what the user reads:

    ==========================  =====================================================
    RpcErrorKind                status
    ==========================  =====================================================
    NO_ROUTE                    60 SERVICE_NOT_FOUND (as Envoy's and MOSN's Dubbo proxies)
    NO_HEALTHY_UPSTREAM         60 SERVICE_NOT_FOUND: no provider can serve it (as MOSN)
    UPSTREAM_UNAVAILABLE        80 SERVER_ERROR: the provider failed mid-way (as Envoy)
    TIMEOUT                     31 SERVER_TIMEOUT: the client raises its TimeoutException
    RATE_LIMITED, CIRCUIT_OPEN  100 SERVER_THREADPOOL_EXHAUSTED: Dubbo's overload signal
    BAD_REQUEST                 40 BAD_REQUEST
    ==========================  =====================================================
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from enum import IntEnum
from typing import ClassVar

from shoal.codec.rpc.base import (
    DEFAULT_MAX_FRAME_BYTES,
    FrameDecoder,
    RpcCodec,
    RpcErrorKind,
    RpcFrame,
    RpcProtocolError,
)
from shoal.codec.rpc.hessian2 import Hessian2Reader, write_string, write_string_map

HEADER_BYTES = 16
MAGIC = b"\xda\xbb"
FLAG_REQUEST = 0x80
FLAG_TWOWAY = 0x40
FLAG_EVENT = 0x20
SERIALIZATION_MASK = 0x1F
HESSIAN2 = 2


class Status(IntEnum):
    """Response statuses (header byte 3)."""

    OK = 20
    CLIENT_TIMEOUT = 30
    SERVER_TIMEOUT = 31
    BAD_REQUEST = 40
    BAD_RESPONSE = 50
    SERVICE_NOT_FOUND = 60
    SERVICE_ERROR = 70
    SERVER_ERROR = 80
    CLIENT_ERROR = 90
    SERVER_THREADPOOL_EXHAUSTED = 100


# Response types (the first value of an OK response body) that carry an exception.
_EXCEPTION_TYPES = (0, 3)
_RESPONSE_TYPES = range(6)

# encode(): the pseudo-header carrying a request's parameter-types descriptor; a leading
# colon (as in HTTP/2 pseudo-headers) cannot clash with a Dubbo attachment key.
PARAM_TYPES_HEADER = ":param-types"

_STATUS_FOR = {
    RpcErrorKind.NO_ROUTE: Status.SERVICE_NOT_FOUND,
    RpcErrorKind.NO_HEALTHY_UPSTREAM: Status.SERVICE_NOT_FOUND,
    RpcErrorKind.UPSTREAM_UNAVAILABLE: Status.SERVER_ERROR,
    RpcErrorKind.TIMEOUT: Status.SERVER_TIMEOUT,
    RpcErrorKind.RATE_LIMITED: Status.SERVER_THREADPOOL_EXHAUSTED,
    RpcErrorKind.CIRCUIT_OPEN: Status.SERVER_THREADPOOL_EXHAUSTED,
    RpcErrorKind.BAD_REQUEST: Status.BAD_REQUEST,
}

_HEADER = struct.Struct(">2sBBQI")
_ID_MASK = (1 << 64) - 1
_NULL_BODY = b"N"

# One JVM parameter type: array dimensions, then a primitive or a class name.
_PARAM_TYPE = r"\[*(?:[ZBCSIJFD]|L[^;\[]+;)"
_DESCRIPTOR = re.compile(f"(?:{_PARAM_TYPE})*")
_PARAM_TYPES = re.compile(_PARAM_TYPE)
_param_counts: dict[str, int] = {}  # descriptors repeat: parse each once (bounded below)
_PARAM_COUNTS_MAX = 1024


def _param_count(descriptor: str) -> int:
    count = _param_counts.get(descriptor)
    if count is None:
        if _DESCRIPTOR.fullmatch(descriptor) is None:
            raise RpcProtocolError(f"dubbo: bad parameter types {descriptor[:100]!r}")
        count = len(_PARAM_TYPES.findall(descriptor))
        if len(_param_counts) >= _PARAM_COUNTS_MAX:
            _param_counts.clear()
        _param_counts[descriptor] = count
    return count


def _frame(flag: int, status: int, request_id: int, body: bytes | bytearray) -> bytes:
    header = _HEADER.pack(MAGIC, flag, status, request_id & _ID_MASK, len(body))
    return header + body


def encode_request(
    request_id: int,
    service: str,
    method: str,
    *,
    version: str = "",
    param_types: str = "",
    args: bytes = b"",
    attachments: Mapping[str, str] | None = None,
    dubbo_version: str = "2.0.2",
    twoway: bool = True,
) -> bytes:
    """A hessian2 request; ``args`` are the arguments already hessian2-encoded, one value
    per type in the ``param_types`` descriptor."""
    body = bytearray()
    for field in (dubbo_version, service, version, method, param_types):
        write_string(body, field)
    body += args
    write_string_map(body, attachments or {})
    flag = FLAG_REQUEST | HESSIAN2 | (FLAG_TWOWAY if twoway else 0)
    return _frame(flag, 0, request_id, body)


def encode_response(
    request_id: int, *, status: int = Status.OK, body: bytes = b"", event: bool = False
) -> bytes:
    """A hessian2 response around ``body`` (see the module docstring for its layout)."""
    return _frame(HESSIAN2 | (FLAG_EVENT if event else 0), status, request_id, body)


def _error_response(request_id: int, status: int, message: str) -> bytes:
    body = bytearray()
    write_string(body, message)
    return _frame(HESSIAN2, status, request_id, body)


def _timeout(numbers: dict[str, int], headers: dict[str, str]) -> float | None:
    """The "timeout" attachment (ms) in seconds; absent, non-numeric or <= 0: None."""
    millis = numbers.get("timeout")
    if millis is None:
        text = headers.get("timeout", "")
        if not (text.isascii() and text.isdigit()):
            return None
        millis = int(text)
    return millis / 1000 if millis > 0 else None


def _decode(raw: bytes) -> RpcFrame:
    """One complete frame (``raw`` is header and body)."""
    flag = raw[2]
    request_id = int.from_bytes(raw[4:12], "big")
    hessian2 = flag & SERIALIZATION_MASK == HESSIAN2
    event = bool(flag & FLAG_EVENT)
    if flag & FLAG_REQUEST:
        if not hessian2:
            raise RpcProtocolError(
                f"dubbo: serialization {flag & SERIALIZATION_MASK} is not supported, "
                "only hessian2 (2)"
            )
        oneway = not flag & FLAG_TWOWAY
        if event:  # a heartbeat, or another event (e.g. "R", readonly) that is not routed
            return RpcFrame(
                is_request=True,
                request_id=request_id,
                raw=raw,
                heartbeat=raw[HEADER_BYTES:] == _NULL_BODY,
                oneway=oneway,
                payload=raw[HEADER_BYTES:],
            )
        return _decode_request(raw, request_id, oneway)
    status = raw[3]
    ok = status == Status.OK
    if event:
        heartbeat = not hessian2 or raw[HEADER_BYTES:] == _NULL_BODY
    else:
        heartbeat = False
        if ok and hessian2:
            kind = Hessian2Reader(raw, HEADER_BYTES).read_int()
            if kind not in _RESPONSE_TYPES:
                raise RpcProtocolError(f"dubbo: unknown response type {kind}")
            ok = kind not in _EXCEPTION_TYPES
    return RpcFrame(
        is_request=False,
        request_id=request_id,
        raw=raw,
        heartbeat=heartbeat,
        status=status,
        ok=ok,
        payload=raw[HEADER_BYTES:],
    )


def _decode_request(raw: bytes, request_id: int, oneway: bool) -> RpcFrame:
    reader = Hessian2Reader(raw, HEADER_BYTES)
    reader.read_string()  # the Dubbo version; nothing to route on
    service = reader.read_string()
    version = reader.read_string()
    method = reader.read_string()
    params = _param_count(reader.read_string())
    start = reader.pos
    for _ in range(params):
        reader.skip()
    numbers: dict[str, int] = {}
    # A body that ends right after the arguments has no attachments: nothing to route on.
    headers = reader.read_string_map(numbers) if reader.pos < len(raw) else {}
    return RpcFrame(
        is_request=True,
        request_id=request_id,
        raw=raw,
        oneway=oneway,
        service=service,
        method=method,
        version=version,
        group=headers.get("group", ""),
        headers=headers,
        timeout=_timeout(numbers, headers),
        payload=raw[start:],
    )


class DubboDecoder(FrameDecoder):
    """Splits a byte stream into Dubbo frames; checks each length before buffering for it."""

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        super().__init__(max_frame_bytes)
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[RpcFrame]:
        buf = self._buf
        if buf:
            buf += data
            view: bytes | bytearray = buf
        else:
            view = data  # nothing pending: parse the caller's bytes without a copy
        size = len(view)
        pos = 0
        frames: list[RpcFrame] = []
        try:
            while size - pos >= HEADER_BYTES:
                if view[pos] != 0xDA or view[pos + 1] != 0xBB:
                    raise RpcProtocolError("dubbo: bad magic, not at a frame boundary")
                end = pos + HEADER_BYTES + int.from_bytes(view[pos + 12 : pos + 16], "big")
                if end - pos > self.max_frame_bytes:
                    raise RpcProtocolError(
                        f"dubbo: frame of {end - pos} bytes exceeds {self.max_frame_bytes}"
                    )
                if end > size:
                    break
                # bytes(bytes) is no copy: a feed of exactly one frame is not copied at all
                frames.append(_decode(bytes(view if end - pos == size else view[pos:end])))
                pos = end
            if pos < size and (view[pos] != 0xDA or (size - pos > 1 and view[pos + 1] != 0xBB)):
                raise RpcProtocolError("dubbo: bad magic, not at a frame boundary")
        except RpcProtocolError as exc:
            raise exc.located(frames, view[pos:]) from None
        if buf:
            del buf[:pos]
        elif pos < size:
            buf += memoryview(data)[pos:]
        return frames


class DubboCodec(RpcCodec):
    """Dubbo 2 with hessian2 bodies (see the module docstring)."""

    name: ClassVar[str] = "dubbo"
    multiplexed: ClassVar[bool] = True
    magic: ClassVar[bytes] = MAGIC

    def decoder(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> FrameDecoder:
        return DubboDecoder(max_frame_bytes)

    def encode(self, frame: RpcFrame) -> bytes:
        """Requests: ``payload`` is the hessian2-encoded arguments (attachments come from
        ``headers``, plus ``group`` and ``timeout``), and the parameter-types descriptor
        travels in ``headers[PARAM_TYPES_HEADER]``; unlike a decoded request's payload,
        which ends with the attachments (forward its ``raw`` instead). Responses:
        ``payload`` is the whole body, as decoded; ``status`` 0 means OK."""
        if frame.is_request:
            if frame.heartbeat:
                return self.heartbeat(frame.request_id)
            attachments = dict(frame.headers)
            param_types = attachments.pop(PARAM_TYPES_HEADER, "")
            if frame.group:
                attachments["group"] = frame.group
            if frame.timeout is not None:
                attachments.setdefault("timeout", str(round(frame.timeout * 1000)))
            return encode_request(
                frame.request_id,
                frame.service,
                frame.method,
                version=frame.version,
                param_types=param_types,
                args=frame.payload,
                attachments=attachments,
                twoway=not frame.oneway,
            )
        if frame.heartbeat:
            return encode_response(frame.request_id, body=_NULL_BODY, event=True)
        return encode_response(
            frame.request_id, status=frame.status or Status.OK, body=frame.payload
        )

    def set_request_id(self, raw: bytes, request_id: int) -> bytes:
        """Ids are unsigned 64-bit; larger or negative ones wrap."""
        new_id = (request_id & _ID_MASK).to_bytes(8, "big")
        return b"".join((raw[:4], new_id, memoryview(raw)[12:]))

    def heartbeat(self, request_id: int) -> bytes:
        flag = FLAG_REQUEST | FLAG_TWOWAY | FLAG_EVENT | HESSIAN2
        return _frame(flag, 0, request_id, _NULL_BODY)

    def heartbeat_reply(self, request: RpcFrame) -> bytes:
        return encode_response(request.request_id, body=_NULL_BODY, event=True)

    def local_reply(self, request: RpcFrame, kind: RpcErrorKind, message: str) -> bytes:
        """Always hessian2: decoded requests are (others are refused at decode)."""
        return _error_response(request.request_id, _STATUS_FOR[kind], message)

    def error_reply(self, data: bytes, message: str) -> bytes | None:
        """BAD_REQUEST to the request whose header starts ``data``, if it is one."""
        if len(data) < HEADER_BYTES or data[:2] != MAGIC or not data[2] & FLAG_REQUEST:
            return None
        return _error_response(int.from_bytes(data[4:12], "big"), Status.BAD_REQUEST, message)
