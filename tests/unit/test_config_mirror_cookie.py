"""Request mirroring and generated hash-policy cookies: their config, and the pure pieces of
what the proxy sends (the mirror's head, the generated cookie)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from envoy.config.route.v3 import route_pb2
from google.protobuf import json_format
from tests.unit.test_config_envoy import (
    ROUTES,
    bootstrap,
    cluster,
    error,
    first_route,
    hcm,
    load,
    route,
)

from shoal.config.envoy import translate_route_configuration
from shoal.config.model import HashPolicy, RequestMirrorPolicy
from shoal.proxy.cookies import generated_value, set_cookie_line, xxhash64
from shoal.proxy.http import mirror_head

ACTION = f"{ROUTES}[0].route"
MIRROR = f"{ACTION}.request_mirror_policies[0]"
COOKIE = f"{ACTION}.hash_policy[0].cookie"


def with_mirrors(*policies: dict[str, Any]) -> dict[str, Any]:
    action = {"cluster": "backend", "request_mirror_policies": list(policies)}
    return bootstrap(hcm([route(action)]), clusters=[cluster(), cluster("shadow")])


def mirrors(tmp_path: Path, *policies: dict[str, Any]) -> tuple[RequestMirrorPolicy, ...]:
    action = first_route(load(tmp_path, with_mirrors(*policies))).action
    assert action is not None
    return action.request_mirror_policies


def with_cookie(**cookie: Any) -> dict[str, Any]:
    return bootstrap(hcm([route({"cluster": "backend", "hash_policy": [{"cookie": cookie}]})]))


def cookie_policy(tmp_path: Path, **cookie: Any) -> HashPolicy:
    action = first_route(load(tmp_path, with_cookie(**cookie))).action
    assert action is not None
    return action.hash_policy[0]


def test_mirror_policies(tmp_path: Path) -> None:
    fraction = {"runtime_key": "mirror.share", "default_value": {"numerator": 25}}
    assert mirrors(
        tmp_path,
        {"cluster": "shadow"},
        {"cluster": "backend", "runtime_fraction": fraction},
    ) == (RequestMirrorPolicy("shadow", 1.0), RequestMirrorPolicy("backend", 0.25))


@pytest.mark.parametrize(
    ("percent", "fraction"),
    [
        ({"numerator": 5, "denominator": "TEN_THOUSAND"}, 0.0005),
        ({"numerator": 30, "denominator": "MILLION"}, 0.00003),
        ({"numerator": 250}, 1.0),  # Envoy caps it at 100%
        ({}, 0.0),
    ],
)
def test_mirror_runtime_fraction(tmp_path: Path, percent: dict[str, Any], fraction: float) -> None:
    policy = {"cluster": "shadow", "runtime_fraction": {"default_value": percent}}
    assert mirrors(tmp_path, policy) == (RequestMirrorPolicy("shadow", fraction),)


@pytest.mark.parametrize(
    ("policy", "field", "reason"),
    [
        ({"cluster": "nowhere"}, f"{MIRROR}.cluster", "unknown cluster 'nowhere'"),
        ({"runtime_fraction": {}}, f"{MIRROR}.cluster", "cluster name is required"),
        (
            {"cluster": "shadow", "runtime_fraction": {"runtime_key": "k"}},
            f"{MIRROR}.runtime_fraction.default_value",
            "default_value is required",
        ),
        (
            {"cluster": "shadow", "trace_sampled": False},
            f"{MIRROR}.trace_sampled",
            "trace_sampled is not supported yet",
        ),
        ({"cluster_header": "x-mirror"}, f"{MIRROR}.cluster_header", "not supported by shoal"),
        (
            {"cluster": "shadow", "disable_shadow_host_suffix_append": True},
            f"{MIRROR}.disable_shadow_host_suffix_append",
            "not supported by shoal",
        ),
        (
            {"cluster": "shadow", "host_rewrite_literal": "x"},
            f"{MIRROR}.host_rewrite_literal",
            "not supported by shoal",
        ),
        ({"cluster": "shadow", "sampled": True}, f"{MIRROR}.sampled", "unknown field"),
    ],
)
def test_mirror_policy_errors(
    tmp_path: Path, policy: dict[str, Any], field: str, reason: str
) -> None:
    error(tmp_path, with_mirrors(policy), field, reason)


def test_rds_does_not_check_mirror_clusters() -> None:
    proto = route_pb2.RouteConfiguration()
    action = {"cluster": "a", "request_mirror_policies": [{"cluster": "not-known-yet"}]}
    json_format.ParseDict(hcm([route(action)])["route_config"], proto)
    translated = translate_route_configuration(proto).virtual_hosts[0].routes[0].action
    assert translated is not None
    assert translated.request_mirror_policies == (RequestMirrorPolicy("not-known-yet"),)


def test_cookie_ttl_and_path(tmp_path: Path) -> None:
    plain = cookie_policy(tmp_path, name="session")
    assert (plain.ttl, plain.path) == (None, "")
    generated = cookie_policy(tmp_path, name="session", ttl="3600.9s", path="/app")
    assert (generated.name, generated.ttl, generated.path) == ("session", 3600, "/app")
    assert cookie_policy(tmp_path, name="session", ttl="0s").ttl == 0  # no Max-Age, as Envoy


@pytest.mark.parametrize(
    ("cookie", "field", "reason"),
    [
        ({"name": "s", "ttl": "-1s"}, f"{COOKIE}.ttl", "negative"),
        ({"name": "s;x", "ttl": "1s"}, f"{COOKIE}.name", "not a valid cookie name"),
        ({"name": "s", "ttl": "1s", "path": "/a b"}, f"{COOKIE}.path", "not a valid cookie path"),
        ({"name": "s", "ttl": "1s", "path": "/a;x"}, f"{COOKIE}.path", "not a valid cookie path"),
        (
            {"name": "s", "ttl": "1s", "attributes": [{"name": "SameSite", "value": "Lax"}]},
            f"{COOKIE}.attributes",
            "not supported by shoal",
        ),
        ({"ttl": "1s"}, f"{COOKIE}.name", "name is required"),
    ],
)
def test_cookie_errors(tmp_path: Path, cookie: dict[str, Any], field: str, reason: str) -> None:
    error(tmp_path, with_cookie(**cookie), field, reason)


def test_xxhash64_reference_values() -> None:
    assert xxhash64(b"") == 0xEF46DB3751D8E999
    assert xxhash64(b"a") == 0xD24EC4F1A98C6E5B
    assert xxhash64(b"abc") == 0x44BC2CF5AD770999
    assert xxhash64(b"Nobody inspects the spammish repetition") == 0xFBCEA83C8A378BF1
    assert xxhash64(b"xxhash", seed=20141025) == 0xB559B98D844E0635


def test_generated_cookie_is_envoys() -> None:
    # taken from Envoy 1.40 for a connection from 127.0.0.1:53630 to 127.0.0.1:19000
    assert generated_value("127.0.0.1:53630", "127.0.0.1:19000") == "1992ef16af01b4e0"
    policy = HashPolicy("cookie", "sess", ttl=60, path="/p")
    assert (
        set_cookie_line(policy, "v") == b'set-cookie: sess="v"; Max-Age=60; Path=/p; HttpOnly\r\n'
    )
    bare = HashPolicy("cookie", "sess", ttl=0)
    assert set_cookie_line(bare, "v") == b'set-cookie: sess="v"; HttpOnly\r\n'


@pytest.mark.parametrize(
    ("host", "shadow"),
    [
        (b"reviews:9080", b"reviews-shadow:9080"),
        (b"reviews", b"reviews-shadow"),
        (b"[::1]:80", b"[::1]-shadow:80"),
        (b"[::1]", b"[::1]-shadow"),
    ],
)
def test_mirror_head(host: bytes, shadow: bytes) -> None:
    head = b"GET / HTTP/1.1\r\nx-host: %s\r\nhost: %s\r\nx-a: b\r\n\r\n" % (host, host)
    assert mirror_head(head) == (
        b"GET / HTTP/1.1\r\nx-host: %s\r\nhost: %s\r\nx-a: b\r\nx-envoy-internal: true\r\n\r\n"
        % (host, shadow)
    )
