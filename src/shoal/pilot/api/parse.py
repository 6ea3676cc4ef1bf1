"""Istio ``networking.istio.io`` resources, as loaded from YAML or JSON, → :mod:`.model`.

The parser is strict because a rule Shoal half-understood would route traffic differently from
what its author read in Istio's documentation: every field is implemented, or accepted because
it cannot change behaviour here (``metadata.labels``, ``status``, ``location``, a field set to
its default), or rejected with its path. Errors are :class:`~shoal.errors.ConfigError` reading
``<source>: <Kind> <namespace>/<name>: <dotted.field.path>: <reason>``.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, Literal, TypeAlias, TypeVar

from shoal.errors import ConfigError
from shoal.pilot.api.model import (
    BackupRequestPolicy,
    CircuitBreakerPolicy,
    ConnectionPool,
    ConsistentHash,
    Destination,
    DestinationRule,
    FaultAbort,
    FaultDelay,
    HeaderOperations,
    Headers,
    HTTPFaultInjection,
    HTTPMatchRequest,
    HTTPRetry,
    HTTPRewrite,
    HTTPRoute,
    HTTPRouteDestination,
    LoadBalancer,
    Meta,
    OutlierDetection,
    Port,
    RateLimitPolicy,
    RpcRoute,
    ServiceEntry,
    StringMatch,
    Subset,
    TrafficPolicy,
    VirtualService,
    WorkloadEntry,
)
from shoal.pilot.model import RPC_PROTOCOLS, AppProtocol, Labels, labels_of

GROUP: Final = "networking.istio.io"
VERSIONS: Final = ("v1", "v1beta1", "v1alpha3")
SHOAL_GROUP: Final = "shoal.io"
KINDS: Final = ("VirtualService", "DestinationRule", "ServiceEntry", "WorkloadEntry")
NOT_SUPPORTED: Final = "not supported by Shoal"

Resource: TypeAlias = (
    VirtualService
    | DestinationRule
    | ServiceEntry
    | WorkloadEntry
    | CircuitBreakerPolicy
    | RateLimitPolicy
    | BackupRequestPolicy
    | RpcRoute
)
T = TypeVar("T")

# Istio kinds that exist but that Shoal does not implement: "not supported", not "unknown".
_OTHER_ISTIO_KINDS = frozenset(
    {"Gateway", "Sidecar", "EnvoyFilter", "WorkloadGroup", "ProxyConfig"}
)
# Kubernetes bookkeeping that never changes routing.
_OBJECT_META = (
    "labels", "annotations", "uid", "resourceVersion", "generation", "creationTimestamp",
    "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields", "ownerReferences",
    "finalizers", "generateName", "selfLink",
)  # fmt: skip
# x-envoy-retry-on and x-envoy-retry-grpc-on conditions Istio accepts in retryOn.
_RETRY_ON = frozenset({
    "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure",
    "envoy-ratelimited", "retriable-4xx", "refused-stream", "retriable-status-codes",
    "retriable-headers", "http3-post-connect-failure", "cancelled", "deadline-exceeded",
    "internal", "resource-exhausted", "unavailable",
})  # fmt: skip
_SIMPLE_LB: dict[str, Literal["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "PASSTHROUGH", ""]] = {
    "UNSPECIFIED": "",
    "ROUND_ROBIN": "ROUND_ROBIN",
    "LEAST_REQUEST": "LEAST_REQUEST",
    "LEAST_CONN": "LEAST_REQUEST",  # Istio's deprecated alias
    "RANDOM": "RANDOM",
    "PASSTHROUGH": "PASSTHROUGH",
}
_PROTOCOLS: dict[str, AppProtocol] = {
    "HTTP": "HTTP",
    "HTTP2": "HTTP2",
    "GRPC": "GRPC",
    "TCP": "TCP",
    "DUBBO": "DUBBO",
    "BOLT": "BOLT",
    "MOTAN2": "MOTAN2",
}
_RESOLUTIONS: dict[str, Literal["STATIC", "DNS", "NONE"]] = {
    "STATIC": "STATIC",
    "DNS": "DNS",
    "NONE": "NONE",
}
_OTHER_PROTOCOLS = frozenset({"HTTPS", "TLS", "GRPC-WEB", "MONGO", "MYSQL", "REDIS", "UDP"})
_MATCH_KINDS: dict[str, Literal["exact", "prefix", "regex"]] = {
    "exact": "exact",
    "prefix": "prefix",
    "regex": "regex",
}
# What Envoy does for a header or query parameter matched with ``{}``: present, any value.
_PRESENT = StringMatch("regex", ".*")

_INT32_MAX = 2**31 - 1
_UINT32_MAX = 2**32 - 1
_DNS_LABEL = re.compile(r"[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?")
_WILDCARD_LABEL = re.compile(r"\*|(?:\*|\*-)?[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?")
_K8S_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?")
_K8S_SUBDOMAIN = re.compile(
    r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*"
)
_LABEL_NAME = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_HEADER_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_PATH_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_DURATION = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_NANOS = {
    "ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6,
    "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9,
}  # fmt: skip
# RE2 (Envoy's regex engine) has no lookaround and no backreferences; Python's ``re`` has both.
_NOT_RE2 = re.compile(r"\(\?(?:=|!|<=|<!|P=)|(?<!\\)(?:\\\\)*\\[1-9]")


@dataclass(frozen=True, slots=True)
class _At:
    """Where a value sits: ``where`` is the source and resource, ``path`` the dotted field."""

    where: str
    path: str = ""

    def at(self, *parts: str | int) -> _At:
        path = self.path
        for part in parts:
            if isinstance(part, int) or not _PATH_KEY.fullmatch(part):
                path = f"{path}[{part!r}]"
            else:
                path = f"{path}.{part}" if path else part
        return _At(self.where, path)

    def error(self, reason: str) -> ConfigError:
        return ConfigError(reason, field=self.path, source=self.where)


def resource_id(resource: Resource) -> str:
    """``Kind namespace/name``, as messages and duplicate checks name a resource."""
    return f"{type(resource).__name__} {resource.meta.namespace}/{resource.meta.name}"


def parse_resource(document: object, source: str) -> Resource:
    """One resource (a YAML document or a ``List`` item) → its dataclass, or ConfigError.

    ``source`` is ``file.yaml`` or ``file.yaml#2``; it goes into :attr:`Meta.source` and into
    every message, followed by the resource's ``Kind namespace/name`` once they are known.
    """
    if not isinstance(document, Mapping):
        raise ConfigError(f"a resource must be a mapping, not {_describe(document)}", source=source)
    api_version, kind = document.get("apiVersion"), document.get("kind")
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    namespace = metadata.get("namespace") if isinstance(metadata, Mapping) else None
    who = str(kind) if isinstance(kind, str) and kind else "resource"
    if isinstance(name, str):
        who += f" {namespace if isinstance(namespace, str) else 'default'}/{name}"
    at = _At(f"{source}: {who}")
    if not isinstance(api_version, str) or not api_version:
        raise at.at("apiVersion").error("required (a string such as networking.istio.io/v1)")
    if not isinstance(kind, str) or not kind:
        raise at.at("kind").error("required (a string such as VirtualService)")
    group, _, version = api_version.rpartition("/")
    if group == SHOAL_GROUP:
        return _shoal_resource(document, at, kind, version, source)
    if group != GROUP:
        raise at.error(
            f"unsupported kind {kind} ({api_version}); Shoal reads {GROUP} and "
            f"{SHOAL_GROUP}/v1 resources"
        )
    if version not in VERSIONS:
        raise at.at("apiVersion").error(
            f"unsupported version {api_version!r} (use one of {', '.join(VERSIONS)})"
        )
    if kind not in KINDS:
        if kind in _OTHER_ISTIO_KINDS:
            raise at.error(f"{kind} is {NOT_SUPPORTED}")
        raise at.at("kind").error(f"unknown kind {kind!r} (Shoal reads {', '.join(KINDS)})")
    data = _fields(document, at, ("apiVersion", "kind", "metadata", "spec", "status"))
    meta = _meta(_required(data, "metadata", at), at.at("metadata"), source)
    spec = _required(data, "spec", at)
    spec_at = at.at("spec")
    if kind == "VirtualService":
        return _virtual_service(spec, spec_at, meta)
    if kind == "DestinationRule":
        return _destination_rule(spec, spec_at, meta)
    if kind == "ServiceEntry":
        return _service_entry(spec, spec_at, meta)
    return _workload_entry(spec, spec_at, meta)


def _shoal_resource(
    document: Mapping[str, Any], at: _At, kind: str, version: str, source: str
) -> Resource:
    from shoal.pilot.api.policies import KINDS as SHOAL_KINDS  # noqa: PLC0415 (builds on us)
    from shoal.pilot.api.policies import parse_policy  # noqa: PLC0415

    if version != "v1":
        raise at.at("apiVersion").error(f"unsupported version {version!r} (use {SHOAL_GROUP}/v1)")
    if kind not in SHOAL_KINDS:
        raise at.at("kind").error(f"unknown kind {kind!r} (Shoal's own: {', '.join(SHOAL_KINDS)})")
    data = _fields(document, at, ("apiVersion", "kind", "metadata", "spec", "status"))
    meta = _meta(_required(data, "metadata", at), at.at("metadata"), source)
    return parse_policy(kind, _required(data, "spec", at), at.at("spec"), meta)


# --- generic readers -----------------------------------------------------------------------------


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float | str):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _fields(
    value: object,
    at: _At,
    supported: Collection[str],
    unsupported: Collection[str] = (),
    defaults: Mapping[str, object] | None = None,
) -> dict[str, Any]:
    """The mapping at ``at`` without its null fields (Kubernetes treats null as unset).

    A field in ``unsupported`` is an Istio field Shoal does not implement; it is accepted
    only when set to the value in ``defaults`` (setting a default changes nothing).
    """
    if not isinstance(value, Mapping):
        raise at.error(f"must be a mapping, not {_describe(value)}")
    data: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise at.error(f"field names must be strings, not {_describe(key)}")
        if item is None:
            continue
        if key in supported:
            data[key] = item
        elif key in unsupported:
            if defaults is None or key not in defaults or item != defaults[key]:
                raise at.at(key).error(NOT_SUPPORTED)
        else:
            close = difflib.get_close_matches(key, [*supported, *unsupported], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise at.at(key).error(f"unknown field{hint}")
    return data


def _optional(
    data: Mapping[str, Any], key: str, at: _At, read: Callable[[object, _At], T]
) -> T | None:
    return read(data[key], at.at(key)) if key in data else None


def _required(data: Mapping[str, Any], key: str, at: _At) -> Any:
    if key not in data:
        raise at.at(key).error("required")
    return data[key]


def _one_of(data: Mapping[str, Any], keys: Collection[str], at: _At) -> str:
    present = [key for key in keys if key in data]
    if len(present) != 1:
        given = f" (got {', '.join(present)})" if present else ""
        raise at.error(f"exactly one of {', '.join(keys)} is required{given}")
    return present[0]


def _string(value: object, at: _At, *, empty: bool = True) -> str:
    if not isinstance(value, str):
        raise at.error(f"must be a string, not {_describe(value)}")
    if not empty and not value:
        raise at.error("must not be empty")
    return value


def _bool(value: object, at: _At) -> bool:
    if not isinstance(value, bool):
        raise at.error(f"must be true or false, not {_describe(value)}")
    return value


def _integer(value: object, at: _At, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise at.error(f"must be an integer {low}-{high}, not {_describe(value)}")
    return value


def _port(value: object, at: _At) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise at.error(f"must be a port number 1-65535, not {_describe(value)}")
    return value


def _list(value: object, at: _At, *, empty: bool = True) -> list[object]:
    if not isinstance(value, list):
        raise at.error(f"must be a list, not {_describe(value)}")
    if not empty and not value:
        raise at.error("must not be empty")
    return value


def _duration(value: object, at: _At, *, zero: bool = False) -> float:
    """A Go-style duration (``1.5s``, ``100ms``, ``2m``, ``1h30m``) in seconds.

    As in Istio, at least 1ms (unless ``zero``) and whole milliseconds: Envoy's timers tick
    in milliseconds, so a finer value would not mean what it says.
    """
    example = 'a duration such as "1.5s", "100ms" or "2m"'
    if not isinstance(value, str):
        raise at.error(f"must be {example}, not {_describe(value)}")
    if not _DURATION.fullmatch(value):
        raise at.error(f"must be {example}, not {value!r}")
    nanos = sum(Decimal(number) * _NANOS[unit] for number, unit in _DURATION_PART.findall(value))
    if nanos % 10**6:
        raise at.error(f"{value!r}: only whole milliseconds are supported")
    if nanos < 10**6 and not (zero and nanos == 0):
        raise at.error(f"{value!r}: must be at least 1ms")
    return float(nanos / 10**9)


def _percentage(value: object, at: _At) -> float:
    """Istio's ``Percent`` message, ``{value: 12.5}``: 0 or 0.0001-100, as Istio checks."""
    number = _fields(value, at, ("value",)).get("value", 0.0)
    where = at.at("value")
    if isinstance(number, bool) or not isinstance(number, int | float):
        raise where.error(f"must be a number 0-100, not {_describe(number)}")
    if not math.isfinite(number) or not 0 <= number <= 100 or 0 < number < 0.0001:
        raise where.error(f"must be 0 or a number 0.0001-100, not {number}")
    return float(number)


