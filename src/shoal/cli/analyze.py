"""``shoal analyze DIR``: validate a config dir as pilot would, before pilot sees it.

Like ``istioctl analyze``, it is meant for CI and for a quick look before ``kubectl apply``:
one line per rejected resource, a summary, and exit status 1 if anything was rejected.
"""

from __future__ import annotations

import argparse


def _analyze(args: argparse.Namespace) -> int:
    from shoal.errors import ConfigError  # noqa: PLC0415 (per-command import)
    from shoal.pilot.api.store import ConfigDir  # noqa: PLC0415 (per-command import)

    directory = args.dir
    try:
        rules = ConfigDir(directory).load()
    except ConfigError as exc:
        print(f"Error: {exc}")
        return 1
    valid = len(rules.resources())
    for error in rules.errors:
        print(f"Error: {error}")
    if rules.errors:
        count = len(rules.errors)
        print(
            f"✘ {count} error{'s' if count > 1 else ''} found when analyzing {directory} "
            f"({valid} valid resource{'' if valid == 1 else 's'})"
        )
        return 1
    print(
        f"✔ No validation issues found when analyzing {directory} "
        f"({valid} resource{'' if valid == 1 else 's'})"
    )
    return 0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    analyze = commands.add_parser(
        "analyze",
        help="validate a directory of Istio traffic rules",
        description="Load every *.yaml, *.yml and *.json file under DIR as pilot does "
        "(VirtualService, DestinationRule, ServiceEntry, WorkloadEntry) and print every "
        "rejected resource with its file, name, field and reason. Exit status 1 if any. "
        "See docs/traffic-rules.md.",
    )
    analyze.add_argument("dir", metavar="DIR", help="the config directory pilot reads")
    analyze.set_defaults(func=_analyze)
