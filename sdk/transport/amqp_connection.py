"""The AMQP transport's connection: connecting, backing off, reconnecting.

The transport takes one URL or several (the nodes of a cluster) and connects to the first
that answers; `startup_timeout` keeps trying that long at start. Any operation that finds
the connection or channel lost (broker restart, network loss, `rabbitmqctl
close_connection`, a broker alarm outlasting `blocked_connection_timeout`) reconnects with
exponential backoff and full jitter, cycling through the URLs, for at most
`reconnect_timeout` seconds of outage, then raises `BrokerUnavailable`. A reconnect opens a
new channel and runs `on_connect` (the topology), after `on_drop` let the transport forget
what belonged to the old connection; then the operation is retried. Each connection/channel
has a generation number, so the transport can tell deliveries of an older one apart.

Error texts never hold a password: URLs are masked and secrets scrubbed from pika's text.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pika
import pika.exceptions

from fedsilo.sdk.transport.amqp_topology import lock_queue
from fedsilo.sdk.transport.tls import TlsFiles, describe_tls_error, ssl_options

#: The AMQP transport logs under one name, whichever of its modules logs.
log = logging.getLogger("fedsilo.sdk.transport.amqp")

#: Channel.Close reply codes that mean "the broker side went away", not "you made a mistake"
#: (320 connection-forced, 506 resource-error, 541 internal-error).
_TRANSIENT_CLOSE_CODES = frozenset({320, 506, 541})

T = TypeVar("T")


def mask_url(url: str) -> str:
    """`url` with the password replaced by *** and the port made explicit."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    try:
        port = parts.port
    except ValueError:
        port = None
    port = port or (5671 if parts.scheme == "amqps" else 5672)
    user = parts.username
    auth = f"{user}:***@" if parts.password is not None else (f"{user}@" if user else "")
    return urlunsplit((parts.scheme, f"{auth}{host}:{port}", parts.path, "", ""))


class BrokerUnavailable(ConnectionError):
    """The broker could not be reached or refused the connection."""


def refusal(exc: BaseException) -> Literal["credentials", "vhost"] | None:
    """Why a broker that answered refused a connection: its login (ACCESS_REFUSED) or the
    vhost (NOT_ALLOWED: absent, or no permission); None for "nobody answered" and other
    failures. Each needs a different fix, so the error message must tell them apart."""
    text = f"{exc} {exc.args!r}"
    if (isinstance(exc, pika.exceptions.ProbableAuthenticationError | pika.exceptions
                   .AuthenticationError) or "ACCESS_REFUSED" in text):
        return "credentials"
    if isinstance(exc, pika.exceptions.ProbableAccessDeniedError) or "NOT_ALLOWED" in text:
        return "vhost"
    return None


class SiloAlreadyConnected(RuntimeError):
    """Another live process holds this silo's broker lock: two agents of one silo would
    split its plans between them."""



class ConnectionLost(Exception):
    """Internal: the connection is not usable (no pika exception to show for it)."""



