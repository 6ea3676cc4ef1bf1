"""`shoal stat` and `shoal top`, and pilot's metrics API, on a running mesh: a real pilot
scraping every second, two shoal sidecars it drives (productpage calls reviews), echo
apps behind them, and traffic with a known share of failures. The same API answered from
a real Prometheus (Debian's ``prometheus``) with ``shoal pilot --prometheus``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.conftest import Echo, Proxy, free_port
from tests.integration.mesh_helpers import (
    PilotProcess,
    eventually,
    outbound_port,
    served_by,
    sidecar_config,
    virtual_service,
)
from tests.integration.prometheus_server import Prometheus

pytestmark = pytest.mark.slow

WINDOW = "5m"  # wide enough that no test sees the traffic leave the window


def shoal(pilot: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """A `shoal` command, pointed at pilot through SHOAL_PILOT as users would."""
    return subprocess.run(
        [sys.executable, "-m", "shoal", *args],
        env={**os.environ, "SHOAL_PILOT": pilot, "COLUMNS": "120"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            status, text = answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


class TelemetryMesh:
    """productpage → reviews, both behind shoal sidecars driven by one pilot (scraping
    every second); ratings is registered without a sidecar. reviews has a VirtualService
    with two routes: ``errors`` (``/status``) and an unnamed one (``reviews-1``), each with
    its own stats. Stopped by PID."""

    def __init__(self, workdir: Path) -> None:
        self.apps: dict[str, Echo] = {}
        self.sidecars: dict[str, Proxy] = {}
        self.pilot = PilotProcess(workdir, options=("--scrape-interval", "1s"))
        try:
            self.url = f"http://127.0.0.1:{self.pilot.http_port}"
            for name in ("productpage", "reviews", "ratings"):
                self.apps[name] = Echo(name)
            self.pilot.register("ratings", self.apps["ratings"].port, service_port=9080)
            to_reviews = [{"destination": {"host": "reviews"}}]
            self.pilot.write_rules(
                "reviews.yaml",
                virtual_service(
                    "reviews",
                    {
                        "name": "errors",
                        "match": [{"uri": {"prefix": "/status"}}],
                        "route": to_reviews,
                    },
                    {"route": to_reviews},
                ),
            )
            configs = {}
            for name in ("productpage", "reviews"):
                configs[name] = sidecar_config(
                    self.pilot,
                    f"{name}-1",
                    service=f"{name}:9080",
                    app_address=f"127.0.0.1:{self.apps[name].port}",
                    labels={"app": name, "version": "v1"},
                )
                (workdir / name).mkdir()
                self.sidecars[name] = Proxy(configs[name], workdir / name)
            self.outbound = outbound_port(configs["productpage"])
            inbound = configs["reviews"]["node"]["metadata"]["INBOUND_ADDRESS"]
            self.reviews_inbound = int(inbound.rpartition(":")[2])
            # routes and endpoints in place, and every sidecar scraped once, before any
            # request: then every request is counted, from its series' first one
            front = self.sidecars["productpage"]
            eventually(
                lambda: all(
                    f"outbound|9080||{host}::127.0.0.1:" in front.admin("/clusters")[1]
                    for host in ("reviews", "ratings")
                ),
                timeout=15,
            )
            eventually(
                lambda: "vhost.reviews:9080.route.errors.upstream_rq_total" in front.stats(),
                timeout=15,
            )
            eventually(lambda: all(p["scrape_ok"] for p in self.proxies()) and self.proxies())
        except BaseException:
            self.stop()
            raise

    def proxies(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = get(f"{self.url}/api/v1/proxies")[1]["proxies"]
        return rows

    def traffic(self, count: int) -> None:
        """``count`` requests to reviews through productpage's sidecar, every fifth one to
        a path that answers 500: a success rate of 0.8."""
        for n in range(count):
            path = "/status/500" if n % 5 == 0 else f"/reviews/{n}"
            seen = served_by(self.outbound, "reviews:9080", 1, path=path)
            assert seen == ({"500": 1} if n % 5 == 0 else {"reviews": 1}), seen

    def stop(self) -> None:
        for proxy in self.sidecars.values():
            proxy.stop()
        for app in self.apps.values():
            app.stop()
        self.pilot.stop()


def routes_of(mesh: TelemetryMesh) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = get(f"{mesh.url}/api/v1/stat?window={WINDOW}&by=route")[1][
        "routes"
    ]
    return rows


def stat_of(mesh: TelemetryMesh, service: str) -> dict[str, Any] | None:
    answer = get(f"{mesh.url}/api/v1/stat?window={WINDOW}&service={service}")[1]
    return next(iter(answer["services"]), None)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TelemetryMesh]:
    running = TelemetryMesh(tmp_path_factory.mktemp("mesh"))
    try:
        running.traffic(100)
        assert served_by(running.outbound, "ratings:9080", 10) == {"ratings": 10}
        # callers outside the mesh, straight to reviews' sidecar: 2 of 10 fail too
        for n in range(10):
            served_by(running.reviews_inbound, "reviews", 1, path="/status/500" if n < 2 else "/")
        eventually(lambda: (stat_of(running, "reviews") or {}).get("requests") == 110)
        eventually(lambda: (stat_of(running, "ratings") or {}).get("requests") == 10)
        eventually(lambda: [r["requests"] for r in routes_of(running)] == [10, 20, 80])
        yield running
    finally:
        running.stop()


def test_stat_json_has_success_rate_rps_and_latency(mesh: TelemetryMesh) -> None:
    result = shoal(mesh.url, "stat", "--window", WINDOW, "-o", "json")
    assert result.returncode == 0, result.stderr
    rows = {row["service"]: row for row in json.loads(result.stdout)}
    # reviews from its own sidecar: the 100 calls from productpage and 10 from outside
    reviews = rows["reviews"]
    assert reviews["success_rate"] == 0.8
    assert reviews["requests"] >= 110 and reviews["rps"] > 0
    assert 0 < reviews["p50_ms"] <= reviews["p95_ms"] <= reviews["p99_ms"]
    assert reviews["protocol"] == "http"
    # ratings has no sidecar: its callers' numbers
    ratings = rows["ratings"]
    assert (ratings["success_rate"], ratings["requests"]) == (1.0, 10)
    assert set(ratings) >= {"service", "success_rate", "rps", "p50_ms", "p95_ms", "p99_ms"}


def test_stat_table_filter_and_exit_statuses(mesh: TelemetryMesh) -> None:
    result = shoal(mesh.url, "stat", "reviews", "-w", WINDOW)
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.split() == [
        "SERVICE",
        "SUCCESS",
        "RPS",
        "LATENCY_P50",
        "LATENCY_P95",
        "LATENCY_P99",
    ]
    assert len(lines) == 1 and lines[0].split()[:2] == ["reviews", "80.00%"]

    as_yaml = shoal(mesh.url, "stat", "ratings", "-w", WINDOW, "-o", "yaml")
    assert [row["service"] for row in yaml.safe_load(as_yaml.stdout)] == ["ratings"]

    absent = shoal(mesh.url, "stat", "nosuch", "-w", WINDOW)
    assert absent.returncode == 1 and absent.stdout == ""
    assert "no metrics for nosuch in the last 5m" in absent.stderr

    too_long = shoal(mesh.url, "stat", "-w", "1h")  # longer than the store keeps
    assert too_long.returncode == 2
    assert "longer than the metrics retention (15m)" in too_long.stderr
    assert "--prometheus" in too_long.stderr

    usage = shoal(mesh.url, "stat", "-w", "soon")
    assert usage.returncode == 2 and "expected a duration such as 10s" in usage.stderr


def test_stat_routes_per_route_success_rate_and_rps(mesh: TelemetryMesh) -> None:
    """Per-route rows from the callers' sidecars (productpage's outbound routes): the
    VirtualService's ``errors`` route got every 500, its other route none; ratings, with
    no VirtualService, has pilot's ``default`` route. The calls from outside the mesh,
    straight to reviews' sidecar, took no outbound route."""
    result = shoal(mesh.url, "stat", "--routes", "--window", WINDOW, "-o", "json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["service"], r["route"], r["requests"]) for r in rows] == [
        ("ratings", "default", 10),
        ("reviews", "errors", 20),
        ("reviews", "reviews-1", 80),
    ]
    by_route = {r["route"]: r for r in rows}
    errors, ok = by_route["errors"], by_route["reviews-1"]
    assert (errors["success_rate"], ok["success_rate"]) == (0.0, 1.0)
    assert by_route["default"]["success_rate"] == 1.0
    assert ok["rps"] == pytest.approx(80 / 300, abs=0.001) and errors["rps"] > 0
    for row in rows:
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert set(row) == {
            "service",
            "route",
            "success_rate",
            "rps",
            "p50_ms",
            "p95_ms",
            "p99_ms",
            "requests",
            "virtual_host",
        }
    assert errors["virtual_host"] == "reviews:9080"

    table = shoal(mesh.url, "stat", "reviews", "-r", "-w", WINDOW)
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split() == [
        "SERVICE",
        "ROUTE",
        "SUCCESS",
        "RPS",
        "LATENCY_P50",
        "LATENCY_P95",
        "LATENCY_P99",
    ]
    assert [line.split()[:3] for line in lines] == [
        ["reviews", "errors", "0.00%"],
        ["reviews", "reviews-1", "100.00%"],
    ]

    absent = shoal(mesh.url, "stat", "productpage", "--routes", "-w", WINDOW)
    assert absent.returncode == 1 and absent.stdout == ""
    assert "no per-route metrics for productpage in the last 5m" in absent.stderr


