"""Proxyless gRPC: a grpcio client dialling ``xds:///greeter:50051`` gets its listener,
routes, clusters and endpoints from pilot, with no Shoal metadata and no sidecar."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from tests.conftest import free_port, stop_process, wait_for_port
from tests.integration.mesh_helpers import (
    PilotProcess,
    destination_rule,
    eventually,
    to,
    virtual_service,
)

pytestmark = pytest.mark.slow

TARGET = "greeter:50051"


class GrpcServer:
    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        command = [sys.executable, "-m", "tests.integration.grpc_apps.server"]
        self.proc = subprocess.Popen([*command, "--port", str(self.port), "--name", name])
        wait_for_port(self.port)


@pytest.fixture
def servers() -> Iterator[dict[str, GrpcServer]]:
    started = {name: GrpcServer(name) for name in ("a", "b", "c", "d")}
    yield started
    for server in started.values():
        stop_process(server.proc)


CLIENT = [sys.executable, "-m", "tests.integration.grpc_apps.client", TARGET]


def client_env(pilot: PilotProcess, node_id: str) -> dict[str, str]:
    """gRPC's xDS bootstrap, inline: pilot as the only server, no node metadata."""
    server = {
        "server_uri": f"127.0.0.1:{pilot.xds_port}",
        "channel_creds": [{"type": "insecure"}],
        "server_features": ["xds_v3"],
    }
    bootstrap = {"xds_servers": [server], "node": {"id": node_id}}
    return {**os.environ, "GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(bootstrap)}


def client(pilot: PilotProcess, *args: str) -> dict[str, Any]:
    """Run one client process (gRPC's xDS client caches per process)."""
    result = subprocess.run(
        [*CLIENT, *args],
        env=client_env(pilot, "grpc-client-1"),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:] + pilot.output()[-3000:]
    return dict(json.loads(result.stdout))


def register(pilot: PilotProcess, server: GrpcServer, version: str) -> str:
    return pilot.register(
        "greeter", server.port, {"version": version}, service_port=50051, protocol="GRPC"
    )


def test_proxyless_grpc_balances_follows_routes_and_sees_endpoint_changes(
    pilot: PilotProcess, servers: dict[str, GrpcServer]
) -> None:
    register(pilot, servers["a"], "v1")
    register(pilot, servers["b"], "v1")
    register(pilot, servers["c"], "v2")

    # no rules: every endpoint, round robin (once every connection is up)
    counts = client(pilot, "--calls", "60", "--warmup", "30")
    assert set(counts) == {"a", "b", "c"}, counts
    assert all(15 <= n <= 25 for n in counts.values()), counts

    # weighted 75/25 between the subsets, and a header route to v2
    pilot.write_rules(
        "greeter.yaml",
        destination_rule("greeter", "version", "v1", "v2"),
        virtual_service(
            "greeter",
            {
                "match": [{"headers": {"x-user": {"exact": "jason"}}}],
                "route": [to("greeter", "v2")],
            },
            {"route": [to("greeter", "v1", 75), to("greeter", "v2", 25)]},
        ),
    )
    eventually(lambda: client(pilot, "--calls", "10", "--header", "x-user=jason") == {"c": 10})
    counts = client(pilot, "--calls", "800")
    assert counts["a"] + counts["b"] + counts["c"] == 800, counts
    assert abs(counts["c"] / 800 - 0.25) <= 0.05, counts
    assert abs(counts["a"] - counts["b"]) <= 0.1 * 800, counts

    # a new v1 endpoint registered while a client runs is picked up live
    waiting = subprocess.Popen(
        [*CLIENT, "--until", "d"], env=client_env(pilot, "grpc-client-2"), stdout=subprocess.PIPE
    )
    try:
        client(pilot, "--calls", "3")  # give the waiting client time to be connected
        register(pilot, servers["d"], "v1")
        out, _ = waiting.communicate(timeout=30)
    finally:
        stop_process(waiting)
    assert waiting.returncode == 0
    assert json.loads(out)["seconds"] < 20
    assert pilot.debug()["nacks"] == 0, pilot.output()[-5000:]
