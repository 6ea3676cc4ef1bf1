"""Envoy RouteConfiguration → :class:`shoal.config.model.RouteConfiguration`.

Internal to :mod:`shoal.config.envoy`. Regexes are compiled and header names lower-cased
here, once per config version.
"""

from __future__ import annotations

import re

from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from google.protobuf.message import Message

from shoal.config.envoy_backup import route_backup_policy
from shoal.config.envoy_breaker import route_breaker_policy
from shoal.config.envoy_fields import (
    Ctx,
    choice,
    cluster_ref,
    compile_regex,
    data_source,
    duration,
    flag,
    required,
    seconds,
    timeout,
    total_weight,
    typed_config,
    uint,
)
from shoal.config.envoy_filters import per_filter_configs
from shoal.config.envoy_headers import PRESENT, header_matcher, headers_to_add, string_match
from shoal.config.model import (
    DirectResponse,
    HashPolicy,
    HeaderMutations,
    QueryParameterMatcher,
    Redirect,
    RequestMirrorPolicy,
    RetryPolicy,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
)

# x-envoy-retry-on and x-envoy-retry-grpc-on conditions
_RETRY_ON = frozenset({
    "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure",
    "envoy-ratelimited", "retriable-4xx", "refused-stream", "retriable-status-codes",
    "retriable-headers", "http3-post-connect-failure", "cancelled", "deadline-exceeded",
    "internal", "resource-exhausted", "unavailable",
})  # fmt: skip
_DENOMINATORS = {0: 100, 1: 10_000, 2: 1_000_000}  # FractionalPercent.DenominatorType
# what a generated cookie's name and path may hold: they are written into Set-Cookie
_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_COOKIE_PATH = re.compile(r"[\x21-\x3a\x3c-\x7e]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_REDIRECT_CODES = {
    route_components_pb2.RedirectAction.MOVED_PERMANENTLY: 301,
    route_components_pb2.RedirectAction.FOUND: 302,
    route_components_pb2.RedirectAction.SEE_OTHER: 303,
    route_components_pb2.RedirectAction.TEMPORARY_REDIRECT: 307,
    route_components_pb2.RedirectAction.PERMANENT_REDIRECT: 308,
}


def build_route_configuration(config: Message, ctx: Ctx) -> RouteConfiguration:
    hosts_ctx = ctx.at("virtual_hosts")
    hosts = tuple(_virtual_host(v, hosts_ctx.at(i)) for i, v in enumerate(config.virtual_hosts))
    owner: dict[str, str] = {}
    for index, host in enumerate(hosts):
        for domain in host.domains:
            if domain in owner:
                raise hosts_ctx.at(index, "domains").error(
                    f"domain {domain!r} is already used by virtual host {owner[domain]!r}"
                )
            owner[domain] = host.name
    return RouteConfiguration(
        name=str(config.name), virtual_hosts=hosts, headers=_header_mutations(config, ctx)
    )


def _virtual_host(host: Message, ctx: Ctx) -> VirtualHost:
    if not host.domains:
        raise ctx.at("domains").error("at least one domain is required")
    routes_ctx = ctx.at("routes")
    return VirtualHost(
        name=required(str(host.name), ctx.at("name"), "name"),
        domains=tuple(str(d).lower() for d in host.domains),
        routes=tuple(_route(r, routes_ctx.at(i)) for i, r in enumerate(host.routes)),
        headers=_header_mutations(host, ctx),
        retry_policy=_retry_policy(host, ctx),
        hedge_on_per_try_timeout=bool(host.hedge_policy.hedge_on_per_try_timeout),
        per_filter=per_filter_configs(host, ctx),
    )


