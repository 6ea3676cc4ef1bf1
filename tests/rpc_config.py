"""Builders for Envoy generic_proxy configs (Shoal's RPC listeners) as the tests write them."""

from __future__ import annotations

from typing import Any

TYPE = "type.googleapis.com/"
GENERIC_PROXY = TYPE + "envoy.extensions.filters.network.generic_proxy.v3.GenericProxy"
ROUTE_ACTION = TYPE + "envoy.extensions.filters.network.generic_proxy.action.v3.RouteAction"
INPUTS = TYPE + "envoy.extensions.filters.network.generic_proxy.matcher.v3."
TYPED_STRUCT = TYPE + "xds.type.v3.TypedStruct"
LOCAL_RATE_LIMIT = TYPE + "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
INSPECTOR = {
    "name": "shoal.filters.listener.protocol_inspector",
    "typed_config": {
        "@type": TYPED_STRUCT,
        "type_url": "type.shoal.io/shoal.listener.v1.ProtocolInspector",
    },
}


def codec_config(protocol: str) -> dict[str, Any]:
    if protocol == "dubbo":
        return {
            "name": "envoy.generic_proxy.codecs.dubbo",
            "typed_config": {
                "@type": TYPE + "envoy.extensions.filters.network.generic_proxy.codecs."
                "dubbo.v3.DubboCodecConfig"
            },
        }
    kind = {"bolt": "BoltCodecConfig", "motan2": "Motan2CodecConfig"}[protocol]
    return {
        "name": f"shoal.generic_proxy.codecs.{protocol}",
        "typed_config": {
            "@type": TYPED_STRUCT,
            "type_url": f"type.shoal.io/shoal.codecs.v1.{kind}",
        },
    }


def action(
    cluster: str = "", weights: dict[str, int] | None = None, **extra: Any
) -> dict[str, Any]:
    """An ``on_match`` entry holding a RouteAction to one cluster or weighted clusters."""
    config: dict[str, Any] = {"@type": ROUTE_ACTION, **extra}
    if weights:
        config["weighted_clusters"] = {
            "clusters": [{"name": name, "weight": w} for name, w in weights.items()]
        }
    else:
        config["cluster"] = cluster
    return {"action": {"name": "route", "typed_config": config}}


def condition(kind: str, value: str, property_name: str = "", how: str = "exact") -> dict[str, Any]:
    """A single predicate on ``service``, ``method`` or a ``property``."""
    names = {"service": "ServiceMatchInput", "method": "MethodMatchInput"}
    typed: dict[str, Any] = {"@type": INPUTS + names.get(kind, "PropertyMatchInput")}
    if kind == "property":
        typed["property_name"] = property_name
    return {
        "single_predicate": {
            "input": {"name": kind, "typed_config": typed},
            "value_match": {how: value},
        }
    }


def matcher(
    rules: list[tuple[list[dict[str, Any]], dict[str, Any]]],
    default: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A matcher list: (conditions, on_match) pairs in order, then ``default``."""
    matchers = []
    for conditions, on_match in rules:
        predicate = (
            conditions[0] if len(conditions) == 1 else {"and_matcher": {"predicate": conditions}}
        )
        matchers.append({"predicate": predicate, "on_match": on_match})
    result: dict[str, Any] = {}
    if matchers:
        result["matcher_list"] = {"matchers": matchers}
    if default is not None:
        result["on_no_match"] = default
    return result


def generic_proxy(
    protocol: str,
    virtual_hosts: dict[str, dict[str, Any]] | None = None,
    routes: dict[str, Any] | None = None,
    stat_prefix: str = "rpc",
    access_log: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A generic_proxy network filter; ``virtual_hosts`` maps a service name to its matcher."""
    route_config: dict[str, Any] = {"name": stat_prefix}
    if virtual_hosts:
        route_config["virtual_hosts"] = [
            {"name": host, "hosts": [host], "routes": routes_of}
            for host, routes_of in virtual_hosts.items()
        ]
    if routes is not None:
        route_config["routes"] = routes
    logs = {"access_log": [access_log]} if access_log else {}
    return {
        "name": "envoy.filters.network.generic_proxy",
        "typed_config": {
            **logs,
            "@type": GENERIC_PROXY,
            "stat_prefix": stat_prefix,
            "codec_config": codec_config(protocol),
            "filters": [
                {
                    "name": "envoy.filters.generic.router",
                    "typed_config": {
                        "@type": TYPE + "envoy.extensions.filters.network.generic_proxy."
                        "router.v3.Router"
                    },
                }
            ],
            "route_config": route_config,
        },
    }


def rpc_listener(
    port: int, *chains: tuple[list[str], dict[str, Any]], name: str = "rpc"
) -> dict[str, Any]:
    """A listener of (application_protocols, network filter) chains; the inspector is added
    when any chain names protocols."""
    listener: dict[str, Any] = {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                **({"filter_chain_match": {"application_protocols": protos}} if protos else {}),
                "filters": [network_filter],
            }
            for protos, network_filter in chains
        ],
    }
    if any(protos for protos, _ in chains):
        listener["listener_filters"] = [INSPECTOR]
    return listener
