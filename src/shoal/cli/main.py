"""The ``shoal`` command: parse arguments, call library code, nothing more."""

from __future__ import annotations

import argparse
import logging
import sys

from shoal import __version__
from shoal.cli.analyze import add_parser as add_analyze_parser
from shoal.cli.check import add_parser as add_check_parser
from shoal.cli.proxy_config import add_parser as add_proxy_config_parser
from shoal.cli.registry import DEFAULT_PILOT
from shoal.cli.registry import add_parsers as add_registry_parsers
from shoal.cli.stat import add_parser as add_stat_parser
from shoal.cli.stat import duration
from shoal.cli.tap import add_parser as add_tap_parser
from shoal.cli.top import add_parser as add_top_parser

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


def _pilot(args: argparse.Namespace) -> int:
    from shoal.pilot.server import Settings, run_pilot  # noqa: PLC0415 (per-command import)

    return run_pilot(
        Settings(
            config_dir=args.config_dir,
            xds_address=args.xds_address,
            http_address=args.http_address,
            registries=tuple(args.registry or ["embedded"]),
            scrape_interval=args.scrape_interval,
            metrics_retention=args.metrics_retention,
            prometheus=args.prometheus or "",
        )
    )


def _bootstrap(args: argparse.Namespace) -> int:
    import yaml  # noqa: PLC0415 (per-command import)

    from shoal.pilot.bootstrap import sidecar_bootstrap  # noqa: PLC0415

    labels = dict(item.split("=", 1) for item in args.label)
    config = sidecar_bootstrap(
        args.node_id or args.service or "sidecar",
        pilot=args.pilot,
        service=args.service,
        labels=labels,
        app_address=args.app_address,
        inbound_address=args.inbound_address,
        outbound_address=args.outbound_address,
        rpc_outbound_address=args.rpc_outbound_address,
        admin=args.admin_address or None,
        delta=args.delta,
    )
    sys.stdout.write(yaml.safe_dump(config, sort_keys=False))
    return 0


def _host_port(text: str) -> tuple[str, int] | None:
    """A HOST:PORT argument; "" means none."""
    from shoal.net import split_address  # noqa: PLC0415 (per-command import)

    try:
        return split_address(text) if text else None
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _label(text: str) -> str:
    if "=" not in text or not text.partition("=")[0]:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


def _add_pilot(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pilot = commands.add_parser(
        "pilot",
        help="run the control plane (xDS v3 for shoal proxies, Envoy and proxyless gRPC)",
        description="Run the control plane: read services from the registries and Istio "
        "rules (VirtualService, DestinationRule, ServiceEntry, WorkloadEntry) from the "
        "watched config dir, and serve them over xDS (ADS, state of the world and delta). "
        "It also gathers the sidecars' Istio metrics (for `shoal stat`, `shoal top` and "
        "the dashboard on --http-address) and merges their taps (`shoal tap`). "
        "See docs/pilot.md. SIGTERM stops.",
    )
    pilot.add_argument("--config-dir", required=True, help="directory of Istio YAML (watched)")
    pilot.add_argument("--xds-address", default="127.0.0.1:15010", help="xDS gRPC HOST:PORT")
    pilot.add_argument(
        "--http-address",
        default="127.0.0.1:15014",
        help="HOST:PORT of the REST and metrics APIs, the dashboard and /ready",
    )
    pilot.add_argument(
        "--registry",
        action="append",
        metavar="SPEC",
        help="embedded[:PATH] (default), etcd://HOST:PORT[/PREFIX], "
        "zookeeper://HOST:PORT[/ROOT]; repeatable",
    )
    pilot.add_argument(
        "--scrape-interval",
        type=duration,
        default=5.0,
        metavar="DURATION",
        help="how often to read every sidecar's metrics (default 5s)",
    )
    pilot.add_argument(
        "--metrics-retention",
        type=duration,
        default=900.0,
        metavar="DURATION",
        help="how much metrics history to keep in memory (default 15m)",
    )
    pilot.add_argument(
        "--prometheus",
        metavar="URL",
        help="answer the metrics API from this Prometheus (which scrapes the sidecars) "
        "instead of scraping them itself",
    )
    pilot.set_defaults(func=_pilot)

    bootstrap = commands.add_parser(
        "bootstrap",
        help="print the bootstrap of a sidecar driven by pilot (for shoal proxy or Envoy)",
        description="Print an Envoy v3 bootstrap whose node metadata tells pilot what the "
        "sidecar fronts; the same file runs `shoal proxy -c` and `envoy -c`.",
    )
    bootstrap.add_argument("--service", default="", help="the local service's host")
    bootstrap.add_argument("--node-id", default="", help="node id (default: the service)")
    bootstrap.add_argument("--app-address", default="", help="HOST:PORT of the local app")
    bootstrap.add_argument(
        "--label", action="append", default=[], type=_label, help="KEY=VALUE (repeatable)"
    )
    bootstrap.add_argument("--inbound-address", default="127.0.0.1:15006")
    bootstrap.add_argument("--outbound-address", default="127.0.0.1:15001")
    bootstrap.add_argument(
        "--rpc-outbound-address",
        default="",
        help="HOST:PORT where the app's Dubbo/Bolt/Motan2 clients connect (shoal proxy only)",
    )
    bootstrap.add_argument(
        "--admin-address",
        default=("127.0.0.1", 15000),
        type=_host_port,
        help="admin HOST:PORT ('' for none)",
    )
    bootstrap.add_argument(
        "--pilot", default=("127.0.0.1", 15010), type=_host_port, help="pilot's xDS HOST:PORT"
    )
    bootstrap.add_argument("--delta", action="store_true", help="use delta xDS (DELTA_GRPC)")
    bootstrap.set_defaults(func=_bootstrap)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoal",
        description="Shoal service mesh: sidecar proxy, control plane and tools.",
        epilog="Commands that talk to pilot find it with --pilot URL, else $SHOAL_PILOT, else "
        f"{DEFAULT_PILOT}. `shoal COMMAND -h` tells more. Exit status: 0 fine, 1 what was "
        "asked for is unhealthy or absent, 2 usage error, 3 pilot unreachable.",
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
    _add_pilot(commands)
    add_analyze_parser(commands)
    add_registry_parsers(commands)
    add_check_parser(commands)
    add_stat_parser(commands)
    add_top_parser(commands)
    add_tap_parser(commands)
    add_proxy_config_parser(commands)
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
