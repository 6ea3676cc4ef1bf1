"""The registry's REST API, on pilot's HTTP server.

Writes go to the embedded registry; the listing shows ``view()``, the mesh as pilot serves
it (every registry merged), with the embedded registry's ids and TTLs on its instances so
that they can be renewed and removed. Bodies and answers are JSON; a refused input is a
400 that names the field and the reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from shoal.pilot.http import Handler, Reply, Routes, error_reply, json_reply
from shoal.pilot.model import Instance, RegistrySnapshot, ServicePort
from shoal.pilot.registry.embedded import EmbeddedRegistry, Registration, RegistrationError

PREFIX = "/v1/services"
_INSTANCE_FIELDS = frozenset(
    {"address", "port", "service_port", "ports", "labels", "weight", "locality", "ttl", "id"}
)
_PORT_FIELDS = frozenset({"number", "name", "protocol"})

# the resources: each pattern's groups are the (percent-decoded) host and instance id
_SEGMENT = "([^/]+)"
_SERVICES = re.compile(PREFIX)
_SERVICE = re.compile(f"{PREFIX}/{_SEGMENT}")
_INSTANCES = re.compile(f"{PREFIX}/{_SEGMENT}/instances")
_INSTANCE = re.compile(f"{PREFIX}/{_SEGMENT}/instances/{_SEGMENT}")
_HEARTBEAT = re.compile(f"{PREFIX}/{_SEGMENT}/instances/{_SEGMENT}/heartbeat")


class _BadRequestError(Exception):
    """The body is not what the API takes; its message names the field."""


def registry_routes(registry: EmbeddedRegistry, view: Callable[[], RegistrySnapshot]) -> Routes:
    """``/v1/services`` and below for every method: GET lists ``view()``; POST, PUT and
    DELETE change ``registry``."""

    def list_services(parts: tuple[str, ...], body: bytes) -> Reply:
        return json_reply(200, services_json(view(), registry))

    def register(parts: tuple[str, ...], body: bytes) -> Reply:
        (host,) = parts
        try:
            fields = _instance_body(body)
            instance_id = registry.register(host, **fields)
        except (_BadRequestError, RegistrationError) as exc:
            return error_reply(400, str(exc))
        return json_reply(201, {"id": instance_id})

    def heartbeat(parts: tuple[str, ...], body: bytes) -> Reply:
        host, instance_id = parts
        if not registry.heartbeat(host, instance_id):
            return _no_instance(host, instance_id)
        return json_reply(200, {"host": host, "id": instance_id})

    def deregister_instance(parts: tuple[str, ...], body: bytes) -> Reply:
        host, instance_id = parts
        if not registry.deregister(host, instance_id):
            return _no_instance(host, instance_id)
        return json_reply(200, {"host": host, "id": instance_id})

    def deregister_service(parts: tuple[str, ...], body: bytes) -> Reply:
        (host,) = parts
        if not registry.deregister(host):
            return error_reply(404, f"no service {host} in the embedded registry")
        return json_reply(200, {"host": host})

    resources: list[tuple[re.Pattern[str], dict[str, Callable[[tuple[str, ...], bytes], Reply]]]]
    resources = [
        (_SERVICES, {"GET": list_services}),
        (_SERVICE, {"DELETE": deregister_service}),
        (_INSTANCES, {"POST": register}),
        (_INSTANCE, {"DELETE": deregister_instance}),
        (_HEARTBEAT, {"PUT": heartbeat}),
    ]

    async def dispatch(method: str, path: str, query: str, body: bytes) -> Reply:
        for pattern, actions in resources:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            action = actions.get("GET" if method == "HEAD" else method)
            if action is None:
                allowed = ", ".join(sorted(actions))
                return error_reply(405, f"{method} not allowed on {path} (allowed: {allowed})")
            return action(tuple(unquote(part) for part in match.groups()), body)
        return error_reply(404, f"nothing at {path}")

    handler: Handler = dispatch
    return {(method, PREFIX): handler for method in ("GET", "POST", "PUT", "DELETE")}


def _no_instance(host: str, instance_id: str) -> Reply:
    return error_reply(404, f"no instance {instance_id} of {host} in the embedded registry")


def _instance_body(body: bytes) -> dict[str, Any]:
    """The POST body as ``EmbeddedRegistry.register`` keywords. Only the JSON shape is
    checked here; values are checked by the registry, which names the field."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _BadRequestError(f"body: not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise _BadRequestError("body: must be a JSON object")
    unknown = sorted(set(data) - _INSTANCE_FIELDS)
    if unknown:
        raise _BadRequestError(
            f"{unknown[0]}: unknown field (known: {', '.join(sorted(_INSTANCE_FIELDS))})"
        )
    for required in ("address", "port"):
        if required not in data:
            raise _BadRequestError(f"{required}: required")
    fields: dict[str, Any] = {k: v for k, v in data.items() if k != "id" and v is not None}
    if data.get("id") is not None:
        fields["instance_id"] = data["id"]
    if "ports" in fields:
        fields["ports"] = _ports(fields["ports"])
    return fields


def _ports(value: object) -> list[ServicePort]:
    if not isinstance(value, list):
        raise _BadRequestError("ports: must be a list of {number, name, protocol}")
    ports = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or "number" not in item:
            raise _BadRequestError(f"ports[{i}]: must be an object with a number")
        unknown = sorted(set(item) - _PORT_FIELDS)
        if unknown:
            raise _BadRequestError(f"ports[{i}].{unknown[0]}: unknown field")
        protocol = item.get("protocol", "HTTP")
        name = item.get("name", protocol.lower() if isinstance(protocol, str) else "")
        ports.append(ServicePort(item["number"], name, protocol))
    return ports


def services_json(
    snapshot: RegistrySnapshot, embedded: EmbeddedRegistry | None = None
) -> list[dict[str, Any]]:
    """Services by host, each with its instances; with ``embedded``, its instances carry
    ``id``, ``ttl`` and ``expires_in`` (seconds, null when permanent)."""
    registrations = embedded.registrations() if embedded is not None else ()
    by_instance = {r.instance: r for r in registrations}
    now = embedded.now() if embedded is not None else 0.0
    listing: dict[str, dict[str, Any]] = {}
    for service in snapshot.services:
        listing[service.host] = {
            "host": service.host,
            "ports": [
                {"number": p.number, "name": p.name, "protocol": p.protocol} for p in service.ports
            ],
            "resolution": service.resolution,
            "source": service.source,
            "instances": [],
        }
    for instance in snapshot.instances:
        entry = listing.setdefault(
            instance.host,
            {
                "host": instance.host,
                "ports": [],
                "resolution": None,
                "source": None,
                "instances": [],
            },
        )
        entry["instances"].append(_instance_json(instance, by_instance.get(instance), now))
    return sorted(listing.values(), key=lambda entry: str(entry["host"]))


def _instance_json(
    instance: Instance, registration: Registration | None, now: float
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "address": instance.address,
        "port": instance.port,
        "service_port": instance.service_port,
        "labels": dict(instance.labels),
        "weight": instance.weight,
        "locality": instance.locality,
        "healthy": instance.healthy,
        "source": instance.source,
    }
    if registration is not None:
        expires_at = registration.expires_at
        expires_in = None if expires_at is None else round(max(0.0, expires_at - now), 1)
        item.update(id=registration.id, ttl=registration.ttl, expires_in=expires_in)
    return item
