"""Pilot's dashboard in a real browser: headless Chromium (Debian's ``chromium``, driven
by Playwright) on a real mesh with traffic flowing.

The mesh is the demo's shape on free ports: ``web`` and two versions of ``api`` behind
shoal proxy sidecars, configured by a real ``shoal pilot`` (80/20 canary rules); a load
thread calls web from outside the mesh and api through web's sidecar, with a few 503s and
slow requests so the numbers have something to show. Pilot scrapes the sidecars into its
embedded metrics store and serves the dashboard built from ``src/shoal/pilot/dashboard``.

Screenshots of every view go to the test's tmp dir and to ``$SHOAL_TEST_ARTIFACTS``
(default ``build/test-artifacts``), under ``dashboard/``.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import Echo, Proxy
from tests.integration.mesh_helpers import (
    PilotProcess,
    destination_rule,
    eventually,
    outbound_port,
    sidecar_config,
    to,
    virtual_service,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# No sandbox (root in a container), no GPU, and nothing that phones home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 1000}
LOAD_SECONDS = 200  # the load thread's hard limit; the test stops it long before
LOAD_INTERVAL = 0.04  # seconds between requests: about 25 per second in all


def artifacts_dir() -> Path:
    root = os.environ.get("SHOAL_TEST_ARTIFACTS") or str(REPO / "build" / "test-artifacts")
    path = Path(root) / "dashboard"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def dashboard_built() -> None:
    """dist/ up to date with the sources (a no-op after `make setup`)."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: the dashboard cannot be built (install nodejs)")
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_dashboard.py")],
        check=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def playwright_api() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium (apt-get install chromium; `make setup` does as root)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        yield playwright


@dataclass
class Load:
    """Requests into the mesh from a thread until stopped (or ``LOAD_SECONDS``): web
    from outside (its inbound listener), api through web's sidecar (outbound)."""

    web_inbound: int
    web_outbound: int
    stop: threading.Event = field(default_factory=threading.Event)
    sent: int = 0
    failed: int = 0

    def run(self) -> None:
        deadline = time.monotonic() + LOAD_SECONDS
        conns: dict[int, http.client.HTTPConnection] = {}
        for n in itertools.count():
            if self.stop.is_set() or time.monotonic() > deadline:
                break
            if n % 3 == 0:
                port, host, path = self.web_inbound, "web", f"/page/{n}"
            else:  # api: mostly fine, a few 503s and slow answers
                path = "/status/503" if n % 40 == 1 else "/delay/30" if n % 10 == 2 else "/orders"
                port, host = self.web_outbound, "api"
            try:
                conn = conns.get(port) or http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conns[port] = conn
                conn.request("GET", path, headers={"Host": host})
                conn.getresponse().read()
                self.sent += 1
            except (OSError, http.client.HTTPException):
                self.failed += 1
                conns.pop(port).close()
            time.sleep(LOAD_INTERVAL)
        for conn in conns.values():
            conn.close()


@dataclass
class Mesh:
    pilot: PilotProcess
    proxies: dict[str, Proxy]
    inbound: dict[str, str]  # each sidecar's inbound listener, HOST:PORT
    load: Load

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.pilot.http_port}"


@pytest.fixture
def mesh(pilot: PilotProcess, make_proxy: Any) -> Iterator[Mesh]:
    apps = {name: Echo(name) for name in ("web", "api-v1", "api-v2")}
    try:
        pilot.write_rules(
            "api.yaml",
            destination_rule("api", "version", "v1", "v2"),
            virtual_service("api", {"route": [to("api", "v1", 80), to("api", "v2", 20)]}),
        )
        proxies: dict[str, Proxy] = {}
        configs = {}
        for name, echo in apps.items():
            service, _, version = name.partition("-")
            configs[name] = sidecar_config(
                pilot,
                name,
                service=f"{service}:80",
                labels={"app": service, "version": version or "v1"},
                app_address=f"127.0.0.1:{echo.port}",
            )
            proxies[name] = make_proxy(configs[name])
        inbound = {name: c["node"]["metadata"]["INBOUND_ADDRESS"] for name, c in configs.items()}
        load = Load(int(inbound["web"].rpartition(":")[2]), outbound_port(configs["web"]))
        # both api versions answer through web's sidecar before the load starts
        eventually(lambda: _served(load.web_outbound, "api") == {"api-v1", "api-v2"}, 20)
        thread = threading.Thread(target=load.run, name="dashboard-load", daemon=True)
        thread.start()
        try:
            yield Mesh(pilot, proxies, inbound, load)
        finally:
            load.stop.set()
            thread.join(10)
    finally:
        for echo in apps.values():
            echo.stop()


