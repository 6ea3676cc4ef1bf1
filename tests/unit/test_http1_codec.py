"""The sans-IO HTTP/1.1 codec: events for good input, RemoteProtocolError for bad input.

As in h11's tests, every input is also fed one byte at a time and must give the same
events (body chunks may split differently) or the same error. Hypothesis fuzzes both
decoders: any bytes either parse or raise ``RemoteProtocolError``, never anything else.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.codec.http1 import (
    END,
    Event,
    RequestDecoder,
    RequestHead,
    ResponseDecoder,
    ResponseHead,
    Upgrade,
)
from shoal.errors import RemoteProtocolError

Decoder = RequestDecoder | ResponseDecoder


# --- helpers ------------------------------------------------------------------------------


def describe(events: list[Event]) -> list[Any]:
    """Comparable form of events; consecutive body chunks are merged."""
    out: list[Any] = []
    for event in events:
        if isinstance(event, bytes):
            assert event, "empty body chunk event"
            if out and isinstance(out[-1], bytes):
                out[-1] += event
            else:
                out.append(event)
        elif isinstance(event, RequestHead):
            out.append(
                (
                    "request",
                    event.method,
                    event.target,
                    event.version,
                    tuple(event.headers),
                    event.host,
                    event.content_length,
                    event.chunked,
                    event.keep_alive,
                    event.upgrade,
                    event.expect_continue,
                )
            )
        elif isinstance(event, ResponseHead):
            out.append(
                (
                    "response",
                    event.status,
                    event.version,
                    tuple(event.headers),
                    event.content_length,
                    event.chunked,
                    event.keep_alive,
                )
            )
        elif isinstance(event, Upgrade):
            out.append(("upgrade", event.rest))
        else:
            assert event is END, event
            out.append("END")
    return out


def feed_in_pieces(decoder: Decoder, data: bytes, cuts: list[int]) -> list[Event]:
    """Feed ``data`` split at ``cuts``; after an Upgrade the remaining bytes join its rest
    (they are no longer HTTP and the decoder refuses them)."""
    events: list[Event] = []
    for start, stop in pieces(data, cuts):
        events += decoder.feed(data[start:stop])
        if events and isinstance(events[-1], Upgrade):
            events[-1] = Upgrade(events[-1].rest + data[stop:])
            break
    return events


def pieces(data: bytes, cuts: list[int]) -> list[tuple[int, int]]:
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return list(itertools.pairwise(bounds))


def bytewise(decoder: Decoder, data: bytes) -> list[Event]:
    return feed_in_pieces(decoder, data, list(range(len(data))))


def outcome(make: Callable[[], Decoder], data: bytes, cuts: list[int]) -> tuple[str, Any]:
    try:
        return "ok", describe(feed_in_pieces(make(), data, cuts))
    except RemoteProtocolError as exc:
        return "error", exc.status


def req(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    *,
    version: bytes = b"1.1",
    content_length: int = -1,
    chunked: bool = False,
    keep_alive: bool = True,
    upgrade: bytes = b"",
    expect_continue: bool = False,
) -> tuple[Any, ...]:
    host = next((v for k, v in headers if k == b"host"), b"")
    return (
        "request",
        method,
        target,
        version,
        tuple(headers),
        host,
        content_length,
        chunked,
        keep_alive,
        upgrade,
        expect_continue,
    )


def resp(
    status: int,
    headers: list[tuple[bytes, bytes]],
    *,
    version: bytes = b"1.1",
    content_length: int = -1,
    chunked: bool = False,
    keep_alive: bool = True,
) -> tuple[Any, ...]:
    return ("response", status, version, tuple(headers), content_length, chunked, keep_alive)


# --- requests: good input -----------------------------------------------------------------

GOOD_REQUESTS: list[tuple[str, bytes, list[Any]]] = [
    (
        "get",
        b"GET /a?b=c HTTP/1.1\r\nHost: svc\r\nAccept: */*\r\n\r\n",
        [req(b"GET", b"/a?b=c", [(b"host", b"svc"), (b"accept", b"*/*")]), "END"],
    ),
    (
        "header-names-lowercased-values-raw",
        b"GET / HTTP/1.1\r\nHOST: svc\r\nX-Mixed-Case:  Value With  Spaces \r\n\r\n",
        [req(b"GET", b"/", [(b"host", b"svc"), (b"x-mixed-case", b"Value With  Spaces")]), "END"],
    ),
    (
        "obs-text-in-value",
        b"GET / HTTP/1.1\r\nHost: svc\r\nX: caf\xc3\xa9\r\n\r\n",
        [req(b"GET", b"/", [(b"host", b"svc"), (b"x", b"caf\xc3\xa9")]), "END"],
    ),
    (
        "post-content-length",
        b"POST /up HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello",
        [
            req(
                b"POST",
                b"/up",
                [(b"host", b"svc"), (b"content-length", b"5")],
                content_length=5,
            ),
            b"hello",
            "END",
        ],
    ),
    (
        "post-chunked-with-extension-and-trailer",
        b"POST /up HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: ignored\r\n\r\n",
        [
            req(
                b"POST",
                b"/up",
                [(b"host", b"svc"), (b"transfer-encoding", b"chunked")],
                chunked=True,
            ),
            b"hello world",
            "END",
        ],
    ),
    (
        "transfer-encoding-case-and-whitespace",
        b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding:  Chunked \r\n\r\n0\r\n\r\n",
        [
            req(
                b"POST", b"/", [(b"host", b"svc"), (b"transfer-encoding", b"Chunked")], chunked=True
            ),
            "END",
        ],
    ),
    (
        "keep-alive-pipelined",
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
        b"GET /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        [
            req(b"GET", b"/1", [(b"host", b"a")]),
            "END",
            req(b"POST", b"/2", [(b"host", b"a"), (b"content-length", b"2")], content_length=2),
            b"hi",
            "END",
            req(b"GET", b"/3", [(b"host", b"a"), (b"connection", b"close")], keep_alive=False),
            "END",
        ],
    ),
    (
        "http-1.0-without-host",
        b"GET / HTTP/1.0\r\n\r\n",
        [req(b"GET", b"/", [], version=b"1.0", keep_alive=False), "END"],
    ),
    (
        "http-1.0-keep-alive",
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        [req(b"GET", b"/", [(b"connection", b"keep-alive")], version=b"1.0"), "END"],
    ),
    (
        "leading-empty-lines",
        b"\r\n\r\nGET / HTTP/1.1\r\nHost: svc\r\n\r\n",
        [req(b"GET", b"/", [(b"host", b"svc")]), "END"],
    ),
    (
        "expect-continue",
        b"PUT /x HTTP/1.1\r\nHost: svc\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\nz",
        [
            req(
                b"PUT",
                b"/x",
                [(b"host", b"svc"), (b"expect", b"100-Continue"), (b"content-length", b"1")],
                content_length=1,
                expect_continue=True,
            ),
            b"z",
            "END",
        ],
    ),
    (
        "absolute-form",
        b"GET http://svc:8080/p HTTP/1.1\r\nHost: svc:8080\r\n\r\n",
        [req(b"GET", b"http://svc:8080/p", [(b"host", b"svc:8080")]), "END"],
    ),
    (
        "websocket-upgrade",
        b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\r\n"
        b"\x81\x05hello",
        [
            req(
                b"GET",
                b"/ws",
                [(b"host", b"svc"), (b"connection", b"Upgrade"), (b"upgrade", b"WebSocket")],
                upgrade=b"websocket",
            ),
            "END",
            ("upgrade", b"\x81\x05hello"),
        ],
    ),
    (
        "connect",
        b"CONNECT svc:443 HTTP/1.1\r\nHost: svc:443\r\n\r\n\x16\x03\x01",
        [
            req(b"CONNECT", b"svc:443", [(b"host", b"svc:443")], upgrade=b"connect"),
            "END",
            ("upgrade", b"\x16\x03\x01"),
        ],
    ),
]


@pytest.mark.parametrize(
    ("data", "expected"), [c[1:] for c in GOOD_REQUESTS], ids=[c[0] for c in GOOD_REQUESTS]
)
def test_good_requests_whole_and_byte_by_byte(data: bytes, expected: list[Any]) -> None:
    assert describe(RequestDecoder().feed(data)) == expected
    assert describe(bytewise(RequestDecoder(), data)) == expected


@pytest.mark.parametrize("data", [c[1] for c in GOOD_REQUESTS], ids=[c[0] for c in GOOD_REQUESTS])
def test_good_requests_any_two_way_split(data: bytes) -> None:
    expected = describe(RequestDecoder().feed(data))
    for cut in range(1, len(data)):
        assert describe(feed_in_pieces(RequestDecoder(), data, [cut])) == expected, cut


# --- requests: bad input ------------------------------------------------------------------

BAD_REQUESTS: list[tuple[str, bytes, int]] = [
    (
        "cl-and-te",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        400,
    ),
    (
        "te-and-cl",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
        b"0\r\n\r\n",
        400,
    ),
    (
        "duplicate-cl-same",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nA",
        400,
    ),
    (
        "duplicate-cl-different",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nAB",
        400,
    ),
    ("cl-list", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\nA", 400),
    ("cl-negative", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\nA", 400),
    ("cl-plus", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\nA", 400),
    ("cl-hex", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x1\r\n\r\nA", 400),
    (
        "cl-overflow",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        400,
    ),
    (
        "chunk-size-invalid",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nA\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk-size-negative",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nA\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk-size-overflow",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"fffffffffffffffff1\r\nA\r\n",
        400,
    ),
    (
        "chunk-data-too-long",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nAB\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk-bare-lf",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\nA\r\n0\r\n\r\n",
        400,
    ),
    ("bare-lf", b"GET / HTTP/1.1\nHost: a\n\n", 400),
    ("bare-lf-in-headers", b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n", 400),
    ("bare-lf-end-of-head", b"GET / HTTP/1.1\r\nHost: a\r\n\n", 400),
    ("bare-cr", b"GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n", 400),
    ("bare-cr-in-value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
    ("obs-fold-tab", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n\tb\r\n\r\n", 400),
    ("space-before-first-header", b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", 400),
    ("nul-in-value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    ("del-in-value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n", 400),
    ("space-before-colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    ("invalid-header-name", b"GET / HTTP/1.1\r\nHost: a\r\nX(a): b\r\n\r\n", 400),
    ("empty-header-name", b"GET / HTTP/1.1\r\nHost: a\r\n: b\r\n\r\n", 400),
    ("invalid-method", b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("lowercase-method", b"get / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("space-in-target", b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("control-in-target", b"GET /a\x01 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("not-http", b"GET / FOO/1.1\r\nHost: a\r\n\r\n", 400),
    ("http-0.9", b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505),
    ("http-2.0", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    ("http-3.0", b"GET / HTTP/3.0\r\nHost: a\r\n\r\n", 505),
    ("te-gzip", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nA", 501),
    ("te-identity", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n", 501),
    (
        "te-gzip-chunked",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    (
        "te-chunked-gzip",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        400,
    ),
    (
        "te-chunked-chunked",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "te-chunked-twice",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("missing-host", b"GET / HTTP/1.1\r\nX: y\r\n\r\n", 400),
    ("empty-host", b"GET / HTTP/1.1\r\nHost:\r\n\r\n", 400),
    ("duplicate-host", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("oversize-request-line", b"GET /" + b"u" * 2000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 431),
    (
        "oversize-headers",
        b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-F: %s\r\n" % (b"v" * 300) * 8 + b"\r\n",
        431,
    ),
    (
        "oversize-single-header",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 3000 + b"\r\n\r\n",
        431,
    ),
]
SMALL_HEAD = 1024  # max_head_bytes for the table above


@pytest.mark.parametrize(
    ("data", "status"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_requests_whole_and_byte_by_byte(data: bytes, status: int) -> None:
    for feed in (lambda d: d.feed(data), lambda d: bytewise(d, data)):
        decoder = RequestDecoder(SMALL_HEAD)
        with pytest.raises(RemoteProtocolError) as caught:
            feed(decoder)
        assert caught.value.status == status
        assert decoder.completed_before_error == []
        assert not decoder.in_head
        # the stream can't be trusted after an error: it stays failed
        with pytest.raises(RemoteProtocolError):
            decoder.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")


@pytest.mark.parametrize(
    ("data", "status"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_complete_requests_before_a_bad_one_are_kept(data: bytes, status: int) -> None:
    good = (
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
    )
    decoder = RequestDecoder(SMALL_HEAD)
    with pytest.raises(RemoteProtocolError) as caught:
        decoder.feed(good + data)
    assert caught.value.status == status
    assert describe(decoder.completed_before_error) == describe(RequestDecoder().feed(good))


def test_partial_bad_request_is_not_among_the_completed_events() -> None:
    """A head llhttp accepted whose body then breaks is not handed out with the good one."""
    decoder = RequestDecoder()
    with pytest.raises(RemoteProtocolError):
        decoder.feed(
            b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"POST /2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n"
        )
    assert describe(decoder.completed_before_error) == [
        req(b"GET", b"/1", [(b"host", b"a")]),
        "END",
    ]


def test_oversize_head_trickled_in_is_431_before_it_completes() -> None:
    decoder = RequestDecoder(SMALL_HEAD)
    decoder.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: ")
    assert decoder.in_head
    with pytest.raises(RemoteProtocolError) as caught:
        for _ in range(100):
            decoder.feed(b"v" * 100)  # never a CRLF: llhttp alone would buffer forever
    assert caught.value.status == 431


def test_large_body_then_start_of_next_head_is_not_431() -> None:
    """Bytes of an earlier request's body in the same read don't count toward the next head."""
    body = b"x" * (SMALL_HEAD * 20)
    decoder = RequestDecoder(SMALL_HEAD)
    first = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    events = decoder.feed(first + b"GET /next HT")
    assert describe(events)[1:] == [body, "END"]
    assert decoder.in_head
    assert describe(decoder.feed(b"TP/1.1\r\nHost: a\r\n\r\n")) == [
        req(b"GET", b"/next", [(b"host", b"a")]),
        "END",
    ]


def test_in_head_tracks_an_incomplete_head() -> None:
    decoder = RequestDecoder()
    assert not decoder.in_head
    decoder.feed(b"GET / HT")
    assert decoder.in_head
    decoder.feed(b"TP/1.1\r\nHost: a\r\n\r\n")
    assert not decoder.in_head


def test_empty_feed_gives_no_empty_body_chunk() -> None:
    """An empty body chunk would be encoded upstream as the chunked terminator."""
    decoder = RequestDecoder()
    decoder.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab")
    assert decoder.feed(b"") == []
    assert describe(decoder.feed(b"c\r\n0\r\n\r\n")) == [b"c", "END"]


def test_data_after_upgrade_is_refused() -> None:
    decoder = RequestDecoder()
    decoder.feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n")
    with pytest.raises(RemoteProtocolError):
        decoder.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")


# --- responses ----------------------------------------------------------------------------

GOOD_RESPONSES: list[tuple[str, bytes, list[Any]]] = [
    (
        "content-length",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nok",
        [resp(200, [(b"content-length", b"2"), (b"x-a", b"b")], content_length=2), b"ok", "END"],
    ),
    (
        "chunked-with-trailer",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n3;e=1\r\n!!!\r\n"
        b"0\r\nX-Checksum: abc\r\n\r\n",
        [resp(200, [(b"transfer-encoding", b"chunked")], chunked=True), b"ok!!!", "END"],
    ),
    (
        "interim-responses-dropped",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
        [resp(201, [(b"content-length", b"0")], content_length=0), "END"],
    ),
    (
        "bodyless-statuses-ignore-content-length",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        [
            resp(304, [(b"content-length", b"10")], content_length=10),
            "END",
            resp(204, []),
            "END",
        ],
    ),
    (
        "switching-protocols",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"\x81\x02hi",
        [
            resp(101, [(b"connection", b"Upgrade"), (b"upgrade", b"websocket")]),
            ("upgrade", b"\x81\x02hi"),
        ],
    ),
    (
        "http-1.0-close-delimited",
        b"HTTP/1.0 200 OK\r\n\r\nuntil the close",
        [resp(200, [], version=b"1.0", keep_alive=False), b"until the close"],
    ),
    (
        "connection-close",
        b"HTTP/1.1 500 Oops\r\nConnection: close\r\nContent-Length: 1\r\n\r\n!",
        [
            resp(
                500,
                [(b"connection", b"close"), (b"content-length", b"1")],
                content_length=1,
                keep_alive=False,
            ),
            b"!",
            "END",
        ],
    ),
]


@pytest.mark.parametrize(
    ("data", "expected"), [c[1:] for c in GOOD_RESPONSES], ids=[c[0] for c in GOOD_RESPONSES]
)
def test_responses_whole_and_byte_by_byte(data: bytes, expected: list[Any]) -> None:
    assert describe(ResponseDecoder().feed(data)) == expected
    assert describe(bytewise(ResponseDecoder(), data)) == expected


@pytest.mark.parametrize("framing", [b"Content-Length: 5000", b"Transfer-Encoding: chunked"])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "bytewise"])
def test_head_response_has_no_body_and_decoder_continues(framing: bytes, split: bool) -> None:
    decoder = ResponseDecoder()
    feed: Callable[[ResponseDecoder, bytes], list[Event]] = (
        bytewise if split else ResponseDecoder.feed  # type: ignore[assignment]
    )
    decoder.expect_head_response(True)
    events = describe(feed(decoder, b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n\r\n"))
    assert [e if isinstance(e, str) else e[1] for e in events] == [200, "END"]
    decoder.expect_head_response(False)
    events = describe(feed(decoder, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nnew"))
    assert events == [resp(200, [(b"content-length", b"3")], content_length=3), b"new", "END"]


def test_head_response_after_interim_response() -> None:
    decoder = ResponseDecoder()
    decoder.expect_head_response(True)
    events = describe(
        decoder.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")
    )
    assert events == [resp(200, [(b"content-length", b"9")], content_length=9), "END"]


BAD_RESPONSES: list[tuple[str, bytes]] = [
    (
        "cl-and-te",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    ("duplicate-cl", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
    ("bad-chunk", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nxy\r\n"),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n"),
    ("bare-lf", b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"),
    ("bad-status", b"HTTP/1.1 2000 OK\r\n\r\n"),
    ("not-http", b"SSH-2.0-OpenSSH\r\n"),
    ("nul-in-value", b"HTTP/1.1 200 OK\r\nX: \x00\r\nContent-Length: 0\r\n\r\n"),
]


@pytest.mark.parametrize("data", [c[1] for c in BAD_RESPONSES], ids=[c[0] for c in BAD_RESPONSES])
def test_bad_responses_whole_and_byte_by_byte(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        ResponseDecoder().feed(data)
    with pytest.raises(RemoteProtocolError):
        bytewise(ResponseDecoder(), data)


# --- fuzzing ------------------------------------------------------------------------------

REQUEST_SEEDS = [c[1] for c in GOOD_REQUESTS] + [c[1] for c in BAD_REQUESTS[:10]]
RESPONSE_SEEDS = [c[1] for c in GOOD_RESPONSES] + [c[1] for c in BAD_RESPONSES]
INTERESTING = [b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b",", b";", b"\x00", b"0", b"-", b"\xff"]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A valid (or nearly valid) message with byte flips, insertions, deletions, truncation."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "duplicate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            piece = draw(st.sampled_from(INTERESTING) | st.binary(min_size=1, max_size=4))
            data[at:at] = piece
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 4))]
        elif kind == "truncate":
            del data[at:]
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


def cuts_for(data_strategy: st.SearchStrategy[bytes]) -> st.SearchStrategy[tuple[bytes, list[int]]]:
    return data_strategy.flatmap(
        lambda data: st.tuples(
            st.just(data), st.lists(st.integers(0, max(len(data), 1)), max_size=8)
        )
    )


def check_request_events(events: list[Event]) -> None:
    """Events a proxy can forward as-is: well-ordered, framed, never ambiguous."""
    head: RequestHead | None = None
    body = 0
    for event in events:
        if isinstance(event, RequestHead):
            assert head is None, "head inside a message"
            assert not (event.chunked and event.content_length >= 0), "both CL and TE"
            assert event.version in (b"1.0", b"1.1")
            assert event.host or event.version == b"1.0"
            head, body = event, 0
        elif isinstance(event, bytes):
            assert event and head is not None
            body += len(event)
        elif event is END:
            assert head is not None
            if not head.chunked and not head.upgrade:
                assert body == max(head.content_length, 0)
            head = None
        else:
            assert isinstance(event, Upgrade)


def run_request_decoder(data: bytes, cuts: list[int]) -> None:
    decoder = RequestDecoder(SMALL_HEAD)
    events: list[Event] = []
    for start, stop in pieces(data, cuts):
        try:
            events += decoder.feed(data[start:stop])
        except RemoteProtocolError as exc:
            assert exc.status in (400, 431, 501, 505)
            # what a connection may still act on: all it got before, and the complete
            # messages of the failing feed
            check_request_events(events + decoder.completed_before_error)
            with pytest.raises(RemoteProtocolError):
                decoder.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            return
        if events and isinstance(events[-1], Upgrade):
            break
    check_request_events(events)


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(cuts_for(st.binary(max_size=300)))
def test_fuzz_request_decoder_arbitrary_bytes(case: tuple[bytes, list[int]]) -> None:
    run_request_decoder(*case)


@FUZZ
@given(cuts_for(mutated(REQUEST_SEEDS)))
def test_fuzz_request_decoder_mutated_requests(case: tuple[bytes, list[int]]) -> None:
    run_request_decoder(*case)


@FUZZ
@given(cuts_for(mutated(REQUEST_SEEDS)))
def test_fuzz_request_decoder_split_does_not_change_the_outcome(
    case: tuple[bytes, list[int]],
) -> None:
    """Good input gives the same events however it is split, bad input an error. (The
    status may differ when a message has two faults: httptools reports a header to the
    codec only once the next one starts, so which fault is seen first can depend on
    where a read ends. Both are rejections and both close.)"""
    data, cuts = case
    split, whole = outcome(RequestDecoder, data, cuts), outcome(RequestDecoder, data, [])
    assert split[0] == whole[0]
    if whole[0] == "ok":
        assert split == whole


def run_response_decoder(data: bytes, cuts: list[int], head_only: bool) -> None:
    decoder = ResponseDecoder()
    decoder.expect_head_response(head_only)
    try:
        events = feed_in_pieces(decoder, data, cuts)
        events += decoder.feed(b"")
    except RemoteProtocolError:
        return
    for event in events:
        assert isinstance(event, ResponseHead | bytes | Upgrade) or event is END
        if isinstance(event, ResponseHead):
            assert event.status >= 200 or event.status == 101


@FUZZ
@given(cuts_for(st.binary(max_size=300)), st.booleans())
def test_fuzz_response_decoder_arbitrary_bytes(case: tuple[bytes, list[int]], head: bool) -> None:
    run_response_decoder(*case, head)


@FUZZ
@given(cuts_for(mutated(RESPONSE_SEEDS)), st.booleans())
def test_fuzz_response_decoder_mutated_responses(case: tuple[bytes, list[int]], head: bool) -> None:
    run_response_decoder(*case, head)
