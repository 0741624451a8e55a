"""The round schedule the aggregator announces in every plan."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    rounds: int
    local_steps: int
    lr: float
    lr_decay: float = 0.99  # per round, as the paper

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1 (got {self.rounds})")
        if self.local_steps < 0:
            raise ValueError(f"local_steps must be >= 0 (got {self.local_steps})")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0 (got {self.lr})")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1] (got {self.lr_decay})")

    def lr_at(self, server_round: int) -> float:
        return self.lr * self.lr_decay**server_round
