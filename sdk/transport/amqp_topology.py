"""The federation's exchanges and queues on the broker: their names and their declaration.

Declared idempotently by every transport in the federation's vhost (unless the broker's
definitions provide them, `declare_topology=False`):

    fedsilo.plans   (direct)  --<silo id>-->  silo.<id>.plans      (one per silo)
    fedsilo.uploads (direct)  --aggregator--> aggregator.uploads
    fedsilo.dead    (fanout)  ------------->  fedsilo.dead         (audit; both work
                                                                     queues dead-letter here)

Queues are durable quorum queues (classic durable where the broker refuses quorum). The
provisioning kit (`fedsilo.provision`) writes the same topology as broker
definitions, from these names.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pika.exceptions

if TYPE_CHECKING:
    from fedsilo.sdk.transport.amqp_connection import AmqpConnection

#: The AMQP transport logs under one name, whichever of its modules logs.
log = logging.getLogger("fedsilo.sdk.transport.amqp")

PLANS_EXCHANGE = "fedsilo.plans"
UPLOADS_EXCHANGE = "fedsilo.uploads"
DEAD_EXCHANGE = "fedsilo.dead"
DEAD_QUEUE = "fedsilo.dead"
UPLOADS_QUEUE = "aggregator.uploads"
UPLOADS_ROUTING_KEY = "aggregator"
AGGREGATOR = "aggregator"


def plans_queue(silo_id: str) -> str:
    return f"silo.{silo_id}.plans"


def lock_queue(silo_id: str) -> str:
    """An exclusive queue an agent holds while connected: the broker refuses a second one
    and drops it when the holder's connection dies (however it dies)."""
    return f"silo.{silo_id}.lock"


class AmqpTopology:
    """What one transport declares on every (re)connection: the lock queue of the silo it
    runs as (`lock`, None for none), then, if `declare_topology`, the exchanges and queues
    for `silos`. `quorum` turns False once the broker refused a quorum queue."""

    def __init__(
        self, silos: Sequence[str], *, declare_topology: bool = True, lock: str | None = None
    ) -> None:
        self.silos = list(silos)
        self.declare_topology = declare_topology  # False: the broker's definitions provide it
        self.lock = lock
        self.quorum = True

    def setup(self, connection: AmqpConnection) -> None:
        """Run on the fresh channel of every new connection."""
        if self.lock is not None:
            # 405 RESOURCE_LOCKED while another connection holds it. After an outage of our
            # own that is our old connection the broker has not dropped yet: retried.
            connection.channel.queue_declare(lock_queue(self.lock), exclusive=True,
                                             auto_delete=True)
        if self.declare_topology:
            self.declare(connection)

    def _declare_queue(self, connection: AmqpConnection, name: str, dead_letter: bool) -> None:
        args: dict[str, Any] = {"x-dead-letter-exchange": DEAD_EXCHANGE} if dead_letter else {}
        if self.quorum:
            try:
                connection.channel.queue_declare(
                    name, durable=True, arguments={"x-queue-type": "quorum", **args}
                )
                return
            except pika.exceptions.ChannelClosedByBroker as exc:
                if connection.is_loss(exc):
                    raise
                log.warning(
                    "broker refused quorum queue %s (%s); using classic durable queues",
                    name,
                    exc,
                )
                self.quorum = False
                connection.open_channel()
        connection.channel.queue_declare(name, durable=True, arguments=args or None)

    def declare(self, connection: AmqpConnection) -> None:
        """The exchanges, queues and bindings, on `connection.channel`."""
        ch = connection.channel
        ch.exchange_declare(DEAD_EXCHANGE, exchange_type="fanout", durable=True)
        ch.exchange_declare(PLANS_EXCHANGE, exchange_type="direct", durable=True)
        ch.exchange_declare(UPLOADS_EXCHANGE, exchange_type="direct", durable=True)
        self._declare_queue(connection, DEAD_QUEUE, dead_letter=False)
        connection.channel.queue_bind(DEAD_QUEUE, DEAD_EXCHANGE)
        self._declare_queue(connection, UPLOADS_QUEUE, dead_letter=True)
        connection.channel.queue_bind(UPLOADS_QUEUE, UPLOADS_EXCHANGE,
                                      routing_key=UPLOADS_ROUTING_KEY)
        for silo_id in self.silos:
            self._declare_queue(connection, plans_queue(silo_id), dead_letter=True)
            connection.channel.queue_bind(plans_queue(silo_id), PLANS_EXCHANGE,
                                          routing_key=silo_id)


__all__ = [
    "AGGREGATOR",
    "DEAD_EXCHANGE",
    "DEAD_QUEUE",
    "PLANS_EXCHANGE",
    "UPLOADS_EXCHANGE",
    "UPLOADS_QUEUE",
    "UPLOADS_ROUTING_KEY",
    "AmqpTopology",
    "lock_queue",
    "plans_queue",
]
