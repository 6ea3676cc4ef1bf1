"""Interop, in memory: Shoal's HTTP/2 codec against python-hyper's ``h2`` on the other end,
both ways round (our client with h2's server, h2's client with our server).

The two APIs share method names (send_headers, send_data, acknowledge_received_data,
reset_stream, close_connection, ping, ...), so each scenario is written once and run with
Shoal as the client and as the server. Bytes move between the two until both are quiet.
"""

from __future__ import annotations

import hashlib
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest

from shoal.codec import http2 as shoal

REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"t"), (b":path", b"/")]
GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"t"), (b":path", b"/x")]
OK = [(b":status", b"200")]


class Pair:
    """A client and a server, one of them Shoal's; events are collected per side."""

    def __init__(self, shoal_client: bool, **options: Any) -> None:
        ours = shoal.H2Connection(shoal_client, **options)
        config = h2.config.H2Configuration(client_side=not shoal_client, header_encoding=None)
        theirs = h2.connection.H2Connection(config)
        theirs.initiate_connection()
        self.client: Any = ours if shoal_client else theirs
        self.server: Any = theirs if shoal_client else ours
        self.client_events: list[Any] = []
        self.server_events: list[Any] = []
        self.pump()

    def pump(self) -> None:
        moved = True
        while moved:
            moved = False
            data = self.client.data_to_send()
            if data:
                self.server_events += self.server.receive_data(data)
                moved = True
            data = self.server.data_to_send()
            if data:
                self.client_events += self.client.receive_data(data)
                moved = True

    def take(self, side: str, kind: str) -> list[Any]:
        """Remove and return the events of one kind (by class name) seen by a side."""
        events = self.client_events if side == "client" else self.server_events
        taken = [e for e in events if type(e).__name__ == kind]
        events[:] = [e for e in events if type(e).__name__ != kind]
        return taken


def headers_of(event: Any) -> list[tuple[bytes, bytes]]:
    return [(bytes(name), bytes(value)) for name, value in event.headers]


def data_of(events: list[Any], stream_id: int) -> bytes:
    return b"".join(e.data for e in events if e.stream_id == stream_id)


both = pytest.mark.parametrize("shoal_client", [True, False], ids=["shoal-client", "shoal-server"])


@both
def test_request_and_response(shoal_client: bool) -> None:
    pair = Pair(shoal_client)
    stream_id = pair.client.get_next_available_stream_id()
    pair.client.send_headers(stream_id, [*GET, (b"user-agent", b"interop")], end_stream=True)
    pair.pump()
    (request,) = pair.take("server", "RequestReceived")
    assert headers_of(request) == [*GET, (b"user-agent", b"interop")]
    pair.server.send_headers(stream_id, [*OK, (b"content-length", b"5")])
    pair.server.send_data(stream_id, b"hello", end_stream=True)
    pair.pump()
    (response,) = pair.take("client", "ResponseReceived")
    assert headers_of(response) == [*OK, (b"content-length", b"5")]
    assert data_of(pair.take("client", "DataReceived"), stream_id) == b"hello"
    assert not pair.take("client", "StreamReset") + pair.take("server", "StreamReset")
    assert not pair.take("client", "ConnectionTerminated")


@both
def test_a_hundred_concurrent_streams(shoal_client: bool) -> None:
    pair = Pair(shoal_client)
    ids = []
    for i in range(100):
        stream_id = pair.client.get_next_available_stream_id()
        ids.append(stream_id)
        pair.client.send_headers(stream_id, [*REQUEST, (b"x-i", b"%d" % i)])
        pair.client.send_data(stream_id, b"req-%d" % i, end_stream=True)
    pair.pump()
    requests = pair.take("server", "RequestReceived")
    assert len(requests) == 100
    bodies = pair.take("server", "DataReceived")
    for event in bodies:
        pair.server.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
    for i, stream_id in enumerate(ids):
        assert data_of(bodies, stream_id) == b"req-%d" % i
    for i, stream_id in reversed(list(enumerate(ids))):  # answered in reverse order
        pair.server.send_headers(stream_id, [*OK, (b"x-i", b"%d" % i)])
        pair.server.send_data(stream_id, b"resp-%d" % i, end_stream=True)
    pair.pump()
    responses = pair.take("client", "ResponseReceived")
    assert [r.stream_id for r in responses] == list(reversed(ids))
    data = pair.take("client", "DataReceived")
    for i, stream_id in enumerate(ids):
        assert data_of(data, stream_id) == b"resp-%d" % i


