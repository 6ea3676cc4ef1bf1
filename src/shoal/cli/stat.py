"""``shoal stat``: each service's golden metrics (success rate, requests per second, latency
percentiles) over a recent window, from pilot's metrics API, as ``linkerd viz stat``
shows them, or each route's (``--routes``). Also how ``stat``, ``top`` and ``tap`` talk
to pilot and what their exit statuses mean.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from shoal.cli.registry import (
    ABSENT,
    DEFAULT_PILOT,
    OK,
    UNREACHABLE,
    USAGE,
    PilotError,
    pilot_url,
)

TIMEOUT = 10.0


def duration(text: str) -> float:
    """An argparse type: ``10s``, ``1m``, ``500ms``... in seconds."""
    from shoal.pilot.telemetry import parse_duration  # noqa: PLC0415 (per-command import)

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def seconds_text(seconds: float) -> str:
    from shoal.pilot.telemetry import format_duration  # noqa: PLC0415 (per-command import)

    return format_duration(seconds)


def open_api(pilot: str, path: str, params: dict[str, Any], timeout: float = TIMEOUT) -> Any:
    """``GET`` pilot's API; the open response, or :class:`PilotError`: unreachable (3), a
    request pilot refuses (2), anything else it cannot answer (1), with its reason."""
    base = pilot_url(pilot)
    url = f"{base}{path}?{urlencode({k: v for k, v in params.items() if v is not None})}"
    try:
        return urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read())["error"]
        except (ValueError, KeyError, TypeError):
            reason = f"HTTP {exc.code} {exc.reason}"
        if exc.code == 404 and path.startswith("/api/"):
            reason = f"{base} has no {path}: is it a shoal pilot of this version?"
        raise PilotError(USAGE if exc.code == 400 else ABSENT, reason) from None
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", exc)
        if isinstance(why, OSError) and why.strerror:
            why = why.strerror  # "Connection refused", without the errno
        raise PilotError(
            UNREACHABLE,
            f"cannot reach pilot at {base}: {why} (start it with `shoal pilot`, or point to "
            "it with --pilot URL or $SHOAL_PILOT)",
        ) from None


def get_json(pilot: str, path: str, params: dict[str, Any]) -> Any:
    with open_api(pilot, path, params) as response:
        try:
            return json.loads(response.read())
        except ValueError:
            raise PilotError(ABSENT, f"{pilot_url(pilot)} answered, but not with JSON") from None


def reporting(
    command: str, action: Callable[[argparse.Namespace], int]
) -> Callable[[argparse.Namespace], int]:
    """The command as ``shoal`` runs it: pilot's errors as one line and their status."""

    def run(args: argparse.Namespace) -> int:
        try:
            return action(args)
        except PilotError as exc:
            print(f"shoal {command}: {exc}", file=sys.stderr)
            return exc.status

    return run


def add_pilot_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pilot",
        metavar="URL",
        help=f"pilot's HTTP address (default $SHOAL_PILOT, else {DEFAULT_PILOT})",
    )


def print_data(data: Any, output: str) -> None:
    if output == "json":
        print(json.dumps(data, indent=2))
    else:
        import yaml  # noqa: PLC0415 (per-command import)

        print(yaml.safe_dump(data, sort_keys=False), end="")


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def rps(value: float) -> str:
    return f"{value:.2f}rps" if value < 1 else f"{value:.1f}rps"


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}ms" if value < 10 else f"{value:.0f}ms"


def columns(rows: list[list[str]], right: set[int]) -> str:
    """Rows as aligned columns, two spaces apart; columns in ``right`` right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in rows
    )


def stat_table(services: list[dict[str, Any]]) -> str:
    header = ["SERVICE", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99"]
    rows = [
        [
            s["service"],
            percent(s["success_rate"]),
            rps(s["rps"]),
            ms(s["p50_ms"]),
            ms(s["p95_ms"]),
            ms(s["p99_ms"]),
        ]
        for s in services
    ]
    return columns([header, *rows], right={1, 2, 3, 4, 5})


def route_table(routes: list[dict[str, Any]]) -> str:
    header = ["SERVICE", "ROUTE", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99"]
    rows = [
        [
            r["service"],
            r["route"],
            percent(r["success_rate"]),
            rps(r["rps"]),
            ms(r["p50_ms"]),
            ms(r["p95_ms"]),
            ms(r["p99_ms"]),
        ]
        for r in routes
    ]
    return columns([header, *rows], right={2, 3, 4, 5, 6})


def _stat(args: argparse.Namespace) -> int:
    by_route = args.routes
    params = {"window": f"{args.window:g}s", "service": args.service}
    if by_route:
        params["by"] = "route"
    answer = get_json(args.pilot, "/api/v1/stat", params)
    rows: list[dict[str, Any]] = answer["routes" if by_route else "services"]
    window = seconds_text(args.window)
    if args.service is not None and not rows:
        if by_route:
            why = (
                f"no per-route metrics for {args.service} in the last {window}: no caller's "
                "sidecar has sent a request to it on a route with a stat_prefix (pilot gives "
                "every route it makes one; `shoal stat` shows the service's own numbers)"
            )
        else:
            why = (
                f"no metrics for {args.service} in the last {window}: no sidecar with Istio "
                "metrics has seen a request to it (`shoal stat` lists what was seen; "
                "`shoal tap` shows live requests)"
            )
        raise PilotError(ABSENT, why)
    if args.output != "table":
        print_data(rows, args.output)
    elif rows:
        print(route_table(rows) if by_route else stat_table(rows))
    else:
        what = "on routes " if by_route else ""
        print(f"No traffic {what}in the last {window}.", file=sys.stderr)
    return OK


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "stat",
        help="show each service's success rate, requests per second and latency",
        description="Show each service's golden metrics over a recent window, from pilot's "
        "metrics (Istio's standard metrics scraped from the sidecars, or Prometheus with "
        "`shoal pilot --prometheus`): success rate (responses that are not 5xx), requests "
        "per second, latency p50/p95/p99. A service's numbers come from its own sidecars, "
        "else from its callers'. With --routes, one row per route instead (Envoy's per-route "
        "stats, from the callers' sidecars). Exit status: 0; 1 when SERVICE has no metrics; "
        "2 for a usage error (pilot's too: a window longer than it keeps); 3 when pilot is "
        "unreachable.",
    )
    parser.add_argument("service", nargs="?", metavar="SERVICE", help="only this service (host)")
    parser.add_argument(
        "-w",
        "--window",
        type=duration,
        default=60.0,
        metavar="DURATION",
        help="how far back to look, e.g. 30s, 5m (default 1m)",
    )
    parser.add_argument(
        "-r",
        "--routes",
        action="store_true",
        help="one row per route (VirtualService http route) of each service, as its callers saw it",
    )
    parser.add_argument(
        "-o", "--output", choices=("table", "json", "yaml"), default="table", help="format"
    )
    add_pilot_option(parser)
    parser.set_defaults(func=reporting("stat", _stat))
