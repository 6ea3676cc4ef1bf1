"""What the proxies report, gathered by pilot: Istio's request metrics and live requests.

Pilot knows every connected proxy, and from its node metadata ``ADMIN_ADDRESS`` where its
admin API listens. From there:

- :class:`Scraper` reads every proxy's ``/stats/prometheus`` each ``interval`` (asyncio,
  one timeout per scrape; a proxy that does not answer is marked and tried again next
  round) into :class:`MetricsStore`, which keeps a short history of Istio's request
  counters and latency buckets in memory. Parsing runs in a worker thread, so a large
  scrape never holds up xDS pushes.
- :class:`PrometheusBackend` answers the same questions from a real Prometheus (PromQL:
  ``increase``/``rate`` and ``histogram_quantile``) when pilot runs with ``--prometheus``.
- :func:`open_tap` merges every proxy's ``/tap`` into one stream.
- :func:`telemetry_routes` is the HTTP API (``/api/v1/...``); the dashboard reads it too.

Which side of a call counts: a service's numbers come from its own sidecars
(``reporter="destination"``) when they saw requests in the window, else from its callers'
(``reporter="source"``): a service without a sidecar is still seen from the callers' side,
a meshed one is measured where it answers (callers' retries do not inflate it), and one
whose sidecar stopped reporting is not shown idle while its callers see it fail.
Success is the share of responses that are neither 5xx nor ``0`` (no response: the proxy
gave up or the connection broke), as in Istio's and Linkerd's dashboards.

Counters are stored reset-adjusted (a counter that goes down restarted from zero, as
Prometheus' ``increase()`` assumes), so an increase over any range is two binary
searches. Memory is bounded: at most ``max_series`` series (new ones beyond are dropped
and counted), each with at most ``2 * retention / interval`` samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import ssl
import time
from array import array
from bisect import bisect_right
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs, urlencode, urlsplit

from shoal.codec.http1 import END, Event, ResponseDecoder, ResponseHead
from shoal.errors import RemoteProtocolError
from shoal.pilot.http import Answer, Handler, Stream, error_reply, json_reply

log = logging.getLogger("shoal.pilot.telemetry")

UNKNOWN = "unknown"
MAX_SERIES = 10_000
MAX_SCRAPE_BYTES = 64 * 1024 * 1024
MAX_POINTS = 1000  # per /api/v1/series answer
QUANTILES = (0.5, 0.95, 0.99)
NDJSON = "application/x-ndjson"
TAP_DEFAULTS = {"max": 100, "duration": 10.0}
TAP_LIMITS = {"max": 10_000, "duration": 300.0}  # what the proxies cap them to
TAP_BUFFER = 1024  # records between the proxies and a slow client, then dropped
TAP_GRACE = 5.0  # after ``duration``, how long pilot waits for proxies to end their part
TAP_FILTERS = ("service", "authority", "path_prefix", "method")  # passed on to the proxies


# --- durations ------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ms|s|m|h)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """``500ms``, ``10s``, ``1m``, ``1h`` or plain seconds (``90``) → seconds; ValueError
    saying what was expected."""
    match = _DURATION.fullmatch(text.strip())
    seconds = float(match[1]) * _UNITS[match[2] or "s"] if match else 0.0
    if seconds <= 0:
        raise ValueError(f"expected a duration such as 10s, 1m or 500ms, not {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest of ``1h``, ``15m``, ``90s``, ``500ms`` that says ``seconds`` exactly."""
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{round(seconds * 1000)}ms"


# --- a small HTTP/1.1 client (pilot never imports the proxy) ----------------------------------


class FetchError(Exception):
    """A request to a proxy or to Prometheus failed; the message says why."""


class RefusedError(FetchError):
    """The server answered, but not 200: ``status`` and its one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class _Response:
    """One answer read from its connection: the head at once, the body as it comes."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: ResponseDecoder,
        head: ResponseHead,
        pending: list[Event],
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = decoder
        self.head = head
        self.pending = pending

    @property
    def status(self) -> int:
        return self.head.status

    async def pieces(self) -> AsyncGenerator[bytes, None]:
        """The body, piece by piece, as it arrives."""
        while True:
            for event in self.pending:
                if event is END:
                    return
                if isinstance(event, bytes):
                    yield event
            data = await self.reader.read(65536)
            if not data:
                if self.head.chunked or self.head.content_length >= 0:
                    raise FetchError("the connection closed in the middle of the answer")
                return  # the body ends with the connection
            try:
                self.pending = self.decoder.feed(data)
            except RemoteProtocolError as exc:
                raise FetchError(f"not HTTP: {exc}") from None

    async def read(self, limit: int) -> bytes:
        body = bytearray()
        async for piece in self.pieces():
            body += piece
            if len(body) > limit:
                raise FetchError(f"answer larger than {limit} bytes")
        return bytes(body)

    def close(self) -> None:
        self.writer.close()


async def fetch(
    host: str, port: int, target: str, *, tls: ssl.SSLContext | None = None
) -> _Response:
    """Send ``GET target`` and read the answer's head; the caller reads the body and closes
    (and bounds the wait: this has no timeout of its own)."""
    reader, writer = await asyncio.open_connection(host, port, ssl=tls)
    try:
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        writer.write(
            f"GET {target} HTTP/1.1\r\nhost: {authority}\r\nuser-agent: shoal-pilot\r\n"
            "accept: */*\r\nconnection: close\r\n\r\n".encode("latin-1")
        )
        decoder = ResponseDecoder()
        while True:
            data = await reader.read(65536)
            if not data:
                raise FetchError("the connection closed before an answer")
            try:
                events = decoder.feed(data)
            except RemoteProtocolError as exc:
                raise FetchError(f"not HTTP: {exc}") from None
            for index, event in enumerate(events):
                if isinstance(event, ResponseHead):
                    return _Response(reader, writer, decoder, event, events[index + 1 :])
    except BaseException:
        writer.close()
        raise