def _served(port: int, host: str) -> set[str]:
    seen = set()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        for _ in range(30):
            conn.request("GET", "/", headers={"Host": host})
            response = conn.getresponse()
            response.read()
            seen.add(response.getheader("x-served-by", str(response.status)))
    finally:
        conn.close()
    return seen


class Shots:
    """Screenshots in the test's tmp dir, copied to the artifacts dir as they are taken."""

    def __init__(self, page: Any, tmp_path: Path) -> None:
        self.page = page
        self.local = tmp_path / "screenshots"
        self.local.mkdir()
        self.shared = artifacts_dir()
        for old in self.shared.glob("*.png"):  # a previous run's, failure.png included
            old.unlink()

    def take(self, name: str) -> Path:
        path = self.local / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        shutil.copyfile(path, self.shared / path.name)
        return path


def test_dashboard_shows_the_mesh_live(
    mesh: Mesh, dashboard_built: None, playwright_api: Any, tmp_path: Path
) -> None:
    # pilot has scraped traffic on both edges before the browser looks
    def edges() -> set[tuple[str, str]]:
        answer = mesh.pilot.get("/api/v1/edges?window=60s")[1]
        return {(e["source"], e["destination"]) for e in answer["edges"] if e["rps"] > 0}

    try:
        eventually(lambda: {("web", "api")} <= edges(), timeout=30, interval=0.5)
    except TimeoutError:
        answer = mesh.pilot.get("/api/v1/edges?window=60s")[1]
        raise AssertionError(f"no web → api edge with traffic in pilot's {answer}") from None

    browser = playwright_api.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    problems: list[str] = []
    try:
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(30_000)
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on(
            "console",
            lambda message: (
                problems.append(f"console {message.type}: {message.text}")
                if message.type == "error" and "404" not in message.text
                else None
            ),
        )
        shots = Shots(page, tmp_path)
        try:
            _check_views(page, mesh, shots)
        except BaseException:
            with contextlib.suppress(Exception):
                shots.take("failure")
            raise
    finally:
        browser.close()
    assert not problems, problems
    assert mesh.load.sent > 100, mesh.load


