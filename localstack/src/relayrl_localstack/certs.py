"""Credentials generated when a local cluster starts.

A throwaway CA and apiserver serving certificate, the service-account signing key
pair and random static tokens. Nothing here is meant to protect anything beyond a
test run on loopback; keys live in the cluster's temporary work dir. Used by
:mod:`relayrl_localstack.cluster`; :func:`generate_mutual_tls` (a CA, a server and a
client cert) by the tests that run nats-server with TLS client verification.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

# Names and addresses the apiserver is reached by, from the host and from pods.
_DNS_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)


@dataclasses.dataclass(frozen=True)
class ClusterCredentials:
    """Files written by :func:`generate`."""

    ca_cert: Path
    serving_cert: Path
    serving_key: Path
    sa_private_key: Path
    sa_public_key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


@dataclasses.dataclass(frozen=True)
class _Authority:
    """A CA's key, name and certificate, and the validity window of what it signs."""

    key: ec.EllipticCurvePrivateKey
    name: x509.Name
    cert: x509.Certificate
    not_before: datetime.datetime
    not_after: datetime.datetime


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _authority(common_name: str, days: int) -> _Authority:
    """A self-signed CA, valid from five minutes ago for `days` days."""
    now = datetime.datetime.now(datetime.UTC)
    not_before = now - datetime.timedelta(minutes=5)
    not_after = now + datetime.timedelta(days=days)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _Authority(key, name, cert, not_before, not_after)


def _leaf(
    ca: _Authority, common_name: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate signed by `ca`, with the key identifiers and usages that strict
    verifiers (OpenSSL's X509_STRICT, Go's crypto/tls) ask for."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(ca.not_before)
        .not_valid_after(ca.not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca.key, hashes.SHA256()), key


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def generate(directory: Path, *, service_ip: str = "10.96.0.1") -> ClusterCredentials:
    """Write a CA, an apiserver serving cert signed by it and the SA key pair."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _authority("relayrl-localstack-ca", days=365)
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in _DNS_NAMES]
    sans += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address(service_ip)),
    ]
    server_cert, server_key = _leaf(
        ca, "kube-apiserver", x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, sans
    )
    # RS256 is what every service-account token consumer accepts.
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    creds = ClusterCredentials(
        ca_cert=directory / "ca.crt",
        serving_cert=directory / "apiserver.crt",
        serving_key=directory / "apiserver.key",
        sa_private_key=directory / "sa.key",
        sa_public_key=directory / "sa.pub",
    )
    _write_cert(creds.ca_cert, ca.cert)
    _write_cert(creds.serving_cert, server_cert)
    _write_key(creds.serving_key, server_key)
    _write_key(creds.sa_private_key, sa_key)
    creds.sa_public_key.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return creds


@dataclasses.dataclass(frozen=True)
class MutualTLSFiles:
    """Files written by :func:`generate_mutual_tls` (PEM; keys PKCS#8, mode 0600)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def generate_mutual_tls(
    directory: Path,
    *,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    client_name: str = "relayrl-client",
) -> MutualTLSFiles:
    """Write a CA, a server cert for `hosts` (IPs or DNS names) and a client cert.

    Both leaves are signed by the CA, so either side can verify the other: the server
    cert has serverAuth, the client cert clientAuth.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca = _authority("relayrl-test-ca", days=30)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_cert, server_key = _leaf(ca, hosts[0], x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, sans)
    client_cert, client_key = _leaf(ca, client_name, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH, [])

    files = MutualTLSFiles(
        ca_cert=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )
    _write_cert(files.ca_cert, ca.cert)
    _write_cert(files.server_cert, server_cert)
    _write_cert(files.client_cert, client_cert)
    _write_key(files.server_key, server_key)
    _write_key(files.client_key, client_key)
    return files


def new_token() -> str:
    """Return a random bearer token for the static token file."""
    return secrets.token_urlsafe(32)
