"""Throwaway certificates for the demo and the tests: a CA, leaves it issues, self-signed pairs.

Keys are P-256 (fast to generate). Certificates carry the extensions that
Python's strict verification (``VERIFY_X509_STRICT``, default since 3.13)
demands, so the e2e tests can verify the proxy against :attr:`CA.pem`.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CA", "issue", "issue_client", "key_pem", "make_ca", "make_self_signed"]

_VALIDITY = datetime.timedelta(days=2)


@dataclass(frozen=True)
class CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        """The CA certificate, for ``ssl.SSLContext.load_verify_locations(cadata=...)``."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: Path) -> Path:
        """Write the CA certificate to ``directory/ca.pem`` (for tools that want a file)."""
        path = directory / "ca.pem"
        path.write_bytes(self.pem)
        return path


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """An unencrypted PKCS#8 PEM, the form mc-proxy loads."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _builder(
    subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def make_ca(common_name: str = "mc-proxy test CA") -> CA:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _builder(common_name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return CA(cert, key)


def _san(hostname: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        return x509.DNSName(hostname)


def _leaf(
    hostname: str,
    issuer: x509.Name,
    signing_key: ec.EllipticCurvePrivateKey,
    usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.SERVER_AUTH,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(hostname, issuer, key.public_key())
        .add_extension(x509.SubjectAlternativeName([_san(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
            critical=False,
        )
        .sign(signing_key, hashes.SHA256())
    )
    return cert, key


def _write(
    directory: Path, hostname: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{hostname}.pem", directory / f"{hostname}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key_pem(key))
    key_path.chmod(0o600)
    return cert_path, key_path


def issue(ca: CA, hostname: str, directory: Path) -> tuple[Path, Path]:
    """A server certificate for ``hostname`` (DNS name or IP) signed by ``ca``.

    Returns ``(cert_path, key_path)``, written as ``directory/HOSTNAME.pem``
    and ``.key``.
    """
    cert, key = _leaf(hostname, ca.cert.subject, ca.key)
    return _write(directory, hostname, cert, key)


def issue_client(ca: CA, name: str, directory: Path) -> tuple[Path, Path]:
    """A client certificate (TLS client authentication) for ``name``, signed by ``ca``.

    Its subject is ``CN=name``; written as ``directory/NAME.pem`` and ``.key``.
    """
    cert, key = _leaf(name, ca.cert.subject, ca.key, ExtendedKeyUsageOID.CLIENT_AUTH)
    return _write(directory, name, cert, key)


def make_self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """A self-signed server certificate for ``hostname``; returns ``(cert_path, key_path)``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    cert = (
        _builder(hostname, name, key.public_key())
        .add_extension(x509.SubjectAlternativeName([_san(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write(directory, hostname, cert, key)