def describe(exc: BaseException) -> str:
    """One line for a failed fetch (``TimeoutError`` and some ``OSError`` say nothing)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# --- the proxies ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """A connected xDS client as pilot knows it from its node."""

    node: str
    service: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    admin: tuple[str, int] | None = None  # ADMIN_ADDRESS
    user_agent: str = ""

    @property
    def admin_text(self) -> str | None:
        if self.admin is None:
            return None
        host, port = self.admin
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- Prometheus text: the Istio and per-route series pilot keeps -------------------------------

# (reporter, source_workload, destination_service, request_protocol, success)
RequestKey = tuple[str, str, str, str, bool]
# (reporter, source_workload, destination_service, le)
BucketKey = tuple[str, str, str, float]
# a route with a stat_prefix: (virtual host, route stat prefix, success)
RouteKey = tuple[str, str, bool]
# (virtual host, route stat prefix, le)
RouteBucketKey = tuple[str, str, float]

_REQUESTS = "istio_requests_total{"
_BUCKETS = "istio_request_duration_milliseconds_bucket{"
# Envoy's per-route stats, vhost.<vhost>.route.<stat_prefix>.upstream_rq_<code> and
# .upstream_rq_time, with the virtual host and route extracted as tags (names without dots)
_ROUTE_REQUESTS = "envoy_vhost_route_upstream_rq{"
_ROUTE_BUCKETS = "envoy_vhost_route_upstream_rq_time_bucket{"
_ROUTE_METRICS = "envoy_vhost_route_upstream_rq"  # the common start of both
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_UNESCAPE = re.compile(r"\\(.)")


@dataclass(slots=True)
class Scrape:
    """One scrape, reduced to the labels pilot uses: values of series that differ only in
    other labels (peer versions, response flags, each 2xx code...) are summed."""

    requests: dict[RequestKey, float] = field(default_factory=dict)
    buckets: dict[BucketKey, float] = field(default_factory=dict)
    routes: dict[RouteKey, float] = field(default_factory=dict)
    route_buckets: dict[RouteBucketKey, float] = field(default_factory=dict)


def succeeded(response_code: str) -> bool:
    """Neither a 5xx nor ``0`` (no response was sent)."""
    return response_code != "0" and not response_code.startswith("5")


def parse_istio(text: str) -> Scrape:
    """``istio_requests_total`` and ``istio_request_duration_milliseconds_bucket``, and
    the per-route ``envoy_vhost_route_upstream_rq`` (per response code) and
    ``envoy_vhost_route_upstream_rq_time_bucket``, from Prometheus' text format; every
    other line is skipped unparsed."""
    scrape = Scrape()
    for line in text.splitlines():
        if line.startswith(_REQUESTS):
            start = len(_REQUESTS)
        elif line.startswith(_BUCKETS):
            start = len(_BUCKETS)
        elif line.startswith(_ROUTE_METRICS):
            _parse_route_line(line, scrape)
            continue
        else:
            continue
        end = line.rfind("}")
        fields = line[end + 1 :].split()
        if end < start or not fields:
            continue
        labels = {
            name: _UNESCAPE.sub(_unescape, value)
            for name, value in _LABEL.findall(line, start, end)
        }
        try:
            value = float(fields[0])
        except ValueError:
            continue
        who = (
            labels.get("reporter", UNKNOWN),
            labels.get("source_workload", UNKNOWN),
            labels.get("destination_service", UNKNOWN),
        )
        if start == len(_REQUESTS):
            key: RequestKey = (
                *who,
                labels.get("request_protocol", UNKNOWN),
                succeeded(labels.get("response_code", "")),
            )
            scrape.requests[key] = scrape.requests.get(key, 0.0) + value
        else:
            try:
                le = float(labels.get("le", ""))
            except ValueError:
                continue
            bucket: BucketKey = (*who, le)
            scrape.buckets[bucket] = scrape.buckets.get(bucket, 0.0) + value
    return scrape


def _parse_route_line(line: str, scrape: Scrape) -> None:
    if line.startswith(_ROUTE_REQUESTS):
        start = len(_ROUTE_REQUESTS)
    elif line.startswith(_ROUTE_BUCKETS):
        start = len(_ROUTE_BUCKETS)
    else:
        return
    end = line.rfind("}")
    fields = line[end + 1 :].split()
    if end < start or not fields:
        return
    labels = {
        name: _UNESCAPE.sub(_unescape, value) for name, value in _LABEL.findall(line, start, end)
    }
    vhost, route = labels.get("envoy_virtual_host"), labels.get("envoy_route")
    if vhost is None or route is None:
        return
    try:
        value = float(fields[0])
    except ValueError:
        return
    if start == len(_ROUTE_REQUESTS):
        key: RouteKey = (vhost, route, succeeded(labels.get("envoy_response_code", "")))
        scrape.routes[key] = scrape.routes.get(key, 0.0) + value
    else:
        try:
            le = float(labels.get("le", ""))
        except ValueError:
            return
        bucket: RouteBucketKey = (vhost, route, le)
        scrape.route_buckets[bucket] = scrape.route_buckets.get(bucket, 0.0) + value


def _unescape(match: re.Match[str]) -> str:
    return "\n" if match[1] == "n" else match[1]


# --- the quantile of a histogram, as Prometheus computes it -----------------------------------


def bucket_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile``: ``buckets`` maps upper bounds (``inf`` last) to
    cumulative counts; linear interpolation inside the bucket holding the rank; a rank in
    the ``+Inf`` bucket gives the highest finite bound. None without observations."""
    bounds = sorted(buckets.items())
    if len(bounds) < 2 or not math.isinf(bounds[-1][0]):
        return None
    counts: list[float] = []
    for _, count in bounds:  # counts read at slightly different times may dip: fix that
        counts.append(max(count, counts[-1]) if counts else count)
    observations = counts[-1]
    if observations <= 0:
        return None
    rank = q * observations
    index = next(i for i, count in enumerate(counts) if count >= rank)
    if index == len(bounds) - 1:
        return bounds[-2][0]
    upper = bounds[index][0]
    if index == 0 and upper <= 0:
        return upper
    lower, below = (bounds[index - 1][0], counts[index - 1]) if index else (0.0, 0.0)
    return lower + (upper - lower) * (rank - below) / (counts[index] - below)


