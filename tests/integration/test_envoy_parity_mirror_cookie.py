"""Mirroring and generated hash-policy cookies on real Envoy and on ``shoal proxy``, one
bootstrap for both (run one after the other on the same ports): the mirror upstream must
receive the same copies, and the ``set-cookie`` line must be byte-identical. Its value
comes from the connection's two addresses, so each run checks it against the value for
its own client port (``generated_value``, pinned to Envoy's in the unit tests)."""

from __future__ import annotations

import http.client
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import EnvoyProxy, Proxy, bootstrap, free_port, http_listener, route_to
from tests.integration.mesh_helpers import eventually
from tests.integration.test_http_resilience import cluster, endpoint
from tests.integration.test_mirror_and_cookie import Recorder, Seen

from shoal.proxy.cookies import generated_value

pytestmark = pytest.mark.envoy

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# What Envoy's copies carry and shoal's do not, on purpose (docs/config.md, RouteAction).
_NOT_COMPARED = {
    "x-forwarded-for": (
        "Envoy's internal client appends the node's own address (LocalInfo, 192.0.2.2 on "
        "these machines) to x-forwarded-for; shoal's copy keeps the header as the main "
        "request sends it"
    ),
}
_SHADOW_STATS = ("upstream_rq_total", "upstream_rq_200", "upstream_rq_completed")


@dataclass
class Run:
    copies: list[Seen] = field(default_factory=list)
    set_cookies: list[tuple[str | None, str]] = field(default_factory=list)  # (got, expected)
    stats: dict[str, str] = field(default_factory=dict)


def _get(port: int, path: str, headers: dict[str, str], body: bytes | None = None) -> Any:
    """One request on its own connection; the response and the cookie value the proxy
    should generate for that connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.sock = sock
        conn.request("POST" if body else "GET", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        assert response.status == 200, (path, response.status)
        client = f"127.0.0.1:{sock.getsockname()[1]}"
        return response, generated_value(client, f"127.0.0.1:{port}")


def _stats(proxy: Proxy) -> dict[str, str]:
    lines = proxy.admin("/stats")[1].splitlines()
    return dict(line.partition(": ")[::2] for line in lines)


def _exercise(proxy: Proxy, port: int, shadow: Recorder) -> Run:
    run = Run()
    _get(port, "/mirror/x?q=1", {"Host": "reviews:9080", "x-user": "u1"})
    _get(port, "/mirror/post", {"Host": "reviews"}, body=b"payload " * 50)
    for cookie in ("", 'sess="0123456789abcdef"', "sess=0123456789abcdef"):
        headers = {"Host": "svc", **({"cookie": cookie} if cookie else {})}
        response, expected = _get(port, "/sticky", headers)
        line = f'sess="{expected}"; Max-Age=60; Path=/p; HttpOnly' if not cookie else None
        run.set_cookies.append((response.getheader("set-cookie"), line or ""))
    eventually(lambda: len(shadow.seen) == 2)
    eventually(lambda: _stats(proxy).get("cluster.shadow.upstream_rq_completed") == "2")
    run.copies = list(shadow.seen)
    run.stats = _stats(proxy)
    return run


def _copy_view(seen: Seen) -> dict[str, Any]:
    headers = {
        name: "<uuid>" if _UUID.match(value) else value
        for name, value in seen.headers.items()
        if name not in _NOT_COMPARED
    }
    return {"request": f"{seen.method} {seen.target}", "headers": headers, "body": seen.body}


def test_mirror_copies_and_set_cookie_match_envoy(
    make_proxy: Any, tmp_path: Path, echo_a: Any
) -> None:
    shadow = Recorder()
    port = free_port()
    mirror = {"prefix_rewrite": "/v2/", "request_mirror_policies": [{"cluster": "shadow"}]}
    sticky = {"cookie": {"name": "sess", "ttl": "60s", "path": "/p"}}
    vhosts = [
        {
            "name": "all",
            "domains": ["*"],
            "request_headers_to_add": [{"header": {"key": "x-vhost", "value": "v"}}],
            "routes": [
                route_to("main", "/mirror/", **mirror),
                route_to("ring", "/sticky", hash_policy=[sticky]),
            ],
        }
    ]
    config = bootstrap(
        [http_listener(port, vhosts)],
        [
            cluster("main", endpoint(echo_a.port)),
            cluster("shadow", endpoint(shadow.port)),
            cluster("ring", endpoint(echo_a.port), lb_policy="RING_HASH"),
        ],
        free_port(),
    )
    runs = {}
    try:
        for name, kind in (("envoy", EnvoyProxy), ("shoal", Proxy)):
            shadow.seen.clear()
            proxy = make_proxy(config, kind=kind)
            runs[name] = _exercise(proxy, port, shadow)
            proxy.stop()
    finally:
        shadow.stop()
    envoy, shoal = runs["envoy"], runs["shoal"]

    for run in (envoy, shoal):  # byte for byte the line this connection must get
        for got, expected in run.set_cookies:
            assert got == (expected or None)
    copies = {name: sorted(map(_copy_view, run.copies), key=str) for name, run in runs.items()}
    assert copies["shoal"] == copies["envoy"]
    assert {c["headers"]["host"] for c in copies["shoal"]} == {
        "reviews-shadow:9080",
        "reviews-shadow",
    }
    for stat in _SHADOW_STATS:
        key = f"cluster.shadow.{stat}"
        assert shoal.stats.get(key) == envoy.stats.get(key) == "2", key
