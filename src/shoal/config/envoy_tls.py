"""Envoy's TLS transport socket (``envoy.transport_sockets.tls``) →
:class:`shoal.config.model.TlsContext`.

Internal to :mod:`shoal.config.envoy`. Certificate, key and CA files are read here, when the
config is loaded (as Envoy does), and every context is built once with :mod:`ssl`, so a
missing file, a key that does not match its certificate or a CA that is not PEM is a
:class:`ConfigError` naming the field, and the running config stays.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import replace
from pathlib import Path
from typing import Any

from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from google.protobuf.message import Message

from shoal.config.envoy_fields import Ctx, typed_config
from shoal.config.envoy_headers import string_match
from shoal.config.model import SanMatcher, SanType, TlsCertificate, TlsContext, TlsVersion
from shoal.config.tls import (
    client_context,
    load_certificate,
    load_trusted_ca,
    server_context,
    upstream_alpn,
)

_TlsParameters = common_pb2.TlsParameters
_VERSIONS: dict[int, TlsVersion] = {
    _TlsParameters.TLSv1_0: "1.0",
    _TlsParameters.TLSv1_1: "1.1",
    _TlsParameters.TLSv1_2: "1.2",
    _TlsParameters.TLSv1_3: "1.3",
}
_ORDER = ("1.0", "1.1", "1.2", "1.3")
_SAN_TYPES: dict[int, SanType] = {
    common_pb2.SubjectAltNameMatcher.DNS: "dns",
    common_pb2.SubjectAltNameMatcher.URI: "uri",
    common_pb2.SubjectAltNameMatcher.IP_ADDRESS: "ip_address",
    common_pb2.SubjectAltNameMatcher.EMAIL: "email",
}


def downstream_tls(owner: Message, ctx: Ctx) -> TlsContext | None:
    """A filter chain's ``transport_socket``: None for none or ``raw_buffer``."""
    message = _transport_socket(owner, ctx, tls_pb2.DownstreamTlsContext)
    if message is None:
        return None
    here = ctx.at("transport_socket", "typed_config")
    tls = _common(message.common_tls_context, here.at("common_tls_context"), server=True)
    require = bool(message.require_client_certificate.value)
    if require and not tls.trusted_ca:
        raise here.at("require_client_certificate").error(
            "require_client_certificate needs common_tls_context.validation_context.trusted_ca"
        )
    if not tls.certificates:
        raise here.at("common_tls_context", "tls_certificates").error(
            "a server needs a certificate (tls_certificates)"
        )
    tls = replace(tls, require_client_certificate=require)
    _build(lambda: server_context(tls), here)
    return tls


def upstream_tls(owner: Message, ctx: Ctx, *, http2: bool) -> TlsContext | None:
    """A cluster's ``transport_socket``: None for none or ``raw_buffer``."""
    message = _transport_socket(owner, ctx, tls_pb2.UpstreamTlsContext)
    if message is None:
        return None
    here = ctx.at("transport_socket", "typed_config")
    tls = _common(message.common_tls_context, here.at("common_tls_context"), server=False)
    sni = str(message.sni)
    if len(sni) > 255 or any(c in sni for c in "\r\n\x00 /"):
        raise here.at("sni").error(f"invalid server name {sni!r}")
    tls = replace(tls, sni=sni)
    _build(lambda: client_context(tls, upstream_alpn(tls, http2)), here)
    return tls


def _transport_socket(owner: Message, ctx: Ctx, expected: type[Message]) -> Any:
    if not owner.HasField("transport_socket"):
        return None
    socket_ctx = ctx.at("transport_socket")
    message = typed_config(owner.transport_socket, socket_ctx, expected, raw_buffer_pb2.RawBuffer)
    return None if isinstance(message, raw_buffer_pb2.RawBuffer) else message


