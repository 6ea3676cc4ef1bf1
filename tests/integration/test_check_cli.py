"""`shoal check` against a real pilot and sidecar: all well, then each kind of problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import Echo
from tests.integration.mesh_helpers import (
    PilotProcess,
    eventually,
    outbound_port,
    served_by,
    sidecar_config,
)

pytestmark = pytest.mark.slow


def check(pilot: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`shoal check`, pointed at pilot through SHOAL_PILOT as users would."""
    return subprocess.run(
        [sys.executable, "-m", "shoal", "check", *args],
        env={**os.environ, "SHOAL_PILOT": pilot},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def failed(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    return {r["name"]: r["problem"] for r in json.loads(result.stdout) if not r["ok"]}


def test_check_reports_health_and_each_problem_with_a_fix(tmp_path: Path, make_proxy: Any) -> None:
    echo = Echo("app")
    pilot = PilotProcess(tmp_path)
    url = f"http://127.0.0.1:{pilot.http_port}"
    try:
        pilot.register("catalog", echo.port, service_port=80)
        config = sidecar_config(pilot, "shop")
        make_proxy(config)
        eventually(lambda: served_by(outbound_port(config), "catalog", 1) == {"app": 1})

        healthy = check(url)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert "✔ 1 xDS stream(s) in sync" in healthy.stdout

        pilot.deregister("orders", pilot.register("orders", 9, service_port=80))
        (Path(pilot.config_dir) / "bad.yaml").write_text(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
            "metadata: {name: x}\nspec: {hosts: [catalog], http: [{route: []}]}\n"
        )
        eventually(lambda: "traffic rules are valid" in failed(check(url, "-o", "json")))
        problems = failed(check(url, "-o", "json"))
        assert "bad.yaml" in problems["traffic rules are valid"]
        assert problems["every service has endpoints"] == "no endpoints: orders"
        text = check(url)
        assert text.returncode == 1
        assert "fix: fix the files named" in text.stdout
    finally:
        pilot.stop()
        echo.stop()

    down = check(url)
    assert down.returncode == 3  # unreachable, as for every command that asks pilot
    assert "✘ pilot is reachable" in down.stdout
    assert "fix: start it" in down.stdout
