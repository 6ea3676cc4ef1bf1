"""Access-log formats: Envoy's operators and defaults, the generated code, the writer."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.errors import ConfigError
from shoal.observe.accesslog import (
    DEFAULT_FORMAT,
    AccessLogWriter,
    compile_json_format,
    compile_text_format,
)
from shoal.observe.tracing import trace_id_of

T0 = 1704067200.123  # 2024-01-01T00:00:00.123Z


@dataclass
class Record:
    """A finished HTTP exchange, as the proxy's stream object presents it."""

    start_time: float = T0
    duration: float = 0.0127
    protocol: str = "HTTP/1.1"
    method: str = "GET"
    path: str = "/api/items?id=7"
    authority: str = "shop.example.com"
    status: int = 200
    response_flags: str = "-"
    response_code_details: str = "via_upstream"
    bytes_received: int = 0
    bytes_sent: int = 1234
    upstream_host: str = "10.0.3.7:8080"
    upstream_cluster: str = "shop"
    route_name: str = "default"
    downstream_remote: str = "10.0.0.9:51234"
    downstream_local: str = "10.0.0.1:15001"
    connection_id: int = 42
    request_headers: dict[str, str] = field(
        default_factory=lambda: {
            "x-forwarded-for": "10.0.0.9",
            "user-agent": "curl/8.5.0",
            "x-request-id": "3f1e2a4b-6c7d-4e8f-9a0b-1c2d3e4f5a6b",
        }
    )
    response_headers: dict[str, str] = field(
        default_factory=lambda: {"x-envoy-upstream-service-time": "11"}
    )

    @property
    def trace_id(self) -> str:  # as the proxy's exchange, with no span of its own
        return trace_id_of(self.request_header) or ""

    def request_header(self, name: str) -> str | None:
        assert name == name.lower()
        return self.request_headers.get(name)

    def response_header(self, name: str) -> str | None:
        assert name == name.lower()
        return self.response_headers.get(name)


def empty_record() -> Record:
    """A TCP-like record where nearly everything is missing."""
    return Record(
        protocol="",
        method="",
        path="",
        authority="",
        status=0,
        response_flags="UF",
        response_code_details="",
        bytes_sent=0,
        upstream_host="",
        upstream_cluster="",
        route_name="",
        request_headers={},
        response_headers={},
    )


def fmt(text: str, record: Record | None = None) -> str:
    return compile_text_format(text)(record or Record())


# --- the default format ---------------------------------------------------------------------


def test_default_format_is_envoys_exactly() -> None:
    assert DEFAULT_FORMAT == (
        '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
        "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
        '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
        '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n'
    )


def test_default_line() -> None:
    assert fmt(DEFAULT_FORMAT) == (
        '[2024-01-01T00:00:00.123Z] "GET /api/items?id=7 HTTP/1.1" 200 - 0 1234 12 11 '
        '"10.0.0.9" "curl/8.5.0" "3f1e2a4b-6c7d-4e8f-9a0b-1c2d3e4f5a6b" "shop.example.com" '
        '"10.0.3.7:8080"\n'
    )


def test_default_line_with_everything_missing() -> None:
    assert fmt(DEFAULT_FORMAT, empty_record()) == (
        '[2024-01-01T00:00:00.123Z] "- - -" 0 UF 0 0 12 - "-" "-" "-" "-" "-"\n'
    )


def test_original_path_wins_over_path() -> None:
    record = Record()
    record.request_headers["x-envoy-original-path"] = "/before/rewrite"
    assert fmt("%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%", record) == "/before/rewrite"


# --- operators --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operator", "expected", "missing"),
    [
        ("%PROTOCOL%", "HTTP/1.1", "-"),
        ("%RESPONSE_CODE%", "200", "0"),
        ("%RESPONSE_FLAGS%", "-", "UF"),
        ("%RESPONSE_CODE_DETAILS%", "via_upstream", "-"),
        ("%BYTES_RECEIVED%", "0", "0"),
        ("%BYTES_SENT%", "1234", "0"),
        ("%DURATION%", "12", "12"),
        ("%REQUEST_DURATION%", "-", "-"),
        ("%RESPONSE_DURATION%", "-", "-"),
        ("%UPSTREAM_HOST%", "10.0.3.7:8080", "-"),
        ("%UPSTREAM_CLUSTER%", "shop", "-"),
        ("%UPSTREAM_LOCAL_ADDRESS%", "-", "-"),
        ("%UPSTREAM_TRANSPORT_FAILURE_REASON%", "-", "-"),
        ("%DOWNSTREAM_REMOTE_ADDRESS%", "10.0.0.9:51234", "10.0.0.9:51234"),
        ("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "10.0.0.9", "10.0.0.9"),
        ("%DOWNSTREAM_LOCAL_ADDRESS%", "10.0.0.1:15001", "10.0.0.1:15001"),
        ("%ROUTE_NAME%", "default", "-"),
        ("%REQUESTED_SERVER_NAME%", "-", "-"),
        ("%CONNECTION_ID%", "42", "42"),
        ("%TRACE_ID%", "-", "-"),
        ("%REQ(:METHOD)%", "GET", "-"),
        ("%REQ(:PATH)%", "/api/items?id=7", "-"),
        ("%REQ(:AUTHORITY)%", "shop.example.com", "-"),
        ("%REQ(User-Agent)%", "curl/8.5.0", "-"),
        ("%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%", "11", "-"),
        ("%TRAILER(GRPC-STATUS)%", "-", "-"),
    ],
)
def test_operator(operator: str, expected: str, missing: str) -> None:
    assert fmt(operator) == expected
    assert fmt(operator, empty_record()) == missing


