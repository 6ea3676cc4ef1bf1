"""The ``shoal`` command: parse arguments, call library code, nothing more."""

from __future__ import annotations

import argparse
import logging
import sys

from shoal import __version__
from shoal.proxy.server import run_proxy


def _proxy(args: argparse.Namespace) -> int:
    return run_proxy(
        args.config, concurrency=args.concurrency, drain_time=args.drain_time_s, watch=args.watch
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoal", description="Shoal service mesh: sidecar proxy, control plane and tools."
    )
    parser.add_argument("--version", action="version", version=f"shoal {__version__}")
    parser.add_argument(
        "-l",
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error", "critical"],
        help="log level (default: info)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    proxy = commands.add_parser(
        "proxy",
        help="run the sidecar proxy from an Envoy v3 bootstrap",
        description="Run the sidecar proxy. The config is an Envoy v3 bootstrap (YAML or "
        "JSON); see docs/config.md for the supported subset. SIGHUP reloads it, SIGTERM "
        "drains and exits.",
    )
    proxy.add_argument("-c", "--config", required=True, help="bootstrap file (YAML or JSON)")
    proxy.add_argument(
        "--concurrency", type=int, default=1, help="worker processes sharing the listeners"
    )
    proxy.add_argument("--watch", action="store_true", help="reload when the config file changes")
    proxy.add_argument(
        "--drain-time-s",
        type=float,
        default=10.0,
        help="how long SIGTERM waits for in-flight requests (default 10)",
    )
    proxy.set_defaults(func=_proxy)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="[%(asctime)s][%(process)d][%(levelname)s][%(name)s] %(message)s",
        stream=sys.stderr,
    )
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
