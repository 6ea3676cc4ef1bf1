"""Rate limit descriptors in the YAML format of Envoy's reference rate limit service
(envoyproxy/ratelimit), and the lookup of a request descriptor's limit.

One file holds one domain::

    domain: edge
    descriptors:
      - key: remote_address            # key only: one limit per distinct value
        rate_limit: {unit: second, requests_per_unit: 10}
      - key: path
        value: /login                  # this value only
        rate_limit: {unit: minute, requests_per_unit: 5}
        descriptors:                   # nested: (path=/login, user=*) tuples
          - key: user
            rate_limit: {unit: minute, requests_per_unit: 2}

The lookup is the reference service's: walk the request's entries level by level, trying
``key_value`` (exact), then the wildcard values (``value: abc*``) of that level, then the
bare ``key``; the limit applies only if the config's depth equals the request's (the limit
is on the node matched by the last entry). Values are read as the YAML's text (``value:
010`` is the string ``010``), as the Go service reads them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from shoal.errors import ConfigError

# Window length in seconds per unit (the reference service's: a month is 30 days).
UNIT_SECONDS: dict[str, int] = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "week": 7 * 86400,
    "month": 30 * 86400,
    "year": 365 * 86400,
}

_KEYS = frozenset(
    {
        "domain",
        "key",
        "value",
        "descriptors",
        "rate_limit",
        "unit",
        "requests_per_unit",
        "unlimited",
        "shadow_mode",
        "name",
        "replaces",
        "detailed_metric",
        "value_to_metric",
    }
)
# Keys the reference service knows and Shoal does not implement: rejected by name.
_UNSUPPORTED = frozenset({"quota_mode", "share_threshold", "metadata"})
_TRUE = frozenset({"y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"})
_FALSE = frozenset({"n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"})
_UINT = re.compile(r"\+?[0-9]+")
MAX_UINT32 = 2**32 - 1


@dataclass(frozen=True, slots=True)
class Limit:
    """A configured limit (or one a request brought with it), and its stats key."""

    requests_per_unit: int
    unit: str  # a key of UNIT_SECONDS
    stats_key: tuple[str, ...]  # (domain, "key_value", "key", ...): one stats scope
    unlimited: bool = False
    shadow_mode: bool = False
    name: str = ""
    replaces: tuple[str, ...] = ()
    detailed_metric: bool = False

    @property
    def seconds(self) -> int:
        return UNIT_SECONDS[self.unit]


@dataclass(slots=True)
class _Node:
    """One level of a domain's descriptor tree."""

    children: dict[str, _Node] = field(default_factory=dict)  # by "key_value" or "key"
    wildcards: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    limit: Limit | None = None
    value_to_metric: bool = False


def wildcard_match(parts: tuple[str, ...], text: str) -> bool:
    """``text`` matches the pattern that ``parts`` is split from on ``*`` (each ``*``
    matching any run of characters, possibly empty)."""
    if len(parts) == 1:
        return parts[0] == text
    first, last = parts[0], parts[-1]
    if len(text) < sum(map(len, parts)) or not text.startswith(first):
        return False
    if not text.endswith(last):
        return False
    rest = text[len(first) : len(text) - len(last)]
    for part in parts[1:-1]:
        at = rest.find(part)
        if at < 0:
            return False
        rest = rest[at + len(part) :]
    return True


