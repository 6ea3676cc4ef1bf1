"""Istio resources → shoal.pilot.api.model: every supported field, and every kind of error.

Resources are written as YAML (as users write them) and parsed with ``parse_resource``; the
config dir around them is tested in test_pilot_store.py.
"""

from __future__ import annotations

import copy
import textwrap
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from shoal.errors import ConfigError
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
    Port,
    ServiceEntry,
    StringMatch,
    Subset,
    TrafficPolicy,
    VirtualService,
    WorkloadEntry,
)
from shoal.pilot.api.parse import host_matches, parse_resource, resource_id

SOURCE = "rules/reviews.yaml#1"


def load(text: str) -> Any:
    return yaml.safe_load(textwrap.dedent(text))


def parse(document: Any, source: str = SOURCE) -> Any:
    return parse_resource(document, source)


def error_of(document: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(document)
    return str(caught.value)


def virtual_service(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "hosts": ["reviews"],
        "http": [{"route": [{"destination": {"host": "reviews"}}]}],
    }
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "reviews", "namespace": "default"},
        "spec": {**base, **spec},
    }


def destination_rule(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "reviews"},
        "spec": {"host": "reviews", **spec},
    }


def service_entry(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "hosts": ["api.example.com"],
        "ports": [{"number": 80, "name": "http"}],
        "resolution": "STATIC",
    }
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "api", "namespace": "ext"},
        "spec": {**base, **spec},
    }


def route(**fields: Any) -> dict[str, Any]:
    """A VirtualService whose single HTTP route has ``fields`` besides its destination."""
    return virtual_service(http=[{"route": [{"destination": {"host": "reviews"}}], **fields}])


# --- what is accepted ----------------------------------------------------------------------------


