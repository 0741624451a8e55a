"""FedIT and FedIT-FT: one LoRA adapter per module, averaged by FedAvg.

FedIT's score is the aggregated global model's, so it is tested on receipt of a plan (the
global of the previous round) and once more on the final, evaluation-only plan. FedIT-FT
tests after fine-tuning that global locally: its local training *is* the fine-tuning
after aggregation, tested before the next aggregation, exactly the point at which
FedAMoLE is tested, so the two are compared on equal terms.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any

import torch

from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.checkpoint import check_settings, namespaced, take_namespace
from fedsilo.sdk.messages import RoundPlan, Upload
from fedsilo.sdk.params import ModuleShape, TensorDict
from fedsilo.sdk.strategies.base import (
    AggregationReport,
    ClientStrategy,
    ServerStrategy,
    SiloPlan,
    StrategyConfig,
    StrategySpec,
)
from fedsilo.sdk.strategies.init import initial_params
from fedsilo.sdk.training import LocalTrainer


class FedITServer(ServerStrategy):
    def __init__(
        self, adapter: AMoLEConfig, config: StrategyConfig, seed: int,
        fine_tune_scored: bool = False,
    ) -> None:
        self.fine_tune_scored = fine_tune_scored  # FedIT-FT silos keep their own model
        self.adapter = adapter
        self.config = config
        self.seed = seed
        self._params: TensorDict = {}
        self._sum = self.config.parameter_mean()
        self._uploaded: list[str] = []  # silos folded into the open round

    @property
    def global_params(self) -> TensorDict:
        return self._params

    def validate(self, num_silos: int) -> None:
        self.config.check_contributors(num_silos)

    def initialize(self, shapes: Mapping[str, ModuleShape], silo_ids: Sequence[str]) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        self._params = initial_params(shapes, self.adapter.r, 0, False, generator)

    def configure_round(self, round: int, silo_ids: Sequence[str]) -> dict[str, SiloPlan]:
        # Every silo gets the same global model, so late joiners need nothing special.
        return {silo: SiloPlan({}, self._params) for silo in silo_ids}

    def configure_final(self, silo_ids: Sequence[str]) -> dict[str, SiloPlan]:
        if self.fine_tune_scored:
            return {silo: SiloPlan({}, {}) for silo in silo_ids}
        return super().configure_final(silo_ids)

    def begin_round(self, round: int) -> None:
        self._sum = self.config.parameter_mean()
        self._uploaded = []

    def accumulate(self, upload: Upload) -> None:
        if upload.silo_id in self._uploaded:
            raise ValueError(
                f"an upload from {upload.silo_id!r} was already folded into this round; "
                "a redelivered message must be acknowledged and ignored, not aggregated twice"
            )
        weight = float(upload.n_samples) if self.config.weighting == "samples" else 1.0
        self._sum.add(upload.params, weight)
        self._uploaded.append(upload.silo_id)

    def end_round(self, round: int) -> AggregationReport:
        start = time.perf_counter()
        self._params = self._sum.result(previous=self._params)
        return AggregationReport(round, len(self._uploaded), time.perf_counter() - start)

    def _settings(self) -> dict[str, Any]:
        return {
            "strategy": "fedit-ft" if self.fine_tune_scored else "fedit",
            "seed": self.seed,
            "config": self.config.settings(),
            "adapter": asdict(self.adapter),
        }

    def state_dict(self) -> tuple[TensorDict, dict[str, Any]]:
        sums, sum_meta = self._sum.state_dict()
        tensors = {**namespaced("params", self._params), **namespaced("sum", sums)}
        meta: dict[str, Any] = {
            "settings": self._settings(),
            "params": list(self._params),
            "sum": sum_meta,
            "uploaded": list(self._uploaded),
        }
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        check_settings(meta, self._settings())
        self._params = take_namespace("params", tensors, meta["params"])
        self._sum = self.config.parameter_mean()
        self._sum.load_state_dict(
            take_namespace("sum", tensors, self._sum.tensor_names(meta["sum"])), meta["sum"]
        )
        self._uploaded = list(meta["uploaded"])


class FedITClient(ClientStrategy):
    def __init__(self, fine_tune: bool) -> None:
        self.fine_tune = fine_tune

    def run_round(self, plan: RoundPlan, trainer: LocalTrainer) -> Upload:
        if plan.final and self.fine_tune:
            return trainer.empty_upload(plan)
        trainer.install(plan.assignment, plan.params)
        # FedIT scores the global model as received; the final plan's score counts.
        metrics, timings = ({}, {}) if self.fine_tune else trainer.test(final=plan.final)
        if plan.final:
            return trainer.upload(plan, metrics=metrics, timings=timings)
        timings["train_s"] = trainer.train(plan.local_steps, plan.lr, plan.round).seconds
        if self.fine_tune:  # the global model fine-tuned locally
            metrics, tested = trainer.test(final=plan.last_training_round)
            timings.update(tested)
        return trainer.upload(plan, params=trainer.extract(), metrics=metrics, timings=timings)


def plain_lora(config: AMoLEConfig) -> AMoLEConfig:
    return replace(config, use_router=False)


FEDIT = StrategySpec(
    name="fedit",
    description="one LoRA adapter, FedAvg; scored with the global model",
    adapter=plain_lora,
    server=FedITServer,
    client=lambda config: FedITClient(fine_tune=False),
)

FEDIT_FT = StrategySpec(
    name="fedit-ft",
    description="FedIT, scored after local fine-tuning of the global model",
    adapter=plain_lora,
    server=lambda adapter, config, seed: FedITServer(adapter, config, seed, True),
    client=lambda config: FedITClient(fine_tune=True),
)