def _string_map(value: object, at: _At) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise at.error(f"must be a mapping of strings, not {_describe(value)}")
    result: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise at.error(f"keys must be strings, not {_describe(key)}")
        result[key] = _string(item, at.at(key))
    return result


def _labels(value: object, at: _At) -> Labels:
    """A Kubernetes label map: ``[prefix/]name`` keys and ≤63-character values."""
    labels = _string_map(value, at)
    for key, item in labels.items():
        prefix, slash, name = key.rpartition("/")
        if (
            not _LABEL_NAME.fullmatch(name)
            or len(name) > 63
            or (slash and (len(prefix) > 253 or not _K8S_SUBDOMAIN.fullmatch(prefix)))
        ):
            raise at.at(key).error(f"invalid label key {key!r}")
        if item and (len(item) > 63 or not _LABEL_NAME.fullmatch(item)):
            raise at.at(key).error(
                f"invalid label value {item!r} (up to 63 letters, digits, '-', '_' or '.', "
                "starting and ending with a letter or digit)"
            )
    return labels_of(labels)


def _check_regex(pattern: str, at: _At) -> None:
    """Compiled with Python's ``re``; Envoy uses RE2, whose syntax is nearly a subset."""
    if not pattern:
        raise at.error("must not be empty")
    if len(pattern) > 1024:
        raise at.error("regex is too long (at most 1024 characters, as in Istio)")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise at.error(f"invalid regex {pattern!r}: {exc}") from None
    if _NOT_RE2.search(pattern):
        raise at.error(
            f"invalid regex {pattern!r}: lookaround and backreferences are not RE2 syntax"
        )


