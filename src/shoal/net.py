"""Addresses as people write them on command lines and in metadata."""

from __future__ import annotations


def split_address(text: str, *, require_host: bool = True, lowest_port: int = 0) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); ``ValueError`` saying what was expected.

    Without ``require_host`` an empty host (``:8081``) is allowed and returned as "" (the
    caller decides what it means); ``lowest_port`` 1 refuses port 0 where 0 cannot mean
    "any free port"."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if (
        not sep
        or (require_host and not host)
        or not port.isdigit()
        or not lowest_port <= int(port) <= 65535
    ):
        raise ValueError(f"expected HOST:PORT, not {text!r}")
    return host, int(port)
