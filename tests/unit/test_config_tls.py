"""TLS transport sockets in the config: what is read (files and inline PEM, ALPN, versions,
SNI chains, mTLS, SAN matchers, upstream SNI) and what is refused, each error naming its
field; plus the SAN and SNI matching the proxy does with the result."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import bootstrap, http_listener, route_to, static_cluster
from tests.tls_certs import Pki

from shoal.config.envoy import bootstrap_from_dict
from shoal.config.model import SanMatcher, StringMatch, TlsContext
from shoal.errors import ConfigError
from shoal.proxy.tls import TlsListenerContext, TlsStats, chain_context
from shoal.transport.tls import UpstreamTls, dns_name_match, san_matches

TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
HTTP2 = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}
INSPECTOR = {
    "name": "envoy.filters.listener.tls_inspector",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3."
        "TlsInspector"
    },
}
CHAIN = "static_resources.listeners[0].filter_chains[0]"
DOWNSTREAM = f"{CHAIN}.transport_socket.typed_config"
COMMON = f"{DOWNSTREAM}.common_tls_context"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def pair(pki: Pki, name: str = "server") -> dict[str, Any]:
    return {
        "certificate_chain": {"filename": pki.cert(name)},
        "private_key": {"filename": pki.key(name)},
    }


def downstream(pki: Pki, **common: Any) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TLS + "DownstreamTlsContext",
            "common_tls_context": {"tls_certificates": [pair(pki)], **common},
        },
    }


def config(pki: Pki, *clusters: dict[str, Any], **common: Any) -> dict[str, Any]:
    vhost = {"name": "all", "domains": ["*"], "routes": [route_to("web")]}
    listener = http_listener(8443, [vhost])
    listener["filter_chains"][0]["transport_socket"] = downstream(pki, **common)
    return bootstrap([listener], list(clusters) or [static_cluster("web", 8080)], 9901)


def chain(data: dict[str, Any], index: int = 0) -> dict[str, Any]:
    return data["static_resources"]["listeners"][0]["filter_chains"][index]


def tls_of(data: dict[str, Any], index: int = 0) -> dict[str, Any]:
    return chain(data, index)["transport_socket"]["typed_config"]


def rejects(data: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        bootstrap_from_dict(data, source="envoy.yaml")
    assert info.value.field == field, str(info.value)
    assert re.search(reason, info.value.reason), info.value.reason


def upstream(pki: Pki, **typed: Any) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {"@type": TLS + "UpstreamTlsContext", **typed},
    }


# --- what is read ------------------------------------------------------------------------------


def test_downstream_tls_is_read(pki: Pki) -> None:
    data = config(pki, alpn_protocols=["h2", "http/1.1"])
    tls_of(data)["require_client_certificate"] = True
    tls_of(data)["common_tls_context"]["validation_context"] = {
        "trusted_ca": {"filename": pki.cert("ca")},
        "match_typed_subject_alt_names": [
            {"san_type": "URI", "matcher": {"prefix": "spiffe://shoal.test/"}}
        ],
    }
    tls_of(data)["common_tls_context"]["tls_params"] = {"tls_minimum_protocol_version": "TLSv1_3"}
    listener = bootstrap_from_dict(data).listeners[0]
    tls = listener.tls
    assert tls is not None
    assert tls.alpn_protocols == ("h2", "http/1.1")
    assert tls.certificates[0].certificate_chain == Path(pki.cert("server")).read_bytes()
    assert tls.trusted_ca == Path(pki.cert("ca")).read_bytes()
    assert tls.require_client_certificate
    assert (tls.min_version, tls.max_version) == ("1.3", "1.3")
    assert tls.subject_alt_names == (
        SanMatcher("uri", StringMatch("prefix", "spiffe://shoal.test/")),
    )
    assert listener.server_name_chains == ()


def test_inline_pem_and_raw_buffer(pki: Pki) -> None:
    data = config(pki)
    tls_of(data)["common_tls_context"]["tls_certificates"] = [
        {
            "certificate_chain": {"inline_string": Path(pki.cert("server")).read_text()},
            "private_key": {"inline_bytes": _b64(Path(pki.key("server")).read_bytes())},
        }
    ]
    assert bootstrap_from_dict(data).listeners[0].tls is not None
    chain(data)["transport_socket"] = {
        "name": "envoy.transport_sockets.raw_buffer",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3."
            "RawBuffer"
        },
    }
    assert bootstrap_from_dict(data).listeners[0].tls is None


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def test_upstream_tls_is_read(pki: Pki) -> None:
    h1 = static_cluster("web", 8080, transport_socket=upstream(pki, sni="web.shoal.test"))
    h2 = static_cluster(
        "grpc",
        8081,
        typed_extension_protocol_options=HTTP2,
        transport_socket=upstream(
            pki,
            common_tls_context={
                "tls_certificates": [pair(pki, "client")],
                "validation_context": {"trusted_ca": {"filename": pki.cert("ca")}},
            },
        ),
    )
    web, grpc = bootstrap_from_dict(config(pki, h1, h2)).clusters
    assert web.tls == TlsContext(min_version="1.2", max_version="1.2", sni="web.shoal.test")
    assert grpc.tls is not None and grpc.tls.certificates and grpc.tls.trusted_ca
    # ALPN: h2 for an HTTP/2 cluster, http/1.1 otherwise (as Envoy)
    assert web.tls is not None
    assert UpstreamTls(web.tls, http2=False).context.verify_mode.name == "CERT_NONE"
    assert UpstreamTls(grpc.tls, http2=True).context.verify_mode.name == "CERT_REQUIRED"


def test_server_name_chains(pki: Pki) -> None:
    data = config(pki)
    data["static_resources"]["listeners"][0]["listener_filters"] = [INSPECTOR]
    named = copy.deepcopy(chain(data))
    named["filter_chain_match"] = {"server_names": ["A.Shoal.Test", "*.b.test"]}
    named["transport_socket"] = downstream(pki)
    named["transport_socket"]["typed_config"]["common_tls_context"]["tls_certificates"] = [
        pair(pki, "other")
    ]
    data["static_resources"]["listeners"][0]["filter_chains"].insert(0, named)
    chain(data, 1)["filter_chain_match"] = {"transport_protocol": "tls"}
    listener = bootstrap_from_dict(data).listeners[0]
    assert [c.server_names for c in listener.server_name_chains] == [("a.shoal.test", "*.b.test")]
    assert listener.tls is not None
    assert listener.tls.certificates[0].certificate_chain == Path(pki.cert("server")).read_bytes()


# --- what is refused ---------------------------------------------------------------------------


def test_bad_files_and_pem(pki: Pki, tmp_path: Path) -> None:
    data = config(pki)
    certificate = tls_of(data)["common_tls_context"]["tls_certificates"][0]
    certificate["certificate_chain"]["filename"] = str(tmp_path / "missing.pem")
    rejects(
        data, f"{COMMON}.tls_certificates[0].certificate_chain.filename", "cannot read .*No such"
    )
    certificate["certificate_chain"]["filename"] = pki.key("server")
    rejects(data, f"{COMMON}.tls_certificates[0].certificate_chain", "not a PEM certificate")
    certificate["certificate_chain"]["filename"] = pki.cert("server")
    certificate["private_key"]["filename"] = pki.key("other")
    rejects(data, f"{COMMON}.tls_certificates[0].private_key", "does not match the certificate")
    certificate["private_key"] = {"inline_string": "not a key"}
    rejects(data, f"{COMMON}.tls_certificates[0].private_key", "not a PEM private key")
    certificate["private_key"] = {"environment_variable": "KEY"}
    rejects(data, f"{COMMON}.tls_certificates[0].private_key.environment_variable", "not supported")
    data = config(pki, validation_context={"trusted_ca": {"inline_string": "junk"}})
    rejects(data, f"{COMMON}.validation_context.trusted_ca", "not a PEM CA")
    data = config(pki)
    del tls_of(data)["common_tls_context"]["tls_certificates"]
    rejects(data, f"{COMMON}.tls_certificates", "needs a certificate")


def test_fields_shoal_does_not_implement(pki: Pki) -> None:
    rejects(
        config(pki, tls_params={"cipher_suites": ["ECDHE-RSA-AES128-GCM-SHA256"]}),
        f"{COMMON}.tls_params.cipher_suites",
        "not supported yet",
    )
    rejects(
        config(pki, tls_certificate_sds_secret_configs=[{"name": "default"}]),
        f"{COMMON}.tls_certificate_sds_secret_configs",
        "SDS not supported yet",
    )
    data = config(pki)
    tls_of(data)["require_sni"] = True
    rejects(data, f"{DOWNSTREAM}.require_sni", "not supported by shoal")
    rejects(
        config(pki, tls_params={"tls_minimum_protocol_version": "TLSv1_3",
                                "tls_maximum_protocol_version": "TLSv1_2"}),
        f"{COMMON}.tls_params.tls_minimum_protocol_version",
        "above tls_maximum_protocol_version",
    )  # fmt: skip


def test_client_certificate_rules(pki: Pki) -> None:
    data = config(pki)
    tls_of(data)["require_client_certificate"] = True
    rejects(data, f"{DOWNSTREAM}.require_client_certificate", "needs .*trusted_ca")
    sans = [{"san_type": "DNS", "matcher": {"exact": "x"}}]
    rejects(
        config(pki, validation_context={"match_typed_subject_alt_names": sans}),
        f"{COMMON}.validation_context.match_typed_subject_alt_names",
        "needs trusted_ca",
    )
    other_name = [{"san_type": "OTHER_NAME", "matcher": {"exact": "x"}, "oid": "1.2.3"}]
    rejects(
        config(pki, validation_context={"trusted_ca": {"filename": pki.cert("ca")},
                                        "match_typed_subject_alt_names": other_name}),
        f"{COMMON}.validation_context.match_typed_subject_alt_names[0].oid",
        "not supported",
    )  # fmt: skip


def test_mixed_and_sni_chain_rules(pki: Pki) -> None:
    data = config(pki)
    plain = copy.deepcopy(chain(data))
    del plain["transport_socket"]
    data["static_resources"]["listeners"][0]["filter_chains"].append(plain)
    chain(data)["filter_chain_match"] = {"server_names": ["a.test"]}
    data["static_resources"]["listeners"][0]["listener_filters"] = [INSPECTOR]
    rejects(
        data, "static_resources.listeners[0].filter_chains[1]", "TLS and plaintext filter chains"
    )

    data = config(pki)
    chain(data)["filter_chain_match"] = {"server_names": ["a.test"]}
    rejects(data, f"{CHAIN}.filter_chain_match.server_names", "needs envoy.filters.listener.tls")
    data["static_resources"]["listeners"][0]["listener_filters"] = [INSPECTOR]
    chain(data)["filter_chain_match"] = {"server_names": ["a.*.test"]}
    rejects(data, f"{CHAIN}.filter_chain_match.server_names[0]", "invalid server name")
    chain(data)["filter_chain_match"] = {
        "server_names": ["a.test"],
        "application_protocols": ["h2"],
    }
    rejects(data, f"{CHAIN}.filter_chain_match.application_protocols", "not supported")

    data = config(pki)
    del chain(data)["transport_socket"]
    chain(data)["filter_chain_match"] = {"transport_protocol": "tls"}
    data["static_resources"]["listeners"][0]["listener_filters"] = [INSPECTOR]
    rejects(data, f"{CHAIN}.filter_chain_match.transport_protocol", "TLS passthrough")

    data = config(pki)
    data["static_resources"]["listeners"][0]["listener_filters"] = [INSPECTOR]
    second = copy.deepcopy(chain(data))
    chain(data)["filter_chain_match"] = {"server_names": ["a.test"]}
    tls_of(data)["common_tls_context"]["tls_params"] = {"tls_minimum_protocol_version": "TLSv1_3"}
    data["static_resources"]["listeners"][0]["filter_chains"].append(second)
    rejects(
        data,
        "static_resources.listeners[0].filter_chains[1].transport_socket.typed_config"
        ".common_tls_context.tls_params",
        "different TLS versions",
    )


def test_upstream_tls_rules(pki: Pki) -> None:
    grpc_check = {
        "timeout": "1s", "interval": "1s", "unhealthy_threshold": 1, "healthy_threshold": 1,
        "grpc_health_check": {},
    }  # fmt: skip
    cluster = static_cluster(
        "web", 8080, typed_extension_protocol_options=HTTP2, health_checks=[grpc_check],
        transport_socket=upstream(pki),
    )  # fmt: skip
    rejects(
        config(pki, cluster),
        "static_resources.clusters[0].health_checks[0].grpc_health_check",
        "TLS cluster are not supported yet",
    )
    cluster = static_cluster("web", 8080, transport_socket=upstream(pki, sni="bad name"))
    rejects(
        config(pki, cluster),
        "static_resources.clusters[0].transport_socket.typed_config.sni",
        "invalid server name",
    )
    wrong_kind = {"name": "tls", "typed_config": downstream(pki)["typed_config"]}
    cluster = static_cluster("web", 8080, transport_socket=wrong_kind)
    rejects(
        config(pki, cluster),
        "static_resources.clusters[0].transport_socket.typed_config",
        "cannot be used here; expected envoy.extensions.transport_sockets.tls.v3"
        ".UpstreamTlsContext",
    )


# --- matching at run time -----------------------------------------------------------------------


def test_subject_alt_name_matching() -> None:
    cert = {
        "subjectAltName": (
            ("DNS", "*.shoal.test"),
            ("URI", "spiffe://shoal.test/ns/a/sa/b"),
            ("IP Address", "0:0:0:0:0:0:0:1\n"),
        )
    }
    exact_dns = SanMatcher("dns", StringMatch("exact", "api.shoal.test"))
    assert san_matches((exact_dns,), cert)  # the certificate's wildcard covers one label
    assert not san_matches((SanMatcher("dns", StringMatch("exact", "a.b.shoal.test")),), cert)
    assert san_matches((SanMatcher("uri", StringMatch("suffix", "/sa/b")),), cert)
    assert san_matches((SanMatcher("ip_address", StringMatch("exact", "::1")),), cert)
    assert not san_matches((SanMatcher("email", StringMatch("exact", "x@y")),), cert)
    assert not san_matches((exact_dns,), {})
    assert san_matches((), {})
    assert dns_name_match("A.example.com", "a.example.com")
    assert not dns_name_match("example.com", "*.example.com")


def test_sni_selection_order(pki: Pki) -> None:
    tls = bootstrap_from_dict(config(pki)).listeners[0].tls
    assert tls is not None
    default, exact, wide, narrow = (chain_context(tls, name) for name in "dewn")
    context = TlsListenerContext(
        default,
        {"api.shoal.test": exact, "*.shoal.test": wide, "*.eu.shoal.test": narrow},
        TlsStats(),
    )
    assert context.select("API.shoal.test").target == "e"
    assert context.select("x.eu.shoal.test").target == "n"  # the longest suffix first
    assert context.select("a.b.shoal.test").target == "w"  # a wildcard covers deeper names
    assert context.select("shoal.test").target == "d"
    assert context.select(None).target == "d"
