"""Fusion-weight search: improvement, budget, L1 penalty, reproducibility, bounds, errors."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from fedsilo.sdk.fusion import FusionResult, FusionSearch, search_fusion_weights

TARGET = (1.0, -0.3)


class Counting:
    """A loss function that records every point it is called at."""

    def __init__(self, fn: Callable[[tuple[float, ...]], float]) -> None:
        self.fn = fn
        self.calls: list[tuple[float, ...]] = []

    def __call__(self, weights: tuple[float, ...]) -> float:
        self.calls.append(weights)
        return self.fn(weights)


def quadratic(weights: tuple[float, ...]) -> float:
    return 1.0 + sum((w - c) ** 2 for w, c in zip(weights, TARGET, strict=True))


def penalty(search: FusionSearch, weights: tuple[float, ...]) -> float:
    return search.l1 * sum(abs(w) for w in weights)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_improves_on_init_within_budget(seed: int) -> None:
    search = FusionSearch(budget=20)
    loss_fn = Counting(quadratic)
    result = search_fusion_weights(loss_fn, search, seed)

    assert 1 <= len(loss_fn.calls) <= search.budget
    assert result.evaluations == len(set(loss_fn.calls))
    assert loss_fn.calls[0] == search.init  # init is always evaluated first
    init_objective = quadratic(search.init) + penalty(search, search.init)
    assert result.objective < init_objective
    assert result.weights in loss_fn.calls  # a point actually evaluated
    assert result.loss == quadratic(result.weights)


@pytest.mark.parametrize("budget", [1, 2, 5])
def test_budget_counts_calls(budget: int) -> None:
    search = FusionSearch(budget=budget)
    loss_fn = Counting(quadratic)
    result = search_fusion_weights(loss_fn, search, seed=7)
    assert len(loss_fn.calls) <= budget
    assert result.evaluations == len(loss_fn.calls)
    init_objective = quadratic(search.init) + penalty(search, search.init)
    assert result.objective <= init_objective  # never worse than init
    if budget == 1:
        assert result.weights == search.init


def test_default_budget_is_five() -> None:
    loss_fn = Counting(quadratic)
    search_fusion_weights(loss_fn, FusionSearch(), seed=0)
    assert len(loss_fn.calls) <= 5


def test_l1_penalty_applied() -> None:
    search = FusionSearch(budget=8, l1=0.3, init=(0.5, -1.0, 0.25))
    result = search_fusion_weights(lambda w: 2.0, search, seed=0)
    assert result.loss == 2.0
    assert result.objective == pytest.approx(
        result.loss + 0.3 * sum(abs(w) for w in result.weights)
    )
    # A flat loss: only the penalty differs, so the best point has the smallest L1 norm seen.
    assert sum(abs(w) for w in result.weights) <= sum(abs(w) for w in search.init)


def test_l1_penalty_decides_between_equal_losses() -> None:
    # Loss is flat; with l1 = 0 every point ties and the earliest (init) wins.
    search = FusionSearch(budget=6, l1=0.0)
    result = search_fusion_weights(lambda w: 1.0, search, seed=3)
    assert result.weights == search.init
    assert result.objective == 1.0


def test_reproducible_for_same_seed() -> None:
    search = FusionSearch(budget=10)
    first, second = Counting(quadratic), Counting(quadratic)
    a = search_fusion_weights(first, search, seed=42)
    b = search_fusion_weights(second, search, seed=42)
    assert a == b
    assert first.calls == second.calls
    c = Counting(quadratic)
    search_fusion_weights(c, search, seed=43)
    assert c.calls != first.calls  # the seed does drive the search


def test_result_within_bounds() -> None:
    # The optimum lies far outside the box: the search pushes against the bounds.
    search = FusionSearch(budget=30, l1=0.0, lower=-0.5, upper=0.75, init=(0.0, 0.0))
    loss_fn = Counting(lambda w: (w[0] - 10.0) ** 2 + (w[1] + 10.0) ** 2)
    result = search_fusion_weights(loss_fn, search, seed=0)
    for weights in [*loss_fn.calls, result.weights]:
        assert all(-0.5 <= w <= 0.75 for w in weights)
    assert isinstance(result, FusionResult)
    assert all(isinstance(w, float) for w in result.weights)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_counts_as_inf(bad: float) -> None:
    search = FusionSearch(budget=6)

    def loss_fn(weights: tuple[float, ...]) -> float:
        return bad if weights == search.init else quadratic(weights)

    result = search_fusion_weights(loss_fn, search, seed=0)
    assert result.weights != search.init  # the non-finite init is not chosen
    assert math.isfinite(result.loss) and math.isfinite(result.objective)


def test_all_non_finite_returns_init_with_inf() -> None:
    search = FusionSearch(budget=4)
    result = search_fusion_weights(lambda w: math.nan, search, seed=0)
    assert result.weights == search.init
    assert result.loss == math.inf
    assert result.objective == math.inf


def test_init_is_normalised_to_float_tuple() -> None:
    search = FusionSearch(init=[1, 0])  # type: ignore[arg-type]
    assert search.init == (1.0, 0.0)
    assert all(isinstance(w, float) for w in search.init)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 0}, "budget"),
        ({"budget": 2.5}, "budget"),
        ({"budget": True}, "budget"),
        ({"l1": -0.1}, "l1"),
        ({"l1": math.nan}, "l1"),
        ({"lower": 1.0, "upper": 1.0}, "lower < upper"),
        ({"upper": math.inf}, "upper"),
        ({"init": ()}, "at least one"),
        ({"init": (0.5, 2.0)}, "outside"),
        ({"init": (0.5, math.nan)}, "outside"),
        ({"init": ("a",)}, "numbers"),
    ],
)
def test_search_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FusionSearch(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True])
def test_seed_validation(seed: object) -> None:
    with pytest.raises(ValueError, match="seed"):
        search_fusion_weights(quadratic, FusionSearch(), seed)  # type: ignore[arg-type]