def test_hostname() -> None:
    assert fmt("%HOSTNAME%") == socket.gethostname()


def test_duration_truncates_to_milliseconds() -> None:
    assert fmt("%DURATION%", Record(duration=0.0999)) == "99"
    assert fmt("%DURATION%", Record(duration=2.5)) == "2500"


def test_empty_header_value_is_printed_empty_like_envoy() -> None:
    record = Record(request_headers={"x-empty": ""})
    assert fmt("[%REQ(X-EMPTY)%]", record) == "[]"


@pytest.mark.parametrize(
    ("operator", "expected"),
    [
        ("%REQ(USER-AGENT):4%", "curl"),
        ("%REQ(USER-AGENT):100%", "curl/8.5.0"),
        ("%REQ(X-MISSING):4%", "-"),
        ("%REQ(:PATH):4%", "/api"),
        ("%REQ(X-MISSING?:PATH):4%", "/api"),
        ("%REQ(:AUTHORITY?X-MISSING)%", "shop.example.com"),
        ("%REQ(X-MISSING?USER-AGENT)%", "curl/8.5.0"),
        ("%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME):1%", "1"),
    ],
)
def test_alternatives_and_max_length(operator: str, expected: str) -> None:
    assert fmt(operator) == expected


def test_pseudo_header_alternative_falls_back_to_header() -> None:
    record = Record(authority="", request_headers={"host": "h.example"})
    assert fmt("%REQ(:AUTHORITY?HOST)%", record) == "h.example"


@pytest.mark.parametrize(
    ("traceparent", "expected"),
    [
        (
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "4bf92f3577b34da6a3ce929d0e0e4736",
        ),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", "-"),
        ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", "-"),
        ("garbage", "-"),
    ],
)
def test_trace_id_from_traceparent(traceparent: str, expected: str) -> None:
    assert fmt("%TRACE_ID%", Record(request_headers={"traceparent": traceparent})) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (
            {"x-b3-traceid": "463ac35c9f6413ad", "x-b3-spanid": "a2fb4a1d1a96d312"},
            "463ac35c9f6413ad",
        ),
        (
            {"b3": "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"},
            "80f198ee56343ba864fe8b2a57d3eff7",
        ),
        ({"b3": "0"}, "-"),
        ({"x-b3-traceid": "463ac35c9f6413ad"}, "-"),  # no span id: no context
    ],
)
def test_trace_id_from_b3(headers: dict[str, str], expected: str) -> None:
    assert fmt("%TRACE_ID%", Record(request_headers=headers)) == expected
    line = compile_json_format([("t", "%TRACE_ID%")])(Record(request_headers=headers))
    assert json.loads(line) == {"t": None if expected == "-" else expected}


@pytest.mark.parametrize(
    ("remote", "expected"),
    [("10.0.0.9:51234", "10.0.0.9"), ("[2001:db8::1]:443", "2001:db8::1"), ("", "-")],
)
def test_remote_address_without_port(remote: str, expected: str) -> None:
    record = Record(downstream_remote=remote)
    assert fmt("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", record) == expected


def test_response_code_details_whitespace() -> None:
    record = Record(response_code_details="upstream reset\tbefore headers")
    assert fmt("%RESPONSE_CODE_DETAILS%", record) == "upstream_reset_before_headers"
    assert fmt("%RESPONSE_CODE_DETAILS(ALLOW_WHITESPACES)%", record) == (
        "upstream reset\tbefore headers"
    )


# --- literals and generated code -------------------------------------------------------------


