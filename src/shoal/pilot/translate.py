"""Mesh model + Istio rules → Envoy xDS v3 resources.

One translation serves Shoal proxies, real Envoy and proxyless gRPC, so it emits only what
all three understand: EDS clusters with locality weights, RDS over ADS, routes with weighted
clusters, header matches, retries, timeouts and per-route fault config.

Naming follows Istio, so that people who know Istio read the config dumps at once:
clusters ``outbound|<port>|<subset>|<host>`` (their EDS service name is the same), the
sidecar's HTTP route table ``outbound``, its listeners ``outbound`` and ``inbound``, and
for a gRPC client the Listener and RouteConfiguration named exactly as it dialled
(``host`` or ``host:port``).

gRPC services (ports of protocol GRPC or HTTP2) get clusters with HTTP/2 protocol options,
and virtual hosts in the sidecars' ``outbound`` table next to the HTTP ones: the sidecar's
HTTP listeners are ``codec_type: AUTO``, so an app's HTTP/1.1 requests and its gRPC
client's h2c streams (prior knowledge, ``:authority`` = ``host:port``) share the outbound
port, each routed to clusters of its own protocol (a port's routes go only to clusters of
that port's protocol). A sidecar whose ``SERVICE`` port is gRPC speaks HTTP/2 to its app.

RPC services (ports of protocol DUBBO, BOLT or MOTAN2) get the same clusters; their routes
are Envoy's generic_proxy (see :mod:`.translate_rpc`), on a listener at the node's
``RPC_OUTBOUND_ADDRESS`` (only Shoal proxies set it) and on the sidecar's inbound listener.

Resources are built as plain dicts (the YAML shape everyone knows from Envoy's docs) and
parsed into protos once per change; a service's resources are cached by their inputs, so
an endpoint change re-translates one service, not the mesh.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.adaptive_concurrency.v3 import adaptive_concurrency_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message
from xds.type.v3 import typed_struct_pb2

from shoal.errors import ConfigError
from shoal.pilot.api.model import (
    CircuitBreakerPolicy,
    ConnectionPool,
    Destination,
    DestinationRule,
    GlobalRateLimit,
    HeaderOperations,
    Headers,
    HTTPFaultInjection,
    HTTPMatchRequest,
    HTTPRetry,
    HTTPRoute,
    LocalRateLimit,
    OutlierDetection,
    RateLimitPolicy,
    RpcRoute,
    RuleSet,
    TrafficPolicy,
    VirtualService,
)
from shoal.pilot.api.parse import resource_id
from shoal.pilot.api.store import routed_destinations
from shoal.pilot.model import (
    RPC_PROTOCOLS,
    AppProtocol,
    Instance,
    RegistrySnapshot,
    Service,
    ServicePort,
    envoy_duration,
    rpc_ports,
)
from shoal.pilot.translate_rpc import EXTENSIONS as RPC_EXTENSIONS
from shoal.pilot.translate_rpc import (
    application_protocol,
    generic_proxy,
    listener,
    route_action,
    route_matcher,
    string_matcher,
    token_bucket,
)
from shoal.xds import CLUSTER, ENDPOINT, LISTENER, ROUTE

# The extensions the translation packs into Any fields (ParseDict looks them up by name).
EXTENSIONS = (
    adaptive_concurrency_pb2,
    fault_pb2,
    local_rate_limit_pb2,
    rate_limit_pb2,
    router_pb2,
    http_connection_manager_pb2,
    http_protocol_options_pb2,
    typed_struct_pb2,
    *RPC_EXTENSIONS,
)

HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
FAULT_FILTER = "envoy.filters.http.fault"
LOCAL_RATELIMIT = (
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
)
RATELIMIT = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit"
ADAPTIVE_CONCURRENCY = (
    "type.googleapis.com/envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency"
)
ADS: dict[str, Any] = {"ads": {}, "resource_api_version": "V3"}
# Shoal's Istio metrics filter; only shoal proxies have it (Envoy would refuse the listener)
SHOAL_USER_AGENT = "shoal"
TYPED_STRUCT = "type.googleapis.com/xds.type.v3.TypedStruct"
ISTIO_STATS = "type.shoal.io/shoal.filters.v1.IstioStats"
OUTBOUND_ROUTES = "outbound"
OUTBOUND_RPC = "outbound_rpc"
HTTP_PROTOCOLS = frozenset({"HTTP"})
GRPC_PROTOCOLS = frozenset({"GRPC", "HTTP2"})
ISTIO_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
DEFAULT_ROUTE = "default"  # the stat prefix of a service's route when no VirtualService has it
_NOT_STAT = re.compile(r"[^A-Za-z0-9_:-]")


def stat_name(text: str) -> str:
    """``text`` as one token of a stat name. Envoy's Prometheus tag extraction takes a
    virtual host name, and a route's stat prefix, up to the next dot (the rest stays in
    the metric's name), so dots, and anything else outside ``[A-Za-z0-9_:-]``, become
    ``_``: ``reviews.shop.svc:9080`` → ``reviews_shop_svc:9080``."""
    return _NOT_STAT.sub("_", text)


def vhost_name(host: str, port: int) -> str:
    """A service port's virtual host: Istio's ``host:port``, as one stat name token (the
    per-route stats are ``vhost.<this>.route.<stat_prefix>.*``)."""
    return stat_name(f"{host}:{port}")


@dataclass(frozen=True, slots=True)
class Resource:
    """One xDS resource, packed once; ``version`` is a digest of its bytes, so equal content
    means equal version however often it is rebuilt."""

    name: str
    version: str
    body: any_pb2.Any


def pack(name: str, message: Message) -> Resource:
    body = any_pb2.Any()
    body.Pack(message)
    digest = hashlib.blake2b(body.value, digest_size=8).hexdigest()
    return Resource(name, digest, body)


def parse(proto_type: type[Message], data: Mapping[str, Any]) -> Message:
    message = proto_type()
    json_format.ParseDict(data, message)
    return message


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What pilot knows of a client from its Node (see the node metadata in docs/pilot.md)."""

    id: str
    service: str = ""  # host of the local service
    service_port: int | None = None
    labels: tuple[tuple[str, str], ...] = ()
    app_address: tuple[str, int] | None = None
    inbound_address: tuple[str, int] = ("127.0.0.1", 15006)
    outbound_address: tuple[str, int] = ("127.0.0.1", 15001)
    rpc_outbound_address: tuple[str, int] | None = None  # Shoal proxies only
    user_agent: str = ""  # node.user_agent_name: "shoal", "envoy", gRPC's

    @property
    def has_inbound(self) -> bool:
        return bool(self.service) and self.app_address is not None

    def istio_stats(self, reporter: str, level: str = "http") -> list[dict[str, Any]]:
        """Shoal's istio_stats filter for a sidecar listener, when the client is a shoal
        proxy: Istio's standard metrics, which pilot's metrics store scrapes. ``level``:
        ``http`` (an HTTP filter) or ``network`` (before a generic_proxy)."""
        if self.user_agent != SHOAL_USER_AGENT:
            return []
        config = {"@type": TYPED_STRUCT, "type_url": ISTIO_STATS, "value": {"reporter": reporter}}
        return [{"name": f"shoal.filters.{level}.istio_stats", "typed_config": config}]


