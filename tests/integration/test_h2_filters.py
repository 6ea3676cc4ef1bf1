"""What an HTTP/1.1 request gets, an HTTP/2 stream gets too: HTTP filters, error-rate
breakers, tracing, route stats, hash policies and per-try timeouts. grpcio and curl
(`--http2-prior-knowledge`) through a ``codec_type: HTTP2`` listener, checked by what the
clients get, the proxy's stats, and spans at a real OTLP receiver."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from tests.conftest import Echo, free_port, route_to, static_cluster
from tests.integration.mesh_helpers import eventually
from tests.integration.test_h2_proxy import (
    SERVICE,
    GrpcServer,
    H2Upstream,
    call,
    curl,
    grpc_server,
    h2_cluster,
    h2_upstream,
    proxy_config,
)
from tests.integration.test_mirror_and_cookie import Recorder, recorder, settled
from tests.integration.test_telemetry import Collector, collector, tracing

__all__ = ["collector", "grpc_server", "h2_upstream", "recorder"]  # fixtures used here

FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
RATELIMIT = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
BUFFER = "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer"
ALWAYS = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}


def with_filters(config: dict[str, Any], *filters: dict[str, Any]) -> dict[str, Any]:
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    manager["typed_config"]["http_filters"][:0] = filters
    return config


def header_fault() -> dict[str, Any]:
    everyone = {"numerator": 100}
    fault = {
        "@type": FAULT,
        "abort": {"header_abort": {}, "percentage": everyone},
        "delay": {"header_delay": {}, "percentage": everyone},
    }
    return {"name": "envoy.filters.http.fault", "typed_config": fault}


def test_fault_injection_on_grpc_and_h2c(
    make_proxy: Any, grpc_server: GrpcServer, h2_upstream: H2Upstream
) -> None:
    port = free_port()
    config = proxy_config(
        port,
        [h2_cluster("grpc", grpc_server.port), h2_cluster("plain", h2_upstream.port)],
        [route_to("grpc", "/" + SERVICE), route_to("plain")],
    )
    proxy = make_proxy(with_filters(config, header_fault()))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as aborted:
            call(channel, "Unary")(
                b"x", timeout=5, metadata=[("x-envoy-fault-abort-request", "503")]
            )
        assert aborted.value.code() is grpc.StatusCode.UNAVAILABLE
        assert aborted.value.details() == "fault filter abort"
        started = time.monotonic()
        delayed = call(channel, "Unary")(
            b"late", timeout=5, metadata=[("x-envoy-fault-delay-request", "400")]
        )
        assert delayed == b"hello late"
        assert time.monotonic() - started >= 0.4
        assert call(channel, "Unary")(b"x", timeout=5) == b"hello x"
    h2 = curl(
        "--http2-prior-knowledge", "-H", "x-envoy-fault-abort-request: 418",
        "-w", "%{http_code} %{http_version}", f"http://127.0.0.1:{port}/any",
    )  # fmt: skip
    assert h2.stdout == "fault filter abort418 2"
    stats = proxy.stats()
    assert stats["http.ingress.fault.aborts_injected"] == 2
    assert stats["http.ingress.fault.delays_injected"] == 1
    assert stats["cluster.grpc.upstream_rq_total"] == 2  # the aborted call never left


def test_local_rate_limit_on_http2(make_proxy: Any, grpc_server: GrpcServer) -> None:
    limit = {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": RATELIMIT,
            "stat_prefix": "rl",
            "token_bucket": {"max_tokens": 3, "tokens_per_fill": 3, "fill_interval": "60s"},
            "filter_enabled": ALWAYS,
            "filter_enforced": ALWAYS,
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
        },
    }
    port = free_port()
    config = proxy_config(port, [h2_cluster("grpc", grpc_server.port)], [route_to("grpc")])
    proxy = make_proxy(with_filters(config, limit))
    codes = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for _ in range(4):
            try:
                call(channel, "Unary")(b"x", timeout=5)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
    assert codes == [grpc.StatusCode.OK] * 3 + [grpc.StatusCode.UNAVAILABLE]  # 429 → 14
    h2 = curl("--http2-prior-knowledge", "-i", f"http://127.0.0.1:{port}/")
    assert h2.stdout.startswith("HTTP/2 429")
    assert "x-ratelimit-limit: 3" in h2.stdout
    stats = proxy.stats()
    assert stats["rl.http_local_rate_limit.ok"] == 3
    assert stats["rl.http_local_rate_limit.enforced"] == 2


def test_buffer_filter_on_http2(make_proxy: Any, h2_upstream: H2Upstream, tmp_path: Path) -> None:
    """The whole body is held (the client is given credit past its first window) and sent
    on once complete; a body over max_request_bytes is answered 413."""
    buffer = {
        "name": "envoy.filters.http.buffer",
        "typed_config": {"@type": BUFFER, "max_request_bytes": 1_000_000},
    }
    port = free_port()
    config = proxy_config(port, [h2_cluster("plain", h2_upstream.port)], [route_to("plain")])
    proxy = make_proxy(with_filters(config, buffer))
    small, large = tmp_path / "small", tmp_path / "large"
    small.write_bytes(b"s" * 300_000)  # past the 64 KiB initial window
    large.write_bytes(b"l" * 2_000_000)
    url = f"http://127.0.0.1:{port}/upload"
    ok = curl("--http2-prior-knowledge", "--data-binary", f"@{small}", url)
    assert ok.stdout == "h2 POST /upload 300000"
    # nghttp: curl reports the RST_STREAM(NO_ERROR) after the answer as an error (RFC 9113
    # §8.1 lets a server answer before the upload ends, then stop it that way)
    refused = subprocess.run(
        ["nghttp", "-v", "-d", str(large), url],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert ":status: 413" in refused.stdout
    assert "error_code=NO_ERROR" in refused.stdout
    stats = proxy.stats()
    assert stats["cluster.plain.upstream_rq_total"] == 1


def test_error_rate_breaker_on_grpc(make_proxy: Any, grpc_server: GrpcServer) -> None:
    """Calls to a dead cluster fail (UNAVAILABLE from the proxy) until the cluster's
    breaker opens; then its local fallback answers, as a gRPC status."""
    policy = {
        "window_size": 10,
        "minimum_requests": 4,
        "error_ratio": 0.5,
        "open_duration": "30s",
        "fallback": {"local_reply": {"status": 503, "body": "svc is resting"}},
    }
    dead = static_cluster(
        "dead",
        free_port(),
        typed_extension_protocol_options=h2_cluster("x", 1)["typed_extension_protocol_options"],
        metadata={"filter_metadata": {"shoal.circuit_breaker": policy}},
    )
    port = free_port()
    proxy = make_proxy(proxy_config(port, [dead], [route_to("dead")]))
    details = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for _ in range(6):
            with pytest.raises(grpc.RpcError) as failed:
                call(channel, "Unary")(b"x", timeout=5, wait_for_ready=False)
            assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
            details.append(failed.value.details())
    assert details[-1] == "svc is resting"
    assert details[0] != "svc is resting"
    stats = proxy.stats()
    assert stats["cluster.dead.circuit_breaker.fallback_local"] >= 1


class TraceEcho:
    """A gRPC server whose one method answers with the trace headers it was sent."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))

        def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
            sent = dict(context.invocation_metadata())
            return f"{sent.get('traceparent')} {sent.get('x-request-id')}".encode()

        handler = grpc.unary_unary_rpc_method_handler(echo)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Trace": handler}),)
        )
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()