def test_top_once_shows_the_busiest_edge_first(mesh: TelemetryMesh) -> None:
    result = shoal(mesh.url, "top", "--once", "-w", WINDOW)
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines() if "→" in line]
    assert lines[0][:3] == ["productpage", "→", "reviews"], result.stdout
    assert lines[0][4] == "80.00%"
    assert ["productpage", "→", "ratings"] in [line[:3] for line in lines]
    assert ["unknown", "→", "reviews"] in [line[:3] for line in lines]

    as_json = json.loads(shoal(mesh.url, "top", "-w", WINDOW, "-o", "json").stdout)
    assert (as_json[0]["source"], as_json[0]["destination"]) == ("productpage", "reviews")
    assert as_json == sorted(as_json, key=lambda e: -e["rps"])


def test_the_api_the_dashboard_reads(mesh: TelemetryMesh) -> None:
    status, stat = get(f"{mesh.url}/api/v1/stat?window={WINDOW}")
    assert status == 200
    assert (stat["window_s"], stat["source"]) == (300, "embedded")
    assert [s["service"] for s in stat["services"]] == ["ratings", "reviews"]
    assert set(stat["services"][0]) == {
        "service",
        "success_rate",
        "rps",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "requests",
        "protocol",
    }

    status, edges = get(f"{mesh.url}/api/v1/edges?window={WINDOW}")
    assert status == 200
    assert edges["nodes"] == [
        {"id": "productpage", "kind": "workload"},
        {"id": "ratings", "kind": "service"},
        {"id": "reviews", "kind": "service"},
        {"id": "unknown", "kind": "unknown"},
    ]
    edge = {(e["source"], e["destination"]): e for e in edges["edges"]}
    assert set(edge) == {
        ("productpage", "reviews"),
        ("productpage", "ratings"),
        ("unknown", "reviews"),
    }
    assert edge["productpage", "reviews"]["success_rate"] == 0.8
    assert edge["unknown", "reviews"]["success_rate"] == 0.8
    assert set(edge["productpage", "reviews"]) == {
        "source",
        "destination",
        "rps",
        "success_rate",
        "p99_ms",
    }

    status, series = get(f"{mesh.url}/api/v1/series?service=reviews&window=300s&step=5s")
    assert status == 200 and series["service"] == "reviews"
    points = series["points"]
    assert len(points) == 60
    assert [p["t"] for p in points] == sorted(p["t"] for p in points)
    assert abs(points[-1]["t"] - time.time()) < 5
    busy = [p for p in points if p["rps"] > 0]
    assert busy and all(0 <= p["success_rate"] <= 1 and p["p99_ms"] >= p["p50_ms"] for p in busy)

    proxies = get(f"{mesh.url}/api/v1/proxies")[1]
    assert [(p["node_id"], p["service"], p["user_agent"]) for p in proxies["proxies"]] == [
        ("productpage-1", "productpage", "shoal"),
        ("reviews-1", "reviews", "shoal"),
    ]
    for proxy in proxies["proxies"]:
        port = mesh.sidecars[proxy["service"]].admin_port
        assert proxy["admin_address"] == f"127.0.0.1:{port}"
        assert proxy["labels"] == {"app": proxy["service"], "version": "v1"}
        assert proxy["scrape_ok"] is True and proxy["scrape_error"] is None
        assert time.time() - proxy["last_scrape"] < 5
    assert proxies["series"] > 0 and proxies["series_dropped"] == 0

    assert get(f"{mesh.url}/api/v1/stat?window=1m&by=method") == (
        400,
        {"error": "by must be service or route, not 'method'"},
    )
    assert get(f"{mesh.url}/api/v1/stat?window=1m&route=x") == (
        400,
        {"error": "unknown parameter 'route' (known: window, service, by)"},
    )
    status, routes = get(f"{mesh.url}/api/v1/stat?window={WINDOW}&by=route&service=reviews")
    assert status == 200 and (routes["window_s"], routes["source"]) == (300, "embedded")
    assert [r["route"] for r in routes["routes"]] == ["errors", "reviews-1"]
    assert get(f"{mesh.url}/api/v1/series?window=1m")[0] == 400
    assert get(f"{mesh.url}/api/v1/series?service=x&window=1m&step=10ms")[0] == 400
    status, page = get(f"{mesh.url}/")  # the dashboard, or why it is not there
    assert status == 200 or (status, page) == (404, "dashboard not built: run make setup\n")


