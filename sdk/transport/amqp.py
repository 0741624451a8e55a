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

Thread-safety: pika's BlockingConnection is not thread-safe. Use one AmqpTransport per
thread, and call `Delivery.ack()` on the thread that received it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
import pika.exceptions

from fedsilo.sdk import protocol
from fedsilo.sdk.messages import Announce, RoundPlan, Upload
from fedsilo.sdk.transport.base import Delivery, Inbound, TrafficCounter, Transport
from fedsilo.sdk.transport.chunking import Chunk, ChunkError, ChunkHeader, Reassembler, split

log = logging.getLogger(__name__)

PLANS_EXCHANGE = "fedsilo.plans"
UPLOADS_EXCHANGE = "fedsilo.uploads"
DEAD_EXCHANGE = "fedsilo.dead"
DEAD_QUEUE = "fedsilo.dead"
UPLOADS_QUEUE = "aggregator.uploads"
UPLOADS_ROUTING_KEY = "aggregator"
AGGREGATOR = "aggregator"
CONTENT_TYPE = "application/x-fedsilo"


def plans_queue(silo_id: str) -> str:
    return f"silo.{silo_id}.plans"


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


class PublishError(RuntimeError):
    """The broker did not accept a message (no queue bound, or a negative confirm)."""


class AmqpTransport(Transport):
    """One connection, one channel. `role` is "aggregator" or this process's silo id."""

    def __init__(
        self,
        url: str,
        role: str,
        silo_ids: Sequence[str] = (),
        chunk_size: int = 4 * 2**20,
        prefetch: int = 8,
        connect_timeout: float = 5.0,
        max_pending_bytes: int = 2**31,
        reassembly_timeout: float = 300.0,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.url = url
        self.role = role
        self.chunk_size = chunk_size
        self.prefetch = prefetch
        self.traffic = TrafficCounter()
        self.rejected: dict[str, int] = {}
        silos = list(dict.fromkeys(silo_ids))
        if role != AGGREGATOR and role not in silos:
            silos.insert(0, role)
        self._silos = silos
        self._reassemblers: dict[str, Reassembler] = {}
        self._held: dict[str, dict[str, list[int]]] = {}  # queue -> message id -> tags
        self._max_pending_bytes = max_pending_bytes
        self._reassembly_timeout = reassembly_timeout
        self._quorum = True

        params = pika.URLParameters(url)
        params.connection_attempts = 1
        params.retry_delay = 0
        params.socket_timeout = connect_timeout
        params.stack_timeout = connect_timeout
        params.blocked_connection_timeout = max(connect_timeout, 60.0)
        try:
            self._connection = pika.BlockingConnection(params)
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise BrokerUnavailable(
                f"cannot connect to the RabbitMQ broker at {mask_url(url)} "
                f"({type(exc).__name__}: {exc or 'no detail'}). Start one "
                "(`rabbitmq-server -detached`), or check the URL, the credentials and that "
                "the vhost exists and the user has permissions on it."
            ) from None
        try:
            self._open_channel()
            self._declare_topology()
        except BaseException:
            self.close()
            raise

    # -- setup -------------------------------------------------------------------------

    def _open_channel(self) -> None:
        self._channel = self._connection.channel()
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

    def _publish(self, exchange: str, routing_key: str, data: bytes) -> None:
        message_id = uuid.uuid4().hex
        if len(data) <= self.chunk_size:
            pieces: list[tuple[dict[str, Any] | None, bytes]] = [(None, data)]
        else:
            pieces = [
                (c.header.to_headers(), c.data) for c in split(data, message_id, self.chunk_size)
            ]
        for headers, body in pieces:
            props = pika.BasicProperties(
                delivery_mode=pika.DeliveryMode.Persistent,
                content_type=CONTENT_TYPE,
                message_id=message_id,
                headers=headers,
            )
            try:
                self._channel.basic_publish(exchange, routing_key, body, props, mandatory=True)
            except pika.exceptions.UnroutableError:
                raise PublishError(
                    f"no queue bound to {exchange!r} for routing key {routing_key!r}"
                ) from None
            except pika.exceptions.NackError:
                raise PublishError(f"broker nacked a message to {exchange!r}") from None

    def send_plan(self, plan: RoundPlan) -> int:
        data = protocol.encode(plan)
        self._publish(PLANS_EXCHANGE, plan.silo_id, data)
        self.traffic.add("down", plan.silo_id, len(data))
        return len(data)

    def send_upload(self, upload: Upload) -> int:
        data = protocol.encode(upload)
        self._publish(UPLOADS_EXCHANGE, UPLOADS_ROUTING_KEY, data)
        self.traffic.add("up", upload.silo_id, len(data))
        return len(data)

    def send_announce(self, announce: Announce) -> int:
        data = protocol.encode(announce)
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

    def _reject(self, tags: Sequence[int], reason: str, detail: str) -> None:
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

    def _expire(self, queue: str) -> None:
        for mid in self._reassembler(queue).expire():
            tags = self._held[queue].pop(mid, [])
            self._reject(tags, "chunk timeout", f"message {mid} incomplete on {queue}")

    def _receive(
        self, queue: str, kind: type | tuple[type, ...], timeout: float | None
    ) -> Delivery | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while True:
            method, props, body = self._channel.basic_get(queue, auto_ack=False)
            if method is None:
                self._expire(queue)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                step = delay if remaining is None else min(delay, remaining)
                self._connection.sleep(step)
                delay = min(delay * 2, 0.1)
                continue
            delay = 0.005
            delivery = self._handle(queue, kind, method.delivery_tag, props, body or b"")
            if delivery is not None:
                return delivery
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def _handle(
        self, queue: str, kind: type | tuple[type, ...], tag: int, props: Any, body: bytes
    ) -> Delivery | None:
        reassembler = self._reassembler(queue)
        held = self._held[queue]
        try:
            header = ChunkHeader.from_headers(getattr(props, "headers", None))
        except ChunkError as exc:
            self._reject([tag], f"chunk: {exc.reason}", str(exc))
            return None
        if header is None:
            tags, data = [tag], body
        else:
            mid = header.message_id
            try:
                data = reassembler.add(Chunk(header, body))
            except ChunkError as exc:
                tags = [tag]
                if exc.dropped:
                    tags = held.pop(mid, []) + tags
                self._reject(tags, f"chunk: {exc.reason}", str(exc))
                return None
            held.setdefault(mid, []).append(tag)
            if data is None:
                return None
            tags = held.pop(mid)
        try:
            message = protocol.decode(data)
            if not isinstance(message, kind):
                raise protocol.ProtocolError(
                    f"unexpected {type(message).__name__} on {queue}"
                )
        except protocol.ProtocolError as exc:
            self._reject(tags, "protocol", str(exc))
            return None
        return Delivery(message, len(data), self._acker(tags))

    def _acker(self, tags: list[int]) -> Callable[[], None]:
        channel = self._channel
        done = False

        def ack() -> None:
            nonlocal done
            if done:
                return
            for tag in tags:
                channel.basic_ack(tag)
            done = True

        return ack

    def close(self) -> None:
        connection = getattr(self, "_connection", None)
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except pika.exceptions.AMQPError as exc:  # already broken: nothing to release
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
    "mask_url",
    "plans_queue",
]