@pytest.fixture
def trace_echo() -> Iterator[TraceEcho]:
    server = TraceEcho()
    yield server
    server.server.stop(0)


def test_grpc_calls_are_traced(
    make_proxy: Any, trace_echo: TraceEcho, collector: Collector
) -> None:
    """A call with a W3C context gets a child span, sent upstream in ``traceparent`` and
    exported (OTLP over gRPC) with Envoy's tags."""
    tracing_config, collector_cluster = tracing("otlp-grpc", collector)
    port = free_port()
    config = proxy_config(
        port,
        [h2_cluster("grpc", trace_echo.port), collector_cluster],
        [route_to("grpc")],
        tracing=tracing_config,
    )
    make_proxy(config)
    trace, caller = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = call(channel, "Trace")(
            b"", timeout=5, metadata=[("traceparent", f"00-{trace}-{caller}-01")]
        )
    traceparent, request_id = answer.decode().split(" ")
    version, sent_trace, own, flags = traceparent.split("-")
    assert (version, sent_trace, flags) == ("00", trace, "01")
    assert own != caller
    (span,) = collector.trace(trace, 1)
    assert (span.span_id, span.parent_id, span.kind) == (own, caller, "SERVER")
    assert span.tags["http.protocol"] == "HTTP/2"
    assert span.tags["http.status_code"] == "200"
    assert span.tags["upstream_cluster"] == "grpc"
    assert span.tags["guid:x-request-id"] == request_id
    assert span.tags["http.url"].endswith(f"/{SERVICE}/Trace")