def test_percent_escape_and_python_syntax_in_literals() -> None:
    text = "100%% {x} {{y}} \\n \"q\" 'q' \\ %PROTOCOL% f'{r}'\n"
    assert fmt(text) == "100% {x} {{y}} \\n \"q\" 'q' \\ HTTP/1.1 f'{r}'\n"


def test_header_names_cannot_escape_into_code() -> None:
    name = "x-a'\"{b}\\c"
    record = Record(request_headers={name: "ok"})
    assert fmt("%REQ(X-A'\"{B}\\C)%", record) == "ok"


@given(st.text())
def test_any_literal_text_round_trips(text: str) -> None:
    assert compile_text_format(text.replace("%", "%%"))(Record()) == text


# --- START_TIME -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", "2024-01-01T00:00:00.123Z"),
        ("%Y/%m/%d %H:%M:%S", "2024/01/01 00:00:00"),
        ("%s", "1704067200"),
        ("%s.%3f", "1704067200.123"),
        ("%6f", "123000"),
        ("%9f", "123000000"),
        ("%f", "123000000"),
        ("%1f|%2f", "1|12"),
        ("%H:%M:%E3S", "00:00:00.123"),
        ("%E6S", "00.123000"),
        ("%z %Ez %Z", "+0000 +00:00 UTC"),
        ("100%%", "100%"),
        ("%d/%b/%Y:%H:%M:%S %z", "01/Jan/2024:00:00:00 +0000"),
    ],
)
def test_start_time_formats(spec: str, expected: str) -> None:
    assert fmt(f"%START_TIME({spec})%") == expected


def test_start_time_float_noise_does_not_lose_a_millisecond() -> None:
    # 1704067200.123 is stored as 1704067200.12299990654...; still .123.
    assert fmt("%START_TIME%", Record(start_time=1704067200.123)).endswith(".123Z")
    assert fmt("%START_TIME%", Record(start_time=1704067200.9999997)) == (
        "2024-01-01T00:00:01.000Z"
    )


def test_start_time_cache_follows_the_second() -> None:
    formatter = compile_text_format("%START_TIME%")
    times = [T0, T0 + 0.5, T0 + 1, T0 + 86400 * 31, T0]
    assert [formatter(Record(start_time=t)) for t in times] == [
        "2024-01-01T00:00:00.123Z",
        "2024-01-01T00:00:00.623Z",
        "2024-01-01T00:00:01.123Z",
        "2024-02-01T00:00:00.123Z",
        "2024-01-01T00:00:00.123Z",
    ]


EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@given(st.integers(min_value=0, max_value=2**31 * 10**6))
def test_start_time_matches_datetime(micros: int) -> None:
    # Below 2**31 s a float time is within 0.25 µs of the microsecond it stands for.
    moment = EPOCH + dt.timedelta(microseconds=micros)
    record = Record(start_time=micros / 1e6)
    assert fmt("%START_TIME%", record) == moment.strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{moment.microsecond // 1000:03d}Z"
    )
    assert fmt("%START_TIME(%s.%6f)%", record) == f"{micros // 10**6}.{micros % 10**6:06d}"


# --- JSON --------------------------------------------------------------------------------------


def test_json_keeps_types_and_order() -> None:
    formatter = compile_json_format(
        [
            ("start_time", "%START_TIME%"),
            ("method", "%REQ(:METHOD)%"),
            ("status", "%RESPONSE_CODE%"),
            ("duration", "%DURATION%"),
            ("flags", "%RESPONSE_FLAGS%"),
            ("upstream_service_time", "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%"),
            ("missing_header", "%REQ(X-MISSING)%"),
            ("cluster", "%UPSTREAM_CLUSTER%"),
            ("sni", "%REQUESTED_SERVER_NAME%"),
            ("host", "%HOSTNAME%"),
            ("ua", "%REQ(USER-AGENT):4%"),
            ("line", "%REQ(:METHOD)% %REQ(:PATH)% %REQ(X-MISSING)%"),
            ("literal", "plain"),
            ("empty", ""),
        ]
    )
    line = formatter(Record())
    assert line.endswith("}\n")
    assert line.count("\n") == 1
    assert json.loads(line) == {
        "start_time": "2024-01-01T00:00:00.123Z",
        "method": "GET",
        "status": 200,
        "duration": 12,
        "flags": "-",
        "upstream_service_time": "11",
        "missing_header": None,
        "cluster": "shop",
        "sni": None,
        "host": socket.gethostname(),
        "ua": "curl",
        "line": "GET /api/items?id=7 -",
        "literal": "plain",
        "empty": "",
    }
    assert line.startswith('{"start_time":"2024-01-01T00:00:00.123Z","method":"GET","status":200,')


