"""HTTP/1.1 codec: bytes in, events out; no sockets, no clocks.

Parsing is llhttp (through httptools), strict mode: it already rejects both
Content-Length and Transfer-Encoding, duplicate Content-Length, bad chunk sizes, bare CR
or LF, obs-fold, invalid methods and header names. This module adds what llhttp leaves to
the caller (size limits, HTTP version, HEAD framing) and turns every parse failure into a
:class:`~shoal.errors.RemoteProtocolError` carrying the status to answer with.

Events come back from ``feed`` as a list, in order: a head object, ``bytes`` body chunks,
``END`` when a message is complete, and ``Upgrade`` (with the bytes after the head) when
the connection stops being HTTP. Nothing is acted on while llhttp is still inside
``feed``: llhttp validates Transfer-Encoding only *after* its headers-complete callback,
so a caller that forwarded at that callback would leak a request it later rejects.
"""

from __future__ import annotations

from typing import Final

import httptools

from shoal.errors import RemoteProtocolError

Headers = list[tuple[bytes, bytes]]


class _End:
    __slots__ = ()

    def __repr__(self) -> str:
        return "END"


END: Final = _End()


class Upgrade:
    """The connection switched protocols; ``rest`` is what followed the head."""

    __slots__ = ("rest",)

    def __init__(self, rest: bytes) -> None:
        self.rest = rest


class RequestHead:
    """A parsed request head. Header names are lower-cased; values are raw bytes."""

    __slots__ = (
        "chunked",
        "connection",
        "content_length",
        "expect_continue",
        "headers",
        "host",
        "keep_alive",
        "method",
        "target",
        "upgrade",
        "version",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.version = b"1.1"
        self.headers: Headers = []
        self.host = b""
        self.content_length = -1  # -1: none given
        self.chunked = False
        self.keep_alive = True
        self.upgrade = b""  # lower-cased Upgrade header value when the request upgrades
        self.expect_continue = False
        self.connection = b""  # the Connection header, when it names more than keep-alive

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def has_body(self) -> bool:
        return self.chunked or self.content_length > 0


class ResponseHead:
    __slots__ = (
        "chunked",
        "connection",
        "content_length",
        "headers",
        "keep_alive",
        "status",
        "version",
    )

    def __init__(self) -> None:
        self.connection = b""
        self.status = 0
        self.version = b"1.1"
        self.headers: Headers = []
        self.content_length = -1
        self.chunked = False
        self.keep_alive = True

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


Event = RequestHead | ResponseHead | bytes | _End | Upgrade

_NOT_IMPLEMENTED_TE = "invalid `Transfer-Encoding`"
_UNSUPPORTED_VERSION = "Invalid HTTP version"
# Connection values that name no other hop-by-hop header
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"upgrade"})


def _remote_error(exc: Exception) -> RemoteProtocolError:
    """Map an llhttp failure to the error and status a proxy answers with."""
    context = exc.__context__
    if isinstance(context, RemoteProtocolError):
        return context
    message = str(exc) or type(exc).__name__
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        return RemoteProtocolError(f"invalid method: {message}", 400)
    if _NOT_IMPLEMENTED_TE in message:
        return RemoteProtocolError(message, 501)
    if message == _UNSUPPORTED_VERSION:  # well-formed HTTP/x.y, but not 1.0/1.1 (or 2.0/0.9)
        return RemoteProtocolError(message, 505)
    return RemoteProtocolError(message, 400)


def _events() -> list[Event]:
    return []


