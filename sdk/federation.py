"""The settings every party of a federation must agree on, as they travel in each plan.

The aggregator is the authority: it reads them from federation.toml and sends them in every
`RoundPlan.setup`, so a silo never trains with a stale local copy. Silos keep only what is
theirs (identity, data, base model, broker address) in silo.toml.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.strategies import FedAMoLEConfig, StrategyConfig, get_strategy
from fedsilo.sdk.strategies.config import config_from_values
from fedsilo.sdk.training import TrainingConfig


@dataclass(frozen=True)
class FederationSetup:
    name: str = "fedsilo"
    seed: int = 0
    strategy: StrategyConfig = field(default_factory=FedAMoLEConfig)
    adapter: AMoLEConfig = field(default_factory=AMoLEConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def resolved_adapter(self) -> AMoLEConfig:
        """The adapter as the strategy needs it (e.g. no router for the FedIT baselines)."""
        return get_strategy(self.strategy.name).adapter(self.adapter)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["adapter"]["target_modules"] = list(self.adapter.target_modules)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FederationSetup:
        """Raises ValueError naming the problem when a plan carries settings we cannot use.
        Other strategies' knobs are dropped (`strategies.config.own_knobs`), so a setup
        saved or sent by an older fedsilo reads as the same setup."""
        try:
            return cls(
                name=str(data["name"]),
                seed=int(data["seed"]),
                strategy=config_from_values(data["strategy"]),
                adapter=AMoLEConfig(**data["adapter"]),
                training=TrainingConfig(**data["training"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"the aggregator sent federation settings this agent cannot read ({exc}); "
                "run the same fedsilo version on the aggregator and every silo"
            ) from None
