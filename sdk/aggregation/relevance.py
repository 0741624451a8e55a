"""How an expert scores silos in RSEA: the options, torch-free, so a config can check them
without loading the math (`rsea` computes the scores)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Relevance = Literal["paper", "standardised", "trainers", "anchor"]
RELEVANCE_MODES: tuple[str, ...] = ("paper", "standardised", "trainers", "anchor")


@dataclass(frozen=True)
class RelevanceOptions:
    """How an expert scores the silos (ALGORITHM.md, RSEA, and benchmarks/README.md).

    `mode`: "paper" is eq. 26, h_t[i] . h_e[j] / sqrt(r). It is near-uniform in practice:
    every silo's embedding is dominated by the direction all text shares (mean pairwise
    cosine 0.988 on AG News), so P differs across silos by under 0.1 %. "standardised"
    applies eq. 26 to embeddings standardised per dimension (clients across silos, experts
    across experts), which removes that shared direction. "trainers" scores silo i for
    expert j by the cosine between i's standardised client embedding and the mean of those
    of the silos that trained j in the round just closed: an expert goes to silos whose
    data look like the data it was trained on (it uses only embeddings RSEA receives anyway).
    The mean includes each trainer's own embedding, so the trainers always fit best and an
    expert never leaves them: the assignment freezes where round 0 put it. "anchor" scores
    silo i by the cosine to one trainer of j, its anchor (the first of its trainers in the
    federation's silo order): the expert keeps the anchor and recruits the silos most like
    it, so silos with alike data end up sharing experts.
    `temperature` divides the scores before the softmax over silos.
    `stickiness` (>= 0) adds stickiness / C to P for the silos that trained the expert in
    the round just closed: it stays with them unless another silo fits better by more.
    The defaults are the paper's eq. 26; fedsilo's own defaults are `FedAMoLEConfig`'s.
    """

    mode: Relevance = "paper"
    temperature: float = 1.0
    stickiness: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in RELEVANCE_MODES:
            raise ValueError(
                f"relevance = {self.mode!r} is not known; use one of "
                + ", ".join(repr(m) for m in RELEVANCE_MODES)
            )
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0
                and math.isfinite(self.temperature)):
            raise ValueError(f"temperature = {self.temperature!r}: use a number > 0")
        if not (isinstance(self.stickiness, (int, float)) and self.stickiness >= 0
                and math.isfinite(self.stickiness)):
            raise ValueError(f"stickiness = {self.stickiness!r}: use a number >= 0")
