"""Envoy-style stats: latency histograms, scrape snapshots, and their two renderings.

Counters and gauges are plain ints on the objects that own them (the proxy does
``cluster.stats.upstream_rq_2xx += 1``); only at scrape time are they gathered into a
:class:`Snapshot` keyed by Envoy's dotted stat names.  The hot path touches this module
only through :meth:`Histogram.record`, one ``bisect`` and two additions.

Worker processes send snapshots over a pipe (:meth:`Snapshot.to_json`) and the admin
process sums them with :func:`merge`, then renders Envoy's ``/stats`` text
(:func:`render_text`) or ``/stats/prometheus`` (:func:`render_prometheus`, with Envoy's
tag extraction so dashboards built for Envoy work unchanged).

Labelled series (Istio's standard metrics) travel beside them, keyed by metric name and
their rendered label text, so merging workers is a sum per key like any other stat.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import pairwise
from typing import Any, Final

# Envoy's default histogram bucket upper bounds, in milliseconds.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
    30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
)  # fmt: skip

# The quantiles of Envoy's /stats summary line (P0 ... P100).
QUANTILES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0)


class Histogram:
    """Counts per bucket (``le`` semantics, plus an overflow bucket), and the sum.

    Cumulative since start, as Envoy's Prometheus output is; picklable, and mergeable
    across processes with :meth:`merge`.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = DEFAULT_BUCKETS) -> None:
        bounds = tuple(bounds)
        if not bounds or any(a >= b for a, b in pairwise(bounds)):
            raise ValueError(f"histogram bounds must be increasing: {bounds}")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # counts[i]: bounds[i-1] < v <= bounds[i]
        self.sum = 0.0

    def record(self, value_ms: float) -> None:
        """Count one value (milliseconds for latency histograms)."""
        self.counts[bisect_left(self.bounds, value_ms)] += 1
        self.sum += value_ms

    @property
    def count(self) -> int:
        return sum(self.counts)

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s samples to this histogram (same bounds required)."""
        if other.bounds != self.bounds:
            raise ValueError("cannot merge histograms with different bounds")
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum

    def copy(self) -> Histogram:
        clone = Histogram(self.bounds)
        clone.counts = list(self.counts)
        clone.sum = self.sum
        return clone

    def cumulative(self) -> list[int]:
        """Samples ``<= bounds[i]`` for each bound (Prometheus ``_bucket`` values)."""
        out = []
        running = 0
        for n in self.counts[:-1]:
            running += n
            out.append(running)
        return out

    def quantile(self, q: float) -> float:
        """Estimate the ``q`` quantile (0..1) by linear interpolation inside its bucket.

        The first bucket starts at 0; a quantile that falls in the overflow bucket is the
        last bound, as Prometheus' ``histogram_quantile`` does.  NaN when empty.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be within [0, 1]: {q}")
        total = self.count
        if not total:
            return math.nan
        rank = q * total
        below = 0
        lower = 0.0
        for upper, n in zip(self.bounds, self.counts, strict=False):
            if n and below + n >= rank:
                return lower + (upper - lower) * (rank - below) / n
            below += n
            lower = upper
        return self.bounds[-1]

    def quantile_summary(self) -> str:
        """Envoy's /stats histogram line: ``P0(interval,cumulative) ... P100(...)``.

        Only cumulative values are kept, so the interval column is ``nan``.
        """
        if not self.count:
            return "No recorded values"
        return " ".join(f"P{q * 100:g}(nan,{_short(self.quantile(q))})" for q in QUANTILES)

    def __repr__(self) -> str:
        return f"Histogram(count={self.count}, sum={self.sum}, counts={self.counts})"


