"""`shoal bootstrap` prints a file that both shoal proxy and real Envoy accept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.conftest import find_envoy

from shoal.config.envoy import bootstrap_from_dict


def test_bootstrap_runs_on_shoal_and_validates_on_envoy(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "shoal", "bootstrap", "--service", "api:80", "--delta"]
    command += ["--app-address", "127.0.0.1:8080", "--label", "version=v1"]
    command += ["--rpc-outbound-address", "127.0.0.1:15002"]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=True,
    )
    config = yaml.safe_load(result.stdout)
    metadata = config["node"]["metadata"]
    assert metadata["SERVICE"] == "api:80"
    assert metadata["LABELS"] == {"version": "v1"}
    assert metadata["APP_ADDRESS"] == "127.0.0.1:8080"
    assert metadata["RPC_OUTBOUND_ADDRESS"] == "127.0.0.1:15002"
    bootstrap = bootstrap_from_dict(config, source="stdout")
    assert bootstrap.ads is not None
    assert bootstrap.ads.delta
    assert bootstrap.ads.cluster == "xds-pilot"
    envoy = find_envoy()
    if envoy is None:
        pytest.skip("no Envoy binary")
    path = tmp_path / "bootstrap.yaml"
    path.write_text(result.stdout)
    check = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "error"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_bad_label_is_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shoal", "bootstrap", "--label", "novalue"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "expected KEY=VALUE" in result.stderr
