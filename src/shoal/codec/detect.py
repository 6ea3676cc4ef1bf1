"""Which protocol a connection speaks, from its first bytes (sans-IO).

Names follow Envoy's ``application_protocols`` (``http/1.1``, ``h2c``) and Shoal's RPC
codec names (``dubbo``, ``bolt``, ``motan2``), so a listener picks its filter chain by
``filter_chain_match.application_protocols`` as Envoy does after its http_inspector.
"""

from __future__ import annotations

from shoal.codec.rpc.base import Match
from shoal.codec.rpc.registry import CODECS

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# methods llhttp accepts, as the first token of an HTTP/1 request line
_HTTP_METHODS = (
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
)  # fmt: skip
_LONGEST_METHOD = max(map(len, _HTTP_METHODS)) + 1
# beyond this many bytes without a verdict, the connection is "unknown"
MAX_SNIFF_BYTES = 64


def detect(data: bytes) -> str | None:
    """The protocol ``data`` (a connection's first bytes) shows: a name, ``""`` when no
    protocol matches, or None when more bytes are needed."""
    waiting = False
    for name, codec in CODECS.items():
        verdict = codec.match(data)
        if verdict is Match.MATCH:
            return name
        waiting = waiting or verdict is Match.NEED_MORE
    http = _http(data)
    if http is not None:
        return http
    if _could_be_http(data):
        waiting = True
    if waiting and len(data) < MAX_SNIFF_BYTES:
        return None
    return ""


def _http(data: bytes) -> str | None:
    if data.startswith(H2_PREFACE):
        return "h2c"
    if H2_PREFACE.startswith(data):
        return None
    method, space, _ = data.partition(b" ")
    if not space or method not in _HTTP_METHODS:
        return None
    line_end = data.find(b"\r\n")
    if line_end < 0:
        # a long request line: HTTP all the same (1.1 unless its end says otherwise)
        return "http/1.1" if len(data) >= MAX_SNIFF_BYTES else None
    return "http/1.0" if data[:line_end].endswith(b"HTTP/1.0") else "http/1.1"


def _could_be_http(data: bytes) -> bool:
    if H2_PREFACE.startswith(data[: len(H2_PREFACE)]):
        return True
    method, space, _ = data.partition(b" ")
    if not space:
        return len(data) < _LONGEST_METHOD and any(m.startswith(data) for m in _HTTP_METHODS)
    return method in _HTTP_METHODS
