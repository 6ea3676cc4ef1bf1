"""``shoal bootstrap``: the Envoy v3 bootstrap of a sidecar driven by pilot.

The same file runs ``shoal proxy`` and real Envoy: a node whose metadata tells pilot what
the sidecar fronts, a static HTTP/2 cluster that reaches pilot, and ADS for everything else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _socket(address: tuple[str, int]) -> dict[str, Any]:
    return {"socket_address": {"address": address[0], "port_value": address[1]}}


def _host(service: str) -> str:
    """``reviews:9080`` → ``reviews``."""
    host, sep, port = service.rpartition(":")
    return host if sep and port.isdigit() else service


def sidecar_bootstrap(
    node_id: str,
    *,
    pilot: tuple[str, int] = ("127.0.0.1", 15010),
    service: str = "",
    labels: Mapping[str, str] | None = None,
    app_address: str = "",
    inbound_address: str = "127.0.0.1:15006",
    outbound_address: str = "127.0.0.1:15001",
    rpc_outbound_address: str = "",
    admin: tuple[str, int] | None = ("127.0.0.1", 15000),
    delta: bool = False,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "INBOUND_ADDRESS": inbound_address,
        "OUTBOUND_ADDRESS": outbound_address,
    }
    if service:
        metadata["SERVICE"] = service
    if labels:
        metadata["LABELS"] = dict(labels)
    if app_address:
        metadata["APP_ADDRESS"] = app_address
    if rpc_outbound_address:  # Shoal proxies only: Envoy has no Bolt or Motan2 codec
        metadata["RPC_OUTBOUND_ADDRESS"] = rpc_outbound_address
    if admin is not None:  # pilot scrapes the proxy's metrics and taps it there
        host, port = admin
        metadata["ADMIN_ADDRESS"] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    ads = {"ads": {}, "resource_api_version": "V3"}
    config: dict[str, Any] = {
        # the service cluster is the host: it names the workload in Istio's metrics
        # (source_workload), where pilot's graph joins it to the service it serves
        "node": {"id": node_id, "cluster": _host(service) or node_id, "metadata": metadata},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-pilot"}}],
            },
            "lds_config": ads,
            "cds_config": ads,
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "xds-pilot",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "xds-pilot",
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": _socket(pilot)}}]}
                        ],
                    },
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/"
                            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                }
            ]
        },
    }
    if admin is not None:
        config["admin"] = {"address": _socket(admin)}
    return config