# --- the embedded store -----------------------------------------------------------------------


class _Ring:
    """One series: sample times and reset-adjusted values (a drop means the counter
    restarted from zero, so the new value is all increase), oldest first. Trimmed to
    ``capacity`` samples once it holds twice that, so appends stay O(1) on average."""

    __slots__ = ("capacity", "last", "times", "values")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.times = array("d")
        self.values = array("d")
        self.last = 0.0  # the last raw value

    def add(self, when: float, raw: float) -> None:
        if self.values:
            step = raw - self.last if raw >= self.last else raw
            self.values.append(self.values[-1] + step)
        else:
            self.values.append(raw)
        self.times.append(when)
        self.last = raw
        if len(self.times) >= 2 * self.capacity:
            del self.times[: self.capacity]
            del self.values[: self.capacity]

    def seen(self, start: float, end: float) -> bool:
        """A sample in ``(start, end]``."""
        index = bisect_right(self.times, end) - 1
        return index >= 0 and self.times[index] > start

    def increase(self, start: float, end: float) -> float:
        """From the last sample at or before ``start`` (or the first after it) to the last
        at or before ``end``."""
        last = bisect_right(self.times, end) - 1
        if last < 0:
            return 0.0
        first = max(bisect_right(self.times, start) - 1, 0)
        return self.values[last] - self.values[first] if first < last else 0.0

    @property
    def newest(self) -> float:
        return self.times[-1]


G = TypeVar("G")
K = TypeVar("K")


@dataclass(slots=True)
class _Measure:
    """A group's increases over one range."""

    total: float = 0.0
    ok: float = 0.0
    protocols: dict[str, float] = field(default_factory=dict)
    buckets: dict[float, float] = field(default_factory=dict)

    def summary(self, seconds: float, quantiles: Iterable[float] = QUANTILES) -> dict[str, Any]:
        return {
            "success_rate": round(self.ok / self.total, 4) if self.total > 0 else None,
            "rps": round(self.total / seconds, 3),
            **{f"p{round(q * 100)}_ms": _ms(bucket_quantile(q, self.buckets)) for q in quantiles},
        }

    @property
    def protocol(self) -> str:
        return max(self.protocols, key=self.protocols.__getitem__, default=UNKNOWN)


def _ms(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 3)


@dataclass(slots=True)
class _Group:
    """The series of one row (a service, an edge), picked once so the row can be measured
    over many ranges cheaply."""

    requests: list[tuple[bool, str, _Ring]] = field(default_factory=list)
    buckets: list[tuple[float, _Ring]] = field(default_factory=list)

    def seen(self, start: float, end: float) -> bool:
        return any(ring.seen(start, end) for _, _, ring in self.requests)

    def measure(self, start: float, end: float) -> _Measure:
        measure = _Measure()
        for ok, protocol, ring in self.requests:
            increase = ring.increase(start, end)
            measure.total += increase
            if ok:
                measure.ok += increase
            measure.protocols[protocol] = measure.protocols.get(protocol, 0.0) + increase
        for le, ring in self.buckets:
            measure.buckets[le] = measure.buckets.get(le, 0.0) + ring.increase(start, end)
        return measure


