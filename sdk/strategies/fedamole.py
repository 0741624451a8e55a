"""FedAMoLE: AMoLE modules everywhere, per-expert FedAvg, RSEA picks each silo's experts."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch

from fedsilo.sdk.aggregation.fedavg import RunningMean
from fedsilo.sdk.aggregation.rsea import (
    AssignmentConstraints,
    assign_module,
    random_assignment,
)
from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.messages import RoundPlan, Upload
from fedsilo.sdk.params import (
    ModuleShape,
    TensorDict,
    client_embedding_key,
    parse_expert_embedding,
    select_for_assignment,
)
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


class FedAMoLEServer(ServerStrategy):
    def __init__(self, adapter: AMoLEConfig, config: StrategyConfig, seed: int) -> None:
        self.adapter = adapter
        self.config = config
        self.seed = seed
        self.constraints = AssignmentConstraints(
            num_experts=config.num_experts, k_e=adapter.top_k, k_c=config.k_c, b=config.b
        )
        self._rng = np.random.default_rng(seed)
        self._params: TensorDict = {}
        self.shapes: dict[str, ModuleShape] = {}
        self.silo_ids: list[str] = []
        # module -> bool matrix (silos x experts) of the architecture for the coming round
        self.assignment: dict[str, np.ndarray] = {}
        self.expert_embeddings: dict[tuple[str, int], torch.Tensor] = {}
        self.client_embeddings: dict[str, dict[str, torch.Tensor]] = {}
        self._sum = RunningMean()
        self._expert_emb_sum = RunningMean()
        self._num_uploads = 0

    @property
    def global_params(self) -> TensorDict:
        return self._params

    def validate(self, num_silos: int) -> None:
        self.constraints.check(num_silos)

    def initialize(self, shapes: Mapping[str, ModuleShape], silo_ids: Sequence[str]) -> None:
        self.validate(len(silo_ids))
        self.shapes = dict(shapes)
        self.silo_ids = list(silo_ids)
        generator = torch.Generator().manual_seed(self.seed)
        self._params = initial_params(
            self.shapes, self.adapter.r, self.config.num_experts, True, generator
        )
        # Round 0: random scores through the same program = a random feasible assignment.
        self.assignment = {m: self._random(len(self.silo_ids)) for m in self.shapes}

    def _random(self, num_silos: int) -> np.ndarray:
        return random_assignment(num_silos, self.constraints, self._rng, solver=self.config.solver)

    def silo_assignment(self, silo_id: str) -> dict[str, list[int]]:
        row = self.silo_ids.index(silo_id)
        return {m: np.flatnonzero(d[row]).tolist() for m, d in self.assignment.items()}

    def configure_round(self, round: int, silo_ids: Sequence[str]) -> dict[str, SiloPlan]:
        plans = {}
        for silo in silo_ids:
            assignment = self.silo_assignment(silo)
            plans[silo] = SiloPlan(assignment, select_for_assignment(self._params, assignment))
        return plans

    def configure_final(self, silo_ids: Sequence[str]) -> dict[str, SiloPlan]:
        # Each silo keeps the model it trained last: the final plan only says "finished".
        return {silo: SiloPlan({}, {}) for silo in silo_ids}

    def begin_round(self, round: int) -> None:
        self._sum = RunningMean()
        self._num_uploads = 0
        self._expert_emb_sum = RunningMean()

    def accumulate(self, upload: Upload) -> None:
        weight = float(upload.n_samples) if self.config.weighting == "samples" else 1.0
        self._sum.add(upload.params, weight)
        self._num_uploads += 1
        experts: TensorDict = {}
        clients: dict[str, torch.Tensor] = {}
        for key, value in upload.embeddings.items():
            if parse_expert_embedding(key) is not None:
                experts[key] = value
            else:
                clients[key] = value
        self._expert_emb_sum.add(experts)  # eq. 24: uniform over the silos that trained j
        self.client_embeddings[upload.silo_id] = clients

    def end_round(self, round: int) -> AggregationReport:
        start = time.perf_counter()
        self._params = self._sum.result(previous=self._params)
        for key, value in self._expert_emb_sum.result().items():
            parsed = parse_expert_embedding(key)
            assert parsed is not None
            self.expert_embeddings[parsed] = value
        mid = time.perf_counter()
        self.assignment = self._next_assignment()
        end = time.perf_counter()
        return AggregationReport(
            round=round,
            num_uploads=self._num_uploads,
            seconds=end - start,
            details={"fedavg_s": mid - start, "assignment_s": end - mid},
        )

    def _next_assignment(self) -> dict[str, np.ndarray]:
        if self.config.assignment == "static":
            return self.assignment
        if self.config.assignment == "random":
            return {m: self._random(len(self.silo_ids)) for m in self.shapes}
        return {m: self._rsea(m) for m in self.shapes}

    def _rsea(self, module: str) -> np.ndarray:
        r = self.adapter.r
        dim = r if self.adapter.score_scale == "r" else self.shapes[module].in_features
        zeros = torch.zeros(r)
        # A silo that has not uploaded yet has no embedding: zeros make it equally
        # relevant to every expert, so the program still places it feasibly.
        client = torch.stack(
            [
                self.client_embeddings.get(s, {}).get(client_embedding_key(module), zeros)
                for s in self.silo_ids
            ]
        )
        expert = torch.stack(
            [
                self.expert_embeddings.get((module, j), zeros)
                for j in range(self.constraints.num_experts)
            ]
        )
        return assign_module(
            client.float(), expert.float(), self.constraints, 1 / math.sqrt(dim),
            solver=self.config.solver,
        )


class FedAMoLEClient(ClientStrategy):
    """Install, train, test the locally trained model (the personalised score), embed."""

    def run_round(self, plan: RoundPlan, trainer: LocalTrainer) -> Upload:
        if plan.final:
            # The personalised model is the one trained in the last round: keep it.
            return trainer.empty_upload(plan)
        trainer.install(plan.assignment, plan.params)
        train_s = trainer.train(plan.local_steps, plan.lr, plan.round).seconds
        metrics, timings = trainer.test()
        return trainer.upload(
            plan,
            params=trainer.extract(),
            embeddings=trainer.embed(),
            metrics=metrics,
            timings={"train_s": train_s, **timings},
        )


def _adapter(config: AMoLEConfig) -> AMoLEConfig:
    return replace(config, use_router=True)


SPEC = StrategySpec(
    name="fedamole",
    description="AMoLE experts with data-driven per-silo architectures (RSEA)",
    adapter=_adapter,
    server=FedAMoLEServer,
    client=lambda config: FedAMoLEClient(),
)
