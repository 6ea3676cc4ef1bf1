"""RPC services through pilot: the DUBBO, BOLT and MOTAN2 port protocols in every registry,
the RpcRoute kind (strict, path-qualified validation), and its translation into Envoy's
generic_proxy listeners, each read back by the proxy's own config reader."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from google.protobuf import json_format
from tests.conftest import find_envoy

from shoal.cli.main import main
from shoal.cli.registry import PROTOCOLS as CLI_PROTOCOLS
from shoal.config.envoy import translate_cluster, translate_listener
from shoal.config.envoy_listeners import DETECTED_PROTOCOLS
from shoal.config.model import Listener, RpcCondition, RpcProxy, RpcRoute, WeightedCluster
from shoal.errors import ConfigError
from shoal.pilot.api.model import (
    ConnectionPool,
    Destination,
    DestinationRule,
    HTTPRetry,
    LocalRateLimit,
    Meta,
    OutlierDetection,
    RpcMatch,
    RuleSet,
    ServiceEntry,
    StringMatch,
    Subset,
    TrafficPolicy,
)
from shoal.pilot.api.model import RpcRoute as RpcRouteRule
from shoal.pilot.api.parse import parse_resource
from shoal.pilot.api.store import ConfigDir
from shoal.pilot.model import (
    RPC_PROTOCOLS,
    AppProtocol,
    Instance,
    RegistrySnapshot,
    Service,
    ServicePort,
    labels_of,
)
from shoal.pilot.registry.embedded import EmbeddedRegistry, RegistrationError
from shoal.pilot.registry.etcd import parse_service
from shoal.pilot.registry.files import snapshot_of
from shoal.pilot.registry.zookeeper import ZooKeeperRegistry, parse_provider
from shoal.pilot.server import _keep_last_valid
from shoal.pilot.translate import OUTBOUND_RPC, MeshSnapshot, NodeInfo, Resource, Translator
from shoal.pilot.translate_rpc import application_protocol
from shoal.pilot.xds import _changes, node_info
from shoal.xds import CLUSTER, ENDPOINT, LISTENER

GREETER = "com.example.Greeter"
RPC_ADDRESS = ("127.0.0.1", 20881)


def rpc_route(spec: dict[str, Any], name: str = "greeter") -> Any:
    document = {"apiVersion": "shoal.io/v1", "kind": "RpcRoute", "metadata": {"name": name}}
    return parse_resource({**document, "spec": spec}, "rpc.yaml")


CANARY = {
    "name": "canary",
    "match": {
        "method": {"exact": "sayHello"},
        "version": {"exact": "1.0.0"},
        "group": {"prefix": "g"},
        "attributes": {"user": {"exact": "alice"}, "trace": {}},
    },
    "route": [
        {"destination": {"host": GREETER, "subset": "v1"}, "weight": 80},
        {"destination": {"host": GREETER, "subset": "v2"}, "weight": 20},
    ],
    "timeout": "2s",
    "retries": {"attempts": 2, "retryOn": "connect-failure,reset"},
    "rateLimit": {"maxTokens": 10, "fillInterval": "1s"},
    "circuitBreaker": {
        "errorRatio": 0.5,
        "minimumRequests": 5,
        "fallback": {"destination": {"host": GREETER, "subset": "v1"}},
    },
}


# --- parsing ----------------------------------------------------------------------------------


def test_an_rpc_route_is_parsed_with_every_field() -> None:
    parsed = rpc_route({"hosts": [GREETER], "routes": [CANARY, {"route": [to("v1")]}]})
    assert isinstance(parsed, RpcRouteRule)
    assert parsed.hosts == ("com.example.greeter",)  # names compare without case, as hosts
    canary, rest = parsed.routes
    assert canary.match == RpcMatch(
        method=StringMatch("exact", "sayHello"),
        version=StringMatch("exact", "1.0.0"),
        group=StringMatch("prefix", "g"),
        attributes=(("user", StringMatch("exact", "alice")), ("trace", StringMatch("regex", ".*"))),
    )
    assert [(d.destination.subset, d.weight) for d in canary.route] == [("v1", 80), ("v2", 20)]
    assert canary.timeout == 2.0
    assert canary.retries == HTTPRetry(attempts=2, retry_on="connect-failure,reset")
    assert canary.rate_limit == LocalRateLimit(10, 10, 1.0)
    assert canary.circuit_breaker is not None
    assert json.loads(canary.circuit_breaker.settings) == {
        "error_ratio": 0.5,
        "minimum_requests": 5,
    }
    assert canary.circuit_breaker.fallback == Destination("com.example.greeter", "v1")
    assert rest.match is None and rest.name == ""


def to(subset: str, weight: int | None = None) -> dict[str, Any]:
    destination: dict[str, Any] = {"destination": {"host": GREETER, "subset": subset}}
    return destination if weight is None else {**destination, "weight": weight}


def with_route(**changes: Any) -> dict[str, Any]:
    route = {key: value for key, value in {**CANARY, **changes}.items() if value is not None}
    return {"hosts": [GREETER], "routes": [route]}


@pytest.mark.parametrize(
    ("spec", "field", "reason"),
    [
        ({"routes": [CANARY]}, "spec.hosts", "required"),
        ({"hosts": [], "routes": [CANARY]}, "spec.hosts", "must not be empty"),
        ({"hosts": ["*.example.com"], "routes": [CANARY]}, "spec.hosts[0]", "no wildcards"),
        ({"hosts": [GREETER, GREETER.lower()], "routes": [CANARY]}, "spec.hosts[1]", "duplicate"),
        ({"hosts": [GREETER]}, "spec.routes", "required"),
        ({"hosts": [GREETER], "rules": []}, "spec.rules", "unknown field"),
        (with_route(matc={}), "spec.routes[0].matc", "did you mean 'match'?"),
        (with_route(route=None), "spec.routes[0].route", "required"),
        (with_route(route=[to("v1", 80), to("v2", 30)]), "spec.routes[0].route", "add up to 100"),
        (
            with_route(route=[{"destination": {"host": GREETER}, "headers": {}}]),
            "spec.routes[0].route[0].headers",
            "unknown field",
        ),
        (
            with_route(match={"method": {"exact": "a", "prefix": "b"}}),
            "spec.routes[0].match.method",
            "exactly one of exact, prefix, regex",
        ),
        (
            with_route(match={"method": {"regex": "(?=x)"}}),
            "spec.routes[0].match.method.regex",
            "not RE2 syntax",
        ),
        (
            with_route(match={"attributes": {"version": {"exact": "1"}}}),
            "spec.routes[0].match.attributes.version",
            "use match.version",
        ),
        (
            with_route(match={"attributes": {"": {"exact": "1"}}}),
            "spec.routes[0].match.attributes['']",
            "invalid attribute name",
        ),
        (with_route(match={"uri": {}}), "spec.routes[0].match.uri", "unknown field"),
        (with_route(timeout="1.5"), "spec.routes[0].timeout", "duration"),
        (
            with_route(retries={"attempts": 1, "retryOn": "5xx"}),
            "spec.routes[0].retries.retryOn",
            "'5xx' is not an RPC retry condition (connect-failure, reset)",
        ),
        (
            with_route(retries={"attempts": 0, "retryOn": "reset"}),
            "spec.routes[0].retries.attempts",
            "disabled",
        ),
        (
            with_route(retries={"attempts": 1, "perTryTimeout": "1s"}),
            "spec.routes[0].retries.perTryTimeout",
            "not supported by Shoal",
        ),
        (with_route(retries={}), "spec.routes[0].retries.attempts", "required"),
        (
            with_route(rateLimit={"maxTokens": 1, "fillInterval": "10ms"}),
            "spec.routes[0].rateLimit.fillInterval",
            "at least 50ms",
        ),
        (
            with_route(circuitBreaker={"errorRatio": 2}),
            "spec.routes[0].circuitBreaker.errorRatio",
            "(0, 1]",
        ),
        (
            with_route(circuitBreaker={"fallback": {"localReply": {"status": 503}}}),
            "spec.routes[0].circuitBreaker.fallback.localReply",
            "not supported by Shoal",
        ),
        (
            with_route(circuitBreaker={"fallback": {}}),
            "spec.routes[0].circuitBreaker.fallback",
            "destination is required",
        ),
        (
            with_route(circuitBreaker={"host": GREETER}),
            "spec.routes[0].circuitBreaker.host",
            "unknown field",
        ),
        (
            {"hosts": [GREETER], "routes": [{"route": [to("v1")]}, CANARY]},
            "spec.routes[1]",
            "unreachable: routes[0] has no match",
        ),
        (
            {"hosts": [GREETER], "routes": [CANARY, CANARY]},
            "spec.routes[1].name",
            "duplicate route name 'canary'",
        ),
    ],
)
def test_rpc_route_errors_name_the_field(spec: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        rpc_route(spec)
    assert caught.value.field == field
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"rpc.yaml: RpcRoute default/greeter: {field}: ")


RULES = """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: greeter}
    spec:
      host: com.example.Greeter
      subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
    """


def write_rpc_route(directory: Path, route: dict[str, Any]) -> None:
    document = {
        "apiVersion": "shoal.io/v1",
        "kind": "RpcRoute",
        "metadata": {"name": "greeter"},
        "spec": {"hosts": [GREETER], "routes": [route]},
    }
    (directory / "route.yaml").write_text(yaml.safe_dump(document))


def test_the_config_dir_rejects_an_undefined_subset_and_keeps_the_last_valid_route(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "rules.yaml").write_text(textwrap.dedent(RULES))
    write_rpc_route(tmp_path, {"route": [to("v2")]})
    config = ConfigDir(tmp_path)
    running = config.load()
    assert running.errors == ()
    assert [r.meta.name for r in running.rpc_routes] == ["greeter"]

    write_rpc_route(tmp_path, {"route": [to("v3")]})
    broken = config.load()
    assert broken.rpc_routes == ()
    assert broken.errors == (
        f"{tmp_path}/route.yaml: RpcRoute default/greeter: "
        "spec.routes[0].route[0].destination.subset: subset 'v3' is not defined by "
        "DestinationRule default/greeter",
    )
    assert _keep_last_valid(running, broken).rpc_routes == running.rpc_routes

    write_rpc_route(tmp_path, {"route": [to("v1")], "retries": {"attempts": 1, "retryOn": "5xx"}})
    assert main(["analyze", str(tmp_path)]) == 1
    assert "spec.routes[0].retries.retryOn: '5xx' is not an RPC retry" in capsys.readouterr().out


# --- registries -------------------------------------------------------------------------------


def test_every_registry_takes_the_rpc_protocols(tmp_path: Path) -> None:
    assert set(RPC_PROTOCOLS) <= set(CLI_PROTOCOLS)
    service = parse_service(GREETER, {"ports": [{"number": 20880, "protocol": "DUBBO"}]}, "etcd")
    assert service.ports == (ServicePort(20880, "dubbo", "DUBBO"),)

    entry = parse_resource(
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {"name": "rpc"},
            "spec": {
                "hosts": [GREETER, "com.example.Other"],
                "ports": [
                    {"number": 12200, "name": "bolt", "protocol": "bolt"},
                    {"number": 8002, "name": "motan", "protocol": "Motan2"},
                ],
                "resolution": "STATIC",
                "endpoints": [{"address": "10.0.0.1"}],
            },
        },
        "entries.yaml",
    )
    assert isinstance(entry, ServiceEntry)
    files = snapshot_of(RuleSet(service_entries=(entry,)))
    assert [s.host for s in files.services] == [GREETER, "com.example.Other"]  # case kept
    assert files.services[0].ports == (
        ServicePort(8002, "motan", "MOTAN2"),
        ServicePort(12200, "bolt", "BOLT"),
    )

    embedded = EmbeddedRegistry(str(tmp_path / "registry.db"))
    try:
        embedded.register(GREETER, "10.0.0.1", 20880, ports=[ServicePort(20880, "dubbo", "DUBBO")])
        embedded.register(GREETER, "10.0.0.2", 20880)  # the service has its RPC port already
        with pytest.raises(RegistrationError, match="'Reviews' is not a DNS name"):
            embedded.register("Reviews", "10.0.0.1", 80)  # an HTTP host stays lower-case
        (service,) = embedded.snapshot().services
        assert service == Service(
            GREETER, (ServicePort(20880, "dubbo", "DUBBO"),), source=embedded.name
        )
    finally:
        embedded.close()


def test_zookeeper_dubbo_providers_make_a_dubbo_port_and_other_schemes_a_tcp_one() -> None:
    registry = ZooKeeperRegistry()
    dubbo = parse_provider(GREETER, "dubbo%3A%2F%2F10.0.0.5%3A20880%2Fx%3Fversion%3D1.0.0", "zk")
    triple = parse_provider(GREETER, "tri%3A%2F%2F10.0.0.6%3A50051%2Fx", "zk")
    registry._providers = {GREETER: (dubbo,)}
    assert registry.snapshot().services[0].ports == (ServicePort(20880, "dubbo", "DUBBO"),)
    registry._providers, registry._snapshot = {GREETER: (dubbo, triple)}, None
    assert registry.snapshot().services[0].ports == (ServicePort(20880, "dubbo", "TCP"),)


def test_node_metadata_rpc_outbound_address() -> None:
    node = base_pb2.Node(id="n")
    node.metadata.update({"RPC_OUTBOUND_ADDRESS": "127.0.0.1:20881"})
    assert node_info(node).rpc_outbound_address == RPC_ADDRESS
    node.metadata.update({"RPC_OUTBOUND_ADDRESS": "nonsense"})
    with pytest.raises(ConfigError) as caught:
        node_info(node)
    assert caught.value.field == "node.metadata.RPC_OUTBOUND_ADDRESS"


# --- translation ------------------------------------------------------------------------------

SUBSETS = (Subset("v1", labels_of({"version": "v1"})), Subset("v2", labels_of({"version": "v2"})))


def rpc_service(host: str, protocol: AppProtocol, number: int = 20880) -> Service:
    return Service(host, (ServicePort(number, protocol.lower(), protocol),))


def greeter_instance(port: int, version: str) -> Instance:
    return Instance(GREETER, 20880, "127.0.0.1", port, labels_of({"version": version}))


def translate(
    *services: Service,
    routes: tuple[RpcRouteRule, ...] = (),
    policy: TrafficPolicy | None = None,
    instances: tuple[Instance, ...] = (),
    translator: Translator | None = None,
) -> MeshSnapshot:
    rules = RuleSet(
        destination_rules=(DestinationRule(Meta("greeter"), GREETER.lower(), policy, SUBSETS),),
        rpc_routes=routes,
    )
    translator = translator or Translator()
    return translator.translate(RegistrySnapshot(services, instances), rules)


def proxy_listener(snapshot: MeshSnapshot, node: NodeInfo, name: str) -> Listener:
    """The listener as the proxy reads it, checked against the mesh's cluster names."""
    message = listener_pb2.Listener()
    assert snapshot.sidecar_listeners(node)[name].body.Unpack(message)
    clusters = snapshot.sidecar_clusters(node)
    return translate_listener(message, source=name, clusters=clusters)


