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
from dataclasses import replace
from typing import Any

import torch

from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.checkpoint import namespaced, take_namespace
from fedsilo.sdk.messages import RoundPlan, Upload
from fedsilo.sdk.params import ModuleShape, TensorDict
from fedsilo.sdk.strategies.averaging import AveragingServer
from fedsilo.sdk.strategies.base import (
    AggregationReport,
    ClientStrategy,
    SiloPlan,
    StrategySpec,
)
from fedsilo.sdk.strategies.config import StrategyConfig
from fedsilo.sdk.strategies.init import initial_params
from fedsilo.sdk.training import LocalTrainer


class FedITServer(AveragingServer):
    """FedAvg of one LoRA adapter: the averaging base with a global model to start from."""

    name = "fedit"

    def initialize(self, shapes: Mapping[str, ModuleShape], silo_ids: Sequence[str]) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        self._params = initial_params(shapes, self.adapter.r, 0, False, generator)

    def configure_round(
        self, server_round: int, silo_ids: Sequence[str]
    ) -> dict[str, SiloPlan]:
        # Every silo gets the same global model, so late joiners need nothing special.
        return {silo: SiloPlan({}, self._params) for silo in silo_ids}

    def end_round(self, server_round: int) -> AggregationReport:
        start = time.perf_counter()
        self._params = self._sum.result(previous=self._params)
        return AggregationReport(server_round, len(self._uploaded), time.perf_counter() - start)

    def state_dict(self) -> tuple[TensorDict, dict[str, Any]]:
        sums, sum_meta = self._sum.state_dict()
        tensors = {**namespaced("params", self._params), **namespaced("sum", sums)}
        meta: dict[str, Any] = {
            "settings": self.settings(),
            "params": list(self._params),
            "sum": sum_meta,
            "uploaded": list(self._uploaded),
        }
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        self.check_resumable(meta)
        self._params = take_namespace("params", tensors, meta["params"])
        self.load_sum(tensors, meta["sum"])
        self._uploaded = list(meta["uploaded"])


class FedITFTServer(FedITServer):
    """FedIT whose silos are scored on their own fine-tuned model: the final plan only
    says "finished"."""

    name = "fedit-ft"

    def configure_final(self, silo_ids: Sequence[str]) -> dict[str, SiloPlan]:
        return {silo: SiloPlan({}, {}) for silo in silo_ids}


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
    config=StrategyConfig,
    adapter=plain_lora,
    server=FedITServer,
    client=lambda config: FedITClient(fine_tune=False),
)

FEDIT_FT = StrategySpec(
    name="fedit-ft",
    description="FedIT, scored after local fine-tuning of the global model",
    config=StrategyConfig,
    adapter=plain_lora,
    server=FedITFTServer,
    client=lambda config: FedITClient(fine_tune=True),
)
