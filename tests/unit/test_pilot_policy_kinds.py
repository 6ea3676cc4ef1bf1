"""Shoal's own kinds (shoal.io/v1): parsing, validation with field paths, and translation
into cluster metadata and the inbound rate limit filter that the proxy accepts."""

from __future__ import annotations

import json
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2

from shoal.config.envoy import translate_cluster, translate_listener
from shoal.errors import ConfigError
from shoal.pilot.api.model import (
    CircuitBreakerPolicy,
    GlobalRateLimit,
    LocalRateLimit,
    RateLimitPolicy,
    RuleSet,
)
from shoal.pilot.api.parse import parse_resource
from shoal.pilot.model import Instance, RegistrySnapshot, Service, ServicePort
from shoal.pilot.translate import NodeInfo, Translator


def policy(kind: str, spec: dict[str, Any]) -> Any:
    document = {"apiVersion": "shoal.io/v1", "kind": kind, "metadata": {"name": "p"}, "spec": spec}
    return parse_resource(document, "policies.yaml")


BREAKER = {
    "host": "reviews",
    "errorRatio": 0.5,
    "minimumRequests": 10,
    "openDuration": "2s",
    "halfOpenTrials": 2,
    "fallback": {"localReply": {"status": 503, "body": "later"}},
}


def test_a_circuit_breaker_policy_is_parsed_into_the_proxy_metadata_fields() -> None:
    parsed = policy("CircuitBreakerPolicy", BREAKER)
    assert isinstance(parsed, CircuitBreakerPolicy)
    assert parsed.host == "reviews"
    assert json.loads(parsed.settings) == {
        "error_ratio": 0.5,
        "minimum_requests": 10,
        "open_duration": "2s",
        "half_open_trials": 2,
        "fallback": {"local_reply": {"status": 503, "body": "later"}},
    }