def rpc_proxies(listener: Listener) -> dict[str, RpcProxy]:
    """The generic proxies of a listener by the application protocol that picks them."""
    chains = [(next(iter(c.application_protocols)), c.filter) for c in listener.protocol_chains]
    proxies = {protocol: f for protocol, f in chains if isinstance(f, RpcProxy)}
    assert len(proxies) == len(chains)
    if not chains:
        assert isinstance(listener.filter, RpcProxy)
        return {listener.filter.protocol: listener.filter}
    return proxies


CLIENT = NodeInfo("client", rpc_outbound_address=RPC_ADDRESS)


def test_rpc_ports_get_istio_named_eds_clusters_with_their_policy_but_no_http_options() -> None:
    policy = TrafficPolicy(
        connection_pool=ConnectionPool(max_connections=10, idle_timeout=30.0),
        outlier_detection=OutlierDetection(consecutive_5xx_errors=3),
    )
    snapshot = translate(rpc_service(GREETER, "DUBBO"), policy=policy)
    assert set(snapshot.clusters) == {f"outbound|20880|{s}|{GREETER}" for s in ("", "v1", "v2")}
    for resource in snapshot.clusters.values():
        message = cluster_pb2.Cluster()
        assert resource.body.Unpack(message)
        assert not message.typed_extension_protocol_options  # no HTTP protocol options
        cluster = translate_cluster(message)
        assert cluster.circuit_breakers.max_connections == 10
        assert cluster.outlier_detection is not None


