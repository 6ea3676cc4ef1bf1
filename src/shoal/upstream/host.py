"""A live upstream host: the mutable twin of a configured endpoint.

Load balancers, health checking, outlier detection and connection pools all read and
write the same object, so its state lives in plain slots (no locks: one event loop).

Health, as Envoy's health flags: a host is ``healthy`` for the load balancer when none of
``eds_unhealthy`` (the endpoint's configured ``health_status``), ``hc_failed`` (active
health checking, Envoy's ``FAILED_ACTIVE_HC``) and ``ejected`` (outlier detection,
``FAILED_OUTLIER_CHECK``) is set. Whoever changes a flag calls :meth:`Host.update_health`
and then has the cluster rebuild its balancer (``ClusterRuntime.refresh_health``).
"""

from __future__ import annotations

from shoal.config.model import Locality, SocketAddress

_NO_LOCALITY = Locality()


class Host:
    __slots__ = (
        "active_requests",
        "address",
        "eds_unhealthy",
        "ejected",
        "hc_failed",
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
        self.eds_unhealthy = not healthy
        self.hc_failed = False
        self.ejected = False
        self.healthy = healthy
        self.hostname = hostname
        self.active_requests = 0
        self.rq_success = 0
        self.rq_error = 0

    def update_health(self) -> bool:
        """Recompute ``healthy`` from the flags; True if it changed."""
        healthy = not (self.eds_unhealthy or self.hc_failed or self.ejected)
        if healthy == self.healthy:
            return False
        self.healthy = healthy
        return True

    def health_flags(self) -> str:
        """Envoy's ``/clusters`` health_flags: ``healthy`` or the failed flags."""
        flags = ""
        if self.hc_failed:
            flags += "/failed_active_hc"
        if self.ejected:
            flags += "/failed_outlier_check"
        if self.eds_unhealthy:
            flags += "/failed_eds_health"
        return flags or "healthy"

    def __repr__(self) -> str:
        return f"Host({self.key}, w={self.weight}, p={self.priority}, healthy={self.healthy})"
