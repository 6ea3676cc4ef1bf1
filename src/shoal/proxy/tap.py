"""Live request tap: the records behind the admin ``/tap`` endpoint (``shoal tap``).

Every finished HTTP request, RPC call and TCP connection already hands itself to the
access-log sinks of its listener context (``ctx.access_logs``). While at least one tap is
open, :class:`TapHub` adds one more sink to every live context (and to the contexts a
reload builds); when the last tap closes it takes them out again, so a proxy nobody taps
runs exactly the lists its config made.

The sink runs on the request path, so it only turns the record into a dict (records are
live objects that are reused or change after the call) and appends it to each matching
tap's bounded buffer: a reader too slow to keep up loses records, counted in
``Tap.dropped``, and never slows the proxy down.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import parse_qs

from shoal.observe.accesslog import AccessLogRecord
from shoal.proxy.listeners import LogSink

log = logging.getLogger("shoal.tap")

DEFAULT_MAX_RECORDS = 100
DEFAULT_DURATION = 10.0
MAX_RECORDS_CAP = 10_000
DURATION_CAP = 300.0
# Records a tap holds for its reader; more are dropped (and counted) until it catches up.
BUFFER_RECORDS = 1024

Record = dict[str, Any]
# (listener name, stat prefix, that context's access-log sinks)
TapTarget = tuple[str, str, list[LogSink]]

_PARAMETERS = frozenset(
    {"format", "service", "path_prefix", "method", "authority", "max", "duration"}
)


@dataclass(frozen=True, slots=True)
class TapSpec:
    """What a tap wants: every filter must match (an unset one matches anything), and the
    tap ends after ``max_records`` records or ``duration`` seconds."""

    service: str | None = None
    path_prefix: str | None = None
    method: str | None = None
    authority: str | None = None
    max_records: int = DEFAULT_MAX_RECORDS
    duration: float = DEFAULT_DURATION

    @classmethod
    def from_query(cls, query: str) -> TapSpec:
        """The spec of a ``/tap`` query string; ValueError says what is wrong with it.

        Unknown or repeated parameters are errors rather than ignored: a misspelt filter
        would otherwise tap everything. ``max`` and ``duration`` above their caps are
        lowered to the caps.
        """
        try:
            params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError as exc:
            raise ValueError(f"malformed query string: {query!r}") from exc
        if unknown := sorted(set(params) - _PARAMETERS):
            raise ValueError(
                f"unknown parameter {unknown[0]!r}; known: {', '.join(sorted(_PARAMETERS))}"
            )
        if repeated := sorted(name for name, values in params.items() if len(values) > 1):
            raise ValueError(f"parameter {repeated[0]!r} given more than once")
        value = {name: values[0] for name, values in params.items()}
        if value.get("format", "json") != "json":
            raise ValueError(f"unsupported format {value['format']!r}: only format=json")
        max_records = _number(value, "max", int, DEFAULT_MAX_RECORDS)
        duration = _number(value, "duration", float, DEFAULT_DURATION)
        return cls(
            service=value.get("service") or None,
            path_prefix=value.get("path_prefix") or None,
            method=value.get("method") or None,
            authority=value.get("authority") or None,
            max_records=min(max_records, MAX_RECORDS_CAP),
            duration=min(duration, DURATION_CAP),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def matches(self, record: Record) -> bool:
        if self.method is not None and record["method"] != self.method:
            return False
        path = record["path"] or ""
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        authority = (record["authority"] or "").lower()
        if self.authority is not None and authority != self.authority.lower():
            return False
        return self.service is None or _host(authority) == self.service.lower()


_N = TypeVar("_N", int, float)


def _number(value: dict[str, str], name: str, kind: Callable[[str], _N], default: _N) -> _N:
    text = value.get(name)
    if text is None:
        return default
    try:
        number = kind(text)
    except ValueError:
        raise ValueError(f"{name} must be a positive number, not {text!r}") from None
    if not number > 0:  # also rejects nan
        raise ValueError(f"{name} must be a positive number, not {text!r}")
    return number


_PORT = re.compile(r":[0-9]*$")


def _host(authority: str) -> str:
    """``echo.default:8080`` → ``echo.default``, ``[::1]:80`` → ``::1``; an RPC service
    name (the authority of an RPC call) has no port and stays as it is."""
    if authority.startswith("["):
        return authority[1 : authority.find("]")]
    return _PORT.sub("", authority)


_DIRECTION = re.compile(r"(inbound|outbound)(?![a-z0-9])")


def direction(listener: str, stat_prefix: str) -> str:
    """``inbound`` or ``outbound`` when the listener's name or stat prefix says so (pilot
    names them ``inbound``, ``outbound``, ``outbound_rpc``, ``inbound_dubbo``...), else the
    listener's name."""
    for name in (listener, stat_prefix):
        match = _DIRECTION.match(name.lower())
        if match is not None:
            return match[1]
    return listener


_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