class RequestDecoder:
    """Decodes a stream of requests (keep-alive and pipelined) from one connection."""

    __slots__ = (
        "_error",
        "_events",
        "_head",
        "_head_bytes",
        "_max_head_bytes",
        "_parsed_bytes",
        "_parser",
        "_upgraded",
        "completed_before_error",
    )

    def __init__(self, max_head_bytes: int = 60 * 1024) -> None:
        self._max_head_bytes = max_head_bytes
        self._error: RemoteProtocolError | None = None
        # After feed() raised: the events of the requests that were complete before the
        # bad bytes (in that same feed). They are well-formed and may still be served.
        self.completed_before_error: list[Event] = []
        self._parser = httptools.HttpRequestParser(self)
        self._events: list[Event] = []
        self._head: RequestHead | None = None
        self._head_bytes = 0
        self._parsed_bytes = 0
        self._upgraded = False

    @property
    def in_head(self) -> bool:
        """True while a request head has started but is not complete (for 408 timers)."""
        return self._head is not None

    def feed(self, data: bytes) -> list[Event]:
        if self._error is not None:
            self.completed_before_error = []
            raise RemoteProtocolError(f"stream failed earlier: {self._error}", self._error.status)
        if self._upgraded:
            raise RemoteProtocolError("data after upgrade must not be parsed as HTTP")
        self._events = events = _events()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgraded = True
            events.append(Upgrade(data[upgrade.args[0] :]))
            return events
        except httptools.HttpParserError as exc:
            raise self._fail(_remote_error(exc), events) from exc
        if self._head is not None:
            # A head still incomplete: count what it has buffered inside llhttp so far.
            # One that began in this feed owns only what its callbacks saw: the bytes
            # before it were earlier requests (a large body must not count).
            if self._head_bytes < 0:
                self._head_bytes = self._parsed_bytes
            else:
                self._head_bytes += len(data)
            if self._head_bytes > self._max_head_bytes:
                raise self._fail(RemoteProtocolError("request headers too large", 431), events)
        return events

    def _fail(self, error: RemoteProtocolError, events: list[Event]) -> RemoteProtocolError:
        """The framing can't be trusted from here on: every later feed fails too. Keep the
        complete requests parsed before the error (never a part of the bad one)."""
        self._error = error
        self._head = None  # no head in progress any more (no 408 timer for it)
        last_end = max((i for i, event in enumerate(events) if event is END), default=-1)
        self.completed_before_error = events[: last_end + 1]
        return error

    # llhttp callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._head = RequestHead()
        self._head_bytes = -1  # began in the current feed
        self._parsed_bytes = 0

    def on_url(self, url: bytes) -> None:
        head = self._head
        assert head is not None
        head.target += url
        self._parsed_bytes += len(url)
        if self._parsed_bytes > self._max_head_bytes:
            raise RemoteProtocolError("request line too large", 431)

    def on_header(self, name: bytes, value: bytes) -> None:
        head = self._head
        if head is None:
            return  # a trailer after a chunked body: not forwarded
        name = name.lower()
        value = value.rstrip(b" \t")  # llhttp keeps trailing OWS; it is not in the value
        head.headers.append((name, value))
        self._parsed_bytes += len(name) + len(value) + 4
        if self._parsed_bytes > self._max_head_bytes:
            raise RemoteProtocolError("request headers too large", 431)
        if name == b"host":
            if head.host:
                raise RemoteProtocolError("duplicate Host header", 400)
            head.host = value
        elif name == b"content-length":
            head.content_length = int(value)
        elif name == b"transfer-encoding":
            # Only chunked is implemented: any other coding, even before a final chunked
            # (`gzip, chunked`), is 501 as in Envoy; llhttp rejects a repeated chunked.
            if value.strip().lower() != b"chunked":
                raise RemoteProtocolError("Transfer-Encoding other than chunked", 501)
            head.chunked = True
        elif name == b"expect" and value.lower() == b"100-continue":
            head.expect_continue = True
        elif name == b"connection" and value.lower() not in _PLAIN_CONNECTION:
            head.connection = value

    def on_headers_complete(self) -> None:
        head = self._head
        assert head is not None
        parser = self._parser
        version = parser.get_http_version()
        if version == "1.1":
            head.version = b"1.1"
        elif version == "1.0":
            head.version = b"1.0"
        else:
            raise RemoteProtocolError(f"HTTP version {version} not supported", 505)
        head.method = parser.get_method()
        head.keep_alive = parser.should_keep_alive()
        if not head.host and head.version == b"1.1":
            raise RemoteProtocolError("missing Host header", 400)
        if head.chunked and head.version == b"1.0":
            # RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 is faulty framing
            raise RemoteProtocolError("Transfer-Encoding in an HTTP/1.0 request", 400)
        if parser.should_upgrade():
            value = head.header(b"upgrade")
            head.upgrade = value.lower() if value else b"connect"
        self._events.append(head)
        self._head = None

    def on_body(self, body: bytes) -> None:
        if body:  # feed(b"") mid-body reports an empty span: b"" would encode as last-chunk
            self._events.append(body)

    def on_message_complete(self) -> None:
        self._events.append(END)


