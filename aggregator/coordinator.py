"""The aggregator's round engine: publish plans, fold in uploads, close the round.

It knows the transport and the `ServerStrategy` interface, never the algorithm. Uploads
are checked as they arrive and held; at the close of the round each silo's update is
clipped to the round's norm bound (`sdk.aggregation.clipping`: a multiple of the median,
which needs all of them) and folded into the strategy in silo order. The same engine runs
inside `fedsilo simulate` and inside the long-running aggregator service, which adds the
roster, deadlines and checkpoints around it (held uploads are part of the checkpoint).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from fedsilo.aggregator.schedule import Schedule
from fedsilo.privacy.validation import InvalidTensors, UploadLimits, check_tensors
from fedsilo.sdk.aggregation.clipping import ClipSettings, clip_update, update_norm
from fedsilo.sdk.checkpoint import namespaced_groups, take_groups
from fedsilo.sdk.logs import log_event
from fedsilo.sdk.messages import RoundPlan, Upload
from fedsilo.sdk.params import ModuleShape, TensorDict
from fedsilo.sdk.strategies.base import (
    AggregationReport,
    ServerStrategy,
    SiloPlan,
    UploadSchema,
)
from fedsilo.sdk.transport.base import Transport

log = logging.getLogger(__name__)


class Verdict(StrEnum):
    """What the engine did with an upload."""

    FOLDED = "folded"  # accepted into the round (aggregated when it closes)
    DUPLICATE = "duplicate"  # this silo's upload for this round was already folded
    LATE = "late"  # for a round that is not the open one
    UNKNOWN = "unknown"  # from a silo that is not part of this round
    INVALID = "invalid"  # not the silo's plan's tensors, NaN/Inf, too large, bad count


@dataclass(frozen=True)
class Offer:
    """What `Aggregator.offer` did with an upload, and why when it refused it as invalid."""

    verdict: Verdict
    problem: InvalidTensors | None = None


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
    ignored: dict[str, int] = field(default_factory=dict)
    clipped: dict[str, float] = field(default_factory=dict)  # silo -> scale of its update
    # Unix times the plans went out and the round closed: its wall time, for reports.
    opened_at: float | None = None
    closed_at: float | None = None

    @property
    def expected(self) -> list[str]:
        return list(self.assignment)

    @property
    def missing(self) -> list[str]:
        return sorted(set(self.assignment) - set(self.bytes_up))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundRecord:
        data = dict(data)
        report = data.pop("aggregation", None)
        return cls(**data, aggregation=AggregationReport(**report) if report else None)


class Aggregator:
    def __init__(
        self,
        strategy: ServerStrategy,
        transport: Transport,
        schedule: Schedule,
        setup: Mapping[str, Any] | None = None,
        limits: UploadLimits | None = None,
        clip: ClipSettings | None = None,
    ) -> None:
        self.strategy = strategy
        self.limits = limits or UploadLimits()
        self.clip = clip or ClipSettings()
        self.setup = dict(setup or {})  # federation settings, sent in every plan
        self.transport = transport
        self.schedule = schedule
        self.silo_ids: list[str] = []
        self.history: list[RoundRecord] = []
        # What each silo must upload for the plans last sent; rebuilt by send_plans (so a
        # resumed aggregator has it again), not checkpointed.
        self._expected: dict[tuple[int, str], UploadSchema] = {}
        self._sent: dict[str, TensorDict] = {}  # the params each plan carried (same rebuild)
        # Accepted uploads of the open round, folded at its close; checkpointed.
        self.held: dict[str, Upload] = {}

    def start(self, shapes: Mapping[str, ModuleShape], silo_ids: Sequence[str]) -> None:
        """Create the global state for the first participants."""
        self.silo_ids = _unique(silo_ids)
        self.strategy.initialize(shapes, self.silo_ids)

    def publish(self, server_round: int, silo_ids: Sequence[str] | None = None) -> RoundRecord:
        """Send each participant its plan; server_round == schedule.rounds is the final
        evaluation. `silo_ids` changes the participants (a late joiner enters here)."""
        if silo_ids is not None:
            self.silo_ids = _unique(silo_ids)
        final = server_round == self.schedule.rounds
        record = RoundRecord(round=server_round, final=final, opened_at=time.time())
        parts = (
            self.strategy.configure_final(self.silo_ids) if final
            else self.strategy.configure_round(server_round, self.silo_ids)
        )
        for silo, part in parts.items():
            record.assignment[silo] = part.assignment
        if not final:
            self.strategy.begin_round(server_round)
        self.held = {}
        self.history.append(record)
        self.send_plans(record, parts)
        return record

    def send_plans(
        self, record: RoundRecord, parts: Mapping[str, SiloPlan] | None = None
    ) -> None:
        """(Re)send the plans of `record`; a resumed aggregator calls this again, and silos
        ignore a plan for a round they already handled."""
        if parts is None:
            parts = self._parts(record)
        self._expect(record, parts)
        for silo, part in parts.items():
            plan = RoundPlan(
                round=record.round,
                silo_id=silo,
                total_rounds=self.schedule.rounds,
                lr=self.schedule.lr_at(record.round),
                local_steps=0 if record.final else self.schedule.local_steps,
                assignment=part.assignment,
                params=part.params,
                final=record.final,
                setup=self.setup,
            )
            record.bytes_down[silo] = self.transport.send_plan(plan)

    def offer(self, record: RoundRecord, upload: Upload, size: int) -> Offer:
        """Fold `upload` into the open round if it belongs there. Idempotent: a redelivered
        or repeated upload changes nothing (it is reported, not folded): this is the one
        place a second upload of a silo for a round is refused, so strategies never see it."""
        if upload.round != record.round:
            verdict = Verdict.LATE
        elif upload.silo_id not in record.assignment:
            verdict = Verdict.UNKNOWN
        elif upload.silo_id in record.bytes_up:
            verdict = Verdict.DUPLICATE
        elif (problem := self.check(record, upload)) is not None:
            record.ignored[problem.reason] = record.ignored.get(problem.reason, 0) + 1
            log_event(
                log, "upload_invalid", logging.ERROR, silo=upload.silo_id, round=upload.round,
                reason=problem.reason, detail=problem.detail,
            )
            return Offer(Verdict.INVALID, problem)
        else:
            if not record.final:
                self.held[upload.silo_id] = upload
            record.metrics[upload.silo_id] = dict(upload.metrics)
            record.timings[upload.silo_id] = dict(upload.timings)
            record.bytes_up[upload.silo_id] = size
            return Offer(Verdict.FOLDED)
        record.ignored[verdict.value] = record.ignored.get(verdict.value, 0) + 1
        log_event(
            log, f"upload_{verdict.value}", logging.WARNING, silo=upload.silo_id,
            upload_round=upload.round, open_round=record.round,
        )
        return Offer(verdict)

    def check(self, record: RoundRecord, upload: Upload) -> InvalidTensors | None:
        """Why `upload` must not be folded in (a sample count out of bounds, wrong tensors
        for its plan, NaN/Inf, a norm above its bound), or None. Nothing reaches the
        strategy before this passed."""
        schema = self._expected.get((record.round, upload.silo_id))
        if schema is None:  # plans not (re)sent by this engine: derive them again
            self._expect(record, self._parts(record))
            schema = self._expected[(record.round, upload.silo_id)]
        who = f"upload of {upload.silo_id} for round {upload.round}"
        try:
            self.limits.check_samples(upload.n_samples, who)
            self.limits.check_report(upload.metrics, upload.timings, who)
            check_tensors(upload.params, schema.params, what=f"{who}: params",
                          max_norm=self.limits.max_param_norm)
            check_tensors(upload.embeddings, schema.embeddings, what=f"{who}: embeddings",
                          max_norm=self.limits.max_embedding_norm)
        except InvalidTensors as exc:
            return exc
        return None

    def _parts(self, record: RoundRecord) -> Mapping[str, SiloPlan]:
        return (
            self.strategy.configure_final(record.expected) if record.final
            else self.strategy.configure_round(record.round, record.expected)
        )

    def _expect(self, record: RoundRecord, parts: Mapping[str, SiloPlan]) -> None:
        self._expected = {
            (record.round, silo): self.strategy.upload_schema(silo, part, record.final)
            for silo, part in parts.items()
        }
        self._sent = {silo: part.params for silo, part in parts.items()}

    def collect(self, record: RoundRecord, deadline: float | None = None) -> RoundRecord:
        """Fold in uploads until every silo answered or `deadline` (monotonic) passed,
        acknowledging each at once (for in-process use: nothing to checkpoint)."""
        while record.missing:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            delivery = self.transport.receive_upload(timeout=timeout)
            if delivery is None:
                break
            problem = None
            if isinstance(delivery.message, Upload):
                problem = self.offer(record, delivery.message, delivery.size).problem
            if problem is not None:
                delivery.reject(problem.reason, problem.detail)
            else:
                delivery.ack()
        return record

    def close(self, record: RoundRecord) -> RoundRecord:
        """Clip each held update to the round's bound, fold them in silo order, aggregate
        (experts nobody trained keep their values)."""
        if record.final:
            record.closed_at = time.time()
            return record
        if self.held and not self._sent:  # resumed: the plans were not (re)sent by us
            self._expect(record, self._parts(record))
        norms = {silo: update_norm(u.params, self._sent.get(silo, {}))
                 for silo, u in self.held.items()}
        bound = self.clip.bound(list(norms.values()))
        for silo in sorted(self.held):
            upload = self.held[silo]
            params, scale = clip_update(upload.params, self._sent.get(silo, {}), bound)
            if scale < 1.0:
                record.clipped[silo] = scale
                log_event(log, "upload_clipped", logging.WARNING, silo=silo,
                          round=record.round, norm=norms[silo], bound=bound)
            self.strategy.accumulate(Upload(
                upload.round, silo, params, upload.embeddings, upload.n_samples,
                upload.metrics, upload.timings,
            ))
        self.held = {}
        record.aggregation = self.strategy.end_round(record.round)
        if norms:
            median = statistics.median(norms.values())  # the one the bound is made of
            record.aggregation.details["update_norm_max_ratio"] = (
                max(norms.values()) / median if median > 0 else 0.0)
            record.aggregation.details["clipped"] = float(len(record.clipped))
        record.closed_at = time.time()
        return record

    def state_dict(self) -> tuple[TensorDict, dict[str, Any]]:
        tensors, strategy_meta = self.strategy.state_dict()
        tensors = dict(tensors)
        held_params, params_meta = namespaced_groups(
            "held/params", {s: u.params for s, u in self.held.items()})
        held_emb, emb_meta = namespaced_groups(
            "held/embeddings", {s: u.embeddings for s, u in self.held.items()})
        tensors.update(held_params)
        tensors.update(held_emb)
        return tensors, {
            "strategy": strategy_meta,
            "silo_ids": self.silo_ids,
            "history": [r.to_json() for r in self.history],
            "held": {"params": params_meta, "embeddings": emb_meta,
                     "uploads": {s: {"round": u.round, "n_samples": u.n_samples,
                                     "metrics": u.metrics, "timings": u.timings}
                                 for s, u in self.held.items()}},
        }

    def load_state_dict(self, tensors: TensorDict, meta: Mapping[str, Any]) -> None:
        held = meta.get("held") or {"params": [], "embeddings": [], "uploads": {}}
        own = {k: v for k, v in tensors.items() if not k.startswith("held/")}
        self.strategy.load_state_dict(own, meta["strategy"])
        self.silo_ids = list(meta["silo_ids"])
        self.history = [RoundRecord.from_json(r) for r in meta["history"]]
        params = take_groups("held/params", tensors, held["params"])
        embeddings = take_groups("held/embeddings", tensors, held["embeddings"])
        self.held = {
            silo: Upload(info["round"], silo, params[silo], embeddings[silo],
                         info["n_samples"], info["metrics"], info["timings"])
            for silo, info in held["uploads"].items()
        }


def _unique(silo_ids: Sequence[str]) -> list[str]:
    if not silo_ids:
        raise ValueError("a federation needs at least one silo")
    if len(set(silo_ids)) != len(silo_ids):
        raise ValueError(f"silo ids must be unique: {list(silo_ids)}")
    return list(silo_ids)
