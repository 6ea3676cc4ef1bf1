"""``make demo``: a local mesh on pilot's embedded registry, every hop through a sidecar.

    client ──► [web's sidecar: outbound] ──► [api-v1's or api-v2's sidecar: inbound] ──► api
                        ▲                              ▲
                        └──── xDS from shoal pilot ────┘  (registry + Istio rules)

``shoal pilot`` runs with its embedded registry; each app gets a ``shoal proxy`` sidecar
whose bootstrap (``shoal bootstrap``) names its service, labels and app, so pilot registers
it as an endpoint and configures it over xDS. A DestinationRule and a VirtualService send
80% of api's traffic to v1 and 20% to v2 (a canary). The client calls api through web's
sidecar; the output shows which version answered, and the split so far.
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from shoal.pilot.bootstrap import sidecar_bootstrap

BASE_PORT = 15100
PILOT_XDS, PILOT_HTTP = BASE_PORT, BASE_PORT + 1
APPS = {  # name: (service, labels)
    "web": ("web", {"app": "web"}),
    "api-v1": ("api", {"app": "api", "version": "v1"}),
    "api-v2": ("api", {"app": "api", "version": "v2"}),
}
RULES: list[dict[str, Any]] = [
    {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "api"},
        "spec": {
            "host": "api",
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}},
            ],
        },
    },
    {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "api"},
        "spec": {
            "hosts": ["api"],
            "http": [
                {
                    "route": [
                        {"destination": {"host": "api", "subset": "v1"}, "weight": 80},
                        {"destination": {"host": "api", "subset": "v2"}, "weight": 20},
                    ],
                    "retries": {"attempts": 2, "perTryTimeout": "1s"},
                    "timeout": "3s",
                }
            ],
        },
    },
]


def ports_of(index: int) -> dict[str, int]:
    base = BASE_PORT + 10 * (index + 1)
    return {"app": base, "inbound": base + 1, "outbound": base + 2, "admin": base + 3}


def demo_bootstrap(name: str, index: int) -> dict[str, Any]:
    service, labels = APPS[name]
    mine = ports_of(index)
    return sidecar_bootstrap(
        name,
        pilot=("127.0.0.1", PILOT_XDS),
        service=f"{service}:80",
        labels=labels,
        app_address=f"127.0.0.1:{mine['app']}",
        inbound_address=f"127.0.0.1:{mine['inbound']}",
        outbound_address=f"127.0.0.1:{mine['outbound']}",
        admin=("127.0.0.1", mine["admin"]),
    )


def _wait(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
            conn.request("GET", "/ready")
            conn.getresponse().read()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"demo: nothing answered on port {port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=0, help="stop after N (default: Ctrl-C)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between requests")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="shoal-demo-"))
    rules = workdir / "rules"
    rules.mkdir()
    (rules / "api.yaml").write_text(yaml.safe_dump_all(RULES))
    processes: list[subprocess.Popen[bytes]] = []
    python = sys.executable
    try:
        pilot = [python, "-m", "shoal", "-l", "warning", "pilot", "--config-dir", str(rules)]
        pilot += ["--xds-address", f"127.0.0.1:{PILOT_XDS}"]
        pilot += ["--http-address", f"127.0.0.1:{PILOT_HTTP}"]
        pilot += ["--registry", f"embedded:{workdir / 'registry.db'}"]
        processes.append(subprocess.Popen(pilot))
        _wait(PILOT_HTTP)
        for index, name in enumerate(APPS):
            mine = ports_of(index)
            processes.append(
                subprocess.Popen(
                    [python, "-m", "shoal.demo.echo", "--port", str(mine["app"]), "--name", name],
                    stdout=subprocess.DEVNULL,
                )
            )
            config = workdir / f"{name}.yaml"
            config.write_text(yaml.safe_dump(demo_bootstrap(name, index)))
            processes.append(
                subprocess.Popen(
                    [python, "-m", "shoal", "-l", "warning", "proxy", "-c", str(config)]
                )
            )
        for index in range(len(APPS)):
            _wait(ports_of(index)["admin"])
        print("Shoal demo: shoal pilot (embedded registry) and three apps behind sidecars")
        print(f"  pilot: xDS :{PILOT_XDS}  http://127.0.0.1:{PILOT_HTTP}/v1/services")
        for index, name in enumerate(APPS):
            mine = ports_of(index)
            print(
                f"  {name}: app :{mine['app']}  inbound :{mine['inbound']}  "
                f"outbound :{mine['outbound']}  admin http://127.0.0.1:{mine['admin']}/stats"
            )
        print(f"  rules (watched, edit them live) in {rules}; configs in {workdir}")
        print(
            "Calling api from web: client → web's sidecar (outbound) → an api sidecar "
            "(inbound) → api v1 (80%) or v2 (20%).  Ctrl-C to stop.\n"
        )
        _wait_for_api(ports_of(0)["outbound"])
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        _call_api(ports_of(0)["outbound"], args.requests, args.interval)
    except KeyboardInterrupt:
        print("\nstopping")
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
    return 0


def _wait_for_api(port: int, timeout: float = 15.0) -> None:
    """Until both api sidecars are registered endpoints and web's sidecar has the routes."""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while time.monotonic() < deadline and seen != {"api-v1", "api-v2"}:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/", headers={"Host": "api"})
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                seen.add(response.getheader("x-served-by", ""))
        except OSError:
            time.sleep(0.1)
        finally:
            conn.close()


def _call_api(port: int, requests: int, interval: float) -> None:
    sent = 0
    versions: Counter[str] = Counter()
    while not requests or sent < requests:
        sent += 1
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", f"/orders/{sent}", headers={"Host": "api"})
        response = conn.getresponse()
        response.read()
        elapsed = (time.monotonic() - started) * 1000
        served = response.getheader("x-served-by", "-")
        versions[served] += 1
        split = "  ".join(f"{name} {100 * n / sent:.0f}%" for name, n in sorted(versions.items()))
        print(
            f"#{sent:<4} GET http://api/orders/{sent} → {response.status} "
            f"from {served} in {elapsed:.1f} ms "
            f"(upstream {response.getheader('x-envoy-upstream-service-time')} ms)  [{split}]",
            flush=True,
        )
        conn.close()
        time.sleep(interval)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
