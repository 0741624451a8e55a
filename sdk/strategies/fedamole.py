"""FedAMoLE: AMoLE modules everywhere, per-expert FedAvg, RSEA picks each silo's experts."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from fedsilo.sdk.aggregation.assignment import (
    AssignmentConstraints,
    random_scores,
    solver_version,
)
from fedsilo.sdk.aggregation.fedavg import RunningMean
from fedsilo.sdk.aggregation.rsea import (
    NonFiniteRelevance,
    kept_share,
    selection_diagnostics,
    selection_objective,
)
from fedsilo.sdk.aggregation.solver_pool import SolverPool
from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.checkpoint import (
    namespaced,
    namespaced_groups,
    take_groups,
    take_namespace,
)
from fedsilo.sdk.logs import log_event
from fedsilo.sdk.messages import RoundPlan, Upload
from fedsilo.sdk.params import (
    ModuleShape,
    TensorDict,
    client_embedding_key,
    expert_embedding_key,
    parse_expert_embedding,
    select_for_assignment,
)
from fedsilo.sdk.schema import TensorSpec
from fedsilo.sdk.strategies.averaging import AveragingServer
from fedsilo.sdk.strategies.base import (
    AggregationReport,
    ClientStrategy,
    SiloPlan,
    StrategySpec,
    UploadSchema,
)
from fedsilo.sdk.strategies.config import ClientEmbedding, FedAMoLEConfig
from fedsilo.sdk.strategies.init import initial_params
from fedsilo.sdk.training import LocalTrainer

log = logging.getLogger(__name__)


class FedAMoLEServer(AveragingServer):
    """Per-expert FedAvg (the averaging base) plus the expert embeddings RSEA assigns by."""

    name = "fedamole"

    config: FedAMoLEConfig

    def __init__(self, adapter: AMoLEConfig, config: FedAMoLEConfig, seed: int) -> None:
        super().__init__(adapter, config, seed)
        self.constraints = AssignmentConstraints(
            num_experts=config.num_experts, k_e=adapter.top_k, k_c=config.k_c, b=config.b
        )
        self.relevance = config.relevance_options()
        self._solvers = SolverPool(config.solver_processes)
        # The only randomness after initialize; checkpointed, so a resume draws the same.
        self._rng = np.random.default_rng(seed)
        self.shapes: dict[str, ModuleShape] = {}
        self.silo_ids: list[str] = []
        # module -> bool matrix (silos x experts) of the architecture for the coming round
        self.assignment: dict[str, np.ndarray] = {}
        self.expert_embeddings: dict[tuple[str, int], torch.Tensor] = {}
        self.client_embeddings: dict[str, dict[str, torch.Tensor]] = {}
        self._expert_emb_sum = RunningMean()
        self._aggregated = 0  # rounds closed so far

    def validate(self, num_silos: int) -> None:
        self.constraints.check(num_silos)
        super().validate(num_silos)
        if self.config.k_c < self.config.min_contributors:
            raise ValueError(
                f"strategy.k_c = {self.config.k_c} < min_contributors = "
                f"{self.config.min_contributors}: each domain expert is trained by k_c silos, "
                "so none would ever be updated; raise k_c or lower min_contributors (1: an "
                "expert one silo trained goes to its next holders as that silo trained it)"
            )

    def initialize(self, shapes: Mapping[str, ModuleShape], silo_ids: Sequence[str]) -> None:
        self.validate(len(silo_ids))
        self.shapes = dict(shapes)
        self.silo_ids = list(silo_ids)
        generator = torch.Generator().manual_seed(self.seed)
        self._params = initial_params(
            self.shapes, self.adapter.r, self.config.num_experts, True, generator
        )
        # Round 0: random scores through the same program = a random feasible assignment.
        self.assignment = self._random(len(self.silo_ids))

    def _random(self, num_silos: int) -> dict[str, np.ndarray]:
        return self._solve({m: random_scores(num_silos, self.constraints, self._rng)
                            for m in self.shapes})

    def _solve(self, programs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._solvers.solve(programs, self.constraints, self.config.solver)

    def silo_assignment(self, silo_id: str) -> dict[str, list[int]]:
        return self._row_assignment(self.silo_ids.index(silo_id))

    def _row_assignment(self, row: int) -> dict[str, list[int]]:
        return {m: np.flatnonzero(d[row]).tolist() for m, d in self.assignment.items()}

    def configure_round(
        self, server_round: int, silo_ids: Sequence[str]
    ) -> dict[str, SiloPlan]:
        """Plans for `silo_ids`; if they are not the current participants (a silo joined
        late, or left), the assignment is first recomputed for exactly them."""
        if len(set(silo_ids)) != len(silo_ids):
            raise ValueError(f"silo ids must be unique: {list(silo_ids)}")
        if set(silo_ids) != set(self.silo_ids):
            self._change_members(silo_ids)
        rows = {s: i for i, s in enumerate(self.silo_ids)}  # one lookup per silo, not a scan
        plans = {}
        for silo in silo_ids:
            assignment = self._row_assignment(rows[silo])
            plans[silo] = SiloPlan(assignment, select_for_assignment(self._params, assignment))
        return plans

    def _change_members(self, silo_ids: Sequence[str]) -> None:
        """RSEA over the new set with the embeddings at hand (zeros for a newcomer); a
        random feasible assignment when nothing was aggregated yet or RSEA is off. Raises
        (state unchanged) if the constraints cannot hold for that many silos."""
        members = list(silo_ids)
        self.constraints.check(len(members))
        if self.config.assignment == "rsea" and self._aggregated > 0:
            self.assignment = self._rsea(members)[0]
        else:
            self.assignment = self._random(len(members))
        self.silo_ids = members

    def configure_final(self, silo_ids: Sequence[str]) -> dict[str, SiloPlan]:
        # Each silo keeps the model it trained last: the final plan only says "finished".
        return {silo: SiloPlan({}, {}) for silo in silo_ids}

    def upload_schema(self, silo_id: str, part: SiloPlan, final: bool) -> UploadSchema:
        """The default plus the embeddings RSEA needs: per module the client embedding and
        one expert embedding per assigned expert, each of size r."""
        schema = super().upload_schema(silo_id, part, final)
        if final:
            return schema
        spec = TensorSpec((self.adapter.r,), torch.float32)
        embeddings = {}
        for module, experts in part.assignment.items():
            embeddings[client_embedding_key(module)] = spec
            embeddings.update({expert_embedding_key(module, j): spec for j in experts})
        return UploadSchema(schema.params, embeddings)

    def begin_round(self, server_round: int) -> None:
        super().begin_round(server_round)
        self._expert_emb_sum = RunningMean()

    def fold(self, upload: Upload) -> None:
        super().fold(upload)
        experts: TensorDict = {}
        clients: dict[str, torch.Tensor] = {}
        for key, value in upload.embeddings.items():
            if parse_expert_embedding(key) is not None:
                experts[key] = value
            else:
                clients[key] = value
        self._expert_emb_sum.add(experts)  # eq. 24: uniform over the silos that trained j
        self.client_embeddings[upload.silo_id] = clients

    def end_round(self, server_round: int) -> AggregationReport:
        start = time.perf_counter()
        self._params = self._sum.result(previous=self._params)
        for key, value in self._expert_emb_sum.result().items():
            parsed = parse_expert_embedding(key)
            assert parsed is not None
            self.expert_embeddings[parsed] = value
        mid = time.perf_counter()
        # Over every participant, uploaded or not: a silo that missed the deadline keeps
        # its last client embedding (zeros if it never uploaded).
        previous = self.assignment
        self.assignment, probs = self._next_assignment()
        self._aggregated += 1
        end = time.perf_counter()
        return AggregationReport(
            round=server_round,
            num_uploads=len(self._uploaded),
            seconds=end - start,
            details={"fedavg_s": mid - start, "assignment_s": end - mid,
                     **self._diagnostics(probs, previous)},
        )

    def _next_assignment(self) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
        """The next architecture and, under RSEA, each module's selection probabilities."""
        if self.config.assignment == "static":
            return self.assignment, {}
        if self.config.assignment == "random":
            return self._random(len(self.silo_ids)), {}
        return self._rsea(self.silo_ids)

    def _diagnostics(
        self, probs: Mapping[str, torch.Tensor], previous: Mapping[str, np.ndarray]
    ) -> dict[str, float]:
        """Means over modules: how far P is from uniform, and how much of its architecture
        a silo keeps (a membership change makes the two architectures incomparable)."""
        comparable = [m for m, d in self.assignment.items()
                      if m in previous and previous[m].shape == d.shape]
        if not comparable:
            return {}
        out = {"rsea_kept": float(np.nanmean(
            [kept_share(previous[m], self.assignment[m]) for m in comparable]))}
        stats = [selection_diagnostics(probs[m]) for m in comparable if m in probs]
        if stats:
            out["rsea_spread"] = float(np.mean([st.spread for st in stats]))
            out["rsea_entropy"] = float(np.mean([st.entropy for st in stats]))
        return out

    def _trained(self, module: str, silo_ids: Sequence[str]) -> np.ndarray:
        """The closed round's assignment of `module`, rows in the order of `silo_ids`
        (no experts for a silo that was not a participant)."""
        current = self.assignment.get(module)
        rows = {s: i for i, s in enumerate(self.silo_ids)}
        out = np.zeros((len(silo_ids), self.constraints.num_experts), dtype=bool)
        if current is None:
            return out
        for k, silo in enumerate(silo_ids):
            if silo in rows and rows[silo] < current.shape[0]:
                out[k] = current[rows[silo]]
        return out

    def _rsea(
        self, silo_ids: Sequence[str]
    ) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
        """Every module's program from the embeddings at hand, solved together (in worker
        processes when large). A module whose scores overflowed gets random scores."""
        programs: dict[str, np.ndarray] = {}
        probs: dict[str, torch.Tensor] = {}
        for m in self.shapes:
            try:
                programs[m], probs[m] = self._selection(m, silo_ids)
            except NonFiniteRelevance as exc:
                # Validated embeddings cannot get here; if they still do, the round goes
                # on with a feasible architecture rather than stopping the federation.
                log_event(log, "rsea_fallback", logging.ERROR, module=m, reason=str(exc))
                programs[m] = random_scores(len(silo_ids), self.constraints, self._rng)
        return self._solve(programs), probs

    def _selection(self, module: str, silo_ids: Sequence[str]) -> tuple[np.ndarray, torch.Tensor]:
        r = self.adapter.r
        dim = r if self.adapter.score_scale == "r" else self.shapes[module].in_features
        zeros = torch.zeros(r)
        # A silo that has not uploaded yet has no embedding: zeros make it equally
        # relevant to every expert, so the program still places it feasibly.
        client = torch.stack(
            [
                self.client_embeddings.get(s, {}).get(client_embedding_key(module), zeros)
                for s in silo_ids
            ]
        )
        expert = torch.stack(
            [
                self.expert_embeddings.get((module, j), zeros)
                for j in range(self.constraints.num_experts)
            ]
        )
        return selection_objective(
            client.float(), expert.float(), 1 / math.sqrt(dim), self.relevance,
            trained=self._trained(module, silo_ids),
        )

    def settings(self) -> dict[str, Any]:
        # a resume solves with the same library version, so ties break the same way
        return {**super().settings(), "solver": solver_version(self.config.solver)}

    def state_dict(self) -> tuple[TensorDict, dict[str, Any]]:
        sums, sum_meta = self._sum.state_dict()
        emb_sums, emb_sum_meta = self._expert_emb_sum.state_dict()
        experts = {expert_embedding_key(m, j): v for (m, j), v in self.expert_embeddings.items()}
        matrices = {m: torch.from_numpy(d) for m, d in self.assignment.items()}
        tensors: TensorDict = {
            **namespaced("params", self._params),
            **namespaced("assignment", matrices),
            **namespaced("expert_emb", experts),
            **namespaced("sum", sums),
            **namespaced("expert_emb_sum", emb_sums),
        }
        client_tensors, client_meta = namespaced_groups("client_emb", self.client_embeddings)
        tensors.update(client_tensors)
        meta: dict[str, Any] = {
            "settings": self.settings(),
            "shapes": {m: [s.in_features, s.out_features] for m, s in self.shapes.items()},
            "silo_ids": list(self.silo_ids),
            "params": list(self._params),
            "assignment": list(self.assignment),
            "expert_emb": list(experts),
            "client_emb": client_meta,
            "sum": sum_meta,
            "expert_emb_sum": emb_sum_meta,
            "uploaded": list(self._uploaded),
            "aggregated": self._aggregated,
            "rng": self._rng.bit_generator.state,
        }
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        self.check_resumable(meta)
        self.shapes = {m: ModuleShape(*shape) for m, shape in meta["shapes"].items()}
        self.silo_ids = list(meta["silo_ids"])
        self._params = take_namespace("params", tensors, meta["params"])
        self.assignment = {
            m: d.numpy().astype(bool)
            for m, d in take_namespace("assignment", tensors, meta["assignment"]).items()
        }
        self.expert_embeddings = {}
        for key, value in take_namespace("expert_emb", tensors, meta["expert_emb"]).items():
            parsed = parse_expert_embedding(key)
            assert parsed is not None
            self.expert_embeddings[parsed] = value
        self.client_embeddings = take_groups("client_emb", tensors, meta["client_emb"])
        self.load_sum(tensors, meta["sum"])
        emb_meta = meta["expert_emb_sum"]
        self._expert_emb_sum = RunningMean()
        self._expert_emb_sum.load_state_dict(
            take_namespace("expert_emb_sum", tensors, list(emb_meta["weights"])), emb_meta
        )
        self._uploaded = list(meta["uploaded"])
        self._aggregated = int(meta["aggregated"])
        self._rng.bit_generator.state = meta["rng"]


