"""The `[broker]` section shared by federation.toml and silo.toml, and how it becomes a
connected transport. Kept apart from the AMQP code so configs load without pika."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit, urlunsplit

if TYPE_CHECKING:
    from fedsilo.sdk.transport.amqp import AmqpTransport, TransferProgress
    from fedsilo.sdk.transport.codec import Codec

log = logging.getLogger(__name__)

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and how hard to try. One vhost per federation: put it in the URL
    path (`amqp://user@host:5672/my-federation`). Several URLs = the nodes of a cluster."""

    urls: tuple[str, ...] = field(
        default=(DEFAULT_URL,), metadata={"secret": "url"}, repr=False  # URLs hold passwords
    )
    password_file: Path | None = None
    """Read the broker password from this owner-only file instead of writing it in a URL."""
    tls_ca_file: Path | None = None
    """CA certificate (PEM) that signed the broker's certificate, for amqps:// URLs (unset:
    the system's CA store). The broker is always verified."""
    tls_cert_file: Path | None = None
    """Client certificate (PEM) to present to the broker (needs `tls_key_file`)."""
    tls_key_file: Path | None = None
    """Private key (PEM, unencrypted, mode 0600) of `tls_cert_file`."""
    tls_server_name: str | None = None
    """Name to expect in the broker's certificate (and send as SNI) instead of the URL's host:
    for a broker reached through a tunnel or by an IP address its certificate does not name."""
    declare_topology: bool = True
    """False for a provisioned silo whose broker user may not configure anything: the
    topology comes from the definitions file."""
    chunk_size_mb: float = 4.0
    connect_timeout_s: float = 5.0
    startup_timeout_s: float = 0.0
    """Keep trying to reach the broker this long at start (0: fail at once)."""
    reconnect_timeout_s: float = 300.0
    """Give up (and stop, state saved) after an outage this long."""
    heartbeat_s: int = 60
    max_pending_mb: float = 2048.0
    """Bytes of incomplete chunked messages held per sender (its broker user); memory is
    at most this times the number of broker users."""
    reassembly_timeout_s: float = 300.0
    """Drop a chunked message that got no new chunk for this long."""
    dead_letter_max: int = 100_000
    """Provisioned brokers: the dead-letter queue keeps at most this many messages (the
    oldest go first), so a flood of refused messages cannot fill the broker's disk."""
    dead_letter_ttl_h: float = 14 * 24.0
    """Provisioned brokers: a dead letter is kept this many hours for audit."""

    def __post_init__(self) -> None:
        if isinstance(self.urls, str):
            object.__setattr__(self, "urls", (self.urls,))
        if not self.urls:
            raise ValueError("broker.urls must list at least one amqp:// or amqps:// URL")
        for url in self.urls:
            if urlsplit(url).scheme not in ("amqp", "amqps"):
                raise ValueError(
                    "broker.urls entries must start with amqp:// or amqps:// "
                    f"(got one starting with {url.split(':', 1)[0]!r})"
                )
        if not (isinstance(self.dead_letter_max, int) and self.dead_letter_max >= 1
                and self.dead_letter_ttl_h > 0):
            raise ValueError("broker.dead_letter_max must be >= 1 and dead_letter_ttl_h > 0")
        for name in ("chunk_size_mb", "connect_timeout_s", "max_pending_mb",
                     "reassembly_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"broker.{name} must be > 0 (got {getattr(self, name)})")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "broker.tls_cert_file and broker.tls_key_file go together: set both "
                "(a client certificate and its private key) or neither"
            )

    def resolved_urls(self) -> list[str]:
        """The URLs with the password from `password_file` filled in where one is missing."""
        if self.password_file is None:
            return list(self.urls)
        password = read_secret(self.password_file)
        out = []
        for url in self.urls:
            parts = urlsplit(url)
            if parts.password is None:
                user = parts.username or "guest"
                host = parts.hostname or "localhost"
                port = f":{parts.port}" if parts.port else ""
                netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}{port}"
                url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
            out.append(url)
        return out

    def connect(
        self,
        role: str,
        silo_ids: Sequence[str] = (),
        progress: Callable[[TransferProgress], None] | None = None,
        codec: Codec | None = None,
        exclusive: bool = False,
    ) -> AmqpTransport:
        from fedsilo.sdk.transport.amqp import AmqpTransport
        from fedsilo.sdk.transport.amqp_connection import mask_url
        from fedsilo.sdk.transport.tls import TlsFiles, insecure_remote

        tls = TlsFiles(
            self.tls_ca_file, self.tls_cert_file, self.tls_key_file, self.tls_server_name
        )
        for url in self.urls:
            if insecure_remote(url):
                log.warning(
                    "plain amqp:// to %s (%s): credentials and metadata cross the network in "
                    "clear; use amqps://",
                    urlsplit(url).hostname,
                    mask_url(url),
                )
            elif tls != TlsFiles() and urlsplit(url).scheme == "amqp":
                log.warning(
                    "broker.tls_* settings apply to amqps:// URLs only; %s does not use TLS",
                    mask_url(url),
                )
        return AmqpTransport(
            self.resolved_urls(),
            role,
            silo_ids=silo_ids,
            chunk_size=int(self.chunk_size_mb * 2**20),
            connect_timeout=self.connect_timeout_s,
            max_pending_bytes=int(self.max_pending_mb * 2**20),
            reassembly_timeout=self.reassembly_timeout_s,
            startup_timeout=self.startup_timeout_s,
            reconnect_timeout=self.reconnect_timeout_s,
            heartbeat=self.heartbeat_s,
            progress=progress,
            tls=tls,
            declare_topology=self.declare_topology,
            codec=codec,
            exclusive=exclusive,
        )


def read_secret(path: Path) -> str:
    """A secret from a file that only its owner may read (like ssh keys)."""
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the secret file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(
            f"{path} is readable by other users; run `chmod 600 {path}` (it holds a secret)"
        )
    if not text:
        raise ValueError(f"the secret file {path} is empty")
    return text


def owner_only(path: Path) -> None:
    """Create `path` as a folder only its owner can enter (state holds model weights)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