def test_virtual_service_every_supported_field() -> None:
    document = load(
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
          namespace: bookinfo
          labels: {team: a}
          annotations: {note: ignored}
        spec:
          hosts: [Reviews, reviews.example.com, 10.0.0.7]
          gateways: [mesh]
          exportTo: ["*"]
          http:
          - name: canary
            match:
            - name: jason
              uri: {prefix: /api}
              method: {exact: GET}
              authority: {regex: "rev.*"}
              headers:
                End-User: {exact: jason}
                x-debug: {}
              withoutHeaders:
                x-skip: {prefix: "1"}
              queryParams:
                v: {exact: "2"}
                trace: {}
              ignoreUriCase: true
              port: 9080
            - uri: {exact: /health}
            route:
            - destination: {host: reviews, subset: v2, port: {number: 9080}}
              weight: 75
              headers:
                response: {add: {x-canary: "yes"}}
            - destination: {host: Reviews.Other.svc.cluster.local, subset: v1}
              weight: 25
            rewrite: {uri: /v2, authority: reviews-v2}
            timeout: 2.5s
            retries: {attempts: 3, perTryTimeout: 100ms, retryOn: "5xx,connect-failure,503"}
            fault:
              delay: {fixedDelay: 2m, percentage: {value: 10}}
              abort: {httpStatus: 503, percentage: {value: 0.5}}
            mirror: {host: shadow}
            mirrorPercentage: {value: 12.5}
            headers:
              request:
                set: {X-Forwarded-Team: a}
                add: {x-added: b}
                remove: [X-Secret]
              response: {remove: [server]}
          - route:
            - destination: {host: reviews}
        """
    )
    meta = Meta("reviews", "bookinfo", SOURCE)
    assert parse(document) == VirtualService(
        meta=meta,
        hosts=("reviews", "reviews.example.com", "10.0.0.7"),
        http=(
            HTTPRoute(
                name="canary",
                match=(
                    HTTPMatchRequest(
                        name="jason",
                        uri=StringMatch("prefix", "/api"),
                        method=StringMatch("exact", "GET"),
                        authority=StringMatch("regex", "rev.*"),
                        headers=(
                            ("end-user", StringMatch("exact", "jason")),
                            ("x-debug", StringMatch("regex", ".*")),
                        ),
                        without_headers=(("x-skip", StringMatch("prefix", "1")),),
                        query_params=(
                            ("v", StringMatch("exact", "2")),
                            ("trace", StringMatch("regex", ".*")),
                        ),
                        ignore_uri_case=True,
                        port=9080,
                    ),
                    HTTPMatchRequest(uri=StringMatch("exact", "/health")),
                ),
                route=(
                    HTTPRouteDestination(
                        Destination("reviews", "v2", 9080),
                        75,
                        Headers(response=HeaderOperations(add=(("x-canary", "yes"),))),
                    ),
                    HTTPRouteDestination(Destination("reviews.other.svc.cluster.local", "v1"), 25),
                ),
                rewrite=HTTPRewrite("/v2", "reviews-v2"),
                timeout=2.5,
                retries=HTTPRetry(3, 0.1, "5xx,connect-failure,503"),
                fault=HTTPFaultInjection(FaultDelay(120.0, 10.0), FaultAbort(503, 0.5)),
                mirror=Destination("shadow"),
                mirror_percentage=12.5,
                headers=Headers(
                    request=HeaderOperations(
                        set=(("x-forwarded-team", "a"),),
                        add=(("x-added", "b"),),
                        remove=("x-secret",),
                    ),
                    response=HeaderOperations(remove=("server",)),
                ),
            ),
            HTTPRoute(route=(HTTPRouteDestination(Destination("reviews")),)),
        ),
    )


def test_destination_rule_every_supported_field() -> None:
    document = load(
        """
        apiVersion: networking.istio.io/v1beta1
        kind: DestinationRule
        metadata: {name: reviews}
        spec:
          host: reviews
          exportTo: ["*"]
          trafficPolicy:
            tls: {mode: DISABLE}
            loadBalancer:
              consistentHash:
                httpCookie: {name: user, ttl: 0s}
                ringHash: {minimumRingSize: 1024}
            connectionPool:
              tcp: {maxConnections: 100, connectTimeout: 30ms}
              http:
                http1MaxPendingRequests: 10
                http2MaxRequests: 1000
                maxRequestsPerConnection: 0
                maxRetries: 3
                idleTimeout: 1h
                h2UpgradePolicy: DEFAULT
            outlierDetection:
              consecutive5xxErrors: 0
              consecutiveGatewayErrors: 5
              interval: 10s
              baseEjectionTime: 3m
              maxEjectionPercent: 50
              minHealthPercent: 0
          subsets:
          - name: v1
            labels: {version: v1, app.kubernetes.io/name: reviews}
          - name: v2
            labels: {version: v2}
            trafficPolicy:
              loadBalancer: {simple: LEAST_CONN}
        """
    )
    assert parse(document) == DestinationRule(
        meta=Meta("reviews", "default", SOURCE),
        host="reviews",
        traffic_policy=TrafficPolicy(
            load_balancer=LoadBalancer(
                consistent_hash=ConsistentHash(
                    http_cookie="user", http_cookie_ttl=0.0, minimum_ring_size=1024
                )
            ),
            connection_pool=ConnectionPool(
                max_connections=100,
                connect_timeout=0.03,
                http1_max_pending_requests=10,
                http2_max_requests=1000,
                max_requests_per_connection=None,  # 0 is Istio's "unset"
                max_retries=3,
                idle_timeout=3600.0,
            ),
            outlier_detection=OutlierDetection(
                consecutive_5xx_errors=0,  # an explicit 0 turns the check off, so it is kept
                consecutive_gateway_errors=5,
                interval=10.0,
                base_ejection_time=180.0,
                max_ejection_percent=50,
                min_health_percent=0,
            ),
        ),
        subsets=(
            Subset("v1", (("app.kubernetes.io/name", "reviews"), ("version", "v1"))),
            Subset(
                "v2",
                (("version", "v2"),),
                TrafficPolicy(load_balancer=LoadBalancer(simple="LEAST_REQUEST")),
            ),
        ),
    )


@pytest.mark.parametrize(
    ("hash_key", "expected"),
    [
        ({"httpHeaderName": "X-User"}, ConsistentHash(http_header_name="x-user")),
        ({"useSourceIp": True}, ConsistentHash(use_source_ip=True)),
        ({"httpQueryParameterName": "u"}, ConsistentHash(http_query_parameter_name="u")),
        (
            {"httpHeaderName": "x-user", "useSourceIp": False, "minimumRingSize": 64},
            ConsistentHash(http_header_name="x-user", minimum_ring_size=64),
        ),
        ({"httpCookie": {"name": "c"}}, ConsistentHash(http_cookie="c")),
    ],
)
def test_consistent_hash_keys(hash_key: dict[str, Any], expected: ConsistentHash) -> None:
    rule = parse(destination_rule(trafficPolicy={"loadBalancer": {"consistentHash": hash_key}}))
    assert rule.traffic_policy.load_balancer == LoadBalancer(consistent_hash=expected)


def test_service_entry_and_workload_entry() -> None:
    entry = parse(
        load(
            """
            apiVersion: networking.istio.io/v1alpha3
            kind: ServiceEntry
            metadata: {name: api, namespace: ext}
            spec:
              hosts: [API.example.com, "*.api.example.com"]
              location: MESH_EXTERNAL
              ports:
              - {number: 80, name: http, protocol: http, targetPort: 8080}
              - {number: 9090, name: grpc, protocol: GRPC}
              - {number: 81, name: web}
              resolution: STATIC
              endpoints:
              - address: 10.0.0.1
                ports: {http: 9000}
                labels: {version: v1}
                weight: 3
                locality: us-east1/us-east1-b
              - {address: "2001:db8::1", weight: 0}
            """
        )
    )
    meta = Meta("api", "ext", SOURCE)
    assert entry == ServiceEntry(
        meta=meta,
        hosts=("api.example.com", "*.api.example.com"),
        ports=(
            Port(80, "http", "HTTP", 8080),
            Port(9090, "grpc", "GRPC"),
            Port(81, "web", "HTTP"),
        ),
        resolution="STATIC",
        endpoints=(
            WorkloadEntry(
                meta, "10.0.0.1", (("http", 9000),), (("version", "v1"),), 3, "us-east1/us-east1-b"
            ),
            WorkloadEntry(meta, "2001:db8::1", weight=1),  # 0 is Istio's "unset"
        ),
    )
    workload = parse(
        load(
            """
            apiVersion: networking.istio.io/v1
            kind: WorkloadEntry
            metadata: {name: vm-1, namespace: ext}
            spec: {address: VM1.example.com, ports: {http: 8080}, labels: {app: api}}
            """
        )
    )
    assert workload == WorkloadEntry(
        Meta("vm-1", "ext", SOURCE), "vm1.example.com", (("http", 8080),), (("app", "api"),)
    )


def test_service_entry_resolution_and_selector() -> None:
    dns = parse(service_entry(resolution="DNS", endpoints=[{"address": "backend.example.com"}]))
    assert dns.resolution == "DNS"
    assert dns.endpoints[0].address == "backend.example.com"
    selected = parse(service_entry(resolution="NONE", workloadSelector={"labels": {"app": "api"}}))
    assert (selected.resolution, selected.workload_selector) == ("NONE", (("app", "api"),))
    assert parse(service_entry(resolution=None)).resolution == "NONE"  # Istio's default


@pytest.mark.parametrize("version", ["v1", "v1beta1", "v1alpha3"])
def test_every_istio_version_is_read(version: str) -> None:
    document = virtual_service()
    document["apiVersion"] = f"networking.istio.io/{version}"
    assert isinstance(parse(document), VirtualService)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1.5s", 1.5),
        ("100ms", 0.1),
        ("2m", 120.0),
        ("1h30m", 5400.0),
        (".25s", 0.25),
        ("1000us", 0.001),
        ("3000000ns", 0.003),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse(route(timeout=text)).http[0].timeout == pytest.approx(seconds)


def test_resource_id_and_host_matching() -> None:
    assert resource_id(parse(virtual_service())) == "VirtualService default/reviews"
    assert host_matches("*.example.com", "a.example.com")
    assert host_matches("*", "anything")
    assert host_matches("reviews", "reviews")
    assert not host_matches("*.example.com", "example.com")
    assert not host_matches("a.example.com", "b.example.com")


def test_mapping_with_nulls_is_as_if_unset() -> None:
    assert parse(route(timeout=None, retries=None)).http[0].timeout is None


# --- what is rejected, and how the message reads -------------------------------------------------


def test_error_names_file_document_resource_field_and_reason() -> None:
    document = virtual_service(
        http=[
            {
                "route": [
                    {"destination": {"host": "reviews", "subset": "v1"}, "weight": 50},
                    {"destination": {"host": "reviews", "subset": "v2"}, "weight": 150},
                ]
            }
        ]
    )
    assert error_of(document) == (
        "rules/reviews.yaml#1: VirtualService default/reviews: "
        "spec.http[0].route[1].weight: must be an integer 0-100, not 150"
    )


def edit(document: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    copied = copy.deepcopy(document)
    change(copied)
    return copied


REJECTED = [
    # unknown and unsupported fields
    pytest.param(
        route(timeot="1s"),
        "spec.http[0].timeot",
        "unknown field (did you mean 'timeout'?)",
        id="unknown field",
    ),
    pytest.param(
        route(redirect={"uri": "/x"}),
        "spec.http[0].redirect",
        "not supported by Shoal",
        id="unsupported field",
    ),
    pytest.param(
        virtual_service(tcp=[]), "spec.tcp", "not supported by Shoal", id="unsupported spec field"
    ),
    pytest.param(
        virtual_service(gateways=["ingress"]),
        "spec.gateways",
        "not supported by Shoal",
        id="gateway other than mesh",
    ),
    pytest.param(
        route(match=[{"scheme": {"exact": "https"}}]),
        "spec.http[0].match[0].scheme",
        "not supported by Shoal",
        id="unsupported match",
    ),
    pytest.param(
        route(match=[{"queryParams": {"a": {"prefix": "x"}}}]),
        "spec.http[0].match[0].queryParams.a.prefix",
        "not supported by Shoal",
        id="query prefix",
    ),
    pytest.param(
        route(rewrite={"uriRegexRewrite": {"match": "a", "rewrite": "b"}}),
        "spec.http[0].rewrite.uriRegexRewrite",
        "not supported by Shoal",
        id="regex rewrite",
    ),
    pytest.param(
        destination_rule(trafficPolicy={"tls": {"mode": "ISTIO_MUTUAL"}}),
        "spec.trafficPolicy.tls",
        "not supported by Shoal",
        id="tls mode",
    ),
    pytest.param(
        destination_rule(
            trafficPolicy={
                "loadBalancer": {
                    "consistentHash": {"useSourceIp": True, "maglev": {"tableSize": 65537}}
                }
            }
        ),
        "spec.trafficPolicy.loadBalancer.consistentHash.maglev",
        "not supported by Shoal",
        id="maglev",
    ),
    pytest.param(
        service_entry(addresses=["240.0.0.1"]),
        "spec.addresses",
        "not supported by Shoal",
        id="addresses",
    ),
    pytest.param(
        route(fault={"abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 1}}}),
        "spec.http[0].fault.abort.grpcStatus",
        "not supported by Shoal",
        id="grpc abort",
    ),
    pytest.param(
        service_entry(ports=[{"number": 443, "name": "https", "protocol": "HTTPS"}]),
        "spec.ports[0].protocol",
        "protocol HTTPS is not supported by Shoal",
        id="https port",
    ),
    pytest.param(
        route(headers={"request": {"set": {"x-a": "%HOSTNAME%"}}}),
        "spec.http[0].headers.request.set.x-a",
        "Envoy %VARIABLE% substitution is not supported by Shoal",
        id="header substitution",
    ),
    # wrong types
    pytest.param(
        virtual_service(hosts="reviews"),
        "spec.hosts",
        "must be a list, not 'reviews'",
        id="hosts not a list",
    ),
    pytest.param(
        virtual_service(http=[["route"]]),
        "spec.http[0]",
        "must be a mapping, not a list",
        id="spec not a mapping",
    ),
    pytest.param(
        route(timeout=1),
        "spec.http[0].timeout",
        'must be a duration such as "1.5s", "100ms" or "2m", not 1',
        id="timeout a number",
    ),
    pytest.param(
        virtual_service(http=[{"route": [{"destination": {"host": "a"}, "weight": "100"}]}]),
        "spec.http[0].route[0].weight",
        "must be an integer 0-100, not '100'",
        id="weight a string",
    ),
    pytest.param(
        virtual_service(http=[{"route": [{"destination": {"host": "a"}, "weight": True}]}]),
        "spec.http[0].route[0].weight",
        "must be an integer 0-100, not true",
        id="weight a boolean",
    ),
    pytest.param(
        route(match=[{"ignoreUriCase": "yes"}]),
        "spec.http[0].match[0].ignoreUriCase",
        "must be true or false, not 'yes'",
        id="ignoreUriCase a string",
    ),
    pytest.param(
        destination_rule(subsets=[{"name": "v1", "labels": {"version": 1}}]),
        "spec.subsets[0].labels.version",
        "must be a string, not 1",
        id="label value a number",
    ),
    pytest.param(
        route(mirror={"host": "s"}, mirrorPercentage=10),
        "spec.http[0].mirrorPercentage",
        "must be a mapping, not 10",
        id="mirror percentage a number",
    ),
    # missing required fields
    pytest.param(virtual_service(hosts=None), "spec.hosts", "required", id="no hosts"),
    pytest.param(virtual_service(hosts=[]), "spec.hosts", "must not be empty", id="empty hosts"),
    pytest.param(virtual_service(http=None), "spec.http", "required", id="no http"),
    pytest.param(
        virtual_service(http=[{"timeout": "1s"}]), "spec.http[0].route", "required", id="no route"
    ),
    pytest.param(
        virtual_service(http=[{"route": [{"destination": {"subset": "v1"}}]}]),
        "spec.http[0].route[0].destination.host",
        "required",
        id="no destination host",
    ),
    pytest.param(destination_rule(host=None), "spec.host", "required", id="no rule host"),
    pytest.param(
        destination_rule(subsets=[{"labels": {"a": "b"}}]),
        "spec.subsets[0].name",
        "required",
        id="no subset name",
    ),
    pytest.param(
        destination_rule(subsets=[{"name": "v1"}]),
        "spec.subsets[0].labels",
        "required",
        id="no subset labels",
    ),
    pytest.param(
        destination_rule(subsets=[{"name": "v1", "labels": {}}]),
        "spec.subsets[0].labels",
        "must not be empty (a subset selects instances by labels)",
        id="empty subset labels",
    ),
    pytest.param(service_entry(ports=None), "spec.ports", "required", id="no entry ports"),
    pytest.param(
        service_entry(ports=[{"number": 80}]), "spec.ports[0].name", "required", id="no port name"
    ),
    pytest.param(
        route(fault={"delay": {"fixedDelay": "1s"}}),
        "spec.http[0].fault.delay.percentage",
        "required (without it Istio injects no fault)",
        id="no fault percentage",
    ),
    pytest.param(
        route(fault={"abort": {"percentage": {"value": 1}}}),
        "spec.http[0].fault.abort.httpStatus",
        "required",
        id="no abort status",
    ),
    pytest.param(
        route(fault={}), "spec.http[0].fault", "needs a delay, an abort or both", id="empty fault"
    ),
    pytest.param(
        edit(virtual_service(), lambda d: d["metadata"].pop("name")),
        "metadata.name",
        "required",
        id="no metadata name",
    ),
    pytest.param(
        edit(virtual_service(), lambda d: d.pop("spec")), "spec", "required", id="no spec"
    ),
    # weights
    pytest.param(
        virtual_service(
            http=[
                {
                    "route": [
                        {"destination": {"host": "a"}, "weight": 50},
                        {"destination": {"host": "b"}, "weight": 40},
                    ]
                }
            ]
        ),
        "spec.http[0].route",
        "weights must add up to 100, not 90",
        id="weights under 100",
    ),
    pytest.param(
        virtual_service(
            http=[{"route": [{"destination": {"host": "a"}}, {"destination": {"host": "b"}}]}]
        ),
        "spec.http[0].route",
        "weights must add up to 100, not 0",
        id="weights left out",
    ),
    pytest.param(
        virtual_service(http=[{"route": [{"destination": {"host": "a"}, "weight": -1}]}]),
        "spec.http[0].route[0].weight",
        "must be an integer 0-100, not -1",
        id="negative weight",
    ),
    # ports
    pytest.param(
        service_entry(ports=[{"number": 0, "name": "http"}]),
        "spec.ports[0].number",
        "must be a port number 1-65535, not 0",
        id="zero port",
    ),
    pytest.param(
        route(match=[{"port": -80}]),
        "spec.http[0].match[0].port",
        "must be a port number 1-65535, not -80",
        id="negative port",
    ),
    pytest.param(
        virtual_service(
            http=[{"route": [{"destination": {"host": "a", "port": {"number": 70000}}}]}]
        ),
        "spec.http[0].route[0].destination.port.number",
        "must be a port number 1-65535, not 70000",
        id="port too big",
    ),
    pytest.param(
        service_entry(endpoints=[{"address": "10.0.0.1", "ports": {"http": 0}}]),
        "spec.endpoints[0].ports.http",
        "must be a port number 1-65535, not 0",
        id="zero endpoint port",
    ),
    pytest.param(
        service_entry(ports=[{"number": 80, "name": "a"}, {"number": 80, "name": "b"}]),
        "spec.ports[1].number",
        "port 80 is repeated",
        id="repeated port",
    ),
    pytest.param(
        service_entry(ports=[{"number": 80, "name": "a"}, {"number": 81, "name": "a"}]),
        "spec.ports[1].name",
        "port name 'a' is repeated",
        id="repeated port name",
    ),
    pytest.param(
        service_entry(endpoints=[{"address": "10.0.0.1", "ports": {"grpc": 90}}]),
        "spec.endpoints[0].ports.grpc",
        "'grpc' is not a port of this ServiceEntry",
        id="endpoint port not on entry",
    ),
    # durations
    pytest.param(
        route(timeout="15"),
        "spec.http[0].timeout",
        'must be a duration such as "1.5s", "100ms" or "2m", not \'15\'',
        id="duration without unit",
    ),
    pytest.param(route(timeout="-1s"), "spec.http[0].timeout", "not '-1s'", id="negative duration"),
    pytest.param(route(timeout="1d"), "spec.http[0].timeout", "not '1d'", id="unknown unit"),
    pytest.param(
        route(timeout="0s"), "spec.http[0].timeout", "'0s': must be at least 1ms", id="zero timeout"
    ),
    pytest.param(
        route(retries={"attempts": 2, "perTryTimeout": "1500us"}),
        "spec.http[0].retries.perTryTimeout",
        "'1500us': only whole milliseconds are supported",
        id="sub-millisecond",
    ),
    pytest.param(
        route(fault={"delay": {"fixedDelay": "soon", "percentage": {"value": 1}}}),
        "spec.http[0].fault.delay.fixedDelay",
        "not 'soon'",
        id="bad fixed delay",
    ),
    pytest.param(
        destination_rule(trafficPolicy={"outlierDetection": {"baseEjectionTime": "30"}}),
        "spec.trafficPolicy.outlierDetection.baseEjectionTime",
        "not '30'",
        id="bad ejection time",
    ),
    # subsets
    pytest.param(
        destination_rule(
            subsets=[{"name": "v1", "labels": {"v": "1"}}, {"name": "v1", "labels": {"v": "2"}}]
        ),
        "spec.subsets[1].name",
        "duplicate subset name 'v1'",
        id="duplicate subset",
    ),
    pytest.param(
        destination_rule(subsets=[{"name": "v_1", "labels": {"v": "1"}}]),
        "spec.subsets[0].name",
        "invalid subset name 'v_1' (letters, digits and '-', at most 63)",
        id="bad subset name",
    ),
    # regexes
    pytest.param(
        route(match=[{"uri": {"regex": "/api/(v1"}}]),
        "spec.http[0].match[0].uri.regex",
        "invalid regex '/api/(v1': missing ), unterminated subpattern at position 5",
        id="bad regex",
    ),
    pytest.param(
        route(match=[{"headers": {"x-a": {"regex": "a(?=b)"}}}]),
        "spec.http[0].match[0].headers.x-a.regex",
        "lookaround and backreferences are not RE2 syntax",
        id="lookahead",
    ),
    pytest.param(
        route(match=[{"authority": {"regex": "(a)\\1"}}]),
        "spec.http[0].match[0].authority.regex",
        "lookaround and backreferences are not RE2 syntax",
        id="backreference",
    ),
    pytest.param(
        route(match=[{"uri": {"regex": ""}}]),
        "spec.http[0].match[0].uri.regex",
        "must not be empty",
        id="empty regex",
    ),
    pytest.param(
        route(match=[{"uri": {"exact": "/a", "prefix": "/b"}}]),
        "spec.http[0].match[0].uri",
        "exactly one of exact, prefix, regex is required (got exact, prefix)",
        id="two match kinds",
    ),
    # labels
    pytest.param(
        destination_rule(subsets=[{"name": "v1", "labels": {"-bad": "x"}}]),
        "spec.subsets[0].labels['-bad']",
        "invalid label key '-bad'",
        id="bad label key",
    ),
    pytest.param(
        destination_rule(subsets=[{"name": "v1", "labels": {"v": "a b"}}]),
        "spec.subsets[0].labels.v",
        "invalid label value 'a b'",
        id="bad label value",
    ),
    pytest.param(
        service_entry(endpoints=[{"address": "10.0.0.1", "labels": {"v": "x" * 64}}]),
        "spec.endpoints[0].labels.v",
        "invalid label value",
        id="long label value",
    ),
    pytest.param(
        service_entry(workloadSelector={"labels": {"a/b/c": "x"}}),
        "spec.workloadSelector.labels['a/b/c']",
        "invalid label key 'a/b/c'",
        id="bad selector",
    ),
    pytest.param(
        destination_rule(subsets=[{"name": "v1", "labels": ["v1"]}]),
        "spec.subsets[0].labels",
        "must be a mapping of strings, not a list",
        id="labels not a map",
    ),
    # hosts and addresses
    pytest.param(
        virtual_service(hosts=["*"]),
        "spec.hosts[0]",
        "wildcard host * is not allowed for virtual services bound to the mesh",
        id="mesh wildcard",
    ),
    pytest.param(
        virtual_service(hosts=["*.example.com", "a.example.com"]),
        "spec.hosts[1]",
        "duplicate host: 'a.example.com' overlaps '*.example.com'",
        id="overlapping hosts",
    ),
    pytest.param(
        virtual_service(hosts=["bad_host"]),
        "spec.hosts[0]",
        "invalid host 'bad_host': label 'bad_host' is not a DNS label",
        id="bad host",
    ),
    pytest.param(
        destination_rule(host="a.*.com"),
        "spec.host",
        "invalid host 'a.*.com'",
        id="wildcard inside",
    ),
    pytest.param(
        virtual_service(http=[{"route": [{"destination": {"host": "*"}}]}]),
        "spec.http[0].route[0].destination.host",
        "invalid destination host '*'",
        id="wildcard destination",
    ),
    pytest.param(
        service_entry(endpoints=[{"address": "db.example.com"}]),
        "spec.endpoints[0].address",
        "'db.example.com' is not an IP address (resolution STATIC)",
        id="static needs IPs",
    ),
    pytest.param(
        service_entry(endpoints=[{"address": "unix:///var/run/a.sock"}]),
        "spec.endpoints[0].address",
        "unix domain socket endpoints are not supported by Shoal",
        id="unix socket",
    ),
    pytest.param(
        service_entry(hosts=["*.example.com"], resolution="DNS"),
        "spec.hosts[0]",
        "resolution DNS without endpoints resolves the hosts themselves, so they cannot be",
        id="dns wildcard",
    ),
    pytest.param(
        service_entry(resolution="NONE", endpoints=[{"address": "10.0.0.1"}]),
        "spec.endpoints",
        "resolution NONE takes no endpoints (use STATIC or DNS)",
        id="none with endpoints",
    ),
    pytest.param(
        service_entry(workloadSelector={"labels": {"a": "b"}}, endpoints=[{"address": "10.0.0.1"}]),
        "spec.workloadSelector",
        "set endpoints or workloadSelector, not both",
        id="selector and endpoints",
    ),
    pytest.param(
        service_entry(
            hosts=["a.example.com", "b.example.com"],
            ports=[{"number": 5432, "name": "pg", "protocol": "TCP"}],
        ),
        "spec.ports[0].protocol",
        "a TCP port cannot serve several hosts",
        id="tcp with two hosts",
    ),
    pytest.param(
        service_entry(resolution="MAGIC"),
        "spec.resolution",
        "unknown resolution 'MAGIC' (use STATIC, DNS or NONE)",
        id="unknown resolution",
    ),
    pytest.param(
        service_entry(resolution="DNS_ROUND_ROBIN"),
        "spec.resolution",
        "DNS_ROUND_ROBIN is not supported by Shoal",
        id="round robin",
    ),
    pytest.param(
        service_entry(ports=[{"number": 80, "name": "x", "protocol": "SMTP"}]),
        "spec.ports[0].protocol",
        "unknown protocol 'SMTP'",
        id="unknown protocol",
    ),
    # route details
    pytest.param(
        route(fault={"abort": {"httpStatus": 600, "percentage": {"value": 1}}}),
        "spec.http[0].fault.abort.httpStatus",
        "must be an integer 200-599, not 600",
        id="abort status",
    ),
    pytest.param(
        route(fault={"delay": {"fixedDelay": "1s", "percentage": {"value": 101}}}),
        "spec.http[0].fault.delay.percentage.value",
        "must be 0 or a number 0.0001-100, not 101",
        id="percentage over 100",
    ),
    pytest.param(
        route(mirrorPercentage={"value": 5}),
        "spec.http[0].mirrorPercentage",
        "needs mirror",
        id="mirror percentage alone",
    ),
    pytest.param(
        route(retries={"attempts": 2, "retryOn": "5xx,sometimes"}),
        "spec.http[0].retries.retryOn",
        "'sometimes' is not a retry condition or status code",
        id="retry condition",
    ),
    pytest.param(
        route(retries={"attempts": 0, "perTryTimeout": "1s"}),
        "spec.http[0].retries.attempts",
        "retries are disabled (attempts is 0) but configured",
        id="retries off but set",
    ),
    pytest.param(
        route(rewrite={}),
        "spec.http[0].rewrite",
        "one of uri or authority is required",
        id="empty rewrite",
    ),
    pytest.param(
        route(rewrite={"authority": "a"}, headers={"request": {"set": {"Host": "b"}}}),
        "spec.http[0].rewrite.authority",
        "the authority is also set by headers.request",
        id="authority twice",
    ),
    pytest.param(
        route(headers={"response": {"set": {"host": "b"}}}),
        "spec.http[0].headers.response.set.host",
        "the Host header cannot be changed here",
        id="host in response",
    ),
    pytest.param(
        route(match=[{"headers": {"x a": {"exact": "1"}}}]),
        "spec.http[0].match[0].headers['x a']",
        "invalid header name 'x a'",
        id="bad header name",
    ),
    pytest.param(
        route(match=[{"headers": {"x-a": None}}]),
        "spec.http[0].match[0].headers.x-a",
        "must be a match such as {exact: ...}, not null",
        id="null header match",
    ),
    # destination rule details
    pytest.param(
        destination_rule(trafficPolicy={}),
        "spec.trafficPolicy",
        "must set loadBalancer, connectionPool or outlierDetection",
        id="empty policy",
    ),
    pytest.param(
        destination_rule(
            trafficPolicy={
                "loadBalancer": {"simple": "RANDOM", "consistentHash": {"useSourceIp": True}}
            }
        ),
        "spec.trafficPolicy.loadBalancer",
        "exactly one of simple, consistentHash is required",
        id="simple and hash",
    ),
    pytest.param(
        destination_rule(trafficPolicy={"loadBalancer": {"simple": "FASTEST"}}),
        "spec.trafficPolicy.loadBalancer.simple",
        "unknown policy 'FASTEST'",
        id="unknown lb",
    ),
    pytest.param(
        destination_rule(
            trafficPolicy={"loadBalancer": {"consistentHash": {"useSourceIp": False}}}
        ),
        "spec.trafficPolicy.loadBalancer.consistentHash",
        "exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName is",
        id="no hash key",
    ),
    pytest.param(
        destination_rule(
            trafficPolicy={"loadBalancer": {"consistentHash": {"httpCookie": {"ttl": "1s"}}}}
        ),
        "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name",
        "required",
        id="cookie without name",
    ),
    pytest.param(
        destination_rule(trafficPolicy={"connectionPool": {"tcp": {"maxConnections": -1}}}),
        "spec.trafficPolicy.connectionPool.tcp.maxConnections",
        "must be an integer 0-2147483647, not -1",
        id="negative connections",
    ),
    pytest.param(
        destination_rule(trafficPolicy={"outlierDetection": {"maxEjectionPercent": 101}}),
        "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
        "must be an integer 0-100, not 101",
        id="ejection percent",
    ),
    pytest.param(
        destination_rule(
            subsets=[
                {"name": "v1", "labels": {"a": "b"}, "trafficPolicy": {"portLevelSettings": []}}
            ]
        ),
        "spec.subsets[0].trafficPolicy.portLevelSettings",
        "not supported by Shoal",
        id="subset policy",
    ),
    # metadata and kinds
    pytest.param(
        edit(virtual_service(), lambda d: d["metadata"].update(name="Reviews")),
        "metadata.name",
        "invalid name 'Reviews'",
        id="bad name",
    ),
    pytest.param(
        edit(virtual_service(), lambda d: d["metadata"].update(namespace="a.b")),
        "metadata.namespace",
        "invalid namespace 'a.b'",
        id="bad namespace",
    ),
    pytest.param(
        edit(virtual_service(), lambda d: d.update(extra=1)),
        "extra",
        "unknown field",
        id="unknown top field",
    ),
    pytest.param(
        edit(virtual_service(), lambda d: d.update(apiVersion="networking.istio.io/v2")),
        "apiVersion",
        "unsupported version 'networking.istio.io/v2' (use one of v1, v1beta1, v1alpha3)",
        id="unknown version",
    ),
    pytest.param(
        edit(virtual_service(), lambda d: d.update(kind="Route")),
        "kind",
        "unknown kind 'Route'",
        id="unknown istio kind",
    ),
    pytest.param(
        edit(virtual_service(), lambda d: d.pop("kind")), "kind", "required", id="no kind"
    ),
]


@pytest.mark.parametrize(("document", "field", "reason"), REJECTED)
def test_rejected(document: dict[str, Any], field: str, reason: str) -> None:
    message = error_of(document)
    who = document.get("kind", "resource")
    if "name" in document["metadata"]:
        who += f" {document['metadata'].get('namespace', 'default')}/{document['metadata']['name']}"
    assert message.startswith(f"{SOURCE}: {who}: "), message
    assert f": {field}: " in message, message
    assert reason in message.split(f": {field}: ", 1)[1], message


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}},
            f"{SOURCE}: Deployment default/web: unsupported kind Deployment (apps/v1); "
            "Shoal reads networking.istio.io and shoal.io/v1 resources",
        ),
        (
            {"apiVersion": "shoal.io/v1", "kind": "RateLimit", "metadata": {"name": "r"}},
            f"{SOURCE}: RateLimit default/r: kind: unknown kind 'RateLimit' "
            "(Shoal's own: CircuitBreakerPolicy, RateLimitPolicy, BackupRequestPolicy, RpcRoute)",
        ),
        (
            {"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": {"name": "g"}},
            f"{SOURCE}: Gateway default/g: Gateway is not supported by Shoal",
        ),
        (["not", "a", "mapping"], f"{SOURCE}: a resource must be a mapping, not a list"),
    ],
)
def test_kinds_shoal_does_not_read(document: Any, message: str) -> None:
    assert error_of(document) == message


def test_map_keys_with_dots_are_quoted_in_paths() -> None:
    document = destination_rule(subsets=[{"name": "v1", "labels": {"app.io/name": 3}}])
    assert error_of(document).endswith(
        "spec.subsets[0].labels['app.io/name']: must be a string, not 3"
    )


def test_single_destination_needs_no_weight() -> None:
    only = parse(virtual_service()).http[0].route
    assert only == (HTTPRouteDestination(Destination("reviews"), 0),)
