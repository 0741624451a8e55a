"""`fedsilo simulate`: C silo agents and one aggregator in one process.

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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch import nn

from fedsilo.aggregator.coordinator import Aggregator, RoundRecord
from fedsilo.aggregator.schedule import Schedule
from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.data.examples import DataError, Example, SiloData, TaskInfo
from fedsilo.sdk.data.loading import load_examples
from fedsilo.sdk.data.partition import partition
from fedsilo.sdk.data.presets import resolve_dataset
from fedsilo.sdk.data.splits import split_silo
from fedsilo.sdk.data.synthetic import synthetic_federation
from fedsilo.sdk.evaluation.metrics import mtal
from fedsilo.sdk.models.loading import load_model
from fedsilo.sdk.strategies import StrategyConfig, get_strategy
from fedsilo.sdk.training import LocalTrainer, TrainingConfig
from fedsilo.sdk.transport.memory import MemoryTransport
from fedsilo.silo_agent.agent import SiloAgent


@dataclass(frozen=True)
class SimulationConfig:
    # federation
    silos: int = 4
    rounds: int = 6
    local_steps: int = 30
    strategy: str = "fedamole"
    seed: int = 0
    # optimisation
    batch_size: int = 8
    lr: float = 3e-3
    lr_decay: float = 0.99
    max_length: int = 64
    # model and adapter
    model: str = "builtin:tiny"
    dtype: str = "float32"
    r: int = 8
    lora_alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    top_k: int = 2
    lb_coef: float = 1e-3
    # FedAMoLE expert pool and assignment
    num_experts: int = 8
    k_c: int = 2
    b: int = 6
    assignment: str = "rsea"
    solver: str = "scip"
    weighting: str = "uniform"
    # data: None = the embedded synthetic multi-task set
    data: str | None = None
    data_dir: str | None = None
    partition: str = "dirichlet"
    alpha: float = 1.0
    examples_per_silo: int = 300
    eval_limit: int | None = None
    max_new_tokens: int = 64
    # output
    out_dir: str = "runs"

    def adapter(self) -> AMoLEConfig:
        base = AMoLEConfig(
            r=self.r, alpha=self.lora_alpha, dropout=self.dropout, top_k=self.top_k,
            target_modules=tuple(self.target_modules), lb_coef=self.lb_coef,
        )
        return get_strategy(self.strategy).adapter(base)

    def strategy_config(self) -> StrategyConfig:
        return StrategyConfig(
            name=self.strategy, num_experts=self.num_experts, k_c=self.k_c, b=self.b,
            assignment=self.assignment,  # type: ignore[arg-type]
            solver=self.solver,  # type: ignore[arg-type]
            weighting=self.weighting,  # type: ignore[arg-type]
        )

    def training(self) -> TrainingConfig:
        return TrainingConfig(
            batch_size=self.batch_size, max_length=self.max_length,
            eval_limit=self.eval_limit, max_new_tokens=self.max_new_tokens,
        )

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class Observer(Protocol):
    """What the CLI (or a test) hears from a running simulation."""

    def round_started(self, round: int, final: bool) -> None: ...
    def silo_started(self, silo_id: str, steps: int) -> None: ...
    def train_step(self, silo_id: str, step: int, total: int, loss: float) -> None: ...
    def round_finished(self, summary: RoundSummary) -> None: ...


@dataclass
class SiloRow:
    metric: float | None
    experts_min: int
    experts_mean: float
    experts_max: int
    bytes_up: int
    bytes_down: int
    train_s: float
    test_s: float


@dataclass
class RoundSummary:
    round: int
    final: bool
    silos: dict[str, SiloRow]
    aggregate_s: float
    mta: float | None
    metric_name: str = "metric"

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "final": self.final,
            "metric": self.metric_name,
            "mta": self.mta,
            "aggregate_s": self.aggregate_s,
            "silos": {k: asdict(v) for k, v in self.silos.items()},
        }


@dataclass
class SimulationResult:
    run_dir: Path
    rounds: list[RoundSummary] = field(default_factory=list)
    mtal: float = math.nan
    final_params: dict[str, Any] = field(default_factory=dict)

    def metric_history(self) -> list[dict[str, float]]:
        return [
            {s: row.metric for s, row in r.silos.items() if row.metric is not None}
            for r in self.rounds
        ]


class _Silent:
    def round_started(self, round: int, final: bool) -> None: ...
    def silo_started(self, silo_id: str, steps: int) -> None: ...
    def train_step(self, silo_id: str, step: int, total: int, loss: float) -> None: ...
    def round_finished(self, summary: RoundSummary) -> None: ...


def silo_ids(n: int) -> list[str]:
    return [f"silo-{i}" for i in range(n)]


def build_silo_data(config: SimulationConfig) -> list[SiloData]:
    """Per-silo splits of the embedded synthetic set, or of a real data set."""
    rng = np.random.default_rng(config.seed)
    if config.data is None:
        per_silo, task = synthetic_federation(
            config.silos, config.seed, examples_per_silo=config.examples_per_silo
        )
    else:
        spec = resolve_dataset(config.data, config.data_dir)
        examples, task = load_examples(
            spec, limit=config.silos * config.examples_per_silo, seed=config.seed
        )
        groups = [e.group or "" for e in examples]
        parts = partition(groups, config.silos, config.partition, rng, alpha=config.alpha)
        per_silo = [[examples[i] for i in idx] for idx in parts]
    return [_split(examples, task, rng) for examples in per_silo]


def _split(examples: Sequence[Example], task: TaskInfo, rng: np.random.Generator) -> SiloData:
    data = split_silo(examples, task, rng)
    if not data.train or not data.test:
        raise DataError(
            f"a silo got {len(examples)} examples, too few to split into train and test; "
            "raise --examples-per-silo or lower --silos"
        )
    return data


def share_backbone(model: nn.Module) -> nn.Module:
    """A copy of `model` whose frozen weights are the same tensors: C silos cost one
    backbone of memory. Safe because backbone weights are never trained."""
    memo: dict[int, Any] = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)


def metric_name(task: TaskInfo) -> str:
    return "accuracy" if task.kind == "classification" else "rouge-l"


def _summarise(record: RoundRecord, metric: str) -> RoundSummary:
    rows: dict[str, SiloRow] = {}
    for silo, assignment in record.assignment.items():
        counts = [len(ids) for ids in assignment.values()] or [0]
        timings = record.timings.get(silo, {})
        rows[silo] = SiloRow(
            metric=record.metrics.get(silo, {}).get("metric"),
            experts_min=min(counts),
            experts_mean=sum(counts) / len(counts),
            experts_max=max(counts),
            bytes_up=record.bytes_up.get(silo, 0),
            bytes_down=record.bytes_down.get(silo, 0),
            train_s=timings.get("train_s", 0.0),
            test_s=timings.get("test_s", 0.0),
        )
    values = [row.metric for row in rows.values() if row.metric is not None]
    return RoundSummary(
        round=record.round,
        final=record.final,
        silos=rows,
        aggregate_s=record.aggregation.seconds if record.aggregation else 0.0,
        mta=sum(values) / len(values) if values else None,
        metric_name=metric,
    )


def _latest_metrics(rounds: Sequence[RoundSummary]) -> dict[str, float]:
    """Each silo's most recent score: the personalised model after the last round."""
    latest: dict[str, float] = {}
    for summary in rounds:
        for silo, row in summary.silos.items():
            if row.metric is not None:
                latest[silo] = row.metric
    return latest