class RouteStats:
    """Envoy's stats of one route with a ``stat_prefix``, rooted at
    ``vhost.<virtual host>.route.<stat_prefix>.`` (the set Envoy documents for virtual
    clusters): counters as plain ints, bumped by the proxy where it bumps the cluster's,
    and ``upstream_rq_time``. Every route with the same virtual host name and stat prefix
    shares one object (see :class:`RouteStatsRegistry`), so counters survive reloads.

    The HTTP/1 and HTTP/2 paths use it the same way: ``upstream_rq_total += 1`` per try
    started; ``upstream_rq_retry``, ``upstream_rq_retry_overflow``,
    ``upstream_rq_retry_limit_exceeded`` and ``upstream_rq_retry_success`` where the
    cluster's retry counters move (the limit: a retriable failure with no retries left);
    ``upstream_rq_timeout += 1`` when the route's timeout fires; and :meth:`record` once
    when the request ends.
    """

    __slots__ = (
        "codes",
        "prefix",
        "upstream_rq_retry",
        "upstream_rq_retry_limit_exceeded",
        "upstream_rq_retry_overflow",
        "upstream_rq_retry_success",
        "upstream_rq_time",
        "upstream_rq_timeout",
        "upstream_rq_total",
    )

    def __init__(self, vhost: str, stat_prefix: str) -> None:
        self.prefix = f"vhost.{vhost}.route.{stat_prefix}."
        self.upstream_rq_total = 0
        self.upstream_rq_timeout = 0
        self.upstream_rq_retry = 0
        self.upstream_rq_retry_limit_exceeded = 0
        self.upstream_rq_retry_overflow = 0
        self.upstream_rq_retry_success = 0
        self.codes: dict[int, int] = {}  # status sent downstream → requests
        self.upstream_rq_time = Histogram()

    def record(self, status: int, upstream_ms: float) -> None:
        """A request on this route ended, with ``status`` sent downstream (0: none, not
        counted) and its upstream time in milliseconds, from the answering try's start to
        the end of its response (negative: no complete upstream answer, e.g. a timeout or a
        reset, which counts a status but no time)."""
        if status:
            codes = self.codes
            codes[status] = codes.get(status, 0) + 1
        if upstream_ms >= 0.0:
            self.upstream_rq_time.record(upstream_ms)

    def report(self, counters: dict[str, int], histograms: dict[str, Histogram]) -> None:
        """Add this route's stats to a scrape, named as Envoy names them: the counters
        and ``upstream_rq_time`` always; ``upstream_rq_<code>``, ``upstream_rq_<N>xx``
        and ``upstream_rq_completed`` once a response was counted."""
        prefix = self.prefix
        counters[prefix + "upstream_rq_total"] = self.upstream_rq_total
        counters[prefix + "upstream_rq_timeout"] = self.upstream_rq_timeout
        counters[prefix + "upstream_rq_retry"] = self.upstream_rq_retry
        counters[prefix + "upstream_rq_retry_limit_exceeded"] = (
            self.upstream_rq_retry_limit_exceeded
        )
        counters[prefix + "upstream_rq_retry_overflow"] = self.upstream_rq_retry_overflow
        counters[prefix + "upstream_rq_retry_success"] = self.upstream_rq_retry_success
        histograms[prefix + "upstream_rq_time"] = self.upstream_rq_time
        if not self.codes:
            return
        classes: dict[int, int] = {}
        for code, count in self.codes.items():
            counters[f"{prefix}upstream_rq_{code}"] = count
            classes[code // 100] = classes.get(code // 100, 0) + count
        for klass, count in classes.items():
            counters[f"{prefix}upstream_rq_{klass}xx"] = count
        counters[prefix + "upstream_rq_completed"] = sum(classes.values())


class RouteStatsRegistry:
    """This process's :class:`RouteStats` by (virtual host name, stat prefix): routes of a
    new config version (or of another listener) with the same names count on into the
    same object; :meth:`retain` forgets the ones no live config uses."""

    __slots__ = ("routes",)

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], RouteStats] = {}

    def get(self, vhost: str, stat_prefix: str) -> RouteStats:
        key = (vhost, stat_prefix)
        stats = self.routes.get(key)
        if stats is None:
            stats = self.routes[key] = RouteStats(vhost, stat_prefix)
        return stats

    def retain(self, keys: set[tuple[str, str]]) -> None:
        """Forget every route not in ``keys`` (removed from the config): as in Envoy,
        stats of a route that comes back start from zero."""
        for key in [key for key in self.routes if key not in keys]:
            del self.routes[key]

    def report(self, counters: dict[str, int], histograms: dict[str, Histogram]) -> None:
        for stats in self.routes.values():
            stats.report(counters, histograms)