def cluster_name(host: str, port: int, subset: str = "") -> str:
    return f"outbound|{port}|{subset}|{host}"


def inbound_cluster_name(node: NodeInfo) -> str:
    return f"inbound|{node.inbound_address[1]}||{node.service}"


# --- the snapshot ----------------------------------------------------------------------------


@dataclass(slots=True)
class MeshSnapshot:
    """Every shared resource of one mesh version, plus what is built per client on demand."""

    services: dict[str, Service]
    clusters: dict[str, Resource]
    endpoints: dict[str, Resource]
    outbound_routes: Resource
    virtual_hosts: dict[str, list[dict[str, Any]]]  # host -> per-port vhost dicts
    ports: dict[str, tuple[ServicePort, ...]]
    fault_used: bool
    rate_limits: dict[str, RateLimitPolicy] = field(default_factory=dict)  # by host
    # the virtual hosts of the RPC services, per protocol (RPC_PROTOCOLS order)
    rpc_hosts: dict[AppProtocol, list[dict[str, Any]]] = field(default_factory=dict)
    errors: tuple[str, ...] = ()  # rules the services make invalid (an RpcRoute on HTTP)
    _named: dict[tuple[str, str], Resource | None] = field(default_factory=dict)
    _sidecar: dict[tuple[str, NodeInfo], dict[str, Resource]] = field(default_factory=dict)

    def vhost_services(self) -> dict[str, str]:
        """The service host of every virtual host in the sidecars' ``outbound`` table, by
        the virtual host's name (what per-route stats carry)."""
        return {
            vhost["name"]: host for host, vhosts in self.virtual_hosts.items() for vhost in vhosts
        }

    def lookup(self, type_url: str, name: str) -> Resource | None:
        """A resource asked for by name (what gRPC clients do for every type)."""
        key = (type_url, name)
        if key not in self._named:
            self._named[key] = self._build_named(type_url, name)
        return self._named[key]

    def _build_named(self, type_url: str, name: str) -> Resource | None:
        if type_url == CLUSTER:
            return self.clusters.get(name)
        if type_url == ENDPOINT:
            return self.endpoints.get(name)
        if type_url == ROUTE:
            if name == OUTBOUND_ROUTES:
                return self.outbound_routes
            return self._grpc_routes(name)
        if type_url == LISTENER:
            return self._grpc_listener(name)
        return None

    def _target(self, name: str) -> tuple[str, dict[str, Any]] | None:
        """The virtual host a gRPC client dialling ``xds:///name`` gets."""
        host, _, port_text = name.rpartition(":")
        if not host or not port_text.isdigit():
            host, port_text = name, ""
        ports = self.ports.get(host)
        if not ports:
            return None
        port = int(port_text) if port_text else ports[0].number
        for vhost in self.virtual_hosts.get(host, []):
            if vhost["_port"] == port:
                public = {k: v for k, v in vhost.items() if not k.startswith("_")}
                return host, {**public, "name": name, "domains": [name]}
        return None

    def _grpc_routes(self, name: str) -> Resource | None:
        target = self._target(name)
        if target is None:
            return None
        config = {"name": name, "virtual_hosts": [target[1]]}
        return pack(name, parse(route_pb2.RouteConfiguration, config))

    def _grpc_listener(self, name: str) -> Resource | None:
        if self._target(name) is None:
            return None
        manager = _http_connection_manager(
            name, {"rds": {"config_source": ADS, "route_config_name": name}}, self.fault_used
        )
        api_listener = {"name": name, "api_listener": {"api_listener": manager}}
        return pack(name, parse(listener_pb2.Listener, api_listener))

    def sidecar_listeners(self, node: NodeInfo) -> dict[str, Resource]:
        """The listeners of a sidecar, shared by every sidecar with the same metadata."""
        key = (LISTENER, replace(node, id=""))
        if key not in self._sidecar:
            self._sidecar[key] = self._sidecar_listeners(node)
        return self._sidecar[key]

    def sidecar_clusters(self, node: NodeInfo) -> dict[str, Resource]:
        """Every mesh cluster, plus the sidecar's inbound cluster when it fronts an app."""
        if not node.has_inbound:
            return self.clusters
        key = (CLUSTER, replace(node, id=""))
        if key not in self._sidecar:
            self._sidecar[key] = self._sidecar_clusters(node)
        return self._sidecar[key]

    def _sidecar_listeners(self, node: NodeInfo) -> dict[str, Resource]:
        routes = {
            "codec_type": "AUTO",  # HTTP/1.1 apps and gRPC clients (h2c) alike
            "rds": {"config_source": ADS, "route_config_name": OUTBOUND_ROUTES},
        }
        stats = node.istio_stats("source")
        manager = _http_connection_manager("outbound", routes, self.fault_used, stats)
        chains = [("", [_network_filter(manager)])]
        built = {"outbound": listener("outbound", node.outbound_address, chains)}
        if node.rpc_outbound_address is not None and self.rpc_hosts:
            filters = [
                (
                    application_protocol(protocol),
                    [
                        *node.istio_stats("source", "network"),
                        generic_proxy(
                            protocol,
                            f"outbound_{application_protocol(protocol)}",
                            {"virtual_hosts": vhosts},
                        ),
                    ],
                )
                for protocol, vhosts in self.rpc_hosts.items()
            ]
            built[OUTBOUND_RPC] = listener(OUTBOUND_RPC, node.rpc_outbound_address, filters)
        if node.has_inbound:
            built["inbound"] = listener("inbound", node.inbound_address, self._inbound(node))
        return {
            name: pack(name, parse(listener_pb2.Listener, data)) for name, data in built.items()
        }

    def _inbound(self, node: NodeInfo) -> list[tuple[str, list[dict[str, Any]]]]:
        """The inbound listener's filters: HTTP, the protocol of each RPC port of the
        sidecar's service (its ``SERVICE`` port, or all of them), or both, to the app."""
        ports = self._service_ports(node)
        cluster = inbound_cluster_name(node)
        filters = []
        if not ports or any(p.protocol not in RPC_PROTOCOLS for p in ports):
            limits = _inbound_filters(self.rate_limits.get(node.service))
            http = _http_connection_manager(
                "inbound",
                {
                    "codec_type": "AUTO",  # h2c for gRPC, and whatever an HTTP app gets
                    "route_config": {
                        "name": "inbound",
                        "virtual_hosts": [
                            {
                                "name": "inbound",
                                "domains": ["*"],
                                "routes": [
                                    {
                                        "match": {"prefix": "/"},
                                        "route": {"cluster": cluster, "timeout": "0s"},
                                    }
                                ],
                            }
                        ],
                    },
                },
                False,
                [*node.istio_stats("destination"), *limits],
            )
            filters.append(("", [_network_filter(http)]))
        for protocol in rpc_ports(ports):
            name = f"inbound_{application_protocol(protocol)}"
            routes = route_matcher([], route_action("inbound", {"cluster": cluster}))
            rpc = generic_proxy(protocol, name, {"routes": routes})
            filters.append(
                (application_protocol(protocol), [*node.istio_stats("destination", "network"), rpc])
            )
        return filters

    def _sidecar_clusters(self, node: NodeInfo) -> dict[str, Resource]:
        assert node.app_address is not None
        name = inbound_cluster_name(node)
        inbound = {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "10s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [_lb_endpoint(*node.app_address)]}],
            },
        }
        if _speaks_grpc(self._service_ports(node)):  # the app speaks gRPC: HTTP/2 to it
            inbound["typed_extension_protocol_options"] = _protocol_options(
                {"http2_protocol_options": {}}, None
            )
        return {**self.clusters, name: pack(name, parse(cluster_pb2.Cluster, inbound))}

    def _service_ports(self, node: NodeInfo) -> list[ServicePort]:
        """The ports of the sidecar's service it fronts: its ``SERVICE`` port, or all."""
        service = self.services.get(node.service)
        return [
            p for p in (service.ports if service else ()) if node.service_port in (None, p.number)
        ]


