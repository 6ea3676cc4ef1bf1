"""A gRPC server whose one method, ``/shoal.test.Echo/Who``, answers the server's name.

Generic handlers with raw bytes: no generated code is needed on either side.
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures

import grpc

SERVICE, METHOD = "shoal.test.Echo", "Who"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    answer = args.name.encode()

    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        return answer

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.unary_unary_rpc_method_handler(who)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(0)


if __name__ == "__main__":
    main()
