"""In-process transport: encoded bytes in FIFO queues, nothing shared by reference."""

from __future__ import annotations

from collections import deque

from fedsilo.sdk import protocol
from fedsilo.sdk.messages import Announce, RoundPlan, Upload
from fedsilo.sdk.transport.base import Delivery, Inbound, TrafficCounter, Transport


class MemoryTransport(Transport):
    """Messages cross as bytes, so a silo never holds the aggregator's tensors (and vice
    versa) and the byte counts are those of the real wire format. Single-threaded: a
    receive with nothing queued returns None at once rather than waiting."""

    def __init__(self) -> None:
        self.traffic = TrafficCounter()
        self._plans: dict[str, deque[bytes]] = {}
        self._uploads: deque[bytes] = deque()

    def send_plan(self, plan: RoundPlan) -> int:
        data = protocol.encode(plan)
        self._plans.setdefault(plan.silo_id, deque()).append(data)
        self.traffic.add("down", plan.silo_id, len(data))
        return len(data)

    def send_upload(self, upload: Upload) -> int:
        data = protocol.encode(upload)
        self._uploads.append(data)
        self.traffic.add("up", upload.silo_id, len(data))
        return len(data)

    def send_announce(self, announce: Announce) -> int:
        data = protocol.encode(announce)
        self._uploads.append(data)
        self.traffic.add("up", announce.silo_id, len(data))
        return len(data)

    def receive_plan(
        self, silo_id: str, timeout: float | None = None
    ) -> Delivery[RoundPlan] | None:
        queue = self._plans.get(silo_id)
        if not queue:
            return None
        data = queue.popleft()
        message = protocol.decode(data)
        if not isinstance(message, RoundPlan):
            raise protocol.ProtocolError(f"expected a plan on silo {silo_id}'s queue")
        return Delivery(message, len(data))

    def receive_upload(self, timeout: float | None = None) -> Delivery[Inbound] | None:
        if not self._uploads:
            return None
        data = self._uploads.popleft()
        message = protocol.decode(data)
        if not isinstance(message, Upload | Announce):
            raise protocol.ProtocolError("expected an upload on the aggregator's queue")
        return Delivery(message, len(data))
