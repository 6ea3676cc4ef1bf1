"""Envoy-compatible access logs: each format is compiled once, so a line costs ~2 µs.

A format string (Envoy's command operators, e.g. ``%REQ(:METHOD)%``) is parsed once per
config into the Python source of one function — a few statements and a single f-string —
and ``exec``-ed.  Formatting a line then costs some attribute loads and one string build,
with no per-operator dispatch, which keeps access logging inside the proxy's per-request
budget.  Generated code only ever contains names and attribute accesses chosen here;
anything taken from the config (header names, literals) enters it through ``repr``.

:class:`AccessLogWriter` batches lines in memory and writes them with one ``os.write``
per 64 KiB or per ``flush()`` (the proxy flushes from a 1 s timer and at shutdown).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import Any, Literal, Protocol

from shoal.errors import ConfigError

DEFAULT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n'
)


class AccessLogRecord(Protocol):
    """What a finished stream exposes to the access log (the proxy's stream object).

    Members are read-only properties so that plain attributes and computed properties
    both satisfy the protocol.
    """

    @property
    def start_time(self) -> float:
        """``time.time()`` at request start."""

    @property
    def duration(self) -> float:
        """Seconds from request start to the last byte sent."""

    @property
    def protocol(self) -> str:
        """``HTTP/1.1``, ``HTTP/1.0``, ``HTTP/2``, or ``""`` for TCP."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def authority(self) -> str: ...
    @property
    def status(self) -> int:
        """0 when no response was sent."""

    @property
    def response_flags(self) -> str:
        """``-`` or Envoy's short flags joined with ``,`` (``UF,URX``)."""

    @property
    def response_code_details(self) -> str: ...
    @property
    def bytes_received(self) -> int: ...
    @property
    def bytes_sent(self) -> int: ...
    @property
    def upstream_host(self) -> str:
        """``ip:port`` or ``""``."""

    @property
    def upstream_cluster(self) -> str: ...
    @property
    def route_name(self) -> str: ...
    @property
    def downstream_remote(self) -> str:
        """``ip:port`` (IPv6 as ``[ip]:port``)."""

    @property
    def downstream_local(self) -> str: ...
    @property
    def connection_id(self) -> int: ...
    @property
    def trace_id(self) -> str:
        """The proxy's span's trace id, else the request's own (W3C or B3); ``""`` if
        neither."""

    def request_header(self, name: str) -> str | None:
        """Value of a request header; ``name`` is lower-case."""

    def response_header(self, name: str) -> str | None:
        """Value of a response header; ``name`` is lower-case."""


Formatter = Callable[[AccessLogRecord], str]


def compile_text_format(fmt: str) -> Formatter:
    """Compile an Envoy text format; missing values print ``-``. No newline is added."""
    gen = _Codegen()
    return gen.build(gen.text_fstring(_parse(fmt)))


def compile_json_format(fields: Sequence[tuple[str, str]]) -> Formatter:
    """Compile Envoy's ``json_format``: one JSON object per line, keys in the given order.

    A value that is exactly one operator keeps its type (numbers stay numbers, a missing
    value is ``null``); a value mixing literals and operators is a string in which missing
    values print ``-``.  Both as Envoy does.
    """
    gen = _Codegen()
    members = []
    for key, value in fields:
        segments = _parse(value)
        if len(segments) == 1 and isinstance(segments[0], _Op):
            piece = gen.json_value(segments[0])
        else:
            piece = gen.json_string(segments)
        members.append(_Piece(json.dumps(key, ensure_ascii=False) + ":"))
        members.append(piece)
        members.append(_Piece(","))
    if members:
        members.pop()
    return gen.build(_fstring([_Piece("{"), *members, _Piece("}\n")]))


# --- parsing ---------------------------------------------------------------------------------

# Envoy's command grammar: %COMMAND(PARAMS):LENGTH%, PARAMS cannot contain ")".
_COMMAND = re.compile(r"%([A-Z0-9_]+)(?:\(([^)]*)\))?(?::([0-9]+))?%")

_OpKind = Literal["int", "attr", "opt", "const", "time"]


@dataclass(frozen=True, slots=True)
class _Op:
    """One operator, as the code that reads it from the record ``r``.

    ``int``: ``exprs[0]`` is an int expression (never missing).
    ``attr``: ``exprs[0]`` is a str expression where ``""`` means missing.
    ``opt``: ``exprs`` are alternatives, each ``str | None``; the first not None wins.
    ``const``: ``value`` is known now (None means missing).
    ``time``: ``value`` is a START_TIME format (``""`` for Envoy's default).
    """

    kind: _OpKind
    exprs: tuple[str, ...] = ()
    value: str | None = None
    max_len: int | None = None


_HOSTNAME = socket.gethostname()

# Operators that take neither parameters nor a length.  Values the record cannot supply
# (no SNI, no upstream timing) are Envoy's "-", so Envoy configs keep working unchanged.
_PLAIN: dict[str, _Op] = {
    "PROTOCOL": _Op("attr", ("r.protocol",)),
    "RESPONSE_CODE": _Op("int", ("r.status",)),
    "RESPONSE_FLAGS": _Op("attr", ("r.response_flags",)),
    "BYTES_RECEIVED": _Op("int", ("r.bytes_received",)),
    "BYTES_SENT": _Op("int", ("r.bytes_sent",)),
    "DURATION": _Op("int", ("int(r.duration * 1000)",)),
    "REQUEST_DURATION": _Op("const"),
    "RESPONSE_DURATION": _Op("const"),
    "UPSTREAM_HOST": _Op("attr", ("r.upstream_host",)),
    "UPSTREAM_CLUSTER": _Op("attr", ("r.upstream_cluster",)),
    "UPSTREAM_LOCAL_ADDRESS": _Op("const"),
    "UPSTREAM_TRANSPORT_FAILURE_REASON": _Op("const"),
    "DOWNSTREAM_REMOTE_ADDRESS": _Op("attr", ("r.downstream_remote",)),
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": _Op("opt", ("_without_port(r.downstream_remote)",)),
    "DOWNSTREAM_LOCAL_ADDRESS": _Op("attr", ("r.downstream_local",)),
    "ROUTE_NAME": _Op("attr", ("r.route_name",)),
    "REQUESTED_SERVER_NAME": _Op("const"),
    "CONNECTION_ID": _Op("int", ("r.connection_id",)),
    "HOSTNAME": _Op("const", value=_HOSTNAME),
    "TRACE_ID": _Op("attr", ("r.trace_id",)),
}

# Request pseudo-headers the record carries as attributes.
_PSEUDO = {":method": "r.method", ":path": "r.path", ":authority": "r.authority"}


def _parse(fmt: str) -> list[str | _Op]:
    """Split a format into literal strings and operators (``%%`` is a literal ``%``)."""
    out: list[str | _Op] = []
    literal: list[str] = []
    pos = 0
    while (pct := fmt.find("%", pos)) >= 0:
        literal.append(fmt[pos:pct])
        if fmt.startswith("%%", pct):
            literal.append("%")
            pos = pct + 2
            continue
        match = _COMMAND.match(fmt, pct)
        if match is None:
            raise ConfigError(f"no valid operator at position {pct} of access log format {fmt!r}")
        if text := "".join(literal):
            out.append(text)
        literal.clear()
        command, params, length = match.groups()
        out.append(_operator(command, params or "", None if length is None else int(length)))
        pos = match.end()
    if text := "".join(literal) + fmt[pos:]:
        out.append(text)
    return out


def _operator(command: str, params: str, max_len: int | None) -> _Op:
    if command in ("REQ", "RESP", "TRAILER"):
        return _header_operator(command, params, max_len)
    if max_len is not None:
        raise ConfigError(f"access log operator %{command}% does not take a length")
    if command == "START_TIME":
        _compile_start_time(params)  # reject a bad format now, not on the first request
        return _Op("time", value=params)
    if command == "RESPONSE_CODE_DETAILS":
        if params == "ALLOW_WHITESPACES":
            return _Op("attr", ("r.response_code_details",))
        if params:
            raise ConfigError(f"access log operator %RESPONSE_CODE_DETAILS({params})% is invalid")
        return _Op("attr", ("r.response_code_details.translate(_WS)",))
    op = _PLAIN.get(command)
    if op is None:
        raise ConfigError(f"unsupported access log operator %{command}%")
    if params:
        raise ConfigError(f"access log operator %{command}% does not take parameters")
    return op


def _header_operator(command: str, params: str, max_len: int | None) -> _Op:
    names = params.split("?")
    if len(names) > 2:
        raise ConfigError(
            f"access log operator %{command}({params})% has more than one alternative"
        )
    names = [name.lower() for name in names if name]
    if not names:
        raise ConfigError(f"access log operator %{command}% needs a header name")
    if command == "TRAILER":  # the record carries no trailers: always missing
        return _Op("const")
    pseudo = _PSEUDO if command == "REQ" else {}
    if len(names) == 1 and names[0] in pseudo:
        return _Op("attr", (pseudo[names[0]],), max_len=max_len)
    getter = "rq" if command == "REQ" else "rs"
    exprs = tuple(
        f"({pseudo[name]} or None)" if name in pseudo else f"{getter}({name!r})" for name in names
    )
    return _Op("opt", exprs, max_len=max_len)


# --- helpers the generated code calls --------------------------------------------------------


def _without_port(address: str) -> str | None:
    """``10.0.0.1:80`` → ``10.0.0.1``; ``[::1]:80`` → ``::1`` (Envoy drops the brackets)."""
    if not address:
        return None
    if address.startswith("["):
        return address[1 : address.find("]")]
    host, colon, _ = address.rpartition(":")
    return host if colon else address


# Envoy prints RESPONSE_CODE_DETAILS with whitespace turned into "_" unless ALLOW_WHITESPACES.
_WS = str.maketrans(dict.fromkeys(" \t\n\v\f\r", "_"))

_HELPERS: dict[str, Any] = {
    "_enc": encode_basestring,
    "_without_port": _without_port,
    "_WS": _WS,
    "_D": "-",
    "_NULL": "null",
}


# --- code generation ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Piece:
    """Part of the generated f-string: literal text, or an expression when ``expr``."""

    text: str
    expr: bool = False


def _fstring(pieces: Sequence[_Piece]) -> str:
    """Python source of an f-string; expressions here never contain quotes or backslashes."""
    body = "".join(
        "{" + p.text + "}" if p.expr else p.text.replace("{", "{{").replace("}", "}}")
        for p in pieces
    )
    return "f" + repr(body)


class _Codegen:
    """Collects the statements and names of one generated formatter."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.namespace: dict[str, Any] = dict(_HELPERS)
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def _opt(self, op: _Op) -> str:
        """Emit statements leaving an ``opt`` operator's ``str | None`` in a local."""
        var = self._name("v")
        first, *rest = op.exprs
        self.lines.append(f"{var} = {first}")
        for alternative in rest:
            self.lines.append(f"if {var} is None: {var} = {alternative}")
        return var

    def _time(self, op: _Op) -> str:
        name = self._name("_t")
        self.namespace[name] = _compile_start_time(op.value or "")
        return f"{name}(r.start_time)"

    def text(self, op: _Op) -> _Piece:
        """The piece printing ``op`` in a text line (missing → ``-``)."""
        cut = "" if op.max_len is None else f"[:{op.max_len}]"
        if op.kind == "const":
            return _Piece("-" if op.value is None else op.value)
        if op.kind == "time":
            return _Piece(self._time(op), expr=True)
        if op.kind == "attr":
            return _Piece(f"{op.exprs[0]}{cut} or _D", expr=True)
        if op.kind == "opt":
            var = self._opt(op)
            if cut:
                self.lines.append(f"{var} = _D if {var} is None else {var}{cut}")
            else:
                self.lines.append(f"if {var} is None: {var} = _D")
            return _Piece(var, expr=True)
        return _Piece(op.exprs[0], expr=True)

    def text_fstring(self, segments: Sequence[str | _Op]) -> str:
        return _fstring([_Piece(s) if isinstance(s, str) else self.text(s) for s in segments])

    def json_value(self, op: _Op) -> _Piece:
        """The JSON piece for a lone operator, keeping its type (missing → ``null``)."""
        cut = "" if op.max_len is None else f"[:{op.max_len}]"
        if op.kind == "const":
            return _Piece("null" if op.value is None else encode_basestring(op.value))
        if op.kind == "time":
            return _Piece(f"_enc({self._time(op)})", expr=True)
        if op.kind == "int":
            return _Piece(op.exprs[0], expr=True)
        if op.kind == "attr":
            var = self._name("v")
            self.lines.append(f"{var} = {op.exprs[0]}")
            return _Piece(f"_enc({var}{cut}) if {var} else _NULL", expr=True)
        var = self._opt(op)
        self.lines.append(f"{var} = _NULL if {var} is None else _enc({var}{cut})")
        return _Piece(var, expr=True)

    def json_string(self, segments: Sequence[str | _Op]) -> _Piece:
        """The JSON piece for a value mixing literals and operators: always a string."""
        var = self._name("j")
        self.lines.append(f"{var} = _enc({self.text_fstring(segments)})")
        return _Piece(var, expr=True)

    def build(self, fstring: str) -> Formatter:
        body = [*self.lines, f"return {fstring}"]
        source = "\n    ".join(body)
        prologue = ""
        if "rq(" in source:
            prologue += "rq = r.request_header\n    "
        if "rs(" in source:
            prologue += "rs = r.response_header\n    "
        source = f"def _format(r):\n    {prologue}{source}\n"
        exec(compile(source, "<shoal access log format>", "exec"), self.namespace)
        formatter: Formatter = self.namespace["_format"]
        return formatter


# --- START_TIME ----------------------------------------------------------------------------------

# Envoy's default START_TIME format.
_DEFAULT_TIME = "%Y-%m-%dT%H:%M:%E3SZ"
_TIME_TOKEN = re.compile(r"%(?:[1-9]?f|E[1-9]S|Ez|.)|%$|[^%]+", re.DOTALL)
_MILLIS = tuple(f"{n:03d}" for n in range(1000))
# START_TIME is always UTC, so zone specifiers are constants (absl spells UTC's name "UTC").
_UTC_ZONE = {"%z": "+0000", "%Ez": "+00:00", "%Z": "UTC"}


def _fraction(micros: int, digits: int) -> str:
    """The first ``digits`` fractional digits of a second given in microseconds.

    ``time.time()`` is a float good to about a microsecond, so digits past the sixth are 0.
    """
    if digits <= 6:
        return str(micros // 10 ** (6 - digits)).zfill(digits)
    return str(micros).zfill(6) + "0" * (digits - 6)


def _compile_start_time(spec: str) -> Callable[[float], str]:
    """Compile a START_TIME format into ``render(time.time()) -> str`` (always UTC).

    On top of ``strftime`` it handles what Envoy adds: ``%s`` (epoch seconds), ``%f`` and
    ``%1f``-``%9f`` (fractional seconds, 9 digits for ``%f``) and absl's ``%E3S``-style
    seconds with a fraction.  Everything but the fractions is formatted once per second and
    cached, so most calls only add the fraction.
    """
    runs: list[list[str | None]] = [[]]  # strftime text between fractions; None = epoch seconds
    digits: list[int] = []
    for token in _TIME_TOKEN.findall(spec or _DEFAULT_TIME):
        if not token.startswith("%"):
            runs[-1].append(token)
        elif token in ("%", "%%"):
            runs[-1].append("%%")
        elif token.endswith("f"):
            digits.append(int(token[1:-1] or 9))
            runs.append([])
        elif token.startswith("%E") and token.endswith("S"):
            runs[-1].append("%S.")
            digits.append(int(token[2]))
            runs.append([])
        elif token == "%s":
            runs[-1].append(None)
        elif token in _UTC_ZONE:
            runs[-1].append(_UTC_ZONE[token])
        elif token in ("%E", "%O"):
            raise ConfigError(f"unsupported START_TIME specifier in {spec!r}")
        else:
            runs[-1].append(token)

    def texts(second: int) -> list[str]:
        moment = time.gmtime(second)
        out = []
        for run in runs:
            parts: list[str] = []
            pattern = ""
            for piece in run:
                if piece is None:
                    parts.append(time.strftime(pattern, moment) + str(second))
                    pattern = ""
                else:
                    pattern += piece
            parts.append(time.strftime(pattern, moment))
            out.append("".join(parts))
        return out

    cached_second = -1
    cached: list[str] = []
    millis_only = digits == [3]  # Envoy's default format, kept cheapest

    def render(t: float) -> str:
        nonlocal cached_second, cached
        second = int(t)
        if second != cached_second:
            cached = texts(second)
            cached_second = second
        micros = int((t - second) * 1_000_000 + 0.5)
        if micros == 1_000_000:  # rounds up into the next second
            return render(second + 1.0)
        if millis_only:
            return cached[0] + _MILLIS[micros // 1000] + cached[1]
        out = cached[0]
        for places, text in zip(digits, cached[1:], strict=True):
            out += _fraction(micros, places) + text
        return out

    return render


# --- writing --------------------------------------------------------------------------------------

_FLUSH_AT = 64 * 1024
_STD_STREAMS = {"/dev/stdout": 1, "/dev/stderr": 2}


class AccessLogWriter:
    """Appends lines to a log file in batches: one ``os.write`` per 64 KiB or ``flush()``.

    The file is opened with ``O_APPEND`` so several processes can share it, and
    ``reopen()`` follows log rotation.  ``/dev/stdout`` and ``/dev/stderr`` are duplicated
    from fds 1 and 2 rather than opened, which also works when they are sockets.
    ``write_failed`` and ``reopen_failed`` count errors (Envoy's ``access_log_file.*``).
    """

    def __init__(self, path: str, *, flush_at: int = _FLUSH_AT) -> None:
        self.path = path
        self.flush_at = flush_at
        self.write_failed = 0
        self.reopen_failed = 0
        self._lines: list[str] = []
        self._size = 0
        self._fd = self._open()

    def _open(self) -> int:
        std = _STD_STREAMS.get(self.path)
        if std is not None:
            return os.dup(std)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        return os.open(self.path, flags, 0o644)

    def write(self, line: str) -> None:
        """Buffer one formatted line (it carries its own newline)."""
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self.flush_at:
            self.flush()

    def flush(self) -> None:
        """Write everything buffered; on an OS error the batch is dropped and counted."""
        if not self._lines:
            return
        # Never raise over a log line's content: unencodable characters are escaped.
        data = memoryview("".join(self._lines).encode("utf-8", "backslashreplace"))
        self._lines.clear()
        self._size = 0
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError:
            self.write_failed += 1

    def reopen(self) -> None:
        """Flush to the old file, then switch to a fresh open of ``path`` (log rotation)."""
        self.flush()
        try:
            fd = self._open()
        except OSError:
            self.reopen_failed += 1
            return
        os.close(self._fd)
        self._fd = fd

    def close(self) -> None:
        self.flush()
        os.close(self._fd)
