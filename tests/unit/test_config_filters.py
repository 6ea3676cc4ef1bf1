"""Fault and local_ratelimit filters: translation and the errors Envoy-only settings get."""

from __future__ import annotations

from typing import Any

import pytest
from tests.conftest import bootstrap, http_listener, static_cluster

from shoal.config.envoy import bootstrap_from_dict
from shoal.config.filters import Fault, LocalRateLimit
from shoal.errors import ConfigError

FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
RATELIMIT = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"


def _load(typed_config: dict[str, Any], per_route: dict[str, Any] | None = None) -> Any:
    route: dict[str, Any] = {"match": {"prefix": "/"}, "route": {"cluster": "a"}}
    if per_route is not None:
        route["typed_per_filter_config"] = {"f": per_route}
    listener = http_listener(1000, [{"name": "v", "domains": ["*"], "routes": [route]}])
    chain = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    chain.insert(0, {"name": "f", "typed_config": typed_config})
    return bootstrap_from_dict(
        bootstrap([listener], [static_cluster("a", 1001)], 1002), source="b.yaml"
    ).listeners[0]


def test_fault_translates_percentages_and_header_control() -> None:
    listener = _load(
        {
            "@type": FAULT,
            "abort": {
                "header_abort": {},
                "percentage": {"numerator": 25, "denominator": "HUNDRED"},
            },
            "delay": {
                "fixed_delay": "0.25s",
                "percentage": {"numerator": 5000, "denominator": "TEN_THOUSAND"},
            },
            "max_active_faults": 3,
        }
    )
    (http_filter,) = listener.filter.http_filters
    fault = http_filter.config
    assert isinstance(fault, Fault) and http_filter.name == "f"
    assert fault.abort is not None and fault.abort.header_controlled
    assert fault.abort.fraction == 0.25
    assert fault.delay is not None and (fault.delay.seconds, fault.delay.fraction) == (0.25, 0.5)
    assert fault.max_active_faults == 3


def test_local_ratelimit_defaults_and_per_route() -> None:
    per_route = {
        "@type": RATELIMIT,
        "stat_prefix": "r",
        "token_bucket": {"max_tokens": 7, "fill_interval": "2s"},
        "filter_enabled": {"default_value": {"numerator": 100}},
    }
    listener = _load({"@type": RATELIMIT, "stat_prefix": "rl"}, per_route)
    limit = listener.filter.http_filters[0].config
    assert isinstance(limit, LocalRateLimit)
    assert (limit.bucket, limit.enabled, limit.enforced, limit.status) == (None, 0.0, 0.0, 429)
    route = listener.filter.route_config.virtual_hosts[0].routes[0]
    name, override = route.per_filter[0]
    assert name == "f" and isinstance(override, LocalRateLimit)
    assert override.bucket is not None
    assert (override.bucket.max_tokens, override.bucket.tokens_per_fill) == (7, 1)
    assert override.bucket.fill_interval == 2.0 and override.enabled == 1.0


@pytest.mark.parametrize(
    ("typed_config", "field"),
    [
        ({"@type": FAULT, "abort": {"grpc_status": 14}}, "abort.grpc_status"),
        ({"@type": FAULT, "abort": {"http_status": 99}}, "abort.http_status"),
        ({"@type": RATELIMIT}, "stat_prefix"),
        (
            {
                "@type": RATELIMIT,
                "stat_prefix": "x",
                "token_bucket": {"max_tokens": 1, "fill_interval": "0s"},
            },
            "token_bucket.fill_interval",
        ),
        (
            {
                "@type": RATELIMIT,
                "stat_prefix": "x",
                "request_headers_to_add_when_not_enforced": [
                    {"header": {"key": "a", "value": "b"}}
                ],
            },
            "request_headers_to_add_when_not_enforced",
        ),
    ],
)
def test_errors_name_the_field(typed_config: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(typed_config)
    assert "b.yaml" in str(caught.value)
    assert field in str(caught.value)
