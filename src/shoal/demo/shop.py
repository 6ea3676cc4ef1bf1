"""The demo shop's services, one per process: ``python -m shoal.demo.shop NAME ...``.

    frontend ──► catalog (v1, v2)          product pages: catalog + reviews
        │   ├──► reviews ──► ratings                      + recommendations
        │   └──► recommendations (gRPC)
        └──────► payments (Dubbo)          checkout: catalog's price, then payments.charge

Each app knows nothing of the mesh but two local addresses: its sidecar's outbound
listener (HTTP, routed by the ``Host`` header; gRPC in h2c on the same port, routed by
``:authority``) and, for the frontend, its sidecar's outbound RPC listener (Dubbo).
Discovery, the canary split, retries, faults and breakers all happen in the sidecars,
which is the point of the demo.

The apps misbehave a little on purpose, so that success rates are worth watching:
ratings answers 503 to one request in twenty (reviews' sidecar retries them, as Istio's
default retry policy says, so only ratings' own success rate shows them), catalog v2 (the
canary) answers 500 to one request in ten, unknown products are 404, and payments
declines cards ending in 0002 (a Dubbo error). The frontend degrades rather than fails
when reviews are down: the page is served without them.

They are ``http.server`` apps (a thread per connection, HTTP/1.1 keep-alive), because a
demo app should read like an app, not like a proxy; recommendations is a grpcio server with
one method, ``/shoal.demo.Recommendations/For`` (the product ID in, JSON out: raw bytes
through generic handlers, so there is no code to generate).
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import random
import signal
import socket
import threading
from collections.abc import Mapping
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc

from shoal.codec.rpc.base import RpcFrame
from shoal.codec.rpc.dubbo import HEADER_BYTES, DubboCodec, Status, encode_request
from shoal.codec.rpc.hessian2 import Hessian2Reader, write_int, write_string

PAYMENTS = "com.shoal.demo.Payments"
RECOMMENDATIONS = "recommendations:50051"  # the gRPC service's :authority
RECOMMEND = "/shoal.demo.Recommendations/For"
PAYMENTS_VERSION = "1.0.0"
PRODUCTS = {  # id: (name, price in cents)
    1: ("Sea glass", 1200),
    2: ("Driftwood", 2500),
    3: ("Sand dollar", 800),
    4: ("Message in a bottle", 4200),
    5: ("Lighthouse lamp", 9900),
}
STARS = {1: 4.5, 2: 3.8, 3: 4.9, 4: 4.1, 5: 3.2}
CANARY_BUG_RATE = 0.1  # catalog v2's share of 500s
FLAKY_RATE = 0.05  # ratings' share of 503s, which the caller's sidecar retries
TIMEOUT = 3.0  # seconds for every call an app makes

# Headers an app must pass from its request to the calls it makes, so that a trace (and
# the proxies' request id) follows a request across the mesh; the proxies cannot do it.
TRACE_HEADERS = (
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
)

REVIEWS = ["Would beachcomb again.", "Smaller than it looked.", "Five seagulls out of five."]

Reply = tuple[int, dict[str, Any]]  # status, JSON body


class UpstreamError(Exception):
    """A call to another service failed: its status (0: no answer) and what it said."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def call_http(outbound: int, host: str, path: str, headers: Mapping[str, str]) -> dict[str, Any]:
    """GET ``http://host/path`` through the sidecar's outbound listener on ``outbound``."""
    conn = http.client.HTTPConnection("127.0.0.1", outbound, timeout=TIMEOUT)
    try:
        conn.request("GET", path, headers={**headers, "Host": host})
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise UpstreamError(0, f"{host}: {exc}") from exc
    finally:
        conn.close()
    if response.status != 200:
        raise UpstreamError(response.status, f"{host}: {response.status} {body[:200]!r}")
    result: dict[str, Any] = json.loads(body)
    return result


def recommend(channel: grpc.Channel, product: int, trace: Mapping[str, str]) -> list[str]:
    """``Recommendations.For(product)`` in gRPC on ``channel`` (the sidecar's outbound
    port, h2c): product names, or UpstreamError with the gRPC status code."""
    call = channel.unary_unary(RECOMMEND)
    try:
        answer = call(str(product).encode(), timeout=TIMEOUT, metadata=tuple(trace.items()))
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        raise UpstreamError(code.value[0], f"recommendations: {code.name} {details}") from exc
    names: list[str] = json.loads(answer)
    return names


