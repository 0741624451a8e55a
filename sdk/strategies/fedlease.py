"""FedLEASE: warm-up LoRAs, silos clustered by their B matrices, one expert per cluster,
and an adaptive top-M router per cluster (seed 003; ALGORITHM.md, FedLEASE).

Rounds 0..W-1 (warm-up): each silo trains its own LoRA (expert 0) and gets it back the
next round; nothing is averaged. When round W-1 closes the aggregator clusters the silos
by the cosine distance of their B matrices and builds M experts, one per cluster. From
round W on, every silo holds all M experts and its cluster's router, trains its own
expert and the router; both are averaged within the cluster.

Choices where the sources leave room (documented in the README):
- `expert_init = "own"` (the authors' code): a silo's own expert starts from its own
  warm-up adapter in round W; the frozen copies of that expert (what other clusters see)
  and "mean" (the paper) start from the cluster mean.
- A silo that joins after the clustering (or never uploaded a warm-up adapter) joins the
  largest cluster (ties: the lowest id): there is no B matrix to place it by.
- Scored like FedAMoLE: after local training each round; the final plan keeps the model.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from fedsilo.sdk.aggregation.clustering import b_distance_matrix, choose_clusters
from fedsilo.sdk.aggregation.fedavg import RunningMean
from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.checkpoint import (
    namespaced,
    namespaced_groups,
    take_groups,
    take_namespace,
)
from fedsilo.sdk.lease.routing import num_slots
from fedsilo.sdk.messages import RoundPlan, Upload
from fedsilo.sdk.params import ModuleShape, TensorDict, expert_key, gate_key
from fedsilo.sdk.schema import schema_of
from fedsilo.sdk.strategies.averaging import AveragingServer
from fedsilo.sdk.strategies.base import (
    AggregationReport,
    ClientStrategy,
    SiloPlan,
    StrategySpec,
    UploadSchema,
)
from fedsilo.sdk.strategies.config import FedLEASEConfig
from fedsilo.sdk.strategies.init import kaiming_a
from fedsilo.sdk.training import LocalTrainer, stable_seed


def cluster_router_key(cluster: int, module: str) -> str:
    """Where the aggregator keeps cluster `cluster`'s router of `module` (never on the wire:
    a silo receives its cluster's router under `gate_key(module)`)."""
    return f"cluster.{cluster}.{gate_key(module)}"


def rename_expert(tensors: Mapping[str, torch.Tensor], modules: Sequence[str], old: int,
                  new: int) -> TensorDict:
    """Expert `old`'s A/B of every module under expert `new`'s keys."""
    return {
        expert_key(m, new, part): tensors[expert_key(m, old, part)]
        for m in modules for part in ("A", "B")
    }


