"""TLS for the broker connection: the `broker.tls_*` settings turned into pika's SSLOptions.

Verification is always on for amqps:// (the broker's certificate must chain to
`broker.tls_ca_file`, or to the system store, and name the host connected to): an
unverified TLS connection would let anyone on the path read the model updates. There is no
switch to turn it off; `broker.tls_server_name` covers a broker reached under a name its
certificate does not carry (an SSH tunnel, an IP address).
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pika

_LOOPBACK_NAMES = frozenset({"localhost"})


@dataclass(frozen=True)
class TlsFiles:
    """The `broker.tls_*` settings as AmqpTransport takes them. All None: verify the broker
    against the system's CA store and present no client certificate."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(
                "broker.tls_cert_file and broker.tls_key_file go together: set both "
                "(a client certificate and its private key) or neither"
            )


def _readable(path: Path, setting: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(
            f"{setting}: cannot read {path} ({exc.strerror or exc}); set it to {what}"
        ) from None


def ssl_options(
    url: str,
    *,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    server_name: str | None = None,
) -> pika.SSLOptions | None:
    """SSLOptions for `url`: None for amqp://; for amqps:// a verifying TLS >= 1.2 context
    (CA from `ca_file`, else the system store; client certificate when given). Reads the
    files on every call, so a reconnect picks up renewed certificates."""
    scheme = urlsplit(url).scheme
    if scheme == "amqp":
        return None
    if scheme != "amqps":
        raise ValueError(f"broker URL scheme must be amqp or amqps (got {scheme!r})")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        pem = _readable(
            ca_file,
            "broker.tls_ca_file",
            "the CA certificate (PEM) that signed the broker's certificate",
        )
        try:
            context.load_verify_locations(cadata=pem.decode("ascii", errors="replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise ValueError(
                f"broker.tls_ca_file: {ca_file} does not hold a PEM CA certificate ({exc})"
            ) from None
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if (cert_file is None) != (key_file is None):
        raise ValueError(
            "broker.tls_cert_file and broker.tls_key_file go together: set both or neither"
        )
    if cert_file is not None and key_file is not None:
        _readable(cert_file, "broker.tls_cert_file", "this process's client certificate (PEM)")
        _readable(key_file, "broker.tls_key_file", "the client certificate's private key (PEM)")
        try:
            context.load_cert_chain(str(cert_file), str(key_file))
        except ssl.SSLError as exc:
            # The reason only: OpenSSL's message never contains key material.
            raise ValueError(
                f"broker.tls_cert_file/broker.tls_key_file: cannot load {cert_file} with "
                f"{key_file} ({exc.reason or exc}); they must be a PEM certificate and its "
                "unencrypted private key"
            ) from None
    return pika.SSLOptions(context, server_hostname=server_name or None)


#: TLS alerts a broker sends when it refuses the client's certificate (or its absence).
_NO_CLIENT_CERT = ("CERTIFICATE_REQUIRED",)
_CLIENT_CERT_REFUSED = (
    "UNKNOWN_CA",
    "BAD_CERTIFICATE",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED",
    "CERTIFICATE_UNKNOWN",
    "UNSUPPORTED_CERTIFICATE",
    "ACCESS_DENIED",
)


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc`, the exceptions it wraps in its args (pika nests them) and its causes."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 20:
        e = todo.pop()
        if any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [a for a in e.args if isinstance(a, BaseException)]
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
    return seen


def describe_tls_error(exc: BaseException) -> str | None:
    """A plain-words reason and remedy when `exc` is a failed TLS handshake, else None."""
    chain = _chain(exc)
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            detail = (e.verify_message or e.reason or str(e)).rstrip(".")
            if e.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH / _IP_ADDRESS_...
                return (
                    f"TLS: the broker's certificate does not name the host connected to "
                    f"({detail}); connect by a name the certificate carries or set "
                    "broker.tls_server_name"
                )
            return (
                f"TLS: the broker's certificate could not be verified ({detail}); set "
                "broker.tls_ca_file to the CA certificate that signed it"
            )
    text = " ".join(str(e) for e in chain).upper()
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return (
            "TLS: the broker's certificate could not be verified; set broker.tls_ca_file "
            "to the CA certificate that signed it"
        )
    alert = next((a for a in _NO_CLIENT_CERT if f"ALERT_{a}" in text), None)
    if alert is not None:
        return (
            "TLS: the broker requires a client certificate; set broker.tls_cert_file and "
            "broker.tls_key_file"
        )
    alert = next((a for a in _CLIENT_CERT_REFUSED if f"ALERT_{a}" in text), None)
    if alert is not None:
        return (
            f"TLS: the broker refused this client certificate ({alert.lower().replace('_', ' ')})"
            "; use one signed by a CA the broker trusts, still valid (broker.tls_cert_file)"
        )
    if "ALERT_HANDSHAKE_FAILURE" in text:
        return (
            "TLS: the broker refused the handshake (handshake failure): it may require a "
            "client certificate (broker.tls_cert_file, broker.tls_key_file) or share no TLS "
            "version or cipher with this client (TLS 1.2 or newer)"
        )
    if any(isinstance(e, ssl.SSLEOFError) for e in chain) or "SSLEOFERROR" in text:
        # TLS 1.3: the client finishes its handshake first, so a broker refusing the client
        # certificate may hang up before its alert is read.
        return (
            "TLS: the broker closed the connection during the TLS handshake; it may require a "
            "client certificate (broker.tls_cert_file, broker.tls_key_file) or refuse this one"
        )
    if "WRONG_VERSION_NUMBER" in text or "UNSUPPORTED_PROTOCOL" in text:
        return (
            "TLS: the handshake failed (wrong version number); is this port a TLS listener? "
            "RabbitMQ's TLS port is usually 5671, its plain one 5672"
        )
    return None


def insecure_remote(url: str) -> bool:
    """Whether `url` is plain amqp:// to a host off this machine (passwords in clear)."""
    parts = urlsplit(url)
    if parts.scheme != "amqp":
        return False
    host = (parts.hostname or "localhost").rstrip(".").lower()
    if host in _LOOPBACK_NAMES:
        return False
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return True  # a DNS name other than localhost
    mapped = getattr(ip, "ipv4_mapped", None)
    return not (ip.is_loopback or (mapped is not None and mapped.is_loopback))


__all__ = ["TlsFiles", "describe_tls_error", "insecure_remote", "ssl_options"]