def charge(rpc_outbound: int, request_id: int, order: str, cents: int, card: str) -> str:
    """``Payments.charge(order, cents, card)`` in Dubbo through the sidecar's outbound RPC
    listener on ``rpc_outbound``: the receipt, or UpstreamError with the Dubbo status."""
    args = bytearray()
    write_string(args, order)
    write_int(args, cents)
    write_string(args, card)
    frame = encode_request(
        request_id,
        PAYMENTS,
        "charge",
        version=PAYMENTS_VERSION,
        param_types="Ljava/lang/String;ILjava/lang/String;",
        args=bytes(args),
        attachments={"timeout": str(int(TIMEOUT * 1000))},
    )
    decoder = DubboCodec().decoder()
    try:
        with socket.create_connection(("127.0.0.1", rpc_outbound), timeout=TIMEOUT) as sock:
            sock.sendall(frame)
            answers: list[RpcFrame] = []
            while not answers:
                data = sock.recv(65536)
                if not data:
                    raise UpstreamError(0, "payments: connection closed")
                answers = decoder.feed(data)
    except OSError as exc:
        raise UpstreamError(0, f"payments: {exc}") from exc
    reply = answers[0]
    body = Hessian2Reader(reply.raw, HEADER_BYTES)
    if reply.status != Status.OK:  # the body is the error message
        raise UpstreamError(reply.status, f"payments: {body.read_string()}")
    if not reply.ok:
        raise UpstreamError(reply.status, "payments: the provider returned an exception")
    body.read_int()  # the response type: a value
    return body.read_string()


def product_of(parts: list[str], collection: str) -> int | None:
    """The ID in ``/<collection>/<ID>``, else None."""
    if len(parts) == 2 and parts[0] == collection and parts[1].isdigit():
        return int(parts[1])
    return None


class Service:
    """One app: ``answer`` a request (method, path segments, query, trace headers)."""

    def __init__(self, version: str, outbound: int, rpc_outbound: int) -> None:
        self.version = version
        self.outbound = outbound
        self.rpc_outbound = rpc_outbound
        self.random = random.Random()  # for the failures on purpose

    def answer(
        self, method: str, parts: list[str], query: dict[str, str], trace: Mapping[str, str]
    ) -> Reply:
        raise NotImplementedError


class Catalog(Service):
    def answer(
        self, method: str, parts: list[str], query: dict[str, str], trace: Mapping[str, str]
    ) -> Reply:
        product = product_of(parts, "products")
        if method != "GET" or product is None:
            return 404, {"error": "try GET /products/1"}
        if product not in PRODUCTS:
            return 404, {"error": f"no product {product}"}
        if self.version == "v2" and self.random.random() < CANARY_BUG_RATE:
            return 500, {"error": "v2 bug: the sale price came out as NaN"}
        name, cents = PRODUCTS[product]
        if self.version == "v2":  # the canary's feature: a sale
            cents = cents * 9 // 10
        return 200, {"id": product, "name": name, "cents": cents, "version": self.version}


class Ratings(Service):
    def answer(
        self, method: str, parts: list[str], query: dict[str, str], trace: Mapping[str, str]
    ) -> Reply:
        product = product_of(parts, "ratings")
        if method != "GET" or product not in STARS:
            return 404, {"error": "try GET /ratings/1"}
        if self.random.random() < FLAKY_RATE:
            return 503, {"error": "overloaded, try again"}
        return 200, {"product": product, "stars": STARS[product]}


class Reviews(Service):
    def answer(
        self, method: str, parts: list[str], query: dict[str, str], trace: Mapping[str, str]
    ) -> Reply:
        product = product_of(parts, "reviews")
        if method != "GET" or product is None:
            return 404, {"error": "try GET /reviews/1"}
        try:
            stars = call_http(self.outbound, "ratings", f"/ratings/{product}", trace)["stars"]
        except UpstreamError as exc:  # reviews without their stars are no reviews
            return 502, {"error": str(exc)}
        return 200, {"product": product, "stars": stars, "reviews": REVIEWS[: product % 3 + 1]}