def _check_views(page: Any, mesh: Mesh, shots: Shots) -> None:
    # --- topology: the services and the web → api edge with its numbers -------------------
    page.goto(f"{mesh.url}/")
    page.wait_for_function(
        """() => {
            const g = window.shoal && window.shoal.graph;
            const edge = g && g.getElementById("web->api");
            return edge && edge.nonempty() && edge.data("rps") > 0;
        }"""
    )
    graph = page.evaluate(
        """() => {
            const g = window.shoal.graph;
            return {
                nodes: g.nodes().map((n) => n.id()),
                edges: g.edges().map((e) => [e.id(), e.data("label"), e.data("health")]),
                visible: g.nodes().every((n) => n.visible() && n.renderedBoundingBox().w > 20),
            };
        }"""
    )
    assert {"web", "api", "unknown"} <= set(graph["nodes"]), graph  # unknown: the load
    edge_labels = {edge_id: label for edge_id, label, _ in graph["edges"]}
    assert "web->api" in edge_labels, graph
    assert "rps" in edge_labels["web->api"] and "%" in edge_labels["web->api"], graph
    assert graph["visible"], graph
    table = page.locator("table.data").first
    assert table.locator("a", has_text="api").count() == 1
    page.wait_for_timeout(500)  # the last refresh drawn
    shots.take("topology")

    # --- a service page, reached by clicking its node on the canvas -------------------------
    x, y = page.evaluate(
        """() => {
            const g = window.shoal.graph;
            const at = g.getElementById("api").renderedPosition();
            const box = g.container().getBoundingClientRect();
            return [box.left + at.x, box.top + at.y];
        }"""
    )
    page.mouse.click(x, y)
    page.wait_for_url("**/#/service/api")
    page.select_option("#window", "60")  # the mesh is young: the last minute has the data
    page.wait_for_url("**/#/service/api?window=60")
    # a chart with data, then the same chart with newer points a few seconds later
    page.wait_for_function(
        """() => {
            const c = window.shoal.charts.rps;
            return c && c.data[0].length > 0 && c.data[1].some((v) => v > 0);
        }"""
    )
    last_time = "() => { const t = window.shoal.charts.rps.data[0]; return t[t.length - 1]; }"
    first = page.evaluate(last_time)
    page.wait_for_function(
        """(first) => {
            const t = window.shoal.charts.rps.data[0];
            return t.length > 0 && t[t.length - 1] > first;
        }""",
        arg=first,
        timeout=20_000,
    )
    latency = page.evaluate("() => window.shoal.charts.latency.data[2].filter((v) => v > 0).length")
    assert latency > 0, "the p99 line has no points"
    # endpoints: both api sidecars, and the live tap shows api's requests
    addresses = "section[aria-labelledby=ep-h] tbody td:first-child code"
    page.wait_for_function(f"() => document.querySelectorAll('{addresses}').length === 2")
    api_inbound = {mesh.inbound["api-v1"], mesh.inbound["api-v2"]}  # the sidecars register
    assert set(page.locator(addresses).all_inner_texts()) == api_inbound
    page.wait_for_function("() => document.querySelectorAll('table.tap tbody tr').length >= 3")
    tapped = page.locator("table.tap tbody tr").first.inner_text()
    assert "api" in tapped, tapped
    # traffic by route: the canary VirtualService's route, as web's sidecar counted it
    by_route = "section[aria-labelledby=traffic-h] tbody tr"
    page.wait_for_function(f"() => document.querySelectorAll('{by_route} td code').length >= 1")
    route_row = page.locator(by_route).first.inner_text()
    assert "api" in route_row and "%" in route_row, route_row
    shots.take("service-api")

    # --- tap: a live stream, filtered -----------------------------------------------------
    page.goto(f"{mesh.url}/#/tap?service=api&method=GET&max=40&duration=20")
    page.wait_for_function("() => document.querySelectorAll('table.tap tbody tr').length >= 5")
    rows = page.locator("table.tap tbody tr").all_inner_texts()
    assert all("GET" in row and "api" in row for row in rows), rows
    shots.take("tap")

    # --- rules: a broken file shows up as a validation error ------------------------------
    broken = virtual_service("api", {"route": [to("api", "v1", 60), to("api", "v2", 60)]})
    broken["metadata"]["name"] = "api-typo"
    mesh.pilot.write_rules("broken.yaml", broken)
    eventually(lambda: bool(mesh.pilot.debug()["rule_errors"]), timeout=10)
    page.goto(f"{mesh.url}/#/rules")
    page.wait_for_selector("ul.errors li")
    assert "broken.yaml" in page.locator("ul.errors").inner_text()
    shots.take("rules")

    # --- proxies: the three sidecars, scraped -------------------------------------------
    page.goto(f"{mesh.url}/#/proxies")
    page.wait_for_function(
        "() => document.querySelectorAll('main table.data tbody tr').length === 3"
    )
    text = page.locator("main table.data").inner_text()
    for name in mesh.proxies:
        assert name in text, text
    shots.take("proxies")
    (shots.shared / "run.json").write_text(
        json.dumps({"pilot": mesh.url, "requests_sent": mesh.load.sent, "at": time.time()}) + "\n"
    )