def _route(route: Message, ctx: Ctx) -> Route:
    if not route.HasField("match"):
        raise ctx.at("match").error("match is required")
    kind = route.WhichOneof("action")
    if kind is None:
        raise ctx.error("one of route, redirect or direct_response is required")
    here = ctx.at(kind)
    return Route(
        match=_route_match(route.match, ctx.at("match")),
        name=str(route.name),
        action=_route_action(route.route, here) if kind == "route" else None,
        direct_response=_direct_response(route.direct_response, here)
        if kind == "direct_response"
        else None,
        redirect=_redirect(route.redirect, here) if kind == "redirect" else None,
        headers=_header_mutations(route, ctx),
        per_filter=per_filter_configs(route, ctx),
        breaker=route_breaker_policy(route, ctx),
        backup=route_backup_policy(route, ctx),
        stat_prefix=_stat_prefix(str(route.stat_prefix), ctx.at("stat_prefix")),
    )


def _stat_prefix(prefix: str, ctx: Ctx) -> str:
    """A route's stat prefix, the ``<stat_prefix>`` of ``vhost.<vhost>.route.<stat_prefix>.``.
    Envoy takes any string; one with an empty dot-separated part (``.a``, ``a..b``, ``a.``)
    or a control character would make stat names that cannot be read back, so it is an
    error here."""
    if not prefix:
        return ""
    if _CONTROL.search(prefix):
        raise ctx.error(f"{prefix!r} has a control character")
    if "" in prefix.split("."):
        raise ctx.error(f"{prefix!r} has an empty part between dots")
    return prefix


def _route_match(match: Message, ctx: Ctx) -> RouteMatch:
    kind = match.WhichOneof("path_specifier")
    if kind is None:
        raise ctx.error("one of prefix, path or safe_regex is required")
    regex = compile_regex(match.safe_regex, ctx.at(kind)) if kind == "safe_regex" else None
    return RouteMatch(
        kind="regex" if regex else kind,
        value=regex.pattern if regex else str(getattr(match, kind)),
        regex=regex,
        case_sensitive=flag(match, "case_sensitive", True),
        headers=tuple(header_matcher(h, ctx.at("headers", i)) for i, h in enumerate(match.headers)),
        query_parameters=tuple(
            _query_parameter_matcher(q, ctx.at("query_parameters", i))
            for i, q in enumerate(match.query_parameters)
        ),
    )


def _query_parameter_matcher(matcher: Message, ctx: Ctx) -> QueryParameterMatcher:
    """Only a presence test or a string match; ``present_match: false`` (must be absent) is
    not supported."""
    name = required(str(matcher.name), ctx.at("name"), "name")
    if matcher.HasField("string_match"):
        return QueryParameterMatcher(
            name, string_match(matcher.string_match, ctx.at("string_match"))
        )
    if matcher.HasField("present_match") and not matcher.present_match:
        raise ctx.at("present_match").error("present_match: false is not supported")
    return QueryParameterMatcher(name, PRESENT)


def _route_action(action: Message, ctx: Ctx) -> RouteAction:
    kind = action.WhichOneof("cluster_specifier")
    weighted: tuple[WeightedCluster, ...] = ()
    total = 0
    if kind == "cluster":
        cluster_ref(str(action.cluster), ctx.at("cluster"))
    elif kind == "weighted_clusters":
        weighted, total = _weighted_clusters(action.weighted_clusters, ctx.at(kind))
    else:
        raise ctx.error("one of cluster or weighted_clusters is required")
    if action.prefix_rewrite and action.HasField("regex_rewrite"):
        raise ctx.at("regex_rewrite").error("prefix_rewrite and regex_rewrite are exclusive")
    rewrite = action.regex_rewrite
    max_stream = action.max_stream_duration
    return RouteAction(
        cluster=str(action.cluster),
        weighted_clusters=weighted,
        total_weight=total,
        prefix_rewrite=str(action.prefix_rewrite) or None,
        regex_rewrite=(
            (
                compile_regex(rewrite.pattern, ctx.at("regex_rewrite", "pattern")),
                str(rewrite.substitution),
            )
            if action.HasField("regex_rewrite")
            else None
        ),
        host_rewrite_literal=str(action.host_rewrite_literal) or None,
        auto_host_rewrite=flag(action, "auto_host_rewrite", False),
        timeout=seconds(action, "timeout", 15.0, ctx),
        # None inherits the connection manager's value; 0 disables it for this route.
        idle_timeout=duration(action, "idle_timeout", ctx),
        max_stream_duration=duration(
            max_stream, "max_stream_duration", ctx.at("max_stream_duration")
        ),
        retry_policy=_retry_policy(action, ctx),
        hedge_on_per_try_timeout=bool(action.hedge_policy.hedge_on_per_try_timeout),
        hash_policy=tuple(
            _hash_policy(p, ctx.at("hash_policy", i)) for i, p in enumerate(action.hash_policy)
        ),
        request_mirror_policies=tuple(
            _mirror_policy(p, ctx.at("request_mirror_policies", i))
            for i, p in enumerate(action.request_mirror_policies)
        ),
    )


