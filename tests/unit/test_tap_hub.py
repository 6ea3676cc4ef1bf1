"""The tap's pieces without processes: the ``/tap`` query, record conversion and filters,
the bounded buffer's end and drop rules, and the hub putting sinks on (and back off)
access-log lists."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from shoal.proxy import tap as tap_module
from shoal.proxy.tap import (
    DURATION_CAP,
    MAX_RECORDS_CAP,
    Tap,
    TapHub,
    TapSpec,
    direction,
    stream,
    to_record,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-{'1' * 16}-01"


@dataclass
class Record:
    start_time: float = 1704067200.1234
    duration: float = 0.0127
    protocol: str = "HTTP/1.1"
    method: str = "GET"
    path: str = "/api/items?id=7"
    authority: str = "Shop.example:8080"
    status: int = 200
    response_flags: str = "-"
    bytes_received: int = 5
    bytes_sent: int = 1234
    upstream_host: str = "10.0.3.7:8080"
    upstream_cluster: str = "shop"
    downstream_remote: str = "10.0.0.9:51234"
    headers: dict[str, str] = field(
        default_factory=lambda: {"x-request-id": "rid-1", "traceparent": TRACEPARENT}
    )

    def request_header(self, name: str) -> str | None:
        return self.headers.get(name)


def test_record_fields() -> None:
    assert to_record(Record(), "outbound", "outbound") == {
        "ts": "2024-01-01T00:00:00.123Z",
        "listener": "outbound",
        "direction": "outbound",
        "protocol": "HTTP/1.1",
        "method": "GET",
        "authority": "Shop.example:8080",
        "path": "/api/items?id=7",
        "status": 200,
        "duration_ms": 12.7,
        "upstream_cluster": "shop",
        "upstream_host": "10.0.3.7:8080",
        "response_flags": "-",
        "bytes_received": 5,
        "bytes_sent": 1234,
        "downstream_remote": "10.0.0.9:51234",
        "request_id": "rid-1",
        "trace_id": TRACE,
    }


def test_tcp_record_has_nulls_not_empty_strings() -> None:
    tcp = Record(protocol="", method="", path="", authority="", upstream_host="", headers={})
    record = to_record(tcp, "db", "db")
    assert record["protocol"] == "TCP"
    assert record["method"] is record["path"] is record["authority"] is None
    assert record["upstream_host"] is record["request_id"] is record["trace_id"] is None


@pytest.mark.parametrize(
    "traceparent", ["garbage", f"00-{'0' * 32}-{'1' * 16}-01", f"00-{TRACE.upper()}-{'1' * 16}-01"]
)
def test_invalid_traceparent_has_no_trace_id(traceparent: str) -> None:
    assert to_record(Record(headers={"traceparent": traceparent}), "l", "l")["trace_id"] is None


@pytest.mark.parametrize(
    ("listener", "stat_prefix", "expected"),
    [
        ("outbound", "outbound", "outbound"),
        ("outbound_rpc", "outbound_dubbo", "outbound"),
        ("inbound", "inbound_bolt", "inbound"),
        ("rpc", "inbound_dubbo", "inbound"),  # the stat prefix when the name says nothing
        ("ingress", "ingress", "ingress"),
        ("inboundish", "x", "inboundish"),  # a word that merely starts the same
    ],
)
def test_direction(listener: str, stat_prefix: str, expected: str) -> None:
    assert direction(listener, stat_prefix) == expected


def test_query_defaults_and_caps() -> None:
    assert TapSpec.from_query("") == TapSpec()
    assert TapSpec.from_query("format=json") == TapSpec()
    spec = TapSpec.from_query("service=shop&path_prefix=/api&method=GET&max=5&duration=0.5")
    assert spec == TapSpec("shop", "/api", "GET", None, 5, 0.5)
    capped = TapSpec.from_query("max=99999999&duration=86400")
    assert (capped.max_records, capped.duration) == (MAX_RECORDS_CAP, DURATION_CAP)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("servce=shop", "unknown parameter 'servce'"),
        ("max=1&max=2", "'max' given more than once"),
        ("format=text", "only format=json"),
        ("max=0", "max must be a positive number"),
        ("max=1.5", "max must be a positive number"),
        ("duration=nan", "duration must be a positive number"),
        ("duration=-1", "duration must be a positive number"),
        ("&&", "malformed query string"),
    ],
)
def test_bad_queries_say_why(query: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TapSpec.from_query(query)


def test_filters() -> None:
    record = to_record(Record(), "l", "l")
    assert TapSpec(service="shop.example").matches(record)  # the host, without the port
    assert not TapSpec(service="shop").matches(record)
    assert TapSpec(authority="shop.example:8080").matches(record)
    assert not TapSpec(authority="shop.example").matches(record)
    assert TapSpec(path_prefix="/api/").matches(record)
    assert not TapSpec(path_prefix="/admin").matches(record)
    assert TapSpec(method="GET").matches(record)
    assert not TapSpec(method="get").matches(record)  # methods are case-sensitive
    rpc = to_record(Record(authority="com.example.Greeter", method="sayHello"), "l", "l")
    assert TapSpec(service="com.example.Greeter", method="sayHello").matches(rpc)
    ipv6 = to_record(Record(authority="[::1]:80"), "l", "l")
    assert TapSpec(service="::1").matches(ipv6)
    tcp = to_record(Record(protocol="", method="", path="", authority=""), "l", "l")
    assert TapSpec().matches(tcp)
    assert not TapSpec(service="shop").matches(tcp)


async def _collect(tap: Tap) -> list[dict[str, Any]]:
    return [record async for record in tap.records()]


def test_buffer_drops_when_full_and_ends_at_max(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tap_module, "BUFFER_RECORDS", 3)

    async def main() -> None:
        tap = Tap(TapSpec(max_records=4, duration=5))
        for n in range(5):
            tap.offer({"n": n})
        assert tap.dropped == 2  # nobody read: the buffer held 3
        records = tap.records()
        assert [await anext(records) for _ in range(3)] == [{"n": 0}, {"n": 1}, {"n": 2}]
        tap.offer({"n": 5})
        tap.offer({"n": 6})  # one past max: neither taken nor dropped
        assert await anext(records) == {"n": 5}
        with pytest.raises(StopAsyncIteration):
            await anext(records)
        assert tap.dropped == 2

    asyncio.run(main())


def test_deadline_stops_taking_but_gives_what_it_holds() -> None:
    async def main() -> None:
        tap = Tap(TapSpec(duration=0.05))
        tap.offer({"n": 1})
        await asyncio.sleep(0.1)
        assert await _collect(tap) == [{"n": 1}]
        tap.offer({"n": 2})
        assert tap.buffer == type(tap.buffer)()

    asyncio.run(main())


def test_close_ends_a_waiting_reader_and_finish_flushes() -> None:
    async def main() -> None:
        closed = Tap(TapSpec(duration=30))
        reader = asyncio.ensure_future(_collect(closed))
        await asyncio.sleep(0)
        closed.offer({"n": 1})
        closed.close()
        assert await asyncio.wait_for(reader, 1) == []  # close: held records are not wanted

        finished = Tap(TapSpec(duration=30))
        finished.offer({"n": 1})
        finished.finish()
        finished.offer({"n": 2})
        assert await asyncio.wait_for(_collect(finished), 1) == [{"n": 1}]

    asyncio.run(main())


class Contexts:
    """Access-log lists as listener contexts hold them, each with the config's own sink."""

    def __init__(self) -> None:
        self.logged: list[str] = []
        self.lists: dict[str, list[Callable[[Any], None]]] = {}

    def add(self, name: str) -> list[Callable[[Any], None]]:
        self.lists[name] = [lambda record: self.logged.append(record.path)]
        return self.lists[name]

    def targets(self) -> list[tuple[str, str, list[Callable[[Any], None]]]]:
        return [(name, name, logs) for name, logs in self.lists.items()]

    def finish(self, name: str, record: Any) -> None:
        for write in self.lists[name]:
            write(record)