class Frontend(Service):
    def __init__(self, version: str, outbound: int, rpc_outbound: int) -> None:
        super().__init__(version, outbound, rpc_outbound)
        self.orders = itertools.count(1)  # next() is atomic: request threads share it
        # one HTTP/2 connection to the sidecar, shared by the request threads; the authority
        # names the service, as a Host header does for HTTP
        self.grpc = grpc.insecure_channel(
            f"127.0.0.1:{outbound}", options=[("grpc.default_authority", RECOMMENDATIONS)]
        )

    def answer(
        self, method: str, parts: list[str], query: dict[str, str], trace: Mapping[str, str]
    ) -> Reply:
        if method == "POST" and (product := product_of(parts, "checkout")) is not None:
            return self.checkout(product, query.get("card", ""), trace)
        product = product_of(parts, "products")
        if method != "GET" or product is None:
            return 404, {"error": "try GET /products/1 (1-5) or POST /checkout/1?card=4242"}
        try:
            item = call_http(self.outbound, "catalog", f"/products/{product}", trace)
        except UpstreamError as exc:
            return (404 if exc.status == 404 else 502), {"error": str(exc)}
        page: dict[str, Any] = {"product": item}
        try:
            page["reviews"] = call_http(self.outbound, "reviews", f"/reviews/{product}", trace)
        except UpstreamError as exc:  # degrade: the page without its reviews
            page["reviews"] = None
            page["reviews_error"] = str(exc)
        try:
            page["recommendations"] = recommend(self.grpc, product, trace)
        except UpstreamError as exc:  # degrade: the page without them
            page["recommendations"] = None
            page["recommendations_error"] = str(exc)
        return 200, page

    def checkout(self, product: int, card: str, trace: Mapping[str, str]) -> Reply:
        try:
            item = call_http(self.outbound, "catalog", f"/products/{product}", trace)
        except UpstreamError as exc:
            return (404 if exc.status == 404 else 502), {"error": str(exc)}
        order = next(self.orders)
        try:
            receipt = charge(self.rpc_outbound, order, f"order-{order}", item["cents"], card)
        except UpstreamError as exc:
            # A Java Dubbo client sees a provider's refusal as a RemotingException with its
            # message; the proxy's own error answers (no provider, timeout) say otherwise.
            declined = exc.status == Status.SERVER_ERROR and "declined" in str(exc)
            return (402 if declined else 502), {"error": str(exc)}
        return 200, {"order": order, "product": item, "receipt": receipt}


SERVICES: dict[str, type[Service]] = {
    "frontend": Frontend,
    "catalog": Catalog,
    "reviews": Reviews,
    "ratings": Ratings,
}


def handler_for(name: str, service: Service) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the sidecar pools its connections
        # The head and the body are two writes: with Nagle's algorithm the body waits for
        # the sidecar's delayed ACK of the head, 40 ms on every hop.
        disable_nagle_algorithm = True
        server_version = f"shoal-demo-{name}"

        def do_GET(self) -> None:
            self._answer("GET")

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self._answer("POST")

        def _answer(self, method: str) -> None:
            url = urlsplit(self.path)
            parts = [part for part in url.path.split("/") if part]
            query = {key: values[0] for key, values in parse_qs(url.query).items()}
            trace = {k: v for k, v in self.headers.items() if k.lower() in TRACE_HEADERS}
            status, value = service.answer(method, parts, query, trace)
            body = json.dumps({"service": name, **value}).encode() + b"\n"
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the sidecars count (and can log) every request already."""

    return Handler


def recommendations_for(product: bytes, context: grpc.ServicerContext) -> bytes:
    """The other products, best rated first, up to three."""
    if not product.isdigit() or int(product) not in PRODUCTS:
        context.abort(grpc.StatusCode.NOT_FOUND, f"no product {product[:20]!r}")
    others = sorted((p for p in PRODUCTS if p != int(product)), key=lambda p: -STARS[p])
    return json.dumps([PRODUCTS[p][0] for p in others[:3]]).encode()


def serve_recommendations(port: int) -> None:
    """The gRPC app: a grpcio server until SIGINT or SIGTERM."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    service, _, method = RECOMMEND[1:].partition("/")
    handler = grpc.unary_unary_rpc_method_handler(recommendations_for)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service, {method: handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted([*SERVICES, "recommendations"]))
    parser.add_argument("--port", type=int, required=True, help="where the app listens")
    parser.add_argument("--version", default="v1", help="catalog: v1, or v2 (the canary)")
    parser.add_argument("--outbound", type=int, default=0, help="the sidecar's HTTP outbound")
    parser.add_argument("--rpc-outbound", type=int, default=0, help="the sidecar's RPC outbound")
    args = parser.parse_args()
    if args.name == "recommendations":
        serve_recommendations(args.port)
        return
    service = SERVICES[args.name](args.version, args.outbound, args.rpc_outbound)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler_for(args.name, service))
    server.daemon_threads = True
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