def test_one_rpc_protocol_gets_one_plain_chain_and_services_route_to_their_cluster() -> None:
    snapshot = translate(rpc_service(GREETER, "DUBBO"), rpc_service("com.example.Hello", "DUBBO"))
    listener = proxy_listener(snapshot, CLIENT, OUTBOUND_RPC)
    assert (listener.address.host, listener.address.port) == RPC_ADDRESS
    assert listener.protocol_chains == ()  # no inspector: Envoy reads this listener too
    proxy = rpc_proxies(listener)["dubbo"]
    assert proxy.stat_prefix == "outbound_dubbo"
    assert [(v.name, v.hosts) for v in proxy.virtual_hosts] == [
        (GREETER, (GREETER,)),
        ("com.example.Hello", ("com.example.Hello",)),
    ]
    (route,) = proxy.virtual_hosts[0].routes
    assert route == RpcRoute((), name=f"{GREETER}:20880", cluster=f"outbound|20880||{GREETER}")


def test_every_rpc_protocol_gets_a_chain_behind_the_protocol_inspector() -> None:
    services = (
        rpc_service(GREETER, "DUBBO"),
        rpc_service("com.example.Bolt", "BOLT", 12200),
        rpc_service("com.example.Motan", "MOTAN2", 8002),
        Service("web", (ServicePort(80),)),
    )
    listener = proxy_listener(translate(*services), CLIENT, OUTBOUND_RPC)
    proxies = rpc_proxies(listener)
    assert list(proxies) == ["dubbo", "bolt", "motan2"]
    assert set(proxies) <= DETECTED_PROTOCOLS
    assert [application_protocol(p) for p in RPC_PROTOCOLS] == list(proxies)
    for name, proxy in proxies.items():
        assert proxy.protocol == name
        assert proxy.stat_prefix == f"outbound_{name}"
        assert len(proxy.virtual_hosts) == 1
    assert proxies["bolt"].virtual_hosts[0].routes[0].cluster == "outbound|12200||com.example.Bolt"


