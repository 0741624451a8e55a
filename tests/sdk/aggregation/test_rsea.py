"""RSEA: feasibility messages, exactness against brute force, flow == SCIP, softmax direction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsilo.sdk.aggregation import (
    AssignmentConstraints,
    InfeasibleAssignmentError,
    assign_module,
    assignment_lists,
    assignment_objective,
    random_assignment,
    relevance,
    selection_probs,
    solve_assignment,
)
from fedsilo.sdk.aggregation.rsea import (
    RelevanceOptions,
    chance_purity,
    co_assignment_purity,
    kept_share,
    relevance_scores,
    selection_diagnostics,
    standardise,
    trainer_profiles,
)

SOLVERS = ["scip", "flow", "lp"]


def assert_feasible(d: np.ndarray, c: AssignmentConstraints, num_silos: int) -> None:
    assert d.dtype == bool
    assert d.shape == (num_silos, c.num_experts)
    rows, cols = d.sum(axis=1), d.sum(axis=0)
    assert (rows >= c.k_e).all() and (rows <= c.b).all(), rows
    assert (cols == c.k_c).all(), cols


def brute_force_best(p: np.ndarray, c: AssignmentConstraints) -> float:
    """max <P, D> over all 2^(C*E) binary matrices."""
    num_silos, num_experts = p.shape
    n = num_silos * num_experts
    codes = np.arange(2**n, dtype=np.int64)
    bits = ((codes[:, None] >> np.arange(n)) & 1).reshape(-1, num_silos, num_experts)
    rows, cols = bits.sum(axis=2), bits.sum(axis=1)
    ok = (rows >= c.k_e).all(1) & (rows <= c.b).all(1) & (cols == c.k_c).all(1)
    assert ok.any()
    return float((bits[ok] * p).sum(axis=(1, 2)).max())


# --- feasibility checks -------------------------------------------------------------------


def test_too_few_expert_slots_message() -> None:
    c = AssignmentConstraints(num_experts=5, k_e=2, k_c=2, b=8)
    with pytest.raises(InfeasibleAssignmentError) as err:
        c.check(10)
    msg = str(err.value)
    assert "C*k_e <= E*k_c fails" in msg
    assert "C*k_e = 10*2 = 20 > E*k_c = 5*2 = 10" in msg
    assert "raise num_experts to at least 10" in msg
    assert "lower k_e to at most 1" in msg
    assert "raise k_c to at least 4" in msg
    assert isinstance(err.value, ValueError)


def test_too_many_expert_slots_message() -> None:
    c = AssignmentConstraints(num_experts=30, k_e=2, k_c=2, b=8)
    with pytest.raises(InfeasibleAssignmentError) as err:
        c.check(2)
    msg = str(err.value)
    assert "E*k_c <= C*b fails" in msg
    assert "E*k_c = 30*2 = 60 > C*b = 2*8 = 16" in msg
    assert "raise b to at least 30" in msg
    assert "lower num_experts to at most 8" in msg


@pytest.mark.parametrize(
    ("c", "num_silos", "fragment"),
    [
        (AssignmentConstraints(30, 2, 3, 8), 2, "k_c <= C fails"),
        (AssignmentConstraints(30, 5, 2, 4), 10, "k_e <= b fails"),
        (AssignmentConstraints(0, 1, 1, 1), 3, "num_experts (E) must be at least 1"),
        (AssignmentConstraints(3, 1, 1, 1), 0, "num_silos (C) must be at least 1"),
        (AssignmentConstraints(3, 0, 1, 1), 3, "k_e must be at least 1"),
    ],
)
def test_other_infeasible_cases(c: AssignmentConstraints, num_silos: int, fragment: str) -> None:
    with pytest.raises(
        InfeasibleAssignmentError, match=fragment.replace("(", r"\(").replace(")", r"\)")
    ):
        c.check(num_silos)


def test_paper_setting_is_feasible_and_solver_checks_first() -> None:
    AssignmentConstraints(30, 2, 2, 8).check(10)
    with pytest.raises(InfeasibleAssignmentError, match="C\\*k_e <= E\\*k_c"):
        solve_assignment(np.ones((10, 5)), AssignmentConstraints(5, 2, 2, 8), "flow")


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


# --- solvers -----------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(
    ("num_silos", "c"),
    [
        (10, AssignmentConstraints(30, 2, 2, 8)),
        (3, AssignmentConstraints(4, 1, 3, 4)),
        (7, AssignmentConstraints(7, 2, 2, 2)),  # every silo exactly 2
        (10, AssignmentConstraints(10, 2, 2, 3)),  # lower bounds bind everywhere
        (5, AssignmentConstraints(12, 1, 1, 12)),
        (6, AssignmentConstraints(3, 1, 2, 1)),  # b < E, each silo exactly one expert
    ],
)
def test_constraints_hold_on_random_instances(
    solver: str, num_silos: int, c: AssignmentConstraints
) -> None:
    rng = np.random.default_rng(num_silos * 100 + c.num_experts)
    for _ in range(3):
        p = selection_probs(torch.tensor(rng.normal(size=(num_silos, c.num_experts)) * 3))
        assert_feasible(solve_assignment(p, c, solver), c, num_silos)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(
    ("num_silos", "c"),
    [
        (3, AssignmentConstraints(3, 1, 1, 1)),
        (3, AssignmentConstraints(3, 1, 2, 3)),
        (3, AssignmentConstraints(3, 2, 2, 2)),
        (3, AssignmentConstraints(4, 1, 1, 2)),
        (2, AssignmentConstraints(5, 1, 1, 4)),
        (4, AssignmentConstraints(3, 1, 2, 2)),
    ],
)
def test_objective_equals_brute_force(
    solver: str, num_silos: int, c: AssignmentConstraints
) -> None:
    rng = np.random.default_rng(7)
    for _ in range(4):
        p = rng.random((num_silos, c.num_experts))
        d = solve_assignment(p, c, solver)
        assert_feasible(d, c, num_silos)
        assert assignment_objective(p, d) == pytest.approx(brute_force_best(p, c), abs=1e-9)


@pytest.mark.parametrize("fast", ["flow", "lp"])
def test_fast_paths_objective_equals_scip_mid_size(fast: str) -> None:
    c = AssignmentConstraints(num_experts=30, k_e=2, k_c=2, b=8)
    rng = np.random.default_rng(2024)
    for temperature in (0.3, 1.0, 5.0):
        scores = torch.tensor(rng.normal(size=(10, 30)) * temperature)
        p = selection_probs(scores)
        d_scip = solve_assignment(p, c, "scip")
        d_fast = solve_assignment(p, c, fast)
        assert_feasible(d_fast, c, 10)
        assert assignment_objective(p, d_fast) == pytest.approx(
            assignment_objective(p, d_scip), abs=1e-9
        )


@pytest.mark.parametrize("fast", ["flow", "lp"])
def test_fast_paths_handle_arbitrary_real_scores(fast: str) -> None:
    c = AssignmentConstraints(num_experts=12, k_e=2, k_c=3, b=6)
    p = np.random.default_rng(3).normal(size=(9, 12)) * 100 - 50
    d_scip, d_fast = solve_assignment(p, c, "scip"), solve_assignment(p, c, fast)
    assert assignment_objective(p, d_fast) == pytest.approx(assignment_objective(p, d_scip))


@pytest.mark.parametrize("solver", ["flow", "lp"])
def test_near_uniform_scores_are_solved_exactly(solver: str) -> None:
    """What aggregated embeddings give: probabilities equal to 1e-7. HiGHS's tolerance was
    larger than those differences (up to 6e-6 below the optimum); centred scores are not
    (the objective is compared exactly, in differences from the uniform value)."""
    c = AssignmentConstraints(num_experts=30, k_e=2, k_c=4, b=8)
    rng = np.random.default_rng(11)
    for _ in range(3):
        p = 1 / 40 + rng.random((40, 30)) * 1e-7
        d_ref = solve_assignment(p, c, "scip")
        d = solve_assignment(p, c, solver)
        assert_feasible(d, c, 40)
        ref = assignment_objective(p - 1 / 40, d_ref)
        assert assignment_objective(p - 1 / 40, d) >= ref - 1e-15


def test_each_solver_names_its_library_version() -> None:
    from fedsilo.sdk.aggregation.rsea import solver_version

    assert solver_version("flow").startswith("flow (ortools 9.")
    assert solver_version("scip").startswith("scip (pyscipopt ")
    assert solver_version("lp").startswith("lp (scipy ")


def test_lp_is_exact_at_scale_where_flow_is_slow() -> None:
    c = AssignmentConstraints(num_experts=64, k_e=2, k_c=8, b=8)
    p = selection_probs(torch.tensor(np.random.default_rng(5).normal(size=(200, 64))))
    d_lp, d_scip = solve_assignment(p, c, "lp"), solve_assignment(p, c, "scip")
    assert_feasible(d_lp, c, 200)
    assert assignment_objective(p, d_lp) == pytest.approx(
        assignment_objective(p, d_scip), rel=1e-9
    )


@pytest.mark.parametrize("solver", SOLVERS)
def test_assign_module_follows_embeddings(solver: str) -> None:
    client = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    expert = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    c = AssignmentConstraints(num_experts=4, k_e=1, k_c=1, b=3)
    d, _ = assign_module(client, expert, c, scale=1 / np.sqrt(2), solver=solver)
    assert assignment_lists(d) == [[0, 2], [1, 3]]


@pytest.mark.parametrize("solver", SOLVERS)
def test_random_assignment_feasible_and_seeded(solver: str) -> None:
    c = AssignmentConstraints(num_experts=30, k_e=2, k_c=2, b=8)
    first = random_assignment(10, c, np.random.default_rng(5), solver)
    again = random_assignment(10, c, np.random.default_rng(5), solver)
    assert_feasible(first, c, 10)
    np.testing.assert_array_equal(first, again)
    others = [random_assignment(10, c, np.random.default_rng(s), solver) for s in range(6, 9)]
    assert any(not np.array_equal(first, o) for o in others)


def test_assignment_lists_sorted_per_silo() -> None:
    d = np.array([[0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 0, 0]], dtype=bool)
    assert assignment_lists(d) == [[1, 2], [0, 3], []]


def test_bad_inputs() -> None:
    c = AssignmentConstraints(num_experts=4, k_e=1, k_c=1, b=4)
    with pytest.raises(ValueError, match="expert columns"):
        solve_assignment(np.ones((2, 3)), c)
    with pytest.raises(ValueError, match="unknown solver"):
        solve_assignment(np.ones((2, 4)), c, "glpk")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        solve_assignment(np.full((2, 4), np.nan), c)


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
