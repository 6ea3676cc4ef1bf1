"""A plain sofa-rpc-node client (sofa-bolt-node's own header map: only ``service``, the
method only inside the hessian2 SofaRequest content) → shoal proxy → two real Bolt
servers: routing by method still works, from the content."""

from __future__ import annotations

from typing import Any

from tests.conftest import bootstrap, free_port, static_cluster
from tests.integration.rpc_peers import RpcServer, run_client, whoami
from tests.rpc_config import action, condition, generic_proxy, matcher
from tests.rpc_config import rpc_listener as listener_config

GREETER = "com.example.Greeter"


def test_routes_a_plain_sofa_rpc_node_client_by_method(make_proxy: Any) -> None:
    with RpcServer("bolt", "v1") as v1, RpcServer("bolt", "v2") as v2:
        port = free_port()
        routes = matcher([([condition("method", "sayHello")], action("v2"))], default=action("v1"))
        config = bootstrap(
            [listener_config(port, ([], generic_proxy("bolt", {GREETER: routes})))],
            [static_cluster("v1", v1.port), static_cluster("v2", v2.port)],
            free_port(),
        )
        proxy = make_proxy(config)

        hello = run_client("bolt", port, args=["world"], count=5, concurrency=5, plain_header=True)
        assert hello["ok"] == 5, hello["errors"]
        assert set(hello["results"]) == {"v2: hello world"}
        echoed = run_client("bolt", port, method="echo", args=["x"], plain_header=True)
        assert echoed["ok"] == 1 and echoed["results"] == ["x"]
        served = whoami("bolt", port, plain_header=True, attachments={"user": "bob"})
        assert served["label"] == "v1"
        # the header map the servers got is sofa-bolt-node's own; the props are in the content
        assert served["headers"] == {"service": f"{GREETER}:1.0.0"}
        assert served["attachments"]["user"] == "bob"

        stats = proxy.stats()
        assert stats[f"generic_proxy.rpc.rpc.{GREETER}.sayHello.rq_success"] == 5
        assert stats[f"generic_proxy.rpc.rpc.{GREETER}.echo.rq_success"] == 1
        assert stats[f"generic_proxy.rpc.rpc.{GREETER}.whoami.rq_success"] == 1
        assert stats["cluster.v2.upstream_rq_total"] == 5
        assert stats["cluster.v1.upstream_rq_total"] == 2
