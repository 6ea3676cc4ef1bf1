"""A proxyless gRPC client: dials ``xds:///TARGET`` with pilot as its xDS server (the
bootstrap comes in GRPC_XDS_BOOTSTRAP_CONFIG) and prints what answered, as JSON.

``--calls N``: make N calls (after ``--warmup`` uncounted ones), print ``{"name": count}``.
``--until NAME``: call until NAME answers (or ``--timeout``), print ``{"seconds": ...}`` or
exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

import grpc


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("--calls", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=0, help="calls made first, not counted")
    parser.add_argument("--until", default="")
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--header", action="append", default=[])
    args = parser.parse_args()
    metadata = [tuple(h.split("=", 1)) for h in args.header]
    with grpc.insecure_channel(f"xds:///{args.target}") as channel:
        who = channel.unary_unary("/shoal.test.Echo/Who")
        if args.calls:
            for _ in range(args.warmup):  # until every connection is up, round robin is uneven
                who(b"", metadata=metadata, timeout=20)
            seen: Counter[str] = Counter()
            for _ in range(args.calls):
                try:
                    seen[who(b"", metadata=metadata, timeout=20).decode()] += 1
                except grpc.RpcError as exc:
                    seen[exc.code().name] += 1
            print(json.dumps(seen))
            return 0
        start = time.monotonic()
        while time.monotonic() - start < args.timeout:
            try:
                if who(b"", metadata=metadata, timeout=5).decode() == args.until:
                    print(json.dumps({"seconds": time.monotonic() - start}))
                    return 0
            except grpc.RpcError:
                time.sleep(0.05)
        return 1


if __name__ == "__main__":
    sys.exit(main())
