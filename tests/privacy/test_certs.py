"""The federation CA (fedsilo.privacy.certs): chains that OpenSSL and a strict RFC 5280
verifier accept, the right names and key usages, and key files only their owner can read."""

import datetime as dt
import hashlib
import ipaddress
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedsilo.privacy.certs import CertPair, fingerprint, issue, make_ca


@pytest.fixture(scope="module")
def ca() -> CertPair:
    return make_ca("fedsilo test CA")


@pytest.fixture(scope="module")
def server(ca: CertPair) -> CertPair:
    return issue(
        ca,
        "broker",
        dns_names=["localhost", "broker.example"],
        ip_addresses=["127.0.0.1", "::1"],
        server=True,
    )


@pytest.fixture(scope="module")
def client(ca: CertPair) -> CertPair:
    return issue(ca, "silo-a", client=True)


def _cert(pair: CertPair) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pair.cert_pem)


def _ext(cert: x509.Certificate, kind: type) -> x509.Extension:
    return cert.extensions.get_extension_for_class(kind)


def test_ca_is_self_signed_and_may_only_sign_leaves(ca: CertPair) -> None:
    cert = _cert(ca)
    assert cert.subject == cert.issuer
    assert cert.subject.rfc4514_string() == "CN=fedsilo test CA"
    cert.verify_directly_issued_by(cert)
    basic = _ext(cert, x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = _ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    ski = _ext(cert, x509.SubjectKeyIdentifier).value
    assert _ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == ski.digest
    key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert ca.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted
    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc <= now
    assert dt.timedelta(days=824) < cert.not_valid_after_utc - now <= dt.timedelta(days=825)


def test_server_certificate_chains_names_and_usage(ca: CertPair, server: CertPair) -> None:
    cert = _cert(server)
    cert.verify_directly_issued_by(_cert(ca))
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "broker.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not _ext(cert, x509.BasicConstraints).value.ca
    aki = _ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki == _ext(_cert(ca), x509.SubjectKeyIdentifier).value.digest
    assert _ext(cert, x509.SubjectKeyIdentifier).value.digest != aki

    store = Store([_cert(ca)])
    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("::1"))):
        chain = PolicyBuilder().store(store).build_server_verifier(name).verify(cert, [])
        assert chain[-1] == _cert(ca)
    with pytest.raises(VerificationError):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("other.example")).verify(
            cert, []
        )


def test_client_certificate_is_for_clients_only(ca: CertPair, client: CertPair) -> None:
    cert = _cert(client)
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not [e for e in cert.extensions if isinstance(e.value, x509.SubjectAlternativeName)]
    store = Store([_cert(ca)])
    # The strict (webpki) client profile also wants a SAN: give the silo's name when asked.
    named = _cert(issue(ca, "silo-a", dns_names=["silo-a.fedsilo"], client=True))
    verified = PolicyBuilder().store(store).build_client_verifier().verify(named, [])
    assert verified.chain[-1] == _cert(ca)
    assert verified.subjects == [x509.DNSName("silo-a.fedsilo")]
    with pytest.raises(VerificationError):  # no serverAuth: cannot pose as the broker
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("localhost")).verify(
            cert, []
        )