def _mirror_policy(policy: Message, ctx: Ctx) -> RequestMirrorPolicy:
    """The mirror cluster is checked like a route's; ``runtime_fraction`` (default 100%) is
    its ``default_value``, as shoal has no runtime to look ``runtime_key`` up in."""
    cluster = cluster_ref(str(policy.cluster), ctx.at("cluster"))
    if not policy.HasField("runtime_fraction"):
        return RequestMirrorPolicy(cluster)
    here = ctx.at("runtime_fraction", "default_value")
    if not policy.runtime_fraction.HasField("default_value"):
        raise here.error("default_value is required")
    percent = policy.runtime_fraction.default_value
    denominator = _DENOMINATORS.get(int(percent.denominator))
    if denominator is None:
        raise here.at("denominator").error("unknown denominator")
    # Envoy caps a numerator above the denominator at 100%
    return RequestMirrorPolicy(cluster, min(1.0, int(percent.numerator) / denominator))


def _weighted_clusters(config: Message, ctx: Ctx) -> tuple[tuple[WeightedCluster, ...], int]:
    """The clusters and their weight sum; a deprecated total_weight must equal the sum."""
    clusters_ctx = ctx.at("clusters")
    clusters = tuple(
        WeightedCluster(
            name=cluster_ref(str(c.name), clusters_ctx.at(i, "name")),
            weight=uint(c, "weight", 0, clusters_ctx.at(i)),
            headers=_header_mutations(c, clusters_ctx.at(i)),
        )
        for i, c in enumerate(config.clusters)
    )
    total = total_weight(clusters, clusters_ctx)
    if config.HasField("total_weight") and config.total_weight.value != total:
        raise ctx.at("total_weight").error(
            f"total_weight {config.total_weight.value} is not the sum of the weights ({total})"
        )
    return clusters, total


def _retry_policy(owner: Message, ctx: Ctx) -> RetryPolicy | None:
    if not owner.HasField("retry_policy"):
        return None
    policy = owner.retry_policy
    ctx = ctx.at("retry_policy")
    retry_on = frozenset(part.strip() for part in str(policy.retry_on).split(",") if part.strip())
    if unknown := sorted(retry_on - _RETRY_ON):
        raise ctx.at("retry_on").error(f"unknown retry condition(s): {', '.join(unknown)}")
    for index, code in enumerate(policy.retriable_status_codes):
        if not 100 <= code <= 599:
            raise ctx.at("retriable_status_codes", index).error(f"{code} is not an HTTP status")
    base, most = 0.025, 0.25
    if policy.HasField("retry_back_off"):
        back_off = policy.retry_back_off
        back_off_ctx = ctx.at("retry_back_off")
        if not back_off.HasField("base_interval"):
            raise back_off_ctx.at("base_interval").error("base_interval is required")
        base = seconds(back_off, "base_interval", 0.0, back_off_ctx, positive=True)
        most = seconds(back_off, "max_interval", 10 * base, back_off_ctx, positive=True)
        if most < base:
            raise back_off_ctx.at("max_interval").error("max_interval is less than base_interval")
    predicates_ctx = ctx.at("retry_host_predicate")
    for index, predicate in enumerate(policy.retry_host_predicate):
        typed_config(predicate, predicates_ctx.at(index), previous_hosts_pb2.PreviousHostsPredicate)
    return RetryPolicy(
        retry_on=retry_on,
        num_retries=uint(policy, "num_retries", 1, ctx),
        per_try_timeout=timeout(policy, "per_try_timeout", None, ctx),
        retriable_status_codes=frozenset(int(c) for c in policy.retriable_status_codes),
        base_interval=base,
        max_interval=most,
        retry_other_host=bool(policy.retry_host_predicate),
        host_selection_retry_max_attempts=int(policy.host_selection_retry_max_attempts) or 1,
    )