def test_a_proxy_that_stops_answering_is_marked_and_skipped(tmp_path: Path) -> None:
    mesh = TelemetryMesh(tmp_path)
    try:
        reviews = mesh.sidecars["reviews"]
        reviews.proc.send_signal(19)  # SIGSTOP: its xDS stream stays, its admin is silent
        try:
            eventually(
                lambda: [p["scrape_ok"] for p in mesh.proxies()] == [True, False], timeout=15
            )
            stuck = mesh.proxies()[1]
            assert stuck["scrape_error"] == "timed out"
            # the API still answers at once
            started = time.monotonic()
            assert shoal(mesh.url, "stat", "-o", "json").returncode == 0
            assert time.monotonic() - started < 5
        finally:
            reviews.proc.send_signal(18)  # SIGCONT
        eventually(lambda: all(p["scrape_ok"] for p in mesh.proxies()), timeout=15)
    finally:
        mesh.stop()


def test_pilot_unreachable() -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    for args in (("stat",), ("top", "--once"), ("tap", "reviews", "-d", "1s")):
        result = shoal(nowhere, *args)
        assert result.returncode == 3, (args, result.stderr)
        assert result.stderr.startswith(f"shoal {args[0]}: cannot reach pilot at {nowhere}")
        assert "--pilot URL or $SHOAL_PILOT" in result.stderr