def test_both_usages_and_wrong_ca_is_rejected(ca: CertPair) -> None:
    both = issue(ca, "node", dns_names=["node.example"], server=True, client=True)
    usages = set(_ext(_cert(both), x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    other = make_ca("someone else")
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([_cert(other)])).build_server_verifier(
            x509.DNSName("node.example")
        ).verify(_cert(both), [])


def test_leaf_does_not_outlive_its_ca() -> None:
    short = make_ca("short-lived", days=10)
    leaf = issue(short, "x", client=True, days=825)
    assert _cert(leaf).not_valid_after_utc == _cert(short).not_valid_after_utc


def _handshake(tmp_path: Path, ca: CertPair, server: CertPair, client: CertPair) -> str:
    """A real TLS 1.2+ handshake with mutual authentication; the client's peer CN."""
    ca.write(tmp_path / "ca.pem", tmp_path / "ca.key")
    server.write(tmp_path / "s.pem", tmp_path / "s.key")
    client.write(tmp_path / "c.pem", tmp_path / "c.key")
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(tmp_path / "s.pem", tmp_path / "s.key")
    sctx.load_verify_locations(tmp_path / "ca.pem")
    sctx.verify_mode = ssl.CERT_REQUIRED
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_verify_locations(tmp_path / "ca.pem")
    cctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "c.key")
    a, b = socket.socketpair()
    seen: dict[str, object] = {}

    def serve() -> None:
        try:
            with sctx.wrap_socket(a, server_side=True) as s:
                seen["client"] = s.getpeercert()
                s.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            seen["error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with cctx.wrap_socket(b, server_hostname="localhost") as c:
            assert c.recv(2) == b"ok"
            peer = c.getpeercert()
    finally:
        thread.join(5)
    assert "error" not in seen, seen
    assert dict(x[0] for x in seen["client"]["subject"])["commonName"] == "silo-a"
    return dict(x[0] for x in peer["subject"])["commonName"]


def test_openssl_accepts_the_chain_in_a_mutual_tls_handshake(
    tmp_path: Path, ca: CertPair, server: CertPair, client: CertPair
) -> None:
    assert _handshake(tmp_path, ca, server, client) == "broker"


def test_write_modes_and_read_back(tmp_path: Path, client: CertPair) -> None:
    old = os.umask(0)  # a careless umask must not make the key world-readable
    try:
        client.write(tmp_path / "sub" / "c.pem", tmp_path / "sub" / "c.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "sub" / "c.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "sub" / "c.pem").stat().st_mode) == 0o644
    assert CertPair.read(tmp_path / "sub" / "c.pem", tmp_path / "sub" / "c.key") == client
    assert [p.name for p in (tmp_path / "sub").iterdir() if p.name.startswith(".")] == []


def test_write_replaces_a_loose_key_file(tmp_path: Path, ca: CertPair, client: CertPair) -> None:
    key = tmp_path / "c.key"
    key.write_bytes(b"old")
    key.chmod(0o644)
    client.write(tmp_path / "c.pem", key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes() == client.key_pem


def test_read_errors_name_the_file(tmp_path: Path, client: CertPair) -> None:
    client.write(tmp_path / "c.pem", tmp_path / "c.key")
    with pytest.raises(ValueError, match=r"missing\.pem"):
        CertPair.read(tmp_path / "missing.pem", tmp_path / "c.key")
    with pytest.raises(ValueError, match=r"c\.key does not hold a PEM certificate"):
        CertPair.read(tmp_path / "c.key", tmp_path / "c.key")
    with pytest.raises(ValueError, match=r"c\.pem does not hold an unencrypted PEM private key"):
        CertPair.read(tmp_path / "c.pem", tmp_path / "c.pem")


def test_fingerprint_is_sha256_of_der(server: CertPair) -> None:
    der = _cert(server).public_bytes(serialization.Encoding.DER)
    assert fingerprint(server.cert_pem) == "sha256:" + hashlib.sha256(der).hexdigest()
    assert fingerprint(server.cert_pem) != fingerprint(make_ca("x").cert_pem)


def test_repr_hides_the_private_key(client: CertPair) -> None:
    text = repr(client)
    assert "silo-a" in text and fingerprint(client.cert_pem) in text
    assert "PRIVATE" not in text and client.key_pem.decode()[40:80] not in text


def test_issue_refuses_bad_requests(ca: CertPair, client: CertPair) -> None:
    with pytest.raises(ValueError, match="server=True, client=True"):
        issue(ca, "x")
    with pytest.raises(ValueError, match="DNS name or IP address"):
        issue(ca, "x", server=True)
    with pytest.raises(ValueError, match="invalid IP address"):
        issue(ca, "x", ip_addresses=["300.1.1.1"], server=True)
    with pytest.raises(TypeError):
        issue(ca, "x", dns_names="localhost", server=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not match"):
        issue(CertPair(ca.cert_pem, client.key_pem), "x", client=True)
    with pytest.raises(ValueError, match="common name"):
        make_ca("")
    with pytest.raises(ValueError, match="days"):
        make_ca("x", days=0)
