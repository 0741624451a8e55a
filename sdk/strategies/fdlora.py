"""FDLoRA (Qi et al., 2024), the paper's strongest baseline on feature-skewed data.

A shared LoRA is trained by every silo and aggregated by an outer optimizer (SGD, lr 1.0,
momentum 0.5, Nesterov, on the averaged pseudo-gradient); each silo keeps a personal LoRA
that never leaves it and restarts from the shared one every `sync_every` rounds; to
score, a silo fuses the two (w_s * shared + w_p * personal) with weights found by a
gradient-free search on a few validation batches.

Choices where the sources leave room (documented in the README):
- Each round a silo trains the shared LoRA and then its personal LoRA, each for
  `local_steps` steps: twice FedIT's training compute, in FDLoRA's favour.
- Scored like FedIT, with the latest shared LoRA: on receipt of a plan (the previous
  round's aggregate) and once more on the final plan, fused with the personal LoRA as it
  is then. The fusion search counts as test time (as the paper's Table IV).
- DP-SGD, when on, protects the shared LoRA's training only: the personal LoRA is never
  released.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from fedsilo.sdk.adapters.model import stacked_lora
from fedsilo.sdk.aggregation.outer_optimizer import OuterSGD
from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.checkpoint import namespaced, take_namespace
from fedsilo.sdk.fusion import FusionSearch, search_fusion_weights
from fedsilo.sdk.messages import RoundPlan, Upload
from fedsilo.sdk.params import TensorDict
from fedsilo.sdk.strategies.base import (
    AggregationReport,
    ClientStrategy,
    Personalised,
    StrategySpec,
)
from fedsilo.sdk.strategies.config import FDLoRAConfig
from fedsilo.sdk.strategies.fedit import FedITServer, plain_lora
from fedsilo.sdk.training import LocalTrainer, stable_seed


class FDLoRAServer(FedITServer):
    """FedIT's server with the mean replaced by an outer optimizer step towards it."""

    config: FDLoRAConfig

    def __init__(self, adapter: AMoLEConfig, config: FDLoRAConfig, seed: int) -> None:
        super().__init__(adapter, config, seed)
        self.outer = OuterSGD(config.outer_lr, config.outer_momentum,
                              nesterov=config.outer_momentum > 0)

    name = "fdlora"

    def end_round(self, server_round: int) -> AggregationReport:
        start = time.perf_counter()
        if self._uploaded:  # nobody answered: no pseudo-gradient, no step
            average = self._sum.result(previous=self._params)
            self._params = self.outer.step(self._params, average)
        return AggregationReport(server_round, len(self._uploaded), time.perf_counter() - start)

    def state_dict(self) -> tuple[TensorDict, dict[str, Any]]:
        tensors, meta = super().state_dict()
        buffers, outer_meta = self.outer.state_dict()
        return {**tensors, **namespaced("outer", buffers)}, {**meta, "outer": outer_meta}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        outer_meta = meta["outer"]
        self.outer.load_state_dict(
            take_namespace("outer", tensors, list(outer_meta["keys"])), outer_meta
        )


FUSION_KEY = "fusion.weights"  # (w_shared, w_personal) last chosen, in the silo's state


class FDLoRAClient(ClientStrategy):
    def __init__(self, config: FDLoRAConfig) -> None:
        self.config = config
        self.personal: TensorDict = {}  # never uploaded: see state_dict
        self.fusion_weights: tuple[float, ...] = ()

    def run_round(self, plan: RoundPlan, trainer: LocalTrainer) -> Upload:
        trainer.install(plan.assignment, plan.params)  # the shared LoRA, as aggregated
        shared = trainer.extract()
        if not self.personal or (not plan.final and plan.round % self.config.sync_every == 0):
            self.personal = {k: v.clone() for k, v in shared.items()}
        metrics, timings = self._test_fused(plan, trainer, shared)
        if plan.final:
            return trainer.upload(plan, metrics=metrics, timings=timings)
        train_s = trainer.train(plan.local_steps, plan.lr, plan.round).seconds
        trained = trainer.extract()
        trainer.install(plan.assignment, self.personal)
        train_s += trainer.train(plan.local_steps, plan.lr, plan.round, stream="personal",
                                 released=False).seconds
        self.personal = trainer.extract()
        trainer.install(plan.assignment, trained)  # what the silo holds is what it sent
        return trainer.upload(plan, params=trained, metrics=metrics,
                              timings={"train_s": train_s, **timings})

    def _test_fused(
        self, plan: RoundPlan, trainer: LocalTrainer, shared: TensorDict
    ) -> tuple[dict[str, float], dict[str, float]]:
        start = time.perf_counter()
        adapters = [shared, self.personal]

        def loss(weights: tuple[float, ...]) -> float:
            with trainer.fused(adapters, weights):
                return trainer.validation_loss(self.config.fusion_batches)

        search = FusionSearch(budget=self.config.fusion_budget, l1=self.config.fusion_l1)
        seed = stable_seed(trainer.seed, trainer.silo_id, "fusion", plan.round)
        result = search_fusion_weights(loss, search, seed)
        self.fusion_weights = result.weights
        with trainer.fused(adapters, result.weights):
            metrics, timings = trainer.test(final=plan.final)
        timings["test_s"] = time.perf_counter() - start
        metrics["fusion_shared"], metrics["fusion_personal"] = result.weights
        return metrics, timings

    def state_dict(self) -> TensorDict:
        state = dict(self.personal)
        if self.fusion_weights:
            state[FUSION_KEY] = torch.tensor(self.fusion_weights, dtype=torch.float64)
        return state

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.personal = {k: v for k, v in tensors.items() if k != FUSION_KEY}
        weights = tensors.get(FUSION_KEY)
        self.fusion_weights = tuple(weights.tolist()) if weights is not None else ()


def fused_personalised(
    adapter: AMoLEConfig, shared: TensorDict, client_state: TensorDict
) -> Personalised:
    """The model FDLoRA scores, w_s * shared + w_p * personal, as one plain LoRA of rank
    2r and alpha 2*alpha (the same scale s = alpha / r), stacked exactly as the silo's
    `fused_lora` stacks them: it installs and loads (PEFT too) like any LoRA."""
    weights = client_state.get(FUSION_KEY)
    personal = {k: v for k, v in client_state.items() if k != FUSION_KEY}
    if weights is None or not personal:
        raise ValueError(
            "this FDLoRA adapter holds no personal LoRA or fusion weights (client/ tensors): "
            "it was saved before the silo's final evaluation; run the federation to the end"
        )
    fusion = tuple(float(w) for w in weights.tolist())
    modules = [key.removesuffix(".shared.A") for key in shared if key.endswith(".shared.A")]
    tensors: TensorDict = {}
    for module in modules:
        a, b = stacked_lora(module, [shared, personal], fusion)
        tensors[f"{module}.shared.A"], tensors[f"{module}.shared.B"] = a, b
    fused = replace(adapter, r=2 * adapter.r, alpha=2 * adapter.alpha)
    return Personalised(fused, tensors, {"fusion": {
        "weights": {"shared": fusion[0], "personal": fusion[1]}, "rank_each": adapter.r,
        "formula": "w_shared * shared + w_personal * personal, stacked as one LoRA"}})


SPEC = StrategySpec(
    name="fdlora",
    description="shared LoRA with a Nesterov outer optimizer, local personal LoRA, fused",
    config=FDLoRAConfig,
    adapter=plain_lora,
    server=FDLoRAServer,
    client=lambda config: FDLoRAClient(config),
    personalised=fused_personalised,
)
