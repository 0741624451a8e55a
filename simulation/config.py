"""`fedsilo simulate`'s settings: one flat dataclass, a field per flag.

Torch-free, so the CLI reads its defaults without loading the engine; the methods build
the typed configs the engine needs (each imports what it builds on first use). The strategy
knobs are the strategy config classes' own fields and defaults.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from fedsilo.sdk.strategies.config import (
    SPEED_ONLY,
    FDLoRAConfig,
    FedAMoLEConfig,
    FedLEASEConfig,
    StrategyConfig,
    knob_names,
)

if TYPE_CHECKING:
    from fedsilo.sdk.amole.config import AMoLEConfig
    from fedsilo.sdk.data.recipe import SiloDataRecipe
    from fedsilo.sdk.data.splits import SplitConfig
    from fedsilo.sdk.training import TrainingConfig

#: The strategy configs' fields a simulation sets, each a SimulationConfig field of the same
#: name: every strategy's knobs but `name` (the `strategy` field) and those that only change
#: speed. A strategy reads its own (`SimulationConfig.strategy_config`).
STRATEGY_KNOBS = tuple(dict.fromkeys(
    knob for config_class in (StrategyConfig, FedAMoLEConfig, FedLEASEConfig, FDLoRAConfig)
    for knob in knob_names(config_class) if knob not in SPEED_ONLY
))


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
    # Strategy knobs (`STRATEGY_KNOBS`) with their config classes' defaults, but for the
    # FedAMoLE expert pool, smaller for the tiny built-in model (FedAMoLEConfig: 30, b 8).
    # Every strategy's
    weighting: str = StrategyConfig.weighting
    aggregation: str = StrategyConfig.aggregation
    trim: float = StrategyConfig.trim
    min_contributors: int = StrategyConfig.min_contributors
    # FedAMoLE
    num_experts: int = 8
    k_c: int = FedAMoLEConfig.k_c
    b: int = 6
    assignment: str = FedAMoLEConfig.assignment
    solver: str = FedAMoLEConfig.solver
    relevance: str = FedAMoLEConfig.relevance
    temperature: float = FedAMoLEConfig.temperature
    stickiness: float = FedAMoLEConfig.stickiness
    client_embedding: str = FedAMoLEConfig.client_embedding
    # FedLEASE
    warmup_rounds: int = FedLEASEConfig.warmup_rounds
    max_clusters: int = FedLEASEConfig.max_clusters
    expert_init: str = FedLEASEConfig.expert_init
    # FDLoRA
    sync_every: int = FDLoRAConfig.sync_every
    outer_lr: float = FDLoRAConfig.outer_lr
    outer_momentum: float = FDLoRAConfig.outer_momentum
    fusion_budget: int = FDLoRAConfig.fusion_budget
    fusion_l1: float = FDLoRAConfig.fusion_l1
    fusion_batches: int = FDLoRAConfig.fusion_batches
    # data: None = the embedded synthetic multi-task set; "a,b,c": silo i holds the
    # (i mod 3)-th data set
    data: str | None = None
    data_dir: str | None = None
    partition: str = "dirichlet"
    alpha: float = 1.0
    examples_per_silo: int = 300
    partition_min_size: int = 10
    test_min: int = 1
    test_cap: int | None = None
    val_min: int = 0
    val_cap: int = 200
    emb_cap: int = 200
    eval_limit: int | None = None
    curve_eval_limit: int | None = None
    report_val: bool = False
    max_new_tokens: int = 64
    scoring: str = "nll"
    device: str = "cpu"
    # differential privacy of the embedding uploads: None = off (the paper's setting)
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_clip: float = 1.0
    # output
    out_dir: str = "runs"

    def adapter(self) -> AMoLEConfig:
        from fedsilo.sdk.amole.config import AMoLEConfig
        from fedsilo.sdk.strategies.registry import get_strategy

        base = AMoLEConfig(
            r=self.r, alpha=self.lora_alpha, dropout=self.dropout, top_k=self.top_k,
            target_modules=tuple(self.target_modules), lb_coef=self.lb_coef,
        )
        return get_strategy(self.strategy).adapter(base)

    def strategy_config(self) -> StrategyConfig:
        """The strategy's own config from the flat flags it reads; the class checks the
        values (strings from the command line or config.json) with its own error texts."""
        from fedsilo.sdk.strategies.registry import get_strategy

        config_class = get_strategy(self.strategy).config
        knobs: dict[str, Any] = {key: getattr(self, key) for key in knob_names(config_class)
                                 if key not in SPEED_ONLY}
        return config_class(name=self.strategy, **knobs)

    def unread_knobs(self, names: Collection[str]) -> dict[str, list[str]]:
        """The strategy knobs among `names` that the chosen strategy does not read, each
        with the strategies that do."""
        from fedsilo.sdk.strategies.registry import STRATEGIES, get_strategy

        own = set(knob_names(get_strategy(self.strategy).config))
        return {name: [n for n, spec in STRATEGIES.items() if name in knob_names(spec.config)]
                for name in names if name in STRATEGY_KNOBS and name not in own}

    def training(self) -> TrainingConfig:
        from fedsilo.sdk.training import TrainingConfig

        return TrainingConfig(
            batch_size=self.batch_size, max_length=self.max_length,
            eval_limit=self.eval_limit, max_new_tokens=self.max_new_tokens,
            scoring=self.scoring, curve_eval_limit=self.curve_eval_limit,
            report_val=self.report_val,
        )

    def split(self) -> SplitConfig:
        from fedsilo.sdk.data.splits import SplitConfig

        return SplitConfig(test_min=self.test_min, test_cap=self.test_cap,
                           val_min=self.val_min, val_cap=self.val_cap, emb_cap=self.emb_cap,
                           emb_min=min(SplitConfig.emb_min, self.emb_cap))

    def data_recipe(self, index: int) -> SiloDataRecipe:
        """How silo `index`'s data is cut (as `build_silo_data`), recorded with its adapter."""
        from fedsilo.sdk.data.recipe import SiloDataRecipe

        return SiloDataRecipe(self.data, self.silos, index, self.seed, self.examples_per_silo,
                              partition=self.partition, alpha=self.alpha,
                              data_dir=self.data_dir, split=self.split(),
                              min_size=self.partition_min_size)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