def _dns_label(value: object, at: _At, what: str) -> str:
    text = _string(value, at, empty=False)
    if len(text) > 63 or not _DNS_LABEL.fullmatch(text):
        raise at.error(f"invalid {what} {text!r} (letters, digits and '-', at most 63)")
    return text


def _hostname(value: object, at: _At, *, wildcard: bool, ip: bool = False) -> str:
    """A DNS name (lower-cased), optionally with a wildcard first label, or an IP address."""
    host = _string(value, at, empty=False).lower()
    if ip and _is_ip(host):
        return host
    problem = _hostname_problem(host, wildcard=wildcard)
    if problem:
        raise at.error(f"invalid host {host!r}: {problem}")
    return host


def _hostname_problem(host: str, *, wildcard: bool) -> str:
    """What Istio finds wrong with a host name, or ""."""
    if len(host) > 255:
        return "longer than 255 characters"
    labels = host.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()  # a trailing dot: an absolute name
    for index, label in enumerate(labels):
        pattern = _WILDCARD_LABEL if wildcard and index == 0 else _DNS_LABEL
        if len(label) > 63 or not pattern.fullmatch(label):
            if "*" in label:
                return "a wildcard may only start the first label" if wildcard else "no wildcards"
            return f"label {label!r} is not a DNS label"
    if len(labels) > 1 and labels[-1].isdigit():
        return "the top-level domain cannot be all digits"
    return ""


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# --- metadata ----------------------------------------------------------------------------------


