"""`fedsilo agent start`: one silo as a long-running, restartable process.

At start the agent loads its data and base model, announces itself to the aggregator and
waits for plans. For each plan: train, upload (publisher-confirmed), checkpoint, and only
then acknowledge the plan. A crash before the acknowledgement means the broker hands the
plan over again; the agent re-runs the round (training is seeded by (seed, silo, round), so
it repeats exactly) and the aggregator ignores the repeated upload. A plan for a round the
checkpoint says is done is acknowledged and skipped; when several plans queued up while
the agent was away, only the newest is run.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from fedsilo.privacy.dp import DPError, NonFiniteValues
from fedsilo.privacy.ledger import BudgetExceeded, LedgerError, LedgerRecord
from fedsilo.privacy.silo import SiloPrivacy
from fedsilo.privacy.validation import InvalidTensors, check_tensors
from fedsilo.sdk.adapters.model import linear_shapes, load_trainable, set_assignment
from fedsilo.sdk.checkpoint import load_checkpoint, namespaced, save_checkpoint
from fedsilo.sdk.data.examples import SiloData
from fedsilo.sdk.data.recipe import SiloDataRecipe
from fedsilo.sdk.evaluation.metrics import metric_for
from fedsilo.sdk.faults import FaultPlan
from fedsilo.sdk.federation import FederationSetup
from fedsilo.sdk.files import FolderLock
from fedsilo.sdk.logs import log_event
from fedsilo.sdk.messages import Announce, RoundPlan
from fedsilo.sdk.models.digest import weights_digest
from fedsilo.sdk.models.loading import LoadedModel, load_model
from fedsilo.sdk.personalised.config import BaseModelRef
from fedsilo.sdk.personalised.record import silo_provenance
from fedsilo.sdk.strategies import get_strategy
from fedsilo.sdk.training import LocalTrainer
from fedsilo.sdk.transport.base import Delivery, Transport
from fedsilo.sdk.transport.codec import Codec, PlainCodec
from fedsilo.sdk.transport.settings import owner_only

if TYPE_CHECKING:
    from fedsilo.sdk.transport.amqp import TransferProgress
from fedsilo.silo_agent.agent import ADAPTER_FILE, SiloAgent
from fedsilo.silo_agent.config import SiloConfig

log = logging.getLogger(__name__)

CHECKPOINT = "agent.ckpt"
STATE_VERSION = 1
CLIENT_STATE = "client"  # checkpoint namespace of ClientStrategy.state_dict()


def recorded_ledger(state_dir: Path) -> LedgerRecord | None:
    """What the agent's checkpoint in `state_dir` remembers of its privacy ledger (None: no
    checkpoint, or one from before checkpoints recorded it). Read it before the ledger: the
    ledger only grows after the checkpoint, so a running agent never makes them disagree."""
    path = Path(state_dir) / CHECKPOINT
    if not path.exists():
        return None
    return LedgerRecord.from_meta(load_checkpoint(path)[1], source=path.name)


def silo_data_recipe(config: SiloConfig) -> SiloDataRecipe:
    """How the silo's data is cut from `[data]` (recorded with its adapter, so `fedsilo
    evaluate` rebuilds the same test split)."""
    d = config.data
    return SiloDataRecipe(d.source, d.partitions, d.index, config.seed, d.examples,
                          partition=d.partition, alpha=d.alpha, data_dir=d.data_dir)


class PrivacyBudgetExhausted(RuntimeError):
    """The next release would exceed the silo's DP budget: the agent stops, sends nothing."""


class StopRequested(Exception):
    """Raised from inside training when SIGTERM/SIGINT asked the agent to stop."""


class AgentObserver(Protocol):
    """What the CLI shows: a progress bar per round of local training."""

    def round_started(self, server_round: int, steps: int) -> None: ...
    def train_step(self, step: int, total: int, loss: float) -> None: ...
    def eval_step(self, done: int, total: int) -> None:
        """The test split being scored (after training)."""

    def round_finished(self, server_round: int, metrics: dict[str, float]) -> None: ...


class _Quiet:
    def round_started(self, server_round: int, steps: int) -> None: ...
    def train_step(self, step: int, total: int, loss: float) -> None: ...
    def eval_step(self, done: int, total: int) -> None: ...
    def round_finished(self, server_round: int, metrics: dict[str, float]) -> None: ...


@dataclass
class AgentState:
    last_round: int | None = None
    finished: bool = False
    setup: dict[str, Any] | None = None
    assignment: dict[str, list[int]] = field(default_factory=dict)
    skipped: int = 0  # plans acknowledged without running (duplicates, stale)


class AgentService:
    def __init__(
        self,
        config: SiloConfig,
        connect: Callable[[], Transport] | None = None,
        observer: AgentObserver | None = None,
        keep_alive_s: float = 5.0,
        progress: Callable[[TransferProgress], None] | None = None,
    ) -> None:
        self.config = config
        self._progress = progress  # of large transfers, for the broker's transport
        self.silo_id = config.silo_id
        self.state_dir = Path(config.state_dir)
        self._connect = connect or self._connect_broker
        self.observer = observer or _Quiet()
        self.keep_alive_s = keep_alive_s
        self.state = AgentState()
        self.privacy: SiloPrivacy | None = None
        self._lock: FolderLock | None = None  # the state folder's, held while running
        self._ledger_record: LedgerRecord | None = None  # the checkpoint's, checked at start
        self._codec_state: dict[str, Any] = {}
        self.transport: Transport | None = None
        self.trainer: LocalTrainer | None = None
        self.agent: SiloAgent | None = None
        self.faults = FaultPlan()
        self._model_digest = ""
        self.incarnation = uuid.uuid4().hex[:12]
        self._stop_reason: str | None = None
        self._last_keep_alive = time.monotonic()

    def request_stop(self, reason: str) -> None:
        self._stop_reason = reason

    def _connect_broker(self) -> Transport:
        codec = self.config.security.codec(self.silo_id)
        # exclusive: the broker refuses a second live agent of this silo (its lock queue)
        return self.config.broker.connect(self.silo_id, progress=self._progress, codec=codec,
                                          exclusive=True)

    # -- lifecycle -----------------------------------------------------------------------

    def run(self) -> AgentState:
        owner_only(self.state_dir)
        # One live agent per state folder: a second would train and checkpoint over it.
        # It also makes this process the privacy ledger's only writer (SiloPrivacy checks).
        with FolderLock(self.state_dir, f"agent of {self.silo_id}") as lock:
            self._lock = lock
            return self._run()

    def _run(self) -> AgentState:
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        saved = self._load()
        try:  # a ledger missing, shorter or other than the checkpoint recorded is refused
            self.privacy = SiloPrivacy.open(self.config.dp, self.state_dir, self.silo_id,
                                            lock=self._lock, recorded=self._ledger_record)
        except LedgerError as exc:
            log_event(log, "privacy_ledger_refused", logging.ERROR, silo=self.silo_id,
                      detail=str(exc))
            raise
        data = self._data()
        loaded = load_model(self.config.model, dtype=self.config.dtype, seed=self.config.seed,
                            device=self.config.device)
        self._model_digest = weights_digest(loaded.model)  # before any adapter is injected
        announce = Announce(
            silo_id=self.silo_id,
            model=loaded.source,
            linear_shapes=linear_shapes(loaded.model),
            n_samples=len(data.train),
            incarnation=self.incarnation,
            model_digest=self._model_digest,
            metric=metric_for(data.task.kind),  # so the aggregator names scores as simulate
        )
        self.transport = self._connect()
        try:
            self._codec().load_state_dict(self._codec_state)
            self._codec().advance(self.state.last_round or 0)
            if saved is not None and self.state.setup is not None:
                self._build(FederationSetup.from_json(self.state.setup), loaded, data)
                self._restore(saved)
            if self.state.finished:
                log_event(log, "agent_already_finished", silo=self.silo_id,
                          adapter=str(self.state_dir / ADAPTER_FILE))
                return self.state
            self.transport.send_announce(announce)
            log_event(log, "agent_started", silo=self.silo_id, model=loaded.source,
                      n_samples=len(data.train), resumed=saved is not None,
                      last_round=self.state.last_round)
            while not self.state.finished and self._stop_reason is None:
                delivery = self.transport.receive_plan(self.silo_id, timeout=self.config.poll_s)
                if delivery is not None:
                    self._on_plan(self._newest(delivery), loaded, data)
            if self._stop_reason is not None:
                log_event(log, "agent_stopping", silo=self.silo_id, reason=self._stop_reason,
                          last_round=self.state.last_round)
        finally:
            self.transport.close()
        return self.state

    def _newest(self, delivery: Delivery[RoundPlan]) -> Delivery[RoundPlan]:
        """Skip plans that queued up while we were away: only the newest round matters."""
        assert self.transport is not None
        while True:
            newer = self.transport.receive_plan(self.silo_id, timeout=0)
            if newer is None:
                return delivery
            older, delivery = sorted((delivery, newer), key=lambda d: d.message.round)
            log_event(log, "plan_skipped", logging.WARNING, silo=self.silo_id,
                      round=older.message.round, newer=delivery.message.round)
            self.state.skipped += 1
            older.ack()

    def _on_plan(self, delivery: Delivery[RoundPlan], loaded: LoadedModel, data: SiloData) -> None:
        plan = delivery.message
        if plan.silo_id != self.silo_id:
            log_event(log, "plan_refused", logging.ERROR, silo=self.silo_id,
                      reason=f"plan addressed to {plan.silo_id!r}")
            delivery.ack()
            return
        if self.state.last_round is not None and plan.round <= self.state.last_round:
            self.state.skipped += 1
            log_event(log, "plan_duplicate", silo=self.silo_id, round=plan.round,
                      last_round=self.state.last_round)
            delivery.ack()
            return
        try:
            check_tensors(plan.params, None, what=f"plan for round {plan.round}")
        except InvalidTensors as exc:
            log_event(log, "plan_rejected", logging.ERROR, silo=self.silo_id,
                      round=plan.round, reason=exc.reason, detail=exc.detail)
            delivery.reject(exc.reason, exc.detail)
            return
        self.faults.reach("plan_received", plan.round)
        if self.faults.poisons("plan_received", plan.round):  # crash tests: a diverging model
            plan = replace(plan, params={k: torch.full_like(v, 3e38)
                                         for k, v in plan.params.items()})
        setup = FederationSetup.from_json(plan.setup)
        if self.trainer is None:
            self._build(setup, loaded, data)
        elif FederationSetup.from_json(self.state.setup) != setup:
            raise ValueError(
                "the federation's settings changed during the run; the aggregator must keep "
                "federation.toml unchanged until the run ends (or start a new state_dir)"
            )
        assert self.agent is not None and self.trainer is not None
        self.observer.round_started(plan.round, plan.local_steps)
        try:
            upload = self.agent.handle(plan)
        except NonFiniteValues as exc:
            # Not a privacy problem: the model diverged on this round's plan. Skip the round
            # (nothing sent; the aggregator closes it without us) and take the next plan.
            log_event(log, "round_skipped", logging.ERROR, silo=self.silo_id,
                      round=plan.round, reason="non-finite values", detail=str(exc))
            self.state.last_round = plan.round
            self._codec().advance(plan.round)
            self._checkpoint()
            delivery.ack()
            return
        except (BudgetExceeded, DPError) as exc:
            log_event(log, "privacy_budget_exhausted", logging.ERROR, silo=self.silo_id,
                      round=plan.round, detail=str(exc))
            raise PrivacyBudgetExhausted(
                f"silo {self.silo_id} refuses round {plan.round}: {exc}. Nothing was sent. "
                "Raise dp.epsilon only if your privacy policy allows it; "
                "`fedsilo agent privacy` shows what was spent."
            ) from None
        except StopRequested:
            log_event(log, "round_abandoned", silo=self.silo_id, round=plan.round)
            return  # not acknowledged: the plan waits in the queue for the next start
        self.faults.reach("uploaded", plan.round)
        self.state.last_round = plan.round
        self.state.finished = plan.final
        self.state.assignment = self.trainer.assignment()
        self._codec().advance(plan.round)
        self._checkpoint()
        delivery.ack()
        self.observer.round_finished(plan.round, dict(upload.metrics))
        log_event(log, "round_done", silo=self.silo_id, round=plan.round, final=plan.final,
                  metrics=upload.metrics, timings=upload.timings)
        if plan.final:
            log_event(log, "agent_finished", silo=self.silo_id,
                      adapter=str(self.state_dir / ADAPTER_FILE))

    # -- model ---------------------------------------------------------------------------

    def _data(self) -> SiloData:
        return silo_data_recipe(self.config).build()

    def _provenance(self, setup: FederationSetup, loaded: LoadedModel,
                    data: SiloData) -> dict[str, str]:
        base = BaseModelRef(loaded.source, self.config.dtype, self.config.seed,
                            self._model_digest)
        return silo_provenance(setup.strategy.name, base, silo_data_recipe(self.config),
                               data.task)

    def _build(self, setup: FederationSetup, loaded: LoadedModel, data: SiloData) -> None:
        assert self.transport is not None
        self.trainer = LocalTrainer(
            loaded.model, loaded.tokenizer, data, setup.resolved_adapter(), setup.training,
            seed=setup.seed, silo_id=self.silo_id,
        )
        self.trainer.on_step = self._on_step
        self.trainer.on_eval = self._on_eval
        self.trainer.privacy = self.privacy
        client = get_strategy(setup.strategy.name).client(setup.strategy)
        self.agent = SiloAgent(self.silo_id, client, self.trainer, self.transport,
                               out_dir=self.state_dir,
                               provenance=self._provenance(setup, loaded, data))
        self.state.setup = setup.to_json()

    def _on_step(self, step: int, total: int, loss: float) -> None:
        self.observer.train_step(step, total, loss)
        if self._stop_reason is not None:
            raise StopRequested(self._stop_reason)
        self._keep_alive()

    def _on_eval(self, done: int, total: int) -> None:
        """Scoring progress. Never stops the round here: scoring may follow a DP release
        already charged to the ledger, and redoing the round would charge it again."""
        self.observer.eval_step(done, total)
        self._keep_alive()

    def _keep_alive(self) -> None:
        """Answer the broker's heartbeats during long local work (training, scoring)."""
        now = time.monotonic()
        if now - self._last_keep_alive >= self.keep_alive_s and self.transport is not None:
            self.transport.keep_alive()
            self._last_keep_alive = now

    def _codec(self) -> Codec:
        return self.transport.codec if self.transport is not None else PlainCodec()

    # -- persistence ---------------------------------------------------------------------

    def _checkpoint(self) -> None:
        tensors = self.trainer.state() if self.trainer is not None else {}
        if self.agent is not None:  # what the strategy keeps on the silo (never uploaded)
            tensors.update(namespaced(CLIENT_STATE, self.agent.client.state_dict()))
        meta = {
            "version": STATE_VERSION,
            "silo_id": self.silo_id,
            "last_round": self.state.last_round,
            "finished": self.state.finished,
            "setup": self.state.setup,
            "assignment": self.state.assignment,
            "skipped": self.state.skipped,
            "codec": self._codec().state_dict(),
            # what the ledger held when this was written: start-up compares them
            "privacy": None if self.privacy is None
            else self.privacy.ledger.record(self.state.last_round).to_json(),
        }
        save_checkpoint(self.state_dir / CHECKPOINT, tensors, meta)

    def _load(self) -> dict[str, torch.Tensor] | None:
        path = self.state_dir / CHECKPOINT
        if not path.exists():
            return None
        tensors, meta = load_checkpoint(path)
        if meta.get("silo_id") != self.silo_id:
            raise ValueError(
                f"{path} belongs to silo {meta.get('silo_id')!r}, not {self.silo_id!r}; "
                "give each silo its own state_dir"
            )
        self._codec_state = meta.get("codec") or {}
        self.state = AgentState(
            last_round=meta["last_round"], finished=meta["finished"], setup=meta["setup"],
            assignment=meta["assignment"], skipped=meta.get("skipped", 0),
        )
        self._ledger_record = LedgerRecord.from_meta(meta, source=path.name)
        if self._ledger_record is None:
            log_event(log, "privacy_ledger_unverified", logging.WARNING, silo=self.silo_id,
                      path=str(path), reason="checkpoint written before checkpoints recorded "
                      "the privacy ledger; the next one will")
        log_event(log, "state_loaded", silo=self.silo_id, path=str(path),
                  last_round=self.state.last_round)
        return tensors

    def _restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """The adapter as it was after the last finished round (FedAMoLE's final plan
        keeps it: it is the silo's personalised model) and the strategy's silo state."""
        assert self.trainer is not None and self.agent is not None
        prefix = f"{CLIENT_STATE}/"
        client = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        adapter = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
        set_assignment(self.trainer.model, self.state.assignment)
        if adapter:
            load_trainable(self.trainer.model, adapter, strict=True)
        self.agent.client.load_state_dict(client)