def test_route_stats_count_grpc_streams(make_proxy: Any, grpc_server: GrpcServer) -> None:
    """A route's stat_prefix counts HTTP/2 streams as HTTP/1.1 requests: tries, codes,
    retries past the limit, timeouts and the upstream time of answered streams."""
    port = free_port()
    dead = h2_cluster("dead", free_port())
    retry = {"retry_on": "connect-failure", "num_retries": 1}
    routes = [
        {**route_to("dead", f"/{SERVICE}/Join", retry_policy=retry), "stat_prefix": "join"},
        {**route_to("grpc", f"/{SERVICE}/Slow", timeout="0.3s"), "stat_prefix": "slow"},
        {**route_to("grpc", f"/{SERVICE}/Unary"), "stat_prefix": "unary"},
    ]
    proxy = make_proxy(proxy_config(port, [h2_cluster("grpc", grpc_server.port), dead], routes))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for _ in range(3):
            assert call(channel, "Unary")(b"x", timeout=5) == b"hello x"
        with pytest.raises(grpc.RpcError):
            call(channel, "Slow")(b"x", timeout=5)
        with pytest.raises(grpc.RpcError):
            call(channel, "Join", "stream_unary")(iter([b"a"]), timeout=5)
    stats = proxy.stats()
    assert stats["vhost.all.route.unary.upstream_rq_total"] == 3
    assert stats["vhost.all.route.unary.upstream_rq_200"] == 3
    assert stats["vhost.all.route.unary.upstream_rq_completed"] == 3
    assert stats["vhost.all.route.slow.upstream_rq_timeout"] == 1
    assert stats["vhost.all.route.join.upstream_rq_total"] == 2  # the try and its retry
    assert stats["vhost.all.route.join.upstream_rq_retry"] == 1
    assert stats["vhost.all.route.join.upstream_rq_retry_limit_exceeded"] == 1
    prometheus = proxy.admin("/stats/prometheus")[1]
    tags = 'envoy_virtual_host="all",envoy_route="unary"'
    assert f"envoy_vhost_route_upstream_rq_time_count{{{tags}}} 3\n" in prometheus


def test_hash_policy_and_generated_cookie_on_http2(
    make_proxy: Any, echo_a: Echo, echo_b: Echo
) -> None:
    """Ring hash by header keeps a user on one host; a cookie policy with a ttl sets its
    generated cookie on the HTTP/2 answer (the HTTP/1.1 cluster is reached translated)."""
    port = free_port()
    ring = static_cluster("ring", echo_a.port, echo_b.port, lb_policy="RING_HASH")
    by_user = route_to("ring", "/user", hash_policy=[{"header": {"header_name": "x-user"}}])
    by_cookie = route_to(
        "ring", "/sticky", hash_policy=[{"cookie": {"name": "sticky", "ttl": "60s"}}]
    )
    make_proxy(proxy_config(port, [ring], [by_user, by_cookie]))
    base = f"http://127.0.0.1:{port}"

    def served_by(user: str) -> set[str]:
        urls = [f"{base}/user"] * 4
        got = curl("--http2-prior-knowledge", "-H", f"x-user: {user}", *urls)
        return {json.loads(line)["service"] for line in got.stdout.splitlines()}

    picks = [served_by(f"user-{n}") for n in range(24)]  # all on one host: p < 1e-6
    assert all(len(pick) == 1 for pick in picks)  # each user sticks to one host
    assert set().union(*picks) == {"a", "b"}  # and users spread over both
    sticky = curl("--http2-prior-knowledge", "-i", f"{base}/sticky")
    assert re.search(
        r'^set-cookie: sticky="[0-9a-f]{16}"; Max-Age=60; HttpOnly', sticky.stdout, re.M
    )