class RateLimitConfig:
    """All domains, and the lookup of a descriptor's limit."""

    def __init__(self, domains: dict[str, _Node], sources: Sequence[str]) -> None:
        self._domains = domains
        self.sources = tuple(sources)

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(sorted(self._domains))

    def has_domain(self, domain: str) -> bool:
        return domain in self._domains

    def limits(self) -> Iterator[Limit]:
        """Every configured limit (to show their stats at zero from the start)."""
        stack = list(self._domains.values())
        while stack:
            node = stack.pop()
            if node.limit is not None:
                yield node.limit
            stack.extend(node.children.values())

    def limit_for(self, domain: str, entries: Sequence[tuple[str, str]]) -> Limit | None:
        """The limit of the descriptor ``entries`` (``(key, value)`` pairs) in ``domain``,
        or None when none applies (unknown domain, no matching node, depth mismatch)."""
        node = self._domains.get(domain)
        if node is None or not entries:
            return None
        found: Limit | None = None
        detailed: list[str] = [domain]
        metric: list[str] = [domain]
        last = len(entries) - 1
        for i, (key, value) in enumerate(entries):
            exact = f"{key}_{value}"
            detailed.append(exact)
            child = node.children.get(exact)
            wildcard = ""
            if child is None:
                for pattern, parts in node.wildcards:
                    if wildcard_match(parts, exact):
                        child = node.children[pattern]
                        wildcard = pattern
                        break
            if child is not None:
                if wildcard and not child.value_to_metric:
                    metric.append(wildcard)
                else:
                    metric.append(exact)
            else:
                child = node.children.get(key)
                if child is None:
                    return None
                metric.append(exact if child.value_to_metric and value else key)
            if i == last and child.limit is not None:
                found = child.limit
            if not child.children:
                break
            node = child
        if found is None:
            return None
        if found.detailed_metric:
            return replace(found, stats_key=tuple(detailed))
        if tuple(metric) != found.stats_key:  # value_to_metric put runtime values in
            return replace(found, stats_key=tuple(metric))
        return found


# --- loading ---------------------------------------------------------------------------------


