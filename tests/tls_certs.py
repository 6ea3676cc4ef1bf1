"""Test PKI: a CA and certificates it signs, made with ``cryptography`` into a directory.

``Pki(directory)`` writes ``<name>.pem`` / ``<name>.key`` for:

- ``ca``: the trusted CA; ``rogue-ca``: a CA nobody trusts;
- ``server``: DNS ``localhost``, ``a.shoal.test``, IP ``127.0.0.1``;
- ``other``: DNS ``b.shoal.test`` (a second server name for SNI tests);
- ``client``: URI ``spiffe://shoal.test/ns/default/sa/client`` (mTLS clients);
- ``rogue-client``: the same kind of client certificate, signed by ``rogue-ca``.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLIENT_URI = "spiffe://shoal.test/ns/default/sa/client"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class Pki:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        self._not_before = now - datetime.timedelta(days=1)
        self._not_after = now + datetime.timedelta(days=30)
        ca = self._ca("ca")
        rogue = self._ca("rogue-ca")
        server_sans: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.DNSName("a.shoal.test"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        self._leaf("server", ca, server_sans, ExtendedKeyUsageOID.SERVER_AUTH)
        self._leaf("other", ca, [x509.DNSName("b.shoal.test")], ExtendedKeyUsageOID.SERVER_AUTH)
        client_sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(CLIENT_URI)]
        self._leaf("client", ca, client_sans, ExtendedKeyUsageOID.CLIENT_AUTH)
        self._leaf("rogue-client", rogue, client_sans, ExtendedKeyUsageOID.CLIENT_AUTH)

    def cert(self, name: str) -> str:
        return str(self.dir / f"{name}.pem")

    def key(self, name: str) -> str:
        return str(self.dir / f"{name}.key")

    def _write(self, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        (self.dir / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (self.dir / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def _ca(self, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        usage = x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False,
        )  # fmt: skip
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"shoal test {name}"))
            .issuer_name(_name(f"shoal test {name}"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        self._write(name, cert, key)
        return cert, key

    def _leaf(
        self,
        name: str,
        issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
    ) -> None:
        ca_cert, ca_key = issuer
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        self._write(name, cert, key)
