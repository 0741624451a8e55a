"""RabbitMQ transport (AMQP 0-9-1 via pika's BlockingConnection).

Topology, declared idempotently by every transport in the federation's vhost:

    fedsilo.plans   (direct)  --<silo id>-->  silo.<id>.plans      (one per silo)
    fedsilo.uploads (direct)  --aggregator--> aggregator.uploads
    fedsilo.dead    (fanout)  ------------->  fedsilo.dead         (audit; both work
                                                                     queues dead-letter here)

Queues are durable quorum queues (classic durable where the broker refuses quorum),
messages persistent, publishes mandatory with publisher confirms: `send_*` returns only
once the broker confirmed every chunk. Payloads above `chunk_size` travel as numbered chunks
(`chunking.ChunkHeader` in the AMQP headers, chunk bytes in the body).

Receiving uses `basic.get`, polled with a short back-off (5 ms up to 100 ms, sleeping inside
`connection.sleep` so heartbeats keep flowing). This is deliberate: acks must wait until the
consumer has applied (and checkpointed) a message, so a push consumer with a prefetch window
would stall as soon as the unacked chunks of incomplete messages plus delivered-but-unacked
messages fill the window, and the needed window is unknown in advance (and RabbitMQ applies a
new basic.qos only to consumers created after it). basic.get is not limited by prefetch, so
reassembly can never deadlock; memory is bounded by the Reassembler's `max_pending_bytes`.
`prefetch` is still applied with basic.qos (it only matters to push consumers on the channel).

Nothing is acked before `Delivery.ack()`; a closed connection returns all unacked
deliveries to their queue, so they are redelivered. Malformed messages are rejected without
requeue (they land in `fedsilo.dead`), logged, and counted in `rejected`.

Faults. The transport takes one URL or several (the nodes of a cluster) and connects to the
first that answers; `startup_timeout` keeps trying that long at start. Any operation that
finds the connection or channel lost (broker restart, network loss, `rabbitmqctl
close_connection`, a broker alarm outlasting `blocked_connection_timeout`) reconnects with
exponential backoff and full jitter, cycling through the URLs, for at most
`reconnect_timeout` seconds of outage, then raises `BrokerUnavailable`. A reconnect opens a
new channel, redeclares the topology, drops half-reassembled messages and forgets unacked
delivery tags (the broker requeues every unacked delivery of a dead connection, so they come
again), then retries the operation. Each connection/channel has a generation number; the
`ack()` of a delivery from an older generation is a no-op, since its message is redelivered.

Delivery is therefore AT-LEAST-ONCE: a publish interrupted part-way (or whose confirm was
lost) is re-sent whole under a fresh message id, so a message can arrive twice (the
orphaned chunks of the first attempt expire at the receiver after `reassembly_timeout` and
are dead-lettered), and a message applied but not yet acked when the connection dies is
delivered again. Consumers must be idempotent (ours are: rounds and silo ids identify
messages).

Thread-safety: pika's BlockingConnection is not thread-safe. Each AmqpTransport owns one
connection and must be used from one thread only: use one AmqpTransport per thread, and
call `Delivery.ack()` and `keep_alive()` on the thread that created it. A long computation
between transport calls (local training) should call `keep_alive()` now and then so
heartbeats are answered and the broker does not drop the connection.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pika
import pika.exceptions

from fedsilo.sdk.messages import Announce, RoundPlan, Upload
from fedsilo.sdk.transport.base import (
    REFUSALS_KEPT,
    Delivery,
    Inbound,
    RefusalRecord,
    TrafficCounter,
    Transport,
)
from fedsilo.sdk.transport.chunking import Chunk, ChunkError, ChunkHeader, Reassembler, split
from fedsilo.sdk.transport.codec import Codec, PlainCodec, Rejected
from fedsilo.sdk.transport.tls import TlsFiles, describe_tls_error, ssl_options

log = logging.getLogger(__name__)

PLANS_EXCHANGE = "fedsilo.plans"
UPLOADS_EXCHANGE = "fedsilo.uploads"
DEAD_EXCHANGE = "fedsilo.dead"
DEAD_QUEUE = "fedsilo.dead"
UPLOADS_QUEUE = "aggregator.uploads"
UPLOADS_ROUTING_KEY = "aggregator"
AGGREGATOR = "aggregator"
CONTENT_TYPE = "application/x-fedsilo"
#: Stale chunk sets are dropped when a queue runs empty, and at least this often while a
#: flood keeps it busy.
EXPIRE_EVERY_S = 1.0

#: Channel.Close reply codes that mean "the broker side went away", not "you made a mistake"
#: (320 connection-forced, 506 resource-error, 541 internal-error).
_TRANSIENT_CLOSE_CODES = frozenset({320, 506, 541})

T = TypeVar("T")


def plans_queue(silo_id: str) -> str:
    return f"silo.{silo_id}.plans"


def lock_queue(silo_id: str) -> str:
    """An exclusive queue an agent holds while connected: the broker refuses a second one
    and drops it when the holder's connection dies (however it dies)."""
    return f"silo.{silo_id}.lock"


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