def test_no_rpc_listener_without_rpc_services_or_without_the_node_address() -> None:
    assert OUTBOUND_RPC not in translate(Service("web", (ServicePort(80),))).sidecar_listeners(
        CLIENT
    )
    snapshot = translate(rpc_service(GREETER, "DUBBO"))
    assert OUTBOUND_RPC not in snapshot.sidecar_listeners(NodeInfo("envoy"))


def test_rpc_routes_become_generic_proxy_routes_in_order() -> None:
    route = rpc_route({"hosts": [GREETER], "routes": [CANARY, {"route": [to("v2")]}]})
    snapshot = translate(rpc_service(GREETER, "DUBBO"), routes=(route,))
    (vhost,) = rpc_proxies(proxy_listener(snapshot, CLIENT, OUTBOUND_RPC))["dubbo"].virtual_hosts
    canary, catch_all = vhost.routes  # the route without a match takes the default's place
    assert canary.name == "greeter-canary"
    assert canary.conditions == (
        RpcCondition("method", canary.conditions[0].match),
        RpcCondition("property", canary.conditions[1].match, "version"),
        RpcCondition("property", canary.conditions[2].match, "group"),
        RpcCondition("property", canary.conditions[3].match, "user"),
        RpcCondition("property", canary.conditions[4].match, "trace"),
    )
    assert [c.match.matches(v) for c, v in zip(canary.conditions, VALUES, strict=True)] == [
        True
    ] * 5
    assert not canary.conditions[2].match.matches("h1")
    assert canary.weighted_clusters == (
        WeightedCluster(f"outbound|20880|v1|{GREETER}", 80),
        WeightedCluster(f"outbound|20880|v2|{GREETER}", 20),
    )
    assert canary.timeout == 2.0
    assert canary.retry_policy is not None
    assert canary.retry_policy.retry_on == {"connect-failure", "reset"}
    assert canary.retry_policy.num_retries == 2
    assert canary.rate_limit is not None
    assert (canary.rate_limit.max_tokens, canary.rate_limit.fill_interval) == (10, 1.0)
    assert canary.breaker is not None
    assert canary.breaker.error_ratio == 0.5
    assert canary.breaker.fallback_cluster == f"outbound|20880|v1|{GREETER}"
    assert catch_all == RpcRoute((), name="greeter-1", cluster=f"outbound|20880|v2|{GREETER}")


