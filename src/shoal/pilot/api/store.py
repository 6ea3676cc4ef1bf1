"""The config directory: Istio YAML and JSON files → one validated :class:`RuleSet`.

Errors are per resource: a bad resource is left out and reported in ``RuleSet.errors``, and
every valid resource is still in the RuleSet. :meth:`ConfigDir.watch` polls rather than using
inotify so that it works on every filesystem, including ConfigMap volumes, whose files change
by an atomic symlink swap.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any

import yaml

from shoal.errors import ConfigError
from shoal.pilot.api.model import (
    BackupRequestPolicy,
    CircuitBreakerPolicy,
    Destination,
    DestinationRule,
    RateLimitPolicy,
    RpcRoute,
    RuleSet,
    ServiceEntry,
    VirtualService,
    WorkloadEntry,
)
from shoal.pilot.api.parse import Resource, host_matches, parse_resource, resource_id

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
# A file as the poller sees it: path, inode, device, mtime, ctime and size. The inode changes
# when an editor or kubectl replaces the file by renaming a new one over it.
_Stat = tuple[str, int, int, int, int, int]
Signature = tuple[_Stat, ...]


class ConfigDir:
    """A directory of Istio resources, read whole on every change."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._loaded: Signature | None = None
        self._last: RuleSet | None = None

    def load(self) -> RuleSet:
        """Read every ``*.yaml``, ``*.yml`` and ``*.json`` file below the directory (hidden
        files and directories skipped). Raises ConfigError only if the directory is missing."""
        signature = self._signature()  # taken first: a write during the read is seen next poll
        resources: list[Resource] = []
        errors: list[str] = []
        failed: set[str] = set()
        for file in _config_files(self.path):
            for result in _parse_file(self.path / file):
                if isinstance(result, ConfigError):
                    errors.append(str(result))
                    failed.add((self.path / file).as_posix())
                else:
                    resources.append(result)
        ruleset = _ruleset(resources, errors, failed)
        self._loaded, self._last = signature, ruleset
        return ruleset

    async def watch(self, changed: Callable[[RuleSet], None], interval: float = 0.5) -> None:
        """Poll every ``interval`` seconds until cancelled; call ``changed`` with the new
        RuleSet when the resources or the errors differ from the last load.

        A change is loaded once the directory looks the same on two polls in a row, so a file
        still being written is usually read whole. If the directory disappears the last
        RuleSet stays in force (as a registry keeps its view when its backend is away).
        """
        previous: Signature | None = None
        failure = ""
        while True:
            news: RuleSet | None = None
            try:
                signature: Signature | None = await asyncio.to_thread(self._signature)
                if signature != self._loaded and signature == previous:
                    last = self._last
                    news = await asyncio.to_thread(self.load)
                    if last is not None and news == last and news.errors == last.errors:
                        news = None
                failure = ""
            except (ConfigError, OSError) as exc:
                signature = None
                if str(exc) != failure:
                    failure = str(exc)
                    log.warning("config dir %s: %s; keeping the last rules", self.path, exc)
            if news is not None:
                try:
                    changed(news)
                except Exception:
                    # A failing consumer must not stop later changes from being delivered.
                    log.exception("config dir %s: handling the new rules failed", self.path)
            previous = signature
            await asyncio.sleep(interval)

    def _signature(self) -> Signature:
        if not self.path.is_dir():
            raise ConfigError("not a directory", source=self.path.as_posix())
        stats: list[_Stat] = []
        for file in _config_files(self.path):
            try:
                st = os.stat(self.path / file)
            except OSError:
                continue  # removed since the listing, a dangling symlink: load() reports it
            stats.append((file, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
        return tuple(stats)


def _config_files(root: Path) -> list[str]:
    """Paths relative to ``root``, sorted, so that "the later one" of two duplicates and the
    order of errors do not depend on the filesystem."""
    found: list[str] = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        for name in names:
            if not name.startswith(".") and name.endswith(SUFFIXES):
                found.append((Path(directory) / name).relative_to(root).as_posix())
    return sorted(found)


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects repeated keys: PyYAML keeps the last one silently, so a
    second ``route:`` in a rule would drop the first without a word."""


def _mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Hashable] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, Hashable):
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The JSON counterpart of :class:`_Loader`: a repeated key is an error."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _parse_file(path: Path) -> Iterator[Resource | ConfigError]:
    """Each resource of a file, or the error that rejects it (or the whole file)."""
    try:
        documents = _documents(path)
    except ConfigError as exc:
        yield exc
        return
    for source, document in documents:
        try:
            items = _items(source, document)
        except ConfigError as exc:
            yield exc
            continue
        for item_source, item in items:
            try:
                yield parse_resource(item, item_source)
            except ConfigError as exc:
                yield exc


def _documents(path: Path) -> list[tuple[str, object]]:
    """A file's non-empty documents, each with its source: the path, or ``path#N`` (N
    counting from 0) when the file holds several."""
    display = path.as_posix()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", source=display) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text: {exc.reason}", source=display) from None
    if path.suffix == ".json":
        try:
            documents: list[object] = [json.loads(text, object_pairs_hook=_unique_keys)]
        except json.JSONDecodeError as exc:
            reason = f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            raise ConfigError(reason, source=display) from None
        except ValueError as exc:
            raise ConfigError(f"invalid JSON: {exc}", source=display) from None
    else:
        try:
            documents = list(yaml.load_all(text, Loader=_Loader))
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"invalid YAML{where}: {exc.problem}", source=display) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid YAML: {exc}", source=display) from None
    present = [index for index, document in enumerate(documents) if document is not None]
    if len(present) == 1:
        return [(display, documents[present[0]])]
    return [(f"{display}#{index}", documents[index]) for index in present]


def _items(source: str, document: object) -> list[tuple[str, object]]:
    """A Kubernetes ``List`` (what ``kubectl get -o yaml`` prints) → its items, each with its
    own source (``file.yaml#items[3]``); any other document → itself."""
    if not (isinstance(document, dict) and document.get("kind") == "List"):
        return [(source, document)]
    for key in document:
        if key not in ("apiVersion", "kind", "items", "metadata"):
            raise ConfigError("unknown field", field=str(key), source=f"{source}: List")
    items = document.get("items") or []
    if not isinstance(items, list):
        raise ConfigError("must be a list", field="items", source=f"{source}: List")
    separator = "." if "#" in source else "#"
    return [(f"{source}{separator}items[{index}]", item) for index, item in enumerate(items)]


def _ruleset(resources: list[Resource], errors: list[str], failed: set[str]) -> RuleSet:
    """Drop the later of two resources with the same ``Kind namespace/name`` and every
    VirtualService or RpcRoute that routes to a subset no DestinationRule defines; group by
    kind."""
    first: dict[str, Resource] = {}
    for resource in resources:
        key = resource_id(resource)
        if key in first:
            errors.append(
                f"{resource.meta.source}: {key}: already defined in {first[key].meta.source}"
            )
            failed.add(source_file(resource))
        else:
            first[key] = resource
    unique = list(first.values())
    rules = [r for r in unique if isinstance(r, DestinationRule)]
    routing: list[VirtualService | RpcRoute] = []
    for resource in (r for r in unique if isinstance(r, VirtualService | RpcRoute)):
        problem = _missing_subset(resource, rules)
        if problem:
            errors.append(problem)
            failed.add(source_file(resource))
        else:
            routing.append(resource)
    return RuleSet(
        virtual_services=tuple(r for r in routing if isinstance(r, VirtualService)),
        destination_rules=tuple(rules),
        service_entries=tuple(r for r in unique if isinstance(r, ServiceEntry)),
        workload_entries=tuple(r for r in unique if isinstance(r, WorkloadEntry)),
        circuit_breakers=tuple(r for r in unique if isinstance(r, CircuitBreakerPolicy)),
        rate_limits=tuple(r for r in unique if isinstance(r, RateLimitPolicy)),
        backup_requests=tuple(r for r in unique if isinstance(r, BackupRequestPolicy)),
        rpc_routes=tuple(r for r in routing if isinstance(r, RpcRoute)),
        errors=tuple(errors),
        failed_files=frozenset(failed),
    )


def source_file(resource: Resource) -> str:
    """The file a resource came from (its source without the ``#N`` document index)."""
    return resource.meta.source.split("#", 1)[0]


def qualified_host(host: str, namespace: str) -> str:
    """Istio's reading of a short name: ``reviews`` in namespace ``default`` is
    ``reviews.default.svc.cluster.local``; a name with a dot is already qualified."""
    return host if "." in host or host == "*" else f"{host}.{namespace}.svc.cluster.local"


def routed_destinations(resource: VirtualService | RpcRoute) -> Iterator[tuple[str, Destination]]:
    """Where a resource sends traffic, each with its field path."""
    if isinstance(resource, VirtualService):
        for index, http in enumerate(resource.http):
            for n, d in enumerate(http.route):
                yield f"spec.http[{index}].route[{n}].destination", d.destination
            if http.mirror:
                yield f"spec.http[{index}].mirror", http.mirror
        return
    for index, rpc in enumerate(resource.routes):
        for n, d in enumerate(rpc.route):
            yield f"spec.routes[{index}].route[{n}].destination", d.destination
        fallback = rpc.circuit_breaker.fallback if rpc.circuit_breaker else None
        if fallback:
            yield f"spec.routes[{index}].circuitBreaker.fallback.destination", fallback


def _missing_subset(resource: VirtualService | RpcRoute, rules: list[DestinationRule]) -> str:
    """Why ``resource`` must be rejected for a subset no DestinationRule defines, or ""."""
    for path, destination in routed_destinations(resource):
        if not destination.subset:
            continue
        host = qualified_host(destination.host, resource.meta.namespace)
        applying = _rules_for(host, rules)
        if any(s.name == destination.subset for r in applying for s in r.subsets):
            continue
        if applying:
            names = ", ".join(resource_id(r) for r in applying)
            reason = f"subset {destination.subset!r} is not defined by {names}"
        else:
            reason = f"subset {destination.subset!r}: no DestinationRule for host {host}"
        where = f"{resource.meta.source}: {resource_id(resource)}"
        return str(ConfigError(reason, field=f"{path}.subset", source=where))
    return ""


def _rules_for(host: str, rules: list[DestinationRule]) -> list[DestinationRule]:
    """The DestinationRules Istio applies to ``host``: those with the most specific host that
    covers it (an exact host beats the longest wildcard)."""
    ranked = [
        ((qualified == host, len(qualified)), rule)
        for rule in rules
        if host_matches(qualified := qualified_host(rule.host, rule.meta.namespace), host)
    ]
    if not ranked:
        return []
    best = max(rank for rank, _ in ranked)
    return [rule for rank, rule in ranked if rank == best]
