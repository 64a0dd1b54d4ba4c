"""A throwaway PKI for TLS tests: a CA, a server certificate for 127.0.0.1 / localhost and a
client certificate signed by it, and a second CA with a client no server trusts."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate of another CA
    rogue_key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    usage: x509.ObjectIdentifier | None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=usage is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def make_pki(directory: Path) -> Pki:
    ca_key, rogue_ca_key = _key(), _key()
    ca = _cert("test CA", ca_key, None, None)
    made = {}
    for name, issuer, usage in (
        ("server", ("test CA", ca_key), ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", ("test CA", ca_key), ExtendedKeyUsageOID.CLIENT_AUTH),
        ("rogue", ("rogue CA", rogue_ca_key), ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = _key()
        made[name] = _write(directory / f"{name}.pem", _cert(name, key, issuer, usage), key)
    _write(directory / "ca.pem", ca, ca_key)
    return Pki(
        ca=directory / "ca.pem",
        server_cert=made["server"],
        server_key=made["server"].with_suffix(".key"),
        client_cert=made["client"],
        client_key=made["client"].with_suffix(".key"),
        rogue_cert=made["rogue"],
        rogue_key=made["rogue"].with_suffix(".key"),
    )