def _meta(value: object, at: _At, source: str) -> Meta:
    data = _fields(value, at, ("name", "namespace", *_OBJECT_META))
    name = _string(_required(data, "name", at), at.at("name"), empty=False)
    if len(name) > 253 or not _K8S_SUBDOMAIN.fullmatch(name):
        raise at.at("name").error(
            f"invalid name {name!r} (lower-case letters, digits, '-' and '.', at most 253)"
        )
    namespace = _string(data.get("namespace", "default"), at.at("namespace"), empty=False)
    if len(namespace) > 63 or not _K8S_LABEL.fullmatch(namespace):
        raise at.at("namespace").error(
            f"invalid namespace {namespace!r} (lower-case letters, digits and '-', at most 63)"
        )
    return Meta(name, namespace, source)


# --- VirtualService ------------------------------------------------------------------------------


def _virtual_service(value: object, at: _At, meta: Meta) -> VirtualService:
    data = _fields(
        value,
        at,
        ("hosts", "http"),
        ("gateways", "tls", "tcp", "exportTo"),
        {"gateways": ["mesh"], "exportTo": ["*"]},
    )
    hosts_at = at.at("hosts")
    hosts: list[str] = []
    for index, item in enumerate(_list(_required(data, "hosts", at), hosts_at, empty=False)):
        host = _hostname(item, hosts_at.at(index), wildcard=True, ip=True)
        if host == "*":
            raise hosts_at.at(index).error(
                "wildcard host * is not allowed for virtual services bound to the mesh"
            )
        for other in hosts:
            if host_matches(other, host) or host_matches(host, other):
                raise hosts_at.at(index).error(f"duplicate host: {host!r} overlaps {other!r}")
        hosts.append(host)
    http_at = at.at("http")
    routes = _list(_required(data, "http", at), http_at, empty=False)
    http = tuple(_http_route(item, http_at.at(index)) for index, item in enumerate(routes))
    return VirtualService(meta, tuple(hosts), http)


def _http_route(value: object, at: _At) -> HTTPRoute:
    data = _fields(
        value,
        at,
        (
            "name", "match", "route", "rewrite", "timeout", "retries", "fault", "mirror",
            "mirrorPercentage", "headers",
        ),
        ("redirect", "directResponse", "delegate", "mirrors", "mirrorPercent", "corsPolicy"),
    )  # fmt: skip
    route = _route_destinations(data, at, headers=True)
    match_at = at.at("match")
    matches = _list(data.get("match", []), match_at)
    headers = _optional(data, "headers", at, _headers)
    rewrite = _optional(data, "rewrite", at, _rewrite)
    if rewrite and rewrite.authority and headers and _sets_host(headers):
        raise at.at("rewrite", "authority").error(
            "the authority is also set by headers.request (set it in one place)"
        )
    if "mirrorPercentage" in data and "mirror" not in data:
        raise at.at("mirrorPercentage").error("needs mirror")
    return HTTPRoute(
        name=_string(data.get("name", ""), at.at("name")),
        match=tuple(_match_request(m, match_at.at(i)) for i, m in enumerate(matches)),
        route=route,
        rewrite=rewrite,
        timeout=_optional(data, "timeout", at, _duration),
        retries=_optional(data, "retries", at, _retries),
        fault=_optional(data, "fault", at, _fault),
        mirror=_optional(data, "mirror", at, _destination),
        mirror_percentage=_optional(data, "mirrorPercentage", at, _percentage),
        headers=headers,
    )


def _match_request(value: object, at: _At) -> HTTPMatchRequest:
    data = _fields(
        value,
        at,
        (
            "name", "uri", "method", "authority", "headers", "withoutHeaders", "queryParams",
            "ignoreUriCase", "port",
        ),
        ("scheme", "sourceLabels", "gateways", "sourceNamespace", "statPrefix"),
    )  # fmt: skip

    def named(key: str, *, headers: bool) -> tuple[tuple[str, StringMatch], ...]:
        if headers:
            where = at.at(key)
            return _named_matches(data.get(key, {}), where, "header", _TOKEN.fullmatch, lower=True)
        return _named_matches(
            data.get(key, {}), at.at(key), "query parameter", bool, kinds=("exact", "regex")
        )

    return HTTPMatchRequest(
        name=_string(data.get("name", ""), at.at("name")),
        uri=_optional(data, "uri", at, _string_match),
        method=_optional(data, "method", at, _string_match),
        authority=_optional(data, "authority", at, _string_match),
        headers=named("headers", headers=True),
        without_headers=named("withoutHeaders", headers=True),
        query_params=named("queryParams", headers=False),
        ignore_uri_case=_bool(data.get("ignoreUriCase", False), at.at("ignoreUriCase")),
        port=_optional(data, "port", at, _port),
    )


def _string_match(
    value: object, at: _At, *, kinds: Collection[str] = ("exact", "prefix", "regex")
) -> StringMatch:
    data = _fields(value, at, kinds, [kind for kind in _MATCH_KINDS if kind not in kinds])
    kind = _one_of(data, kinds, at)
    text = _string(data[kind], at.at(kind))
    if kind == "regex":
        _check_regex(text, at.at(kind))
    return StringMatch(_MATCH_KINDS[kind], text)


