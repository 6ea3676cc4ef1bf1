"""RPC services (Dubbo, SOFA Bolt, Motan2) as Envoy's ``generic_proxy`` network filter.

The shapes are those Shoal's proxy reads (``shoal.config.envoy_rpc``): one generic_proxy
filter per protocol with its codec, the router as its only filter, and an inline route
configuration whose routes are an xds matcher list (first match wins, ``on_no_match``
last). Envoy has the Dubbo codec itself; the Bolt and Motan2 codecs, and the protocol
inspector that tells protocols apart on one listener, are Shoal's (``TypedStruct``s).

These are shapes only: what a route sends where is resolved by :mod:`.translate`, which
also uses the listener and matcher helpers here for HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.network.generic_proxy.action.v3 import action_pb2
from envoy.extensions.filters.network.generic_proxy.codecs.dubbo.v3 import dubbo_pb2
from envoy.extensions.filters.network.generic_proxy.matcher.v3 import matcher_pb2
from envoy.extensions.filters.network.generic_proxy.router.v3 import router_pb2
from envoy.extensions.filters.network.generic_proxy.v3 import generic_proxy_pb2
from google.protobuf.message import Message
from xds.type.v3 import typed_struct_pb2

from shoal.config.envoy_listeners import INSPECTOR, INSPECTOR_TYPE_URL
from shoal.config.envoy_rpc import TYPED_STRUCT_CODECS
from shoal.pilot.api.model import LocalRateLimit, RpcMatch, RpcRouteRule, StringMatch
from shoal.pilot.model import AppProtocol, envoy_duration

# The extensions these shapes pack into Any fields (ParseDict looks them up by name).
EXTENSIONS = (
    action_pb2,
    dubbo_pb2,
    generic_proxy_pb2,
    local_rate_limit_pb2,
    matcher_pb2,
    router_pb2,
    typed_struct_pb2,
)


def _type_url(message: type[Message]) -> str:
    return f"type.googleapis.com/{message.DESCRIPTOR.full_name}"


_TYPED_STRUCT = _type_url(typed_struct_pb2.TypedStruct)
_SHOAL_CODECS = {protocol: url for url, protocol in TYPED_STRUCT_CODECS.items()}
_CODECS: dict[AppProtocol, dict[str, Any]] = {
    "DUBBO": {
        "name": "envoy.generic_proxy.codecs.dubbo",
        "typed_config": {"@type": _type_url(dubbo_pb2.DubboCodecConfig)},
    },
    **{
        protocol: {
            "name": f"shoal.generic_proxy.codecs.{protocol.lower()}",
            "typed_config": {"@type": _TYPED_STRUCT, "type_url": _SHOAL_CODECS[protocol.lower()]},
        }
        for protocol in ("BOLT", "MOTAN2")
    },
}
_INSPECTOR = {
    "name": INSPECTOR,
    "typed_config": {"@type": _TYPED_STRUCT, "type_url": INSPECTOR_TYPE_URL},
}
_ROUTER = {
    "name": "envoy.filters.generic.router",
    "typed_config": {"@type": _type_url(router_pb2.Router)},
}
# Where a route's token bucket goes (the proxy reads a LocalRateLimit under any key).
_RATE_LIMIT_KEY = "envoy.filters.generic.local_ratelimit"


def application_protocol(protocol: AppProtocol) -> str:
    """What Shoal's protocol inspector calls the protocol (``dubbo``, ``bolt``, ``motan2``)."""
    return protocol.lower()


def listener(
    name: str, address: tuple[str, int], filters: Sequence[tuple[str, list[dict[str, Any]]]]
) -> dict[str, Any]:
    """A listener with one filter chain per entry of ``filters``: the application protocol
    that picks the chain ("" for the default chain) and the chain's network filters. With
    several chains, Shoal's protocol inspector tells them apart; one is a plain chain."""
    chains = []
    for protocol, network_filters in filters:
        chain: dict[str, Any] = {"filters": network_filters}
        if protocol and len(filters) > 1:
            chain["filter_chain_match"] = {"application_protocols": [protocol]}
        chains.append(chain)
    data: dict[str, Any] = {
        "name": name,
        "address": {"socket_address": {"address": address[0], "port_value": address[1]}},
        "filter_chains": chains,
    }
    if len(filters) > 1:
        data["listener_filters"] = [_INSPECTOR]
    return data


