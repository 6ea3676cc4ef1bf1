"""Outlier detection: Envoy's passive health checking, per cluster.

The proxy reports every upstream result (:meth:`OutlierDetector.record_response`,
:meth:`~OutlierDetector.record_local_failure`, :meth:`~OutlierDetector.record_local_success`);
the detector ejects hosts that fail, and returns them when their ejection time is over.
It follows Envoy's ``outlier_detection_impl.cc``:

- *Consecutive errors*, checked on every result: ``consecutive_5xx`` (any 5xx),
  ``consecutive_gateway_failure`` (502, 503, 504) and, when
  ``split_external_local_origin_errors`` is set, ``consecutive_local_origin_failure``
  (connect failures, resets and timeouts of the proxy's own). A detection fires when a
  counter *reaches* its threshold; a non-5xx answer resets the external counters.
- Without the split, local-origin failures count as answers: a connect failure or reset
  as 503, a timeout as 504 (so they also feed the gateway-failure counter).
- *Success rate* and *failure percentage*, every ``interval``, over the requests of the
  interval just ended: hosts with enough requests (``*_request_volume``), when there are
  enough such hosts (``*_minimum_hosts``); success rate ejects hosts below
  ``mean - stdev_factor/1000 * stdev``, failure percentage those failing at least
  ``failure_percentage_threshold`` percent.
- A detection is *enforced* (the host really ejected) with probability ``enforcing_*``
  percent, and only if ejecting one more host keeps the ejected share within
  ``max_ejection_percent`` of the cluster (else ``ejections_overflow``), unless
  ``always_eject_one_host`` and none is ejected.
- The ejection time is ``base_ejection_time`` times a back-off that grows by one with each
  ejection and shrinks by one each interval the host spends back in service, capped at
  ``max_ejection_time``, plus a random jitter up to ``max_ejection_time_jitter``. Ejected
  hosts are checked at each interval tick, so a host returns at the first tick after its
  time is over. A successful active health check returns it at once
  (``successful_active_health_check_uneject_host``).

An ejected host is unhealthy for the load balancer (which still uses it in panic mode,
as Envoy does). Counters are Envoy's ``outlier_detection.*`` stats.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from typing import Final, Protocol

from shoal.config.model import OutlierDetection
from shoal.upstream.host import Host

# Ejection types, named as in Envoy's stats (ejections_detected_<type>, ...).
CONSECUTIVE_5XX: Final = "consecutive_5xx"
CONSECUTIVE_GATEWAY_FAILURE: Final = "consecutive_gateway_failure"
CONSECUTIVE_LOCAL_ORIGIN_FAILURE: Final = "consecutive_local_origin_failure"
SUCCESS_RATE: Final = "success_rate"
LOCAL_ORIGIN_SUCCESS_RATE: Final = "local_origin_success_rate"
FAILURE_PERCENTAGE: Final = "failure_percentage"
LOCAL_ORIGIN_FAILURE_PERCENTAGE: Final = "local_origin_failure_percentage"

# Envoy's outlier_detection counters (the gauge is ejections_active); ejections_total,
# ejections_consecutive_5xx and ejections_success_rate are Envoy's deprecated ones.
OUTLIER_COUNTERS: Final = (
    "ejections_consecutive_5xx",
    "ejections_detected_consecutive_5xx",
    "ejections_detected_consecutive_gateway_failure",
    "ejections_detected_success_rate",
    "ejections_detected_failure_percentage",
    "ejections_enforced_consecutive_5xx",
    "ejections_enforced_consecutive_gateway_failure",
    "ejections_enforced_success_rate",
    "ejections_enforced_failure_percentage",
    "ejections_detected_consecutive_local_origin_failure",
    "ejections_enforced_consecutive_local_origin_failure",
    "ejections_detected_local_origin_success_rate",
    "ejections_enforced_local_origin_success_rate",
    "ejections_detected_local_origin_failure_percentage",
    "ejections_enforced_local_origin_failure_percentage",
    "ejections_enforced_total",
    "ejections_overflow",
    "ejections_success_rate",
    "ejections_total",
)

# record_local_failure kinds: in Envoy's non-split mode, the answer each counts as
LOCAL_FAILURE_STATUS: Final = {"connect_failure": 503, "reset": 503, "timeout": 504}


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """What the detector needs of the event loop (``asyncio`` loops qualify); tests pass a
    fake one to move time by hand."""

    def time(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer: ...


class HostSet(Protocol):
    """The cluster as the detector sees it."""

    @property
    def hosts(self) -> list[Host]: ...

    def refresh_health(self) -> None:
        """Host health flags changed: rebuild the load balancer."""
        ...


class _Monitor:
    """One host's counters (Envoy's DetectorHostMonitorImpl)."""

    __slots__ = (
        "backoff",
        "consecutive_5xx",
        "consecutive_gateway",
        "consecutive_local",
        "ext_success",
        "ext_success_last",
        "ext_total",
        "ext_total_last",
        "host",
        "jitter",
        "last_ejection",
        "last_unejection",
        "local_success",
        "local_success_last",
        "local_success_rate",
        "local_total",
        "local_total_last",
        "num_ejections",
        "success_rate",
    )

    def __init__(self, host: Host) -> None:
        self.host = host
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.consecutive_local = 0
        # this interval's requests, and the last complete interval's (what detection reads)
        self.ext_total = 0
        self.ext_success = 0
        self.local_total = 0
        self.local_success = 0
        self.ext_total_last = 0
        self.ext_success_last = 0
        self.local_total_last = 0
        self.local_success_last = 0
        self.num_ejections = 0
        self.backoff = 0  # ejection time = base_ejection_time * backoff (capped)
        self.jitter = 0.0
        self.last_ejection = 0.0
        self.last_unejection = -1.0  # -1: never
        self.success_rate = -1.0  # last interval's, when it had enough requests (for /clusters)
        self.local_success_rate = -1.0

    def roll(self) -> None:
        self.ext_total_last, self.ext_success_last = self.ext_total, self.ext_success
        self.local_total_last, self.local_success_last = self.local_total, self.local_success
        self.ext_total = self.ext_success = self.local_total = self.local_success = 0


class OutlierDetector:
    __slots__ = (
        "_clock",
        "_cluster",
        "_dirty",
        "_enforcing",
        "_monitors",
        "_rng",
        "_timer",
        "config",
        "counters",
        "ejections_active",
        "success_rate_average",
        "success_rate_threshold",
    )

    def __init__(
        self,
        config: OutlierDetection,
        cluster: HostSet,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._cluster = cluster
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._timer: Timer | None = None
        self._dirty = False
        self._monitors: dict[str, _Monitor] = {}
        self.counters: dict[str, int] = dict.fromkeys(OUTLIER_COUNTERS, 0)
        self.ejections_active = 0
        # the last interval's cluster success rate and ejection threshold (-1: not computed)
        self.success_rate_average = -1.0
        self.success_rate_threshold = -1.0
        self._enforcing: dict[str, int] = {
            CONSECUTIVE_5XX: config.enforcing_consecutive_5xx,
            CONSECUTIVE_GATEWAY_FAILURE: config.enforcing_consecutive_gateway_failure,
            CONSECUTIVE_LOCAL_ORIGIN_FAILURE: config.enforcing_consecutive_local_origin_failure,
            SUCCESS_RATE: config.enforcing_success_rate,
            LOCAL_ORIGIN_SUCCESS_RATE: config.enforcing_local_origin_success_rate,
            FAILURE_PERCENTAGE: config.enforcing_failure_percentage,
            LOCAL_ORIGIN_FAILURE_PERCENTAGE: config.enforcing_failure_percentage_local_origin,
        }
        self.hosts_changed(cluster.hosts)

    # lifecycle ------------------------------------------------------------------------------

    def start(self, clock: Clock | None = None) -> None:
        """Start the interval timer (on the running event loop unless ``clock`` is given)."""
        if clock is not None:
            self._clock = clock
        elif self._clock is None:
            self._clock = asyncio.get_running_loop()
        self._arm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def hosts_changed(self, hosts: list[Host]) -> None:
        """The cluster's host set changed: monitor new hosts, forget removed ones."""
        old = self._monitors
        fresh: dict[str, _Monitor] = {}
        for host in hosts:
            monitor = old.get(host.key)
            if monitor is None or monitor.host is not host:
                monitor = _Monitor(host)
            fresh[host.key] = monitor
        for key, monitor in old.items():
            if fresh.get(key) is not monitor and monitor.host.ejected:
                self.ejections_active -= 1
        self._monitors = fresh

    # per-request results (the hot path) --------------------------------------------------

    def record_response(self, host: Host, status: int) -> None:
        """The upstream answered ``status`` (Envoy's putHttpResponseCode)."""
        monitor = self._monitors.get(host.key)
        if monitor is None:
            return  # no longer in the cluster
        monitor.ext_total += 1
        if 500 <= status < 600:
            config = self.config
            if status in (502, 503, 504):
                monitor.consecutive_gateway += 1
                if monitor.consecutive_gateway == config.consecutive_gateway_failure:
                    self._consecutive(monitor, CONSECUTIVE_GATEWAY_FAILURE)
            else:
                monitor.consecutive_gateway = 0
            monitor.consecutive_5xx += 1
            if monitor.consecutive_5xx == config.consecutive_5xx:
                self._consecutive(monitor, CONSECUTIVE_5XX)
        else:
            monitor.ext_success += 1
            monitor.consecutive_5xx = 0
            monitor.consecutive_gateway = 0

    def record_local_failure(self, host: Host, kind: str) -> None:
        """A failure of the proxy's own with ``host``: ``"connect_failure"``, ``"reset"``
        (the connection closed or reset before a response) or ``"timeout"`` (no response in
        time). Split mode counts it as a local-origin failure, otherwise as a 503 (504 for a
        timeout) answer, as Envoy does."""
        if not self.config.split_external_local_origin_errors:
            self.record_response(host, LOCAL_FAILURE_STATUS.get(kind, 503))
            return
        monitor = self._monitors.get(host.key)
        if monitor is None:
            return
        monitor.local_total += 1
        monitor.consecutive_local += 1
        if monitor.consecutive_local == self.config.consecutive_local_origin_failure:
            self._consecutive(monitor, CONSECUTIVE_LOCAL_ORIGIN_FAILURE)

    def record_local_success(self, host: Host, *, final: bool = False) -> None:
        """A connection to ``host`` was had for a request (Envoy's LocalOriginConnectSuccess,
        reported when the pool hands one over): in split mode, resets the consecutive
        local-origin failures and counts a local-origin success; otherwise nothing.

        ``final``: the connection is the whole exchange (the TCP proxy; Envoy's
        LocalOriginConnectSuccessFinal), which without the split counts as a 200 answer."""
        if not self.config.split_external_local_origin_errors:
            if final:
                self.record_response(host, 200)
            return
        monitor = self._monitors.get(host.key)
        if monitor is None:
            return
        monitor.local_total += 1
        monitor.local_success += 1
        monitor.consecutive_local = 0

    def health_check_passed(self, host: Host) -> None:
        """An active health check of ``host`` succeeded and it passes active health checking:
        an ejected host returns (``successful_active_health_check_uneject_host``)."""
        if not self.config.successful_active_health_check_uneject_host or host.hc_failed:
            return
        monitor = self._monitors.get(host.key)
        if monitor is not None and host.ejected:
            self._uneject(monitor, self._now())
            self._apply()

    # introspection ------------------------------------------------------------------------

    def num_ejections(self, host: Host) -> int:
        monitor = self._monitors.get(host.key)
        return monitor.num_ejections if monitor is not None else 0

    def ejection_time(self, host: Host) -> float:
        """How long an ejection of ``host`` lasts now (base x back-off, capped; no jitter)."""
        monitor = self._monitors.get(host.key)
        backoff = monitor.backoff if monitor is not None else 0
        config = self.config
        return min(config.base_ejection_time * backoff, config.max_ejection_time)

    def host_success_rate(self, host: Host) -> float:
        """The host's success rate (percent) in the last interval, -1 when not computed."""
        monitor = self._monitors.get(host.key)
        return monitor.success_rate if monitor is not None else -1.0

    # detection and ejection -----------------------------------------------------------------

    def _now(self) -> float:
        clock = self._clock
        return clock.time() if clock is not None else time.monotonic()

    def _arm(self) -> None:
        clock = self._clock
        if clock is not None:
            self._timer = clock.call_later(self.config.interval, self.on_interval)

    def _apply(self) -> None:
        if self._dirty:
            self._dirty = False
            self._cluster.refresh_health()

    def _consecutive(self, monitor: _Monitor, kind: str) -> None:
        """A consecutive-error threshold was reached (Envoy's onConsecutiveErrorWorker)."""
        if monitor.host.ejected:
            return
        self.counters["ejections_detected_" + kind] += 1
        self._eject(monitor, kind)
        if kind == CONSECUTIVE_5XX:
            self.counters["ejections_consecutive_5xx"] += 1
            monitor.consecutive_5xx = 0
        elif kind == CONSECUTIVE_GATEWAY_FAILURE:
            monitor.consecutive_gateway = 0
        else:
            monitor.consecutive_local = 0
        self._apply()

    def _eject(self, monitor: _Monitor, kind: str) -> None:
        config = self.config
        active = self.ejections_active
        allowed = 100.0 * (active + 1) / len(self._monitors) <= min(
            100, config.max_ejection_percent
        )
        if config.always_eject_one_host and active == 0:
            allowed = True
        if not allowed:
            self.counters["ejections_overflow"] += 1
            return
        if kind in (CONSECUTIVE_5XX, SUCCESS_RATE):
            self.counters["ejections_total"] += 1
        percent = self._enforcing[kind]
        if percent < 100 and (percent <= 0 or self._rng.randrange(100) >= percent):
            return
        self.ejections_active = active + 1
        self.counters["ejections_enforced_total"] += 1
        self.counters["ejections_enforced_" + kind] += 1
        monitor.num_ejections += 1
        monitor.last_ejection = self._now()
        jitter_ms = int(config.max_ejection_time_jitter * 1000)
        monitor.jitter = self._rng.randint(0, jitter_ms) / 1000 if jitter_ms > 0 else 0.0
        base = config.base_ejection_time
        if monitor.backoff * base < config.max_ejection_time + base:
            monitor.backoff += 1
        monitor.host.ejected = True
        monitor.host.update_health()
        self._dirty = True

    def _uneject(self, monitor: _Monitor, now: float) -> None:
        self.ejections_active -= 1
        monitor.host.ejected = False
        monitor.host.update_health()
        # fresh counters, so a few errors right after return do not eject again
        monitor.consecutive_5xx = monitor.consecutive_gateway = monitor.consecutive_local = 0
        monitor.last_unejection = now
        self._dirty = True

    def on_interval(self) -> None:
        """The interval tick: return hosts whose time is over, run success-rate and
        failure-percentage detection over the interval just ended, shrink back-offs."""
        config = self.config
        now = self._now()
        base, cap = config.base_ejection_time, config.max_ejection_time
        for monitor in self._monitors.values():
            if monitor.host.ejected:
                ejected_for = min(base * monitor.backoff, cap) + monitor.jitter
                # in whole milliseconds, as Envoy (and no float rounding surprises)
                if round(ejected_for * 1000) <= round((now - monitor.last_ejection) * 1000):
                    self._uneject(monitor, now)
            monitor.roll()
            monitor.success_rate = monitor.local_success_rate = -1.0
        self._rates(local=False)
        self._rates(local=True)
        for monitor in self._monitors.values():
            if (
                not monitor.host.ejected
                and monitor.backoff
                and monitor.last_unejection >= 0
                and round((now - monitor.last_unejection) * 1000) >= round(config.interval * 1000)
            ):
                monitor.backoff -= 1
        self._apply()
        self._arm()

    def _rates(self, *, local: bool) -> None:
        """Success-rate and failure-percentage detection (processSuccessRateEjections)."""
        config = self.config
        sr_volume = config.success_rate_request_volume
        fp_volume = config.failure_percentage_request_volume
        if not local:
            self.success_rate_average = self.success_rate_threshold = -1.0
        count = len(self._monitors)
        if count < config.success_rate_minimum_hosts and (
            count < config.failure_percentage_minimum_hosts
        ):
            return
        rated: list[tuple[_Monitor, float]] = []
        for_percentage: list[tuple[_Monitor, float]] = []
        total_rate = 0.0
        for monitor in self._monitors.values():
            if monitor.host.ejected:
                continue
            if local:
                total, success = monitor.local_total_last, monitor.local_success_last
            else:
                total, success = monitor.ext_total_last, monitor.ext_success_last
            if not total:
                continue
            rate = success * 100.0 / total
            if total >= min(sr_volume, fp_volume):
                if local:
                    monitor.local_success_rate = rate
                else:
                    monitor.success_rate = rate
            if total >= sr_volume:
                rated.append((monitor, rate))
                total_rate += rate
            if total >= fp_volume:
                for_percentage.append((monitor, rate))
        if rated and len(rated) >= config.success_rate_minimum_hosts:
            mean = total_rate / len(rated)
            variance = sum((rate - mean) ** 2 for _, rate in rated) / len(rated)
            threshold = mean - config.success_rate_stdev_factor / 1000.0 * math.sqrt(variance)
            if not local:
                self.success_rate_average, self.success_rate_threshold = mean, threshold
            kind = LOCAL_ORIGIN_SUCCESS_RATE if local else SUCCESS_RATE
            for monitor, rate in rated:
                if rate < threshold and not monitor.host.ejected:
                    self.counters["ejections_success_rate"] += 1
                    self.counters["ejections_detected_" + kind] += 1
                    self._eject(monitor, kind)
        if for_percentage and len(for_percentage) >= config.failure_percentage_minimum_hosts:
            kind = LOCAL_ORIGIN_FAILURE_PERCENTAGE if local else FAILURE_PERCENTAGE
            for monitor, rate in for_percentage:
                if 100.0 - rate >= config.failure_percentage_threshold and not (
                    monitor.host.ejected
                ):
                    self.counters["ejections_detected_" + kind] += 1
                    self._eject(monitor, kind)
