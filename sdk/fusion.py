"""Gradient-free search for FDLoRA's fusion weights (shared and personal adapter).

Why gradient-free: at test time each silo picks the weights that mix its personal adapter
with the global one by evaluating a few validation batches; a handful of forward passes is
affordable, back-propagating through the fusion is not needed for two or three scalars.
The objective is ``loss(w) + l1 * sum(|w_i|)`` (the L1 term keeps weights small, as in
LoraHub, which FDLoRA follows) over the box ``[lower, upper]^n``.

This module knows nothing about models: the caller passes `loss_fn`, which fuses with the
given weights and returns the validation loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["FusionResult", "FusionSearch", "search_fusion_weights"]

# What nevergrad is told for a non-finite objective: nevergrad warns on inf/nan and clips
# anything >= 5e20 (with a warning); a large finite value steers it away just as well.
_WORST_TOLD = 1.0e20


@dataclass(frozen=True)
class FusionSearch:
    """Settings of the search: evaluation budget, L1 penalty, box and starting point."""

    budget: int = 5
    l1: float = 0.05
    lower: float = -1.5
    upper: float = 1.5
    init: tuple[float, ...] = (0.5, 0.5)

    def __post_init__(self) -> None:
        if not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget < 1:
            raise ValueError(f"fusion budget must be an int >= 1, got {self.budget!r}")
        for name in ("l1", "lower", "upper"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"fusion {name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"fusion {name} must be finite, got {value}")
        if self.l1 < 0:
            raise ValueError(f"fusion l1 must be >= 0, got {self.l1}")
        if not self.lower < self.upper:
            raise ValueError(
                f"fusion bounds need lower < upper, got lower={self.lower}, upper={self.upper}"
            )
        try:
            init = tuple(float(value) for value in self.init)
        except (TypeError, ValueError):
            raise ValueError(
                f"fusion init must be a sequence of numbers, got {self.init!r}"
            ) from None
        if not init:
            raise ValueError("fusion init must hold at least one weight")
        outside = [value for value in init if not self.lower <= value <= self.upper]
        if outside:
            raise ValueError(
                f"fusion init {init} has values outside [{self.lower}, {self.upper}]: {outside}"
            )
        # Frozen, so normalise through object.__setattr__: a list or ints become a float tuple.
        object.__setattr__(self, "init", init)


@dataclass(frozen=True)
class FusionResult:
    """The best point evaluated: its weights, loss (no penalty), objective, and the number of
    `loss_fn` calls spent."""

    weights: tuple[float, ...]
    loss: float  # the objective without the penalty at weights
    objective: float
    evaluations: int


def search_fusion_weights(
    loss_fn: Callable[[tuple[float, ...]], float], search: FusionSearch, seed: int
) -> FusionResult:
    """Minimise ``loss_fn(w) + search.l1 * sum(|w_i|)`` over ``[lower, upper]^n``.

    Optimizer: nevergrad's OnePlusOne, a (1+1) evolution strategy. Why: with a budget of
    about five evaluations there is no room for a population or a surrogate model; (1+1)
    spends every evaluation on one mutation of the best point so far, its only randomness is
    the parametrization's seeded random state (reproducible), and it runs in this thread.
    NGOpt (what LoraHub uses) dispatches on budget and dimension to a sub-optimizer that
    changes between nevergrad releases (1.0.12 picks scipy's COBYLA for budget 5 in 2-D, which
    ignores the seed and emits a scipy warning), so the chosen weights would depend on the
    installed nevergrad version.

    `init` is evaluated first, so the result is never worse than it; the result is the best
    point actually evaluated (ties: the earliest). `loss_fn` is called at most
    `search.budget` times, once per distinct point; a non-finite loss counts as +inf.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    import nevergrad as ng  # here, not at the top: 3-4 s of import every process would pay

    init = np.asarray(search.init, dtype=np.float64)
    parametrization = ng.p.Array(init=init, lower=search.lower, upper=search.upper)
    parametrization.random_state = np.random.RandomState(seed)
    optimizer = ng.optimizers.OnePlusOne(parametrization=parametrization, budget=search.budget)
    optimizer.suggest(init)  # the first ask returns exactly init

    seen: dict[tuple[float, ...], float] = {}
    best: tuple[tuple[float, ...], float, float] | None = None  # weights, loss, objective
    for _ in range(search.budget):
        candidate = optimizer.ask()
        value = np.clip(np.asarray(candidate.value, dtype=np.float64), search.lower, search.upper)
        weights = tuple(float(x) for x in value)
        loss = seen.get(weights)
        if loss is None:
            loss = float(loss_fn(weights))
            if not math.isfinite(loss):
                loss = math.inf
            seen[weights] = loss
        objective = loss + search.l1 * sum(abs(x) for x in weights)
        optimizer.tell(candidate, objective if math.isfinite(objective) else _WORST_TOLD)
        if best is None or objective < best[2]:
            best = (weights, loss, objective)
    assert best is not None  # budget >= 1
    return FusionResult(weights=best[0], loss=best[1], objective=best[2], evaluations=len(seen))
