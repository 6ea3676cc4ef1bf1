"""`shoal proxy-config` reads a sidecar's admin API: the same command against shoal proxy
and against Envoy, both driven by pilot."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from tests.conftest import Echo, EnvoyProxy, Proxy
from tests.integration.mesh_helpers import (
    PilotProcess,
    eventually,
    outbound_port,
    served_by,
    sidecar_config,
)

pytestmark = pytest.mark.slow


def proxy_config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal", "proxy-config", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def as_json(kind: str, admin: str) -> Any:
    result = proxy_config(kind, admin, "-o", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("kind", [Proxy, EnvoyProxy], ids=["shoal", "envoy"])
def test_proxy_config_shows_what_pilot_sent(
    pilot: PilotProcess, make_proxy: Any, kind: type[Proxy]
) -> None:
    echo = Echo("app")
    try:
        pilot.register("catalog", echo.port, service_port=80)
        config = sidecar_config(pilot, "shop")
        proxy = make_proxy(config, kind=kind)
        eventually(lambda: served_by(outbound_port(config), "catalog", 2) == {"app": 2})
        admin = f"127.0.0.1:{proxy.admin_port}"

        listeners = as_json("listeners", admin)
        assert {"name": "outbound", "address": f"127.0.0.1:{outbound_port(config)}",
                "origin": "dynamic"} in listeners  # fmt: skip
        clusters = {c["name"]: c for c in as_json("clusters", admin)}
        assert clusters["outbound|80||catalog"]["origin"] == "dynamic"
        assert clusters["xds-pilot"]["origin"] == "static"
        routes = as_json("routes", admin)
        assert {"table": "outbound", "domains": "catalog:80, catalog", "match": "/*",
                "cluster": "outbound|80||catalog"} in routes  # fmt: skip
        endpoints = as_json("endpoints", admin)
        assert {"endpoint": f"127.0.0.1:{echo.port}", "cluster": "outbound|80||catalog",
                "status": "HEALTHY", "weight": 1} in endpoints  # fmt: skip
        assert as_json("bootstrap", admin)["node"]["id"] == "shop"

        text = proxy_config("clusters", admin)
        assert text.returncode == 0
        assert text.stdout.splitlines()[0].split() == ["NAME", "TYPE", "ORIGIN"]
    finally:
        echo.stop()


def test_an_unreachable_admin_is_one_clear_line() -> None:
    result = proxy_config("clusters", "127.0.0.1:9")
    assert result.returncode == 1
    assert result.stderr.startswith("shoal proxy-config: cannot read http://127.0.0.1:9/")
    assert len(result.stderr.strip().splitlines()) == 1