def _speaks_grpc(ports: Iterable[ServicePort]) -> bool:
    """The app behind a sidecar speaks HTTP/2 (gRPC): every port it serves is GRPC or
    HTTP2. One inbound cluster serves the app, so a mix of HTTP and gRPC stays HTTP/1.1."""
    protocols = {p.protocol for p in ports}
    return bool(protocols) and protocols <= GRPC_PROTOCOLS


def _http_connection_manager(
    stat_prefix: str,
    routes: dict[str, Any],
    fault: bool,
    first: Iterable[dict[str, Any]] = (),
) -> dict[str, Any]:
    filters = list(first)
    if fault:
        filters.append({"name": FAULT_FILTER, "typed_config": {"@type": FAULT}})
    filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}})
    return {"@type": HCM, "stat_prefix": stat_prefix, **routes, "http_filters": filters}


def _network_filter(manager: dict[str, Any]) -> dict[str, Any]:
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}


def _inbound_filters(policy: RateLimitPolicy | None) -> list[dict[str, Any]]:
    """A RateLimitPolicy's filters, cheapest refusal first: the local bucket spares the
    rate limit service a call, and adaptive concurrency, last, measures only what the
    limits let through to the app."""
    if policy is None:
        return []
    filters = []
    if policy.local is not None:
        filters.append(_local_rate_limit(policy.local, policy.status))
    if policy.global_limit is not None:
        filters.append(_global_rate_limit(policy.global_limit, policy.status))
    if policy.adaptive_concurrency:
        config = {"@type": ADAPTIVE_CONCURRENCY, **json.loads(policy.adaptive_concurrency)}
        filters.append({"name": "envoy.filters.http.adaptive_concurrency", "typed_config": config})
    return filters


def _local_rate_limit(local: LocalRateLimit, status: int) -> dict[str, Any]:
    """Envoy's local_ratelimit filter, always enabled and enforced."""
    everyone = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}, "runtime_key": ""}
    return {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": LOCAL_RATELIMIT,
            "stat_prefix": "inbound_rate_limit",
            "token_bucket": token_bucket(local),
            "filter_enabled": everyone,
            "filter_enforced": everyone,
            "status": {"code": status},
        },
    }


