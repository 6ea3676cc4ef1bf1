"""``envoy.filters.http.fault``: inject delays and aborts, by share or by request header.

Header control (Envoy's): with ``header_abort`` the status comes from
``x-envoy-fault-abort-request``; with ``header_delay`` the delay (ms) from
``x-envoy-fault-delay-request``; ``x-envoy-fault-*-request-percentage`` lowers the share.
A delay then an abort apply in that order, as in Envoy.
"""

from __future__ import annotations

import random

from shoal.codec.http1 import header_value
from shoal.config.filters import Fault, FaultAbort, FaultDelay
from shoal.filters.base import Delay, FilteredRequest, LocalReply, Outcome


class FaultFilter:
    def __init__(self, name: str, config: Fault, rng: random.Random | None = None) -> None:
        self.name = name
        self.config = config
        self.rng = rng or random.Random()
        self.active = 0
        self.stats = {"delays_injected": 0, "aborts_injected": 0, "faults_overflow": 0}

    def on_request(self, request: FilteredRequest, now: float) -> Outcome:
        override = request.per_filter(self.name)
        config = override if isinstance(override, Fault) else self.config
        headers = request.request_headers
        if config.upstream_cluster and config.upstream_cluster != request.route_cluster:
            return None
        for matcher in config.headers:
            if not matcher.test(header_value(headers, matcher.name.encode("latin-1"))):
                return None
        delay = self._delay(config.delay, request)
        abort = self._abort(config.abort, request)
        if delay is None and abort is None:
            return None
        if config.max_active_faults is not None and self.active >= config.max_active_faults:
            self.stats["faults_overflow"] += 1
            return None
        if abort is not None:
            self.stats["aborts_injected"] += 1
        if delay is None:
            return abort
        self.stats["delays_injected"] += 1
        self.active += 1
        return Delay(delay, abort, self._delay_ended)

    def _delay_ended(self) -> None:
        self.active -= 1

    def counters(self) -> dict[str, int]:
        return dict(self.stats)

    def gauges(self) -> dict[str, int]:
        return {"active_faults": self.active}

    def _chosen(self, fraction: float, request: FilteredRequest, header: bytes) -> bool:
        percent = _number(header_value(request.request_headers, header))
        if percent is not None:
            fraction = min(fraction, percent / 100.0)
        return fraction >= 1.0 or self.rng.random() < fraction

    def _delay(self, delay: FaultDelay | None, request: FilteredRequest) -> float | None:
        if delay is None:
            return None
        seconds = delay.seconds
        if delay.header_controlled:
            millis = _number(header_value(request.request_headers, b"x-envoy-fault-delay-request"))
            if millis is None:
                return None
            seconds = millis / 1000.0
        if not self._chosen(delay.fraction, request, b"x-envoy-fault-delay-request-percentage"):
            return None
        return seconds

    def _abort(self, abort: FaultAbort | None, request: FilteredRequest) -> LocalReply | None:
        if abort is None:
            return None
        status = abort.status
        if abort.header_controlled:
            wanted = _number(header_value(request.request_headers, b"x-envoy-fault-abort-request"))
            if wanted is None or not 200 <= wanted < 600:
                return None
            status = int(wanted)
        if not self._chosen(abort.fraction, request, b"x-envoy-fault-abort-request-percentage"):
            return None
        return LocalReply(status, b"fault filter abort", "FI", "fault_filter_abort")


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None