def transfer(pair: Pair, sender: Any, receiver_side: str, stream_id: int, body: bytes) -> bytes:
    """Send ``body`` as fast as the windows allow; the receiver acknowledges only between
    rounds. Returns what arrived; checks the sender really waited for the receiver."""
    received = bytearray()
    sent = 0
    while sent < len(body):
        window = sender.local_flow_control_window(stream_id)
        assert window >= 0
        if window == 0:
            # blocked: nothing moves until the receiver acknowledges what it holds
            pair.pump()
            pending = pair.take(receiver_side, "DataReceived")
            assert pending, "sender blocked but receiver holds nothing"
            held = sum(len(e.data) for e in pending)
            assert held <= 128 * 1024  # bounded by the windows, not by the body
            for event in pending:
                received += event.data
                receiver = pair.client if receiver_side == "client" else pair.server
                receiver.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            pair.pump()
            continue
        chunk = body[sent : sent + min(window, sender.max_outbound_frame_size)]
        sent += len(chunk)
        sender.send_data(stream_id, chunk, end_stream=sent == len(body))
    pair.pump()
    received += b"".join(e.data for e in pair.take(receiver_side, "DataReceived"))
    return bytes(received)


@both
@pytest.mark.parametrize("direction", ["upload", "download"])
def test_ten_megabytes_through_a_64k_window(shoal_client: bool, direction: str) -> None:
    pair = Pair(shoal_client, initial_window_size=65535, connection_window_size=65535)
    if not shoal_client:  # h2's side: the same 64 KB windows
        assert pair.client.local_settings.initial_window_size == 65535
    body = bytes(range(256)) * (10 * 1024 * 1024 // 256)
    stream_id = pair.client.get_next_available_stream_id()
    pair.client.send_headers(stream_id, REQUEST, end_stream=direction == "download")
    pair.pump()
    assert pair.take("server", "RequestReceived")
    if direction == "upload":
        received = transfer(pair, pair.client, "server", stream_id, body)
    else:
        pair.server.send_headers(stream_id, OK)
        pair.pump()
        received = transfer(pair, pair.server, "client", stream_id, body)
    assert hashlib.sha256(received).digest() == hashlib.sha256(body).digest()


def test_shoal_server_holds_back_a_sender_until_acknowledged() -> None:
    pair = Pair(shoal_client=False, initial_window_size=65535, connection_window_size=65535)
    pair.client.send_headers(1, REQUEST)
    for _ in range(10):
        window = pair.client.local_flow_control_window(1)
        if window:
            pair.client.send_data(1, b"x" * min(window, 16384))
        pair.pump()
    assert pair.client.local_flow_control_window(1) == 0  # h2's client is blocked
    held = sum(len(e.data) for e in pair.take("server", "DataReceived"))
    assert held == 65535  # and nothing beyond the window reached us
    pair.server.acknowledge_received_data(held, 1)
    pair.pump()
    assert pair.client.local_flow_control_window(1) == 65535


@both
def test_trailers(shoal_client: bool) -> None:
    pair = Pair(shoal_client)
    pair.client.send_headers(1, REQUEST)
    pair.client.send_data(1, b"in")
    pair.client.send_headers(1, [(b"x-req-trailer", b"1")], end_stream=True)
    pair.pump()
    (trailers,) = pair.take("server", "TrailersReceived")
    assert headers_of(trailers) == [(b"x-req-trailer", b"1")]
    pair.server.send_headers(1, [*OK, (b"content-type", b"application/grpc")])
    pair.server.send_data(1, b"out")
    pair.server.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
    pair.pump()
    (trailers,) = pair.take("client", "TrailersReceived")
    assert headers_of(trailers) == [(b"grpc-status", b"0")]


@both
def test_informational_responses(shoal_client: bool) -> None:
    pair = Pair(shoal_client)
    pair.client.send_headers(1, [*REQUEST, (b"expect", b"100-continue")])
    pair.pump()
    pair.server.send_headers(1, [(b":status", b"100")])
    pair.server.send_headers(1, [(b":status", b"103"), (b"link", b"</s.css>")])
    pair.pump()
    informational = pair.take("client", "InformationalResponseReceived")
    assert [headers_of(e)[0] for e in informational] == [(b":status", b"100"), (b":status", b"103")]
    pair.client.send_data(1, b"body", end_stream=True)
    pair.pump()
    pair.server.send_headers(1, OK, end_stream=True)
    pair.pump()
    (response,) = pair.take("client", "ResponseReceived")
    assert headers_of(response) == OK


@both
@pytest.mark.parametrize("who", ["client", "server"])
def test_reset_either_way(shoal_client: bool, who: str) -> None:
    pair = Pair(shoal_client)
    pair.client.send_headers(1, REQUEST)
    pair.pump()
    resetter = pair.client if who == "client" else pair.server
    resetter.reset_stream(1, shoal.CANCEL)
    pair.pump()
    other = "server" if who == "client" else "client"
    (reset,) = pair.take(other, "StreamReset")
    assert (reset.stream_id, reset.error_code) == (1, shoal.CANCEL)
    # the connection carries on
    stream_id = pair.client.get_next_available_stream_id()
    pair.client.send_headers(stream_id, GET, end_stream=True)
    pair.pump()
    assert pair.take("server", "RequestReceived")[-1].stream_id == stream_id


def test_goaway_from_shoal_server_after_the_last_response() -> None:
    # h2 neither sends nor receives once a GOAWAY crossed (its state machine closes), so
    # the drain itself is covered in test_http2_codec; here h2 reads our GOAWAY correctly.
    pair = Pair(shoal_client=False)
    pair.client.send_headers(1, GET, end_stream=True)
    pair.client.send_headers(3, GET, end_stream=True)
    pair.pump()
    pair.server.send_headers(1, OK, end_stream=True)
    pair.server.send_headers(3, OK, end_stream=True)
    pair.server.close_connection(error_code=0)
    pair.pump()
    assert [r.stream_id for r in pair.take("client", "ResponseReceived")] == [1, 3]
    (goaway,) = pair.take("client", "ConnectionTerminated")
    assert (goaway.error_code, goaway.last_stream_id) == (0, 3)
    assert pair.server.open_streams == 0


def test_goaway_from_h2_server_refuses_our_later_streams() -> None:
    pair = Pair(shoal_client=True)
    pair.client.send_headers(1, GET, end_stream=True)
    pair.client.send_headers(3, GET, end_stream=True)
    pair.pump()
    pair.server.close_connection(error_code=0, last_stream_id=1)
    pair.pump()
    (reset,) = pair.take("client", "StreamReset")
    assert (reset.stream_id, reset.error_code, reset.remote) == (3, shoal.REFUSED_STREAM, True)


def test_shoal_client_goaway_to_h2_server() -> None:
    pair = Pair(shoal_client=True)
    pair.client.close_connection()
    pair.pump()
    (goaway,) = pair.take("server", "ConnectionTerminated")
    assert goaway.error_code == 0


@both
def test_ping_both_ways(shoal_client: bool) -> None:
    pair = Pair(shoal_client)
    pair.client.ping(b"c-ping-1")
    pair.server.ping(b"s-ping-2")
    pair.pump()
    (client_ack,) = pair.take("client", "PingAckReceived")
    (server_ack,) = pair.take("server", "PingAckReceived")
    assert client_ack.ping_data == b"c-ping-1"
    assert server_ack.ping_data == b"s-ping-2"


@both
def test_large_headers_across_continuation(shoal_client: bool) -> None:
    pair = Pair(shoal_client)
    big = [*GET, (b"x-big", b"v" * 40000)]
    pair.client.send_headers(1, big, end_stream=True)
    pair.pump()
    (request,) = pair.take("server", "RequestReceived")
    assert headers_of(request) == big
    pair.server.send_headers(1, [*OK, (b"x-big", b"w" * 40000)], end_stream=True)
    pair.pump()
    (response,) = pair.take("client", "ResponseReceived")
    assert headers_of(response)[1] == (b"x-big", b"w" * 40000)


def test_many_requests_keep_hpack_tables_in_step() -> None:
    for shoal_client in (True, False):
        pair = Pair(shoal_client)
        for i in range(300):
            stream_id = pair.client.get_next_available_stream_id()
            request = [*GET, (b"x-id", b"%d" % (i % 37)), (b"x-fresh", b"v%d" % i)]
            pair.client.send_headers(stream_id, request, end_stream=True)
            pair.pump()
            (event,) = pair.take("server", "RequestReceived")
            assert headers_of(event) == request
            pair.server.send_headers(stream_id, [*OK, (b"x-r", b"%d" % i)], end_stream=True)
            pair.pump()
            (response,) = pair.take("client", "ResponseReceived")
            assert headers_of(response) == [*OK, (b"x-r", b"%d" % i)]
