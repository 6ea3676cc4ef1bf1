"""The strictness rule: every set field must be one shoal implements.

Internal to :mod:`shoal.config.envoy`. One table lists, per Envoy message, the fields shoal
implements (or safely ignores, like names and stat prefixes); :func:`check` walks a parsed
message, including every ``typed_config``, and raises for anything else, so a config never
means more than shoal does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from google.protobuf.message import Message

from shoal.config.envoy_fields import NOT_YET, Ctx, unpack

_ANY = "google.protobuf.Any"

# Message full name → the fields shoal implements (or safely ignores: names, stat prefixes).
# A set field missing here is an error, so a config never means more than shoal does.
# Messages not listed accept no fields at all; google.protobuf.* values are leaves.
_SUPPORTED: dict[str, frozenset[str]] = {
    name: frozenset(fields.split())
    for name, fields in {
        "envoy.config.bootstrap.v3.Bootstrap": "node static_resources dynamic_resources admin",
        "envoy.config.bootstrap.v3.Bootstrap.DynamicResources": "lds_config cds_config ads_config",
        "envoy.config.core.v3.ApiConfigSource": (
            "api_type transport_api_version grpc_services set_node_on_first_message_only"
        ),
        "envoy.config.core.v3.ConfigSource": "ads resource_api_version initial_fetch_timeout",
        "envoy.config.cluster.v3.Cluster.EdsClusterConfig": "eds_config service_name",
        "envoy.config.bootstrap.v3.Bootstrap.StaticResources": "listeners clusters",
        "envoy.config.bootstrap.v3.Admin": "address access_log access_log_path",
        "envoy.config.core.v3.Node": (
            "id cluster metadata locality user_agent_name user_agent_version"
        ),
        "envoy.config.core.v3.Locality": "region zone sub_zone",
        "envoy.config.core.v3.Address": "socket_address",
        "envoy.config.core.v3.SocketAddress": "address port_value",
        "envoy.config.core.v3.DataSource": "inline_string inline_bytes",
        "envoy.config.core.v3.HeaderValueOption": "header append append_action",
        "envoy.config.core.v3.HeaderValue": "key value",
        "envoy.config.core.v3.SubstitutionFormatString": (
            "text_format text_format_source json_format"
        ),
        "envoy.config.accesslog.v3.AccessLog": "name typed_config",
        "envoy.extensions.access_loggers.file.v3.FileAccessLog": (
            "path format json_format log_format"
        ),
        # listeners
        "envoy.config.listener.v3.Listener": (
            "name address stat_prefix filter_chains per_connection_buffer_limit_bytes"
            " listener_filters traffic_direction"
        ),
        "envoy.config.listener.v3.ListenerFilter": "name typed_config",
        "envoy.config.listener.v3.FilterChain": (
            "name filters filter_chain_match transport_socket"
        ),
        "envoy.config.listener.v3.FilterChainMatch": (
            "application_protocols server_names transport_protocol"
        ),
        # TLS (config/envoy_tls.py)
        "envoy.config.core.v3.TransportSocket": "name typed_config",
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext": (
            "common_tls_context require_client_certificate"
        ),
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext": "common_tls_context sni",
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext": (
            "tls_params tls_certificates validation_context alpn_protocols"
        ),
        "envoy.extensions.transport_sockets.tls.v3.TlsParameters": (
            "tls_minimum_protocol_version tls_maximum_protocol_version"
        ),
        "envoy.extensions.transport_sockets.tls.v3.TlsCertificate": (
            "certificate_chain private_key"
        ),
        "envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext": (
            "trusted_ca match_typed_subject_alt_names"
        ),
        "envoy.extensions.transport_sockets.tls.v3.SubjectAltNameMatcher": "san_type matcher",
        "xds.type.v3.TypedStruct": "type_url value",
        # generic proxy (RPC protocols)
        "envoy.extensions.filters.network.generic_proxy.v3.GenericProxy": (
            "stat_prefix codec_config route_config filters access_log"
        ),
        "envoy.config.core.v3.TypedExtensionConfig": "name typed_config",
        "envoy.extensions.filters.network.generic_proxy.v3.RouteConfiguration": (
            "name routes virtual_hosts"
        ),
        "envoy.extensions.filters.network.generic_proxy.v3.VirtualHost": "name hosts routes",
        "xds.type.matcher.v3.Matcher": "matcher_list on_no_match",
        "xds.type.matcher.v3.Matcher.MatcherList": "matchers",
        "xds.type.matcher.v3.Matcher.MatcherList.FieldMatcher": "predicate on_match",
        "xds.type.matcher.v3.Matcher.MatcherList.Predicate": "single_predicate and_matcher",
        "xds.type.matcher.v3.Matcher.MatcherList.Predicate.SinglePredicate": "input value_match",
        "xds.type.matcher.v3.Matcher.MatcherList.Predicate.PredicateList": "predicate",
        "xds.type.matcher.v3.Matcher.OnMatch": "action",
        "xds.core.v3.TypedExtensionConfig": "name typed_config",
        "xds.type.matcher.v3.StringMatcher": "exact prefix suffix safe_regex contains ignore_case",
        "xds.type.matcher.v3.RegexMatcher": "google_re2 regex",
        "xds.type.matcher.v3.RegexMatcher.GoogleRE2": "",
        "envoy.extensions.filters.network.generic_proxy.matcher.v3.PropertyMatchInput": (
            "property_name"
        ),
        "envoy.extensions.filters.network.generic_proxy.action.v3.RouteAction": (
            "name cluster weighted_clusters metadata per_filter_config timeout retry_policy"
        ),
        "envoy.config.core.v3.RetryPolicy": "num_retries retry_on",
        "envoy.config.listener.v3.Filter": "name typed_config",
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager": (
            "codec_type stat_prefix route_config http_filters common_http_protocol_options"
            " server_name max_request_headers_kb stream_idle_timeout request_timeout"
            " request_headers_timeout drain_timeout access_log use_remote_address"
            " xff_num_trusted_hops skip_xff_append generate_request_id"
            " strip_matching_host_port upgrade_configs tracing http2_protocol_options"
        ),
        "envoy.config.core.v3.Http2ProtocolOptions": "connection_keepalive",
        "envoy.config.core.v3.KeepaliveSettings": "interval timeout",
        # tracing (config/envoy_telemetry.py)
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
        ".Tracing": (
            "client_sampling random_sampling overall_sampling custom_tags provider"
            " max_path_tag_length spawn_upstream_span"
        ),
        "envoy.config.trace.v3.Tracing.Http": "name typed_config",
        "envoy.config.trace.v3.ZipkinConfig": (
            "collector_cluster collector_endpoint trace_id_128bit shared_span_context"
            " collector_endpoint_version collector_hostname trace_context_option"
        ),
        "envoy.config.trace.v3.OpenTelemetryConfig": "grpc_service http_service service_name",
        "envoy.config.core.v3.HttpService": "http_uri",
        "envoy.config.core.v3.HttpUri": "uri cluster timeout",
        "envoy.type.tracing.v3.CustomTag": "tag literal request_header",
        "envoy.type.tracing.v3.CustomTag.Literal": "value",
        "envoy.type.tracing.v3.CustomTag.Header": "name default_value",
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter": (
            "name typed_config"
        ),
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
        ".UpgradeConfig": "upgrade_type enabled",
        "envoy.extensions.filters.http.router.v3.Router": "dynamic_stats start_child_span",
        "envoy.extensions.filters.http.buffer.v3.Buffer": "max_request_bytes",
        "envoy.extensions.filters.http.fault.v3.HTTPFault": (
            "delay abort upstream_cluster headers max_active_faults"
        ),
        "envoy.extensions.filters.http.fault.v3.FaultAbort": (
            "http_status grpc_status header_abort percentage"
        ),
        "envoy.extensions.filters.common.fault.v3.FaultDelay": (
            "fixed_delay header_delay percentage"
        ),
        "envoy.type.v3.FractionalPercent": "numerator denominator",
        "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit": (
            "stat_prefix status token_bucket filter_enabled filter_enforced"
            " response_headers_to_add local_rate_limit_per_downstream_connection"
            " enable_x_ratelimit_headers"
        ),
        "envoy.type.v3.HttpStatus": "code",
        "envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency": (
            "gradient_controller_config enabled concurrency_limit_exceeded_status"
        ),
        "envoy.extensions.filters.http.adaptive_concurrency.v3.GradientControllerConfig": (
            "sample_aggregate_percentile concurrency_limit_params min_rtt_calc_params"
        ),
        "envoy.extensions.filters.http.adaptive_concurrency.v3.GradientControllerConfig"
        ".ConcurrencyLimitCalculationParams": "max_concurrency_limit concurrency_update_interval",
        "envoy.extensions.filters.http.adaptive_concurrency.v3.GradientControllerConfig"
        ".MinimumRTTCalculationParams": (
            "interval fixed_value request_count jitter min_concurrency buffer"
        ),
        "envoy.config.core.v3.RuntimeFeatureFlag": "default_value runtime_key",
        "envoy.extensions.filters.http.ratelimit.v3.RateLimit": (
            "domain timeout failure_mode_deny rate_limit_service status_on_error"
            " rate_limited_status disable_x_envoy_ratelimited_header rate_limits"
        ),
        "envoy.config.ratelimit.v3.RateLimitServiceConfig": "grpc_service transport_api_version",
        "envoy.config.core.v3.GrpcService": "envoy_grpc timeout",
        "envoy.config.core.v3.GrpcService.EnvoyGrpc": "cluster_name",
        "envoy.config.route.v3.RateLimit": "actions",
        "envoy.config.route.v3.RateLimit.Action": (
            "generic_key request_headers remote_address destination_cluster header_value_match"
        ),
        "envoy.config.route.v3.RateLimit.Action.GenericKey": "descriptor_value descriptor_key",
        "envoy.config.route.v3.RateLimit.Action.RequestHeaders": (
            "header_name descriptor_key skip_if_absent"
        ),
        "envoy.config.route.v3.RateLimit.Action.HeaderValueMatch": (
            "descriptor_key descriptor_value expect_match headers"
        ),
        "envoy.type.v3.TokenBucket": "max_tokens tokens_per_fill fill_interval",
        "envoy.config.core.v3.RuntimeFractionalPercent": "default_value runtime_key",
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy": (
            "stat_prefix cluster weighted_clusters idle_timeout access_log max_connect_attempts"
        ),
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster": "clusters",
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster.ClusterWeight": (
            "name weight"
        ),
        # routes
        "envoy.config.route.v3.RouteConfiguration": (
            "name virtual_hosts request_headers_to_add request_headers_to_remove"
            " response_headers_to_add response_headers_to_remove"
        ),
        "envoy.config.route.v3.VirtualHost": (
            "name domains routes retry_policy request_headers_to_add request_headers_to_remove"
            " response_headers_to_add response_headers_to_remove typed_per_filter_config"
            " hedge_policy"
        ),
        "envoy.config.route.v3.Route": (
            "name match route redirect direct_response request_headers_to_add"
            " request_headers_to_remove response_headers_to_add response_headers_to_remove"
            " typed_per_filter_config metadata stat_prefix"
        ),
        "envoy.config.route.v3.RouteMatch": (
            "prefix path safe_regex case_sensitive headers query_parameters"
        ),
        "envoy.config.route.v3.HeaderMatcher": (
            "name exact_match prefix_match suffix_match contains_match safe_regex_match"
            " present_match string_match invert_match"
        ),
        "envoy.config.route.v3.QueryParameterMatcher": "name string_match present_match",
        "envoy.type.matcher.v3.StringMatcher": (
            "exact prefix suffix contains safe_regex ignore_case"
        ),
        "envoy.type.matcher.v3.RegexMatcher": "regex google_re2",
        "envoy.type.matcher.v3.RegexMatcher.GoogleRE2": "max_program_size",
        "envoy.type.matcher.v3.RegexMatchAndSubstitute": "pattern substitution",
        "envoy.config.route.v3.RouteAction": (
            "cluster weighted_clusters prefix_rewrite regex_rewrite host_rewrite_literal"
            " auto_host_rewrite timeout idle_timeout max_stream_duration retry_policy hash_policy"
            " hedge_policy request_mirror_policies"
        ),
        "envoy.config.route.v3.RouteAction.RequestMirrorPolicy": "cluster runtime_fraction",
        "envoy.config.route.v3.HedgePolicy": "hedge_on_per_try_timeout",
        "envoy.config.route.v3.RouteAction.MaxStreamDuration": "max_stream_duration",
        "envoy.config.route.v3.WeightedCluster": "clusters total_weight",
        "envoy.config.route.v3.WeightedCluster.ClusterWeight": (
            "name weight request_headers_to_add request_headers_to_remove"
            " response_headers_to_add response_headers_to_remove"
        ),
        "envoy.config.route.v3.RetryPolicy": (
            "retry_on num_retries per_try_timeout retriable_status_codes retry_back_off"
            " retry_host_predicate host_selection_retry_max_attempts"
        ),
        "envoy.config.route.v3.RetryPolicy.RetryBackOff": "base_interval max_interval",
        "envoy.config.route.v3.RetryPolicy.RetryHostPredicate": "name typed_config",
        "envoy.config.route.v3.RouteAction.HashPolicy": (
            "header cookie connection_properties query_parameter terminal"
        ),
        "envoy.config.route.v3.RouteAction.HashPolicy.Header": "header_name",
        "envoy.config.route.v3.RouteAction.HashPolicy.Cookie": "name ttl path",
        "envoy.config.route.v3.RouteAction.HashPolicy.ConnectionProperties": "source_ip",
        "envoy.config.route.v3.RouteAction.HashPolicy.QueryParameter": "name",
        "envoy.config.route.v3.DirectResponseAction": "status body",
        "envoy.config.route.v3.RedirectAction": (
            "scheme_redirect https_redirect host_redirect port_redirect path_redirect"
            " prefix_rewrite response_code strip_query"
        ),
        # clusters
        "envoy.config.cluster.v3.Cluster": (
            "name alt_stat_name type connect_timeout lb_policy ring_hash_lb_config"
            " maglev_lb_config least_request_lb_config load_assignment circuit_breakers"
            " dns_refresh_rate dns_lookup_family per_connection_buffer_limit_bytes"
            " typed_extension_protocol_options max_requests_per_connection common_lb_config"
            " outlier_detection health_checks metadata eds_cluster_config transport_socket"
        ),
        # metadata changes nothing in Envoy; shoal reads filter_metadata["shoal.circuit_breaker"]
        # (config/envoy_breaker.py) and ["shoal.backup_request"] (config/envoy_backup.py) and
        # ignores every other key
        "envoy.config.core.v3.Metadata": "filter_metadata",
        "envoy.config.cluster.v3.OutlierDetection": (
            "consecutive_5xx interval base_ejection_time max_ejection_percent"
            " enforcing_consecutive_5xx enforcing_success_rate success_rate_minimum_hosts"
            " success_rate_request_volume success_rate_stdev_factor consecutive_gateway_failure"
            " enforcing_consecutive_gateway_failure split_external_local_origin_errors"
            " consecutive_local_origin_failure enforcing_consecutive_local_origin_failure"
            " enforcing_local_origin_success_rate failure_percentage_threshold"
            " enforcing_failure_percentage enforcing_failure_percentage_local_origin"
            " failure_percentage_minimum_hosts failure_percentage_request_volume"
            " max_ejection_time max_ejection_time_jitter"
            " successful_active_health_check_uneject_host always_eject_one_host"
        ),
        "envoy.config.core.v3.HealthCheck": (
            "timeout interval initial_jitter interval_jitter interval_jitter_percent"
            " unhealthy_threshold healthy_threshold reuse_connection http_health_check"
            " tcp_health_check grpc_health_check no_traffic_interval no_traffic_healthy_interval"
            " unhealthy_interval unhealthy_edge_interval healthy_edge_interval"
        ),
        "envoy.config.core.v3.HealthCheck.HttpHealthCheck": (
            "host path request_headers_to_add request_headers_to_remove expected_statuses"
            " retriable_statuses method"
        ),
        "envoy.config.core.v3.HealthCheck.TcpHealthCheck": "send receive",
        "envoy.config.core.v3.HealthCheck.GrpcHealthCheck": (
            "service_name authority initial_metadata"
        ),
        "envoy.config.core.v3.HealthCheck.Payload": "text binary",
        "envoy.type.v3.Int64Range": "start end",
        "envoy.config.cluster.v3.Cluster.RingHashLbConfig": "minimum_ring_size maximum_ring_size",
        "envoy.config.cluster.v3.Cluster.MaglevLbConfig": "table_size",
        "envoy.config.cluster.v3.Cluster.LeastRequestLbConfig": "choice_count",
        "envoy.config.cluster.v3.CircuitBreakers": "thresholds",
        "envoy.config.cluster.v3.CircuitBreakers.Thresholds": (
            "priority max_connections max_pending_requests max_requests max_retries track_remaining"
            " retry_budget"
        ),
        "envoy.config.cluster.v3.CircuitBreakers.Thresholds.RetryBudget": (
            "budget_percent min_retry_concurrency"
        ),
        "envoy.type.v3.Percent": "value",
        "envoy.config.endpoint.v3.ClusterLoadAssignment": "cluster_name endpoints policy",
        "envoy.config.endpoint.v3.ClusterLoadAssignment.Policy": "overprovisioning_factor",
        "envoy.config.endpoint.v3.LocalityLbEndpoints": (
            "locality lb_endpoints load_balancing_weight priority"
        ),
        "envoy.config.endpoint.v3.LbEndpoint": "endpoint health_status load_balancing_weight",
        "envoy.config.endpoint.v3.Endpoint": "address hostname",
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": (
            "common_http_protocol_options explicit_http_config use_downstream_protocol_config"
        ),
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.UseDownstreamHttpConfig": (
            "http_protocol_options http2_protocol_options"
        ),
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.ExplicitHttpConfig": (
            "http_protocol_options http2_protocol_options"
        ),
    }.items()
}

# Where one message type means different things in different places: (parent, field) → fields.
_SUPPORTED_AT: dict[tuple[str, str], frozenset[str]] = {
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "common_http_protocol_options",
    ): frozenset({"idle_timeout", "max_stream_duration"}),
    (
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "common_http_protocol_options",
    ): frozenset({"idle_timeout", "max_requests_per_connection"}),
}

# TLS certificates, keys and CAs may come from files (read when the config is loaded); other
# DataSources (access log formats) are inline only.
_TLS_DATA = frozenset({"filename", "inline_string", "inline_bytes"})
_SUPPORTED_AT.update(
    {
        ("envoy.extensions.transport_sockets.tls.v3.TlsCertificate", "certificate_chain"): (
            _TLS_DATA
        ),
        ("envoy.extensions.transport_sockets.tls.v3.TlsCertificate", "private_key"): _TLS_DATA,
        (
            "envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext",
            "trusted_ca",
        ): _TLS_DATA,
    }
)

# Better reasons than "field not supported by shoal" for fields people often set.
_WHY_NOT: dict[tuple[str, str], str] = {
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "rds",
    ): "rds is supported in listeners from LDS only; use an inline route_config",
    (
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext",
        "tls_certificate_sds_secret_configs",
    ): f"SDS {NOT_YET}; use tls_certificates (files or inline)",
    (
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext",
        "validation_context_sds_secret_config",
    ): f"SDS {NOT_YET}; use validation_context.trusted_ca",
    (
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext",
        "combined_validation_context",
    ): f"combined_validation_context is {NOT_YET}; use validation_context",
    (
        "envoy.extensions.transport_sockets.tls.v3.TlsParameters",
        "cipher_suites",
    ): f"cipher_suites is {NOT_YET} (OpenSSL's defaults are used)",
    (
        "envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext",
        "match_subject_alt_names",
    ): "deprecated in Envoy and not supported; use match_typed_subject_alt_names",
    (
        "envoy.config.core.v3.Metadata",
        "typed_filter_metadata",
    ): (
        "typed_filter_metadata is not supported; shoal reads"
        ' filter_metadata["shoal.circuit_breaker"] and ["shoal.backup_request"]'
    ),
    (
        "envoy.config.core.v3.HealthCheck.HttpHealthCheck",
        "codec_client_type",
    ): f"HTTP/2 and HTTP/3 health checks are {NOT_YET}",
    (
        "envoy.config.cluster.v3.OutlierDetection",
        "monitors",
    ): f"outlier detection monitor extensions are {NOT_YET}",
    (
        "envoy.config.route.v3.VirtualHost",
        "virtual_clusters",
    ): f"virtual_clusters are {NOT_YET}; a route's stat_prefix gives the same stats per route",
    (
        "envoy.config.route.v3.RouteAction.RequestMirrorPolicy",
        "trace_sampled",
    ): f"trace_sampled is {NOT_YET} (mirrored requests are not traced)",
    (
        "envoy.type.tracing.v3.CustomTag",
        "environment",
    ): "only literal and request_header custom tags are supported",
    (
        "envoy.type.tracing.v3.CustomTag",
        "metadata",
    ): "only literal and request_header custom tags are supported",
    (
        "envoy.config.trace.v3.OpenTelemetryConfig",
        "sampler",
    ): "sampler extensions are not supported; use the connection manager's *_sampling",
    (
        "envoy.config.trace.v3.ZipkinConfig",
        "collector_service",
    ): "collector_service is not supported; use collector_cluster and collector_endpoint",
}


def check(msg: Message, ctx: Ctx, allowed: frozenset[str] | None = None) -> None:
    """Raise for the first set field shoal does not implement, walking every sub-message and
    every typed_config, so that no behaviour-changing setting is silently dropped."""
    name = msg.DESCRIPTOR.full_name
    if allowed is None:
        allowed = _SUPPORTED.get(name, frozenset())
    for fd, value in msg.ListFields():
        if fd.name not in allowed:
            reason = _WHY_NOT.get((name, fd.name), "field not supported by shoal")
            raise ctx.at(fd.name).error(reason)
        if fd.message_type is None:
            continue
        for child, where in _children(fd, value, ctx):
            child_name = child.DESCRIPTOR.full_name
            if child_name == _ANY:
                check(unpack(child, where), where)
            elif not child_name.startswith("google.protobuf."):
                check(child, where, _SUPPORTED_AT.get((name, fd.name)))


def _children(fd: Any, value: Any, ctx: Ctx) -> Iterator[tuple[Message, Ctx]]:
    """The sub-messages held by one set field (singular, repeated or map), with paths."""
    entry = fd.message_type
    if entry.GetOptions().map_entry:
        if entry.fields_by_name["value"].message_type is not None:
            for key, item in value.items():
                yield item, ctx.at(f"{fd.name}[{key}]")
    elif fd.is_repeated:
        for index, item in enumerate(value):
            yield item, ctx.at(fd.name, index)
    else:
        yield value, ctx.at(fd.name)
