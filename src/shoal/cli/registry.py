"""``shoal register``, ``shoal deregister`` and ``shoal services``: pilot's embedded registry
from the command line, through its REST API.

``add_parsers`` is what ``shoal`` uses; ``main`` runs the same commands on their own
(``python -m shoal.cli.registry services``). Imports that cost memory wait for the command.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

DEFAULT_PILOT = "http://127.0.0.1:15014"
# shoal.pilot.model.AppProtocol, without importing
PROTOCOLS = ("HTTP", "HTTP2", "GRPC", "TCP", "DUBBO", "BOLT", "MOTAN2")
TIMEOUT = 10.0


# the exit statuses of every command that talks to pilot (docs/cli.md)
OK, ABSENT, USAGE, UNREACHABLE = 0, 1, 2, 3


class PilotError(Exception):
    """Pilot could not answer; ``status`` is the exit status, the message the line to show."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _endpoint(value: str) -> tuple[str, int]:
    """``ADDRESS:PORT`` (``[v6]:PORT`` for IPv6) → (address, port)."""
    from shoal.net import split_address  # noqa: PLC0415 (per-command import)

    try:
        return split_address(value, lowest_port=1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ADDRESS:PORT, not {value!r}") from None


def _label(value: str) -> tuple[str, str]:
    key, sep, item = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {value!r}")
    return key, item


def pilot_url(given: str | None) -> str:
    """``--pilot``, else ``$SHOAL_PILOT``, else pilot's default; ``http://`` when no scheme
    is given. Every command that talks to pilot finds it this way."""
    url = (given or os.environ.get("SHOAL_PILOT") or DEFAULT_PILOT).rstrip("/")
    return url if "://" in url else f"http://{url}"


def _call(pilot: str, method: str, path: str, body: object = None) -> Any:
    """One REST call; the decoded JSON answer, or :class:`PilotError` with pilot's reason."""
    import json  # noqa: PLC0415 (per-command import)
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    base = pilot_url(pilot)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base.rstrip("/") + path, data=data, method=method)
    if data is not None:
        request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read())["error"]
        except (ValueError, KeyError, TypeError):
            reason = f"HTTP {exc.code} {exc.reason}"
        raise PilotError(ABSENT, f"pilot refused: {reason}") from exc
    except urllib.error.URLError as exc:
        raise PilotError(UNREACHABLE, f"cannot reach pilot at {base}: {exc.reason}") from exc
    except OSError as exc:
        raise PilotError(UNREACHABLE, f"cannot reach pilot at {base}: {exc}") from exc
    except ValueError as exc:
        raise PilotError(ABSENT, f"{base} answered, but not with JSON: is it pilot?") from exc


def _quote(part: str) -> str:
    from urllib.parse import quote  # noqa: PLC0415 (per-command import)

    return quote(part, safe="")


def _reporting(
    command: str, action: Callable[[argparse.Namespace], None]
) -> Callable[[argparse.Namespace], int]:
    """The command as ``shoal`` runs it: exit 0, or pilot's error as one line and its
    status (1: pilot refused, 3: unreachable)."""

    def run(args: argparse.Namespace) -> int:
        try:
            action(args)
        except PilotError as exc:
            print(f"shoal {command}: {exc}", file=sys.stderr)
            return exc.status
        return 0

    return run


