"""The transport interface: loops talk to this, never to a broker library.

Implementations: `MemoryTransport` (one process, for `fedsilo simulate` and tests) and the
RabbitMQ transport (deployment issue). Both move the same encoded bytes, so byte counts
measured in simulation are the bytes a real deployment sends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from fedsilo.sdk.messages import Announce, RoundPlan, Upload
from fedsilo.sdk.transport.codec import Codec, PlainCodec


@dataclass
class TrafficCounter:
    """Encoded bytes per silo and direction ("down" = plans, "up" = uploads)."""

    down: dict[str, int] = field(default_factory=dict)
    up: dict[str, int] = field(default_factory=dict)

    def add(self, direction: str, silo_id: str, n: int) -> None:
        table = self.down if direction == "down" else self.up
        table[silo_id] = table.get(silo_id, 0) + n


M = TypeVar("M")

#: What silos send to the aggregator: round results and join announcements.
Inbound = Upload | Announce


def _nothing() -> None:
    return None


def _drop(reason: str, detail: str) -> None:
    return None


@dataclass
class Delivery(Generic[M]):
    """A received message, its size on the wire, and how to acknowledge it.

    Consumers call `ack()` only once the message has been applied (and, where it
    matters, checkpointed); a transport may redeliver anything not acknowledged.
    `reject(reason, detail)` refuses a message the application found invalid (a tensor
    of the wrong shape, a NaN): it is dead-lettered, counted under `reason`, and never
    redelivered."""

    message: M
    size: int
    ack: Callable[[], None] = _nothing
    reject: Callable[[str, str], None] = _drop


@dataclass(frozen=True)
class RefusalRecord:
    """One refused message, for the operator: when, why, and its message id (the AMQP
    message id of what lies in the dead-letter queue)."""

    at: float  # unix time
    reason: str
    detail: str
    message_id: str = ""


#: Refusals a transport remembers (the newest); the counts in `rejected` are complete.
REFUSALS_KEPT = 200


class Transport(ABC):
    traffic: TrafficCounter
    #: Messages refused (by the codec or the application), by reason.
    rejected: dict[str, int]
    #: The newest refusals, oldest first (at most REFUSALS_KEPT).
    refusals: deque[RefusalRecord]
    #: Seals what is sent and opens what is received; the services checkpoint its state.
    #: The default holds no state, so one instance serves every transport that sets none.
    codec: Codec = PlainCodec()

    @property
    def reconnects(self) -> int:
        """Successful reconnections after a lost connection (none without a connection)."""
        return 0

    def keep_alive(self) -> None:  # noqa: B027 - optional hook
        """Answer heartbeats during long local work; only a connection needs it."""

    @abstractmethod
    def send_plan(self, plan: RoundPlan) -> int:
        """Deliver a plan to `plan.silo_id`; returns the bytes sent."""

    @abstractmethod
    def send_upload(self, upload: Upload) -> int:
        """Deliver an upload to the aggregator; returns the bytes sent."""

    @abstractmethod
    def send_announce(self, announce: Announce) -> int:
        """Tell the aggregator this silo is (back) online; same queue as uploads."""

    @abstractmethod
    def receive_plan(
        self, silo_id: str, timeout: float | None = None
    ) -> Delivery[RoundPlan] | None:
        """Next plan for `silo_id`, or None when none arrived within `timeout` seconds."""

    @abstractmethod
    def receive_upload(self, timeout: float | None = None) -> Delivery[Inbound] | None:
        """Next upload or announcement for the aggregator, None when none arrived in time.
        Both share one queue so they are seen in the order they were sent."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the in-memory transport has none."""