class FedLEASEServer(AveragingServer):
    """One LoRA per silo in warm-up, then FedAvg (the averaging base) within each cluster."""

    name = "fedlease"

    config: FedLEASEConfig

    def __init__(self, adapter: AMoLEConfig, config: FedLEASEConfig, seed: int) -> None:
        super().__init__(adapter, config, seed)
        self.shapes: dict[str, ModuleShape] = {}
        self.silo_ids: list[str] = []
        self._init: TensorDict = {}  # the warm-up LoRA every silo starts from
        self._warm: dict[str, TensorDict] = {}  # silo -> its latest warm-up LoRA (expert 0)
        # Warm-up LoRAs uploaded in the open round: folded into `_warm` when it closes, so
        # the round's plans (built from `_warm`) stay the same while uploads arrive.
        self._fresh: dict[str, TensorDict] = {}
        # `_params`, after clustering: the experts and the cluster routers
        self.labels: dict[str, int] = {}  # silo -> cluster = its own expert
        self.num_clusters = 0  # 0 until the clustering ran
        self.silhouette: dict[int, float] = {}
        self._own_start: dict[str, TensorDict] = {}  # expert_init="own", first round only
        self._aggregated = 0

    # -- set-up --------------------------------------------------------------------------

    def validate(self, num_silos: int) -> None:
        super().validate(num_silos)
        if self.config.warmup_rounds < 1:
            raise ValueError(
                f"strategy.warmup_rounds = {self.config.warmup_rounds}: FedLEASE clusters the "
                "silos by the LoRAs they trained in warm-up; set at least 1"
            )

    def validate_rounds(self, rounds: int) -> None:
        if self.config.warmup_rounds >= rounds:
            raise ValueError(
                f"strategy.warmup_rounds = {self.config.warmup_rounds} leaves no FedLEASE "
                f"round out of {rounds}: set warmup_rounds below the number of rounds "
                "(the reference setup: 5 warm-up rounds of 25)"
            )

    @property
    def modules(self) -> list[str]:
        return list(self.shapes)

    def initialize(self, shapes: Mapping[str, ModuleShape], silo_ids: Sequence[str]) -> None:
        self.validate(len(silo_ids))
        self.shapes = dict(shapes)
        self.silo_ids = list(silo_ids)
        generator = torch.Generator().manual_seed(self.seed)
        self._init = {}
        for module, shape in self.shapes.items():
            self._init[expert_key(module, 0, "A")] = kaiming_a(
                self.adapter.r, shape.in_features, generator
            )
            self._init[expert_key(module, 0, "B")] = torch.zeros(
                shape.out_features, self.adapter.r
            )

    @property
    def clustered(self) -> bool:
        return self.num_clusters > 0

    @property
    def global_params(self) -> TensorDict:
        if self.clustered:
            return self._params
        return {f"silo.{s}.{k}": v for s, warm in self._warm.items() for k, v in warm.items()}

    # -- plans ---------------------------------------------------------------------------

    def configure_round(
        self, server_round: int, silo_ids: Sequence[str]
    ) -> dict[str, SiloPlan]:
        if len(set(silo_ids)) != len(silo_ids):
            raise ValueError(f"silo ids must be unique: {list(silo_ids)}")
        self.silo_ids = list(silo_ids)
        if not self.clustered:
            warm = {m: [0] for m in self.shapes}
            return {s: SiloPlan(warm, self._warm.get(s, self._init)) for s in silo_ids}
        for silo in silo_ids:
            if silo not in self.labels:
                self.labels[silo] = self._largest_cluster()
        return {silo: self._plan(silo) for silo in silo_ids}

    def _largest_cluster(self) -> int:
        sizes = [0] * self.num_clusters
        for cluster in self.labels.values():
            sizes[cluster] += 1
        return max(range(self.num_clusters), key=lambda c: (sizes[c], -c))

    def _plan(self, silo: str) -> SiloPlan:
        own = self.labels[silo]
        others = [c for c in range(self.num_clusters) if c != own]
        assignment = {m: [own, *others] for m in self.shapes}
        params: TensorDict = {}
        for m in self.shapes:
            for c in range(self.num_clusters):
                for part in ("A", "B"):
                    params[expert_key(m, c, part)] = self._params[expert_key(m, c, part)]
            if self.num_clusters > 1:
                params[gate_key(m)] = self._params[cluster_router_key(own, m)]
        params.update(self._own_start.get(silo, {}))
        return SiloPlan(assignment, params)

    def configure_final(self, silo_ids: Sequence[str]) -> dict[str, SiloPlan]:
        # Each silo keeps the model it trained last (scored after training, as FedAMoLE).
        return {silo: SiloPlan({}, {}) for silo in silo_ids}

    def upload_schema(self, silo_id: str, part: SiloPlan, final: bool) -> UploadSchema:
        """Warm-up: the LoRA it was sent. Then: only its own expert and the router, the
        tensors it trains; the other clusters' experts stay where they are."""
        if final:
            return UploadSchema({}, {})
        if not self.clustered:
            return UploadSchema(schema_of(part.params), {})
        trained = {}
        for module, experts in part.assignment.items():
            trained.update({expert_key(module, experts[0], p): None for p in ("A", "B")})
            if len(experts) > 1:
                trained[gate_key(module)] = None
        return UploadSchema(schema_of({k: part.params[k] for k in trained}), {})

    # -- aggregation ---------------------------------------------------------------------

    def begin_round(self, server_round: int) -> None:
        super().begin_round(server_round)
        self._fresh = {}

    def fold(self, upload: Upload) -> None:
        if not self.clustered:
            self._fresh[upload.silo_id] = {k: v.detach().clone() for k, v in upload.params.items()}
        else:
            cluster = self.labels[upload.silo_id]
            tensors = {
                (cluster_router_key(cluster, k.removesuffix(".router.gate"))
                 if k.endswith(".router.gate") else k): v
                for k, v in upload.params.items()
            }
            self._sum.add(tensors, self.weight(upload))  # experts within their cluster, router too

    def end_round(self, server_round: int) -> AggregationReport:
        start = time.perf_counter()
        details: dict[str, float] = {}
        if self.clustered:
            self._params = self._sum.result(previous=self._params)
            self._own_start = {}
        else:
            self._warm.update(self._fresh)
            self._fresh = {}
            if self._aggregated + 1 == self.config.warmup_rounds:
                details = self._cluster()
        self._aggregated += 1
        return AggregationReport(server_round, len(self._uploaded),
                                 time.perf_counter() - start, details)

    def _cluster(self) -> dict[str, float]:
        """Cluster the participants that sent a warm-up LoRA; build one expert per cluster
        (the cluster mean) and one router per cluster."""
        # Sorted: cluster numbering and router draws must not depend on who joined first.
        members = sorted(s for s in self.silo_ids if s in self._warm)
        if members:
            b = [
                {m: self._warm[s][expert_key(m, 0, "B")] for m in self.shapes} for s in members
            ]
            clustering = choose_clusters(b_distance_matrix(b, self.modules),
                                         self.config.max_clusters)
            labels, self.num_clusters = list(clustering.labels), clustering.num_clusters
            self.silhouette = dict(clustering.scores)
        else:
            labels, self.num_clusters = [], 1
        self.labels = dict(zip(members, labels, strict=True))
        generator = torch.Generator().manual_seed(stable_seed(self.seed, "fedlease-router"))
        params: TensorDict = {}
        for c in range(self.num_clusters):
            group = [self._warm[s] for s in members if self.labels[s] == c]
            if len(group) < self.config.min_contributors:  # not one silo's LoRA verbatim
                group = [self._init]
            mean = RunningMean()
            for warm in group:
                mean.add(warm)
            params.update(rename_expert(mean.result(), self.modules, 0, c))
            if self.num_clusters > 1:
                for m, shape in self.shapes.items():
                    params[cluster_router_key(c, m)] = kaiming_a(
                        num_slots(self.num_clusters), shape.in_features, generator
                    )
        self._params = params
        if self.config.expert_init == "own":
            self._own_start = {
                s: rename_expert(self._warm[s], self.modules, 0, self.labels[s]) for s in members
            }
        self._warm = {}
        for silo in sorted(self.silo_ids):  # participants without a warm-up LoRA
            if silo not in self.labels:
                self.labels[silo] = self._largest_cluster()
        details = {"clusters": float(self.num_clusters)}
        if self.num_clusters in self.silhouette:  # two silos or fewer: nothing was scored
            details["silhouette"] = self.silhouette[self.num_clusters]
        return details

    # -- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> tuple[TensorDict, dict[str, Any]]:
        sums, sum_meta = self._sum.state_dict()
        tensors: TensorDict = {
            **namespaced("init", self._init),
            **namespaced("params", self._params),
            **namespaced("sum", sums),
        }
        groups = {"warm": self._warm, "fresh": self._fresh, "own": self._own_start}
        group_meta = {}
        for name, group in groups.items():
            group_tensors, group_meta[name] = namespaced_groups(name, group)
            tensors.update(group_tensors)
        meta: dict[str, Any] = {
            "settings": self.settings(),
            "shapes": {m: [s.in_features, s.out_features] for m, s in self.shapes.items()},
            "silo_ids": list(self.silo_ids),
            "init": list(self._init),
            "params": list(self._params),
            **group_meta,
            "labels": dict(self.labels),
            "num_clusters": self.num_clusters,
            "silhouette": {str(k): v for k, v in self.silhouette.items()},
            "sum": sum_meta,
            "uploaded": list(self._uploaded),
            "aggregated": self._aggregated,
        }
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        self.check_resumable(meta)
        self.shapes = {m: ModuleShape(*shape) for m, shape in meta["shapes"].items()}
        self.silo_ids = list(meta["silo_ids"])
        self._init = take_namespace("init", tensors, meta["init"])
        self._params = take_namespace("params", tensors, meta["params"])
        self._warm = take_groups("warm", tensors, meta["warm"])
        self._fresh = take_groups("fresh", tensors, meta.get("fresh", []))
        self._own_start = take_groups("own", tensors, meta["own"])
        self.labels = {s: int(c) for s, c in meta["labels"].items()}
        self.num_clusters = int(meta["num_clusters"])
        self.silhouette = {int(k): float(v) for k, v in meta["silhouette"].items()}
        self.load_sum(tensors, meta["sum"])
        self._uploaded = list(meta["uploaded"])
        self._aggregated = int(meta["aggregated"])


class FedLEASEClient(ClientStrategy):
    """Install (all experts, its cluster's router), train its own expert and the router,
    test the trained model, upload what it trained."""

    def run_round(self, plan: RoundPlan, trainer: LocalTrainer) -> Upload:
        if plan.final:
            return trainer.empty_upload(plan)
        trainer.install(plan.assignment, plan.params)
        train_s = trainer.train(plan.local_steps, plan.lr, plan.round).seconds
        metrics, timings = trainer.test(final=plan.last_training_round)
        return trainer.upload(plan, params=trainer.extract(), metrics=metrics,
                              timings={"train_s": train_s, **timings})


def _adapter(config: AMoLEConfig) -> AMoLEConfig:
    return replace(config, layer="lease", use_router=False)


SPEC = StrategySpec(
    name="fedlease",
    description="silos clustered by warm-up LoRAs, an expert per cluster, adaptive top-M router",
    config=FedLEASEConfig,
    adapter=_adapter,
    server=FedLEASEServer,
    client=lambda config: FedLEASEClient(),
)
