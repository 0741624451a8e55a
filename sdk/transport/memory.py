"""In-process transport: encoded bytes in FIFO queues, nothing shared by reference."""

from __future__ import annotations

import logging
import time
from collections import deque

from fedsilo.sdk.messages import Announce, RoundPlan, Upload
from fedsilo.sdk.transport.base import (
    REFUSALS_KEPT,
    Delivery,
    Inbound,
    RefusalRecord,
    TrafficCounter,
    Transport,
)
from fedsilo.sdk.transport.codec import Codec, PlainCodec, Rejected

log = logging.getLogger(__name__)


class MemoryTransport(Transport):
    """Messages cross as bytes, so a silo never holds the aggregator's tensors (and vice
    versa) and the byte counts are those of the real wire format. Single-threaded: a
    receive with nothing queued returns None at once rather than waiting.

    One codec seals and opens everything, so a secure codec here needs one keyring that
    every party trusts (tests); deployments give each process its own."""

    def __init__(self, codec: Codec | None = None) -> None:
        self.codec = codec or PlainCodec()
        self.traffic = TrafficCounter()
        self.rejected: dict[str, int] = {}
        self.refusals: deque[RefusalRecord] = deque(maxlen=REFUSALS_KEPT)
        self.dead: list[tuple[str, bytes]] = []  # (reason, bytes), like fedsilo.dead
        self._plans: dict[str, deque[bytes]] = {}
        self._uploads: deque[bytes] = deque()

    def send_plan(self, plan: RoundPlan) -> int:
        return self.deliver_plan(plan.silo_id, self.codec.seal(plan))

    def send_upload(self, upload: Upload) -> int:
        return self.deliver_upload(upload.silo_id, self.codec.seal(upload))

    def send_announce(self, announce: Announce) -> int:
        return self.deliver_upload(announce.silo_id, self.codec.seal(announce))

    def deliver_plan(self, silo_id: str, data: bytes) -> int:
        """Queue raw bytes for `silo_id` (what a broker would accept from anyone allowed)."""
        self._plans.setdefault(silo_id, deque()).append(data)
        self.traffic.add("down", silo_id, len(data))
        return len(data)

    def deliver_upload(self, silo_id: str, data: bytes) -> int:
        self._uploads.append(data)
        self.traffic.add("up", silo_id, len(data))
        return len(data)

    def _reject(self, data: bytes, reason: str, detail: str) -> None:
        log.warning("rejecting a message (%s): %s", reason, detail)
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.refusals.append(RefusalRecord(time.time(), reason, detail))
        self.dead.append((reason, data))

    def _take(self, queue: deque[bytes], kind: type | tuple[type, ...]) -> Delivery | None:
        while queue:
            data = queue.popleft()
            try:
                message = self.codec.open(data)
                if not isinstance(message, kind):
                    raise Rejected("protocol", f"unexpected {type(message).__name__} here")
            except Rejected as exc:
                self._reject(data, exc.reason, exc.detail)
                continue
            return Delivery(
                message, len(data), reject=lambda r, d, data=data: self._reject(data, r, d)
            )
        return None

    def receive_plan(
        self, silo_id: str, timeout: float | None = None
    ) -> Delivery[RoundPlan] | None:
        return self._take(self._plans.get(silo_id, deque()), RoundPlan)

    def receive_upload(self, timeout: float | None = None) -> Delivery[Inbound] | None:
        return self._take(self._uploads, (Upload, Announce))