def _named_matches(
    value: object,
    at: _At,
    what: str,
    valid: Callable[[str], object],
    *,
    kinds: Collection[str] = ("exact", "prefix", "regex"),
    lower: bool = False,
) -> tuple[tuple[str, StringMatch], ...]:
    """Names that ``valid`` accepts (lower-cased with ``lower``, as header names are) →
    matches. As in Istio, ``{}`` means "present"."""
    if not isinstance(value, Mapping):
        raise at.error(f"must be a mapping of {what} names to matches, not {_describe(value)}")
    result: dict[str, StringMatch] = {}
    for name, match in value.items():
        where = at.at(str(name))
        if not isinstance(name, str) or not valid(name):
            raise where.error(f"invalid {what} name {name!r}")
        key = name.lower() if lower else name
        if key in result:
            raise where.error(f"{what} {key!r} is matched twice")
        if match is None:
            raise where.error("must be a match such as {exact: ...}, not null")
        result[key] = _PRESENT if match == {} else _string_match(match, where, kinds=kinds)
    return tuple(result.items())


def _route_destinations(
    data: Mapping[str, Any], at: _At, *, headers: bool
) -> tuple[HTTPRouteDestination, ...]:
    """A route's ``route`` list: one destination, or several whose weights add up to 100.
    ``headers`` (HTTP only): each destination may change headers."""
    route_at = at.at("route")
    destinations = _list(_required(data, "route", at), route_at, empty=False)
    route = tuple(
        _route_destination(d, route_at.at(i), headers=headers) for i, d in enumerate(destinations)
    )
    if len(route) > 1 and (total := sum(d.weight for d in route)) != 100:
        raise route_at.error(f"weights must add up to 100, not {total}")
    return route


def _route_destination(value: object, at: _At, *, headers: bool) -> HTTPRouteDestination:
    data = _fields(
        value, at, ("destination", "weight", "headers") if headers else ("destination", "weight")
    )
    return HTTPRouteDestination(
        destination=_destination(_required(data, "destination", at), at.at("destination")),
        weight=_integer(data.get("weight", 0), at.at("weight"), 0, 100),
        headers=_optional(data, "headers", at, _headers),
    )


def _destination(value: object, at: _At) -> Destination:
    data = _fields(value, at, ("host", "subset", "port"))
    host = _hostname(_required(data, "host", at), at.at("host"), wildcard=True)
    if host == "*":
        raise at.at("host").error("invalid destination host '*'")
    subset = _dns_label(data["subset"], at.at("subset"), "subset name") if "subset" in data else ""
    port = None
    if "port" in data:
        port_at = at.at("port")
        port = _port(
            _required(_fields(data["port"], port_at, ("number",)), "number", port_at),
            port_at.at("number"),
        )
    return Destination(host, subset, port)


def _headers(value: object, at: _At) -> Headers:
    data = _fields(value, at, ("request", "response"))
    request, response = HeaderOperations(), HeaderOperations()
    if "request" in data:
        request = _header_operations(data["request"], at.at("request"), request=True)
    if "response" in data:
        response = _header_operations(data["response"], at.at("response"), request=False)
    return Headers(request, response)


def _header_operations(value: object, at: _At, *, request: bool) -> HeaderOperations:
    """Names lower-cased. Values are literal in Shoal, so Envoy's ``%VAR%`` substitutions,
    which Istio passes through, are rejected rather than sent as text."""
    data = _fields(value, at, ("set", "add", "remove"))

    def name_ok(name: str, where: _At, *, host_allowed: bool) -> str:
        if not _TOKEN.fullmatch(name):
            raise where.error(f"invalid header name {name!r}")
        if name.lower() == "host" and not host_allowed:
            raise where.error("the Host header cannot be changed here (use request set)")
        return name.lower()

    def values(key: str) -> tuple[tuple[str, str], ...]:
        where = at.at(key)
        result: list[tuple[str, str]] = []
        for raw, text in _string_map(data.get(key, {}), where).items():
            name = name_ok(raw, where.at(raw), host_allowed=request)
            if _BAD_HEADER_VALUE.search(text):
                raise where.at(raw).error("header values cannot contain control characters")
            if "%" in text:
                raise where.at(raw).error(f"Envoy %VARIABLE% substitution is {NOT_SUPPORTED}")
            result.append((name, text))
        return tuple(result)

    remove_at = at.at("remove")
    remove = tuple(
        name_ok(_string(item, remove_at.at(i)), remove_at.at(i), host_allowed=False)
        for i, item in enumerate(_list(data.get("remove", []), remove_at))
    )
    return HeaderOperations(set=values("set"), add=values("add"), remove=remove)


def _sets_host(headers: Headers) -> bool:
    return any(name == "host" for name, _ in (*headers.request.set, *headers.request.add))


def _rewrite(value: object, at: _At) -> HTTPRewrite:
    data = _fields(value, at, ("uri", "authority"), ("uriRegexRewrite",))
    uri = _string(data.get("uri", ""), at.at("uri"))
    authority = _string(data.get("authority", ""), at.at("authority"))
    if not uri and not authority:
        raise at.error("one of uri or authority is required")
    return HTTPRewrite(uri, authority)


def _retries(value: object, at: _At) -> HTTPRetry:
    data = _fields(
        value,
        at,
        ("attempts", "perTryTimeout", "retryOn"),
        ("retryRemoteLocalities", "retryIgnorePreviousHosts", "backoff"),
    )
    attempts = _integer(data.get("attempts", 0), at.at("attempts"), 0, _INT32_MAX)
    if attempts == 0 and ("perTryTimeout" in data or "retryOn" in data):
        raise at.at("attempts").error("retries are disabled (attempts is 0) but configured")
    retry_on = _string(data.get("retryOn", ""), at.at("retryOn"))
    for condition in retry_on.split(",") if retry_on else ():
        if condition not in _RETRY_ON and not (
            condition.isdigit() and 100 <= int(condition) <= 599
        ):
            raise at.at("retryOn").error(f"{condition!r} is not a retry condition or status code")
    per_try = data.get("perTryTimeout")
    return HTTPRetry(
        attempts=attempts,
        per_try_timeout=None if per_try is None else _duration(per_try, at.at("perTryTimeout")),
        retry_on=retry_on,
    )


