"""RabbitMQ transport (AMQP 0-9-1 via pika's BlockingConnection): chunked, confirmed sends
and reassembling receives over the connection of `amqp_connection` and the queues of
`amqp_topology`.

Messages are persistent, publishes mandatory with publisher confirms: `send_*` returns only
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

Faults (see `amqp_connection`): an operation that finds the connection lost reconnects and
runs again. A reconnect redeclares the topology, drops half-reassembled messages and forgets
unacked delivery tags (the broker requeues every unacked delivery of a dead connection, so
they come again). The `ack()` of a delivery from an older connection generation is a no-op,
since its message is redelivered.

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
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import pika
import pika.exceptions

from fedsilo.sdk.messages import Announce, RoundPlan, Upload
from fedsilo.sdk.transport.amqp_connection import AmqpConnection, ConnectionLost
from fedsilo.sdk.transport.amqp_topology import (
    AGGREGATOR,
    DEAD_QUEUE,
    PLANS_EXCHANGE,
    UPLOADS_EXCHANGE,
    UPLOADS_QUEUE,
    UPLOADS_ROUTING_KEY,
    AmqpTopology,
    plans_queue,
)
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
from fedsilo.sdk.transport.tls import TlsFiles

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/x-fedsilo"
#: Stale chunk sets are dropped when a queue runs empty, and at least this often while a
#: flood keeps it busy.
EXPIRE_EVERY_S = 1.0


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


class AmqpTransport(Transport):
    """One connection, one channel, one thread. `role` is "aggregator" or this process's
    silo id. `url` is one broker URL or several (cluster nodes, tried in turn); the
    connection settings are `AmqpConnection`'s."""

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
        silos = list(dict.fromkeys(silo_ids))
        if role != AGGREGATOR and role not in silos:
            silos.insert(0, role)
        # A silo's agent holds its lock queue (one live agent per silo); other transports
        # of the same role (a test's sender) do not.
        self.topology = AmqpTopology(
            silos,
            declare_topology=declare_topology,
            lock=role if exclusive and role != AGGREGATOR else None,
        )
        self.connection = AmqpConnection(
            url,
            role,
            on_connect=self.topology.setup,
            on_drop=self._forget_deliveries,
            prefetch=prefetch,
            connect_timeout=connect_timeout,
            startup_timeout=startup_timeout,
            reconnect_timeout=reconnect_timeout,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            heartbeat=heartbeat,
            blocked_connection_timeout=blocked_connection_timeout,
            tls=tls,
        )
        self.role = role
        self.chunk_size = chunk_size
        self.traffic = TrafficCounter()
        self.rejected: dict[str, int] = {}
        self.refusals: deque[RefusalRecord] = deque(maxlen=REFUSALS_KEPT)
        self.redelivered_done = 0  # redeliveries of messages already handled, acknowledged
        self.progress = progress
        self.codec = codec or PlainCodec()
        self._reassemblers: dict[str, Reassembler] = {}
        # queue -> (sender, message id) -> delivery tags of the chunks held
        self._held: dict[str, dict[tuple[str, str], list[int]]] = {}
        self._expired_at: dict[str, float] = {}  # queue -> when stale chunk sets were dropped
        self._max_pending_bytes = max_pending_bytes
        self._reassembly_timeout = reassembly_timeout
        self.connection.start()

    @property
    def url(self) -> str:
        """The broker URL currently (or last) connected to."""
        return self.connection.url

    @property
    def urls(self) -> tuple[str, ...]:
        return self.connection.urls

    @property
    def reconnects(self) -> int:
        return self.connection.reconnects

    @property
    def blocked(self) -> bool:
        """Whether the broker currently blocks this connection (memory or disk alarm)."""
        return self.connection.blocked

    def keep_alive(self) -> None:
        """Service heartbeats and broker notifications without consuming anything;
        reconnects if the connection was lost. Call it between long computation steps."""
        self.connection.keep_alive()

    def _forget_deliveries(self) -> None:
        """The connection is gone: its half-reassembled messages and unacked tags with it
        (the broker requeues them)."""
        self._reassemblers.clear()
        self._held.clear()

    # -- sending -----------------------------------------------------------------------

    def _report(self, progress: TransferProgress) -> None:
        if self.progress is None:
            return
        try:
            self.progress(progress)
        except Exception:  # a broken progress display must not break the transfer
            log.exception("progress callback failed")

    def _publish(self, exchange: str, routing_key: str, data: bytes) -> None:
        self.connection.call(
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
        channel = self.connection.channel
        if channel is None:
            raise ConnectionLost("not connected")
        done = 0
        for i, (headers, body) in enumerate(pieces):
            props = pika.BasicProperties(
                delivery_mode=pika.DeliveryMode.Persistent,
                content_type=CONTENT_TYPE,
                message_id=message_id,
                headers=headers,
                user_id=self.connection.user,
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
        self.connection.on_unblocked()  # confirmed, so not blocked (whatever notifications said)

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
        if silo_id not in self.topology.silos:
            raise ValueError(
                f"silo {silo_id!r} is not served by this transport ({self.topology.silos})"
            )
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
            self.connection.channel.basic_reject(tag, requeue=False)
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
            if not self.connection.ensure(deadline):
                return None
            try:
                method, props, body = self.connection.channel.basic_get(queue, auto_ack=False)
                self.connection.healthy()
                if method is None:
                    self._expire(queue)
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return None
                    step = delay if remaining is None else min(delay, remaining)
                    self.connection.sleep(step)
                    delay = min(delay * 2, 0.1)
                    continue
                delay = 0.005
                if time.monotonic() - self._expired_at.get(queue, 0.0) >= EXPIRE_EVERY_S:
                    self._expire(queue)  # a queue kept busy must not keep stale sets alive
                delivery = self._handle(queue, kind, method.delivery_tag, props, body or b"",
                                        redelivered=bool(method.redelivered))
            except Exception as exc:
                if not self.connection.is_loss(exc):
                    raise
                self.connection.lost(exc, f"receiving from {queue}")
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
                    self.connection.channel.basic_ack(t)
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
        generation = self.connection.generation
        done = False

        def ack_tags() -> None:
            if self.connection.generation != generation or self.connection.channel is None:
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
                self.connection.channel.basic_ack(tag)

        def ack() -> None:
            nonlocal done
            if done:
                return
            if self.connection.closed:
                log.debug("ack after close skipped: the broker requeued the message")
            else:
                self.connection.call(ack_tags, "acknowledging a delivery")
            done = True

        return ack

    def _rejecter(self, tags: list[int], message_id: str) -> Callable[[str, str], None]:
        """Application-level refusal: dead-letter (never requeue) and count."""
        generation = self.connection.generation

        def reject_tags(reason: str, detail: str) -> None:
            if self.connection.generation != generation or self.connection.channel is None:
                self.rejected[reason] = self.rejected.get(reason, 0) + 1
                log.warning(
                    "rejected a message (%s): %s; its delivery belonged to an earlier "
                    "connection, so the broker will deliver it again", reason, detail,
                )
                return
            self._reject(tags, reason, detail, message_id)

        def reject(reason: str, detail: str) -> None:
            if self.connection.closed:
                reject_tags(reason, detail)
            else:
                self.connection.call(lambda: reject_tags(reason, detail), "rejecting a delivery")

        return reject

    def peek_dead_letters(self, limit: int = 50) -> list[DeadLetter]:
        """Up to `limit` messages of the dead-letter queue, oldest first, left in place
        (they are taken unacknowledged and requeued): for `fedsilo dead-letters`."""
        out: list[DeadLetter] = []

        def peek() -> None:
            out.clear()
            tags = []
            channel = self.connection.channel
            try:
                for _ in range(limit):
                    method, props, body = channel.basic_get(DEAD_QUEUE, auto_ack=False)
                    if method is None:
                        break
                    tags.append(method.delivery_tag)
                    out.append(DeadLetter.of(props, body or b""))
            finally:
                for tag in tags:
                    channel.basic_nack(tag, requeue=True)

        self.connection.call(peek, "reading the dead-letter queue")
        return out


    def close(self) -> None:
        """Close the connection; the transport cannot be used afterwards (except `close`)."""
        self.connection.close()


__all__ = [
    "AmqpTransport",
    "DeadLetter",
    "PublishError",
    "TransferProgress",
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
