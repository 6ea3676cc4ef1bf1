"""``make demo``: a two-service mesh on loopback, every hop through a ``shoal proxy``.

    client ──► [proxy of "web": outbound :15001] ──► [proxy of "api": inbound :15106] ──► api
                                                   (and api's calls to web the same way)

Each service gets a sidecar with an inbound listener in front of it and an outbound
listener that routes by Host to the other service's sidecar. The client sends requests
to web's outbound listener with ``Host: api``; the output shows which service answered,
the status and the latency, plus where each proxy's admin pages are.
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
from pathlib import Path
from typing import Any

import yaml

BASE_PORT = 15100

_ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


def _cluster(name: str, port: int) -> dict[str, Any]:
    address = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }


def _listener(name: str, port: int, vhosts: list[dict[str, Any]], log: Path) -> dict[str, Any]:
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {"name": name, "virtual_hosts": vhosts},
        "http_filters": [_ROUTER],
        "access_log": [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3."
                    "FileAccessLog",
                    "path": str(log),
                },
            }
        ],
    }
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": manager,
                    }
                ]
            }
        ],
    }


def sidecar_bootstrap(
    service: str, ports: dict[str, dict[str, int]], workdir: Path
) -> dict[str, Any]:
    """The bootstrap of ``service``'s sidecar: inbound to its app, outbound to the others."""
    mine = ports[service]
    others = [name for name in ports if name != service]
    outbound_vhosts = [
        {
            "name": other,
            "domains": [other, f"{other}:*"],
            "routes": [
                {
                    "match": {"prefix": "/"},
                    "route": {
                        "cluster": f"outbound|{other}",
                        "timeout": "3s",
                        "retry_policy": {"retry_on": "5xx,connect-failure", "num_retries": 2},
                    },
                }
            ],
        }
        for other in others
    ]
    inbound_vhosts = [
        {
            "name": "inbound",
            "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "inbound|app"}}],
        }
    ]
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": mine["admin"]}}
        },
        "static_resources": {
            "listeners": [
                _listener("inbound", mine["inbound"], inbound_vhosts, workdir / f"{service}.log"),
                _listener(
                    "outbound", mine["outbound"], outbound_vhosts, workdir / f"{service}.log"
                ),
            ],
            "clusters": [_cluster("inbound|app", mine["app"])]
            + [_cluster(f"outbound|{other}", ports[other]["inbound"]) for other in others],
        },
    }


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
    ports = {
        name: {
            key: BASE_PORT + 10 * index + offset
            for offset, key in enumerate(("app", "inbound", "outbound", "admin"))
        }
        for index, name in enumerate(("web", "api"))
    }
    workdir = Path(tempfile.mkdtemp(prefix="shoal-demo-"))
    processes: list[subprocess.Popen[bytes]] = []
    python = sys.executable
    try:
        for name, mine in ports.items():
            processes.append(
                subprocess.Popen(
                    [python, "-m", "shoal.demo.echo", "--port", str(mine["app"]), "--name", name],
                    stdout=subprocess.DEVNULL,
                )
            )
            config = workdir / f"{name}.yaml"
            config.write_text(yaml.safe_dump(sidecar_bootstrap(name, ports, workdir)))
            processes.append(
                subprocess.Popen(
                    [python, "-m", "shoal", "-l", "warning", "proxy", "-c", str(config)]
                )
            )
        for mine in ports.values():
            _wait(mine["admin"])
        print("Shoal demo: two services, each behind a shoal proxy sidecar")
        for name, mine in ports.items():
            print(
                f"  {name}: app :{mine['app']}  inbound :{mine['inbound']}  "
                f"outbound :{mine['outbound']}  admin http://127.0.0.1:{mine['admin']}/stats"
            )
        print(f"  configs and access logs in {workdir}")
        print(
            "Calling api from web: client → web's sidecar (outbound) → api's sidecar "
            "(inbound) → api.  Ctrl-C to stop.\n"
        )
        sent = 0
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while not args.requests or sent < args.requests:
            sent += 1
            started = time.monotonic()
            conn = http.client.HTTPConnection("127.0.0.1", ports["web"]["outbound"], timeout=5)
            conn.request("GET", f"/orders/{sent}", headers={"Host": "api"})
            response = conn.getresponse()
            response.read()
            elapsed = (time.monotonic() - started) * 1000
            print(
                f"#{sent:<4} GET http://api/orders/{sent} → {response.status} "
                f"from {response.getheader('x-served-by')} in {elapsed:.1f} ms "
                f"(upstream {response.getheader('x-envoy-upstream-service-time')} ms)",
                flush=True,
            )
            conn.close()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        print("\nstopping")
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
