"""federation.toml: everything the coordinator decides for the whole federation.

Loaded by `fedsilo.sdk.config.load_config`, which names any unknown or ill-typed key; every
key can be overridden by `FEDSILO_<SECTION>__<KEY>` or `--set section.key=value`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from fedsilo.aggregator.schedule import Schedule
from fedsilo.privacy.settings import SecuritySettings
from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.federation import FederationSetup
from fedsilo.sdk.strategies import STRATEGIES, FedAMoLEConfig, StrategyConfig
from fedsilo.sdk.training import TrainingConfig
from fedsilo.sdk.transport.settings import BrokerSettings


@dataclass(frozen=True)
class ScheduleSection:
    rounds: int = 6
    local_steps: int = 30
    lr: float = 3e-3
    lr_decay: float = 0.99

    def __post_init__(self) -> None:
        self.schedule()  # same checks as the engine's

    def schedule(self) -> Schedule:
        return Schedule(self.rounds, self.local_steps, self.lr, self.lr_decay)


@dataclass(frozen=True)
class RoundsSection:
    """When a round closes: every expected silo uploaded, or at the deadline if at least
    `quorum` (a fraction of the round's silos, rounded up) did; otherwise `on_missing`."""

    deadline_s: float = 600.0
    quorum: float = 1.0
    on_missing: Literal["extend", "abort"] = "extend"
    max_extensions: int = 3
    join_timeout_s: float = 0.0
    """How long to wait for `min_silos` before giving up (0: wait as long as it takes)."""
    checkpoint_interval_s: float = 30.0
    """Checkpoint folded uploads (and acknowledge them) at least this often mid-round."""

    def __post_init__(self) -> None:
        if not self.deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0 (got {self.deadline_s})")
        if not 0 < self.quorum <= 1:
            raise ValueError(f"quorum is a fraction of the round's silos in (0, 1] "
                             f"(got {self.quorum})")
        if self.max_extensions < 0 or self.join_timeout_s < 0:
            raise ValueError("max_extensions and join_timeout_s must be >= 0")
        if not self.checkpoint_interval_s > 0:
            raise ValueError("checkpoint_interval_s must be > 0")

    def quorum_count(self, expected: int) -> int:
        return max(1, math.ceil(self.quorum * expected - 1e-9))


@dataclass(frozen=True)
class AdapterSection(AMoLEConfig):
    """`[adapter]`: AMoLEConfig's keys (its defaults and checks), less the two the strategy
    decides (`StrategySpec.adapter`), which are not keys of the section (init=False)."""

    use_router: bool = field(default=True, init=False)
    layer: Literal["amole", "lease"] = field(default="amole", init=False)

    def amole(self) -> AMoLEConfig:
        return AMoLEConfig(**{f.name: getattr(self, f.name) for f in fields(self) if f.init})


@dataclass(frozen=True)
class FederationConfig:
    name: str = "fedsilo"
    seed: int = 0
    silos: tuple[str, ...] = ()
    """The roster: silo ids allowed to join."""
    min_silos: int = 0
    """Start round 0 once this many have joined (0: all of them); later ones join next round."""
    state_dir: Path = Path("state/aggregator")
    model_digest: str = ""
    """SHA-256 of the base model's weights every silo must hold (`fedsilo digest MODEL`
    prints it; `fedsilo provision --model MODEL` writes it). Fixed here by the coordinator,
    never taken from a silo: the aggregator refuses to run without it."""
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    rounds: RoundsSection = field(default_factory=RoundsSection)
    strategy: StrategyConfig = field(default_factory=FedAMoLEConfig)
    """`[strategy]`: `name` picks the strategy, whose config class gives the other keys."""
    adapter: AdapterSection = field(default_factory=AdapterSection)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self) -> None:
        if not self.silos:
            raise ValueError('list the federation\'s silo ids: silos = ["silo-a", "silo-b"]')
        if len(set(self.silos)) != len(self.silos):
            raise ValueError(f"silo ids must be unique (got {list(self.silos)})")
        for silo in self.silos:
            if not silo or not all(c.isalnum() or c in "-_." for c in silo):
                raise ValueError(
                    f"silo id {silo!r} may use only letters, digits, '-', '_' and '.'"
                )
        if not 0 <= self.min_silos <= len(self.silos):
            raise ValueError(
                f"min_silos must be between 1 and the {len(self.silos)} listed silos "
                f"(or 0 for all); got {self.min_silos}"
            )
        if self.model_digest and not _is_sha256(self.model_digest):
            raise ValueError(
                f"model_digest {self.model_digest!r} is not a SHA-256 (64 hex digits); "
                "`fedsilo digest MODEL` prints the right one"
            )
        if self.strategy.name not in STRATEGIES:
            raise ValueError(
                f"strategy.name {self.strategy.name!r} is unknown; use one of "
                + ", ".join(repr(n) for n in STRATEGIES)
            )

    @property
    def start_with(self) -> int:
        return self.min_silos or len(self.silos)

    def setup(self) -> FederationSetup:
        return FederationSetup(
            name=self.name, seed=self.seed, strategy=self.strategy,
            adapter=self.adapter.amole(), training=self.training,
        )


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)