@pytest.mark.parametrize(
    ("spec", "field", "reason"),
    [
        ({**BREAKER, "errorRatio": 2}, "spec.errorRatio", "(0, 1]"),
        ({**BREAKER, "windowSize": 10, "window": "time"}, "spec.windowSize", "windowSize does"),
        ({**BREAKER, "fallback": {}}, "spec.fallback", "exactly one"),
        (
            {**BREAKER, "fallback": {"localReply": {"status": 99}}},
            "spec.fallback.localReply.status",
            "",
        ),
        ({**BREAKER, "errorRatoi": 0.5}, "spec.errorRatoi", "did you mean 'errorRatio'"),
        ({"errorRatio": 0.5}, "spec.host", "required"),
    ],
)
def test_breaker_errors_name_the_field(spec: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        policy("CircuitBreakerPolicy", spec)
    assert caught.value.field == field
    assert reason in str(caught.value)
    assert "policies.yaml: CircuitBreakerPolicy default/p" in str(caught.value)


def test_rate_limit_policy_and_its_errors() -> None:
    spec = {"host": "reviews", "local": {"maxTokens": 100, "fillInterval": "1s"}}
    parsed = policy("RateLimitPolicy", spec)
    assert parsed == RateLimitPolicy(parsed.meta, "reviews", LocalRateLimit(100, 100, 1.0))
    with pytest.raises(ConfigError, match="at least 50ms"):
        policy("RateLimitPolicy", {**spec, "local": {"maxTokens": 1, "fillInterval": "10ms"}})
    with pytest.raises(ConfigError, match="unknown kind 'Throttle'"):
        policy("Throttle", spec)


SERVICES = (Service("reviews", (ServicePort(9080),)), Service("backup", (ServicePort(80),)))
INSTANCES = (Instance("reviews", 9080, "127.0.0.1", 8000), Instance("backup", 80, "127.0.0.1", 81))


def test_translation_puts_the_breaker_on_the_clusters_with_a_fallback_destination() -> None:
    spec = {**BREAKER, "fallback": {"destination": {"host": "backup"}}}
    rules = RuleSet(circuit_breakers=(policy("CircuitBreakerPolicy", spec),))
    snapshot = Translator().translate(RegistrySnapshot(SERVICES, INSTANCES), rules)
    message = cluster_pb2.Cluster()
    assert snapshot.clusters["outbound|9080||reviews"].body.Unpack(message)
    cluster = translate_cluster(message)
    assert cluster.breaker is not None
    assert cluster.breaker.error_ratio == 0.5
    assert cluster.breaker.fallback_cluster == "outbound|80||backup"
    untouched = cluster_pb2.Cluster()
    assert snapshot.clusters["outbound|80||backup"].body.Unpack(untouched)
    assert translate_cluster(untouched).breaker is None


def test_translation_puts_the_rate_limit_on_the_instances_inbound_listener() -> None:
    spec = {"host": "reviews", "local": {"maxTokens": 5, "fillInterval": "1s"}}
    rules = RuleSet(rate_limits=(policy("RateLimitPolicy", spec),))
    snapshot = Translator().translate(RegistrySnapshot(SERVICES, INSTANCES), rules)
    for service, limited in (("reviews", True), ("backup", False)):
        node = NodeInfo("n", service=service, app_address=("127.0.0.1", 7000))
        message = listener_pb2.Listener()
        assert snapshot.sidecar_listeners(node)["inbound"].body.Unpack(message)
        filters = translate_listener(message).filter.http_filters  # type: ignore[union-attr]
        assert [f.name for f in filters] == (  # the router is not in the list
            ["envoy.filters.http.local_ratelimit"] if limited else []
        )


GLOBAL = {
    "domain": "shop",
    "service": {"host": "ratelimit", "port": 8081},
    "descriptors": [
        {"actions": [{"genericKey": {"descriptorValue": "everyone"}}]},
        {
            "actions": [
                {"requestHeaders": {"headerName": "X-User", "descriptorKey": "user"}},
                {"remoteAddress": {}},
            ]
        },
    ],
}


def test_a_global_rate_limit_is_parsed_into_envoy_rate_limits() -> None:
    parsed = policy("RateLimitPolicy", {"host": "reviews", "global": GLOBAL})
    assert parsed.local is None
    limit = parsed.global_limit
    assert limit == GlobalRateLimit("shop", "ratelimit", 8081, limit.rate_limits, 0.02, False)
    assert json.loads(limit.rate_limits) == [
        {"actions": [{"generic_key": {"descriptor_value": "everyone"}}]},
        {
            "actions": [
                {
                    "request_headers": {
                        "header_name": "x-user",
                        "descriptor_key": "user",
                        "skip_if_absent": False,
                    }
                },
                {"remote_address": {}},
            ]
        },
    ]


def action(value: Any) -> dict[str, Any]:
    return {"host": "reviews", "global": {**GLOBAL, "descriptors": [{"actions": [value]}]}}


@pytest.mark.parametrize(
    ("spec", "field", "reason"),
    [
        ({"host": "reviews"}, "spec", "at least one of local, global or adaptiveConcurrency"),
        ({"host": "reviews", "global": {**GLOBAL, "domain": ""}}, "spec.global.domain", "empty"),
        (
            {"host": "reviews", "global": {**GLOBAL, "service": {"host": "ratelimit"}}},
            "spec.global.service.port",
            "required",
        ),
        (
            {"host": "reviews", "global": {**GLOBAL, "descriptors": []}},
            "spec.global.descriptors",
            "",
        ),
        (
            {"host": "reviews", "global": {**GLOBAL, "timeout": 1}},
            "spec.global.timeout",
            "duration",
        ),
        (
            {"host": "reviews", "global": {**GLOBAL, "failureModeDeny": "yes"}},
            "spec.global.failureModeDeny",
            "true or false",
        ),
        (action({}), "spec.global.descriptors[0].actions[0]", "exactly one of genericKey"),
        (
            action({"genericKey": {"descriptorKey": "k"}}),
            "spec.global.descriptors[0].actions[0].genericKey.descriptorValue",
            "required",
        ),
        (
            action({"requestHeaders": {"headerName": "x user", "descriptorKey": "u"}}),
            "spec.global.descriptors[0].actions[0].requestHeaders.headerName",
            "invalid header name",
        ),
        (
            action({"remoteAddress": {"mask": 24}}),
            "spec.global.descriptors[0].actions[0].remoteAddress.mask",
            "unknown field",
        ),
        (
            action({"headerValueMatch": {}}),
            "spec.global.descriptors[0].actions[0].headerValueMatch",
            "unknown field",
        ),
        (
            {"host": "reviews", "adaptiveConcurrency": {"sampleAggregatePercentile": 101}},
            "spec.adaptiveConcurrency.sampleAggregatePercentile",
            "0-100",
        ),
        (
            {
                "host": "reviews",
                "adaptiveConcurrency": {"concurrencyLimitParams": {"concurrencyUpdateInterval": 0}},
            },
            "spec.adaptiveConcurrency.concurrencyLimitParams.concurrencyUpdateInterval",
            "duration",
        ),
        (
            {"host": "reviews", "adaptiveConcurrency": {"minRttCalcParams": {"minConcurrency": 0}}},
            "spec.adaptiveConcurrency.minRttCalcParams.minConcurrency",
            "integer",
        ),
        (
            {"host": "reviews", "adaptiveConcurrency": {"minRttCalcParams": {"jiter": 5}}},
            "spec.adaptiveConcurrency.minRttCalcParams.jiter",
            "did you mean 'jitter'",
        ),
    ],
)
def test_rate_limit_errors_name_the_field(spec: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        policy("RateLimitPolicy", spec)
    assert caught.value.field == field
    assert reason in str(caught.value)


def inbound_filters(snapshot: Any, service: str) -> Any:
    node = NodeInfo("n", service=service, app_address=("127.0.0.1", 7000))
    message = listener_pb2.Listener()
    assert snapshot.sidecar_listeners(node)["inbound"].body.Unpack(message)
    return translate_listener(message).filter.http_filters  # type: ignore[union-attr]


def test_local_global_and_adaptive_filters_go_on_the_inbound_listener_in_order() -> None:
    services = (
        *SERVICES,
        Service("ratelimit.default.svc.cluster.local", (ServicePort(8081, "grpc", "GRPC"),)),
    )
    spec = {
        "host": "reviews",
        "local": {"maxTokens": 5, "fillInterval": "1s"},
        "global": {**GLOBAL, "timeout": "250ms", "failureModeDeny": True},
        "adaptiveConcurrency": {
            "sampleAggregatePercentile": 90,
            "concurrencyLimitParams": {
                "maxConcurrencyLimit": 50,
                "concurrencyUpdateInterval": "1s",
            },
            "minRttCalcParams": {
                "interval": "30s",
                "requestCount": 20,
                "jitter": 10,
                "minConcurrency": 2,
                "buffer": 50,
            },
            "concurrencyLimitExceededStatus": 429,
        },
        "status": 503,
    }
    rules = RuleSet(rate_limits=(policy("RateLimitPolicy", spec),))
    snapshot = Translator().translate(RegistrySnapshot(services, INSTANCES), rules)
    filters = inbound_filters(snapshot, "reviews")
    assert [f.name for f in filters] == [
        "envoy.filters.http.local_ratelimit",
        "envoy.filters.http.ratelimit",
        "envoy.filters.http.adaptive_concurrency",
    ]
    local, limit, adaptive = (f.config for f in filters)
    assert local.status == 503
    assert limit.domain == "shop"
    assert limit.cluster == "outbound|8081||ratelimit.default.svc.cluster.local"  # resolved
    assert (limit.timeout, limit.failure_mode_deny, limit.rate_limited_status) == (0.25, True, 503)
    assert [[a.kind for a in d] for d in limit.descriptors] == [
        ["generic_key"],
        ["request_headers", "remote_address"],
    ]
    assert limit.descriptors[1][0].header == "x-user"
    assert (adaptive.percentile, adaptive.max_limit, adaptive.update_interval) == (0.9, 50, 1.0)
    assert (adaptive.min_rtt_interval, adaptive.min_rtt_requests) == (30.0, 20)
    assert (adaptive.jitter, adaptive.min_concurrency, adaptive.buffer) == (0.1, 2, 0.5)
    assert adaptive.status == 429
    cluster = cluster_pb2.Cluster()
    name = "outbound|8081||ratelimit.default.svc.cluster.local"
    assert snapshot.clusters[name].body.Unpack(cluster)
    assert translate_cluster(cluster).http2  # the rate limit service's gRPC needs HTTP/2


def test_adaptive_concurrency_alone_takes_the_proxy_defaults() -> None:
    parsed = policy("RateLimitPolicy", {"host": "reviews", "adaptiveConcurrency": {}})
    snapshot = Translator().translate(
        RegistrySnapshot(SERVICES, INSTANCES), RuleSet(rate_limits=(parsed,))
    )
    [adaptive] = inbound_filters(snapshot, "reviews")
    config = adaptive.config
    assert (config.percentile, config.max_limit, config.update_interval) == (0.5, 1000, 0.1)
    assert (config.min_rtt_interval, config.min_concurrency, config.status) == (60.0, 3, 503)


def test_backup_request_policy_goes_on_every_route_to_the_host() -> None:
    from envoy.config.route.v3 import route_pb2

    from shoal.config.envoy import translate_route_configuration

    spec = {"host": "reviews", "percentile": 95, "maxRatio": 0.05, "minDelay": "10ms"}
    parsed = policy("BackupRequestPolicy", spec)
    rules = RuleSet(backup_requests=(parsed,))
    snapshot = Translator().translate(RegistrySnapshot(SERVICES, INSTANCES), rules)
    message = route_pb2.RouteConfiguration()
    assert snapshot.outbound_routes.body.Unpack(message)
    table = translate_route_configuration(message)
    by_host = {vhost.name: vhost.routes for vhost in table.virtual_hosts}
    (reviews,) = by_host["reviews:9080"]
    assert reviews.backup is not None
    assert reviews.backup.percentile == 95
    assert reviews.backup.max_ratio == 0.05
    (backup_service,) = by_host["backup:80"]
    assert backup_service.backup is None


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"host": "reviews", "percentile": 10}, "spec.percentile"),
        ({"host": "reviews", "maxRatio": 2}, "spec.maxRatio"),
        ({"host": "reviews", "minDelay": "2s", "maxDelay": "1s"}, "spec.minDelay"),
        ({"host": "reviews", "precentile": 90}, "spec.precentile"),
    ],
)
def test_backup_request_errors_name_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        policy("BackupRequestPolicy", spec)
    assert caught.value.field == field
