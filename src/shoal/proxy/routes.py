"""Route tables compiled once per config version; matching is dict look-ups and a scan.

Virtual hosts are chosen as Envoy chooses them: exact domain, then the longest suffix
wildcard (``*.example.com``), then the longest prefix wildcard (``example.*``), then ``*``.
Routes are tried in order; the first whose path, headers and query parameters all match
wins. The host → virtual host answer is cached, since a sidecar sees few distinct hosts.
"""

from __future__ import annotations

from shoal.codec.http1 import Headers, header_value
from shoal.config.filters import FilterConfig
from shoal.config.model import (
    HeaderMatcher,
    HeaderMutations,
    HeaderValueOption,
    QueryParameterMatcher,
    RequestMirrorPolicy,
    RetryPolicy,
    Route,
    RouteConfiguration,
    VirtualHost,
)
from shoal.observe.stats import ROUTE_STATS, RouteStats
from shoal.upstream.backup import BackupRequests, build_backup
from shoal.upstream.breaker import build_breaker

_HOST_CACHE_LIMIT = 4096


Level = tuple[frozenset[bytes], tuple[tuple[bytes, bytes, str], ...]]

# Headers the proxy itself sets before route edits run; Envoy's route removals reach them.
PROXY_SET = frozenset(
    {
        b"x-request-id",
        b"x-forwarded-proto",
        b"x-forwarded-for",
        b"x-envoy-external-address",
        b"x-envoy-expected-rq-timeout-ms",
        b"x-envoy-original-path",
        b"x-envoy-original-host",
        b"x-envoy-upstream-service-time",
    }
)


class HeaderPlan:
    """One direction's header edits for a route, compiled once.

    Envoy applies the levels in order — weighted cluster, route, virtual host, route
    configuration — each removing its names and then adding its headers, so with
    overwrite actions the least specific level wins. The edits see the headers the proxy set
    before them (x-request-id, x-forwarded-proto, ...). When every option simply appends,
    no level removes what an earlier one added and nothing removes a proxy-set header (the
    common case), the plan is one removal set for the client's headers and ready-made lines
    (``fast``); otherwise ``apply`` replays the levels on the message's headers.
    """

    __slots__ = ("add", "fast", "levels", "remove", "remove_all")

    def __init__(self, levels: list[tuple[frozenset[str], tuple[HeaderValueOption, ...]]]) -> None:
        self.levels: tuple[Level, ...] = tuple(
            (
                frozenset(name.encode("latin-1") for name in removals),
                tuple(
                    (o.key.encode("latin-1"), o.value.encode("latin-1"), o.action) for o in options
                ),
            )
            for removals, options in levels
        )
        added: set[bytes] = set()
        fast = True
        for removals_bytes, options_bytes in self.levels:
            if removals_bytes & added:
                fast = False
            for key, _, action in options_bytes:
                fast = fast and action == "append_if_exists_or_add"
                added.add(key)
        self.remove_all = frozenset(n for removals_bytes, _ in self.levels for n in removals_bytes)
        self.fast = fast and not self.remove_all & PROXY_SET
        self.remove = frozenset(n for removals_bytes, _ in self.levels for n in removals_bytes)
        self.add = b"".join(
            b"%s: %s\r\n" % (key, value) for _, opts in self.levels for key, value, _ in opts
        )

    def apply(self, headers: Headers) -> Headers:
        """Replay every level on ``headers`` (the slow path, for non-``fast`` plans)."""
        for removals, options in self.levels:
            if removals:
                headers = [h for h in headers if h[0] not in removals]
            for key, value, action in options:
                present = any(name == key for name, _ in headers)
                if action == "append_if_exists_or_add":
                    headers.append((key, value))
                elif action == "add_if_absent":
                    if not present:
                        headers.append((key, value))
                elif action == "overwrite_if_exists_or_add" or present:
                    headers = [h for h in headers if h[0] != key]
                    headers.append((key, value))
        return headers


def _plans(chain: list[HeaderMutations]) -> tuple[HeaderPlan, HeaderPlan]:
    """Request and response plans for levels given most specific first."""
    request = HeaderPlan([(m.request_remove, m.request_add) for m in chain])
    response = HeaderPlan([(m.response_remove, m.response_add) for m in chain])
    return request, response


def split_lines(lines: bytes) -> Headers:
    """Header lines (``name: value\\r\\n``) back into pairs, for the slow path."""
    pairs: Headers = []
    for line in lines.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b": ")
            pairs.append((name, value))
    return pairs


class CompiledRoute:
    """A route with everything the hot path needs precomputed."""

    __slots__ = (
        "backup",
        "breaker",
        "case_sensitive",
        "cluster_plans",
        "headers",
        "hedge",
        "kind",
        "mirrors",
        "per_filter",
        "query",
        "regex",
        "request_plan",
        "response_plan",
        "retry_policy",
        "route",
        "stats",
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
        self.mirrors: tuple[RequestMirrorPolicy, ...] = (
            action.request_mirror_policies if action is not None else ()
        )
        policy = action.retry_policy if action is not None else None
        self.retry_policy: RetryPolicy | None = policy or vhost.retry_policy
        self.hedge = bool(
            action is not None
            and self.retry_policy is not None
            and self.retry_policy.per_try_timeout
            and (action.hedge_on_per_try_timeout or vhost.hedge_on_per_try_timeout)
        )
        timeout = action.timeout if action is not None else 0
        per_try = self.retry_policy.per_try_timeout if self.retry_policy is not None else None
        if per_try and (not timeout or per_try < timeout):
            timeout = per_try  # Envoy announces the per-try timeout when there is one
        self.timeout_header = (
            b"x-envoy-expected-rq-timeout-ms: %d\r\n" % int(timeout * 1000) if timeout else b""
        )
        # the route-level error-rate breaker: one per route per config version
        self.breaker = build_breaker(route.breaker, route.name) if route.breaker else None
        # backup requests: the route's latencies and budget, one per route per config version
        self.backup: BackupRequests | None = (
            build_backup(route.backup, route.name) if route.backup else None
        )
        # Envoy's per-route stats (stat_prefix), shared by every config version's route
        # of the same virtual host and prefix, so counters go on across reloads
        self.stats: RouteStats | None = (
            ROUTE_STATS.get(vhost.name, route.stat_prefix) if route.stat_prefix else None
        )
        # typed_per_filter_config: the route's entry wins over the virtual host's
        self.per_filter: dict[str, FilterConfig] = {
            **dict(vhost.per_filter),
            **dict(route.per_filter),
        }
        levels = [route.headers, vhost.headers, config.headers]
        self.request_plan, self.response_plan = _plans(levels)
        # A weighted cluster's own edits come first, before the route's.
        self.cluster_plans: dict[str, tuple[HeaderPlan, HeaderPlan]] = {
            weighted.name: _plans([weighted.headers, *levels])
            for weighted in (action.weighted_clusters if action is not None else ())
            if weighted.headers
        }

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
            if not matcher.test(header_value(headers, name)):
                return False
        return not self.query or _query_matches(self.query, path)


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
