"""Route tables compiled once per config version; matching is dict look-ups and a scan.

Virtual hosts are chosen as Envoy chooses them: exact domain, then the longest suffix
wildcard (``*.example.com``), then the longest prefix wildcard (``example.*``), then ``*``.
Routes are tried in order; the first whose path, headers and query parameters all match
wins. The host → virtual host answer is cached, since a sidecar sees few distinct hosts.
"""

from __future__ import annotations

from shoal.codec.http1 import Headers
from shoal.config.model import (
    HeaderMatcher,
    HeaderMutations,
    HeaderValueOption,
    QueryParameterMatcher,
    RetryPolicy,
    Route,
    RouteConfiguration,
    VirtualHost,
)

_HOST_CACHE_LIMIT = 4096


def header_value(headers: Headers, name: bytes) -> str | None:
    """All values of a header joined with "," (as Envoy presents repeated headers)."""
    found: list[bytes] = []
    for key, value in headers:
        if key == name:
            found.append(value)
    if not found:
        return None
    return (found[0] if len(found) == 1 else b",".join(found)).decode("latin-1")


def _line(option: HeaderValueOption) -> bytes:
    return b"%s: %s\r\n" % (option.key.encode("latin-1"), option.value.encode("latin-1"))


class HeaderPlan:
    """One direction's header edits for a route, merged over route, virtual host and
    route configuration (Envoy's order) and pre-encoded.

    ``remove`` also holds the names that an overwrite replaces; ``add`` are ready-made
    header lines; ``conditional`` are the options that depend on whether the header is
    already there (add_if_absent, overwrite_if_exists), checked per message.
    """

    __slots__ = ("add", "conditional", "remove")

    def __init__(self, options: list[HeaderValueOption], removals: set[str]) -> None:
        remove = set(removals)
        add: list[bytes] = []
        conditional: list[HeaderValueOption] = []
        for option in options:
            if option.action == "overwrite_if_exists_or_add":
                remove.add(option.key)
                add.append(_line(option))
            elif option.action == "append_if_exists_or_add":
                add.append(_line(option))
            else:
                conditional.append(option)
        self.remove = frozenset(name.encode("latin-1") for name in remove)
        self.add = b"".join(add)
        self.conditional = tuple(conditional)

    def conditional_lines(self, headers: Headers) -> tuple[frozenset[bytes], bytes]:
        """Extra names to drop and lines to add for the conditional options."""
        present = {name for name, _ in headers}
        drop: set[bytes] = set()
        lines: list[bytes] = []
        for option in self.conditional:
            key = option.key.encode("latin-1")
            if option.action == "add_if_absent" and key not in present:
                lines.append(_line(option))
            elif option.action == "overwrite_if_exists" and key in present:
                drop.add(key)
                lines.append(_line(option))
        return frozenset(drop), b"".join(lines)


def _plans(chain: list[HeaderMutations]) -> tuple[HeaderPlan, HeaderPlan]:
    request = [o for m in chain for o in m.request_add]
    response = [o for m in chain for o in m.response_add]
    request_remove = {name for m in chain for name in m.request_remove}
    response_remove = {name for m in chain for name in m.response_remove}
    return HeaderPlan(request, request_remove), HeaderPlan(response, response_remove)


class CompiledRoute:
    """A route with everything the hot path needs precomputed."""

    __slots__ = (
        "case_sensitive",
        "headers",
        "kind",
        "query",
        "regex",
        "request_plan",
        "response_plan",
        "retry_policy",
        "route",
        "timeout_header",
        "value",
        "vhost",
    )

    def __init__(self, route: Route, vhost: VirtualHost, config: RouteConfiguration) -> None:
        match = route.match
        self.route = route
        self.vhost = vhost
        self.kind = match.kind
        self.case_sensitive = match.case_sensitive
        self.value = match.value if match.case_sensitive else match.value.lower()
        self.regex = match.regex
        self.headers: tuple[tuple[bytes, HeaderMatcher], ...] = tuple(
            (h.name.encode("latin-1"), h) for h in match.headers
        )
        self.query: tuple[QueryParameterMatcher, ...] = match.query_parameters
        action = route.action
        policy = action.retry_policy if action is not None else None
        self.retry_policy: RetryPolicy | None = policy or vhost.retry_policy
        timeout = action.timeout if action is not None else 0
        per_try = self.retry_policy.per_try_timeout if self.retry_policy is not None else None
        if per_try and (not timeout or per_try < timeout):
            timeout = per_try  # Envoy announces the per-try timeout when there is one
        self.timeout_header = (
            b"x-envoy-expected-rq-timeout-ms: %d\r\n" % int(timeout * 1000) if timeout else b""
        )
        # Least specific first: route config, virtual host, route (Envoy's append order).
        self.request_plan, self.response_plan = _plans(
            [config.headers, vhost.headers, route.headers]
        )

    def matches(self, path: str, headers: Headers) -> bool:
        kind = self.kind
        if kind == "prefix":
            candidate = path if self.case_sensitive else path.lower()
            if not candidate.startswith(self.value):
                return False
        else:
            bare = path.partition("?")[0]
            if kind == "path":
                if (bare if self.case_sensitive else bare.lower()) != self.value:
                    return False
            else:
                assert self.regex is not None
                if self.regex.fullmatch(bare) is None:
                    return False
        for name, matcher in self.headers:
            if not _header_matches(matcher, header_value(headers, name)):
                return False
        return not self.query or _query_matches(self.query, path)


