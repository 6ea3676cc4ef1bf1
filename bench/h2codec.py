"""The HTTP/2 codec's CPU cost per request, no sockets: python-hyper's ``h2`` against
Shoal's ``shoal.codec.http2``, both ends, one connection, many streams.

    .venv/bin/python bench/h2codec.py [--requests 20000] [--repeat 5] [--json]

- **server side**: receive one request (a HEADERS frame with END_STREAM: a GET with eight
  fields, one of them a per-request ``x-request-id``), send the response (HEADERS with five
  fields, a 100-byte DATA frame with END_STREAM), take the bytes to send.
- **client side**: the mirror image: send the request, receive the response, acknowledge
  the 100 bytes.
- **HPACK alone**: decode that request block, encode that response list (the ``hpack``
  package against ``shoal.codec.h2.hpack``), which is why Shoal has its own HPACK.

The peer's bytes are made once, beforehand, by an ``h2`` connection (steady-state HPACK:
repeated fields are indexed), so only the side under test is timed. Each figure is the best of
``--repeat`` runs, in µs per request. Shoal is measured as imported (mypyc-compiled when
``scripts/compile.py`` built it) and, in a child process, from its Python source.
"""

from __future__ import annotations

import argparse
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import h2.config
import h2.connection
import h2.events
import hpack

REQUEST = [
    (b":method", b"GET"),
    (b":scheme", b"http"),
    (b":authority", b"bench.local"),
    (b":path", b"/api/items/42"),
    (b"user-agent", b"h2load/1.52"),
    (b"accept", b"*/*"),
    (b"x-tenant", b"bench"),
]
RESPONSE = [
    (b":status", b"200"),
    (b"server", b"shoal"),
    (b"date", b"Wed, 25 Nov 2026 21:00:00 GMT"),
    (b"content-type", b"text/plain"),
    (b"content-length", b"100"),
]
BODY = b"x" * 100
BIG_WINDOW = 2**31 - 1


def request_headers(i: int) -> list[tuple[bytes, bytes]]:
    return [*REQUEST, (b"x-request-id", b"%032x" % (i * 0x9E3779B1))]


def h2_peer(client_side: bool) -> h2.connection.H2Connection:
    """An h2 connection that never runs out of window (its bytes are replayed, unread)."""
    config = h2.config.H2Configuration(client_side=client_side, header_encoding=None)
    conn = h2.connection.H2Connection(config)
    conn.local_settings.initial_window_size = BIG_WINDOW
    conn.initiate_connection()
    conn.increment_flow_control_window(BIG_WINDOW - 65535)
    return conn


@functools.cache
def client_bytes(n: int) -> tuple[bytes, list[bytes]]:
    """A client's preface and n requests (stream 1, 3, ...), each as its own bytes."""
    client = h2_peer(client_side=True)
    preface = client.data_to_send()
    requests = []
    for i in range(n):
        stream_id = client.get_next_available_stream_id()
        client.send_headers(stream_id, request_headers(i), end_stream=True)
        requests.append(client.data_to_send())
    return preface, requests


@functools.cache
def server_bytes(n: int) -> tuple[bytes, list[bytes]]:
    """A server's preface and its n responses to streams 1, 3, ..."""
    client_preface, requests = client_bytes(n)
    server = h2_peer(client_side=False)
    server.receive_data(client_preface)
    preface = server.data_to_send()
    responses = []
    for chunk in requests:
        for event in server.receive_data(chunk):
            if isinstance(event, h2.events.RequestReceived):
                server.send_headers(event.stream_id, RESPONSE)
                server.send_data(event.stream_id, BODY, end_stream=True)
        responses.append(server.data_to_send())
    return preface, responses


# --- the sides under test ---------------------------------------------------------------------


def h2_server(n: int) -> float:
    preface, requests = client_bytes(n)
    config = h2.config.H2Configuration(client_side=False, header_encoding=None)
    server = h2.connection.H2Connection(config)
    server.initiate_connection()
    server.receive_data(preface)
    server.data_to_send()
    request_type = h2.events.RequestReceived
    start = time.perf_counter()
    for chunk in requests:
        for event in server.receive_data(chunk):
            if type(event) is request_type:
                server.send_headers(event.stream_id, RESPONSE)
                server.send_data(event.stream_id, BODY, end_stream=True)
        server.data_to_send()
    return time.perf_counter() - start


def h2_client(n: int) -> float:
    preface, responses = server_bytes(n)
    config = h2.config.H2Configuration(client_side=True, header_encoding=None)
    client = h2.connection.H2Connection(config)
    client.initiate_connection()
    client.receive_data(preface)
    client.data_to_send()
    data_type = h2.events.DataReceived
    start = time.perf_counter()
    for i, chunk in enumerate(responses):
        stream_id = client.get_next_available_stream_id()
        client.send_headers(stream_id, request_headers(i), end_stream=True)
        client.data_to_send()
        for event in client.receive_data(chunk):
            if type(event) is data_type:
                client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
    return time.perf_counter() - start