class ResponseDecoder:
    """Decodes responses from one upstream connection, one request at a time.

    The caller says before each response whether the request was HEAD
    (``expect_head_response``): the framing headers of such a response promise a body that
    never comes, and llhttp cannot be told, so the parser is replaced after that head.
    """

    __slots__ = ("_events", "_head", "_head_only", "_parser", "_reason", "_replace_parser")

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._events: list[Event] = []
        self._head: ResponseHead | None = None
        self._head_only = False
        self._replace_parser = False
        self._reason = b""

    def expect_head_response(self, head_only: bool) -> None:
        self._head_only = head_only

    def feed(self, data: bytes) -> list[Event]:
        self._events = events = _events()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            events.append(Upgrade(data[upgrade.args[0] :]))
        except httptools.HttpParserError as exc:
            if not self._replace_parser:
                raise _remote_error(exc) from exc
        if self._replace_parser:
            self._replace_parser = False
            self._parser = httptools.HttpResponseParser(self)
        return events

    def on_message_begin(self) -> None:
        self._head = ResponseHead()

    def on_header(self, name: bytes, value: bytes) -> None:
        head = self._head
        if head is None:
            return  # a trailer after a chunked body: not forwarded
        name = name.lower()
        value = value.rstrip(b" \t")  # llhttp keeps trailing OWS; it is not in the value
        head.headers.append((name, value))
        if name == b"content-length":
            head.content_length = int(value)
        elif name == b"transfer-encoding":
            head.chunked = value.rstrip().lower().endswith(b"chunked")
        elif name == b"connection" and value.lower() not in _PLAIN_CONNECTION:
            head.connection = value

    def on_headers_complete(self) -> None:
        head = self._head
        assert head is not None
        parser = self._parser
        head.status = parser.get_status_code()
        version = parser.get_http_version()
        head.version = b"1.0" if version == "1.0" else b"1.1"
        head.keep_alive = parser.should_keep_alive()
        self._head = None
        if head.status < 200 and head.status != 101:
            return  # interim responses (100, 103) are not forwarded
        self._events.append(head)
        if self._head_only and head.status >= 200:
            self._events.append(END)
            self._replace_parser = True
            raise _HeadDoneError

    def on_body(self, body: bytes) -> None:
        if body:  # feed(b"") mid-body reports an empty span: b"" would encode as last-chunk
            self._events.append(body)

    def on_message_complete(self) -> None:
        # 101 hands the connection over (an Upgrade event follows); a 1xx interim
        # response is not the end of the exchange.
        if not self._replace_parser and self._parser.get_status_code() >= 200:
            self._events.append(END)


class _HeadDoneError(Exception):
    """Stops llhttp after the head of a HEAD response (the parser is then replaced)."""


# --- encoding ------------------------------------------------------------------------------

REASONS: Final[dict[int, bytes]] = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    201: b"Created",
    202: b"Accepted",
    204: b"No Content",
    206: b"Partial Content",
    301: b"Moved Permanently",
    302: b"Found",
    303: b"See Other",
    304: b"Not Modified",
    307: b"Temporary Redirect",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}

STATUS_LINES: Final[dict[int, bytes]] = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in REASONS.items()
}


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Unknown"))
    return line


# Hop-by-hop headers (RFC 9110 7.6.1) plus the framing headers a proxy always rewrites.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    """Header names listed in Connection: they are hop-by-hop for this message too."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens)


def no_body_status(status: int) -> bool:
    return status < 200 or status in (204, 304)


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK: Final = b"0\r\n\r\n"
CONTINUE_RESPONSE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


def encode_headers(headers: Headers) -> bytes:
    return b"".join([b"%s: %s\r\n" % pair for pair in headers])


def header_value(headers: Headers, name: bytes) -> str | None:
    """All values of a header joined with "," (as Envoy presents repeated headers)."""
    found: list[bytes] = []
    for key, value in headers:
        if key == name:
            found.append(value)
    if not found:
        return None
    return (found[0] if len(found) == 1 else b",".join(found)).decode("latin-1")