class FedAMoLEClient(ClientStrategy):
    """Install, train, test the locally trained model (the personalised score), embed."""

    def __init__(self, client_embedding: ClientEmbedding = "trained") -> None:
        self.client_embedding = client_embedding

    def run_round(self, plan: RoundPlan, trainer: LocalTrainer) -> Upload:
        if plan.final:
            # The personalised model is the one trained in the last round: keep it.
            return trainer.empty_upload(plan)
        trainer.install(plan.assignment, plan.params)
        received = trainer.embedding_pass() if self.client_embedding == "received" else None
        train_s = trainer.train(plan.local_steps, plan.lr, plan.round).seconds
        metrics, timings = trainer.test(final=plan.last_training_round)
        return trainer.upload(
            plan,
            params=trainer.extract(),
            embeddings=trainer.embed(client_from=received),
            metrics=metrics,
            timings={"train_s": train_s, **timings},
        )


def _adapter(config: AMoLEConfig) -> AMoLEConfig:
    return replace(config, use_router=True)


SPEC = StrategySpec(
    name="fedamole",
    description="AMoLE experts with data-driven per-silo architectures (RSEA)",
    config=FedAMoLEConfig,
    adapter=_adapter,
    server=FedAMoLEServer,
    client=lambda config: FedAMoLEClient(config.client_embedding),
)