VALUES = ("sayHello", "1.0.0", "g1", "alice", "anything")


def test_a_single_condition_and_no_extras() -> None:
    spec = {
        "hosts": [GREETER],
        "routes": [{"match": {"method": {"regex": "say.*"}}, "route": [to("v1")]}],
    }
    snapshot = translate(rpc_service(GREETER, "BOLT", 12200), routes=(rpc_route(spec),))
    (vhost,) = rpc_proxies(proxy_listener(snapshot, CLIENT, OUTBOUND_RPC))["bolt"].virtual_hosts
    first, default = vhost.routes
    assert [c.input for c in first.conditions] == ["method"]
    assert first.conditions[0].match.matches("sayHi")
    assert (first.cluster, first.timeout, first.retry_policy, first.rate_limit, first.breaker) == (
        f"outbound|12200|v1|{GREETER}",
        None,
        None,
        None,
        None,
    )
    assert default.conditions == () and default.cluster == f"outbound|12200||{GREETER}"


def test_a_destination_without_a_port_takes_the_first_port_of_the_routes_protocol() -> None:
    other = Service("com.example.Other", (ServicePort(80), ServicePort(20881, "dubbo", "DUBBO")))
    spec = {"hosts": [GREETER], "routes": [{"route": [{"destination": {"host": other.host}}]}]}
    snapshot = translate(rpc_service(GREETER, "DUBBO"), other, routes=(rpc_route(spec),))
    proxy = rpc_proxies(proxy_listener(snapshot, CLIENT, OUTBOUND_RPC))["dubbo"]
    assert proxy.virtual_hosts[0].routes[0].cluster == "outbound|20881||com.example.Other"