def _global_rate_limit(limit: GlobalRateLimit, status: int) -> dict[str, Any]:
    """Envoy's ratelimit filter asking the rate limit service, through its mesh cluster,
    about filter-level ``rate_limits`` (the proxy has no route-level ones)."""
    service = cluster_name(limit.host, limit.port)
    return {
        "name": "envoy.filters.http.ratelimit",
        "typed_config": {
            "@type": RATELIMIT,
            "domain": limit.domain,
            "timeout": envoy_duration(limit.timeout),
            "failure_mode_deny": limit.failure_mode_deny,
            "rate_limited_status": {"code": status},
            "rate_limit_service": {
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": service}},
            },
            "rate_limits": json.loads(limit.rate_limits),
        },
    }


# --- translation -----------------------------------------------------------------------------


class Translator:
    """Keeps the last translation of each service, keyed by everything it depends on."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[Any, Built]] = {}  # by host: inputs, resources
        self._routes: tuple[Any, RoutesBuilt] | None = None

    def translate(self, registry: RegistrySnapshot, rules: RuleSet) -> MeshSnapshot:
        services = {s.host: s for s in registry.services}
        instances: dict[str, list[Instance]] = defaultdict(list)
        for instance in registry.instances:
            instances[instance.host].append(instance)
            if instance.host not in services:  # an instance without a service definition
                port = ServicePort(instance.service_port)
                services[instance.host] = Service(instance.host, (port,), source=instance.source)
        rules_for = _RulesIndex(rules, services)
        clusters: dict[str, Resource] = {}
        endpoints: dict[str, Resource] = {}
        cache: dict[str, tuple[Any, Built]] = {}
        for host in sorted(services):
            service = services[host]
            rule = rules_for.destination_rule(host)
            breakers = rules_for.breakers(host)
            mine = tuple(instances[host])
            inputs = (service, rule, breakers, mine)
            previous = self._cache.get(host)
            # Compared, not hashed: registries hand back the same objects for what did not
            # change, and tuple equality checks identity first.
            if previous is not None and previous[0] == inputs:
                built = previous[1]
            else:
                built = _service_resources(service, rule, mine, breakers)
            cache[host] = (inputs, built)
            clusters.update(built[0])
            endpoints.update(built[1])
        self._cache = cache
        routes_key = (tuple(services[h] for h in sorted(services)), rules)
        if self._routes is None or self._routes[0] != routes_key:
            self._routes = (routes_key, _route_tables(services, rules_for))
        virtual_hosts, outbound_routes, fault_used, rpc_hosts = self._routes[1]
        return MeshSnapshot(
            services=services,
            clusters=clusters,
            endpoints=endpoints,
            outbound_routes=outbound_routes,
            virtual_hosts=virtual_hosts,
            ports={host: s.ports for host, s in services.items()},
            fault_used=fault_used,
            rate_limits=rules_for.rate_limits,
            rpc_hosts=rpc_hosts,
            errors=tuple(rules_for.errors),
        )


def _service_resources(
    service: Service,
    rule: DestinationRule | None,
    instances: tuple[Instance, ...],
    breakers: tuple[Breaker, ...],
) -> Built:
    """One service's clusters and endpoint assignments (cached by their inputs: a change
    elsewhere in the mesh costs this service a dict lookup)."""
    clusters = _clusters(service, rule, list(instances), breakers)
    endpoints: dict[str, Resource] = {}
    if service.resolution == "STATIC":
        for port in service.ports:
            for subset, labels in _subsets(rule):
                name = cluster_name(service.host, port.number, subset)
                chosen = [
                    i for i in instances if i.service_port == port.number and i.matches(labels)
                ]
                endpoints[name] = _assignment(name, chosen)
    return clusters, endpoints


RoutesBuilt = tuple[
    dict[str, list[dict[str, Any]]], Resource, bool, dict[AppProtocol, list[dict[str, Any]]]
]


def _route_tables(services: Mapping[str, Service], rules: _RulesIndex) -> RoutesBuilt:
    """The virtual hosts of every service port, the sidecars' ``outbound`` table (HTTP and
    gRPC ports: each routes to clusters of its port's protocol), and the RPC virtual hosts
    per protocol. They depend on services and rules only, so endpoint
    changes reuse them."""
    virtual_hosts: dict[str, list[dict[str, Any]]] = {}
    fault_used = False
    for host in sorted(services):
        service = services[host]
        vhosts = []
        first_http = next((p for p in service.ports if p.protocol in HTTP_PROTOCOLS), None)
        for port in (p for p in service.ports if _routable(p)):
            vhost = _virtual_host(service, port, port is first_http, rules)
            fault_used = fault_used or vhost.pop("_fault")
            vhosts.append(vhost)
        virtual_hosts[host] = vhosts
    outbound = {
        "name": OUTBOUND_ROUTES,
        "virtual_hosts": [
            {k: v for k, v in vhost.items() if not k.startswith("_")}
            for host in sorted(virtual_hosts)
            for vhost in virtual_hosts[host]
        ],
    }
    table = pack(OUTBOUND_ROUTES, parse(route_pb2.RouteConfiguration, outbound))
    rpc_hosts: dict[AppProtocol, list[dict[str, Any]]] = defaultdict(list)
    for host in sorted(services):
        for port in rpc_ports(services[host].ports).values():
            rpc_hosts[port.protocol].append(_rpc_virtual_host(services[host], port, rules))
    ordered = {protocol: rpc_hosts[protocol] for protocol in RPC_PROTOCOLS if protocol in rpc_hosts}
    return virtual_hosts, table, fault_used, ordered


def _rpc_virtual_host(service: Service, port: ServicePort, rules: _RulesIndex) -> dict[str, Any]:
    """The RPC service's routes, from its RpcRoutes in order, then its default cluster.
    A route is named ``<RpcRoute>-<route name or index>`` (its stats, its breaker)."""
    routes = []
    for rpc in rules.rpc.get(service.host, ()):
        for index, rule in enumerate(rpc.routes):
            destinations = [(d.destination, d.weight) for d in rule.route]
            breaker = None
            if rule.circuit_breaker is not None:
                fallback = rules.fallback(rule.circuit_breaker.fallback)
                breaker = _breaker_settings(rule.circuit_breaker.settings, fallback, port)
            name = f"{rpc.meta.name}-{rule.name or index}"
            action = route_action(name, _clusters_of(destinations, port, rules), rule, breaker)
            routes.append((rule.match, action))
    default = cluster_name(service.host, port.number)
    matcher = route_matcher(
        routes, route_action(f"{service.host}:{port.number}", {"cluster": default})
    )
    return {"name": service.host, "hosts": [service.host], "routes": matcher}


def _routable(port: ServicePort) -> bool:
    return port.protocol in HTTP_PROTOCOLS or port.protocol in GRPC_PROTOCOLS


Built = tuple[dict[str, Resource], dict[str, Resource]]  # a service's clusters, endpoints
# Where a breaker's fallback goes: the destination, and the service it names if known.
Fallback = tuple[Destination, Service | None]
Breaker = tuple[CircuitBreakerPolicy, Fallback | None]  # a breaker policy and its fallback


class _RulesIndex:
    """Rules by the service host they apply to (short names and ``*.`` wildcards resolved)."""

    def __init__(self, rules: RuleSet, services: Mapping[str, Service]) -> None:
        self.services = services
        # Rules name hosts in lower case; an RPC service's host keeps its case.
        self.hosts = [(host.lower(), host) for host in sorted(services)]
        self._lower: dict[str, Service] = {}
        for lower, host in self.hosts:
            self._lower.setdefault(lower, services[host])
        self.rules: dict[str, DestinationRule] = {}
        for rule in rules.destination_rules:
            for host in self.matching(rule.host):
                self.rules.setdefault(host, rule)
        self.virtual: dict[str, list[VirtualService]] = defaultdict(list)
        for vs in rules.virtual_services:
            for pattern in vs.hosts:
                for host in self.matching(pattern):
                    if vs not in self.virtual[host]:
                        self.virtual[host].append(vs)

        self.backups: dict[str, dict[str, Any]] = {}
        for backup in rules.backup_requests:
            for host in self.matching(backup.host):
                self.backups.setdefault(host, json.loads(backup.settings))
        self.rate_limits: dict[str, RateLimitPolicy] = {}
        for written in rules.rate_limits:
            limit = written
            if written.global_limit is not None:  # the service's full name, for its cluster's
                target = self.resolve(Destination(written.global_limit.host))
                if target is not None:
                    resolved = replace(written.global_limit, host=target.host)
                    limit = replace(written, global_limit=resolved)
            for host in self.matching(limit.host):
                self.rate_limits.setdefault(host, limit)
        self._breakers: dict[str, list[Breaker]] = defaultdict(list)
        for breaker in rules.circuit_breakers:
            fallback = self.fallback(breaker.fallback)
            for host in self.matching(breaker.host):
                self._breakers[host].append((breaker, fallback))
        self.rpc: dict[str, list[RpcRoute]] = defaultdict(list)  # by service host
        self.errors: list[str] = []
        for rpc in rules.rpc_routes:
            problem = self._rpc_problem(rpc)
            if problem:
                self.errors.append(problem)
                continue
            for host in rpc.hosts:
                if host in self._lower:
                    self.rpc[self._lower[host].host].append(rpc)

    def _rpc_problem(self, rpc: RpcRoute) -> str:
        """Why the services make ``rpc`` invalid, or "": it names a service with no RPC
        port, or sends its calls to a port of another protocol (the RpcRoute is then
        left out whole). Services not in the mesh (yet) are no problem."""
        where = f"{rpc.meta.source}: {resource_id(rpc)}"
        for index, host in enumerate(rpc.hosts):
            service = self._lower.get(host)
            if service is None:
                continue
            protocols = rpc_ports(service.ports)
            if not protocols:
                listed = ", ".join(f"{p.number}/{p.protocol}" for p in service.ports)
                reason = f"{service.host} has no DUBBO, BOLT or MOTAN2 port (it has {listed})"
                return str(ConfigError(reason, field=f"spec.hosts[{index}]", source=where))
            for port in protocols.values():
                for path, destination in routed_destinations(rpc):
                    target = self.resolve(destination)
                    if target is None:
                        continue
                    number = _destination_port(destination, target, port)
                    found = next((p.protocol for p in target.ports if p.number == number), None)
                    if found != port.protocol:
                        speaks = f"is {found}" if found else "is not a port of it"
                        reason = (
                            f"{target.host} port {number} {speaks}, not {port.protocol} "
                            f"as {service.host}"
                        )
                        return str(ConfigError(reason, field=path, source=where))
        return ""

    def fallback(self, destination: Destination | None) -> Fallback | None:
        """Where a breaker's fallback ``destination`` goes, its host resolved."""
        return None if destination is None else (destination, self.resolve(destination))

    def destination_rule(self, host: str) -> DestinationRule | None:
        return self.rules.get(host)

    def breakers(self, host: str) -> tuple[Breaker, ...]:
        return tuple(self._breakers.get(host, ()))

    def resolve(self, destination: Destination) -> Service | None:
        exact = self.services.get(destination.host) or self._lower.get(destination.host)
        if exact is not None:
            return exact
        found = self.matching(destination.host)
        return self.services[found[0]] if found else None

    def matching(self, pattern: str) -> list[str]:
        """The service hosts ``pattern`` covers, as Istio matches hosts: exact, a short
        name of ``name.namespace...``, or ``*.suffix``; without regard to case, as DNS."""
        if pattern == "*":
            return [host for _, host in self.hosts]
        if pattern.startswith("*."):
            return [host for lower, host in self.hosts if lower.endswith(pattern[1:])]
        prefix = pattern + "."
        return [h for lower, h in self.hosts if lower == pattern or lower.startswith(prefix)]