class PublishError(RuntimeError):
    """The broker did not accept a message (no queue bound, or a negative confirm)."""


@dataclass(frozen=True)
class TransferProgress:
    """Progress of one chunked message. `name` is the exchange for sends and the queue for
    receives. A send interrupted by a reconnect starts again under a new `message_id`."""

    direction: Literal["send", "receive"]
    name: str
    message_id: str
    done_bytes: int
    total_bytes: int
    chunks_done: int
    chunks_total: int


class _Lost(Exception):
    """Internal: the connection is not usable (no pika exception to show for it)."""


class AmqpTransport(Transport):
    """One connection, one channel, one thread. `role` is "aggregator" or this process's
    silo id. `url` is one broker URL or several (cluster nodes, tried in turn).

    `reconnects` counts successful reconnections after a loss; `url` is the URL currently
    (or last) connected to, `urls` all of them. `reconnect_timeout=None` retries forever;
    `blocked_connection_timeout=None` waits out a broker alarm forever; `heartbeat=None`
    takes the broker's heartbeat interval."""

    def __init__(
        self,
        url: str | Sequence[str],
        role: str,
        silo_ids: Sequence[str] = (),
        chunk_size: int = 4 * 2**20,
        prefetch: int = 8,
        connect_timeout: float = 5.0,
        max_pending_bytes: int = 2**31,
        reassembly_timeout: float = 300.0,
        *,
        startup_timeout: float = 0.0,
        reconnect_timeout: float | None = 300.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 15.0,
        heartbeat: int | None = None,
        blocked_connection_timeout: float | None = 300.0,
        progress: Callable[[TransferProgress], None] | None = None,
        tls: TlsFiles | None = None,
        declare_topology: bool = True,
        codec: Codec | None = None,
        exclusive: bool = False,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
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
        self.chunk_size = chunk_size
        self.prefetch = prefetch
        self.traffic = TrafficCounter()
        self.rejected: dict[str, int] = {}
        self.refusals: deque[RefusalRecord] = deque(maxlen=REFUSALS_KEPT)
        self.redelivered_done = 0  # redeliveries of messages already handled, acknowledged
        self._reconnects = 0
        self.connect_timeout = connect_timeout
        self.reconnect_timeout = reconnect_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.heartbeat = heartbeat
        self.blocked_connection_timeout = blocked_connection_timeout
        self.progress = progress
        self.tls = tls or TlsFiles()  # used by amqps:// URLs only
        self.declare_topology = declare_topology  # False: the broker's definitions provide it
        self.codec = codec or PlainCodec()
        # A silo's agent holds its lock queue (one live agent per silo); other transports
        # of the same role (a test's sender) do not.
        self.exclusive = exclusive and role != AGGREGATOR
        self._ever_connected = False
        silos = list(dict.fromkeys(silo_ids))
        if role != AGGREGATOR and role not in silos:
            silos.insert(0, role)
        self._silos = silos
        self._reassemblers: dict[str, Reassembler] = {}
        # queue -> (sender, message id) -> delivery tags of the chunks held
        self._held: dict[str, dict[tuple[str, str], list[int]]] = {}
        self._expired_at: dict[str, float] = {}  # queue -> when stale chunk sets were dropped
        self._user: str | None = None  # our broker login, stamped as user_id
        self._max_pending_bytes = max_pending_bytes
        self._reassembly_timeout = reassembly_timeout
        self._quorum = True
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._generation = 0  # bumped for every channel opened and every connection lost
        self._url_index = 0
        self._outage_since: float | None = None  # when the current outage began
        self._attempts = 0  # reconnect attempts in the current outage
        self._blocked = False
        self._closed = False

        deadline = time.monotonic() + startup_timeout
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
    def reconnects(self) -> int:
        return self._reconnects

    @property
    def blocked(self) -> bool:
        """Whether the broker currently blocks this connection (memory or disk alarm)."""
        return self._blocked

    # -- connecting --------------------------------------------------------------------

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

    def _parameters(self, url: str) -> pika.URLParameters:
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
                connection = pika.BlockingConnection(self._parameters(url))
            except (pika.exceptions.AMQPError, OSError) as exc:
                errors.append((url, exc))
                continue
            self._connection = connection
            self._url_index = i
            self.url = url
            # Stamped on every publish: the broker validates it against the login, so a
            # receiver can tell senders apart (per-sender chunk quotas) without trusting them.
            credentials = pika.URLParameters(url).credentials
            self._user = (credentials.username
                          if isinstance(credentials, pika.PlainCredentials) else None)
            try:
                self._setup()
            except Exception as exc:
                self._drop()
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
                if not self._is_loss(exc):
                    raise
                errors.append((url, exc))
                continue
            self._ever_connected = True
            return None
        return errors

    def _setup(self) -> None:
        assert self._connection is not None
        impl = getattr(self._connection, "_impl", None)
        # Registered on the I/O layer so the warning shows while a publish is stuck; the
        # BlockingConnection API would only report it once the blocking call returned.
        target = impl if impl is not None else self._connection
        target.add_on_connection_blocked_callback(self._on_blocked)
        target.add_on_connection_unblocked_callback(self._on_unblocked)
        self._open_channel()
        if self.exclusive:
            # 405 RESOURCE_LOCKED while another connection holds it. After an outage of our
            # own that is our old connection the broker has not dropped yet: retried.
            self._channel.queue_declare(lock_queue(self.role), exclusive=True, auto_delete=True)
        if self.declare_topology:
            self._declare_topology()

    def _on_blocked(self, _connection: Any, frame: Any) -> None:
        if not self._blocked:
            self._blocked = True
            reason = getattr(getattr(frame, "method", None), "reason", "") or "no reason given"
            log.warning("broker blocked publishing: %s; waiting (%s)", reason, mask_url(self.url))

    def _on_unblocked(self, _connection: Any = None, _frame: Any = None) -> None:
        if self._blocked:
            self._blocked = False
            log.info("broker unblocked publishing (%s)", mask_url(self.url))

    def _is_loss(self, exc: BaseException) -> bool:
        """Whether `exc` means the connection or channel is gone (reconnect and retry)."""
        if isinstance(exc, BrokerUnavailable):
            return False
        if isinstance(exc, _Lost):
            return True
        if isinstance(exc, pika.exceptions.ChannelClosed):
            connection = self._connection
            return (
                connection is None
                or not connection.is_open
                or exc.reply_code in _TRANSIENT_CLOSE_CODES
            )
        return isinstance(
            exc,
            (pika.exceptions.AMQPConnectionError, pika.exceptions.ChannelWrongStateError, OSError),
        )

    def _drop(self) -> None:
        """Forget the connection, its channel and everything tied to them."""
        connection, self._connection, self._channel = self._connection, None, None
        self._generation += 1
        self._reassemblers.clear()
        self._held.clear()
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception as exc:  # already broken: nothing to release
                log.debug("error closing AMQP connection: %s", exc)

    def _lost(self, exc: BaseException, doing: str) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
        log.warning(
            "lost the connection to the broker at %s while %s (%s); reconnecting",
            mask_url(self.url),
            doing,
            self._detail(exc),
        )
        self._drop()

    def _usable(self) -> bool:
        c, ch = self._connection, self._channel
        return c is not None and c.is_open and ch is not None and ch.is_open

    def _ensure(self, deadline: float | None = None) -> bool:
        """Connected, reconnecting if needed. False when `deadline` passed first (the outage
        goes on); BrokerUnavailable once the outage exceeds `reconnect_timeout`."""
        if self._closed:
            raise RuntimeError("this AmqpTransport is closed")
        if self._usable():
            return True
        if self._connection is not None:
            self._lost(_Lost("connection or channel closed"), "checking the connection")
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
                self._reconnects += 1
                log.warning(
                    "reconnected to the broker at %s after %.1f s (reconnect #%d)",
                    mask_url(self.url),
                    now - self._outage_since,
                    self._reconnects,
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

    def _healthy(self) -> None:
        """An operation succeeded: any outage is over."""
        self._outage_since = None
        self._attempts = 0

    def _call(self, op: Callable[[], T], doing: str) -> T:
        """`op()` on a live connection; on a loss, reconnect and run it again."""
        while True:
            self._ensure()
            try:
                result = op()
            except Exception as exc:
                if not self._is_loss(exc):
                    raise
                self._lost(exc, doing)
                continue
            self._healthy()
            return result

    def keep_alive(self) -> None:
        """Service heartbeats and broker notifications without consuming anything;
        reconnects if the connection was lost. Call it between long computation steps."""
        self._call(
            lambda: self._conn().process_data_events(time_limit=0), "keeping the connection alive"
        )

    def _conn(self) -> pika.BlockingConnection:
        if self._connection is None:
            raise _Lost("not connected")
        return self._connection

    # -- setup -------------------------------------------------------------------------

    def _open_channel(self) -> None:
        self._generation += 1
        self._channel = self._conn().channel()
        self._channel.confirm_delivery()
        self._channel.basic_qos(prefetch_count=self.prefetch)

    def _declare_queue(self, name: str, dead_letter: bool) -> None:
        args: dict[str, Any] = {"x-dead-letter-exchange": DEAD_EXCHANGE} if dead_letter else {}
        if self._quorum:
            try:
                self._channel.queue_declare(
                    name, durable=True, arguments={"x-queue-type": "quorum", **args}
                )
                return
            except pika.exceptions.ChannelClosedByBroker as exc:
                if self._is_loss(exc):
                    raise
                log.warning(
                    "broker refused quorum queue %s (%s); using classic durable queues",
                    name,
                    exc,
                )
                self._quorum = False
                self._open_channel()
        self._channel.queue_declare(name, durable=True, arguments=args or None)

    def _declare_topology(self) -> None:
        ch = self._channel
        ch.exchange_declare(DEAD_EXCHANGE, exchange_type="fanout", durable=True)
        ch.exchange_declare(PLANS_EXCHANGE, exchange_type="direct", durable=True)
        ch.exchange_declare(UPLOADS_EXCHANGE, exchange_type="direct", durable=True)
        self._declare_queue(DEAD_QUEUE, dead_letter=False)
        self._channel.queue_bind(DEAD_QUEUE, DEAD_EXCHANGE)
        self._declare_queue(UPLOADS_QUEUE, dead_letter=True)
        self._channel.queue_bind(UPLOADS_QUEUE, UPLOADS_EXCHANGE, routing_key=UPLOADS_ROUTING_KEY)
        for silo_id in self._silos:
            self._declare_queue(plans_queue(silo_id), dead_letter=True)
            self._channel.queue_bind(plans_queue(silo_id), PLANS_EXCHANGE, routing_key=silo_id)

    # -- sending -----------------------------------------------------------------------

    def _report(self, progress: TransferProgress) -> None:
        if self.progress is None:
            return
        try:
            self.progress(progress)
        except Exception:  # a broken progress display must not break the transfer
            log.exception("progress callback failed")

    def _publish(self, exchange: str, routing_key: str, data: bytes) -> None:
        self._call(
            lambda: self._publish_once(exchange, routing_key, data), f"publishing to {exchange}"
        )

    def _publish_once(self, exchange: str, routing_key: str, data: bytes) -> None:
        """Publish `data` whole under a fresh message id (a retry after a reconnect must not
        mix with the chunks an interrupted attempt left behind)."""
        message_id = uuid.uuid4().hex
        if len(data) <= self.chunk_size:
            pieces: list[tuple[dict[str, Any] | None, bytes]] = [(None, data)]
        else:
            pieces = [
                (c.header.to_headers(), c.data) for c in split(data, message_id, self.chunk_size)
            ]
        channel = self._channel
        if channel is None:
            raise _Lost("not connected")
        done = 0
        for i, (headers, body) in enumerate(pieces):
            props = pika.BasicProperties(
                delivery_mode=pika.DeliveryMode.Persistent,
                content_type=CONTENT_TYPE,
                message_id=message_id,
                headers=headers,
                user_id=self._user,
            )
            try:
                channel.basic_publish(exchange, routing_key, body, props, mandatory=True)
            except pika.exceptions.UnroutableError:
                raise PublishError(
                    f"no queue bound to {exchange!r} for routing key {routing_key!r}"
                ) from None
            except pika.exceptions.NackError:
                raise PublishError(f"broker nacked a message to {exchange!r}") from None
            done += len(body)
            if len(pieces) > 1:
                self._report(
                    TransferProgress(
                        "send", exchange, message_id, done, len(data), i + 1, len(pieces)
                    )
                )
        self._on_unblocked()  # confirmed, so not blocked (whatever notifications said)

    def send_plan(self, plan: RoundPlan) -> int:
        data = self.codec.seal(plan)
        self._publish(PLANS_EXCHANGE, plan.silo_id, data)
        self.traffic.add("down", plan.silo_id, len(data))
        return len(data)

    def send_upload(self, upload: Upload) -> int:
        data = self.codec.seal(upload)
        self._publish(UPLOADS_EXCHANGE, UPLOADS_ROUTING_KEY, data)
        self.traffic.add("up", upload.silo_id, len(data))
        return len(data)

    def send_announce(self, announce: Announce) -> int:
        data = self.codec.seal(announce)
        self._publish(UPLOADS_EXCHANGE, UPLOADS_ROUTING_KEY, data)
        self.traffic.add("up", announce.silo_id, len(data))
        return len(data)

    # -- receiving ---------------------------------------------------------------------

    def receive_plan(
        self, silo_id: str, timeout: float | None = None
    ) -> Delivery[RoundPlan] | None:
        if silo_id not in self._silos:
            raise ValueError(f"silo {silo_id!r} is not served by this transport ({self._silos})")
        return self._receive(plans_queue(silo_id), RoundPlan, timeout)

    def receive_upload(self, timeout: float | None = None) -> Delivery[Inbound] | None:
        return self._receive(UPLOADS_QUEUE, (Upload, Announce), timeout)

    def _reassembler(self, queue: str) -> Reassembler:
        if queue not in self._reassemblers:
            self._reassemblers[queue] = Reassembler(
                self._max_pending_bytes, self._reassembly_timeout
            )
            self._held[queue] = {}
        return self._reassemblers[queue]

    def _reject(self, tags: Sequence[int], reason: str, detail: str, message_id: str = ""
                ) -> None:
        log.warning(
            "rejecting %d deliver%s (%s): %s",
            len(tags),
            "y" if len(tags) == 1 else "ies",
            reason,
            detail,
        )
        for tag in tags:
            self._channel.basic_reject(tag, requeue=False)
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.refusals.append(RefusalRecord(time.time(), reason, detail, message_id))

    def _expire(self, queue: str) -> None:
        self._expired_at[queue] = time.monotonic()
        for sender, mid in self._reassembler(queue).expire():
            tags = self._held[queue].pop((sender, mid), [])
            self._reject(tags, "chunk timeout",
                         f"message {mid} of {sender or 'an unknown sender'} incomplete on {queue}",
                         mid)

    def _receive(
        self, queue: str, kind: type | tuple[type, ...], timeout: float | None
    ) -> Delivery | None:
        """Poll `queue`. During an outage this keeps reconnecting until the broker is back
        (then goes on), `timeout` passes (None), or `reconnect_timeout` (BrokerUnavailable)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while True:
            if not self._ensure(deadline):
                return None
            try:
                method, props, body = self._channel.basic_get(queue, auto_ack=False)
                self._healthy()
                if method is None:
                    self._expire(queue)
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return None
                    step = delay if remaining is None else min(delay, remaining)
                    self._conn().sleep(step)
                    delay = min(delay * 2, 0.1)
                    continue
                delay = 0.005
                if time.monotonic() - self._expired_at.get(queue, 0.0) >= EXPIRE_EVERY_S:
                    self._expire(queue)  # a queue kept busy must not keep stale sets alive
                delivery = self._handle(queue, kind, method.delivery_tag, props, body or b"",
                                        redelivered=bool(method.redelivered))
            except Exception as exc:
                if not self._is_loss(exc):
                    raise
                self._lost(exc, f"receiving from {queue}")
                continue
            if delivery is not None:
                return delivery
            # A chunk (or a rejected message) was taken: keep reading while the queue has
            # more, even past the deadline, so `timeout=0` still completes a chunked message
            # that is already waiting; an empty queue ends the wait above.

    def _handle(
        self, queue: str, kind: type | tuple[type, ...], tag: int, props: Any, body: bytes,
        redelivered: bool = False,
    ) -> Delivery | None:
        reassembler = self._reassembler(queue)
        held = self._held[queue]
        message_id = props.message_id or ""
        try:
            header = ChunkHeader.from_headers(getattr(props, "headers", None))
        except ChunkError as exc:
            self._reject([tag], f"chunk: {exc.reason}", str(exc), message_id)
            return None
        if header is None:
            tags, data = [tag], body
        else:
            mid = header.message_id
            sender = _validated_user(props)
            key = (sender, mid)
            before = reassembler.received(mid, sender)
            try:
                data = reassembler.add(Chunk(header, body), sender)
            except ChunkError as exc:
                tags = [tag]
                if exc.dropped:
                    tags = held.pop(key, []) + tags
                self._reject(tags, f"chunk: {exc.reason}", str(exc), message_id)
                return None
            held.setdefault(key, []).append(tag)
            if header.count > 1:
                now = (
                    (header.count, header.total_size)
                    if data is not None
                    else (reassembler.received(mid, sender) or (0, 0))
                )
                if before is None or now[0] != before[0]:
                    self._report(
                        TransferProgress(
                            "receive",
                            queue,
                            mid,
                            now[1],
                            header.total_size,
                            now[0],
                            header.count,
                        )
                    )
            if data is None:
                return None
            tags = held.pop(key)
        try:
            message = self.codec.open(data)
            if not isinstance(message, kind):
                raise Rejected("protocol", f"unexpected {type(message).__name__} on {queue}")
        except Rejected as exc:
            if exc.reason == "replay" and redelivered:
                # The broker redelivers what we accepted and checkpointed but could not
                # acknowledge (the connection was lost first): done already, not an attack.
                log.debug("acknowledging a redelivered message already handled: %s",
                          exc.detail)
                self.redelivered_done += 1
                for t in tags:
                    self._channel.basic_ack(t)
                return None
            self._reject(tags, exc.reason, exc.detail, message_id)
            return None
        except Exception as exc:  # a codec bug must not stop the consumer: dead-letter it
            log.exception("codec failed on a message from %s", queue)
            self._reject(tags, "codec error", repr(exc), message_id)
            return None
        return Delivery(message, len(data), self._acker(tags),
                        self._rejecter(tags, message_id))

    def _acker(self, tags: list[int]) -> Callable[[], None]:
        generation = self._generation
        done = False

        def ack_tags() -> None:
            if self._generation != generation or self._channel is None:
                log.debug(
                    "ack of %d deliver%s from an earlier connection skipped: the broker "
                    "requeued %s and will deliver %s again",
                    len(tags),
                    "y" if len(tags) == 1 else "ies",
                    "it" if len(tags) == 1 else "them",
                    "it" if len(tags) == 1 else "them",
                )
                return
            for tag in tags:
                self._channel.basic_ack(tag)

        def ack() -> None:
            nonlocal done
            if done:
                return
            if self._closed:
                log.debug("ack after close skipped: the broker requeued the message")
            else:
                self._call(ack_tags, "acknowledging a delivery")
            done = True

        return ack

    def _rejecter(self, tags: list[int], message_id: str) -> Callable[[str, str], None]:
        """Application-level refusal: dead-letter (never requeue) and count."""
        generation = self._generation

        def reject_tags(reason: str, detail: str) -> None:
            if self._generation != generation or self._channel is None:
                self.rejected[reason] = self.rejected.get(reason, 0) + 1
                log.warning(
                    "rejected a message (%s): %s; its delivery belonged to an earlier "
                    "connection, so the broker will deliver it again", reason, detail,
                )
                return
            self._reject(tags, reason, detail, message_id)

        def reject(reason: str, detail: str) -> None:
            if self._closed:
                reject_tags(reason, detail)
            else:
                self._call(lambda: reject_tags(reason, detail), "rejecting a delivery")

        return reject

    def peek_dead_letters(self, limit: int = 50) -> list[DeadLetter]:
        """Up to `limit` messages of the dead-letter queue, oldest first, left in place
        (they are taken unacknowledged and requeued): for `fedsilo dead-letters`."""
        out: list[DeadLetter] = []

        def peek() -> None:
            out.clear()
            tags = []
            try:
                for _ in range(limit):
                    method, props, body = self._channel.basic_get(DEAD_QUEUE, auto_ack=False)
                    if method is None:
                        break
                    tags.append(method.delivery_tag)
                    out.append(DeadLetter.of(props, body or b""))
            finally:
                for tag in tags:
                    self._channel.basic_nack(tag, requeue=True)

        self._call(peek, "reading the dead-letter queue")
        return out

    def close(self) -> None:
        """Close the connection; the transport cannot be used afterwards (except `close`)."""
        self._closed = True
        connection, self._connection, self._channel = self._connection, None, None
        self._generation += 1
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception as exc:  # already broken: nothing to release
                log.debug("error closing AMQP connection: %s", exc)


__all__ = [
    "AGGREGATOR",
    "DEAD_EXCHANGE",
    "DEAD_QUEUE",
    "PLANS_EXCHANGE",
    "UPLOADS_EXCHANGE",
    "UPLOADS_QUEUE",
    "UPLOADS_ROUTING_KEY",
    "AmqpTransport",
    "BrokerUnavailable",
    "PublishError",
    "TransferProgress",
    "mask_url",
    "plans_queue",
]


@dataclass(frozen=True)
class DeadLetter:
    """A refused message as the broker keeps it: its id, size, where it was refused and
    when (the broker's x-death record), and its first bytes (an envelope's clear header)."""

    message_id: str
    size: int
    queue: str
    died_at: float | None
    sender: str  # the broker-validated user id, "" if not stamped
    chunk: str  # "i/n" for a chunk of a chunked message, "" otherwise
    head: bytes

    @classmethod
    def of(cls, props: Any, body: bytes) -> DeadLetter:
        headers = props.headers or {}
        deaths = headers.get("x-death") or [{}]
        death = deaths[0] if isinstance(deaths, list) and deaths else {}
        queue = death.get("queue", "")
        when = death.get("time")
        try:
            chunk = ChunkHeader.from_headers(headers)
        except ChunkError:
            chunk = None
        return cls(
            message_id=props.message_id or "",
            size=len(body),
            queue=queue.decode() if isinstance(queue, bytes) else str(queue),
            died_at=when.timestamp() if isinstance(when, datetime) else None,
            sender=_validated_user(props),
            chunk=f"{chunk.index + 1}/{chunk.count}" if chunk is not None else "",
            head=body[:4096],
        )


def _validated_user(props: Any) -> str:
    """The AMQP user id of a delivery: RabbitMQ refuses a publish whose user_id is not the
    publisher's login, so this names the sender's broker user ("" when not stamped)."""
    user = props.user_id
    if isinstance(user, bytes):
        user = user.decode("utf-8", "replace")
    return user if isinstance(user, str) else ""
