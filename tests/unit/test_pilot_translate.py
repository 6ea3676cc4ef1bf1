"""The translation of services and Istio rules into xDS, checked against Shoal's own config
translation (everything pilot emits must be something the proxy accepts)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import json_format

from shoal.config.envoy import (
    translate_cluster,
    translate_listener,
    translate_load_assignment,
    translate_route_configuration,
)
from shoal.config.model import DiscoveryType, HttpConnectionManager, LbPolicy
from shoal.pilot.api.model import (
    ConnectionPool,
    ConsistentHash,
    Destination,
    DestinationRule,
    FaultAbort,
    FaultDelay,
    HeaderOperations,
    Headers,
    HTTPFaultInjection,
    HTTPMatchRequest,
    HTTPRetry,
    HTTPRewrite,
    HTTPRoute,
    HTTPRouteDestination,
    LoadBalancer,
    Meta,
    OutlierDetection,
    RuleSet,
    StringMatch,
    Subset,
    TrafficPolicy,
    VirtualService,
)
from shoal.pilot.model import Instance, RegistrySnapshot, Service, ServicePort, labels_of
from shoal.pilot.translate import (
    LISTENER,
    ROUTE,
    MeshSnapshot,
    NodeInfo,
    Resource,
    Translator,
)
from shoal.xds.client import _with_routes

REVIEWS = Service("reviews", (ServicePort(9080), ServicePort(9090, "grpc", "GRPC")))


def instance(port: int, version: str, locality: str = "") -> Instance:
    return Instance(
        "reviews", 9080, "127.0.0.1", port, labels_of({"version": version}), locality=locality
    )


INSTANCES = (
    instance(8001, "v1", "eu/a"),
    instance(8002, "v1", "eu/b"),
    instance(8003, "v2", "eu/a"),
)
SUBSETS = (Subset("v1", labels_of({"version": "v1"})), Subset("v2", labels_of({"version": "v2"})))


def unpack(resource: Resource, message: Any) -> Any:
    assert resource.body.Unpack(message)
    return message


def translate(*virtual: VirtualService, policy: TrafficPolicy | None = None) -> MeshSnapshot:
    rules = RuleSet(
        virtual_services=virtual,
        destination_rules=(DestinationRule(Meta("reviews"), "reviews", policy, SUBSETS),),
    )
    return Translator().translate(RegistrySnapshot((REVIEWS,), INSTANCES), rules)


def route(*http: HTTPRoute) -> VirtualService:
    return VirtualService(Meta("reviews"), ("reviews",), http)


def to(subset: str, weight: int = 0) -> HTTPRouteDestination:
    return HTTPRouteDestination(Destination("reviews", subset), weight)


def outbound_routes(snapshot: MeshSnapshot) -> dict[str, Any]:
    message = unpack(snapshot.outbound_routes, route_pb2.RouteConfiguration())
    translate_route_configuration(message, source="test")  # shoal accepts it
    return dict(json_format.MessageToDict(message, preserving_proto_field_name=True))


def test_clusters_per_port_and_subset_with_istio_names_all_accepted_by_shoal() -> None:
    snapshot = translate()
    assert sorted(snapshot.clusters) == [
        "outbound|9080|v1|reviews",
        "outbound|9080|v2|reviews",
        "outbound|9080||reviews",
        "outbound|9090|v1|reviews",
        "outbound|9090|v2|reviews",
        "outbound|9090||reviews",
    ]
    for name, resource in snapshot.clusters.items():
        cluster = translate_cluster(unpack(resource, cluster_pb2.Cluster()), source=name)
        assert cluster.type is DiscoveryType.EDS
        assert cluster.eds_service_name == name
        assert cluster.http2 == name.startswith("outbound|9090")


def test_subset_endpoints_are_filtered_by_labels_and_grouped_by_locality() -> None:
    snapshot = translate()
    v1 = unpack(
        snapshot.endpoints["outbound|9080|v1|reviews"], endpoint_pb2.ClusterLoadAssignment()
    )
    assert [(g.locality.region, g.locality.zone) for g in v1.endpoints] == [
        ("eu", "a"),
        ("eu", "b"),
    ]
    assert all(g.load_balancing_weight.value == 1 for g in v1.endpoints)
    endpoints = translate_load_assignment(v1)
    assert sorted(e.address.port for e in endpoints) == [8001, 8002]
    everything = snapshot.endpoints["outbound|9080||reviews"]
    all_ports = translate_load_assignment(unpack(everything, endpoint_pb2.ClusterLoadAssignment()))
    assert sorted(e.address.port for e in all_ports) == [8001, 8002, 8003]
    # gRPC rejects a group without a locality: an unnamed locality is still sent
    plain = Translator().translate(RegistrySnapshot((REVIEWS,), (instance(8001, "v1"),)), RuleSet())
    message = unpack(
        plain.endpoints["outbound|9080||reviews"], endpoint_pb2.ClusterLoadAssignment()
    )
    assert message.endpoints[0].HasField("locality")


def test_no_virtual_service_routes_the_host_to_the_service_with_istio_defaults() -> None:
    table = outbound_routes(translate())
    vhost, grpc = table["virtual_hosts"]  # the gRPC port too: the sidecar's codec is AUTO
    assert vhost["domains"] == ["reviews:9080", "reviews"]
    assert grpc["domains"] == ["reviews:9090"]  # what a gRPC client sends as :authority
    assert grpc["routes"][0]["route"]["cluster"] == "outbound|9090||reviews"  # an h2 one
    (only,) = vhost["routes"]
    assert only["route"]["cluster"] == "outbound|9080||reviews"
    assert (vhost["name"], only["stat_prefix"]) == ("reviews:9080", "default")
    assert only["route"]["timeout"] == "0s"
    assert "retry_policy" not in only["route"]  # the virtual host's, Istio's default
    assert vhost["retry_policy"]["num_retries"] == 2


def test_virtual_service_routes() -> None:
    http = (
        HTTPRoute(
            name="jason",
            match=(
                HTTPMatchRequest(headers=(("end-user", StringMatch("exact", "jason")),)),
                HTTPMatchRequest(uri=StringMatch("prefix", "/beta"), ignore_uri_case=True),
            ),
            route=(to("v2"),),
            fault=HTTPFaultInjection(FaultDelay(0.5, 10.0), FaultAbort(503, 5.0)),
            retries=HTTPRetry(3, 2.0, "5xx"),
            rewrite=HTTPRewrite("/v2", "reviews-beta"),
            headers=Headers(HeaderOperations(set=(("x-canary", "1"),), remove=("x-debug",))),
        ),
        HTTPRoute(route=(to("v1", 90), to("v2", 10)), timeout=1.5),
    )
    table = outbound_routes(translate(route(*http)))
    routes = table["virtual_hosts"][0]["routes"]
    assert [r.get("name") for r in routes] == ["jason", "jason", None]
    first, second, split = routes
    assert first["match"]["headers"][0]["string_match"] == {"exact": "jason"}
    assert second["match"] == {"prefix": "/beta", "case_sensitive": False}
    action = first["route"]
    assert action["cluster"] == "outbound|9080|v2|reviews"
    assert action["prefix_rewrite"] == "/v2"
    assert action["host_rewrite_literal"] == "reviews-beta"
    assert action["retry_policy"]["num_retries"] == 3
    assert action["retry_policy"]["per_try_timeout"] == "2s"
    assert "envoy.filters.http.fault" in first["typed_per_filter_config"]
    assert first["request_headers_to_remove"] == ["x-debug"]
    weights = split["route"]["weighted_clusters"]["clusters"]
    assert [(w["name"], w["weight"]) for w in weights] == [
        ("outbound|9080|v1|reviews", 90),
        ("outbound|9080|v2|reviews", 10),
    ]
    assert split["route"]["timeout"] == "1.500s"  # protobuf's JSON form of 1.5 s
    # per-route stats: Istio's route name, else the VirtualService's name and the index
    assert [r["stat_prefix"] for r in routes] == ["jason", "jason", "reviews-1"]


def test_every_route_has_stats_named_in_single_tokens() -> None:
    """Envoy's Prometheus tags take a virtual host and a route stat prefix up to the next
    dot, so pilot's names for them have none."""
    host = "reviews.shop.svc.cluster.local"
    service = Service(host, (ServicePort(9080),))
    virtual = VirtualService(
        Meta("reviews.v2"),
        (host,),
        (
            HTTPRoute(name="to.v2", route=(HTTPRouteDestination(Destination(host)),)),
            HTTPRoute(route=(HTTPRouteDestination(Destination(host)),)),
        ),
    )
    snapshot = Translator().translate(
        RegistrySnapshot((service, REVIEWS), INSTANCES), RuleSet(virtual_services=(virtual,))
    )
    table = outbound_routes(snapshot)
    names = {v["name"]: [r["stat_prefix"] for r in v["routes"]] for v in table["virtual_hosts"]}
    assert names == {
        "reviews_shop_svc_cluster_local:9080": ["to_v2", "reviews_v2-1"],
        "reviews:9080": ["default"],
        "reviews:9090": ["default"],
    }
    assert snapshot.vhost_services() == {
        "reviews_shop_svc_cluster_local:9080": host,
        "reviews:9080": "reviews",
        "reviews:9090": "reviews",
    }