class MetricsStore:
    """Istio's request counters and latency buckets of every proxy, for ``retention``
    seconds, per proxy (counters restart per process, so they are only summed as
    increases)."""

    def __init__(self, retention: float, interval: float, max_series: int = MAX_SERIES) -> None:
        self.retention = retention
        self.capacity = math.ceil(retention / interval) + 2
        self.max_series = max_series
        self.requests: dict[tuple[str, RequestKey], _Ring] = {}
        self.buckets: dict[tuple[str, BucketKey], _Ring] = {}
        self.routes: dict[tuple[str, RouteKey], _Ring] = {}
        self.route_buckets: dict[tuple[str, RouteBucketKey], _Ring] = {}
        self.dropped = 0  # series not kept because the store was full

    @property
    def series_count(self) -> int:
        return len(self.requests) + len(self.buckets) + len(self.routes) + len(self.route_buckets)

    def ingest(self, proxy: str, when: float, scrape: Scrape, baseline: float | None) -> None:
        """Add one scrape of ``proxy``. ``baseline``: when it was last scraped fine; a
        series new since then was zero then (so its first requests count)."""
        for request, value in scrape.requests.items():
            ring = self._ring(self.requests, (proxy, request), baseline)
            if ring is not None:
                ring.add(when, value)
        for bucket, value in scrape.buckets.items():
            ring = self._ring(self.buckets, (proxy, bucket), baseline)
            if ring is not None:
                ring.add(when, value)
        for route, value in scrape.routes.items():
            ring = self._ring(self.routes, (proxy, route), baseline)
            if ring is not None:
                ring.add(when, value)
        for route_bucket, value in scrape.route_buckets.items():
            ring = self._ring(self.route_buckets, (proxy, route_bucket), baseline)
            if ring is not None:
                ring.add(when, value)

    def _ring(self, rings: dict[Any, _Ring], key: Any, baseline: float | None) -> _Ring | None:
        ring = rings.get(key)
        if ring is None:
            if self.series_count >= self.max_series:
                if not self.dropped:
                    log.warning(
                        "metrics store full (%d series): new series dropped", self.series_count
                    )
                self.dropped += 1
                return None
            ring = rings[key] = _Ring(self.capacity)
            if baseline is not None:
                ring.add(baseline, 0.0)
        return ring

    def prune(self, now: float) -> None:
        """Forget series with no sample within the retention (their proxy left)."""
        horizon = now - self.retention
        _forget(self.requests, horizon)
        _forget(self.buckets, horizon)
        _forget(self.routes, horizon)
        _forget(self.route_buckets, horizon)

    def groups(self, group_of: Callable[[str, str, str], G | None]) -> dict[G, _Group]:
        """Series grouped by ``group_of(reporter, source_workload, destination_service)``
        (None: not wanted)."""
        groups: dict[G, _Group] = {}
        for (_, (reporter, source, destination, protocol, ok)), ring in self.requests.items():
            group = group_of(reporter, source, destination)
            if group is not None:
                groups.setdefault(group, _Group()).requests.append((ok, protocol, ring))
        for (_, (reporter, source, destination, le)), ring in self.buckets.items():
            group = group_of(reporter, source, destination)
            if group is not None and group in groups:
                groups[group].buckets.append((le, ring))
        return groups

    def stat(self, window: float, now: float, service: str | None = None) -> list[dict[str, Any]]:
        start = now - window
        groups = self.groups(
            lambda reporter, _, destination: (
                (destination, reporter) if service in (None, destination) else None
            )
        )
        measures = {
            key: group.measure(start, now)
            for key, group in groups.items()
            if group.seen(start, now)
        }
        rows = []
        for host, reporter in _reporters({key: m.total for key, m in measures.items()}):
            measure = measures[host, reporter]
            rows.append(
                {
                    "service": host,
                    **measure.summary(window),
                    "requests": round(measure.total),
                    "protocol": measure.protocol,
                }
            )
        return rows

    def routes_stat(self, window: float, now: float) -> list[dict[str, Any]]:
        """Per route with a stat prefix (virtual host, route), summed over every proxy
        that reported it in the window: what its callers' sidecars saw."""
        start = now - window
        groups: dict[tuple[str, str], _Group] = {}
        for (_, (vhost, route, ok)), ring in self.routes.items():
            groups.setdefault((vhost, route), _Group()).requests.append((ok, "", ring))
        for (_, (vhost, route, le)), ring in self.route_buckets.items():
            group = groups.get((vhost, route))
            if group is not None:
                group.buckets.append((le, ring))
        rows = []
        for (vhost, route), group in sorted(groups.items()):
            if group.seen(start, now):
                measure = group.measure(start, now)
                rows.append(
                    {
                        "virtual_host": vhost,
                        "route": route,
                        **measure.summary(window),
                        "requests": round(measure.total),
                    }
                )
        return rows

    def edges(self, window: float, now: float) -> list[dict[str, Any]]:
        start = now - window
        groups = self.groups(_edge_of)
        rows = []
        for (source, destination), group in sorted(groups.items()):
            if group.seen(start, now):
                summary = group.measure(start, now).summary(window, (0.99,))
                rows.append({"source": source, "destination": destination, **summary})
        return rows

    def series(self, service: str, times: list[float], lookback: float) -> list[dict[str, Any]]:
        groups = self.groups(lambda r, _, d: r if d == service else None)
        start, end = times[0] - lookback, times[-1]
        totals = {r: g.measure(start, end).total for r, g in groups.items() if g.seen(start, end)}
        group = groups.get(_reporter(totals), _Group())
        points = []
        for when in times:
            summary = group.measure(when - lookback, when).summary(lookback, (0.5, 0.99))
            points.append({"t": round(when, 3), **summary})
        return points


def _forget(rings: dict[K, _Ring], horizon: float) -> None:
    for key in [key for key, ring in rings.items() if ring.newest < horizon]:
        del rings[key]


def _edge_of(reporter: str, source: str, destination: str) -> tuple[str, str] | None:
    """Edges are what callers' sidecars report, plus what services' sidecars saw from
    callers outside the mesh (no caller's sidecar reports those)."""
    if reporter == "source" or source == UNKNOWN:
        return source, destination
    return None


def _reporter(totals: Mapping[str, float]) -> str:
    """Whose numbers count, given each reporter's requests in the window: the service's
    own sidecars' when they saw any (or nobody did), else its callers'. A sidecar that
    stopped reporting must not make a failing service look idle."""
    if totals.get("destination", 0.0) > 0 or "source" not in totals:
        return "destination"
    return "source"


def _reporters(totals: Mapping[tuple[str, str], float]) -> list[tuple[str, str]]:
    """Per service (sorted), its reporter (see :func:`_reporter`), from the requests per
    (service, reporter) that reported anything in the window."""
    by_host: dict[str, dict[str, float]] = {}
    for (host, reporter), total in totals.items():
        by_host.setdefault(host, {})[reporter] = total
    return [(host, _reporter(by_host[host])) for host in sorted(by_host)]


def graph(edges: list[dict[str, Any]]) -> dict[str, Any]:
    """Nodes and edges. A workload named like a service is the same node (pilot's
    bootstrap names workloads after their service), so chains of calls connect."""
    kinds: dict[str, str] = {}
    for edge in edges:
        kinds[edge["destination"]] = "service"
    for edge in edges:
        source = edge["source"]
        kinds.setdefault(source, "unknown" if source == UNKNOWN else "workload")
    return {
        "nodes": [{"id": name, "kind": kind} for name, kind in sorted(kinds.items())],
        "edges": edges,
    }


# --- the backends: the same questions, from the embedded store or from Prometheus ------------


class Backend(Protocol):
    source: str

    def check_window(self, seconds: float) -> None: ...

    async def stat(self, window: float, service: str | None) -> list[dict[str, Any]]: ...

    async def routes(self, window: float) -> list[dict[str, Any]]: ...

    async def edges(self, window: float) -> list[dict[str, Any]]: ...

    async def series(
        self, service: str, times: list[float], step: float, lookback: float
    ) -> list[dict[str, Any]]: ...


