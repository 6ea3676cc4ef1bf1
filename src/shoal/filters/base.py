"""The filter contract: a filter looks at a routed request and lets it continue, answers it
locally, or holds it for a while (Envoy's Continue / local reply / StopIteration+resume).

Filters run only when configured, so a chain costs nothing on the default path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from shoal.codec.http1 import Headers
from shoal.config.filters import FilterConfig


@dataclass(slots=True)
class LocalReply:
    status: int
    body: bytes
    flags: str
    details: str
    headers: Headers = field(default_factory=list)


@dataclass(slots=True)
class Delay:
    """Hold the request ``seconds``; then answer ``then`` if set, else continue."""

    seconds: float
    then: LocalReply | None = None
    ended: Callable[[], None] | None = None  # told when the delay is over


@dataclass(slots=True)
class Wait:
    """Hold the request until ``start``'s callback brings the outcome (None: continue)."""

    start: Callable[[Callable[[LocalReply | None], None]], None]


Outcome = LocalReply | Delay | Wait | None

# cluster name → (host, port) of one of its hosts, for filters that call a service
Resolve = Callable[[str], tuple[str, int] | None]


class FilteredRequest(Protocol):
    """What a filter may read of the request."""

    @property
    def request_headers(self) -> Headers: ...
    @property
    def route_cluster(self) -> str: ...
    @property
    def connection_key(self) -> int: ...
    @property
    def remote_ip(self) -> str: ...
    def per_filter(self, name: str) -> FilterConfig | None: ...
    def on_finish(self, callback: Callable[[float, bool], None]) -> None:
        """Call ``callback(latency_seconds, ok)`` when the request ends (ok: no 5xx, no
        reset, no timeout)."""


class HttpFilter(Protocol):
    name: str
    stats: dict[str, int]  # cumulative counters, carried over when the config changes

    @property
    def config(self) -> FilterConfig: ...

    def on_request(self, request: FilteredRequest, now: float) -> Outcome: ...
    def counters(self) -> dict[str, int]: ...
    def gauges(self) -> dict[str, int]: ...