def _subsets(rule: DestinationRule | None) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    return [("", ())] + ([(s.name, s.labels) for s in rule.subsets] if rule else [])


def _merged_policy(rule: DestinationRule | None, subset: str) -> TrafficPolicy | None:
    """A subset's policy replaces the top-level one field by field, as in Istio."""
    if rule is None:
        return None
    top = rule.traffic_policy
    own = next((s.traffic_policy for s in rule.subsets if s.name == subset), None)
    if own is None or top is None:
        return own or top
    return TrafficPolicy(
        load_balancer=own.load_balancer or top.load_balancer,
        connection_pool=own.connection_pool or top.connection_pool,
        outlier_detection=own.outlier_detection or top.outlier_detection,
    )


def _clusters(
    service: Service,
    rule: DestinationRule | None,
    instances: list[Instance],
    breakers: tuple[Breaker, ...],
) -> dict[str, Resource]:
    built = {}
    for port in service.ports:
        for subset, _labels in _subsets(rule):
            name = cluster_name(service.host, port.number, subset)
            data: dict[str, Any] = {"name": name, "connect_timeout": "10s"}
            if service.resolution == "DNS":
                chosen = [i for i in instances if i.service_port == port.number]
                data["type"] = "STRICT_DNS"
                data["load_assignment"] = _assignment_dict(name, chosen)
            else:
                data["type"] = "EDS"
                data["eds_cluster_config"] = {"eds_config": ADS}  # service name: the cluster's
            if port.protocol in GRPC_PROTOCOLS:
                data["typed_extension_protocol_options"] = _protocol_options(
                    {"http2_protocol_options": {}}, None
                )
            _apply_policy(
                data, _merged_policy(rule, subset), http=port.protocol not in RPC_PROTOCOLS
            )
            _apply_breaker(data, breakers, subset, port)
            built[name] = pack(name, parse(cluster_pb2.Cluster, data))
    return built