def test_json_missing_values_are_null() -> None:
    formatter = compile_json_format(
        [("m", "%REQ(:METHOD)%"), ("c", "%UPSTREAM_CLUSTER%"), ("t", "%TRACE_ID%")]
    )
    assert formatter(empty_record()) == '{"m":null,"c":null,"t":null}\n'


def test_json_escapes_values_and_keys() -> None:
    record = Record(request_headers={"x-evil": 'a"b\\c\nd\x01é'})
    formatter = compile_json_format([('k"{}', "%REQ(X-EVIL)%"), ("mixed", "<%REQ(X-EVIL)%>")])
    line = formatter(record)
    assert line.count("\n") == 1
    assert json.loads(line) == {'k"{}': 'a"b\\c\nd\x01é', "mixed": '<a"b\\c\nd\x01é>'}


def test_json_without_fields() -> None:
    assert compile_json_format([])(Record()) == "{}\n"


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("%NOT_AN_OPERATOR%", "%NOT_AN_OPERATOR%"),
        ("%UPSTREAM_REMOTE_ADDRESS%", "%UPSTREAM_REMOTE_ADDRESS%"),
        ("%DYNAMIC_METADATA(a:b)%", "%DYNAMIC_METADATA%"),
        ("100%", "position 3"),
        ("%lower%", "position 0"),
        ("%REQ%", "%REQ%"),
        ("%REQ()%", "%REQ%"),
        ("%REQ(A?B?C)%", "%REQ(A?B?C)%"),
        ("%PROTOCOL(x)%", "%PROTOCOL%"),
        ("%DURATION:3%", "%DURATION%"),
        ("%START_TIME(%Ec)%", "START_TIME"),
        ("%RESPONSE_CODE_DETAILS(NOPE)%", "%RESPONSE_CODE_DETAILS(NOPE)%"),
    ],
)
def test_bad_formats_raise_config_error_naming_the_problem(text: str, names: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(names)):
        compile_text_format(text)
    with pytest.raises(ConfigError):
        compile_json_format([("k", text)])


# --- writer -------------------------------------------------------------------------------------


def test_writer_buffers_until_flush(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_text("existing\n")
    writer = AccessLogWriter(str(path))
    writer.write("one\n")
    writer.write("two\n")
    assert path.read_text() == "existing\n"
    writer.flush()
    assert path.read_text() == "existing\none\ntwo\n"
    writer.flush()  # nothing buffered: no-op
    writer.write("three\n")
    writer.close()
    assert path.read_text() == "existing\none\ntwo\nthree\n"


def test_writer_flushes_when_the_buffer_fills(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    writer = AccessLogWriter(str(path), flush_at=10)
    writer.write("12345\n")
    assert path.read_text() == ""
    writer.write("67890\n")
    assert path.read_text() == "12345\n67890\n"
    writer.close()


def test_writer_reopen_follows_rotation(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    writer = AccessLogWriter(str(path))
    writer.write("before\n")
    path.rename(tmp_path / "access.log.1")
    writer.reopen()
    writer.write("after\n")
    writer.close()
    assert (tmp_path / "access.log.1").read_text() == "before\n"
    assert path.read_text() == "after\n"


def test_writer_keeps_the_old_file_when_reopen_fails(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    writer = AccessLogWriter(str(directory / "access.log"))
    (directory / "access.log").rename(tmp_path / "rotated.log")
    directory.rmdir()
    writer.reopen()
    assert writer.reopen_failed == 1
    writer.write("still logging\n")
    writer.close()
    assert (tmp_path / "rotated.log").read_text() == "still logging\n"


def test_writer_handles_partial_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "access.log"
    writer = AccessLogWriter(str(path))
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:3])))
    writer.write("a line longer than three bytes\n")
    writer.flush()
    monkeypatch.undo()
    writer.close()
    assert path.read_text() == "a line longer than three bytes\n"


def test_writer_counts_failed_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = AccessLogWriter(str(tmp_path / "access.log"))

    def fail(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", fail)
    writer.write("lost\n")
    writer.flush()
    assert writer.write_failed == 1
    monkeypatch.undo()
    writer.write("kept\n")
    writer.close()
    assert (tmp_path / "access.log").read_text() == "kept\n"


def test_writer_never_raises_on_unencodable_text(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    writer = AccessLogWriter(str(path))
    writer.write("bad \udcff surrogate é\n")
    writer.close()
    assert path.read_bytes() == "bad \\udcff surrogate é\n".encode()


def test_writer_to_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    writer = AccessLogWriter("/dev/stdout")
    writer.write("to stdout\n")
    writer.close()
    assert capfd.readouterr().out == "to stdout\n"
