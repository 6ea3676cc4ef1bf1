"""Cookies that a cookie hash policy with a ``ttl`` generates, byte for byte as Envoy does.

A request without the policy's cookie is hashed on a generated value, and the response
sets that value so the client's next requests carry it and reach the same host. Envoy
derives the value from the connection's two addresses (xxHash64 of ``remote`` + ``local``,
16 hex digits), so all requests of one connection get the same cookie; xxHash64 is
implemented here because the standard library has no xxHash. This runs only for requests
that lack the cookie.
"""

from __future__ import annotations

from shoal.config.model import HashPolicy

_P1 = 0x9E3779B185EBCA87
_P2 = 0xC2B2AE3D27D4EB4F
_P3 = 0x165667B19E3779F9
_P4 = 0x85EBCA77C2B2AE63
_P5 = 0x27D4EB2F165667C5
_MASK = 0xFFFFFFFFFFFFFFFF


def _rotl(value: int, bits: int) -> int:
    return ((value << bits) | (value >> (64 - bits))) & _MASK


def _round(acc: int, lane: int) -> int:
    return _rotl((acc + lane * _P2) & _MASK, 31) * _P1 & _MASK


def _merge(acc: int, lane: int) -> int:
    return ((acc ^ _round(0, lane)) * _P1 + _P4) & _MASK


def xxhash64(data: bytes, seed: int = 0) -> int:
    """XXH64 of ``data`` (the reference algorithm, as Envoy's ``HashUtil::xxHash64``)."""
    size = len(data)
    at = 0
    if size >= 32:
        v1, v2, v3, v4 = (
            (seed + _P1 + _P2) & _MASK,
            (seed + _P2) & _MASK,
            seed,
            (seed - _P1) & _MASK,
        )
        while at + 32 <= size:
            v1 = _round(v1, int.from_bytes(data[at : at + 8], "little"))
            v2 = _round(v2, int.from_bytes(data[at + 8 : at + 16], "little"))
            v3 = _round(v3, int.from_bytes(data[at + 16 : at + 24], "little"))
            v4 = _round(v4, int.from_bytes(data[at + 24 : at + 32], "little"))
            at += 32
        acc = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & _MASK
        for lane in (v1, v2, v3, v4):
            acc = _merge(acc, lane)
    else:
        acc = (seed + _P5) & _MASK
    acc = (acc + size) & _MASK
    while at + 8 <= size:
        acc ^= _round(0, int.from_bytes(data[at : at + 8], "little"))
        acc = (_rotl(acc, 27) * _P1 + _P4) & _MASK
        at += 8
    if at + 4 <= size:
        acc ^= int.from_bytes(data[at : at + 4], "little") * _P1 & _MASK
        acc = (_rotl(acc, 23) * _P2 + _P3) & _MASK
        at += 4
    while at < size:
        acc ^= data[at] * _P5 & _MASK
        acc = _rotl(acc, 11) * _P1 & _MASK
        at += 1
    acc = (acc ^ (acc >> 33)) * _P2 & _MASK
    acc = (acc ^ (acc >> 29)) * _P3 & _MASK
    return acc ^ (acc >> 32)


def generated_value(remote: str, local: str) -> str:
    """The cookie value Envoy generates for a connection from ``remote`` to ``local``
    (addresses as ``ip:port`` or ``[ip]:port``)."""
    return f"{xxhash64((remote + local).encode()):016x}"


def set_cookie(policy: HashPolicy, value: str) -> bytes:
    """The ``set-cookie`` value for a generated cookie, in Envoy's format:
    ``name="value"; Max-Age=ttl; Path=path; HttpOnly`` (no Max-Age for a 0 ttl, no Path
    for an empty one)."""
    text = f'{policy.name}="{value}"'
    if policy.ttl:
        text += f"; Max-Age={policy.ttl}"
    if policy.path:
        text += f"; Path={policy.path}"
    return (text + "; HttpOnly").encode("latin-1")


def set_cookie_line(policy: HashPolicy, value: str) -> bytes:
    """The HTTP/1.1 ``set-cookie`` header line for a generated cookie."""
    return b"set-cookie: %s\r\n" % set_cookie(policy, value)