def run_simulation(
    config: SimulationConfig,
    observer: Observer | None = None,
    run_dir: Path | None = None,
) -> SimulationResult:
    observer = observer or _Silent()
    spec = get_strategy(config.strategy)
    adapter = config.adapter()
    strategy_config = config.strategy_config()
    schedule = Schedule(config.rounds, config.local_steps, config.lr, config.lr_decay)
    ids = silo_ids(config.silos)
    server = spec.server(adapter, strategy_config, config.seed)
    server.validate(config.silos)  # fail before loading anything

    datasets = build_silo_data(config)
    loaded = load_model(config.model, dtype=config.dtype, seed=config.seed)
    transport = MemoryTransport()
    run_dir = run_dir or _new_run_dir(Path(config.out_dir), config)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))

    agents = []
    for silo, data in zip(ids, datasets, strict=True):
        trainer = LocalTrainer(
            share_backbone(loaded.model), loaded.tokenizer, data, adapter,
            config.training(), seed=config.seed, silo_id=silo,
        )
        trainer.on_step = _step_hook(observer, silo)
        agents.append(
            SiloAgent(silo, spec.client(strategy_config), trainer, transport,
                      out_dir=run_dir / "silos" / silo)
        )
    aggregator = Aggregator(server, transport, ids, agents[0].trainer.shapes(), schedule)

    result = SimulationResult(run_dir=run_dir)
    (run_dir / "assignments").mkdir(exist_ok=True)
    with (run_dir / "metrics.jsonl").open("w") as metrics_file:
        for round in range(config.rounds + 1):
            final = round == config.rounds
            observer.round_started(round, final)
            record = aggregator.publish(round)
            (run_dir / "assignments" / f"round_{round:03d}.json").write_text(
                json.dumps(record.assignment, indent=1)
            )
            for agent in agents:
                observer.silo_started(agent.silo_id, 0 if final else config.local_steps)
                agent.poll()
            aggregator.close(aggregator.collect(record))
            summary = _summarise(record, metric_name(datasets[0].task))
            result.rounds.append(summary)
            metrics_file.write(json.dumps(summary.to_json()) + "\n")
            metrics_file.flush()
            observer.round_finished(summary)
    latest = _latest_metrics(result.rounds)
    result.mtal = mtal([latest]) if latest else math.nan
    result.final_params = server.global_params
    (run_dir / "summary.json").write_text(
        json.dumps({"mtal": result.mtal, "per_silo": latest, "strategy": config.strategy},
                   indent=2)
    )
    return result


def _step_hook(observer: Observer, silo: str) -> Callable[[int, int, float], None]:
    def hook(step: int, total: int, loss: float) -> None:
        observer.train_step(silo, step, total, loss)

    return hook


def _new_run_dir(root: Path, config: SimulationConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = root / f"{stamp}-{config.strategy}-seed{config.seed}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path