def test_an_rpc_route_the_services_make_invalid_is_left_out_and_reported() -> None:
    web = Service("com.example.web", (ServicePort(80),))
    bolt = rpc_service("com.example.Bolt", "BOLT", 12200)
    on_http = rpc_route({"hosts": ["com.example.web"], "routes": [CANARY]}, name="on-http")
    cross = rpc_route(
        {"hosts": [GREETER], "routes": [{"route": [{"destination": {"host": bolt.host}}]}]},
        name="cross",
    )
    snapshot = translate(rpc_service(GREETER, "DUBBO"), web, bolt, routes=(on_http, cross))
    assert snapshot.errors == (
        "rpc.yaml: RpcRoute default/on-http: spec.hosts[0]: com.example.web has no DUBBO, BOLT "
        "or MOTAN2 port (it has 80/HTTP)",
        "rpc.yaml: RpcRoute default/cross: spec.routes[0].route[0].destination: "
        "com.example.Bolt port 12200 is BOLT, not DUBBO as com.example.Greeter",
    )
    proxy = rpc_proxies(proxy_listener(snapshot, CLIENT, OUTBOUND_RPC))["dubbo"]
    assert [r.name for r in proxy.virtual_hosts[0].routes] == [f"{GREETER}:20880"]


# --- inbound ----------------------------------------------------------------------------------


def inbound(snapshot: MeshSnapshot, service: str, port: int | None = None) -> Listener:
    """The inbound listener of a sidecar whose SERVICE is ``service[:port]``."""
    node = NodeInfo("server", service=service, service_port=port, app_address=("127.0.0.1", 7000))
    return proxy_listener(snapshot, node, "inbound")


