"""The aggregator's round loop: publish plans, fold in uploads, close the round.

It knows the transport and the `ServerStrategy` interface, never the algorithm. Uploads
are folded into the strategy one at a time as they arrive (streaming aggregation).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fedsilo.aggregator.schedule import Schedule
from fedsilo.sdk.messages import RoundPlan, Upload
from fedsilo.sdk.params import ModuleShape
from fedsilo.sdk.strategies.base import AggregationReport, ServerStrategy
from fedsilo.sdk.transport.base import Transport

log = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    """What the aggregator saw in one round; `final` marks the evaluation-only round."""

    round: int
    final: bool
    assignment: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    bytes_down: dict[str, int] = field(default_factory=dict)
    bytes_up: dict[str, int] = field(default_factory=dict)
    aggregation: AggregationReport | None = None
    ignored: int = 0

    @property
    def missing(self) -> list[str]:
        return sorted(set(self.assignment) - set(self.bytes_up))


class Aggregator:
    def __init__(
        self,
        strategy: ServerStrategy,
        transport: Transport,
        silo_ids: Sequence[str],
        shapes: Mapping[str, ModuleShape],
        schedule: Schedule,
    ) -> None:
        if not silo_ids:
            raise ValueError("a federation needs at least one silo")
        if len(set(silo_ids)) != len(silo_ids):
            raise ValueError(f"silo ids must be unique: {list(silo_ids)}")
        self.strategy = strategy
        self.transport = transport
        self.silo_ids = list(silo_ids)
        self.schedule = schedule
        self.strategy.initialize(shapes, self.silo_ids)
        self.history: list[RoundRecord] = []

    def publish(self, round: int) -> RoundRecord:
        """Send every silo its plan; round == schedule.rounds is the final evaluation."""
        final = round == self.schedule.rounds
        record = RoundRecord(round=round, final=final)
        parts = (
            self.strategy.configure_final(self.silo_ids) if final
            else self.strategy.configure_round(round, self.silo_ids)
        )
        for silo, part in parts.items():
            plan = RoundPlan(
                round=round,
                silo_id=silo,
                total_rounds=self.schedule.rounds,
                lr=self.schedule.lr_at(round),
                local_steps=0 if final else self.schedule.local_steps,
                assignment=part.assignment,
                params=part.params,
                final=final,
            )
            record.assignment[silo] = part.assignment
            record.bytes_down[silo] = self.transport.send_plan(plan)
        if not final:
            self.strategy.begin_round(round)
        self.history.append(record)
        return record

    def collect(self, record: RoundRecord, deadline: float | None = None) -> RoundRecord:
        """Fold in uploads until every silo answered or `deadline` (monotonic) passed.

        Uploads for another round and repeated uploads are counted and ignored: a
        redelivered message must not be aggregated twice."""
        while record.missing:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            delivery = self.transport.receive_upload(timeout=timeout)
            if delivery is None:
                break
            upload = delivery.message
            if not isinstance(upload, Upload):  # an announcement: simulation has no roster
                delivery.ack()
                continue
            if upload.round != record.round or upload.silo_id in record.bytes_up:
                record.ignored += 1
                log.warning(
                    "ignored upload from %s for round %d (collecting round %d)",
                    upload.silo_id, upload.round, record.round,
                )
                delivery.ack()
                continue
            if upload.silo_id not in record.assignment:
                record.ignored += 1
                log.warning("ignored upload from unknown silo %r", upload.silo_id)
                delivery.ack()
                continue
            self._fold(record, upload, delivery.size)
            delivery.ack()
        return record

    def _fold(self, record: RoundRecord, upload: Upload, size: int) -> None:
        if not record.final:
            self.strategy.accumulate(upload)
        record.metrics[upload.silo_id] = dict(upload.metrics)
        record.timings[upload.silo_id] = dict(upload.timings)
        record.bytes_up[upload.silo_id] = size

    def close(self, record: RoundRecord) -> RoundRecord:
        if not record.final:
            record.aggregation = self.strategy.end_round(record.round)
        return record
