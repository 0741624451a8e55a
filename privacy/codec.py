"""The secure codec: every message sealed for its recipient and signed by its sender.

Sits between the transports and the wire format (`fedsilo.sdk.transport.codec`): the
transport hands it bytes and gets back a message only if the envelope passed every check
(`fedsilo.privacy.envelope.open_sealed`), the signed sender is the party the message
claims to come from, and the message is not a replay. Everything else is `Rejected` with
the envelope's reason, dead-lettered and counted by the transport.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedsilo.privacy.envelope import EnvelopeError, ReplayGuard, open_sealed, peek_header, seal
from fedsilo.privacy.keys import Keyring, KeysError, TrustFile, TrustStore
from fedsilo.sdk import protocol
from fedsilo.sdk.messages import Announce, RoundPlan, Upload
from fedsilo.sdk.transport.codec import AGGREGATOR, Codec, Message, Rejected, recipient_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnvelopeLimits:
    max_bytes: int = 4 * 2**30
    max_age_s: float = 7 * 86400.0
    max_skew_s: float = 300.0


def _kind(message: Message) -> str:
    if isinstance(message, RoundPlan):
        return "plan"
    if isinstance(message, Upload):
        return "upload"
    return "announce"


class EnvelopeCodec(Codec):
    """One party's view: its own keyring, the peers it pins (re-read when the trust file
    changes, so keys rotate without a restart), and its replay memory.

    Announcements carry round 0 and skip the replay floor: a silo announces whenever it
    starts, and a replayed announcement changes nothing (same incarnation).

    During a rotation (see `fedsilo.privacy.keys`) it signs with the active key, opens what
    is sealed to any key it holds, and logs once per peer when that peer first seals to the
    pending key, i.e. has pinned it (`peers_on_pending`): once every peer has, activating the
    new key refuses nothing."""

    def __init__(
        self,
        federation: str,
        keyring: Keyring,
        trust: TrustFile | TrustStore,
        limits: EnvelopeLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.federation = federation
        self.keyring = keyring
        self._trust = trust
        self.limits = limits or EnvelopeLimits()
        self.clock = clock
        self.guard = ReplayGuard()
        self._on_pending: dict[str, set[str]] = {}  # pending key id -> peers sealing to it
        store = self.trust
        if store.federation != federation:
            raise KeysError(
                f"the trust file is for federation {store.federation!r}, not {federation!r}: "
                "use the trust.json that `fedsilo provision` made for this federation"
            )

    @property
    def party(self) -> str:
        return self.keyring.party

    @property
    def trust(self) -> TrustStore:
        return self._trust.current() if isinstance(self._trust, TrustFile) else self._trust

    def seal(self, message: Message) -> bytes:
        recipient = recipient_of(message)
        try:
            keys = self.trust.party(recipient)
        except KeysError as exc:
            raise KeysError(
                f"cannot send to {recipient!r}: no public key pinned for it in the trust file "
                f"({exc}); re-run `fedsilo provision` or `fedsilo trust add`"
            ) from None
        self.keyring.refresh()
        return seal(
            protocol.encode(message),
            federation=self.federation,
            type=_kind(message),
            round=0 if isinstance(message, Announce) else max(0, message.round),
            sender=self.keyring,
            recipient=keys,
            now=self.clock(),
        )

    def open(self, data: bytes) -> Message:
        self.keyring.refresh()
        try:
            header, payload = open_sealed(
                data,
                federation=self.federation,
                me=self.keyring,
                trust=self.trust,
                replay=None if _announce(data) else self.guard,
                max_bytes=self.limits.max_bytes,
                max_age_s=self.limits.max_age_s,
                max_skew_s=self.limits.max_skew_s,
                now=self.clock(),
            )
        except EnvelopeError as exc:
            raise Rejected(exc.reason, exc.detail) from None
        try:
            message = protocol.decode(payload)
        except protocol.ProtocolError as exc:
            raise Rejected("protocol", f"signed by {header.sender} but {exc}") from None
        problem = _mismatch(header.type, header.sender, header.round, message, self.party)
        if problem:
            raise Rejected("sender mismatch", problem)
        if header.type != "announce":
            try:
                self.guard.remember(header)
            except EnvelopeError as exc:
                raise Rejected(exc.reason, exc.detail) from None
        self._note_pending(header.sender, header.recipient_key)
        return message

    def peers_on_pending(self) -> frozenset[str]:
        """The peers seen (since this codec started) sealing a message to this party's
        pending key: they have pinned it, so they verify what it will sign."""
        pending = self.keyring.pending
        return frozenset(self._on_pending.get(pending.key_id, ()) if pending else ())

    def _note_pending(self, sender: str, key_id: str) -> None:
        pending = self.keyring.pending
        if pending is None or key_id != pending.key_id:
            return
        seen = self._on_pending.setdefault(key_id, set())
        if sender not in seen:
            seen.add(sender)
            log.info(
                "%s sealed a message to %s's pending key %s: it has pinned it (%d peer(s) so "
                "far: %s); run `fedsilo keys activate` once every peer has",
                sender, self.party, key_id, len(seen), ", ".join(sorted(seen)),
            )

    def advance(self, server_round: int) -> None:
        """Messages of rounds before `round` are replays from now on."""
        self.guard.set_floor(max(0, server_round))

    def state_dict(self) -> dict[str, Any]:
        return {"replay": self.guard.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "replay" in state:
            self.guard.load_state_dict(state["replay"])


def _announce(data: bytes) -> bool:
    """Whether `data` claims to be an announcement (only to pick the replay rule; the
    claim is signed, so a forged type fails the signature check that follows)."""
    try:
        return peek_header(data).type == "announce"
    except EnvelopeError:
        return False


def _mismatch(kind: str, sender: str, server_round: int, message: Message, me: str) -> str | None:
    """The signed envelope and the message inside must tell the same story: a silo may
    only speak for itself, and only the aggregator sends plans."""
    if kind != _kind(message):
        return f"envelope says {kind!r} but holds a {_kind(message)}"
    if isinstance(message, RoundPlan):
        if sender != AGGREGATOR:
            return f"a plan signed by {sender!r}; only the aggregator sends plans"
        if message.silo_id != me:
            return f"a plan for {message.silo_id!r} sealed to {me!r}"
    elif message.silo_id != sender:
        return f"{sender!r} signed a message claiming to come from {message.silo_id!r}"
    if not isinstance(message, Announce) and max(0, message.round) != server_round:
        return f"envelope round {server_round} but message round {message.round}"
    return None


__all__ = ["EnvelopeCodec", "EnvelopeLimits"]