class EmbeddedBackend:
    source = "embedded"

    def __init__(self, store: MetricsStore) -> None:
        self.store = store

    def check_window(self, seconds: float) -> None:
        if seconds > self.store.retention:
            raise ValueError(
                f"{format_duration(seconds)} is longer than the metrics retention "
                f"({format_duration(self.store.retention)}): ask for less, or run pilot "
                "with --metrics-retention longer or --prometheus URL"
            )

    async def stat(self, window: float, service: str | None) -> list[dict[str, Any]]:
        return self.store.stat(window, time.time(), service)

    async def routes(self, window: float) -> list[dict[str, Any]]:
        return self.store.routes_stat(window, time.time())

    async def edges(self, window: float) -> list[dict[str, Any]]:
        return self.store.edges(window, time.time())

    async def series(
        self, service: str, times: list[float], step: float, lookback: float
    ) -> list[dict[str, Any]]:
        return self.store.series(service, times, lookback)


class BackendError(Exception):
    """Prometheus could not answer; the message says why."""


def _label(value: str) -> str:
    return json.dumps(value)  # a PromQL string: the same escapes as JSON's


def _selector(*matchers: str) -> str:
    return "{" + ",".join(matchers) + "}"


def _range(seconds: float) -> str:
    return f"[{round(seconds * 1000)}ms]"


_FAILED = 'response_code=~"5..|0"'
_VHOST_PORT = re.compile(r":\d+$")
_ROUTE_FAILED = 'envoy_response_code=~"5.."'