def _register(args: argparse.Namespace) -> None:
    address, port = args.endpoint
    body: dict[str, Any] = {"address": address, "port": port, "ttl": args.ttl}
    if args.service_port is not None:
        body["service_port"] = args.service_port
    if args.protocol is not None:
        number = args.service_port or port
        body["ports"] = [
            {"number": number, "name": args.protocol.lower(), "protocol": args.protocol}
        ]
    for key in ("weight", "locality", "id"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    if args.label:
        body["labels"] = dict(args.label)
    reply = _call(args.pilot, "POST", f"/v1/services/{_quote(args.host)}/instances", body)
    lasts = "permanently" if not args.ttl else f"for {args.ttl:g}s unless renewed"
    print(f"registered {reply['id']} as an instance of {args.host}, {lasts}")


def _deregister(args: argparse.Namespace) -> None:
    path = f"/v1/services/{_quote(args.host)}"
    if args.instance_id is not None:
        path += f"/instances/{_quote(args.instance_id)}"
    _call(args.pilot, "DELETE", path)
    what = args.host if args.instance_id is None else f"{args.instance_id} of {args.host}"
    print(f"deregistered {what}")


def _services(args: argparse.Namespace) -> None:
    services = _call(args.pilot, "GET", "/v1/services")
    if args.output == "json":
        import json  # noqa: PLC0415 (per-command import)

        print(json.dumps(services, indent=2))
    elif args.output == "yaml":
        import yaml  # noqa: PLC0415

        print(yaml.safe_dump(services, sort_keys=False), end="")
    else:
        print(format_services(services))


def format_services(services: list[dict[str, Any]]) -> str:
    """The listing as a table: one line per instance, the service's columns on its first."""
    if not services:
        return "no services"
    header = ("HOST", "PORTS", "SOURCE", "INSTANCES")
    rows: list[tuple[str, str, str, str]] = [header]
    for service in services:
        ports = ", ".join(f"{p['number']}/{p['protocol']}" for p in service["ports"]) or "-"
        first = (service["host"], ports, service["source"] or "-")
        described = [_describe(i, service) for i in service["instances"]] or ["(none)"]
        for n, text in enumerate(described):
            rows.append((*(first if n == 0 else ("", "", "")), text))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return "\n".join(
        "  ".join([*(row[c].ljust(widths[c]) for c in range(3)), row[3]]).rstrip() for row in rows
    )


def _describe(instance: dict[str, Any], service: dict[str, Any]) -> str:
    """``10.0.0.1:9080 version=v1 weight=2 id=web-1 expires in 21s``: what differs from the
    defaults, and the embedded registry's id and TTL when it has them."""
    address = instance["address"]
    endpoint = (
        f"[{address}]:{instance['port']}" if ":" in address else f"{address}:{instance['port']}"
    )
    parts = [endpoint]
    if len(service["ports"]) > 1 or instance["service_port"] != instance["port"]:
        parts.append(f"for port {instance['service_port']}")
    if instance["labels"]:
        parts.append(",".join(f"{k}={v}" for k, v in sorted(instance["labels"].items())))
    if instance["weight"] != 1:
        parts.append(f"weight={instance['weight']}")
    if instance["locality"]:
        parts.append(f"locality={instance['locality']}")
    if not instance["healthy"]:
        parts.append("unhealthy")
    if instance["source"] != service["source"]:
        parts.append(f"source={instance['source']}")
    if instance.get("id", endpoint) != endpoint:
        parts.append(f"id={instance['id']}")
    if "ttl" in instance:
        expires_in = instance["expires_in"]
        parts.append("permanent" if expires_in is None else f"expires in {expires_in:.0f}s")
    return " ".join(parts)


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``register``, ``deregister`` and ``services`` to a ``shoal`` command parser."""

    def pilot_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--pilot",
            default=None,
            metavar="URL",
            help=f"pilot's HTTP address (default $SHOAL_PILOT, else {DEFAULT_PILOT})",
        )

    register = commands.add_parser(
        "register",
        help="register a service instance with pilot's embedded registry",
        description="Register ADDRESS:PORT as an instance of HOST (the service is created "
        "with it). Registering the same instance again updates it. The instance is "
        "permanent unless --ttl is given: a one-shot command cannot send heartbeats.",
    )
    register.add_argument("host", metavar="HOST", help="the service's host name, e.g. reviews")
    register.add_argument("endpoint", metavar="ADDRESS:PORT", type=_endpoint, help="the instance")
    register.add_argument(
        "--service-port",
        type=int,
        metavar="N",
        help="the service port it serves (default: its PORT)",
    )
    register.add_argument(
        "--protocol", choices=PROTOCOLS, help="the service port's protocol (default HTTP)"
    )
    register.add_argument(
        "--label",
        action="append",
        type=_label,
        default=[],
        metavar="KEY=VALUE",
        help="a label (repeatable), e.g. version=v1",
    )
    register.add_argument(
        "--weight", type=int, metavar="N", help="load balancing weight (default 1)"
    )
    register.add_argument("--locality", help="region/zone/subzone")
    register.add_argument(
        "--ttl",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="seconds until it expires unless renewed (default 0: never)",
    )
    register.add_argument("--id", help="instance id (default ADDRESS:PORT)")
    pilot_option(register)
    register.set_defaults(func=_reporting("register", _register))

    deregister = commands.add_parser(
        "deregister",
        help="remove an instance, or a whole service, from pilot's embedded registry",
        description="Remove instance INSTANCE_ID of HOST or, without INSTANCE_ID, the service "
        "HOST with all its instances.",
    )
    deregister.add_argument("host", metavar="HOST")
    deregister.add_argument("instance_id", metavar="INSTANCE_ID", nargs="?")
    pilot_option(deregister)
    deregister.set_defaults(func=_reporting("deregister", _deregister))

    services = commands.add_parser(
        "services",
        help="list the services and instances pilot knows, from every registry",
        description="List the services and instances pilot serves to the mesh, from every "
        "registry, with the labels, weights and TTLs of the instances.",
    )
    services.add_argument(
        "-o", "--output", choices=("table", "json", "yaml"), default="table", help="format"
    )
    pilot_option(services)
    services.set_defaults(func=_reporting("services", _services))


def main(argv: list[str] | None = None) -> int:
    """The three commands without the rest of ``shoal`` (the tests run them this way)."""
    parser = argparse.ArgumentParser(prog="shoal")
    add_parsers(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
