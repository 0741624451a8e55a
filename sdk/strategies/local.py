"""Local-only: each silo fine-tunes alone and nothing is aggregated: the baseline every
federated method must beat for collaboration to be worth it.

The aggregator only hands out the initial LoRA (to silos that have not uploaded yet) and
collects scores; uploads carry no tensors, so nothing trained leaves a silo. A silo keeps
its model between rounds (the agent's checkpoint holds it across restarts). Scored after
local training each round, like FedAMoLE and FedIT-FT.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.checkpoint import namespaced, take_namespace
from fedsilo.sdk.messages import RoundPlan, Upload
from fedsilo.sdk.params import TensorDict
from fedsilo.sdk.strategies.base import (
    AggregationReport,
    ClientStrategy,
    SiloPlan,
    StrategySpec,
    UploadSchema,
)
from fedsilo.sdk.strategies.config import StrategyConfig
from fedsilo.sdk.strategies.fedit import FedITServer, plain_lora
from fedsilo.sdk.training import LocalTrainer


class LocalServer(FedITServer):
    """FedIT's server with nothing aggregated: it hands out the initial LoRA once."""

    name = "local"

    def __init__(self, adapter: AMoLEConfig, config: StrategyConfig, seed: int) -> None:
        super().__init__(adapter, config, seed)
        self.started: set[str] = set()  # silos that trained from the init at least once

    @property
    def global_params(self) -> TensorDict:
        return {}  # there is no global model; `_params` holds the initial LoRA

    def validate(self, num_silos: int) -> None:
        """Nothing is aggregated, so any number of silos works."""

    def configure_round(
        self, server_round: int, silo_ids: Sequence[str]
    ) -> dict[str, SiloPlan]:
        return {s: SiloPlan({}, {} if s in self.started else self._params) for s in silo_ids}

    def configure_final(self, silo_ids: Sequence[str]) -> dict[str, SiloPlan]:
        return {s: SiloPlan({}, {}) for s in silo_ids}

    def upload_schema(self, silo_id: str, part: SiloPlan, final: bool) -> UploadSchema:
        return UploadSchema({}, {})  # scores only

    def fold(self, upload: Upload) -> None:
        """Scores only: nothing to add."""

    def end_round(self, server_round: int) -> AggregationReport:
        start = time.perf_counter()
        self.started.update(self._uploaded)
        return AggregationReport(server_round, len(self._uploaded), time.perf_counter() - start)

    def state_dict(self) -> tuple[TensorDict, dict[str, Any]]:
        meta = {"settings": self.settings(), "init": list(self._params),
                "started": sorted(self.started), "uploaded": list(self._uploaded)}
        return namespaced("init", self._params), meta

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        self.check_resumable(meta)
        self._params = take_namespace("init", tensors, meta["init"])
        self.started = set(meta["started"])
        self._uploaded = list(meta["uploaded"])


class LocalClient(ClientStrategy):
    def run_round(self, plan: RoundPlan, trainer: LocalTrainer) -> Upload:
        if plan.final:
            return trainer.empty_upload(plan)
        if plan.params:  # the initial LoRA; afterwards the silo keeps its own
            trainer.install(plan.assignment, plan.params)
        train_s = trainer.train(plan.local_steps, plan.lr, plan.round).seconds
        metrics, timings = trainer.test(final=plan.last_training_round)
        return trainer.upload(plan, metrics=metrics, timings={"train_s": train_s, **timings})


SPEC = StrategySpec(
    name="local",
    description="each silo alone, nothing aggregated (the no-collaboration baseline)",
    config=StrategyConfig,
    adapter=plain_lora,
    server=LocalServer,
    client=lambda config: LocalClient(),
)
