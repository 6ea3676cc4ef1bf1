"""Registries behind pilot: services registered, changed and removed in a real etcd and a
real ZooKeeper (Dubbo's layout) reach a connected sidecar."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from pathlib import Path
from typing import Any

import aetcd
import pytest
from kazoo.client import KazooClient
from tests.conftest import Echo
from tests.integration.mesh_helpers import (
    PilotProcess,
    eventually,
    outbound_port,
    served_by,
    sidecar_config,
)
from tests.integration.registry_servers import start_etcd, start_zookeeper

pytestmark = pytest.mark.slow


def etcd_put(endpoint: str, key: str, value: Any | None) -> None:
    """Write (or, with None, delete) one key, as any etcd client would."""

    async def write() -> None:
        host, _, port = endpoint.rpartition(":")
        async with aetcd.Client(host, int(port)) as client:
            if value is None:
                await client.delete(key.encode())
            else:
                await client.put(key.encode(), json.dumps(value).encode())

    asyncio.run(write())


def test_etcd_registrations_reach_a_sidecar(tmp_path: Path, make_proxy: Any) -> None:
    echoes = {name: Echo(name) for name in ("a", "b", "c")}
    try:
        with start_etcd(tmp_path / "etcd") as endpoint:
            etcd_put(endpoint, "/mesh/services/catalog", {"ports": [{"number": 80}]})
            etcd_put(
                endpoint,
                "/mesh/instances/catalog/one",
                {"address": "127.0.0.1", "port": echoes["a"].port},
            )
            pilot = PilotProcess(tmp_path, f"etcd://{endpoint}/mesh")
            try:
                config = sidecar_config(pilot, "shop")
                make_proxy(config)
                port = outbound_port(config)
                eventually(lambda: served_by(port, "catalog", 4) == {"a": 4})

                two = {"address": "127.0.0.1", "port": echoes["b"].port}
                etcd_put(endpoint, "/mesh/instances/catalog/two", two)  # registration
                eventually(lambda: set(served_by(port, "catalog", 10)) == {"a", "b"})

                two["port"] = echoes["c"].port  # change
                etcd_put(endpoint, "/mesh/instances/catalog/two", two)
                eventually(lambda: set(served_by(port, "catalog", 10)) == {"a", "c"})

                etcd_put(endpoint, "/mesh/instances/catalog/one", None)  # removal
                eventually(lambda: served_by(port, "catalog", 10) == {"c": 10})
            finally:
                pilot.stop()
    finally:
        for echo in echoes.values():
            echo.stop()


DEMO = "org.apache.dubbo.demo.DemoService"


def provider_url(port: int, version: str) -> str:
    return (
        f"dubbo://127.0.0.1:{port}/{DEMO}?anyhost=true&application=demo-provider"
        f"&interface={DEMO}&methods=sayHello&side=provider&version={version}"
    )


def cluster_hosts(proxy: Any, cluster: str) -> set[str]:
    """The hosts of ``cluster`` in the sidecar's /clusters (Envoy's text format)."""
    lines = proxy.admin("/clusters")[1].splitlines()
    return {
        line.split("::")[1]
        for line in lines
        if line.startswith(f"{cluster}::") and "::weight::" in line
    }


def test_dubbo_providers_in_zookeeper_reach_a_sidecar(tmp_path: Path, make_proxy: Any) -> None:
    with start_zookeeper(tmp_path / "zookeeper") as hosts:
        pilot = PilotProcess(tmp_path, f"zookeeper://{hosts}/dubbo")
        dubbo = KazooClient(hosts=hosts)
        dubbo.start(timeout=10)
        try:
            config = sidecar_config(pilot, "consumer")
            proxy = make_proxy(config)
            parent = f"/dubbo/{DEMO}/providers"
            dubbo.ensure_path(parent)
            first = dubbo.create(
                f"{parent}/{urllib.parse.quote_plus(provider_url(20881, '1.0.0'), safe='')}",
                ephemeral=True,
            )
            cluster = f"outbound|20880||{DEMO}"
            eventually(lambda: cluster_hosts(proxy, cluster) == {"127.0.0.1:20881"})
            dubbo.create(
                f"{parent}/{urllib.parse.quote_plus(provider_url(20882, '1.0.1'), safe='')}",
                ephemeral=True,
            )
            eventually(
                lambda: cluster_hosts(proxy, cluster) == {"127.0.0.1:20881", "127.0.0.1:20882"}
            )
            dubbo.delete(first)
            eventually(lambda: cluster_hosts(proxy, cluster) == {"127.0.0.1:20882"})
            services = {s["host"]: s for s in pilot.debug()["services"]}
            labels = services[DEMO]["instances"][0]["labels"]
            assert labels["version"] == "1.0.1"
            assert labels["protocol"] == "dubbo"
        finally:
            dubbo.stop()
            dubbo.close()
            pilot.stop()
