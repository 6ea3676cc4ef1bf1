"""``shoal tap SERVICE``: live requests to a service, as every sidecar finishes them, from
pilot's merged tap (``/api/v1/tap``), as ``linkerd viz tap`` shows them."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from shoal.cli.registry import ABSENT, OK, PilotError
from shoal.cli.stat import (
    add_pilot_option,
    duration,
    ms,
    open_api,
    reporting,
    seconds_text,
)

# (header, width, the record's field) of the table, one line per request
COLUMNS = (
    ("PROXY", 20, "proxy"),
    ("DIRECTION", 9, "direction"),
    ("METHOD", 7, "method"),
    ("STATUS", 6, "status"),
    ("LATENCY", 8, "duration_ms"),
    ("AUTHORITY", 24, "authority"),
    ("PATH", 0, "path"),
)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {text!r}")
    return int(text)


def line(record: dict[str, Any]) -> str:
    cells = []
    for _, width, key in COLUMNS:
        value = record.get(key)
        text = ms(value) if key == "duration_ms" else "-" if value is None else str(value)
        cells.append(text.ljust(width))
    return " ".join(cells).rstrip()


def _emit(record: dict[str, Any], output: str) -> None:
    if output == "json":
        print(json.dumps(record), flush=True)
    elif output == "yaml":
        import yaml  # noqa: PLC0415 (per-command import)

        print("---\n" + yaml.safe_dump(record, sort_keys=False), end="", flush=True)
    else:
        print(line(record), flush=True)


def _tap(args: argparse.Namespace) -> int:
    params = {
        "service": args.service,
        "max": args.max,
        "duration": f"{args.duration:g}",
        "method": args.method,
        "path_prefix": args.path,
    }
    # pilot ends the stream by itself after duration (and a few seconds for the proxies)
    seen, dropped = 0, 0
    with open_api(args.pilot, "/api/v1/tap", params, timeout=args.duration + 15) as stream:
        if args.output == "table":
            print(" ".join(name.ljust(width) for name, width, _ in COLUMNS).rstrip(), flush=True)
        try:
            for raw in stream:
                record = json.loads(raw)
                if "dropped" in record:
                    dropped = int(record["dropped"])
                    break
                seen += 1
                _emit(record, args.output)
        except BrokenPipeError:  # `| head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return OK
        except (OSError, ValueError) as exc:
            raise PilotError(ABSENT, f"the tap broke off: {exc}") from None
    if dropped:
        print(
            f"shoal tap: {dropped} request(s) not shown: they came faster than they were read",
            file=sys.stderr,
        )
    if not seen:
        print(
            f"shoal tap: no requests to {args.service} in {seconds_text(args.duration)}",
            file=sys.stderr,
        )
        return ABSENT
    return OK


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "tap",
        help="stream live requests to a service, from every sidecar that sees them",
        description="Stream the requests to SERVICE as the sidecars finish them: method, "
        "path, status, latency, and which proxy saw it in which direction (a call "
        "between two sidecars shows twice: outbound at the caller, inbound at the "
        "service). Ends after --max requests or --duration. Exit status: 0; 1 when no "
        "request was seen (or no proxy could be tapped); 2 for a usage error; 3 when pilot "
        "is unreachable.",
    )
    parser.add_argument("service", metavar="SERVICE", help="the service's host, e.g. reviews")
    parser.add_argument(
        "-n",
        "--max",
        type=_positive,
        default=100,
        metavar="N",
        help="stop after N requests (default 100, at most 10000)",
    )
    parser.add_argument(
        "-d",
        "--duration",
        type=duration,
        default=10.0,
        metavar="DURATION",
        help="stop after this long, e.g. 30s (default 10s, at most 5m)",
    )
    parser.add_argument("--method", help="only requests with this method, e.g. POST")
    parser.add_argument("--path", metavar="PREFIX", help="only paths that start with PREFIX")
    parser.add_argument(
        "-o",
        "--output",
        choices=("table", "json", "yaml"),
        default="table",
        help="table (one line per request), json (one object per line) or yaml",
    )
    add_pilot_option(parser)
    parser.set_defaults(func=reporting("tap", _tap))
