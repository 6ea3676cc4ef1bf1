"""A live upstream host: the mutable twin of a configured endpoint.

Load balancers, health checking, outlier detection and connection pools all read and
write the same object, so its state lives in plain slots (no locks: one event loop).
"""

from __future__ import annotations

from shoal.config.model import Locality, SocketAddress

_NO_LOCALITY = Locality()


class Host:
    __slots__ = (
        "active_requests",
        "address",
        "healthy",
        "hostname",
        "key",
        "locality",
        "priority",
        "rq_error",
        "rq_success",
        "weight",
    )

    def __init__(
        self,
        address: SocketAddress,
        *,
        weight: int = 1,
        priority: int = 0,
        locality: Locality = _NO_LOCALITY,
        healthy: bool = True,
        hostname: str = "",
    ) -> None:
        self.address = address
        self.key = str(address)  # "ip:port", also the hash ring identity
        self.weight = max(1, weight)
        self.priority = priority
        self.locality = locality
        self.healthy = healthy
        self.hostname = hostname
        self.active_requests = 0
        self.rq_success = 0
        self.rq_error = 0

    def __repr__(self) -> str:
        return f"Host({self.key}, w={self.weight}, p={self.priority}, healthy={self.healthy})"