class AmqpConnection:
    """One pika BlockingConnection and its channel, kept alive across outages; one thread
    only. `role` (the aggregator or this process's silo id) names the lock holder in error
    texts.

    `reconnects` counts successful reconnections after a loss; `url` is the URL currently
    (or last) connected to, `urls` all of them. `reconnect_timeout=None` retries forever;
    `blocked_connection_timeout=None` waits out a broker alarm forever; `heartbeat=None`
    takes the broker's heartbeat interval. Nothing connects before `start`."""

    def __init__(
        self,
        url: str | Sequence[str],
        role: str,
        *,
        on_connect: Callable[[AmqpConnection], None],
        on_drop: Callable[[], None],
        prefetch: int = 8,
        connect_timeout: float = 5.0,
        startup_timeout: float = 0.0,
        reconnect_timeout: float | None = 300.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 15.0,
        heartbeat: int | None = None,
        blocked_connection_timeout: float | None = 300.0,
        tls: TlsFiles | None = None,
    ) -> None:
        urls = (url,) if isinstance(url, str) else tuple(url)
        if not urls or not all(isinstance(u, str) and u for u in urls):
            raise ValueError("url must be a broker URL or a non-empty sequence of them")
        if startup_timeout < 0 or (reconnect_timeout is not None and reconnect_timeout < 0):
            raise ValueError("startup_timeout and reconnect_timeout must be >= 0")
        if backoff_base <= 0 or backoff_cap < backoff_base:
            raise ValueError("need 0 < backoff_base <= backoff_cap")
        self.urls: tuple[str, ...] = urls
        self.url = urls[0]
        self.role = role
        self.prefetch = prefetch
        self.reconnects = 0
        self.connect_timeout = connect_timeout
        self.startup_timeout = startup_timeout
        self.reconnect_timeout = reconnect_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.heartbeat = heartbeat
        self.blocked_connection_timeout = blocked_connection_timeout
        self.tls = tls or TlsFiles()  # used by amqps:// URLs only
        self.user: str | None = None  # our broker login, stamped as user_id
        self.channel: Any = None
        self.generation = 0  # bumped for every channel opened and every connection lost
        self.closed = False
        self._on_connect = on_connect
        self._on_drop = on_drop
        self._ever_connected = False
        self._blocking: pika.BlockingConnection | None = None
        self._url_index = 0
        self._outage_since: float | None = None  # when the current outage began
        self._attempts = 0  # reconnect attempts in the current outage
        self._blocked = False

    def start(self) -> None:
        """Connect, trying for up to `startup_timeout`; BrokerUnavailable if none answered
        in time (at once when every broker refused the login or the vhost)."""
        deadline = time.monotonic() + self.startup_timeout
        attempt = 0
        while True:
            errors = self._connect_pass(0)
            if errors is None:
                return
            now = time.monotonic()
            # A refused login or vhost is permanent: waiting out startup_timeout won't help.
            if now >= deadline or all(refusal(e) is not None for _, e in errors):
                raise BrokerUnavailable(
                    self._unavailable(errors, "cannot connect to the RabbitMQ broker", None)
                ) from None
            log.info("no broker answered (%s); retrying", self._describe(errors))
            time.sleep(min(self._backoff(attempt), deadline - now))
            attempt += 1

    @property
    def blocked(self) -> bool:
        """Whether the broker currently blocks this connection (memory or disk alarm)."""
        return self._blocked

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter."""
        return random.uniform(0.0, min(self.backoff_cap, self.backoff_base * 2**attempt))

    def _scrub(self, text: str) -> str:
        for url in self.urls:
            password = urlsplit(url).password
            if password:
                for form in {password, unquote(password), quote(unquote(password), safe="")}:
                    if form:
                        text = text.replace(form, "***")
        return text

    def _detail(self, exc: BaseException) -> str:
        """`exc` as "Type: detail", password-free (pika's wrappers often have no str)."""
        tls = describe_tls_error(exc)
        if tls is not None:  # plain words and a remedy instead of an OpenSSL code
            return self._scrub(tls)
        text = str(exc) or ", ".join(str(a) or repr(a) for a in exc.args)
        return f"{type(exc).__name__}: {self._scrub(text) or 'no detail'}"

    def _describe(self, errors: list[tuple[str, BaseException]]) -> str:
        return "; ".join(f"{mask_url(u)} ({self._detail(e)})" for u, e in errors)

    def _unavailable(
        self, errors: list[tuple[str, BaseException]], what: str, outage: float | None
    ) -> str:
        plural = len(self.urls) > 1
        during = "" if outage is None else f" (gave up after an outage of {outage:.1f} s)"
        hints = []
        for url, kind in dict.fromkeys((u, refusal(e)) for u, e in errors):
            parts = urlsplit(url)
            user = unquote(parts.username or "guest")
            vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
            if kind == "credentials":
                hints.append(
                    f"{mask_url(url)} refused the credentials of user {user!r}: check the user "
                    "name and password in broker.urls (or broker.password_file) and that the "
                    "user exists on the broker (`rabbitmqctl list_users`; RabbitMQ's `guest` "
                    "may log in from localhost only)."
                )
            elif kind == "vhost":
                hints.append(
                    f"{mask_url(url)} refused user {user!r} access to the vhost {vhost!r} (it "
                    "does not exist, or the user has no permissions on it): create it with "
                    f"`rabbitmqctl add_vhost {vhost}` and `rabbitmqctl set_permissions -p "
                    f"{vhost} {user} '.*' '.*' '.*'` (or import the provisioning kit's "
                    "definitions), or fix the vhost in broker.urls."
                )
        if any(refusal(e) is None for _, e in errors):
            hints.append(
                "Start a broker (`rabbitmq-server -detached`) or check the host and port in "
                f"the URL{'s' if plural else ''}."
            )
        return (
            f"{what}{during}: tried {'each of ' if plural else ''}{self._describe(errors)}. "
            + " ".join(dict.fromkeys(hints))
        )

    def parameters(self, url: str) -> pika.URLParameters:
        params = pika.URLParameters(url)
        # Replaces pika's default amqps:// context (and any ?ssl_options= in the URL).
        params.ssl_options = ssl_options(
            url,
            ca_file=self.tls.ca_file,
            cert_file=self.tls.cert_file,
            key_file=self.tls.key_file,
            server_name=self.tls.server_name,
        )
        params.connection_attempts = 1
        params.retry_delay = 0
        params.socket_timeout = self.connect_timeout
        params.stack_timeout = self.connect_timeout
        params.blocked_connection_timeout = self.blocked_connection_timeout
        if self.heartbeat is not None:
            params.heartbeat = self.heartbeat
        return params

    def _connect_pass(self, first: int) -> list[tuple[str, BaseException]] | None:
        """Try every URL once, starting with `first`; None on success, else the errors."""
        errors: list[tuple[str, BaseException]] = []
        n = len(self.urls)
        for k in range(n):
            i = (first + k) % n
            url = self.urls[i]
            try:
                connection = pika.BlockingConnection(self.parameters(url))
            except (pika.exceptions.AMQPError, OSError) as exc:
                errors.append((url, exc))
                continue
            self._blocking = connection
            self._url_index = i
            self.url = url
            # Stamped on every publish: the broker validates it against the login, so a
            # receiver can tell senders apart (per-sender chunk quotas) without trusting them.
            credentials = pika.URLParameters(url).credentials
            self.user = (credentials.username
                         if isinstance(credentials, pika.PlainCredentials) else None)
            try:
                self._setup()
            except Exception as exc:
                self.drop()
                if getattr(exc, "reply_code", None) == 405 and not self._ever_connected:
                    raise SiloAlreadyConnected(
                        f"another agent of {self.role} is connected to the broker at "
                        f"{mask_url(url)} (it holds {lock_queue(self.role)}); stop it first: "
                        "two agents of one silo would split its plans"
                    ) from None
                if getattr(exc, "reply_code", None) == 403:  # permanent: retrying won't help
                    raise BrokerUnavailable(
                        f"the broker at {mask_url(url)} refused access while setting up "
                        f"({self._detail(exc)}). Check the user's permissions on the vhost; "
                        "a provisioned silo may not configure anything and needs "
                        "broker.declare_topology = false (its kit's config sets it)."
                    ) from None
                if not self.is_loss(exc):
                    raise
                errors.append((url, exc))
                continue
            self._ever_connected = True
            return None
        return errors

    def _setup(self) -> None:
        assert self._blocking is not None
        impl = getattr(self._blocking, "_impl", None)
        # Registered on the I/O layer so the warning shows while a publish is stuck; the
        # BlockingConnection API would only report it once the blocking call returned.
        target = impl if impl is not None else self._blocking
        target.add_on_connection_blocked_callback(self._on_blocked)
        target.add_on_connection_unblocked_callback(self.on_unblocked)
        self.open_channel()
        self._on_connect(self)

    def _on_blocked(self, _connection: Any, frame: Any) -> None:
        if not self._blocked:
            self._blocked = True
            reason = getattr(getattr(frame, "method", None), "reason", "") or "no reason given"
            log.warning("broker blocked publishing: %s; waiting (%s)", reason, mask_url(self.url))

    def on_unblocked(self, _connection: Any = None, _frame: Any = None) -> None:
        if self._blocked:
            self._blocked = False
            log.info("broker unblocked publishing (%s)", mask_url(self.url))

    def is_loss(self, exc: BaseException) -> bool:
        """Whether `exc` means the connection or channel is gone (reconnect and retry)."""
        if isinstance(exc, BrokerUnavailable):
            return False
        if isinstance(exc, ConnectionLost):
            return True
        if isinstance(exc, pika.exceptions.ChannelClosed):
            connection = self._blocking
            return (
                connection is None
                or not connection.is_open
                or exc.reply_code in _TRANSIENT_CLOSE_CODES
            )
        return isinstance(
            exc,
            (pika.exceptions.AMQPConnectionError, pika.exceptions.ChannelWrongStateError, OSError),
        )

    def drop(self) -> None:
        """Forget the connection, its channel and everything tied to them."""
        connection, self._blocking, self.channel = self._blocking, None, None
        self.generation += 1
        self._on_drop()
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception as exc:  # already broken: nothing to release
                log.debug("error closing AMQP connection: %s", exc)

    def lost(self, exc: BaseException, doing: str) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
        log.warning(
            "lost the connection to the broker at %s while %s (%s); reconnecting",
            mask_url(self.url),
            doing,
            self._detail(exc),
        )
        self.drop()

    def usable(self) -> bool:
        c, ch = self._blocking, self.channel
        return c is not None and c.is_open and ch is not None and ch.is_open

    def ensure(self, deadline: float | None = None) -> bool:
        """Connected, reconnecting if needed. False when `deadline` passed first (the outage
        goes on); BrokerUnavailable once the outage exceeds `reconnect_timeout`."""
        if self.closed:
            raise RuntimeError("this AmqpTransport is closed")
        if self.usable():
            return True
        if self._blocking is not None:
            self.lost(ConnectionLost("connection or channel closed"), "checking the connection")
        if self._outage_since is None:
            self._outage_since = time.monotonic()
        limit = (
            None
            if self.reconnect_timeout is None
            else (self._outage_since + self.reconnect_timeout)
        )
        while True:
            if self._attempts:  # the first try is immediate, later ones back off
                delay = self._backoff(self._attempts - 1)
                now = time.monotonic()
                for end in (limit, deadline):
                    if end is not None:
                        delay = min(delay, end - now)
                time.sleep(max(delay, 0.0))
            self._attempts += 1
            errors = self._connect_pass(self._url_index + 1)
            now = time.monotonic()
            if errors is None:
                self.reconnects += 1
                log.warning(
                    "reconnected to the broker at %s after %.1f s (reconnect #%d)",
                    mask_url(self.url),
                    now - self._outage_since,
                    self.reconnects,
                )
                return True
            # Only a failed attempt ends the outage: a broker that accepts connections but
            # blocks publishing (alarm) is waited out however long it takes.
            if limit is not None and now >= limit:
                raise BrokerUnavailable(
                    self._unavailable(errors, "lost the RabbitMQ broker", now - self._outage_since)
                ) from None
            if deadline is not None and now >= deadline:
                return False
            log.info("broker still unreachable (%s); retrying", self._describe(errors))

    def healthy(self) -> None:
        """An operation succeeded: any outage is over."""
        self._outage_since = None
        self._attempts = 0

    def call(self, op: Callable[[], T], doing: str) -> T:
        """`op()` on a live connection; on a loss, reconnect and run it again."""
        while True:
            self.ensure()
            try:
                result = op()
            except Exception as exc:
                if not self.is_loss(exc):
                    raise
                self.lost(exc, doing)
                continue
            self.healthy()
            return result

    def keep_alive(self) -> None:
        """Service heartbeats and broker notifications without consuming anything;
        reconnects if the connection was lost. Call it between long computation steps."""
        self.call(
            lambda: self._conn().process_data_events(time_limit=0), "keeping the connection alive"
        )

    def _conn(self) -> pika.BlockingConnection:
        if self._blocking is None:
            raise ConnectionLost("not connected")
        return self._blocking

    def open_channel(self) -> None:
        self.generation += 1
        self.channel = self._conn().channel()
        self.channel.confirm_delivery()
        self.channel.basic_qos(prefetch_count=self.prefetch)

    def sleep(self, seconds: float) -> None:
        """Wait inside pika, so heartbeats keep flowing."""
        self._conn().sleep(seconds)

    def close(self) -> None:
        """Close the connection; the transport cannot be used afterwards (except `close`)."""
        self.closed = True
        connection, self._blocking, self.channel = self._blocking, None, None
        self.generation += 1
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception as exc:  # already broken: nothing to release
                log.debug("error closing AMQP connection: %s", exc)


__all__ = [
    "AmqpConnection",
    "BrokerUnavailable",
    "ConnectionLost",
    "SiloAlreadyConnected",
    "mask_url",
    "refusal",
]