class PrometheusBackend:
    """The same answers from Prometheus' HTTP API; it must scrape the proxies'
    ``/stats/prometheus`` itself. Numbers differ slightly from the embedded store's:
    ``increase()`` extrapolates to the window's edges and skips a new series' first
    sample."""

    source = "prometheus"

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, not {url!r}")
        self.url = url.rstrip("/")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.tls = ssl.create_default_context() if parts.scheme == "https" else None
        self.timeout = timeout

    def check_window(self, seconds: float) -> None:
        """Prometheus keeps what it keeps: any window may be asked."""

    async def _api(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        target = f"{self.prefix}/api/v1/{path}?{urlencode(params)}"
        try:
            async with asyncio.timeout(self.timeout):
                response = await fetch(self.host, self.port, target, tls=self.tls)
                try:
                    body = await response.read(MAX_SCRAPE_BYTES)
                finally:
                    response.close()
            answer = json.loads(body)
        except (OSError, TimeoutError, FetchError, ValueError) as exc:
            raise BackendError(f"Prometheus at {self.url}: {describe(exc)}") from None
        if not isinstance(answer, dict) or answer.get("status") != "success":
            reason = answer.get("error") if isinstance(answer, dict) else None
            raise BackendError(f"Prometheus at {self.url} refused {params['query']}: {reason}")
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    async def _instant(self, promql: str, now: float) -> list[tuple[dict[str, str], float]]:
        result = await self._api("query", {"query": promql, "time": f"{now:.3f}"})
        return [(item["metric"], float(item["value"][1])) for item in result]

    async def stat(self, window: float, service: str | None) -> list[dict[str, Any]]:
        now = round(time.time(), 3)
        where = [f"destination_service={_label(service)}"] if service is not None else []
        by, span = "destination_service, reporter", _range(window)
        totals, failed, *quantiles = await asyncio.gather(
            self._instant(
                f"sum by ({by}, request_protocol) "
                f"(increase(istio_requests_total{_selector(*where)}{span}))",
                now,
            ),
            self._instant(
                f"sum by ({by}) (increase(istio_requests_total{_selector(*where, _FAILED)}{span}))",
                now,
            ),
            *(
                self._instant(
                    f"histogram_quantile({q}, sum by ({by}, le) (increase("
                    f"istio_request_duration_milliseconds_bucket{_selector(*where)}{span})))",
                    now,
                )
                for q in QUANTILES
            ),
        )
        measures: dict[tuple[str, str], _Measure] = {}
        for labels, value in totals:
            key = (labels.get("destination_service", UNKNOWN), labels.get("reporter", ""))
            measure = measures.setdefault(key, _Measure())
            measure.total += value
            protocol = labels.get("request_protocol", UNKNOWN)
            measure.protocols[protocol] = measure.protocols.get(protocol, 0.0) + value
        rows = []
        for host, reporter in _reporters({key: m.total for key, m in measures.items()}):
            measure = measures[host, reporter]
            wanted = {"destination_service": host, "reporter": reporter}
            measure.ok = measure.total - _value(failed, wanted, missing=0.0)
            latency = {
                f"p{round(q * 100)}_ms": _ms(_value(result, wanted))
                for q, result in zip(QUANTILES, quantiles, strict=True)
            }
            rows.append(
                {
                    "service": host,
                    **measure.summary(window, ()),
                    **latency,
                    "requests": round(measure.total),
                    "protocol": measure.protocol,
                }
            )
        return rows

    async def routes(self, window: float) -> list[dict[str, Any]]:
        now = round(time.time(), 3)
        by, span = "envoy_virtual_host, envoy_route", _range(window)
        totals, failed, *quantiles = await asyncio.gather(
            self._instant(f"sum by ({by}) (increase({_ROUTE_METRICS}{span}))", now),
            self._instant(
                f"sum by ({by}) (increase({_ROUTE_METRICS}{_selector(_ROUTE_FAILED)}{span}))",
                now,
            ),
            *(
                self._instant(
                    f"histogram_quantile({q}, sum by ({by}, le) "
                    f"(increase({_ROUTE_METRICS}_time_bucket{span})))",
                    now,
                )
                for q in QUANTILES
            ),
        )
        rows = []
        for labels, total in sorted(totals, key=lambda item: _route_key(item[0])):
            vhost, route = _route_key(labels)
            wanted = {"envoy_virtual_host": vhost, "envoy_route": route}
            measure = _Measure(total=total, ok=total - _value(failed, wanted, missing=0.0))
            rows.append(
                {
                    "virtual_host": vhost,
                    "route": route,
                    **measure.summary(window, ()),
                    **{
                        f"p{round(q * 100)}_ms": _ms(_value(result, wanted))
                        for q, result in zip(QUANTILES, quantiles, strict=True)
                    },
                    "requests": round(total),
                }
            )
        return rows

    async def edges(self, window: float) -> list[dict[str, Any]]:
        now = round(time.time(), 3)

        def edge_sum(metric: str, *extra: str, by: str = "") -> str:
            """Callers' sidecars' series, or services' sidecars' for unknown callers."""
            span = _range(window)
            mine = _selector('reporter="source"', *extra)
            theirs = _selector('reporter="destination"', f'source_workload="{UNKNOWN}"', *extra)
            return (
                f"sum by (source_workload, destination_service{by}) "
                f"(increase({metric}{mine}{span}) or increase({metric}{theirs}{span}))"
            )

        totals, failed, p99 = await asyncio.gather(
            self._instant(edge_sum("istio_requests_total"), now),
            self._instant(edge_sum("istio_requests_total", _FAILED), now),
            self._instant(
                "histogram_quantile(0.99, "
                + edge_sum("istio_request_duration_milliseconds_bucket", by=", le")
                + ")",
                now,
            ),
        )
        rows = []
        for labels, total in sorted(totals, key=lambda item: _edge_key(item[0])):
            source, destination = _edge_key(labels)
            wanted = {"source_workload": source, "destination_service": destination}
            measure = _Measure(total=total, ok=total - _value(failed, wanted, missing=0.0))
            rows.append(
                {
                    "source": source,
                    "destination": destination,
                    **measure.summary(window, ()),
                    "p99_ms": _ms(_value(p99, wanted)),
                }
            )
        return rows

    async def series(
        self, service: str, times: list[float], step: float, lookback: float
    ) -> list[dict[str, Any]]:
        where = f"destination_service={_label(service)}"
        span = _range(lookback)
        params = {"start": f"{times[0]:.3f}", "end": f"{times[-1]:.3f}", "step": f"{step:.3f}"}

        async def ranged(promql: str) -> dict[str, dict[int, float]]:
            """Per reporter, the values by time (milliseconds)."""
            result = await self._api("query_range", {"query": promql, **params})
            return {
                item["metric"].get("reporter", ""): {
                    round(float(t) * 1000): float(v) for t, v in item["values"]
                }
                for item in result
            }

        def quantile(q: float) -> str:
            return (
                f"histogram_quantile({q}, sum by (reporter, le) "
                f"(rate(istio_request_duration_milliseconds_bucket{_selector(where)}{span})))"
            )

        rates, failed, p50, p99 = await asyncio.gather(
            ranged(f"sum by (reporter) (rate(istio_requests_total{_selector(where)}{span}))"),
            ranged(
                f"sum by (reporter) (rate(istio_requests_total{_selector(where, _FAILED)}{span}))"
            ),
            ranged(quantile(0.5)),
            ranged(quantile(0.99)),
        )
        reporter = _reporter({r: sum(values.values()) for r, values in rates.items()})
        points = []
        for when in times:
            at = round(when * 1000)
            rate = rates.get(reporter, {}).get(at, 0.0)
            bad = failed.get(reporter, {}).get(at, 0.0)
            points.append(
                {
                    "t": round(when, 3),
                    "success_rate": round(1 - bad / rate, 4) if rate > 0 else None,
                    "rps": round(rate, 3),
                    "p50_ms": _ms(p50.get(reporter, {}).get(at)),
                    "p99_ms": _ms(p99.get(reporter, {}).get(at)),
                }
            )
        return points


def _route_key(labels: Mapping[str, str]) -> tuple[str, str]:
    return labels.get("envoy_virtual_host", UNKNOWN), labels.get("envoy_route", UNKNOWN)


def _edge_key(labels: Mapping[str, str]) -> tuple[str, str]:
    return labels.get("source_workload", UNKNOWN), labels.get("destination_service", UNKNOWN)


def _value(
    result: list[tuple[dict[str, str], float]],
    wanted: Mapping[str, str],
    missing: float = math.nan,
) -> float:
    """The value of the result row with the ``wanted`` labels, else ``missing``."""
    for metric, value in result:
        if all(metric.get(k, "") == v for k, v in wanted.items()):
            return value
    return missing


# --- scraping ---------------------------------------------------------------------------------


@dataclass(slots=True)
class ScrapeStatus:
    at: float | None = None  # unix time of the last attempt
    ok: bool | None = None
    error: str | None = None
    last_ok: float | None = None  # unix time of the last good scrape


class Scraper:
    """Every ``interval``, every proxy with an admin address, all at once."""

    def __init__(
        self,
        store: MetricsStore,
        proxies: Callable[[], list[ProxyInfo]],
        interval: float,
    ) -> None:
        self.store = store
        self.proxies = proxies
        self.interval = interval
        self.timeout = min(max(interval, 1.0), 10.0)
        self.status: dict[tuple[str, tuple[str, int]], ScrapeStatus] = {}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            await self.scrape_all()
            await asyncio.sleep(max(0.0, began + self.interval - loop.time()))

    async def scrape_all(self) -> None:
        targets = {(p.node, p.admin) for p in self.proxies() if p.admin is not None}
        for gone in self.status.keys() - targets:
            del self.status[gone]
        await asyncio.gather(*(self._scrape(node, admin) for node, admin in targets))
        self.store.prune(time.time())

    async def _scrape(self, node: str, admin: tuple[str, int]) -> None:
        status = self.status.setdefault((node, admin), ScrapeStatus())
        status.at = time.time()
        try:
            async with asyncio.timeout(self.timeout):
                response = await fetch(*admin, "/stats/prometheus")
                try:
                    body = await response.read(MAX_SCRAPE_BYTES)
                finally:
                    response.close()
            if response.status != 200:
                raise FetchError(f"/stats/prometheus answered {response.status}")
            scrape = await asyncio.to_thread(parse_istio, body.decode("utf-8", "replace"))
        except (OSError, TimeoutError, FetchError) as exc:
            if status.ok is not False:
                log.info("cannot scrape %s at %s:%d: %s", node, *admin, describe(exc))
            status.ok, status.error = False, describe(exc)
            return
        when = time.time()
        self.store.ingest(f"{node}@{admin[0]}:{admin[1]}", when, scrape, status.last_ok)
        status.ok, status.error, status.last_ok = True, None, when


# --- the merged tap ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TapSpec:
    filters: tuple[tuple[str, str], ...]  # passed on to every proxy
    max: int
    duration: float

    def target(self) -> str:
        params = [("format", "json"), *self.filters, ("max", str(self.max))]
        return f"/tap?{urlencode([*params, ('duration', f'{self.duration:g}')])}"


def tap_spec(params: Mapping[str, str]) -> TapSpec:
    """Pilot's tap parameters: the proxies' filters, ``max`` and ``duration`` (defaults
    and caps as the proxies'; ``max`` counts across all proxies)."""
    limits: dict[str, float] = {}
    for name, default in TAP_DEFAULTS.items():
        text = params.get(name)
        try:
            value = float(text) if text is not None else default
        except ValueError:
            value = 0.0
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive number, not {text!r}")
        limits[name] = min(value, TAP_LIMITS[name])
    return TapSpec(
        tuple((name, params[name]) for name in TAP_FILTERS if params.get(name)),
        max(1, int(limits["max"])),
        limits["duration"],
    )


async def open_tap(proxies: list[ProxyInfo], spec: TapSpec, timeout: float = 5.0) -> Answer:
    """Open the tap on every proxy with an admin address, then answer with the merged
    stream: its head leaves once every tap is open, so no request finishing after the
    client has it is missed (as a proxy's own /tap promises)."""
    targets = [p for p in proxies if p.admin is not None]
    if not targets:
        return error_reply(
            503,
            "no connected proxy has an admin address to tap (node metadata ADMIN_ADDRESS; "
            "`shoal bootstrap` sets it)",
        )

    async def open_one(proxy: ProxyInfo) -> _Response:
        assert proxy.admin is not None
        async with asyncio.timeout(timeout):
            response = await fetch(*proxy.admin, spec.target())
            if response.status != 200:
                try:
                    reason = (await response.read(4096)).decode(errors="replace").strip()
                finally:
                    response.close()
                raise RefusedError(response.status, reason)
            return response

    results = await asyncio.gather(*(open_one(p) for p in targets), return_exceptions=True)
    opened = [(p, r) for p, r in zip(targets, results, strict=True) if isinstance(r, _Response)]
    problems = {
        p.node: r for p, r in zip(targets, results, strict=True) if isinstance(r, BaseException)
    }
    # a parameter a proxy refuses, every proxy refuses: say why, as the proxy would
    refused = [
        e.reason for e in problems.values() if isinstance(e, RefusedError) and e.status == 400
    ]
    if refused or not opened:
        for _, response in opened:
            response.close()
        if refused:
            return error_reply(400, refused[0])
        return error_reply(
            502,
            "no proxy could be tapped: "
            + "; ".join(f"{node}: {describe(exc)}" for node, exc in sorted(problems.items())),
        )
    for node, exc in sorted(problems.items()):
        log.warning("tap: %s skipped: %s", node, describe(exc))
    return Stream(200, NDJSON, _merged(opened, spec))


@dataclass(slots=True)
class _TapState:
    dropped: int = 0


async def _read_tap(
    proxy: ProxyInfo,
    response: _Response,
    queue: asyncio.Queue[dict[str, Any] | None],
    state: _TapState,
) -> None:
    """One proxy's records into the shared queue, each with ``proxy``; its last line adds
    its drops. A full queue (the client reads slowly) drops records, counted."""
    buffer = b""
    with contextlib.suppress(OSError, FetchError):
        async for piece in response.pieces():
            *lines, buffer = (buffer + piece).split(b"\n")
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(record, dict):
                    continue
                if "dropped" in record:
                    state.dropped += int(record["dropped"])
                    return
                record["proxy"] = proxy.node
                if queue.full():
                    state.dropped += 1
                else:
                    queue.put_nowait(record)


async def _merged(
    opened: list[tuple[ProxyInfo, _Response]], spec: TapSpec
) -> AsyncGenerator[bytes, None]:
    """Records as they come from any proxy, ``max`` in all, then ``{"dropped": N}``.
    Ends when every proxy ended its part, at ``max``, or ``TAP_GRACE`` after
    ``duration``; closing the proxies' connections ends their taps at once."""
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(TAP_BUFFER)
    state = _TapState()
    readers = [asyncio.create_task(_read_tap(p, r, queue, state)) for p, r in opened]

    async def all_ended() -> None:
        await asyncio.gather(*readers, return_exceptions=True)
        await queue.put(None)

    watcher = asyncio.create_task(all_ended())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + spec.duration + TAP_GRACE
    sent = 0
    try:
        while sent < spec.max:
            try:
                async with asyncio.timeout_at(deadline):
                    record = await queue.get()
            except TimeoutError:
                break
            if record is None:
                break
            yield json.dumps(record).encode() + b"\n"
            sent += 1
        yield json.dumps({"dropped": state.dropped}).encode() + b"\n"
    finally:
        for task in (*readers, watcher):
            task.cancel()
        for _, response in opened:
            response.close()


# --- the HTTP API -----------------------------------------------------------------------------


class Telemetry:
    """The metrics backend (embedded store fed by the scraper, or Prometheus), the
    connected proxies, and their routes. ``vhost_services``: the service host of each
    virtual host pilot made, by name, for per-route stats."""

    def __init__(
        self,
        proxies: Callable[[], list[ProxyInfo]],
        *,
        interval: float,
        retention: float,
        prometheus: str | None = None,
        vhost_services: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        self.proxies = proxies
        self.vhost_services = vhost_services
        self.interval = interval
        self.scraper: Scraper | None = None
        self.store: MetricsStore | None = None
        self.backend: Backend
        if prometheus:
            self.backend = PrometheusBackend(prometheus)
        else:
            self.store = MetricsStore(retention, interval)
            self.scraper = Scraper(self.store, proxies, interval)
            self.backend = EmbeddedBackend(self.store)

    def route_rows(self, rows: list[dict[str, Any]], service: str | None) -> list[dict[str, Any]]:
        """A backend's per-route rows with their service (the host of the virtual host
        pilot made for it; for one it does not know, such as a route of a virtual host
        gone from the config, the virtual host's name without its ``:port``), only
        ``service``'s when given, sorted by service, route and virtual host."""
        hosts = self.vhost_services() if self.vhost_services is not None else {}
        out = []
        for row in rows:
            vhost = row["virtual_host"]
            host = hosts.get(vhost) or _VHOST_PORT.sub("", vhost)
            if service in (None, host):
                rest = {k: v for k, v in row.items() if k not in ("virtual_host", "route")}
                out.append({"service": host, "route": row["route"], **rest, "virtual_host": vhost})
        out.sort(key=lambda r: (r["service"], r["route"], r["virtual_host"]))
        return out

    def proxies_json(self) -> dict[str, Any]:
        rows = []
        for proxy in self.proxies():
            status = None
            if self.scraper is not None and proxy.admin is not None:
                status = self.scraper.status.get((proxy.node, proxy.admin))
            rows.append(
                {
                    "node_id": proxy.node,
                    "service": proxy.service or None,
                    "labels": dict(proxy.labels),
                    "admin_address": proxy.admin_text,
                    "user_agent": proxy.user_agent,
                    "last_scrape": status.at if status else None,
                    "scrape_ok": status.ok if status else None,
                    "scrape_error": status.error if status else None,
                }
            )
        store = self.store
        return {
            "source": self.backend.source,
            "proxies": rows,
            **(
                {
                    "series": store.series_count,
                    "max_series": store.max_series,
                    "series_dropped": store.dropped,
                }
                if store is not None
                else {}
            ),
        }


def _params(query: str, allowed: Iterable[str]) -> dict[str, str]:
    """Query parameters; an unknown or repeated one is refused (a misspelt one would
    otherwise be ignored silently)."""
    known = tuple(allowed)
    params: dict[str, str] = {}
    for name, values in parse_qs(query, keep_blank_values=True).items():
        if name not in known:
            raise ValueError(f"unknown parameter {name!r} (known: {', '.join(known)})")
        if len(values) > 1:
            raise ValueError(f"{name} given twice")
        params[name] = values[0]
    return params


def _duration_param(params: Mapping[str, str], name: str, default: float) -> float:
    text = params.get(name)
    if text is None:
        return default
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def telemetry_routes(telemetry: Telemetry) -> dict[tuple[str, str], Handler]:
    """``/api/v1/stat``, ``edges``, ``series``, ``proxies`` and ``tap`` (see
    docs/pilot.md for their shapes): errors in the request are 400, Prometheus failing
    is 502, each with ``{"error": ...}``."""
    backend = telemetry.backend

    def answering(
        allowed: tuple[str, ...], answer: Callable[[dict[str, str]], Awaitable[Answer]]
    ) -> Handler:
        async def handle(method: str, path: str, query: str, body: bytes) -> Answer:
            try:
                return await answer(_params(query, allowed))
            except ValueError as exc:
                return error_reply(400, str(exc))
            except BackendError as exc:
                return error_reply(502, str(exc))

        return handle

    def window_of(params: Mapping[str, str], default: float) -> float:
        window = _duration_param(params, "window", default)
        backend.check_window(window)
        return window

    async def stat(params: dict[str, str]) -> Answer:
        window = window_of(params, 60.0)
        by = params.get("by", "service")
        if by not in ("service", "route"):
            raise ValueError(f"by must be service or route, not {by!r}")
        seconds = int(window) if window.is_integer() else window
        if by == "route":
            routes = telemetry.route_rows(await backend.routes(window), params.get("service"))
            return json_reply(
                200, {"window_s": seconds, "source": backend.source, "routes": routes}
            )
        services = await backend.stat(window, params.get("service"))
        return json_reply(
            200, {"window_s": seconds, "source": backend.source, "services": services}
        )

    async def edges(params: dict[str, str]) -> Answer:
        window = window_of(params, 60.0)
        return json_reply(200, graph(await backend.edges(window)))

    async def series(params: dict[str, str]) -> Answer:
        service = params.get("service")
        if not service:
            raise ValueError("service is required (service=HOST)")
        window = window_of(params, 300.0)
        step = _duration_param(params, "step", 5.0)
        count = int(window // step)
        if not 1 <= count <= MAX_POINTS:
            raise ValueError(
                f"window/step makes {count} points: between 1 and {MAX_POINTS} (change step)"
            )
        now = round(time.time(), 3)
        times = [round(now - (count - 1 - k) * step, 3) for k in range(count)]
        # the rate at each point is over Grafana's $__rate_interval: at least four scrapes
        lookback = max(step + telemetry.interval, 4 * telemetry.interval)
        points = await backend.series(service, times, step, lookback)
        return json_reply(200, {"service": service, "points": points})

    async def proxies(params: dict[str, str]) -> Answer:
        return json_reply(200, telemetry.proxies_json())

    async def tap(params: dict[str, str]) -> Answer:
        return await open_tap(telemetry.proxies(), tap_spec(params))

    return {
        ("GET", "/api/v1/stat"): answering(("window", "service", "by"), stat),
        ("GET", "/api/v1/edges"): answering(("window",), edges),
        ("GET", "/api/v1/series"): answering(("service", "window", "step"), series),
        ("GET", "/api/v1/proxies"): answering((), proxies),
        ("GET", "/api/v1/tap"): answering((*TAP_FILTERS, "max", "duration"), tap),
    }