def test_a_sidecar_of_an_rpc_service_speaks_its_protocol_to_the_app() -> None:
    listener = inbound(translate(rpc_service(GREETER, "DUBBO")), GREETER)
    assert listener.protocol_chains == ()
    assert isinstance(listener.filter, RpcProxy)
    assert listener.filter.protocol == "dubbo"
    assert listener.filter.stat_prefix == "inbound_dubbo"
    assert listener.filter.routes == (
        RpcRoute((), name="inbound", cluster=f"inbound|15006||{GREETER}"),
    )


def test_a_service_with_http_and_rpc_ports_gets_the_inspector_inbound() -> None:
    both = Service(GREETER, (ServicePort(8080), ServicePort(20880, "dubbo", "DUBBO")))
    snapshot = translate(both)
    listener = inbound(snapshot, GREETER)
    assert type(listener.filter).__name__ == "HttpConnectionManager"  # the default chain
    assert [set(c.application_protocols) for c in listener.protocol_chains] == [{"dubbo"}]
    # SERVICE host:port picks the one port's protocol
    assert isinstance(inbound(snapshot, GREETER, 20880).filter, RpcProxy)
    http_only = inbound(snapshot, GREETER, 8080)
    assert http_only.protocol_chains == ()
    assert type(http_only.filter).__name__ == "HttpConnectionManager"


# --- incremental translation -------------------------------------------------------------------


def test_endpoint_changes_push_eds_only_and_rpc_route_changes_push_listeners() -> None:
    translator = Translator()
    greeter = rpc_service(GREETER, "DUBBO")
    first = translate(greeter, instances=(greeter_instance(1, "v1"),), translator=translator)
    second = translate(
        greeter,
        instances=(greeter_instance(1, "v1"), greeter_instance(2, "v2")),
        translator=translator,
    )
    changes = _changes(first, second)
    assert changes[LISTENER] == frozenset() and changes[CLUSTER] == frozenset()
    expected = frozenset({f"outbound|20880||{GREETER}", f"outbound|20880|v2|{GREETER}"})
    assert changes[ENDPOINT] == expected
    assert second.rpc_hosts is first.rpc_hosts  # the route tables were not rebuilt

    route = rpc_route({"hosts": [GREETER], "routes": [CANARY]})
    third = translate(
        greeter,
        routes=(route,),
        instances=(greeter_instance(1, "v1"), greeter_instance(2, "v2")),
        translator=translator,
    )
    changes = _changes(second, third)
    assert changes[LISTENER] is None  # the RPC listener holds its routes
    assert changes[CLUSTER] == frozenset() and changes[ENDPOINT] == frozenset()
    same: dict[str, Resource] = third.clusters
    assert all(same[name] is second.clusters[name] for name in same)  # not re-translated


# --- real Envoy -------------------------------------------------------------------------------


def test_envoy_accepts_the_dubbo_listener_without_the_inspector(tmp_path: Path) -> None:
    """Envoy has the Dubbo codec: a Dubbo-only mesh's RPC listener (one plain chain) is a
    valid Envoy listener, with matches, weights, timeout, retries and breaker metadata. (A
    route's rateLimit is Shoal's: Envoy has no generic local rate limit filter.)"""
    envoy = find_envoy()
    if envoy is None:
        pytest.skip("no Envoy binary")
    route = {key: value for key, value in CANARY.items() if key != "rateLimit"}
    spec = {"hosts": [GREETER], "routes": [route]}
    snapshot = translate(rpc_service(GREETER, "DUBBO"), routes=(rpc_route(spec),))
    message = listener_pb2.Listener()
    assert snapshot.sidecar_listeners(CLIENT)[OUTBOUND_RPC].body.Unpack(message)
    clusters = [
        {
            "name": name,
            "type": "STATIC",
            "load_assignment": {"cluster_name": name, "endpoints": []},
        }
        for name in sorted(snapshot.clusters)
    ]
    bootstrap = {
        "static_resources": {
            "listeners": [json_format.MessageToDict(message)],
            "clusters": clusters,
        }
    }
    path = tmp_path / "envoy.yaml"
    path.write_text(json.dumps(bootstrap))
    command = [envoy, "--mode", "validate", "-c", str(path), "-l", "error"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
