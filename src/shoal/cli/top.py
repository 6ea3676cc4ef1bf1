"""``shoal top``: the busiest calls in the mesh (caller → service), refreshed live, from
pilot's edges (``/api/v1/edges``), as ``linkerd viz top`` shows the busiest paths."""

from __future__ import annotations

import argparse
import time
from typing import Any

from shoal.cli.registry import OK, PilotError, pilot_url
from shoal.cli.stat import (
    add_pilot_option,
    duration,
    get_json,
    ms,
    percent,
    print_data,
    reporting,
    rps,
    seconds_text,
)


def busiest(graph: dict[str, Any]) -> list[dict[str, Any]]:
    """The edges, busiest first (then by name, so equal rates do not jump around)."""
    edges: list[dict[str, Any]] = graph["edges"]
    return sorted(edges, key=lambda e: (-e["rps"], e["source"], e["destination"]))


def _frame(args: argparse.Namespace, edges: list[dict[str, Any]], problem: str = "") -> Any:
    from rich.table import Table  # noqa: PLC0415 (per-command import)

    clock = time.strftime("%H:%M:%S")
    title = f"shoal top · {pilot_url(args.pilot)} · last {seconds_text(args.window)} · {clock}"
    table = Table(title=title, title_justify="left", box=None, header_style="bold")
    for name in ("SOURCE", "", "DESTINATION"):
        table.add_column(name)
    for name in ("RPS", "SUCCESS", "LATENCY_P99"):
        table.add_column(name, justify="right")
    for edge in edges[: args.limit]:
        table.add_row(
            edge["source"],
            "→",
            edge["destination"],
            rps(edge["rps"]),
            percent(edge["success_rate"]),
            ms(edge["p99_ms"]),
        )
    if problem:
        table.caption = problem
    elif not edges:
        table.caption = f"no traffic in the last {seconds_text(args.window)}"
    return table


def _top(args: argparse.Namespace) -> int:
    from rich.console import Console  # noqa: PLC0415 (per-command import)
    from rich.live import Live  # noqa: PLC0415

    params = {"window": f"{args.window:g}s"}
    edges = busiest(get_json(args.pilot, "/api/v1/edges", params))  # unreachable: exit 3
    if args.output != "table":
        print_data(edges[: args.limit], args.output)
        return OK
    console = Console()
    if args.once or not console.is_terminal:
        console.print(_frame(args, edges))
        return OK
    try:
        with Live(_frame(args, edges), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                try:
                    edges = busiest(get_json(args.pilot, "/api/v1/edges", params))
                    live.update(_frame(args, edges), refresh=True)
                except PilotError as exc:  # keep the last numbers, say why they are old
                    live.update(_frame(args, edges, f"{exc} (retrying)"), refresh=True)
    except KeyboardInterrupt:
        return OK


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "top",
        help="show the busiest calls (caller → service), refreshed live",
        description="Show the calls between workloads and services, busiest first, with "
        "their requests per second, success rate and p99 latency over the last --window, "
        "refreshed every --interval until Ctrl-C. Callers outside the mesh show as "
        "'unknown'. With --once, -o json|yaml, or when the output is not a terminal, one "
        "view is printed and the command exits. Exit status: 0; 2 for a usage error; 3 "
        "when pilot is unreachable.",
    )
    parser.add_argument(
        "-w",
        "--window",
        type=duration,
        default=10.0,
        metavar="DURATION",
        help="rates over this recent window (default 10s)",
    )
    parser.add_argument(
        "-i",
        "--interval",
        type=duration,
        default=1.0,
        metavar="DURATION",
        help="refresh every DURATION (default 1s)",
    )
    parser.add_argument("--once", action="store_true", help="print one view and exit")
    parser.add_argument(
        "-n", "--limit", type=int, default=50, metavar="N", help="show the N busiest (default 50)"
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=("table", "json", "yaml"),
        default="table",
        help="format; json and yaml print one view",
    )
    add_pilot_option(parser)
    parser.set_defaults(func=reporting("top", _top))