def _fault(value: object, at: _At) -> HTTPFaultInjection:
    data = _fields(value, at, ("delay", "abort"))
    if not data:
        raise at.error("needs a delay, an abort or both")
    delay = abort = None
    if "delay" in data:
        where = at.at("delay")
        fields = _fields(
            data["delay"], where, ("fixedDelay", "percentage"), ("exponentialDelay", "percent")
        )
        delay = FaultDelay(
            _duration(_required(fields, "fixedDelay", where), where.at("fixedDelay")),
            _fault_percentage(fields, where),
        )
    if "abort" in data:
        where = at.at("abort")
        fields = _fields(
            data["abort"], where, ("httpStatus", "percentage"), ("grpcStatus", "http2Error")
        )
        abort = FaultAbort(
            _integer(_required(fields, "httpStatus", where), where.at("httpStatus"), 200, 599),
            _fault_percentage(fields, where),
        )
    return HTTPFaultInjection(delay, abort)


def _fault_percentage(fields: Mapping[str, Any], at: _At) -> float:
    """Required: without it Istio injects nothing, which is never what a fault is written for."""
    if "percentage" not in fields:
        raise at.at("percentage").error("required (without it Istio injects no fault)")
    return _percentage(fields["percentage"], at.at("percentage"))


# --- DestinationRule -----------------------------------------------------------------------------


def _destination_rule(value: object, at: _At, meta: Meta) -> DestinationRule:
    data = _fields(
        value,
        at,
        ("host", "trafficPolicy", "subsets"),
        ("exportTo", "workloadSelector"),
        {"exportTo": ["*"]},
    )
    host = _hostname(_required(data, "host", at), at.at("host"), wildcard=True)
    subsets_at = at.at("subsets")
    subsets: list[Subset] = []
    for index, item in enumerate(_list(data.get("subsets", []), subsets_at)):
        subset = _subset(item, subsets_at.at(index))
        if any(other.name == subset.name for other in subsets):
            raise subsets_at.at(index, "name").error(f"duplicate subset name {subset.name!r}")
        subsets.append(subset)
    return DestinationRule(meta, host, _traffic_policy_field(data, at), tuple(subsets))


def _subset(value: object, at: _At) -> Subset:
    data = _fields(value, at, ("name", "labels", "trafficPolicy"))
    name = _dns_label(_required(data, "name", at), at.at("name"), "subset name")
    labels = _labels(_required(data, "labels", at), at.at("labels"))
    if not labels:
        raise at.at("labels").error("must not be empty (a subset selects instances by labels)")
    return Subset(name, labels, _traffic_policy_field(data, at))


def _traffic_policy_field(data: Mapping[str, Any], at: _At) -> TrafficPolicy | None:
    if "trafficPolicy" not in data:
        return None
    return _traffic_policy(data["trafficPolicy"], at.at("trafficPolicy"))


def _traffic_policy(value: object, at: _At) -> TrafficPolicy:
    data = _fields(
        value,
        at,
        ("loadBalancer", "connectionPool", "outlierDetection"),
        ("tls", "portLevelSettings", "tunnel", "proxyProtocol", "retryBudget"),
        {"tls": {"mode": "DISABLE"}},
    )
    if not data:
        raise at.error("must set loadBalancer, connectionPool or outlierDetection")
    return TrafficPolicy(
        load_balancer=_optional(data, "loadBalancer", at, _load_balancer),
        connection_pool=_optional(data, "connectionPool", at, _connection_pool),
        outlier_detection=_optional(data, "outlierDetection", at, _outlier_detection),
    )


def _load_balancer(value: object, at: _At) -> LoadBalancer:
    data = _fields(
        value,
        at,
        ("simple", "consistentHash"),
        ("localityLbSetting", "zoneAwareLbSetting", "warmupDurationSecs", "warmup"),
    )
    kind = _one_of(data, ("simple", "consistentHash"), at)
    if kind == "consistentHash":
        return LoadBalancer(consistent_hash=_consistent_hash(data[kind], at.at(kind)))
    simple = _string(data[kind], at.at(kind))
    if simple not in _SIMPLE_LB:
        raise at.at(kind).error(f"unknown policy {simple!r} (use one of {', '.join(_SIMPLE_LB)})")
    return LoadBalancer(simple=_SIMPLE_LB[simple])