def test_destination_rule_policy_becomes_cluster_settings() -> None:
    policy = TrafficPolicy(
        load_balancer=LoadBalancer(consistent_hash=ConsistentHash(http_header_name="x-user")),
        connection_pool=ConnectionPool(max_connections=10, http1_max_pending_requests=5),
        outlier_detection=OutlierDetection(consecutive_5xx_errors=3, interval=1.0),
    )
    snapshot = translate(route(HTTPRoute(route=(to("v1"),))), policy=policy)
    message = unpack(snapshot.clusters["outbound|9080|v1|reviews"], cluster_pb2.Cluster())
    cluster = translate_cluster(message)
    assert cluster.lb_policy is LbPolicy.RING_HASH
    assert cluster.circuit_breakers.max_connections == 10
    assert cluster.circuit_breakers.max_pending_requests == 5
    assert cluster.outlier_detection is not None
    assert cluster.outlier_detection.consecutive_5xx == 3
    action = outbound_routes(snapshot)["virtual_hosts"][0]["routes"][0]["route"]
    assert action["hash_policy"] == [{"header": {"header_name": "x-user"}}]


def test_sidecar_and_grpc_listeners() -> None:
    snapshot = translate()
    plain = snapshot.sidecar_listeners(NodeInfo("n"))
    assert list(plain) == ["outbound"]
    node = NodeInfo("n", service="ratings", app_address=("127.0.0.1", 7000))
    listeners = snapshot.sidecar_listeners(node)
    routes = unpack(snapshot.outbound_routes, route_pb2.RouteConfiguration())
    outbound = unpack(listeners["outbound"], listener_pb2.Listener())
    assert translate_listener(_with_routes(outbound, routes)).address.port == 15001
    inbound = translate_listener(unpack(listeners["inbound"], listener_pb2.Listener()))
    assert inbound.address.port == 15006
    assert "inbound|15006||ratings" in snapshot.sidecar_clusters(node)
    grpc = unpack(snapshot.lookup(LISTENER, "reviews:9090"), listener_pb2.Listener())
    assert grpc.name == "reviews:9090"
    assert grpc.HasField("api_listener")
    grpc_routes = unpack(snapshot.lookup(ROUTE, "reviews:9090"), route_pb2.RouteConfiguration())
    assert list(grpc_routes.virtual_hosts[0].domains) == ["reviews:9090"]
    assert grpc_routes.virtual_hosts[0].routes[0].route.cluster == "outbound|9090||reviews"
    assert snapshot.lookup(LISTENER, "nothing:1") is None


