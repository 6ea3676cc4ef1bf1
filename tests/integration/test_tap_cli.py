"""`shoal tap` and pilot's merged tap (``/api/v1/tap``) on a running mesh: the records of
every sidecar that sees a request, while traffic flows."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.integration.mesh_helpers import PilotProcess, eventually, served_by
from tests.integration.test_stat_cli import TelemetryMesh, get, shoal

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TelemetryMesh]:
    running = TelemetryMesh(tmp_path_factory.mktemp("mesh"))
    yield running
    running.stop()


@pytest.fixture
def traffic(mesh: TelemetryMesh) -> Iterator[None]:
    """Requests to reviews through productpage's sidecar until the test ends (every fifth
    answers 500)."""
    done = threading.Event()

    def send() -> None:
        while not done.is_set():
            mesh.traffic(5)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    yield
    done.set()
    sender.join(10)


def records(url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(url, timeout=30) as stream:
        assert stream.headers["content-type"] == "application/x-ndjson"
        return [json.loads(line) for line in stream]


@pytest.mark.usefixtures("traffic")
def test_tap_json_returns_max_records_while_traffic_flows(mesh: TelemetryMesh) -> None:
    result = shoal(mesh.url, "tap", "reviews", "-o", "json", "--max", "5", "-d", "20s")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 5
    for record in map(json.loads, lines):
        assert record["proxy"] in ("productpage-1", "reviews-1")
        assert record["direction"] in ("outbound", "inbound")
        assert record["method"] == "GET" and record["authority"] == "reviews:9080"
        assert record["path"].startswith(("/reviews/", "/status/500"))
        assert record["status"] == (500 if record["path"] == "/status/500" else 200)
        assert record["duration_ms"] >= 0


@pytest.mark.usefixtures("traffic")
def test_tap_table_and_both_sides_of_each_call(mesh: TelemetryMesh) -> None:
    result = shoal(mesh.url, "tap", "reviews", "--max", "4")
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.split() == [
        "PROXY",
        "DIRECTION",
        "METHOD",
        "STATUS",
        "LATENCY",
        "AUTHORITY",
        "PATH",
    ]
    assert len(lines) == 4
    assert all(line.split()[2:3] == ["GET"] and line.split()[4].endswith("ms") for line in lines)

    # a call between two sidecars is seen at both: outbound at the caller, inbound at reviews
    seen = records(f"{mesh.url}/api/v1/tap?service=reviews&max=40&duration=20")
    assert seen[-1] == {"dropped": 0}
    sides = {(r["proxy"], r["direction"]) for r in seen[:-1]}
    assert sides == {("productpage-1", "outbound"), ("reviews-1", "inbound")}

    failed = records(f"{mesh.url}/api/v1/tap?service=reviews&path_prefix=/status&max=3")
    assert [r["status"] for r in failed[:-1]] == [500, 500, 500]


def test_tap_ends_when_the_client_leaves_and_when_nothing_comes(mesh: TelemetryMesh) -> None:
    # nothing to see for a second: exit status 1, and the proxies' taps closed
    result = shoal(mesh.url, "tap", "reviews", "-d", "1s")
    assert result.returncode == 1 and result.stdout.split() == [
        "PROXY",
        "DIRECTION",
        "METHOD",
        "STATUS",
        "LATENCY",
        "AUTHORITY",
        "PATH",
    ]
    assert result.stderr == "shoal tap: no requests to reviews in 1s\n"

    # a client that leaves mid-stream: pilot closes every proxy's tap at once
    stream = urllib.request.urlopen(f"{mesh.url}/api/v1/tap?service=reviews&duration=60")
    eventually(lambda: all(p.stats()["server.taps_active"] == 1 for p in mesh.sidecars.values()))
    stream.close()
    eventually(lambda: all(p.stats()["server.taps_active"] == 0 for p in mesh.sidecars.values()))
    served_by(mesh.outbound, "reviews:9080", 1)  # the sidecars are none the worse


def test_tap_refusals(mesh: TelemetryMesh, tmp_path: Path) -> None:
    assert get(f"{mesh.url}/api/v1/tap?service=reviews&max=0") == (
        400,
        {"error": "max must be a positive number, not '0'"},
    )
    status, answer = get(f"{mesh.url}/api/v1/tap?servce=reviews")
    assert status == 400 and answer["error"].startswith("unknown parameter 'servce'")

    bad = shoal(mesh.url, "tap", "reviews", "--max", "0")
    assert bad.returncode == 2 and "expected a positive whole number" in bad.stderr

    empty = PilotProcess(tmp_path)  # no sidecars: nothing to tap
    try:
        alone = shoal(f"http://127.0.0.1:{empty.http_port}", "tap", "reviews")
        assert alone.returncode == 1
        assert "no connected proxy has an admin address to tap" in alone.stderr
    finally:
        empty.stop()