def _consistent_hash(value: object, at: _At) -> ConsistentHash:
    keys = ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName")
    data = _fields(value, at, (*keys, "ringHash", "minimumRingSize"), ("maglev",))
    if data.get("useSourceIp") is False:
        del data["useSourceIp"]  # false is the default: no hash key chosen by it
    key = _one_of(data, keys, at)
    if "ringHash" in data and "minimumRingSize" in data:
        raise at.error("set minimumRingSize or ringHash.minimumRingSize, not both")
    ring_size = None
    if "ringHash" in data:
        ring = _fields(data["ringHash"], at.at("ringHash"), ("minimumRingSize",))
        if "minimumRingSize" in ring:
            ring_size = _integer(
                ring["minimumRingSize"], at.at("ringHash", "minimumRingSize"), 1, 8_388_608
            )
    elif "minimumRingSize" in data:
        ring_size = _integer(data["minimumRingSize"], at.at("minimumRingSize"), 1, 8_388_608)
    cookie, ttl = "", None
    if key == "httpCookie":
        where = at.at(key)
        fields = _fields(data[key], where, ("name", "ttl"), ("path", "attributes"))
        cookie = _string(_required(fields, "name", where), where.at("name"), empty=False)
        if "ttl" in fields:
            ttl = _duration(fields["ttl"], where.at("ttl"), zero=True)
    return ConsistentHash(
        http_header_name=(_header_name(data[key], at.at(key)) if key == "httpHeaderName" else ""),
        http_cookie=cookie,
        http_cookie_ttl=ttl,
        use_source_ip=key == "useSourceIp" and _bool(data[key], at.at(key)),
        http_query_parameter_name=(
            _string(data[key], at.at(key), empty=False) if key == "httpQueryParameterName" else ""
        ),
        minimum_ring_size=ring_size,
    )


def _header_name(value: object, at: _At) -> str:
    name = _string(value, at, empty=False)
    if not _TOKEN.fullmatch(name):
        raise at.error(f"invalid header name {name!r}")
    return name.lower()


def _optional_count(data: Mapping[str, Any], key: str, at: _At) -> int | None:
    """Istio's int32 limits: 0, like absence, means Envoy's default."""
    if key not in data:
        return None
    return _integer(data[key], at.at(key), 0, _INT32_MAX) or None


def _connection_pool(value: object, at: _At) -> ConnectionPool:
    data = _fields(value, at, ("tcp", "http"))
    if not data:
        raise at.error("must set tcp, http or both")
    tcp_at, http_at = at.at("tcp"), at.at("http")
    tcp = _fields(
        data.get("tcp", {}),
        tcp_at,
        ("maxConnections", "connectTimeout"),
        ("tcpKeepalive", "maxConnectionDuration", "idleTimeout"),
    )
    http = _fields(
        data.get("http", {}),
        http_at,
        (
            "http1MaxPendingRequests",
            "http2MaxRequests",
            "maxRequestsPerConnection",
            "maxRetries",
            "idleTimeout",
        ),
        ("h2UpgradePolicy", "useClientProtocol", "maxConcurrentStreams", "http2KeepAlive"),
        {"h2UpgradePolicy": "DEFAULT", "useClientProtocol": False},
    )
    return ConnectionPool(
        max_connections=_optional_count(tcp, "maxConnections", tcp_at),
        connect_timeout=_optional(tcp, "connectTimeout", tcp_at, _duration),
        http1_max_pending_requests=_optional_count(http, "http1MaxPendingRequests", http_at),
        http2_max_requests=_optional_count(http, "http2MaxRequests", http_at),
        max_requests_per_connection=_optional_count(http, "maxRequestsPerConnection", http_at),
        max_retries=_optional_count(http, "maxRetries", http_at),
        idle_timeout=_optional(http, "idleTimeout", http_at, _duration),
    )


def _outlier_detection(value: object, at: _At) -> OutlierDetection:
    data = _fields(
        value,
        at,
        (
            "consecutive5xxErrors", "consecutiveGatewayErrors", "interval", "baseEjectionTime",
            "maxEjectionPercent", "minHealthPercent",
        ),
        (
            "consecutiveErrors", "splitExternalLocalOriginErrors",
            "consecutiveLocalOriginFailures", "outlierDetectionHttpErrorCodes",
        ),
        {"splitExternalLocalOriginErrors": False},
    )  # fmt: skip

    def count(key: str, high: int) -> int | None:
        return _integer(data[key], at.at(key), 0, high) if key in data else None

    return OutlierDetection(
        consecutive_5xx_errors=count("consecutive5xxErrors", _UINT32_MAX),
        consecutive_gateway_errors=count("consecutiveGatewayErrors", _UINT32_MAX),
        interval=_optional(data, "interval", at, _duration),
        base_ejection_time=_optional(data, "baseEjectionTime", at, _duration),
        max_ejection_percent=count("maxEjectionPercent", 100) or None,  # Istio: 0 is unset
        min_health_percent=count("minHealthPercent", 100),
    )


# --- ServiceEntry / WorkloadEntry ----------------------------------------------------------------