def test_hub_adds_sinks_while_tapped_and_restores_the_lists() -> None:
    async def main() -> None:
        contexts = Contexts()
        first = contexts.add("outbound")
        original = list(first)
        hub = TapHub(contexts.targets)
        hub.attach(contexts.targets())
        assert first == original  # no tap: nothing added

        one = hub.open(TapSpec(path_prefix="/a"))
        two = hub.open(TapSpec())
        assert len(first) == 2  # one sink for every tap
        reloaded = contexts.add("inbound")  # a reload makes a new context live
        hub.attach(contexts.targets())
        hub.attach(contexts.targets())
        assert len(reloaded) == 2
        contexts.finish("outbound", Record(path="/a/1"))
        contexts.finish("inbound", Record(path="/b/2"))
        assert contexts.logged == ["/a/1", "/b/2"]  # the config's own sink still runs
        assert [r["path"] for r in one.buffer] == ["/a/1"]
        assert [(r["path"], r["direction"]) for r in two.buffer] == [
            ("/a/1", "outbound"),
            ("/b/2", "inbound"),
        ]
        hub.close(one)
        assert len(first) == 2
        hub.close(two)
        assert first == original
        assert len(reloaded) == 1 and not hub.attached

    asyncio.run(main())


def test_sink_never_raises_into_the_request(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        contexts = Contexts()
        logs = contexts.add("outbound")
        hub = TapHub(contexts.targets)
        tap = hub.open(TapSpec())
        broken = Record()
        broken.request_header = None  # type: ignore[assignment,method-assign]
        for _ in range(2):
            for write in logs:
                write(broken)
        assert contexts.logged == ["/api/items?id=7"] * 2
        assert not tap.buffer
        hub.close(tap)

    asyncio.run(main())
    assert len([r for r in caplog.records if "cannot record" in r.message]) == 1


def test_stream_says_when_open_and_closes_the_tap() -> None:
    async def main() -> None:
        contexts = Contexts()
        logs = contexts.add("outbound")
        hub = TapHub(contexts.targets)
        records = stream(hub, TapSpec(max_records=1))
        assert await anext(records) is None
        assert len(logs) == 2
        for write in logs:
            write(Record())
        assert (await anext(records))["path"] == "/api/items?id=7"
        assert await anext(records) == {"dropped": 0}
        with pytest.raises(StopAsyncIteration):
            await anext(records)
        assert len(logs) == 1

        cut = stream(hub, TapSpec())
        await anext(cut)
        await cut.aclose()  # the client went away
        assert len(logs) == 1 and not hub.taps

    asyncio.run(main())