def _hash_policy(policy: Message, ctx: Ctx) -> HashPolicy:
    kind = policy.WhichOneof("policy_specifier")
    terminal = bool(policy.terminal)
    if kind == "connection_properties":
        if not policy.connection_properties.source_ip:
            raise ctx.at(kind, "source_ip").error("source_ip must be true")
        return HashPolicy("source_ip", terminal=terminal)
    if kind == "header":
        name = str(policy.header.header_name).lower()
        return HashPolicy(
            "header", required(name, ctx.at(kind, "header_name"), "header_name"), terminal
        )
    if kind == "cookie":
        return _cookie_policy(policy.cookie, ctx.at(kind), terminal)
    if kind == "query_parameter":
        name = required(str(policy.query_parameter.name), ctx.at(kind, "name"), "name")
        return HashPolicy(kind, name, terminal)
    raise ctx.error("one of header, cookie, connection_properties or query_parameter is required")


def _cookie_policy(cookie: Message, ctx: Ctx, terminal: bool) -> HashPolicy:
    """A cookie hash; with ``ttl`` a missing cookie is generated and set on the response, so
    its name and path must fit in a Set-Cookie header (Envoy does not check them)."""
    name = required(str(cookie.name), ctx.at("name"), "name")
    ttl = duration(cookie, "ttl", ctx)
    path = str(cookie.path)
    if ttl is not None:
        if not _COOKIE_NAME.fullmatch(name):
            raise ctx.at("name").error(f"{name!r} is not a valid cookie name")
        if not _COOKIE_PATH.fullmatch(path):
            raise ctx.at("path").error(f"{path!r} is not a valid cookie path")
    return HashPolicy(
        "cookie", name, terminal, ttl=int(ttl) if ttl is not None else None, path=path
    )


def _direct_response(response: Message, ctx: Ctx) -> DirectResponse:
    status = int(response.status)
    if not 200 <= status <= 599:
        raise ctx.at("status").error(f"status {status} is out of range [200, 599]")
    return DirectResponse(status, data_source(response.body))


def _redirect(redirect: Message, ctx: Ctx) -> Redirect:
    scheme = str(redirect.scheme_redirect).lower() or ("https" if redirect.https_redirect else None)
    port = int(redirect.port_redirect)
    if port > 65535:
        raise ctx.at("port_redirect").error(f"port {port} is out of range [1, 65535]")
    path_kind = redirect.WhichOneof("path_rewrite_specifier")
    return Redirect(
        scheme=scheme,
        host=str(redirect.host_redirect) or None,
        port=port or None,
        path=str(redirect.path_redirect) if path_kind == "path_redirect" else None,
        prefix_rewrite=str(redirect.prefix_rewrite) if path_kind == "prefix_rewrite" else None,
        status=choice(_REDIRECT_CODES, redirect, "response_code", ctx),
        strip_query=bool(redirect.strip_query),
    )


def _header_mutations(owner: Message, ctx: Ctx) -> HeaderMutations:
    """The four *_headers_to_add/remove fields shared by route config, vhost, route and
    weighted cluster; header names are lower-cased."""
    return HeaderMutations(
        request_add=headers_to_add(owner, "request_headers_to_add", ctx),
        request_remove=frozenset(str(h).lower() for h in owner.request_headers_to_remove),
        response_add=headers_to_add(owner, "response_headers_to_add", ctx),
        response_remove=frozenset(str(h).lower() for h in owner.response_headers_to_remove),
    )