def _apply_breaker(
    data: dict[str, Any], breakers: tuple[Breaker, ...], subset: str, port: ServicePort
) -> None:
    """Shoal's breaker as cluster metadata (Envoy and gRPC ignore it); a policy naming this
    subset wins over one for the whole host."""
    chosen = [b for b in breakers if b[0].subset == subset] or [
        b for b in breakers if not b[0].subset
    ]
    if not chosen:
        return
    policy, fallback = chosen[0]
    settings = _breaker_settings(policy.settings, fallback, port)
    data["metadata"] = {"filter_metadata": {"shoal.circuit_breaker": settings}}


def _breaker_settings(
    settings: str, fallback: Fallback | None, port: ServicePort
) -> dict[str, Any]:
    """A breaker's ``shoal.circuit_breaker`` metadata, its fallback a cluster name (a
    fallback without a port, as a route's destination, from ``port``'s)."""
    data: dict[str, Any] = json.loads(settings)
    if fallback is not None:
        data["fallback"] = {"cluster": _cluster_of(*fallback, port)}
    return data


def _protocol_options(explicit: dict[str, Any], common: dict[str, Any] | None) -> dict[str, Any]:
    options: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": explicit,
    }
    if common:
        options["common_http_protocol_options"] = common
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options}


def _apply_policy(data: dict[str, Any], policy: TrafficPolicy | None, *, http: bool) -> None:
    """A DestinationRule's policy on a cluster; ``http``: the HTTP connection pool settings
    too (idle timeout, requests per connection), which an RPC port has not."""
    if policy is None:
        return
    balancer = policy.load_balancer
    if balancer is not None:
        if balancer.consistent_hash is not None:
            data["lb_policy"] = "RING_HASH"
            if balancer.consistent_hash.minimum_ring_size:
                data["ring_hash_lb_config"] = {
                    "minimum_ring_size": balancer.consistent_hash.minimum_ring_size
                }
        elif balancer.simple in ("LEAST_REQUEST", "RANDOM"):
            data["lb_policy"] = balancer.simple
    if policy.connection_pool is not None:
        _apply_connection_pool(data, policy.connection_pool, http=http)
    if policy.outlier_detection is not None:
        data["outlier_detection"] = _outlier_detection(policy.outlier_detection)


def _apply_connection_pool(data: dict[str, Any], pool: ConnectionPool, *, http: bool) -> None:
    thresholds = {
        key: value
        for key, value in (
            ("max_connections", pool.max_connections),
            ("max_pending_requests", pool.http1_max_pending_requests),
            ("max_requests", pool.http2_max_requests),
            ("max_retries", pool.max_retries),
        )
        if value is not None
    }
    if thresholds:
        data["circuit_breakers"] = {"thresholds": [thresholds]}
    if pool.connect_timeout is not None:
        data["connect_timeout"] = envoy_duration(pool.connect_timeout)
    common: dict[str, Any] = {}
    if pool.idle_timeout is not None:
        common["idle_timeout"] = envoy_duration(pool.idle_timeout)
    if pool.max_requests_per_connection is not None:
        common["max_requests_per_connection"] = pool.max_requests_per_connection
    if common and http:
        options = data.get("typed_extension_protocol_options")
        explicit: dict[str, Any] = (
            {"http2_protocol_options": {}} if options is not None else {"http_protocol_options": {}}
        )
        data["typed_extension_protocol_options"] = _protocol_options(explicit, common)


