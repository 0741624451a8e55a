"""`fedsilo aggregator run`: the coordinator as a long-running, restartable process.

Around the round engine (`Aggregator`) it adds what a real federation needs: the roster
(silos announce themselves; round 0 starts once `min_silos` joined; later joiners enter at
the next round), a deadline and quorum per round, checkpoints and graceful stops.

Crash safety rests on one rule: a delivery is acknowledged only after the state it
produced is checkpointed (temp file, fsync, rename). Whatever was folded but not yet
checkpointed is still unacknowledged, so after a crash the broker redelivers it and the
resumed process folds it again. Plans are re-sent on resume when the crash came while
publishing; silos ignore a plan for a round they already handled, and the engine ignores
a repeated upload. Sums are kept in float64, so the order uploads arrive in does not
change the result: a killed-and-resumed run ends with the parameters of an unbroken one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from safetensors.torch import save as serialize

from fedsilo.aggregator.config import FederationConfig
from fedsilo.aggregator.coordinator import Aggregator, RoundRecord, Verdict
from fedsilo.aggregator.history import ASSIGNMENTS, METRICS, RUN_FORMAT, fedsilo_version
from fedsilo.aggregator.report import latest_metrics, summarise
from fedsilo.sdk.adapters.model import target_shapes
from fedsilo.sdk.checkpoint import load_checkpoint, save_checkpoint
from fedsilo.sdk.evaluation.metrics import METRIC_NAMES, metrics_label, mtal
from fedsilo.sdk.faults import FaultPlan
from fedsilo.sdk.files import FolderLock, write_atomic
from fedsilo.sdk.logs import log_event
from fedsilo.sdk.messages import Announce, Upload
from fedsilo.sdk.params import ModuleShape
from fedsilo.sdk.strategies import get_strategy
from fedsilo.sdk.strategies.config import flat_knobs
from fedsilo.sdk.transport.base import Delivery, Transport
from fedsilo.sdk.transport.codec import Codec, PlainCodec
from fedsilo.sdk.transport.settings import owner_only

log = logging.getLogger(__name__)

CHECKPOINT = "aggregator.ckpt"
STATUS = "status.json"
STATUS_EVERY_S = 1.0  # new refusals reach status.json at most this late
STATE_VERSION = 1


class FederationAborted(RuntimeError):
    """The quorum was not reached and the configuration says to stop; state is saved."""


class Phase(StrEnum):
    """Where the service is in the federation; its value is what checkpoints, status.json
    and logs hold."""

    WAITING = "waiting"  # for enough silos to join
    PUBLISHING = "publishing"  # the round's plans (again, after a crash while sending)
    COLLECTING = "collecting"  # uploads, until all came or the deadline
    DONE = "done"  # the final round closed, results written


@dataclass
class Member:
    model: str
    n_samples: int
    incarnation: str
    joined_round: int
    metric: str = ""  # what the silo's score is (its announcement); "" if it did not say


@dataclass
class ServiceState:
    """Everything besides the engine that a resumed aggregator needs (JSON-able)."""

    phase: Phase = Phase.WAITING
    round: int = 0
    members: dict[str, Member] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)  # adapted module -> [in, out]
    deadline_at: float | None = None
    extensions: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    # Messages the transport refused, by reason, in earlier runs of this state folder (a
    # restart must not reset what an operator audits); this run's come from the transport.
    rejected_before: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServiceState:
        data = dict(data)
        data.pop("model_digest", None)  # written before federation.toml fixed the digest
        members = {k: Member(**v) for k, v in data.pop("members").items()}
        phase = Phase(data.pop("phase"))
        return cls(**data, members=members, phase=phase)


class AggregatorService:
    def __init__(
        self,
        config: FederationConfig,
        connect: Callable[[], Transport] | None = None,
        clock: Callable[[], float] = time.time,
        poll_s: float = 0.5,
    ) -> None:
        self.config = config
        self.state_dir = Path(config.state_dir)
        self._connect = connect or self._connect_broker
        self.clock = clock
        self.poll_s = poll_s
        self.setup = config.setup()
        self.fingerprint = _fingerprint(self.setup.to_json(), config.schedule)
        self.state = ServiceState()
        self.engine: Aggregator | None = None
        self.transport: Transport | None = None
        self.faults = FaultPlan()
        self._pending: list[Callable[[], None]] = []  # acks waiting for the next checkpoint
        self._last_checkpoint = 0.0
        self._status_written = (0.0, 0)  # when, and the refusals it counted
        self._stop_reason: str | None = None
        self._join_started = clock()
        self._lock = FolderLock(self.state_dir, "aggregator")

    def _connect_broker(self) -> Transport:
        codec = self.config.security.codec("aggregator", self.config.name)
        return self.config.broker.connect("aggregator", self.config.silos, codec=codec)

    # -- lifecycle -----------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop at the next safe point (signal handlers call this)."""
        self._stop_reason = reason

    def run(self) -> ServiceState:
        self.open()
        try:
            while self.state.phase is not Phase.DONE and self._stop_reason is None:
                self.step()
            if self._stop_reason is not None:
                log_event(log, "aggregator_stopping", reason=self._stop_reason,
                          phase=self.state.phase, round=self.state.round)
        except Exception as exc:
            self.state.last_error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.close()
        return self.state

    def open(self) -> None:
        """Load the checkpoint if there is one, connect, restore the engine."""
        if not self.config.model_digest:
            raise ValueError(
                "federation.toml sets no model_digest: the coordinator fixes the base model "
                "every silo must hold. `fedsilo digest MODEL` prints its SHA-256 (put it in as "
                "model_digest = \"...\"), or `fedsilo provision --model MODEL` writes it"
            )
        owner_only(self.state_dir)
        # One live aggregator per state folder: a second would fold and checkpoint over it.
        self._lock.acquire()
        try:
            restore = self._load()
            self.transport = self._connect()
            if restore is not None:
                restore()
            self._codec().advance(self.state.round - 1)
        except BaseException:
            self._lock.release()
            raise
        log_event(
            log, "aggregator_started", federation=self.config.name, resumed=bool(restore),
            phase=self.state.phase, round=self.state.round, silos=list(self.config.silos),
        )

    def close(self) -> None:
        """Checkpoint what was folded (then acknowledge it) and disconnect."""
        try:
            self._checkpoint()
        finally:
            try:
                if self.transport is not None:
                    self.transport.close()
            finally:
                self._lock.release()

    # -- the loop ------------------------------------------------------------------------

    def step(self) -> None:
        """One turn of the loop: wait a little for a message, then act on the phase."""
        phase = self.state.phase
        if phase is Phase.WAITING:
            self._receive(self.poll_s)
            self._maybe_start()
        elif phase is Phase.PUBLISHING:
            self._publish()
        elif phase is Phase.COLLECTING:
            deadline = self.state.deadline_at or self.clock()
            self._receive(max(0.0, min(self.poll_s, deadline - self.clock())))
            self._maybe_close()
        if self._pending and (
            self.clock() - self._last_checkpoint >= self.config.rounds.checkpoint_interval_s
        ):
            self._checkpoint()
        self._refresh_status()

    def _refresh_status(self) -> None:
        """Refusals show in status.json within a second, also while a round waits (a
        flood between the events that write it anyway)."""
        when, counted = self._status_written
        if self._refusal_count() != counted and self.clock() - when >= STATUS_EVERY_S:
            self._write_status()

    def _refusal_count(self) -> int:
        return sum(self.transport.rejected.values()) if self.transport is not None else 0

    def _receive(self, timeout: float) -> bool:
        """Handle the next message within `timeout`; False if none came."""
        assert self.transport is not None
        delivery = self.transport.receive_upload(timeout=timeout)
        if delivery is None:
            return False
        if isinstance(delivery.message, Announce):
            self._on_announce(delivery.message)
        elif not self._on_upload(delivery):  # type: ignore[arg-type]
            return True  # rejected: dead-lettered, nothing to acknowledge
        self._pending.append(delivery.ack)
        return True

    def _on_announce(self, msg: Announce) -> None:
        state = self.state
        if msg.silo_id not in self.config.silos:
            state.count("unknown_silo")
            log_event(log, "silo_refused", logging.ERROR, silo=msg.silo_id,
                      reason="not in the federation's silos (federation.toml)")
            return
        shapes = target_shapes(msg.linear_shapes, self.config.adapter.target_modules)
        wanted = {k: [s.in_features, s.out_features] for k, s in shapes.items()}
        problem = None
        if not wanted:
            problem = (f"its model {msg.model!r} has no linear layer named "
                       f"{list(self.config.adapter.target_modules)}")
        elif state.shapes and wanted != state.shapes:
            problem = f"its model {msg.model!r} has other layer shapes than the federation's"
        elif msg.model_digest != self.config.model_digest:
            problem = (f"its model {msg.model!r} has other weights than the federation's base "
                       "model (federation.toml model_digest; another checkpoint, dtype, or "
                       "seed of a built-in model)")
        if problem:
            state.count("model_mismatch")
            state.last_error = f"silo {msg.silo_id} refused: {problem}"
            log_event(log, "silo_refused", logging.ERROR, silo=msg.silo_id, reason=problem)
            self._write_status()
            return
        state.shapes = state.shapes or wanted
        member = state.members.get(msg.silo_id)
        if member is None:
            state.members[msg.silo_id] = Member(msg.model, msg.n_samples, msg.incarnation,
                                                state.round)
            log_event(log, "silo_joined", silo=msg.silo_id, model=msg.model,
                      n_samples=msg.n_samples, joined=len(state.members),
                      needed=self.config.start_with, phase=state.phase)
        elif member.incarnation != msg.incarnation:
            member.incarnation = msg.incarnation
            log_event(log, "silo_rejoined", silo=msg.silo_id, round=state.round)
        # Only names we know reach the run's files (the text comes from a silo).
        state.members[msg.silo_id].metric = msg.metric if msg.metric in METRIC_NAMES.values() \
            else ""
        self._write_status()

    def _on_upload(self, delivery: Delivery[Upload]) -> bool:
        """Apply an upload; False if it was rejected (invalid tensors) instead."""
        upload = delivery.message
        if self.state.phase is not Phase.COLLECTING or self.engine is None:
            self.state.count("late")
            log_event(log, "upload_late", logging.WARNING, silo=upload.silo_id,
                      upload_round=upload.round, phase=self.state.phase)
            return True
        record = self.engine.history[-1]
        offer = self.engine.offer(record, upload, delivery.size)
        verdict = offer.verdict
        if offer.problem is not None:
            problem = offer.problem
            self.state.count(f"rejected: {problem.reason}")
            self.state.last_error = f"upload of {upload.silo_id} rejected: {problem}"
            delivery.reject(problem.reason, problem.detail)
            self._write_status()
            return False
        if verdict is Verdict.FOLDED:
            log_event(log, "upload_folded", silo=upload.silo_id, round=upload.round,
                      bytes=delivery.size, missing=record.missing)
            self.faults.reach("folded", record.round)
        else:
            self.state.count(verdict.value)
            if verdict is Verdict.DUPLICATE:
                self.faults.reach("duplicate", record.round)
        self._write_status()
        return True

    # -- phases --------------------------------------------------------------------------

    def _participants(self) -> list[str]:
        return [s for s in self.config.silos if s in self.state.members]

    def _maybe_start(self) -> None:
        joined = len(self.state.members)
        if joined >= self.config.start_with:
            self.engine = self._new_engine()
            shapes = {k: ModuleShape(*v) for k, v in self.state.shapes.items()}
            self.engine.start(shapes, self._participants())
            self.state.phase = Phase.PUBLISHING
            log_event(log, "federation_started", silos=self._participants())
            self._checkpoint()
            return
        timeout = self.config.rounds.join_timeout_s
        if timeout and self.clock() - self._join_started > timeout:
            raise FederationAborted(
                f"only {joined} of the {self.config.start_with} silos needed joined within "
                f"{timeout:g} s (joined: {sorted(self.state.members) or 'none'}); start the "
                "missing agents, or lower min_silos, and run again (state is kept)"
            )

    def _publish(self) -> None:
        assert self.engine is not None
        server_round = self.state.round
        # Uploads of the round before stay "late" (counted); older ones are replays.
        self._codec().advance(server_round - 1)
        record = self.engine.publish(server_round, self._participants())
        self._write_assignment(record)
        self.faults.reach("published", server_round)
        self.state.phase = Phase.COLLECTING
        self.state.deadline_at = self.clock() + self.config.rounds.deadline_s
        self.state.extensions = 0
        log_event(log, "round_opened", round=server_round, final=record.final,
                  silos=record.expected, deadline_s=self.config.rounds.deadline_s,
                  bytes_down=sum(record.bytes_down.values()))
        self._checkpoint()

    def _maybe_close(self) -> None:
        assert self.engine is not None
        record = self.engine.history[-1]
        if not record.missing:
            self._close(record)
            return
        if self.clock() < (self.state.deadline_at or 0.0):
            return
        # What already waits in the queue at the deadline was sent in time: take it first
        # (a bounded number of messages, so a flood cannot hold the round open).
        for _ in range(4 * len(record.expected) + 4):
            if not record.missing or not self._receive(0.0):
                break
        if not record.missing:
            self._close(record)
            return
        rounds = self.config.rounds
        have, need = len(record.bytes_up), rounds.quorum_count(len(record.expected))
        if have >= need:
            log_event(log, "round_closed_at_deadline", logging.WARNING, round=record.round,
                      uploads=have, quorum=need, missing=record.missing)
            self._close(record)
            return
        if rounds.on_missing == "extend" and self.state.extensions < rounds.max_extensions:
            self.state.extensions += 1
            self.state.deadline_at = self.clock() + rounds.deadline_s
            log_event(log, "deadline_extended", logging.WARNING, round=record.round,
                      uploads=have, quorum=need, missing=record.missing,
                      extension=self.state.extensions)
            self._checkpoint()
            return
        self.state.last_error = (
            f"round {record.round}: {have} of {len(record.expected)} silos uploaded, quorum "
            f"is {need}; missing {', '.join(record.missing)}"
        )
        self._checkpoint()
        raise FederationAborted(
            self.state.last_error + ". Start the missing agents and run the aggregator "
            "again (it resumes this round), or lower rounds.quorum."
        )

    def _close(self, record: RoundRecord) -> None:
        assert self.engine is not None
        self.faults.reach("aggregating", record.round)
        self.engine.close(record)
        if record.clipped:
            self.state.count("clipped", len(record.clipped))
        summary = summarise(record, self._metric_label())
        self._write_rounds()
        log_event(
            log, "round_closed", round=record.round, final=record.final,
            uploads=len(record.bytes_up), missing=record.missing, mta=summary.mta,
            aggregate_s=summary.aggregate_s, bytes_up=sum(record.bytes_up.values()),
            **(record.aggregation.details if record.aggregation is not None else {}),
        )
        if record.final:
            self.state.phase = Phase.DONE
            self._write_results()
        else:
            self.state.round += 1
            self.state.phase = Phase.PUBLISHING
        self.state.deadline_at = None
        self._checkpoint()
        self.faults.reach("closed", record.round)

    # -- persistence ---------------------------------------------------------------------

    def _codec(self) -> Codec:
        return self.transport.codec if self.transport is not None else PlainCodec()

    def _new_engine(self) -> Aggregator:
        spec = get_strategy(self.setup.strategy.name)
        server = spec.server(self.setup.resolved_adapter(), self.setup.strategy, self.setup.seed)
        server.validate(self.config.start_with)
        server.validate_rounds(self.config.schedule.rounds)
        assert self.transport is not None
        return Aggregator(server, self.transport, self.config.schedule.schedule(),
                          setup=self.setup.to_json(),
                          limits=self.config.security.upload_limits(),
                          clip=self.config.security.update_clip())

    def _checkpoint(self) -> None:
        tensors: dict[str, Any] = {}
        service = self.state.to_json()
        service["rejected_before"] = self._rejected()  # what a restart starts from
        meta: dict[str, Any] = {
            "version": STATE_VERSION,
            "federation": self.config.name,
            "fingerprint": self.fingerprint,
            "service": service,
            "engine": None,
            "codec": self._codec().state_dict(),
        }
        if self.engine is not None:
            tensors, meta["engine"] = self.engine.state_dict()
        save_checkpoint(self.state_dir / CHECKPOINT, tensors, meta)
        self._last_checkpoint = self.clock()
        pending, self._pending = self._pending, []
        for ack in pending:
            try:
                ack()
            except Exception as exc:  # the broker will redeliver it; we fold idempotently
                log.debug("ack failed after checkpoint: %s", exc)
        self._write_status()

    def _flat_fingerprint(self) -> str:
        """The fingerprint of these settings as fedsilo wrote it before each strategy had
        its own config (`strategies.config.flat_knobs`): such a state folder resumes, and
        its next checkpoint records the current fingerprint."""
        setup = {**self.setup.to_json(), "strategy": flat_knobs(self.setup.strategy)}
        return _fingerprint(setup, self.config.schedule)

    def _load(self) -> Callable[[], None] | None:
        """Read the checkpoint (before connecting, so a wrong one fails fast); returns what
        restores the engine once the transport is up."""
        path = self.state_dir / CHECKPOINT
        if not path.exists():
            return None
        tensors, meta = load_checkpoint(path)
        if meta.get("fingerprint") not in (self.fingerprint, self._flat_fingerprint()):
            raise ValueError(
                f"{path} belongs to a federation with other settings (strategy, adapter, "
                "training, seed or schedule changed). Resume with the original "
                "federation.toml, or use a new state_dir to start afresh."
            )
        self.state = ServiceState.from_json(meta["service"])
        codec_state = meta.get("codec") or {}
        log_event(log, "state_loaded", path=str(path), phase=self.state.phase,
                  round=self.state.round)

        def restore() -> None:
            self._codec().load_state_dict(codec_state)
            if meta["engine"] is not None:
                self.engine = self._new_engine()
                self.engine.load_state_dict(tensors, meta["engine"])

        return restore

    def _write_results(self) -> None:
        assert self.engine is not None
        params = {k: v.contiguous() for k, v in self.engine.strategy.global_params.items()}
        write_atomic(self.state_dir / "global_params.safetensors", serialize(params))
        label = self._metric_label()
        rounds = [summarise(r, label) for r in self.engine.history]
        latest = latest_metrics(rounds)
        _write_json(self.state_dir / "summary.json", {
            "federation": self.config.name,
            "strategy": self.setup.strategy.name,
            "metric": label,
            "mtal": mtal([latest]) if latest else None,
            "per_silo": latest,
            "rounds": [r.to_json() for r in rounds],
        })

    def _metric_label(self) -> str:
        """The score's name, from what the silos announced (as simulate names it)."""
        return metrics_label([self.state.members[s].metric for s in self._participants()])

    def _write_assignment(self, record: RoundRecord) -> None:
        """assignments/round_NNN.json, as `fedsilo simulate` writes it (for reports)."""
        folder = self.state_dir / ASSIGNMENTS
        folder.mkdir(mode=0o700, exist_ok=True)
        _write_json(folder / f"round_{record.round:03d}.json", record.assignment)

    def _write_rounds(self) -> None:
        """metrics.jsonl: one line per closed round, the lines `fedsilo simulate` writes.
        Rewritten whole from the engine's history (atomic), so a round closed again after
        a crash is never listed twice. Called at a close: every round in it is closed."""
        assert self.engine is not None
        label = self._metric_label()
        lines = [json.dumps(summarise(r, label).to_json()) + "\n" for r in self.engine.history]
        write_atomic(self.state_dir / METRICS, "".join(lines).encode("utf-8"), 0o644)

    def status(self) -> dict[str, Any]:
        state = self.state
        record = self.engine.history[-1] if self.engine and self.engine.history else None
        now = self.clock()
        return {
            "federation": self.config.name,
            "strategy": self.setup.strategy.name,
            "metric": self._metric_label(),
            "fedsilo_version": fedsilo_version(),
            "run_format": RUN_FORMAT,
            "pid": os.getpid(),
            "updated_at": now,
            "phase": state.phase,
            "round": state.round,
            "total_rounds": self.config.schedule.rounds,
            "deadline_at": state.deadline_at,
            "deadline_in_s": None if state.deadline_at is None else state.deadline_at - now,
            "extensions": state.extensions,
            "roster": list(self.config.silos),
            "joined": sorted(state.members),
            "expected": record.expected if record and state.phase is Phase.COLLECTING else [],
            "uploaded": dict(record.bytes_up) if record and state.phase is Phase.COLLECTING else {},
            "missing": record.missing if record and state.phase is Phase.COLLECTING else [],
            "bytes_down": dict(record.bytes_down) if record else {},
            "counters": dict(state.counters),
            "reconnects": self.transport.reconnects if self.transport is not None else 0,
            "rejected": self._rejected(),
            "refusals": [asdict(r) for r in self.transport.refusals]
            if self.transport is not None else [],
            "last_error": state.last_error,
        }

    def _rejected(self) -> dict[str, int]:
        """Refusals by reason over every run of this state folder."""
        total = dict(self.state.rejected_before)
        for reason, n in (self.transport.rejected if self.transport is not None else {}).items():
            total[reason] = total.get(reason, 0) + n
        return total

    def _write_status(self) -> None:
        _write_json(self.state_dir / STATUS, self.status())
        self._status_written = (self.clock(), self._refusal_count())


def _fingerprint(setup: dict[str, Any], schedule: Any) -> str:
    data = json.dumps({"setup": setup, "schedule": asdict(schedule)}, sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def _write_json(path: Path, data: Any) -> None:
    # 0644: what the former plain write gave under the usual umask; the folder is owner-only.
    write_atomic(path, json.dumps(data, indent=1, default=str).encode("utf-8"), 0o644)
