"""A small certificate authority for a federation's TLS: one CA, then server certificates for
the broker and client certificates for the aggregator and the silos.

EC P-256 keys (fast to make, accepted by OpenSSL and Erlang/RabbitMQ), unencrypted PKCS8 PEM
private keys: the files are protected by their mode (0600), like ssh keys, because services
must load them unattended.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsilo.sdk.files import write_atomic

#: Backdate `not_valid_before` a little so a peer whose clock runs slightly behind accepts a
#: certificate made a moment ago.
_CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True, repr=False)
class CertPair:
    """A PEM certificate and its PEM (PKCS8, unencrypted) private key."""

    cert_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:  # never show the private key in logs or tracebacks
        try:
            about = f"subject={self.subject()!r}, fingerprint={fingerprint(self.cert_pem)!r}"
        except ValueError:
            about = "unparsable certificate"
        return f"CertPair({about}, key=<hidden>)"

    def subject(self) -> str:
        return x509.load_pem_x509_certificate(self.cert_pem).subject.rfc4514_string()

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write the certificate (0644) and the key (0600, created with that mode so it is
        never readable by others, even for a moment). Each file is replaced atomically."""
        for where, data, mode in (
            (Path(key_path), self.key_pem, 0o600),
            (Path(cert_path), self.cert_pem, 0o644),
        ):
            where.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(where, data, mode)

    @classmethod
    def read(cls, cert_path: Path, key_path: Path) -> CertPair:
        """Load a pair written by `write` (or by any tool writing PEM files)."""
        try:
            cert_pem = Path(cert_path).read_bytes()
            key_pem = Path(key_path).read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {exc.filename}: {exc.strerror}") from None
        try:
            x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise ValueError(f"{cert_path} does not hold a PEM certificate") from None
        try:
            serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            raise ValueError(f"{key_path} does not hold an unencrypted PEM private key") from None
        return cls(cert_pem, key_pem)


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    if not common_name:
        raise ValueError("a certificate needs a non-empty common name")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    if days <= 0:
        raise ValueError(f"days must be > 0 (got {days})")
    now = dt.datetime.now(dt.UTC)
    return now - _CLOCK_SKEW, now + dt.timedelta(days=days)


def make_ca(common_name: str, *, days: int = 825) -> CertPair:
    """A self-signed CA that may sign leaf certificates only (path_length=0)."""
    key = _new_key()
    name = _name(common_name)
    start, end = _validity(days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return CertPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(
    ca: CertPair,
    common_name: str,
    *,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    server: bool = False,
    client: bool = False,
    days: int = 825,
) -> CertPair:
    """A leaf certificate signed by `ca`. A server certificate needs the names clients connect
    to in `dns_names`/`ip_addresses` (hostname checking uses the SAN, not the common name).
    A client certificate works without a SAN for OpenSSL and RabbitMQ; strict (webpki)
    verifiers want one, so give the client's name in `dns_names` where that matters."""
    if not (server or client):
        raise ValueError("issue() needs server=True, client=True or both")
    if isinstance(dns_names, str) or isinstance(ip_addresses, str):
        raise TypeError("dns_names and ip_addresses are sequences of strings, not a string")
    if server and not (dns_names or ip_addresses):
        raise ValueError("a server certificate needs at least one DNS name or IP address")
    try:
        ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
        ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    except (ValueError, TypeError):
        raise ValueError(
            "the CA pair does not hold a PEM certificate and its private key"
        ) from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key must be an EC key (make the CA with make_ca)")
    if _spki(ca_key.public_key()) != _spki(ca_cert.public_key()):
        raise ValueError("the CA private key does not match the CA certificate")
    try:
        ips = [ipaddress.ip_address(ip) for ip in ip_addresses]
    except ValueError as exc:
        raise ValueError(f"invalid IP address for a certificate: {exc}") from None
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ip) for ip in ips]

    key = _new_key()
    start, end = _validity(days)
    end = min(end, ca_cert.not_valid_after_utc)  # a leaf must not outlive its CA
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return CertPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def fingerprint(cert_pem: bytes) -> str:
    """ "sha256:<hex>" of the certificate's DER, for pinning and for humans to compare."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


__all__ = ["CertPair", "fingerprint", "issue", "make_ca"]