def config_files(paths: Sequence[str]) -> list[Path]:
    """The files to load: each path as given, or a directory's ``*.yaml`` / ``*.yml``
    files (not recursive, dotfiles skipped), sorted by name."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p
                for p in path.iterdir()
                if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file()
            )
            if not found:
                raise ConfigError("no .yaml or .yml files in the directory", source=raw)
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise ConfigError("no such file or directory", source=raw)
    return files


def load_config(paths: Sequence[str]) -> RateLimitConfig:
    """Read every file (see :func:`config_files`); ``ConfigError`` names the file and field
    of the first problem. Two files with the same domain are an error."""
    domains: dict[str, _Node] = {}
    sources: list[str] = []
    for path in config_files(paths):
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the file: {exc}", source=source) from exc
        domain, root = parse_domain(text, source)
        if domain in domains:
            raise ConfigError(f"duplicate domain {domain!r}", field="domain", source=source)
        domains[domain] = root
        sources.append(source)
    return RateLimitConfig(domains, sources)


def parse_domain(text: str, source: str = "") -> tuple[str, _Node]:
    """One YAML document: its domain and descriptor tree."""
    try:
        # BaseLoader: every scalar is its text, as the Go service's string fields read it.
        data: Any = yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", source=source) from exc
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping", source=source)
    _check_keys(data, "", source)
    domain = data.get("domain", "")
    if not isinstance(domain, str) or not domain:
        raise ConfigError("the domain must be a non-empty string", field="domain", source=source)
    root = _Node()
    _load_level(root, data.get("descriptors"), (domain,), "descriptors", source)
    return domain, root


def _check_keys(data: dict[str, Any], where: str, source: str) -> None:
    for key in data:
        name = f"{where}.{key}" if where else str(key)
        if key in _UNSUPPORTED:
            raise ConfigError("not supported by shoal ratelimit", field=name, source=source)
        if key not in _KEYS:
            raise ConfigError("unknown key", field=name, source=source)


def _list(value: Any, where: str, source: str) -> list[Any]:
    if value is None or value == "":
        return []
    if not isinstance(value, list):
        raise ConfigError("expected a list", field=where, source=source)
    return value


def _string(value: Any, where: str, source: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError("expected a string", field=where, source=source)
    return value


def _bool(value: Any, where: str, source: str) -> bool:
    if value is None or value == "":
        return False
    if isinstance(value, str):
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
    raise ConfigError(f"expected true or false, not {value!r}", field=where, source=source)


def _load_level(
    node: _Node, descriptors: Any, parent: tuple[str, ...], where: str, source: str
) -> None:
    for i, item in enumerate(_list(descriptors, where, source)):
        here = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError("expected a mapping", field=here, source=source)
        _check_keys(item, here, source)
        key = _string(item.get("key"), f"{here}.key", source)
        if not key:
            raise ConfigError("the descriptor has an empty key", field=f"{here}.key", source=source)
        value = _string(item.get("value"), f"{here}.value", source)
        final = f"{key}_{value}" if value else key
        path = (*parent, final)
        if final in node.children:
            raise ConfigError(
                f"duplicate descriptor {'.'.join(path)!r}", field=f"{here}.key", source=source
            )
        child = _Node(value_to_metric=_bool(item.get("value_to_metric"), here, source))
        shadow = _bool(item.get("shadow_mode"), f"{here}.shadow_mode", source)
        detailed = _bool(item.get("detailed_metric"), f"{here}.detailed_metric", source)
        if item.get("rate_limit") is not None:
            child.limit = _load_limit(
                item["rate_limit"],
                path,
                f"{here}.rate_limit",
                source,
                shadow=shadow,
                detailed=detailed,
            )
        if "*" in final:
            node.wildcards.append((final, tuple(final.split("*"))))
        _load_level(child, item.get("descriptors"), path, f"{here}.descriptors", source)
        node.children[final] = child


def _load_limit(
    data: Any, path: tuple[str, ...], where: str, source: str, *, shadow: bool, detailed: bool
) -> Limit:
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping", field=where, source=source)
    _check_keys(data, where, source)
    unlimited = _bool(data.get("unlimited"), f"{where}.unlimited", source)
    unit = _string(data.get("unit"), f"{where}.unit", source).lower()
    if unlimited:
        if unit in UNIT_SECONDS:
            raise ConfigError(
                "an unlimited rate limit has no unit", field=f"{where}.unit", source=source
            )
        unit = "second"
    elif unit not in UNIT_SECONDS:
        raise ConfigError(
            f"invalid unit {data.get('unit')!r} (expected one of {', '.join(UNIT_SECONDS)})",
            field=f"{where}.unit",
            source=source,
        )
    raw = data.get("requests_per_unit")
    rpu = 0
    if raw is not None and raw != "":
        if not isinstance(raw, str) or not _UINT.fullmatch(raw) or int(raw) > MAX_UINT32:
            raise ConfigError(
                f"expected an integer from 0 to {MAX_UINT32}, not {raw!r}",
                field=f"{where}.requests_per_unit",
                source=source,
            )
        rpu = int(raw)
    name = _string(data.get("name"), f"{where}.name", source)
    replaces: list[str] = []
    for j, entry in enumerate(_list(data.get("replaces"), f"{where}.replaces", source)):
        here = f"{where}.replaces[{j}]"
        if not isinstance(entry, dict):
            raise ConfigError("expected a mapping with a name", field=here, source=source)
        _check_keys(entry, here, source)
        replaced = _string(entry.get("name"), f"{here}.name", source)
        if not replaced:
            raise ConfigError("empty name", field=f"{here}.name", source=source)
        if replaced == name:
            raise ConfigError("a limit cannot replace itself", field=f"{here}.name", source=source)
        replaces.append(replaced)
    return Limit(
        requests_per_unit=rpu,
        unit=unit,
        stats_key=path,
        unlimited=unlimited,
        shadow_mode=shadow,
        name=name,
        replaces=tuple(replaces),
        detailed_metric=detailed,
    )


def describe(config: RateLimitConfig) -> str:
    """One line per configured limit (logged at startup and on reload)."""
    lines = []
    for limit in sorted(config.limits(), key=lambda lim: lim.stats_key):
        what = (
            "unlimited"
            if limit.unlimited
            else f"{limit.requests_per_unit} per {limit.unit}"
            + (" (shadow mode)" if limit.shadow_mode else "")
        )
        lines.append(f"{'.'.join(limit.stats_key)}: {what}")
    return os.linesep.join(lines)