def _trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent``; None when absent, invalid or all zeros."""
    match = _TRACEPARENT.match(traceparent or "")
    if match is None or match[1] == "0" * 32:
        return None
    return match[1]


def to_record(record: AccessLogRecord, listener: str, direction: str) -> Record:
    """One finished request as the JSON object ``/tap`` streams (docs/architecture.md,
    "Tap"). Values the protocol lacks (a TCP connection's method, say) are null."""
    start = datetime.fromtimestamp(record.start_time, UTC)
    return {
        "ts": start.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "listener": listener,
        "direction": direction,
        "protocol": record.protocol or "TCP",
        "method": record.method or None,
        "authority": record.authority or None,
        "path": record.path or None,
        "status": record.status,
        "duration_ms": round(record.duration * 1000.0, 3),
        "upstream_cluster": record.upstream_cluster or None,
        "upstream_host": record.upstream_host or None,
        "response_flags": record.response_flags,
        "bytes_received": record.bytes_received,
        "bytes_sent": record.bytes_sent,
        "downstream_remote": record.downstream_remote or None,
        "request_id": record.request_header("x-request-id"),
        "trace_id": _trace_id(record.request_header("traceparent")),
    }


class Tap:
    """One reader's tap: a bounded buffer filled by the sinks (never blocking), emptied by
    :meth:`records`."""

    __slots__ = ("accepted", "accepting", "buffer", "closed", "dropped", "spec", "wakeup")

    def __init__(self, spec: TapSpec) -> None:
        self.spec = spec
        self.buffer: deque[Record] = deque()
        self.wakeup = asyncio.Event()
        self.accepted = 0  # records buffered so far; the tap takes no more than max_records
        self.dropped = 0  # records that matched while the buffer was full
        self.accepting = True
        self.closed = False

    def offer(self, record: Record) -> None:
        """Buffer a record that matched this tap, or count it as dropped."""
        if not self.accepting or self.accepted >= self.spec.max_records:
            return
        if len(self.buffer) >= BUFFER_RECORDS:
            self.dropped += 1
            return
        self.buffer.append(record)
        self.accepted += 1
        self.wakeup.set()

    def finish(self) -> None:
        """Take no more records: :meth:`records` ends once it has given those it holds."""
        self.accepting = False
        self.wakeup.set()

    def close(self) -> None:
        """End :meth:`records` now; what it still holds is not wanted any more."""
        self.finish()
        self.closed = True

    async def records(self) -> AsyncIterator[Record]:
        """The records as they arrive, until ``max_records`` were given, or until
        ``duration`` passed (or :meth:`finish`) and the buffer is empty, or :meth:`close`.
        A record taken is always given, however slowly the reader reads."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.duration
        given = 0
        try:
            while given < self.spec.max_records and not self.closed:
                if self.accepting and loop.time() >= deadline:
                    self.accepting = False
                if self.buffer:
                    given += 1
                    yield self.buffer.popleft()
                    continue
                if not self.accepting:
                    return
                self.wakeup.clear()
                try:
                    async with asyncio.timeout_at(deadline):
                        await self.wakeup.wait()
                except TimeoutError:
                    self.accepting = False
        finally:
            self.close()
            self.buffer.clear()


class TapHub:
    """The open taps of one proxy process and the sinks they put on listener contexts.

    ``targets`` lists the live contexts; the runtime calls :meth:`attach` with the
    contexts a reload made live, so a tap open across a reload sees the new config's
    requests too. Contexts replaced while a tap is open keep their sink until the last tap
    closes, so their in-flight requests are still seen.
    """

    def __init__(self, targets: Callable[[], Iterable[TapTarget]]) -> None:
        self.targets = targets
        self.taps: list[Tap] = []
        # id(list) → (the context's sink list, the sink added to it); holding the list
        # keeps its id unique while it is here
        self.attached: dict[int, tuple[list[LogSink], LogSink]] = {}
        self.sink_failed = False

    def open(self, spec: TapSpec) -> Tap:
        tap = Tap(spec)
        self.taps.append(tap)
        if len(self.taps) == 1:
            self.attach(self.targets())
        return tap

    def close(self, tap: Tap) -> None:
        """Forget ``tap``; with it the last, take every sink out again."""
        tap.close()
        if tap in self.taps:
            self.taps.remove(tap)
        if not self.taps:
            for logs, sink in self.attached.values():
                logs.remove(sink)
            self.attached.clear()

    def attach(self, targets: Iterable[TapTarget]) -> None:
        """Add the tap sink to each target not tapped yet; nothing when no tap is open."""
        if not self.taps:
            return
        for listener, stat_prefix, logs in targets:
            if id(logs) not in self.attached:
                sink = self._sink(stat_prefix, direction(listener, stat_prefix))
                logs.append(sink)
                self.attached[id(logs)] = (logs, sink)

    def _sink(self, stat_prefix: str, way: str) -> LogSink:
        taps = self.taps  # the live list: taps opened later are served too

        def tap_sink(record: AccessLogRecord) -> None:
            try:
                fields = to_record(record, stat_prefix, way)
                for tap in taps:
                    if tap.spec.matches(fields):
                        tap.offer(fields)
            except Exception:  # a tap bug must not fail the request being logged
                if not self.sink_failed:
                    self.sink_failed = True
                    log.exception("tap: cannot record a request (logged once)")

        return tap_sink


async def stream(hub: TapHub, spec: TapSpec) -> AsyncGenerator[Record | None, None]:
    """None once the tap is open, then its records, then ``{"dropped": N}``; the tap
    closes however the iteration stops (the end of the tap, or the reader going away)."""
    tap = hub.open(spec)
    try:
        yield None
        async for record in tap.records():
            yield record
        yield {"dropped": tap.dropped}
    finally:
        hub.close(tap)
