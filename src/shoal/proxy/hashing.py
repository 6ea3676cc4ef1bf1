"""A request's hash key for the ring-hash and Maglev balancers, from the route's
``hash_policy`` (header, cookie, source IP, query parameter), the same for HTTP/1.1 and
HTTP/2; policies combine as Envoy's do (rotate and xor), a ``terminal`` one ends the walk."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qsl

from shoal.codec.http1 import Headers, header_value
from shoal.config.model import HashPolicy, LbPolicy
from shoal.upstream.lb import hash_key_of

HASHING_LBS = (LbPolicy.RING_HASH, LbPolicy.MAGLEV)


def request_hash(
    policies: tuple[HashPolicy, ...],
    headers: Headers,
    path: str,
    remote_ip: str,
    generate: Callable[[HashPolicy], str] | None,
) -> int | None:
    """The request's hash key, None when no policy found its value. A missing cookie is
    made by ``generate`` (which sets it on the response) only when given: only a balancer
    that uses the hash makes Envoy evaluate the policies."""
    combined: int | None = None
    for policy in policies:
        value: str | None
        if policy.kind == "header":
            value = header_value(headers, policy.name.encode("latin-1"))
        elif policy.kind == "source_ip":
            value = remote_ip
        elif policy.kind == "cookie":
            value = cookie(headers, policy.name) or None
            if value is None and policy.ttl is not None and generate is not None:
                value = generate(policy)
        else:
            value = query_param(path, policy.name)
        if value is None:
            continue
        key = hash_key_of(value)
        combined = key if combined is None else ((combined << 1 | combined >> 63) ^ key)
        combined &= 0xFFFFFFFFFFFFFFFF
        if policy.terminal:
            break
    return combined


def cookie(headers: Headers, name: str) -> str | None:
    raw = header_value(headers, b"cookie")
    if raw is None:
        return None
    for part in raw.replace(",", ";").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            # a value may be quoted (RFC 6265), as generated cookies are; Envoy unquotes it
            quoted = len(value) >= 2 and value[0] == value[-1] == '"'
            return value[1:-1] if quoted else value
    return None


def query_param(path: str, name: str) -> str | None:
    for key, value in parse_qsl(path.partition("?")[2], keep_blank_values=True):
        if key == name:
            return value
    return None