def _outlier_detection(outlier: OutlierDetection) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if outlier.consecutive_5xx_errors is not None:
        data["consecutive_5xx"] = outlier.consecutive_5xx_errors
    if outlier.consecutive_gateway_errors is not None:
        data["consecutive_gateway_failure"] = outlier.consecutive_gateway_errors
        data["enforcing_consecutive_gateway_failure"] = 100
    if outlier.interval is not None:
        data["interval"] = envoy_duration(outlier.interval)
    if outlier.base_ejection_time is not None:
        data["base_ejection_time"] = envoy_duration(outlier.base_ejection_time)
    if outlier.max_ejection_percent is not None:
        data["max_ejection_percent"] = outlier.max_ejection_percent
    return data


def _lb_endpoint(address: str, port: int, weight: int = 1, healthy: bool = True) -> dict[str, Any]:
    return {
        "endpoint": {"address": {"socket_address": {"address": address, "port_value": port}}},
        "load_balancing_weight": max(1, weight),
        "health_status": "HEALTHY" if healthy else "UNHEALTHY",
    }


def _assignment_dict(name: str, instances: Iterable[Instance]) -> dict[str, Any]:
    """Endpoints grouped by locality; every group names its locality (gRPC rejects one
    without) and has a weight (gRPC drops one without)."""
    localities: dict[str, list[Instance]] = defaultdict(list)
    for instance in instances:
        localities[instance.locality].append(instance)
    groups = []
    for locality in sorted(localities):
        members = sorted(localities[locality], key=lambda i: (i.address, i.port))
        region, zone, subzone = ([*locality.split("/"), "", ""])[:3]
        groups.append(
            {
                "locality": {"region": region, "zone": zone, "sub_zone": subzone},
                "lb_endpoints": [
                    _lb_endpoint(i.address, i.port, i.weight, i.healthy) for i in members
                ],
                "load_balancing_weight": sum(max(1, i.weight) for i in members),
            }
        )
    return {"cluster_name": name, "endpoints": groups}


def _assignment(name: str, instances: Iterable[Instance]) -> Resource:
    message = parse(endpoint_pb2.ClusterLoadAssignment, _assignment_dict(name, instances))
    return pack(name, message)


# --- routes ----------------------------------------------------------------------------------


def _virtual_host(
    service: Service, port: ServicePort, first: bool, rules: _RulesIndex
) -> dict[str, Any]:
    host = service.host
    domains = [f"{host}:{port.number}"] + ([host] if first else [])
    routes: list[dict[str, Any]] = []
    fault = False
    virtual_services = rules.virtual.get(host, [])
    for vs in virtual_services:
        for index, http in enumerate(vs.http):
            # per-route stats: Istio's route name, else the VirtualService's and the index
            prefix = stat_name(http.name or f"{vs.meta.name}-{index}")
            for route in _routes(http, service, port, rules, prefix):
                routes.append(route)
                fault = fault or FAULT_FILTER in route.get("typed_per_filter_config", {})
    if not virtual_services:
        routes.append(
            {
                "name": f"{host}:{port.number}",
                "stat_prefix": DEFAULT_ROUTE,
                "match": {"prefix": "/"},
                "route": _route_action([(Destination(host, port=port.number), 0)], port, rules),
            }
        )
    backup = rules.backups.get(host)
    if backup is not None:  # a BackupRequestPolicy: on every route to the host
        for route in routes:
            route["metadata"] = {"filter_metadata": {"shoal.backup_request": backup}}
    return {
        "name": vhost_name(host, port.number),
        "domains": domains,
        "routes": routes,
        "retry_policy": DEFAULT_RETRY_POLICY,
        "_port": port.number,
        "_fault": fault,
    }


def _routes(
    http: HTTPRoute, service: Service, port: ServicePort, rules: _RulesIndex, stat_prefix: str
) -> list[dict[str, Any]]:
    matches = [m for m in http.match if m.port in (None, port.number)] if http.match else [None]
    if not matches:
        return []
    destinations = [(d.destination, d.weight) for d in http.route]
    action = _route_action(destinations, port, rules, http)
    route: dict[str, Any] = {"route": action, "stat_prefix": stat_prefix}
    if http.name:
        route["name"] = http.name
    per_destination = [d.headers for d in http.route]
    if len(http.route) == 1 and per_destination[0] is not None:
        _header_operations(route, per_destination[0])
    elif len(http.route) > 1:
        for cluster, headers in zip(
            action["weighted_clusters"]["clusters"], per_destination, strict=True
        ):
            if headers is not None:
                _header_operations(cluster, headers)
    if http.headers is not None:
        _header_operations(route, http.headers)
    if http.fault is not None:
        route["typed_per_filter_config"] = {FAULT_FILTER: _fault(http.fault)}
    return [{**route, "match": _match(match)} for match in matches]


def _route_action(
    destinations: list[tuple[Destination, int]],
    port: ServicePort,
    rules: _RulesIndex,
    http: HTTPRoute | None = None,
) -> dict[str, Any]:
    action = _clusters_of(destinations, port, rules)
    hash_policy: list[dict[str, Any]] = []
    for destination, _ in destinations:
        if not hash_policy:
            target = rules.resolve(destination)
            host = target.host if target else destination.host
            hash_policy = _hash_policy(rules.destination_rule(host), destination.subset)
    action["timeout"] = envoy_duration(http.timeout) if http and http.timeout is not None else "0s"
    if hash_policy:
        action["hash_policy"] = hash_policy
    if http is not None and http.rewrite is not None:
        if http.rewrite.uri:
            action["prefix_rewrite"] = http.rewrite.uri
        if http.rewrite.authority:
            action["host_rewrite_literal"] = http.rewrite.authority
    if http is not None and http.mirror is not None:
        mirror_port = http.mirror.port or port.number
        policy: dict[str, Any] = {
            "cluster": cluster_name(http.mirror.host, mirror_port, http.mirror.subset)
        }
        if http.mirror_percentage is not None:
            policy["runtime_fraction"] = {"default_value": _fraction(http.mirror_percentage)}
        action["request_mirror_policies"] = [policy]
    if http is not None and http.retries is not None:
        action["retry_policy"] = _retry_policy(http.retries)
    return action


