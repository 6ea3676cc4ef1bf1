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
from shoal.pilot.api.model import CircuitBreakerPolicy, RateLimitPolicy, RuleSet
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
    assert parsed == RateLimitPolicy(parsed.meta, "reviews", 100, 100, 1.0, 429)
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
