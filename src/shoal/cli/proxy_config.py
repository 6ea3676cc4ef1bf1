"""``shoal proxy-config listeners|routes|clusters|endpoints|bootstrap ADMIN``: what a sidecar
runs, read from its admin API (``/config_dump``, ``/clusters``), as ``istioctl
proxy-config`` shows it. Works the same against a shoal proxy and against Envoy.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

KINDS = ("listeners", "routes", "clusters", "endpoints", "bootstrap")
TIMEOUT = 10.0

Row = dict[str, Any]


class _AdminError(Exception):
    """The admin API could not be read; the message is the one line to show."""


def _get(admin: str, path: str) -> str:
    base = admin if "://" in admin else f"http://{admin}"
    try:
        with urllib.request.urlopen(base.rstrip("/") + path, timeout=TIMEOUT) as response:
            return str(response.read().decode())
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        message = f"cannot read {base}{path}: {reason} (is the proxy's admin there?)"
        raise _AdminError(message) from None


def _dump(admin: str) -> list[dict[str, Any]]:
    configs: list[dict[str, Any]] = json.loads(_get(admin, "/config_dump"))["configs"]
    return configs


def _of(configs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next((c for c in configs if c.get("@type", "").endswith(f".{kind}")), {})


def listeners(admin: str) -> list[Row]:
    dump = _of(_dump(admin), "ListenersConfigDump")
    rows = []
    for origin, items in (
        ("static", [i["listener"] for i in dump.get("static_listeners", [])]),
        ("dynamic", [i["active_state"]["listener"] for i in dump.get("dynamic_listeners", [])]),
    ):
        for listener in items:
            address = listener.get("address", {}).get("socket_address", {})
            where = f"{address.get('address', '')}:{address.get('port_value', '')}"
            rows.append(
                {
                    "name": listener.get("name", ""),
                    "address": where if address else "(api listener)",
                    "origin": origin,
                }
            )
    return rows


def routes(admin: str) -> list[Row]:
    configs = _dump(admin)
    tables = [
        r["route_config"] for r in _of(configs, "RoutesConfigDump").get("dynamic_route_configs", [])
    ]
    for item in _of(configs, "ListenersConfigDump").get("static_listeners", []):
        for chain in item["listener"].get("filter_chains", []):
            for network_filter in chain.get("filters", []):
                inline = network_filter.get("typed_config", {}).get("route_config")
                if inline:
                    tables.append(inline)
    rows = []
    for table in tables:
        for vhost in table.get("virtual_hosts", []):
            for route in vhost.get("routes", []):
                action = route.get("route", {})
                weighted = action.get("weighted_clusters", {}).get("clusters", [])
                target = action.get("cluster") or ", ".join(
                    f"{w['name']} {w.get('weight', 0)}%" for w in weighted
                )
                rows.append(
                    {
                        "table": table.get("name", ""),
                        "domains": ", ".join(vhost.get("domains", [])),
                        "match": _match(route.get("match", {})),
                        "cluster": target or next(iter(route.keys() - {"match", "name"}), ""),
                    }
                )
    return rows


def _match(match: dict[str, Any]) -> str:
    for key in ("prefix", "path"):
        if key in match:
            text = f"{match[key]}*" if key == "prefix" else str(match[key])
            break
    else:
        text = str(match.get("safe_regex", {}).get("regex", ""))
    headers = [h.get("name", "") for h in match.get("headers", [])]
    return text + (f" [{', '.join(headers)}]" if headers else "")


def clusters(admin: str) -> list[Row]:
    dump = _of(_dump(admin), "ClustersConfigDump")
    rows = []
    for origin, items in (
        ("static", dump.get("static_clusters", [])),
        ("dynamic", dump.get("dynamic_active_clusters", [])),
    ):
        for item in items:
            cluster = item["cluster"]
            rows.append(
                {
                    "name": cluster.get("name", ""),
                    "type": cluster.get("type", "STATIC"),
                    "origin": origin,
                }
            )
    return rows


def endpoints(admin: str) -> list[Row]:
    """From ``/clusters``: every host of every cluster, healthy or with its flags."""
    hosts: dict[tuple[str, str], Row] = {}
    for line in _get(admin, "/clusters").splitlines():
        parts = line.split("::")
        if len(parts) != 4 or ":" not in parts[1]:  # cluster-wide lines have no host:port
            continue
        cluster, host, key, value = parts
        row = hosts.setdefault((cluster, host), {"endpoint": host, "cluster": cluster})
        if key == "health_flags":
            row["status"] = "HEALTHY" if value == "healthy" else f"UNHEALTHY ({value})"
        elif key == "weight":
            row["weight"] = int(value)
    return [hosts[key] for key in sorted(hosts)]


def bootstrap(admin: str) -> Any:
    return _of(_dump(admin), "BootstrapConfigDump").get("bootstrap", {})


READERS: dict[str, Callable[[str], Any]] = {
    "listeners": listeners,
    "routes": routes,
    "clusters": clusters,
    "endpoints": endpoints,
    "bootstrap": bootstrap,
}


def table(rows: list[Row]) -> str:
    if not rows:
        return "(none)"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    widths = {c: max(len(c), *(len(str(row.get(c, ""))) for row in rows)) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    lines += [
        "  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns).rstrip() for row in rows
    ]
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    try:
        data = READERS[args.kind](args.admin)
    except _AdminError as exc:
        print(f"shoal proxy-config: {exc}", file=sys.stderr)
        return 1
    if args.output == "json" or (args.kind == "bootstrap" and args.output == "table"):
        print(json.dumps(data, indent=2))
    elif args.output == "yaml":
        import yaml  # noqa: PLC0415 (per-command import)

        print(yaml.safe_dump(data, sort_keys=False), end="")
    else:
        print(table(data))
    return 0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "proxy-config",
        help="show a sidecar's listeners, routes, clusters, endpoints or bootstrap",
        description="Read what a proxy runs from its admin API (shoal proxy or Envoy), as "
        "`istioctl proxy-config` does: static resources and those received over xDS.",
    )
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("admin", metavar="ADMIN", help="the proxy's admin HOST:PORT or URL")
    parser.add_argument(
        "-o", "--output", choices=("table", "json", "yaml"), default="table", help="format"
    )
    parser.set_defaults(func=_run)