def test_a_shoal_sidecar_carries_grpc_both_ways() -> None:
    """The outbound listener is AUTO (HTTP/1.1 and h2c on one port), and each port's routes
    go to clusters of its own protocol; a sidecar fronting the gRPC port speaks HTTP/2 to
    its app, and its inbound listener runs no filter the HTTP/2 path lacks."""
    snapshot = translate(route(HTTPRoute(route=(to("v2"),))))
    by_port = {v["domains"][0]: v for v in outbound_routes(snapshot)["virtual_hosts"]}
    assert by_port["reviews:9080"]["routes"][0]["route"]["cluster"] == "outbound|9080|v2|reviews"
    assert by_port["reviews:9090"]["routes"][0]["route"]["cluster"] == "outbound|9090|v2|reviews"
    node = NodeInfo(
        "n", service="reviews", service_port=9090, app_address=("127.0.0.1", 7000),
        user_agent="shoal",
    )  # fmt: skip
    listeners = snapshot.sidecar_listeners(node)
    routes = unpack(snapshot.outbound_routes, route_pb2.RouteConfiguration())
    outbound = unpack(listeners["outbound"], listener_pb2.Listener())
    manager = translate_listener(_with_routes(outbound, routes)).filter
    assert isinstance(manager, HttpConnectionManager)
    assert manager.codec_type == "auto"
    inbound = translate_listener(unpack(listeners["inbound"], listener_pb2.Listener())).filter
    assert isinstance(inbound, HttpConnectionManager)
    assert inbound.codec_type == "auto"
    assert inbound.http_filters == ()  # Istio stats only, before the router
    assert inbound.istio_stats is not None
    cluster = unpack(snapshot.sidecar_clusters(node)["inbound|15006||reviews"], Cluster())
    assert translate_cluster(cluster).http2
    http_node = replace(node, service_port=9080)
    cluster = unpack(snapshot.sidecar_clusters(http_node)["inbound|15006||reviews"], Cluster())
    assert not translate_cluster(cluster).http2


