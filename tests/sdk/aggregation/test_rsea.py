"""RSEA: relevance by hand, the softmax direction, relevance modes, one module's
solve, diagnostics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsilo.sdk.aggregation.rsea import (
    AssignmentConstraints,
    RelevanceOptions,
    assign_module,
    assignment_lists,
    chance_purity,
    co_assignment_purity,
    kept_share,
    relevance,
    relevance_scores,
    selection_diagnostics,
    selection_probs,
    standardise,
    trainer_profiles,
)

SOLVERS = ["scip", "flow", "lp"]


# --- relevance and softmax direction -----------------------------------------------------


def test_relevance_by_hand() -> None:
    client = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    expert = torch.tensor([[1.0, 1.0], [3.0, 0.0], [0.0, 1.0]])
    s = relevance(client, expert, scale=0.5)
    torch.testing.assert_close(s, torch.tensor([[0.5, 1.5, 0.0], [1.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="same r"):
        relevance(client, torch.ones(3, 4), 1.0)


def test_softmax_is_over_silos() -> None:
    scores = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    p = selection_probs(scores)
    torch.testing.assert_close(p.sum(dim=0), torch.ones(7))
    assert not torch.allclose(p.sum(dim=1), torch.ones(4))
    torch.testing.assert_close(p[:, 0], torch.softmax(scores[:, 0], dim=0))


@pytest.mark.parametrize("solver", SOLVERS)
def test_assign_module_follows_embeddings(solver: str) -> None:
    client = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    expert = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    c = AssignmentConstraints(num_experts=4, k_e=1, k_c=1, b=3)
    d, _ = assign_module(client, expert, c, scale=1 / np.sqrt(2), solver=solver)
    assert assignment_lists(d) == [[0, 2], [1, 3]]


def test_assignment_lists_sorted_per_silo() -> None:
    d = np.array([[0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 0, 0]], dtype=bool)
    assert assignment_lists(d) == [[1, 2], [0, 3], []]


# -- relevance options and diagnostics ----------------------------------------------------


def test_standardise_removes_the_shared_direction() -> None:
    x = torch.tensor([[10.0, 1.0], [10.0, 2.0], [10.0, 3.0]])
    z = standardise(x)
    assert torch.allclose(z[:, 0], torch.zeros(3))  # a column that does not vary -> 0
    assert torch.allclose(z[:, 1], torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.equal(standardise(x[:1]), torch.zeros(1, 2))  # one row: nothing to compare
    # a zero row (no embedding yet) stays neutral and does not shift the others
    with_missing = standardise(torch.cat([x, torch.zeros(1, 2)]))
    assert torch.allclose(with_missing[:3], z) and torch.equal(with_missing[3], torch.zeros(2))


def test_trainer_profiles_average_the_silos_that_trained_each_expert() -> None:
    client = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    trained = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=bool)
    profiles = trainer_profiles(client, trained)
    assert torch.allclose(profiles, torch.tensor([[0.5, 0.5], [0.5, 1.0], [0.0, 0.0]]))


def test_relevance_modes() -> None:
    client = torch.tensor([[5.0, 1.0], [5.0, -1.0], [5.0, 1.1]])
    expert = torch.tensor([[5.0, 1.0], [5.0, -1.0]])
    paper = relevance_scores(client, expert, 1.0, "paper")
    assert torch.allclose(paper, client @ expert.T)
    std = relevance_scores(client, expert, 1.0, "standardised")
    assert std[0, 0] > std[1, 0] and std[1, 1] > std[0, 1]
    trained = np.array([[1, 0], [0, 1], [0, 0]], dtype=bool)
    cos = relevance_scores(client, expert, 1.0, "trainers", trained)
    assert cos.abs().max() <= 1.0 + 1e-6
    assert cos[2, 0] > 0.9 and cos[2, 1] < -0.9  # silo 2 looks like expert 0's trainer
    with pytest.raises(ValueError, match="needs the assignment"):
        relevance_scores(client, expert, 1.0, "trainers")
    # anchor: expert 0's first trainer is silo 0, expert 1's silo 1; an expert nobody
    # trained scores every silo 0
    three = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=bool)
    anchor = relevance_scores(client, torch.zeros(3, 2), 1.0, "anchor", three)
    assert anchor[0, 0] == pytest.approx(1.0) and anchor[1, 1] == pytest.approx(1.0)
    assert anchor[2, 0] > 0.9 and torch.equal(anchor[:, 2], torch.zeros(3))
    with pytest.raises(ValueError, match="needs the assignment"):
        relevance_scores(client, expert, 1.0, "anchor")


def test_temperature_sharpens_and_stickiness_keeps_trainers() -> None:
    scores = torch.tensor([[1.0], [0.0]])
    assert selection_probs(scores, 0.1)[0, 0] > selection_probs(scores, 1.0)[0, 0]
    c = AssignmentConstraints(num_experts=2, k_e=1, k_c=1, b=1)
    client = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expert = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d, probs = assign_module(client, expert, c, 1.0, solver="flow")
    assert d.tolist() == [[True, False], [False, True]]
    assert torch.allclose(probs.sum(dim=0), torch.ones(2))
    swapped = np.array([[False, True], [True, False]])
    keep = RelevanceOptions(stickiness=2.0)  # 2/C = 1.0 > any gap in P
    d, _ = assign_module(client, expert, c, 1.0, solver="flow", options=keep, trained=swapped)
    assert d.tolist() == swapped.tolist()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("mode", "cosine", "not known"), ("temperature", 0.0, "temperature"),
    ("stickiness", -1.0, "stickiness"),
])
def test_relevance_options_are_checked(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RelevanceOptions(**{field: value})  # type: ignore[arg-type]


def test_diagnostics_kept_purity_and_chance() -> None:
    old = np.array([[1, 1, 0], [0, 1, 1]], dtype=bool)
    new = np.array([[1, 0, 0], [0, 1, 1]], dtype=bool)
    assert kept_share(old, new) == pytest.approx((0.5 + 1.0) / 2)
    assert np.isnan(kept_share(np.zeros((2, 3), bool), new))
    uniform = np.full((2, 3), 0.5)
    stats = selection_diagnostics(uniform)
    assert stats.spread == 0.0 and stats.entropy == pytest.approx(1.0)
    sharp = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    sharp_stats = selection_diagnostics(sharp)
    assert sharp_stats.spread == 1.0 and sharp_stats.entropy == pytest.approx(0.0, abs=1e-9)
    d = np.array([[1, 0], [1, 1], [0, 1]], dtype=bool)  # expert 0: silos 0,1; 1: silos 1,2
    assert co_assignment_purity(d, ["x", "x", "y"]) == 0.5
    assert chance_purity(["x", "x", "y", "y"], 2) == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="groups"):
        co_assignment_purity(d, ["x"])