def _common(common: Message, ctx: Ctx, *, server: bool) -> TlsContext:
    """CommonTlsContext with Envoy's version defaults (TLS 1.2 to 1.3 for a server, 1.2 to
    1.2 for a client)."""
    params, params_ctx = common.tls_params, ctx.at("tls_params")
    low = _version(params, "tls_minimum_protocol_version", "1.2", params_ctx)
    high = _version(params, "tls_maximum_protocol_version", "1.3" if server else "1.2", params_ctx)
    if _ORDER.index(low) > _ORDER.index(high):
        unset = params.tls_maximum_protocol_version == _TlsParameters.TLS_AUTO
        raise params_ctx.at("tls_minimum_protocol_version").error(
            f"TLSv{low} is above tls_maximum_protocol_version TLSv{high}"
            + (" (Envoy's default for clusters: set it)" if unset else "")
        )
    certificates = tuple(
        _certificate(item, ctx.at("tls_certificates", index))
        for index, item in enumerate(common.tls_certificates)
    )
    alpn = tuple(str(p) for p in common.alpn_protocols)
    for index, protocol in enumerate(alpn):
        if not 0 < len(protocol.encode()) < 256:
            raise ctx.at("alpn_protocols", index).error("an ALPN protocol is 1 to 255 bytes")
    trusted_ca = b""
    matchers: tuple[SanMatcher, ...] = ()
    if common.HasField("validation_context"):
        validation, vctx = common.validation_context, ctx.at("validation_context")
        if validation.HasField("trusted_ca"):
            trusted_ca = _data(validation.trusted_ca, vctx.at("trusted_ca"))
            probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            _build(lambda: load_trusted_ca(probe, trusted_ca), vctx.at("trusted_ca"), "CA")
        matchers = tuple(
            _san_matcher(item, vctx.at("match_typed_subject_alt_names", index))
            for index, item in enumerate(validation.match_typed_subject_alt_names)
        )
        if matchers and not trusted_ca:
            raise vctx.at("match_typed_subject_alt_names").error(
                "matching subject alt names needs trusted_ca (an unverified certificate"
                " proves no name)"
            )
    return TlsContext(
        certificates=certificates,
        alpn_protocols=alpn,
        trusted_ca=trusted_ca,
        subject_alt_names=matchers,
        min_version=low,
        max_version=high,
    )


def _version(params: Message, name: str, default: TlsVersion, ctx: Ctx) -> TlsVersion:
    value = getattr(params, name)
    if value == _TlsParameters.TLS_AUTO:
        return default
    return _VERSIONS[value]


def _certificate(item: Message, ctx: Ctx) -> TlsCertificate:
    for name in ("certificate_chain", "private_key"):
        if not item.HasField(name):
            raise ctx.at(name).error(f"{name} is required")
    chain = _data(item.certificate_chain, ctx.at("certificate_chain"))
    key = _data(item.private_key, ctx.at("private_key"))
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _build(lambda: load_trusted_ca(probe, chain), ctx.at("certificate_chain"), "certificate")
    certificate = TlsCertificate(chain, key)
    _build(lambda: load_certificate(probe, certificate), ctx.at("private_key"), "private key")
    return certificate


def _data(source: Message, ctx: Ctx) -> bytes:
    """A DataSource: ``filename`` (read now), ``inline_string`` or ``inline_bytes``."""
    kind = source.WhichOneof("specifier")
    if kind == "filename":
        path = str(source.filename)
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ctx.at("filename").error(f"cannot read {path!r}: {exc.strerror or exc}") from None
        if not data.strip():
            raise ctx.at("filename").error(f"{path!r} is empty")
        return data
    if kind == "inline_bytes":
        data = bytes(source.inline_bytes)
    elif kind == "inline_string":
        data = str(source.inline_string).encode()
    else:
        raise ctx.error("one of filename, inline_string or inline_bytes is required")
    if not data.strip():
        raise ctx.at(kind).error("must not be empty")
    return data


def _san_matcher(item: Message, ctx: Ctx) -> SanMatcher:
    if item.san_type not in _SAN_TYPES:
        known = common_pb2.SubjectAltNameMatcher.SanType.Name(item.san_type)
        raise ctx.at("san_type").error(f"{known} is not supported (DNS, URI, IP_ADDRESS or EMAIL)")
    if not item.HasField("matcher"):
        raise ctx.at("matcher").error("matcher is required")
    return SanMatcher(_SAN_TYPES[item.san_type], string_match(item.matcher, ctx.at("matcher")))


def _build(make: Any, ctx: Ctx, what: str = "") -> None:
    """Run an ssl step; its failure is an error at ``ctx`` with OpenSSL's reason."""
    try:
        make()
    except ssl.SSLError as exc:
        reason = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(exc.strerror or exc))
        if "KEY_VALUES_MISMATCH" in str(exc) or reason == "KEY_VALUES_MISMATCH":
            raise ctx.error("the private key does not match the certificate") from None
        if what:
            raise ctx.error(f"not a PEM {what}: {reason}") from None
        raise ctx.error(f"rejected by OpenSSL: {reason}") from None
    except (OSError, ValueError) as exc:
        raise ctx.error(f"rejected by OpenSSL: {exc}") from None