def test_with_faults_every_sidecar_has_one_outbound_chain() -> None:
    """HTTP/2 streams run the HTTP filters too: h2c and HTTP/1.1 share the faulty chain,
    on shoal sidecars as on Envoy ones."""
    fault = HTTPFaultInjection(abort=FaultAbort(503, 50.0))
    snapshot = translate(route(HTTPRoute(route=(to("v1"),), fault=fault)))
    routes = unpack(snapshot.outbound_routes, route_pb2.RouteConfiguration())
    for node in (NodeInfo("n", user_agent="shoal"), NodeInfo("n")):
        data = unpack(snapshot.sidecar_listeners(node)["outbound"], listener_pb2.Listener())
        assert len(data.filter_chains) == 1
        outbound = translate_listener(_with_routes(data, routes))
        assert isinstance(outbound.filter, HttpConnectionManager)
        assert outbound.filter.codec_type == "auto"
        assert [f.name for f in outbound.filter.http_filters] == ["envoy.filters.http.fault"]
        assert outbound.protocol_chains == ()


def test_an_endpoint_change_changes_only_that_assignment() -> None:
    translator = Translator()
    rules = RuleSet(destination_rules=(DestinationRule(Meta("r"), "reviews", None, SUBSETS),))
    before = translator.translate(RegistrySnapshot((REVIEWS,), INSTANCES), rules)
    moved = (*INSTANCES[:2], instance(8004, "v2", "eu/a"))
    after = translator.translate(RegistrySnapshot((REVIEWS,), moved), rules)
    assert {n: r.version for n, r in before.clusters.items()} == {
        n: r.version for n, r in after.clusters.items()
    }
    assert before.outbound_routes.version == after.outbound_routes.version
    changed = {n for n in after.endpoints if after.endpoints[n] != before.endpoints[n]}
    assert changed == {"outbound|9080|v2|reviews", "outbound|9080||reviews"}


def test_mirror_and_cookie_hashing_are_accepted_by_the_proxy() -> None:
    mirrored = HTTPRoute(
        route=(to("v1"),), mirror=Destination("reviews", "v2"), mirror_percentage=25.0
    )
    policy = TrafficPolicy(
        load_balancer=LoadBalancer(
            consistent_hash=ConsistentHash(http_cookie="session", http_cookie_ttl=60.0)
        )
    )
    table = outbound_routes(translate(route(mirrored), policy=policy))
    action = table["virtual_hosts"][0]["routes"][0]["route"]
    assert action["request_mirror_policies"] == [
        {
            "cluster": "outbound|9080|v2|reviews",
            "runtime_fraction": {"default_value": {"numerator": 250000, "denominator": "MILLION"}},
        }
    ]
    assert action["hash_policy"] == [{"cookie": {"name": "session", "ttl": "60s"}}]
