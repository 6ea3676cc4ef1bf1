"""The ``shoal`` command: parse arguments, call library code, nothing more."""

from __future__ import annotations

import argparse
import logging
import sys

from shoal import __version__

# Each command imports its own code when it runs: a sidecar must not carry the rate limit
# service's gRPC and Redis clients (~18 MB of RSS) just because they share a CLI.


def _proxy(args: argparse.Namespace) -> int:
    from shoal.proxy.server import run_proxy  # noqa: PLC0415 (per-command import)

    return run_proxy(
        args.config, concurrency=args.concurrency, drain_time=args.drain_time_s, watch=args.watch
    )


def _ratelimit(args: argparse.Namespace) -> int:
    from shoal.ratelimit.service import Settings, run_ratelimit  # noqa: PLC0415 (per command)

    return run_ratelimit(
        Settings(
            config=tuple(args.config),
            grpc_address=args.grpc_address,
            http_address=args.http_address,
            redis_url=args.redis_url,
            redis_timeout=args.redis_timeout,
            key_prefix=args.redis_key_prefix,
            shadow_mode=args.shadow_mode,
            on_redis_error=args.on_redis_error,
            grace=args.grace_s,
        )
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

    ratelimit = commands.add_parser(
        "ratelimit",
        help="run the global rate limit service (Envoy's RateLimitService, backed by Redis)",
        description="Run the global rate limit service: gRPC "
        "envoy.service.ratelimit.v3.RateLimitService, with fixed-window counters in Redis so "
        "many proxies share one budget. The config is YAML in the format of Envoy's reference "
        "service; see docs/ratelimit.md. SIGHUP reloads it, SIGTERM stops.",
    )
    ratelimit.add_argument(
        "--config",
        action="append",
        required=True,
        metavar="FILE_OR_DIR",
        help="a domain's YAML file, or a directory of them (repeatable)",
    )
    ratelimit.add_argument(
        "--grpc-address", default="127.0.0.1:8081", help="gRPC listen address (HOST:PORT)"
    )
    ratelimit.add_argument(
        "--http-address",
        default="127.0.0.1:8082",
        help="HTTP address of /stats (Prometheus), /ready and /healthcheck (HOST:PORT)",
    )
    ratelimit.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis URL")
    ratelimit.add_argument(
        "--redis-timeout",
        type=float,
        default=1.0,
        help="seconds to wait for Redis before failing open (default 1)",
    )
    ratelimit.add_argument(
        "--redis-key-prefix", default="", help="prefix of every counter key in Redis"
    )
    ratelimit.add_argument(
        "--on-redis-error",
        choices=["ok", "unavailable"],
        default="ok",
        help="answer OK (fail open, the default) or gRPC UNAVAILABLE when Redis is unreachable",
    )
    ratelimit.add_argument(
        "--shadow-mode",
        action="store_true",
        help="count everything but always answer OK (global shadow mode)",
    )
    ratelimit.add_argument(
        "--grace-s",
        type=float,
        default=5.0,
        help="how long SIGTERM waits for in-flight calls (default 5)",
    )
    ratelimit.set_defaults(func=_ratelimit)
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
