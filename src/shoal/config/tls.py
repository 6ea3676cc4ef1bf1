"""``ssl.SSLContext`` objects from :class:`shoal.config.model.TlsContext`.

One place builds them, for two callers: the config translation builds each context once to
reject a bad certificate, key or CA with its field path (the running config stays), and
the proxy builds the contexts it serves with. Only the standard library's ``ssl``.

PEM held in memory is handed to OpenSSL as a file it can open (``load_cert_chain`` reads
only files): an anonymous memory file on Linux, a private temporary file elsewhere.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from shoal.config.model import TlsCertificate, TlsContext, TlsVersion

VERSIONS: dict[TlsVersion, ssl.TLSVersion] = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}


@contextmanager
def pem_file(data: bytes) -> Iterator[str]:
    """A path from which OpenSSL reads ``data``, valid inside the ``with``."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is None:  # not Linux
        with tempfile.NamedTemporaryFile(prefix="shoal-tls-") as handle:
            handle.write(data)
            handle.flush()
            yield handle.name
        return
    fd = memfd_create("shoal-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def load_certificate(context: ssl.SSLContext, certificate: TlsCertificate) -> None:
    """Add a certificate chain and its key (raises ``ssl.SSLError`` when they are not PEM
    or do not match)."""
    with (
        pem_file(certificate.certificate_chain) as chain,
        pem_file(certificate.private_key) as key,
    ):
        context.load_cert_chain(chain, key)


def load_trusted_ca(context: ssl.SSLContext, pem: bytes) -> None:
    """Trust the certificates in ``pem`` (raises ``ssl.SSLError`` when there are none)."""
    context.load_verify_locations(cadata=pem.decode("ascii", errors="replace"))


def verify_mode(tls: TlsContext) -> ssl.VerifyMode:
    """What a server asks of its clients: nothing, a certificate if they have one (verified
    against ``trusted_ca``), or a certificate it insists on."""
    if not tls.trusted_ca:
        return ssl.CERT_NONE
    return ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL


def set_versions(context: ssl.SSLContext, tls: TlsContext) -> None:
    context.minimum_version = VERSIONS[tls.min_version]
    context.maximum_version = VERSIONS[tls.max_version]


def configure_server(context: ssl.SSLContext, tls: TlsContext, alpn: tuple[str, ...]) -> None:
    """Make ``context`` (a ``PROTOCOL_TLS_SERVER`` one) serve ``tls``, offering ``alpn``."""
    set_versions(context, tls)
    for certificate in tls.certificates:
        load_certificate(context, certificate)
    if tls.trusted_ca:
        load_trusted_ca(context, tls.trusted_ca)
    context.verify_mode = verify_mode(tls)
    if alpn:
        context.set_alpn_protocols(list(alpn))


def server_context(tls: TlsContext, alpn: tuple[str, ...] | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    configure_server(context, tls, tls.alpn_protocols if alpn is None else alpn)
    return context


def client_context(tls: TlsContext, alpn: tuple[str, ...]) -> ssl.SSLContext:
    """An upstream context: the peer is verified against ``trusted_ca`` when there is one
    (never against the system's roots, and never its name: Envoy checks names only through
    ``match_typed_subject_alt_names``); client certificates for mTLS."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    set_versions(context, tls)
    if tls.trusted_ca:
        load_trusted_ca(context, tls.trusted_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    for certificate in tls.certificates:
        load_certificate(context, certificate)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def upstream_alpn(tls: TlsContext, http2: bool) -> tuple[str, ...]:
    """What a cluster offers: its ``alpn_protocols``, else its protocol (as Envoy does)."""
    return tls.alpn_protocols or (("h2",) if http2 else ("http/1.1",))