def test_per_try_timeout_on_grpc(make_proxy: Any, grpc_server: GrpcServer) -> None:
    """Each try gets per_try_timeout; a timed-out try is retried (retry_on 5xx), and the
    last one's timeout answers DEADLINE_EXCEEDED long before the server would have."""
    port = free_port()
    retry = {"retry_on": "5xx", "num_retries": 1, "per_try_timeout": "0.3s"}
    config = proxy_config(
        port, [h2_cluster("grpc", grpc_server.port)], [route_to("grpc", retry_policy=retry)]
    )
    proxy = make_proxy(config)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as timed_out:
            call(channel, "Slow")(b"x", timeout=10)  # the server takes 3 s
        assert timed_out.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.5 < time.monotonic() - started < 2.5
    stats = proxy.stats()
    assert stats["cluster.grpc.upstream_rq_per_try_timeout"] == 2
    assert stats["cluster.grpc.upstream_rq_retry"] == 1


def test_grpc_calls_are_mirrored(
    make_proxy: Any, grpc_server: GrpcServer, recorder: Callable[..., Recorder]
) -> None:
    """request_mirror_policies copy each whole gRPC call to the mirror cluster (HTTP/1.1
    here) with a -shadow host, fire and forget; the caller's answer is the main one's."""
    shadow = recorder()
    port = free_port()
    mirrored = route_to("grpc", request_mirror_policies=[{"cluster": "shadow"}])
    config = proxy_config(
        port,
        [h2_cluster("grpc", grpc_server.port), static_cluster("shadow", shadow.port)],
        [mirrored],
    )
    proxy = make_proxy(config)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for word in (b"one", b"two"):
            assert call(channel, "Unary")(word, timeout=5) == b"hello " + word
        parts = iter([b"a", b"b", b"c"])
        assert call(channel, "Join", "stream_unary")(parts, timeout=5) == b"a+b+c"
    eventually(lambda: len(shadow.seen) == 3)
    copies = sorted(shadow.seen, key=lambda seen: seen.body)
    unary = [seen for seen in copies if seen.target == f"/{SERVICE}/Unary"]
    assert [seen.body[5:] for seen in unary] == [b"one", b"two"]  # after the gRPC prefix
    assert all(seen.method == "POST" for seen in copies)
    assert unary[0].headers["host"] == f"127.0.0.1-shadow:{port}"
    assert unary[0].headers["content-type"] == "application/grpc"
    assert unary[0].headers["x-envoy-internal"] == "true"
    (joined,) = [seen for seen in copies if seen.target == f"/{SERVICE}/Join"]
    assert len(joined.body) == 3 * 6  # three 1-byte messages, 5-byte prefix each
    eventually(settled(proxy, "shadow"))
    stats = proxy.stats()
    assert stats["cluster.shadow.upstream_rq_200"] == 3
    assert stats["cluster.grpc.upstream_rq_200"] == 3


class NamedServer:
    """A gRPC server whose Unary answers its name after ``delay`` seconds."""

    def __init__(self, name: str, delay: float) -> None:
        self.port = free_port()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))

        def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
            time.sleep(delay)
            return name.encode()

        handler = grpc.unary_unary_rpc_method_handler(unary)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Unary": handler}),)
        )
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()


def test_hedging_on_per_try_timeout(make_proxy: Any) -> None:
    """hedge_on_per_try_timeout: a slow try keeps running beside its retry and the first
    answer wins. "early" answers in 0.5 s, "late" in 2 s, each try gets 0.3 s: a call that
    starts on "early" is still answered by it (a plain retry would get "late", at 2.3 s)."""
    early, late = NamedServer("early", 0.5), NamedServer("late", 2.0)
    try:
        port = free_port()
        cluster = h2_cluster("pair", early.port)
        cluster["load_assignment"] = static_cluster("pair", early.port, late.port)[
            "load_assignment"
        ]
        retry = {"retry_on": "5xx", "num_retries": 1, "per_try_timeout": "0.3s"}
        hedge = {"hedge_on_per_try_timeout": True}
        route = route_to("pair", retry_policy=retry, hedge_policy=hedge)
        config = proxy_config(port, [cluster], [route])
        proxy = make_proxy(config)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for _ in range(2):  # round robin: one call starts on each host
                started = time.monotonic()
                assert call(channel, "Unary")(b"", timeout=10) == b"early"
                assert time.monotonic() - started < 1.5
        stats = proxy.stats()
        assert stats["cluster.pair.upstream_rq_per_try_timeout"] == 2
        assert stats["cluster.pair.upstream_rq_retry"] == 2
    finally:
        early.server.stop(0)
        late.server.stop(0)
