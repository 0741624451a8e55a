"""The engine behind `fedsilo simulate`: C silo agents and one aggregator in one process.

The agents and the aggregator are the real ones and talk through `MemoryTransport`,
which moves the same encoded bytes as a deployment would; the only thing simulation
adds is the schedule that lets one thread play every party in turn.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from fedsilo.aggregator.coordinator import Aggregator
from fedsilo.aggregator.history import run_header
from fedsilo.aggregator.report import RoundSummary, latest_metrics, summarise
from fedsilo.aggregator.schedule import Schedule
from fedsilo.privacy.dp import DPConfig
from fedsilo.privacy.ledger import PrivacyLedger
from fedsilo.privacy.silo import LEDGER_FILE, SiloPrivacy
from fedsilo.sdk.data.examples import SiloData, TaskInfo
from fedsilo.sdk.data.silos import build_silo_data as build_federation_data
from fedsilo.sdk.data.silos import silo_sources
from fedsilo.sdk.evaluation.metrics import metric_for, mtal
from fedsilo.sdk.faults import FaultPlan
from fedsilo.sdk.models.digest import weights_digest
from fedsilo.sdk.models.loading import LoadedModel, load_model
from fedsilo.sdk.personalised.config import BaseModelRef
from fedsilo.sdk.personalised.record import silo_provenance
from fedsilo.sdk.strategies import ServerStrategy, get_strategy
from fedsilo.sdk.training import LocalTrainer, stable_seed
from fedsilo.sdk.transport.memory import MemoryTransport
from fedsilo.silo_agent.agent import SiloAgent
from fedsilo.simulation.config import SimulationConfig
from fedsilo.simulation.state import (
    CHECKPOINT,
    SimulationInterrupted,
    completed_round,
    restore_state,
    save_state,
)


class Observer(Protocol):
    """What the CLI (or a test) hears from a running simulation."""

    def round_started(self, server_round: int, final: bool) -> None: ...
    def silo_started(self, silo_id: str, steps: int) -> None: ...
    def train_step(self, silo_id: str, step: int, total: int, loss: float) -> None: ...
    def eval_step(self, silo_id: str, done: int, total: int) -> None: ...
    def round_finished(self, summary: RoundSummary) -> None: ...
    def stop(self) -> None:
        """Take any live display off the terminal (the run stopped)."""


@dataclass
class SimulationResult:
    run_dir: Path
    rounds: list[RoundSummary] = field(default_factory=list)
    mtal: float = math.nan
    final_params: dict[str, Any] = field(default_factory=dict)


class _Silent:
    def round_started(self, server_round: int, final: bool) -> None: ...
    def silo_started(self, silo_id: str, steps: int) -> None: ...
    def train_step(self, silo_id: str, step: int, total: int, loss: float) -> None: ...
    def eval_step(self, silo_id: str, done: int, total: int) -> None: ...
    def round_finished(self, summary: RoundSummary) -> None: ...
    def stop(self) -> None: ...


def silo_ids(n: int) -> list[str]:
    return [f"silo-{i}" for i in range(n)]


def build_silo_data(config: SimulationConfig) -> list[SiloData]:
    """Per-silo splits of the embedded synthetic set, or of one or more real data sets."""
    return build_federation_data(
        config.data, config.silos, config.seed, config.examples_per_silo,
        partition=config.partition, alpha=config.alpha, data_dir=config.data_dir,
        split=config.split(), min_size=config.partition_min_size,
    )


def share_backbone(model: nn.Module) -> nn.Module:
    """A copy of `model` whose frozen weights are the same tensors: C silos cost one
    backbone of memory. Safe because backbone weights are never trained."""
    memo: dict[int, Any] = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)


def metric_name(task: TaskInfo) -> str:
    return metric_for(task.kind)  # the name a deployment's silos announce too


def metrics_label(tasks: Sequence[TaskInfo]) -> str:
    """One metric's name, or the names joined by '/' when the silos' tasks differ."""
    return "/".join(dict.fromkeys(metric_name(t) for t in tasks))


def run_simulation(
    config: SimulationConfig,
    observer: Observer | None = None,
    run_dir: Path | None = None,
    resume: bool = False,
) -> SimulationResult:
    """Run the federation into `run_dir` (default: a new folder under config.out_dir);
    `resume`: continue the interrupted run in `run_dir` from its last saved round (its
    settings: `simulation_state.resume_config`). Ctrl-C raises SimulationInterrupted."""
    observer = observer or _Silent()
    spec = get_strategy(config.strategy)
    adapter = config.adapter()
    strategy_config = config.strategy_config()
    schedule = Schedule(config.rounds, config.local_steps, config.lr, config.lr_decay)
    ids = silo_ids(config.silos)
    server = spec.server(adapter, strategy_config, config.seed)
    server.validate(config.silos)  # fail before loading anything
    server.validate_rounds(config.rounds)

    try:  # Ctrl-C once config.json exists leaves a run that --resume continues
        datasets = build_silo_data(config)
        loaded = load_model(config.model, dtype=config.dtype, seed=config.seed,
                            device=config.device)
        transport = MemoryTransport()
        run_dir = run_dir or _new_run_dir(Path(config.out_dir), config)
        run_dir.mkdir(parents=True, exist_ok=True)
        holders = silo_sources(config.data, config.silos)
        silo_info = {
            silo: {"data": held, "task": data.task.name or held,
                   "metric": metric_name(data.task), "sizes": data.sizes()}
            for silo, held, data in zip(ids, holders, datasets, strict=True)
        }
        if not resume:  # a resumed run keeps the config.json (and date) it began with
            (run_dir / "config.json").write_text(
                json.dumps({**asdict(config), "silo_data": silo_info, **run_header()}, indent=2)
            )
        return _run(config, observer, run_dir, resume, datasets, loaded, transport, server,
                    schedule, silo_info)
    except KeyboardInterrupt:
        if run_dir is None or not (run_dir / "config.json").exists():
            raise  # nothing written yet: nothing to resume
        raise SimulationInterrupted(run_dir, completed_round(run_dir), config.rounds) from None


def _run(config: SimulationConfig, observer: Observer, run_dir: Path, resume: bool,
         datasets: list[SiloData], loaded: LoadedModel, transport: MemoryTransport,
         server: ServerStrategy,
         schedule: Schedule, silo_info: dict[str, Any]) -> SimulationResult:
    """The federation's rounds, from the checkpoint's next round when resuming; after
    every training round the whole state is checkpointed (CHECKPOINT), so Ctrl-C loses
    at most the round under way."""
    spec = get_strategy(config.strategy)
    adapter = config.adapter()
    strategy_config = config.strategy_config()
    ids = silo_ids(config.silos)
    # recorded with each adapter, for `fedsilo export` (the digest: before any injection)
    base = BaseModelRef(loaded.source, config.dtype, config.seed, weights_digest(loaded.model))
    agents = []
    for silo, data in zip(ids, datasets, strict=True):
        trainer = LocalTrainer(
            share_backbone(loaded.model), loaded.tokenizer, data, adapter,
            config.training(), seed=config.seed, silo_id=silo,
        )
        trainer.on_step = _step_hook(observer, silo)
        trainer.on_eval = _eval_hook(observer, silo)
        if config.dp_epsilon is not None:
            # Seeded noise: reproducible simulations. Deployments draw it from OS entropy.
            noise = torch.Generator().manual_seed(stable_seed(config.seed, silo, "dp"))
            dp = DPConfig(epsilon=config.dp_epsilon, delta=config.dp_delta, clip=config.dp_clip)
            trainer.privacy = SiloPrivacy(dp, PrivacyLedger(dp.epsilon, dp.delta), None,
                                          noise, silo)
        agents.append(
            SiloAgent(silo, spec.client(strategy_config), trainer, transport,
                      out_dir=run_dir / "silos" / silo,
                      provenance=silo_provenance(config.strategy, base,
                                                 config.data_recipe(ids.index(silo)), data.task))
        )
    aggregator = Aggregator(server, transport, schedule)
    label = metrics_label([d.task for d in datasets])
    state = run_dir / CHECKPOINT
    done = restore_state(state, config, aggregator, agents) if resume and state.exists() \
        else None
    if done is None:
        aggregator.start(agents[0].trainer.shapes(), ids)

    result = SimulationResult(run_dir=run_dir,
                              rounds=[summarise(r, label) for r in aggregator.history])
    (run_dir / "assignments").mkdir(exist_ok=True)
    faults = FaultPlan()  # tests: FEDSILO_FAULT=silo_done@ROUND:wait=PATH holds a round
    with (run_dir / "metrics.jsonl").open("w") as metrics_file:
        for summary in result.rounds:  # what a resumed run had done
            metrics_file.write(json.dumps(summary.to_json()) + "\n")
        for server_round in range(0 if done is None else done + 1, config.rounds + 1):
            final = server_round == config.rounds
            observer.round_started(server_round, final)
            record = aggregator.publish(server_round)
            (run_dir / "assignments" / f"round_{server_round:03d}.json").write_text(
                json.dumps(record.assignment, indent=1)
            )
            for agent in agents:
                observer.silo_started(agent.silo_id, 0 if final else config.local_steps)
                agent.poll()
                faults.reach("silo_done", server_round)
            aggregator.close(aggregator.collect(record))
            summary = summarise(record, label)
            result.rounds.append(summary)
            metrics_file.write(json.dumps(summary.to_json()) + "\n")
            metrics_file.flush()
            if not final:  # after the final round, summary.json marks the run complete
                _save_ledgers(run_dir, agents)
                save_state(state, config, aggregator, agents, server_round)
            observer.round_finished(summary)
    latest = latest_metrics(result.rounds)
    result.mtal = mtal([latest]) if latest else math.nan
    result.final_params = server.global_params
    (run_dir / "summary.json").write_text(
        json.dumps({"mtal": result.mtal, "metric": label, "per_silo": latest,
                    "strategy": config.strategy, "silo_data": silo_info}, indent=2)
    )
    state.unlink(missing_ok=True)  # complete: nothing left to resume
    return result


def _save_ledgers(run_dir: Path, agents: list[SiloAgent]) -> None:
    """Each silo's DP ledger, in the file an agent keeps (fedsilo report reads it)."""
    for agent in agents:
        if agent.trainer.privacy is not None:
            agent.trainer.privacy.ledger.save(run_dir / "silos" / agent.silo_id / LEDGER_FILE)


def _step_hook(observer: Observer, silo: str) -> Callable[[int, int, float], None]:
    def hook(step: int, total: int, loss: float) -> None:
        observer.train_step(silo, step, total, loss)

    return hook


def _eval_hook(observer: Observer, silo: str) -> Callable[[int, int], None]:
    def hook(done: int, total: int) -> None:
        observer.eval_step(silo, done, total)

    return hook


def _new_run_dir(root: Path, config: SimulationConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = root / f"{stamp}-{config.strategy}-seed{config.seed}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path