def _service_entry(value: object, at: _At, meta: Meta) -> ServiceEntry:
    data = _fields(
        value,
        at,
        ("hosts", "ports", "resolution", "endpoints", "workloadSelector", "location"),
        ("addresses", "exportTo", "subjectAltNames"),
        {"exportTo": ["*"]},
    )
    hosts_at = at.at("hosts")
    hosts: list[str] = []  # as written: an RPC service's name keeps its case
    for index, item in enumerate(_list(_required(data, "hosts", at), hosts_at, empty=False)):
        host = _hostname(item, hosts_at.at(index), wildcard=True)
        if host == "*":
            raise hosts_at.at(index).error("invalid host '*'")
        if host in (other.lower() for other in hosts):
            raise hosts_at.at(index).error(f"duplicate host {host!r}")
        hosts.append(str(item))
    ports_at = at.at("ports")
    ports: list[Port] = []
    for index, item in enumerate(_list(_required(data, "ports", at), ports_at, empty=False)):
        port = _service_port(item, ports_at.at(index))
        for other in ports:
            if other.number == port.number:
                raise ports_at.at(index, "number").error(f"port {port.number} is repeated")
            if other.name == port.name:
                raise ports_at.at(index, "name").error(f"port name {port.name!r} is repeated")
        ports.append(port)
    if not any(port.protocol in RPC_PROTOCOLS for port in ports):
        hosts = [host.lower() for host in hosts]
    if "location" in data and data["location"] not in ("MESH_EXTERNAL", "MESH_INTERNAL"):
        raise at.at("location").error("must be MESH_EXTERNAL or MESH_INTERNAL")
    resolution = _resolution(data.get("resolution", "NONE"), at.at("resolution"))
    endpoints_at = at.at("endpoints")
    raw_endpoints = _list(data.get("endpoints", []), endpoints_at)
    selector = None
    if "workloadSelector" in data:
        where = at.at("workloadSelector")
        fields = _fields(data["workloadSelector"], where, ("labels",))
        selector = _labels(fields.get("labels", {}), where.at("labels"))
        if raw_endpoints:
            raise where.error("set endpoints or workloadSelector, not both")
    if raw_endpoints and resolution == "NONE":
        raise endpoints_at.error("resolution NONE takes no endpoints (use STATIC or DNS)")
    port_names = frozenset(port.name for port in ports)
    endpoints = tuple(
        _workload_entry(
            item,
            endpoints_at.at(index),
            meta,
            port_names=port_names,
            ip_only=resolution == "STATIC",
        )
        for index, item in enumerate(raw_endpoints)
    )
    if resolution == "DNS" and not endpoints and selector is None:
        for index, host in enumerate(hosts):
            if host.startswith("*"):
                raise hosts_at.at(index).error(
                    "resolution DNS without endpoints resolves the hosts themselves, "
                    "so they cannot be wildcards"
                )
    if resolution != "NONE" and len(hosts) > 1:
        for index, port in enumerate(ports):
            if port.protocol == "TCP":
                raise ports_at.at(index, "protocol").error(
                    "a TCP port cannot serve several hosts (nothing tells them apart)"
                )
    return ServiceEntry(meta, tuple(hosts), tuple(ports), resolution, endpoints, selector)


def _resolution(value: object, at: _At) -> Literal["STATIC", "DNS", "NONE"]:
    text = _string(value, at)
    if text in _RESOLUTIONS:
        return _RESOLUTIONS[text]
    if text in ("DNS_ROUND_ROBIN", "DYNAMIC_DNS"):
        raise at.error(f"{text} is {NOT_SUPPORTED}")
    raise at.error(f"unknown resolution {text!r} (use STATIC, DNS or NONE)")


def _service_port(value: object, at: _At) -> Port:
    data = _fields(value, at, ("number", "name", "protocol", "targetPort"))
    number = _port(_required(data, "number", at), at.at("number"))
    name = _dns_label(_required(data, "name", at), at.at("name"), "port name")
    protocol = _string(data.get("protocol", "HTTP"), at.at("protocol")).upper()
    if protocol not in _PROTOCOLS:
        if protocol in _OTHER_PROTOCOLS:
            raise at.at("protocol").error(f"protocol {protocol} is {NOT_SUPPORTED}")
        raise at.at("protocol").error(
            f"unknown protocol {protocol!r} (use one of {', '.join(_PROTOCOLS)})"
        )
    target = _optional(data, "targetPort", at, _port)
    return Port(number, name, _PROTOCOLS[protocol], target)


def _workload_entry(
    value: object,
    at: _At,
    meta: Meta,
    *,
    port_names: frozenset[str] | None = None,
    ip_only: bool = False,
) -> WorkloadEntry:
    """A WorkloadEntry spec, or a ServiceEntry endpoint (``port_names`` set): its ``ports``
    must then name the entry's ports, and a STATIC entry needs IP addresses."""
    data = _fields(
        value,
        at,
        ("address", "ports", "labels", "weight", "locality"),
        ("network", "serviceAccount"),
    )
    address = _string(_required(data, "address", at), at.at("address"), empty=False)
    if address.startswith("unix://"):
        raise at.at("address").error(f"unix domain socket endpoints are {NOT_SUPPORTED}")
    if not _is_ip(address):
        if ip_only:
            raise at.at("address").error(f"{address!r} is not an IP address (resolution STATIC)")
        address = _hostname(address, at.at("address"), wildcard=False)
    ports_at = at.at("ports")
    ports: list[tuple[str, int]] = []
    raw_ports = data.get("ports", {})
    if not isinstance(raw_ports, Mapping):
        raise ports_at.error(
            f"must be a mapping of port names to numbers, not {_describe(raw_ports)}"
        )
    for raw, number in raw_ports.items():
        where = ports_at.at(str(raw))
        name = _dns_label(raw, where, "port name")
        if port_names is not None and name not in port_names:
            raise where.error(f"{name!r} is not a port of this ServiceEntry")
        ports.append((name, _port(number, where)))
    locality = _string(data.get("locality", ""), at.at("locality"))
    if locality.count("/") > 2:
        raise at.at("locality").error("must be region/zone/subzone")
    return WorkloadEntry(
        meta=meta,
        address=address,
        ports=tuple(ports),
        labels=_labels(data.get("labels", {}), at.at("labels")),
        weight=_integer(data.get("weight", 0), at.at("weight"), 0, _UINT32_MAX) or 1,
        locality=locality,
    )


def host_matches(pattern: str, host: str) -> bool:
    """Whether ``pattern`` (``*``, ``*.example.com``, ``*-x.example.com``, or a plain name)
    covers ``host``, as Istio matches VirtualService and DestinationRule hosts."""
    if not pattern.startswith("*"):
        return pattern == host
    return pattern == host or (host.endswith(pattern[1:]) and len(host) >= len(pattern))