def test_the_same_api_from_a_real_prometheus(mesh: TelemetryMesh, tmp_path: Path) -> None:
    targets = [f"127.0.0.1:{proxy.admin_port}" for proxy in mesh.sidecars.values()]
    prometheus = Prometheus(tmp_path, targets)
    reader = PilotProcess(
        tmp_path,
        xds_port=free_port(),
        options=("--prometheus", f"http://127.0.0.1:{prometheus.port}"),
    )
    url = f"http://127.0.0.1:{reader.http_port}"
    try:
        # increase() counts from a series' first sample on: every sidecar scraped once
        # (Prometheus starts scraping a few seconds after it is ready)
        eventually(lambda: prometheus.value("sum(up)") == 2, timeout=30)
        mesh.traffic(50)
        eventually(lambda: (stat_from(url, "reviews") or {}).get("requests", 0) >= 40, timeout=20)

        result = shoal(url, "stat", "-w", "1m", "-o", "json")
        assert result.returncode == 0, result.stderr
        rows = {row["service"]: row for row in json.loads(result.stdout)}
        reviews = rows["reviews"]
        assert reviews["success_rate"] == pytest.approx(0.8, abs=0.05)
        assert reviews["rps"] > 0
        assert 0 < reviews["p50_ms"] <= reviews["p95_ms"] <= reviews["p99_ms"]
        assert get(f"{url}/api/v1/stat?window=1m")[1]["source"] == "prometheus"

        # each sidecar's series count once Prometheus has two samples of them
        def edge() -> dict[str, Any] | None:
            graph = get(f"{url}/api/v1/edges?window=1m")[1]
            found = (e for e in graph["edges"] if e["source"] == "productpage")
            return next((e for e in found if e["destination"] == "reviews"), None)

        eventually(lambda: edge() is not None)
        calls = edge()
        assert calls is not None and calls["rps"] > 0 and calls["success_rate"] is not None

        series = get(f"{url}/api/v1/series?service=reviews&window=60s&step=5s")[1]
        assert len(series["points"]) == 12
        assert any(p["rps"] > 0 and p["p99_ms"] is not None for p in series["points"])

        top = shoal(url, "top", "--once", "-w", "1m")
        assert ["productpage", "→", "reviews"] in [
            line.split()[:3] for line in top.stdout.splitlines()
        ]

        # per route: Envoy's route stats, by the virtual host and route tags (this pilot
        # has no services: a route's service is its virtual host's name without the port)
        def routes() -> dict[str, dict[str, Any]]:
            answer = get(f"{url}/api/v1/stat?window=1m&by=route&service=reviews")[1]
            return {row["route"]: row for row in answer["routes"]}

        eventually(lambda: set(routes()) == {"errors", "reviews-1"}, timeout=20)
        by_route = routes()
        assert by_route["errors"]["success_rate"] == 0.0
        assert by_route["reviews-1"]["success_rate"] == 1.0
        assert by_route["reviews-1"]["rps"] > 0 and by_route["reviews-1"]["p99_ms"] > 0
        via_cli = shoal(url, "stat", "--routes", "-w", "1m", "-o", "json")
        assert via_cli.returncode == 0, via_cli.stderr
        assert {(r["service"], r["route"]) for r in json.loads(via_cli.stdout)} >= {
            ("reviews", "errors"),
            ("reviews", "reviews-1"),
        }
    finally:
        reader.stop()
        prometheus.stop()


def stat_from(url: str, service: str) -> dict[str, Any] | None:
    answer = get(f"{url}/api/v1/stat?window=1m&service={service}")[1]
    return next(iter(answer["services"]), None)


def test_prometheus_unreachable_or_misnamed(tmp_path: Path) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    reader = PilotProcess(tmp_path, options=("--prometheus", nowhere))
    try:
        result = shoal(f"http://127.0.0.1:{reader.http_port}", "stat")
        assert result.returncode == 1
        assert result.stderr == f"shoal stat: Prometheus at {nowhere}: Connection refused\n"
    finally:
        reader.stop()
    pilot = [sys.executable, "-m", "shoal", "pilot", "--config-dir", str(tmp_path)]
    pilot += ["--registry", f"embedded:{tmp_path / 'registry.db'}"]
    misnamed = subprocess.run(
        [*pilot, "--xds-address", f"127.0.0.1:{free_port()}", "--prometheus", "prom:9090"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert misnamed.returncode == 1
    assert "--prometheus: expected an http:// or https:// URL" in misnamed.stderr