def _header_matches(matcher: HeaderMatcher, value: str | None) -> bool:
    if matcher.match.kind == "present":
        result = (value is not None) == matcher.present
    elif value is None:
        return False  # as Envoy: a missing header fails a value match, inverted or not
    else:
        result = matcher.match.matches(value)
    return result != matcher.invert


def _query_matches(matchers: tuple[QueryParameterMatcher, ...], path: str) -> bool:
    _, _, query = path.partition("?")
    params: dict[str, str] = {}
    for part in query.split("&"):  # not percent-decoded, as Envoy matches the raw query
        if part:
            key, _, value = part.partition("=")
            params.setdefault(key, value)
    for matcher in matchers:
        found = params.get(matcher.name)
        if found is None or not matcher.match.matches(found):
            return False
    return True


class CompiledVirtualHost:
    __slots__ = ("routes", "vhost")

    def __init__(self, vhost: VirtualHost, config: RouteConfiguration) -> None:
        self.vhost = vhost
        self.routes = tuple(CompiledRoute(r, vhost, config) for r in vhost.routes)

    def route(self, path: str, headers: Headers) -> CompiledRoute | None:
        for compiled in self.routes:
            if compiled.matches(path, headers):
                return compiled
        return None


class RouteTable:
    __slots__ = ("_cache", "_default", "_exact", "_prefixes", "_suffixes", "config")

    def __init__(self, config: RouteConfiguration) -> None:
        self.config = config
        self._exact: dict[str, CompiledVirtualHost] = {}
        suffixes: list[tuple[str, CompiledVirtualHost]] = []
        prefixes: list[tuple[str, CompiledVirtualHost]] = []
        self._default: CompiledVirtualHost | None = None
        for vhost in config.virtual_hosts:
            compiled = CompiledVirtualHost(vhost, config)
            for domain in vhost.domains:
                if domain == "*":
                    self._default = compiled
                elif domain.startswith("*"):
                    suffixes.append((domain[1:], compiled))
                elif domain.endswith("*"):
                    prefixes.append((domain[:-1], compiled))
                else:
                    self._exact[domain] = compiled
        # Longest wildcard wins; stable sort keeps config order among equals.
        self._suffixes = sorted(suffixes, key=lambda item: -len(item[0]))
        self._prefixes = sorted(prefixes, key=lambda item: -len(item[0]))
        self._cache: dict[str, CompiledVirtualHost | None] = {}

    def virtual_host(self, host: str) -> CompiledVirtualHost | None:
        try:
            return self._cache[host]
        except KeyError:
            pass
        found = self._find(host.lower())
        if len(self._cache) >= _HOST_CACHE_LIMIT:
            self._cache.clear()
        self._cache[host] = found
        return found

    def _find(self, host: str) -> CompiledVirtualHost | None:
        found = self._exact.get(host)
        if found is not None:
            return found
        for suffix, compiled in self._suffixes:
            if host.endswith(suffix) and len(host) > len(suffix):
                return compiled
        for prefix, compiled in self._prefixes:
            if host.startswith(prefix) and len(host) > len(prefix):
                return compiled
        return self._default

    def match(self, host: str, path: str, headers: Headers) -> CompiledRoute | None:
        vhost = self.virtual_host(host)
        return vhost.route(path, headers) if vhost is not None else None