def generic_proxy(
    protocol: AppProtocol, stat_prefix: str, route_config: dict[str, Any]
) -> dict[str, Any]:
    """The network filter for one protocol; ``route_config`` holds ``virtual_hosts`` or
    ``routes`` and is named after the stat prefix."""
    return {
        "name": "envoy.filters.network.generic_proxy",
        "typed_config": {
            "@type": _type_url(generic_proxy_pb2.GenericProxy),
            "stat_prefix": stat_prefix,
            "codec_config": _CODECS[protocol],
            "filters": [_ROUTER],
            "route_config": {"name": stat_prefix, **route_config},
        },
    }


def route_matcher(
    routes: Sequence[tuple[RpcMatch | None, dict[str, Any]]], default: dict[str, Any]
) -> dict[str, Any]:
    """Routes (a match and a RouteAction) in order, then ``default``. A route without a
    match takes every call: it ends the list, in ``default``'s place."""
    matchers = []
    for match, action in routes:
        if match is None:
            default = action
            break
        matchers.append({"predicate": _predicate(match), "on_match": _on_match(action)})
    matcher: dict[str, Any] = {"on_no_match": _on_match(default)}
    if matchers:
        matcher["matcher_list"] = {"matchers": matchers}
    return matcher


def _on_match(action: dict[str, Any]) -> dict[str, Any]:
    return {"action": {"name": "route", "typed_config": action}}


def _predicate(match: RpcMatch) -> dict[str, Any]:
    """One single predicate per field (all must hold); several make an ``and_matcher``."""
    method = _type_url(matcher_pb2.MethodMatchInput)
    tests: list[tuple[str, dict[str, Any], StringMatch]] = []
    if match.method is not None:
        tests.append(("method", {"@type": method}, match.method))
    properties = [("version", match.version), ("group", match.group), *match.attributes]
    for name, value in properties:
        if value is not None:
            config = {"@type": _type_url(matcher_pb2.PropertyMatchInput), "property_name": name}
            tests.append((name, config, value))
    singles = [
        {
            "single_predicate": {
                "input": {"name": name, "typed_config": config},
                "value_match": _value_match(value),
            }
        }
        for name, config, value in tests
    ]
    return singles[0] if len(singles) == 1 else {"and_matcher": {"predicate": singles}}


def _value_match(match: StringMatch) -> dict[str, Any]:
    """xds' StringMatcher, whose RegexMatcher requires its engine named (Envoy's does not)."""
    if match.kind == "regex":
        return {"safe_regex": {"google_re2": {}, "regex": match.value}}
    return string_matcher(match)


def route_action(
    name: str,
    clusters: dict[str, Any],
    rule: RpcRouteRule | None = None,
    breaker: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A RouteAction to ``clusters`` (``cluster`` or ``weighted_clusters``), with the
    rule's timeout, retries and token bucket, and the ``shoal.circuit_breaker`` metadata."""
    action: dict[str, Any] = {"@type": _type_url(action_pb2.RouteAction), "name": name, **clusters}
    if rule is not None:
        if rule.timeout is not None:
            action["timeout"] = envoy_duration(rule.timeout)
        if rule.retries is not None and rule.retries.attempts:
            action["retry_policy"] = {
                "num_retries": rule.retries.attempts,
                "retry_on": rule.retries.retry_on,
            }
        if rule.rate_limit is not None:
            limit = {
                "@type": _type_url(local_rate_limit_pb2.LocalRateLimit),
                "stat_prefix": name,
                "token_bucket": token_bucket(rule.rate_limit),
            }
            action["per_filter_config"] = {_RATE_LIMIT_KEY: limit}
    if breaker is not None:
        action["metadata"] = {"filter_metadata": {"shoal.circuit_breaker": breaker}}
    return action


def token_bucket(local: LocalRateLimit) -> dict[str, Any]:
    return {
        "max_tokens": local.max_tokens,
        "tokens_per_fill": local.tokens_per_fill,
        "fill_interval": envoy_duration(local.fill_interval),
    }


def string_matcher(match: StringMatch) -> dict[str, Any]:
    """Envoy's (and xds') StringMatcher."""
    if match.kind == "regex":
        return {"safe_regex": {"regex": match.value}}
    return {match.kind: match.value}
