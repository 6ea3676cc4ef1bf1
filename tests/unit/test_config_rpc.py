"""Envoy generic_proxy listeners (Shoal's RPC protocols) → the model, and their errors."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from tests.conftest import bootstrap, http_listener, static_cluster
from tests.rpc_config import (
    LOCAL_RATE_LIMIT,
    action,
    condition,
    generic_proxy,
    matcher,
    rpc_listener,
)

from shoal.codec.detect import detect
from shoal.codec.rpc.registry import CODECS
from shoal.config.envoy import bootstrap_from_dict
from shoal.config.envoy_listeners import DETECTED_PROTOCOLS
from shoal.config.envoy_rpc import RPC_PROTOCOLS
from shoal.config.model import RpcProxy
from shoal.errors import ConfigError

FILTER = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
ACTION = FILTER + ".route_config.virtual_hosts[0].routes.matcher_list.matchers[0].on_match"


def _config(network_filter: dict[str, Any], *more: tuple[list[str], dict[str, Any]]) -> Any:
    clusters = [static_cluster(name, 1) for name in ("v1", "v2", "web")]
    return bootstrap([rpc_listener(0, ([], network_filter), *more)], clusters, 0)


def _greeter(**route: Any) -> dict[str, Any]:
    return generic_proxy(
        "dubbo",
        {
            "com.example.Greeter": matcher(
                [
                    (
                        [
                            condition("method", "sayHello"),
                            condition("property", "alice", "user"),
                            condition("property", "1.0.0", "version"),
                        ],
                        action(weights={"v1": 80, "v2": 20}, name="canary", **route),
                    )
                ],
                default=action("v1"),
            )
        },
    )


def test_generic_proxy_translates_routes_matches_and_policies() -> None:
    bucket = {"max_tokens": 5, "tokens_per_fill": 5, "fill_interval": "1s"}
    config = _config(
        _greeter(
            timeout="2s",
            retry_policy={"num_retries": 2, "retry_on": "connect-failure,reset"},
            per_filter_config={
                "limit": {"@type": LOCAL_RATE_LIMIT, "stat_prefix": "hello", "token_bucket": bucket}
            },
            metadata={"filter_metadata": {"shoal.circuit_breaker": {"minimum_requests": 5}}},
        )
    )
    proxy = bootstrap_from_dict(config).listeners[0].filter
    assert isinstance(proxy, RpcProxy)
    assert proxy.protocol == "dubbo"
    vhost = proxy.virtual_hosts[0]
    assert vhost.hosts == ("com.example.Greeter",)
    canary, default = vhost.routes
    assert [(c.input, c.property, c.match.value) for c in canary.conditions] == [
        ("method", "", "sayHello"),
        ("property", "user", "alice"),
        ("property", "version", "1.0.0"),
    ]
    assert [(w.name, w.weight) for w in canary.weighted_clusters] == [("v1", 80), ("v2", 20)]
    assert canary.name == "canary" and canary.timeout == 2.0
    assert canary.retry_policy is not None and canary.retry_policy.num_retries == 2
    assert canary.retry_policy.retry_on == {"connect-failure", "reset"}
    assert canary.rate_limit is not None and canary.rate_limit.max_tokens == 5
    assert canary.breaker is not None and canary.breaker.minimum_requests == 5
    assert default.conditions == () and default.cluster == "v1"


@pytest.mark.parametrize("protocol", ["bolt", "motan2"])
def test_shoal_codecs_are_typed_structs(protocol: str) -> None:
    config = _config(generic_proxy(protocol, routes=matcher([], default=action("web"))))
    proxy = bootstrap_from_dict(config).listeners[0].filter
    assert isinstance(proxy, RpcProxy) and proxy.protocol == protocol
    assert proxy.routes[0].cluster == "web"


def test_filter_chains_by_detected_protocol() -> None:
    web = http_listener(0, [{"name": "all", "domains": ["*"], "routes": []}])
    hcm = web["filter_chains"][0]["filters"][0]
    bolt = generic_proxy("bolt", routes=matcher([], default=action("web")))
    listener = bootstrap_from_dict(_config(hcm, (["bolt"], bolt))).listeners[0]
    assert not isinstance(listener.filter, RpcProxy)
    (chain,) = listener.protocol_chains
    assert chain.application_protocols == {"bolt"} and isinstance(chain.filter, RpcProxy)


def _mutated(path: list[Any], value: Any) -> dict[str, Any]:
    config = copy.deepcopy(_config(_greeter()))
    node: Any = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    node = node["typed_config"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return config


VHOST = ["route_config", "virtual_hosts", 0]
ROUTE_ACTION = [*VHOST, "routes", "matcher_list", "matchers", 0, "on_match", "action"]


@pytest.mark.parametrize(
    ("path", "value", "field", "reason"),
    [
        (
            [*ROUTE_ACTION, "typed_config", "retry_policy"],
            {"retry_on": "5xx"},
            ACTION + ".action.typed_config.retry_policy.retry_on",
            "unknown condition '5xx'",
        ),
        (
            [*ROUTE_ACTION, "typed_config", "weighted_clusters", "clusters", 0, "name"],
            "nope",
            ACTION + ".action.typed_config.weighted_clusters.clusters[0].name",
            "unknown cluster",
        ),
        ([*VHOST, "hosts"], [], FILTER + ".route_config.virtual_hosts[0].hosts", "at least one"),
        (
            ["codec_config", "typed_config"],
            {"@type": "type.googleapis.com/xds.type.v3.TypedStruct", "type_url": "x/thrift"},
            FILTER + ".codec_config.typed_config.type_url",
            "unknown codec 'x/thrift'",
        ),
        (["filters"], [], FILTER + ".filters", "the router"),
    ],
)
def test_errors_name_the_field(path: list[Any], value: Any, field: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        bootstrap_from_dict(_mutated(path, value))
    assert caught.value.field == field
    assert reason in caught.value.reason


def test_protocol_chains_need_the_inspector_and_known_protocols() -> None:
    bolt = generic_proxy("bolt", routes=matcher([], default=action("web")))
    config = _config(bolt, (["thrift"], bolt))
    with pytest.raises(ConfigError, match="unknown protocol 'thrift'"):
        bootstrap_from_dict(config)
    config = _config(bolt, (["bolt"], bolt))
    del config["static_resources"]["listeners"][0]["listener_filters"]
    with pytest.raises(ConfigError, match="needs a protocol inspector"):
        bootstrap_from_dict(config)


def test_config_and_codec_registry_agree() -> None:
    assert set(RPC_PROTOCOLS) == set(CODECS)
    assert set(CODECS) < DETECTED_PROTOCOLS


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", "http/1.1"),
        (b"POST /x HTTP/1.0\r\n", "http/1.0"),
        (b"GET /" + b"a" * 100, "http/1.1"),  # a long request line
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "h2c"),
        (b"\xda\xbb\xc2\x00" + bytes(12), "dubbo"),
        (b"\xf1\xf1" + bytes(11), "motan2"),
        (b"\x16\x03\x01\x00\xa5", ""),  # TLS: no chain here
        (b"hello world, this is not a protocol\r\n", ""),
        (b"GE", None),
        (b"PRI * HTTP", None),
        (b"", None),
    ],
)
def test_detect(data: bytes, expected: str | None) -> None:
    assert detect(data) == expected