def _clusters_of(
    destinations: list[tuple[Destination, int]], port: ServicePort, rules: _RulesIndex
) -> dict[str, Any]:
    """A route's ``cluster``, or its ``weighted_clusters`` (several destinations)."""
    names = [(_cluster_of(d, rules.resolve(d), port), weight) for d, weight in destinations]
    if len(names) == 1:
        return {"cluster": names[0][0]}
    clusters = [{"name": name, "weight": weight} for name, weight in names]
    return {"weighted_clusters": {"clusters": clusters}}


def _cluster_of(destination: Destination, target: Service | None, port: ServicePort) -> str:
    """The cluster a destination (from a route on ``port``) names; ``target``: its service."""
    host = target.host if target else destination.host
    return cluster_name(host, _destination_port(destination, target, port), destination.subset)


def _destination_port(destination: Destination, target: Service | None, port: ServicePort) -> int:
    """The port a destination without one means: the target's only port; for an RPC
    route, the target's first port of the route's protocol; else the route's own port."""
    if destination.port is not None:
        return destination.port
    if target is not None:
        if len(target.ports) == 1:
            return target.ports[0].number
        same = rpc_ports(target.ports).get(port.protocol)
        if same is not None:
            return same.number
    return port.number


# Istio's retries when a route says nothing: two, on connection failures and 503s. Set on
# the virtual host (a route's own policy replaces it), once rather than on every route.
DEFAULT_RETRY_POLICY: dict[str, Any] = {
    "retry_on": ISTIO_RETRY_ON,
    "num_retries": 2,
    "retriable_status_codes": [503],
}


def _retry_policy(retries: HTTPRetry) -> dict[str, Any]:
    policy: dict[str, Any] = {
        "retry_on": retries.retry_on or ISTIO_RETRY_ON,
        "num_retries": retries.attempts,
    }
    if "retriable-status-codes" in policy["retry_on"]:
        policy["retriable_status_codes"] = [503]
    if retries.per_try_timeout is not None:
        policy["per_try_timeout"] = envoy_duration(retries.per_try_timeout)
    return policy


def _hash_policy(rule: DestinationRule | None, subset: str) -> list[dict[str, Any]]:
    policy = _merged_policy(rule, subset)
    balancer = policy.load_balancer if policy else None
    chash = balancer.consistent_hash if balancer else None
    if chash is None:
        return []
    if chash.http_header_name:
        return [{"header": {"header_name": chash.http_header_name}}]
    if chash.http_cookie:
        cookie: dict[str, Any] = {"name": chash.http_cookie}
        if chash.http_cookie_ttl is not None:
            cookie["ttl"] = envoy_duration(chash.http_cookie_ttl)
        return [{"cookie": cookie}]
    if chash.use_source_ip:
        return [{"connection_properties": {"source_ip": True}}]
    if chash.http_query_parameter_name:
        return [{"query_parameter": {"name": chash.http_query_parameter_name}}]
    return []


def _match(match: HTTPMatchRequest | None) -> dict[str, Any]:
    if match is None:
        return {"prefix": "/"}
    data: dict[str, Any] = {"prefix": "/"}
    if match.uri is not None:
        kind = {"exact": "path", "prefix": "prefix", "regex": "safe_regex"}[match.uri.kind]
        data = {kind: {"regex": match.uri.value} if kind == "safe_regex" else match.uri.value}
        if match.ignore_uri_case:
            data["case_sensitive"] = False
    headers: list[dict[str, Any]] = [
        {"name": name, "string_match": string_matcher(value)} for name, value in match.headers
    ]
    headers += [
        {"name": name, "string_match": string_matcher(value), "invert_match": True}
        for name, value in match.without_headers
    ]
    if match.method is not None:
        headers.append({"name": ":method", "string_match": string_matcher(match.method)})
    if match.authority is not None:
        headers.append({"name": ":authority", "string_match": string_matcher(match.authority)})
    if headers:
        data["headers"] = headers
    if match.query_params:
        data["query_parameters"] = [
            {"name": name, "string_match": string_matcher(value)}
            for name, value in match.query_params
        ]
    return data


def _header_operations(target: dict[str, Any], headers: Headers) -> None:
    for direction, ops in (("request", headers.request), ("response", headers.response)):
        _add_header_ops(target, direction, ops)


def _add_header_ops(target: dict[str, Any], direction: str, ops: HeaderOperations) -> None:
    options = [
        {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        for k, v in ops.set
    ] + [
        {"header": {"key": k, "value": v}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}
        for k, v in ops.add
    ]
    if options:
        target.setdefault(f"{direction}_headers_to_add", []).extend(options)
    if ops.remove:
        target.setdefault(f"{direction}_headers_to_remove", []).extend(ops.remove)


def _fraction(percent: float) -> dict[str, Any]:
    return {"numerator": round(percent * 10_000), "denominator": "MILLION"}


def _fault(fault: HTTPFaultInjection) -> dict[str, Any]:
    data: dict[str, Any] = {"@type": FAULT}
    if fault.delay is not None:
        data["delay"] = {
            "fixed_delay": envoy_duration(fault.delay.fixed_delay),
            "percentage": _fraction(fault.delay.percentage),
        }
    if fault.abort is not None:
        data["abort"] = {
            "http_status": fault.abort.http_status,
            "percentage": _fraction(fault.abort.percentage),
        }
    return data
