"""How a message becomes bytes on the wire and back: the seam where encryption sits.

Transports call `seal` before sending and `open` on every received payload; they never know
whether the bytes are plaintext or a signed, encrypted envelope. `PlainCodec` (simulation,
trusted lab brokers) is the bare wire format of `fedsilo.sdk.protocol`; the secure codec
(`fedsilo.privacy.codec.EnvelopeCodec`) wraps that format in an envelope per recipient.

A codec raises `Rejected` for anything it refuses; the transport then dead-letters the
message, counts it under `Rejected.reason`, and goes on: malformed input never stops a
process.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from fedsilo.sdk import protocol
from fedsilo.sdk.messages import Announce, RoundPlan, Upload
from fedsilo.sdk.refusal import Refusal

Message = RoundPlan | Upload | Announce

#: The party name of the coordinator, as senders and recipients see it.
AGGREGATOR = "aggregator"


class Rejected(Refusal):
    """A received message refused before it reached the application."""


def recipient_of(message: Message) -> str:
    """Plans go to their silo; uploads and announcements to the aggregator."""
    return message.silo_id if isinstance(message, RoundPlan) else AGGREGATOR


class Codec(ABC):
    @abstractmethod
    def seal(self, message: Message) -> bytes:
        """The bytes to publish for `message` (addressed by `recipient_of`)."""

    @abstractmethod
    def open(self, data: bytes) -> Message:
        """The message in `data`, or `Rejected` saying why not."""

    def advance(self, server_round: int) -> None:  # noqa: B027 - optional
        """From now on, messages for rounds before `server_round` are replays (closed
        rounds)."""

    def state_dict(self) -> dict[str, Any]:
        """What must survive a restart (replay memory); checkpointed by the services."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional
        """Restore `state_dict()`."""


class PlainCodec(Codec):
    """No encryption, no signatures: for `fedsilo simulate` and brokers you fully trust."""

    def seal(self, message: Message) -> bytes:
        return protocol.encode(message)

    def open(self, data: bytes) -> Message:
        try:
            return protocol.decode(data)
        except protocol.ProtocolError as exc:
            raise Rejected("protocol", str(exc)) from None


__all__ = ["AGGREGATOR", "Codec", "Message", "PlainCodec", "Rejected", "recipient_of"]