# the route stats of this process, read by ProxyRuntime.snapshot()
ROUTE_STATS: Final = RouteStatsRegistry()


def _short(value: float) -> str:
    """A float as Envoy's fmt ``{}`` prints it (shortest form, no trailing ``.0``), after
    rounding to 12 significant digits so interpolation noise (``9.995000000000001``) goes."""
    text = repr(float(f"{value:.12g}"))
    return text[:-2] if text.endswith(".0") else text


@dataclass(slots=True)
class Snapshot:
    """All stats of one process (or the merge of several), keyed by Envoy's dotted names;
    labelled series by metric name, then by their Prometheus label text
    (``reporter="source",...``)."""

    counters: dict[str, int] = field(default_factory=dict)
    gauges: dict[str, int] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)
    labelled_counters: dict[str, dict[str, int]] = field(default_factory=dict)
    labelled_histograms: dict[str, dict[str, Histogram]] = field(default_factory=dict)

    def to_json(self) -> str:
        """Compact JSON for sending a worker's snapshot over a pipe."""
        return json.dumps(
            {
                "counters": self.counters,
                "gauges": self.gauges,
                "histograms": {name: _histogram_json(h) for name, h in self.histograms.items()},
                "labelled_counters": self.labelled_counters,
                "labelled_histograms": {
                    metric: {labels: _histogram_json(h) for labels, h in series.items()}
                    for metric, series in self.labelled_histograms.items()
                },
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Snapshot:
        """Inverse of :meth:`to_json`; ``ValueError`` on a malformed snapshot."""
        data: dict[str, Any] = json.loads(text)
        return cls(
            counters={name: int(v) for name, v in data["counters"].items()},
            gauges={name: int(v) for name, v in data["gauges"].items()},
            histograms={
                name: _histogram_from_json(name, h) for name, h in data["histograms"].items()
            },
            labelled_counters={
                metric: {labels: int(v) for labels, v in series.items()}
                for metric, series in data.get("labelled_counters", {}).items()
            },
            labelled_histograms={
                metric: {
                    labels: _histogram_from_json(f"{metric}{{{labels}}}", h)
                    for labels, h in series.items()
                }
                for metric, series in data.get("labelled_histograms", {}).items()
            },
        )


def _histogram_json(histogram: Histogram) -> dict[str, Any]:
    return {"bounds": histogram.bounds, "counts": histogram.counts, "sum": histogram.sum}


def _histogram_from_json(name: str, fields: dict[str, Any]) -> Histogram:
    histogram = Histogram(fields["bounds"])
    counts = [int(n) for n in fields["counts"]]
    if len(counts) != len(histogram.counts):
        raise ValueError(f"histogram {name!r}: counts do not match bounds")
    histogram.counts = counts
    histogram.sum = float(fields["sum"])
    return histogram


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Sum snapshots (e.g. one per worker process) into a new one; inputs are unchanged.

    Gauges are summed too, which is right for per-process quantities (active
    connections) but not for ones every process holds a copy of (cluster membership):
    report those from one process only.
    """
    out = Snapshot()
    for snapshot in snapshots:
        for name, value in snapshot.counters.items():
            out.counters[name] = out.counters.get(name, 0) + value
        for name, value in snapshot.gauges.items():
            out.gauges[name] = out.gauges.get(name, 0) + value
        _merge_histograms(out.histograms, snapshot.histograms)
        for metric, series in snapshot.labelled_counters.items():
            counts = out.labelled_counters.setdefault(metric, {})
            for labels, value in series.items():
                counts[labels] = counts.get(labels, 0) + value
        for metric, histograms in snapshot.labelled_histograms.items():
            _merge_histograms(out.labelled_histograms.setdefault(metric, {}), histograms)
    return out


def _merge_histograms(into: dict[str, Histogram], histograms: dict[str, Histogram]) -> None:
    for name, histogram in histograms.items():
        mine = into.get(name)
        if mine is None:
            into[name] = histogram.copy()
        else:
            mine.merge(histogram)


# --- /stats ----------------------------------------------------------------------------------


def render_text(snapshot: Snapshot) -> str:
    """Envoy's ``/stats``: counters and gauges sorted together, then histograms; labelled
    series after each as ``name{labels}``."""
    values = {**snapshot.counters, **snapshot.gauges}
    for metric, series in snapshot.labelled_counters.items():
        values.update((f"{metric}{{{labels}}}", value) for labels, value in series.items())
    histograms = dict(snapshot.histograms)
    for metric, by_labels in snapshot.labelled_histograms.items():
        histograms.update((f"{metric}{{{labels}}}", h) for labels, h in by_labels.items())
    lines = [f"{name}: {values[name]}\n" for name in sorted(values)]
    lines += [f"{name}: {histograms[name].quantile_summary()}\n" for name in sorted(histograms)]
    return "".join(lines)


# --- /stats/prometheus -------------------------------------------------------------------------

# Envoy's default tag extractors for the common stats, in Envoy's order.  Each regex runs
# on the full dotted name; group 1 is cut out of the name, group 2 (else 1) is the value.
_TAG_EXTRACTORS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (tag, re.compile(regex, re.ASCII))
    for tag, regex in (
        ("envoy_response_code", r"_rq(_(\d{3}))$"),
        ("envoy_response_code_class", r"_rq_(\d)xx$"),
        # per-route stats (Route.stat_prefix); like Envoy's tokenized extractors, a name
        # holding dots gives its first part only, and the rest stays in the metric name
        ("envoy_virtual_cluster", r"^vhost\.[^.]+\.vcluster\.(([^.]+)\.)"),
        ("envoy_virtual_host", r"^vhost\.(([^.]+)\.)"),
        ("envoy_route", r"^vhost\.[^.]+\.route\.(([^.]+)\.)"),
        ("envoy_tcp_prefix", r"^tcp\.((.*?)\.)\w+?$"),
        # RPC listeners (generic proxy) and their per-method stats; services hold dots
        ("envoy_rpc_method", r"^generic_proxy\.[^.]+\.rpc\..*\.(([^.]+)\.)\w+$"),
        ("envoy_rpc_service", r"^generic_proxy\.[^.]+\.rpc\.((.*)\.)[^.]+\.\w+$"),
        ("envoy_generic_proxy_prefix", r"^generic_proxy\.(([^.]+)\.)"),
        # HTTP/2 clusters' per-method gRPC stats (cluster.<name>.grpc.<service>.<method>.*)
        ("envoy_grpc_bridge_method", r"^cluster\..*?\.grpc\..*\.(([^.]+)\.)\w+$"),
        ("envoy_grpc_bridge_service", r"^cluster\..*?\.grpc\.((.*)\.)[^.]+\.\w+$"),
        ("envoy_cluster_name", r"^cluster\.(([^.]+)\.)"),
        ("envoy_http_conn_manager_prefix", r"^listener(?=\.).*?\.http\.((.*?)\.)"),
        ("envoy_http_conn_manager_prefix", r"^http\.((.*?)\.)"),
        ("envoy_listener_address", r"^listener\.(((?:[_.\d]*|[_\[\]a-fA-F\d]*))\.)"),
        # Shoal's route-level error-rate breakers and backup requests (names may hold dots)
        ("envoy_route", r"^route\.((.*)\.)(?:circuit_breaker|backup_request)\."),
    )
)
_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_]")
LABEL_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", '"': '\\"'})


@lru_cache(maxsize=65536)
def prometheus_name(stat: str) -> tuple[str, str]:
    """``cluster.web.upstream_rq_200`` → ``envoy_cluster_upstream_rq`` and its labels,
    ``envoy_response_code="200",envoy_cluster_name="web"`` (Envoy's tag extraction)."""
    cuts: list[tuple[int, int]] = []
    labels: list[str] = []
    for tag, regex in _TAG_EXTRACTORS:
        match = regex.search(stat)
        if match is None:
            continue
        cuts.append(match.span(1))
        value = match[2] if regex.groups >= 2 else match[1]
        labels.append(f'{tag}="{value.translate(LABEL_ESCAPES)}"')
    kept = []
    pos = 0
    for start, end in sorted(cuts):
        kept.append(stat[pos:start])
        pos = max(pos, end)
    kept.append(stat[pos:])
    return "envoy_" + _INVALID_NAME_CHARS.sub("_", "".join(kept)), ",".join(labels)


def render_prometheus(snapshot: Snapshot) -> str:
    """Envoy's ``/stats/prometheus`` text exposition.

    Counters, then gauges, then histograms; within each, one group per metric name
    (sorted) with its ``# TYPE`` line, series sorted by stat name, and a blank line after.
    """
    out: list[str] = []

    def groups(stats: Iterable[str]) -> list[tuple[str, list[tuple[str, str]]]]:
        """(metric, [(stat, labels)]) grouped by metric name, both levels sorted."""
        by_metric: dict[str, list[tuple[str, str]]] = {}
        for stat in sorted(stats):
            metric, labels = prometheus_name(stat)
            by_metric.setdefault(metric, []).append((stat, labels))
        return sorted(by_metric.items())

    for kind, values in (("counter", snapshot.counters), ("gauge", snapshot.gauges)):
        for metric, series in groups(values):
            out.append(f"# TYPE {metric} {kind}\n")
            out.extend(f"{metric}{{{labels}}} {values[stat]}\n" for stat, labels in series)
            out.append("\n")

    for metric, series in groups(snapshot.histograms):
        out.append(f"# TYPE {metric} histogram\n")
        for stat, labels in series:
            _histogram_lines(out, metric, labels, snapshot.histograms[stat])
        out.append("\n")

    for metric, counts in sorted(snapshot.labelled_counters.items()):
        out.append(f"# TYPE {metric} counter\n")
        out.extend(f"{metric}{{{labels}}} {counts[labels]}\n" for labels in sorted(counts))
        out.append("\n")
    for metric, by_labels in sorted(snapshot.labelled_histograms.items()):
        out.append(f"# TYPE {metric} histogram\n")
        for labels in sorted(by_labels):
            _histogram_lines(out, metric, labels, by_labels[labels])
        out.append("\n")
    return "".join(out)


def _histogram_lines(out: list[str], metric: str, labels: str, histogram: Histogram) -> None:
    """One series: cumulative ``_bucket`` lines (``le="+Inf"`` last), ``_sum``, ``_count``."""
    prefix = labels + "," if labels else ""
    for bound, below in zip(histogram.bounds, histogram.cumulative(), strict=True):
        out.append(f'{metric}_bucket{{{prefix}le="{bound:.32g}"}} {below}\n')
    count = histogram.count
    out.append(f'{metric}_bucket{{{prefix}le="+Inf"}} {count}\n')
    out.append(f"{metric}_sum{{{labels}}} {histogram.sum:.32g}\n")
    out.append(f"{metric}_count{{{labels}}} {count}\n")


def int_fields(cls: type) -> tuple[str, ...]:
    """Names of a stats dataclass's plain integer fields (its counters or gauges)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.type in ("int", int))