def shoal_server(http2: ModuleType, n: int) -> float:
    preface, requests = client_bytes(n)
    server = http2.H2Connection(False, max_concurrent_streams=1000)
    server.receive_data(preface)
    server.data_to_send()
    request_type = http2.RequestReceived
    start = time.perf_counter()
    for chunk in requests:
        for event in server.receive_data(chunk):
            if type(event) is request_type:
                server.send_headers(event.stream_id, RESPONSE)
                server.send_data(event.stream_id, BODY, end_stream=True)
        server.data_to_send()
    return time.perf_counter() - start


def shoal_client(http2: ModuleType, n: int) -> float:
    preface, responses = server_bytes(n)
    client = http2.H2Connection(True)
    client.receive_data(preface)
    client.data_to_send()
    data_type = http2.DataReceived
    start = time.perf_counter()
    for i, chunk in enumerate(responses):
        stream_id = client.get_next_available_stream_id()
        client.send_headers(stream_id, request_headers(i), end_stream=True)
        client.data_to_send()
        for event in client.receive_data(chunk):
            if type(event) is data_type:
                client.acknowledge_received_data(len(event.data), event.stream_id)
    return time.perf_counter() - start


@functools.cache
def request_blocks(n: int) -> list[bytes]:
    encoder = hpack.Encoder()
    return [encoder.encode(request_headers(i)) for i in range(n)]


def hpack_decode(n: int) -> float:
    blocks = request_blocks(n)
    decoder = hpack.Decoder()
    start = time.perf_counter()
    for block in blocks:
        decoder.decode(block, raw=True)
    return time.perf_counter() - start


def hpack_encode(n: int) -> float:
    encoder = hpack.Encoder()
    start = time.perf_counter()
    for _ in range(n):
        encoder.encode(RESPONSE)
    return time.perf_counter() - start


def shoal_decode(hpack_module: ModuleType, n: int) -> float:
    blocks = request_blocks(n)
    decoder = hpack_module.Decoder()
    start = time.perf_counter()
    for block in blocks:
        decoder.decode(block, 65536)
    return time.perf_counter() - start


def shoal_encode(hpack_module: ModuleType, n: int) -> float:
    encoder = hpack_module.Encoder()
    start = time.perf_counter()
    for _ in range(n):
        encoder.encode(RESPONSE)
    return time.perf_counter() - start


# --- running ----------------------------------------------------------------------------------


class _SourceOnly(importlib.abc.MetaPathFinder):
    """Import Shoal's HTTP/2 modules from their .py files even when compiled ones exist."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "shoal.codec.http2" and not fullname.startswith("shoal.codec.h2."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None or spec.origin.endswith(".py"):
            return spec
        source = spec.origin.split(".cpython-")[0] + ".py"
        return importlib.util.spec_from_file_location(fullname, source)


def best(run: Callable[[int], float], n: int, repeat: int) -> float:
    return min(run(n) for _ in range(repeat)) / n * 1e6


def measure(n: int, repeat: int, only_shoal: bool) -> dict[str, Any]:
    from shoal.codec import http2
    from shoal.codec.h2 import hpack as shoal_hpack

    compiled = not http2.__file__.endswith(".py")
    label = "shoal (compiled)" if compiled else "shoal (interpreted)"
    results: dict[str, Any] = {"compiled": compiled, "rows": {}}
    rows = results["rows"]
    if not only_shoal:
        rows["h2"] = {
            "server": best(h2_server, n, repeat),
            "client": best(h2_client, n, repeat),
            "hpack_decode": best(hpack_decode, n, repeat),
            "hpack_encode": best(hpack_encode, n, repeat),
        }
    rows[label] = {
        "server": best(lambda k: shoal_server(http2, k), n, repeat),
        "client": best(lambda k: shoal_client(http2, k), n, repeat),
        "hpack_decode": best(lambda k: shoal_decode(shoal_hpack, k), n, repeat),
        "hpack_encode": best(lambda k: shoal_encode(shoal_hpack, k), n, repeat),
    }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument("--interpreted", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.interpreted:
        sys.meta_path.insert(0, _SourceOnly())
    results = measure(args.requests, args.repeat, only_shoal=args.interpreted)
    if results["compiled"]:
        child = subprocess.run(
            [sys.executable, __file__, "--json", "--interpreted", *_passthrough(args)],
            check=True,
            capture_output=True,
            text=True,
        )
        results["rows"].update(json.loads(child.stdout)["rows"])
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"{args.requests} requests on one connection, best of {args.repeat}; µs per request\n")
    print("| codec | server side | client side | HPACK: decode request | encode response |")
    print("|---|--:|--:|--:|--:|")
    for name, row in results["rows"].items():
        print(
            f"| {name} | {row['server']:.2f} | {row['client']:.2f} | "
            f"{row['hpack_decode']:.2f} | {row['hpack_encode']:.2f} |"
        )
    return 0


def _passthrough(args: argparse.Namespace) -> list[str]:
    return ["--requests", str(args.requests), "--repeat", str(args.repeat)]


if __name__ == "__main__":
    sys.exit(main())
