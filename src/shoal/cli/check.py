"""``shoal check``: is the mesh healthy? Pilot ready, rules valid, every proxy in sync and
nothing refused, every service with endpoints; each problem with what to do about it."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any

from shoal.cli.registry import ABSENT, DEFAULT_PILOT, OK, UNREACHABLE, pilot_url

REACHABLE = "pilot is reachable"


def _fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, str(response.read().decode())
    except urllib.error.HTTPError as exc:
        return exc.code, str(exc.read().decode())


def checks(pilot: str) -> list[dict[str, Any]]:
    """Each check: ``name``, ``ok`` and, when it failed, ``problem`` and ``fix``."""
    try:
        status, _ = _fetch(f"{pilot}/ready")
        mesh = json.loads(_fetch(f"{pilot}/debug/mesh")[1]) if status == 200 else {}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return [
            {
                "name": REACHABLE,
                "ok": False,
                "problem": f"{pilot}: {getattr(exc, 'reason', exc)}",
                "fix": "start it (`shoal pilot --config-dir DIR`) or pass --pilot URL",
            }
        ]
    results: list[dict[str, Any]] = [
        {
            "name": "pilot is ready",
            "ok": status == 200,
            **({} if status == 200 else {"problem": f"/ready answered {status}", "fix": "wait"}),
        }
    ]
    if status != 200:
        return results
    errors = mesh.get("rule_errors", [])
    results.append(
        {
            "name": "traffic rules are valid",
            "ok": not errors,
            **(
                {
                    "problem": "\n".join(errors),
                    "fix": "fix the files named (`shoal analyze DIR` checks them); until then "
                    "they keep their last valid resources",
                }
                if errors
                else {}
            ),
        }
    )
    streams = mesh.get("streams", [])
    behind = [s for s in streams if not s["in_sync"] and not s["rejected"]]
    refused = [s for s in streams if s["rejected"]]
    results.append(
        {
            "name": f"{len(streams)} xDS stream(s) in sync",
            "ok": not behind,
            **(
                {
                    "problem": "not yet in sync: " + ", ".join(s["node"] for s in behind),
                    "fix": "run the check again in a moment; a proxy that stays behind is "
                    "busy or cut off from pilot",
                }
                if behind
                else {}
            ),
        }
    )
    results.append(
        {
            "name": "no proxy refused its config",
            "ok": not refused,
            **(
                {
                    "problem": "\n".join(
                        f"{s['node']} refused {kind}: {why}"
                        for s in refused
                        for kind, why in s["rejected"].items()
                    ),
                    "fix": "the proxy keeps its last good config; change the rule it refuses "
                    "(`shoal proxy-config` shows what it runs)",
                }
                if refused
                else {}
            ),
        }
    )
    empty = [s["host"] for s in mesh.get("services", []) if not s.get("instances")]
    results.append(
        {
            "name": "every service has endpoints",
            "ok": not empty,
            **(
                {
                    "problem": "no endpoints: " + ", ".join(sorted(empty)),
                    "fix": "register instances (`shoal register HOST ADDRESS:PORT`) or start "
                    "their sidecars; calls to these services get 503",
                }
                if empty
                else {}
            ),
        }
    )
    return results


def _run(args: argparse.Namespace) -> int:
    results = checks(pilot_url(args.pilot))
    if args.output == "json":
        print(json.dumps(results, indent=2))
    elif args.output == "yaml":
        import yaml  # noqa: PLC0415 (per-command import)

        print(yaml.safe_dump(results, sort_keys=False), end="")
    else:
        for result in results:
            print(f"{'✔' if result['ok'] else '✘'} {result['name']}")
            if not result["ok"]:
                for line in result["problem"].splitlines():
                    print(f"    {line}")
                print(f"    fix: {result['fix']}")
    failed = [r for r in results if not r["ok"]]
    if failed and args.output != "json":
        print(f"{len(failed)} problem(s) found", file=sys.stderr)
    if failed and failed[0]["name"] == REACHABLE:
        return UNREACHABLE
    return ABSENT if failed else OK


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "check",
        help="check that pilot and the proxies are healthy and in sync",
        description="Check the mesh through pilot: ready, rules valid, every proxy's xDS "
        "stream in sync and nothing refused, every service with endpoints. Exit status 1 "
        "when something is wrong; each problem comes with what to do.",
    )
    parser.add_argument(
        "--pilot", help=f"pilot's HTTP address (default $SHOAL_PILOT, else {DEFAULT_PILOT})"
    )
    parser.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    parser.set_defaults(func=_run)
