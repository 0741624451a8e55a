"""The assignment program: feasibility messages, exactness against brute force, every
solver against SCIP (random and near-uniform scores), random assignments, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from fedsilo.sdk.aggregation.assignment import (
    AssignmentConstraints,
    InfeasibleAssignmentError,
    assignment_objective,
    random_assignment,
    solve_assignment,
    solver_version,
)


def softmax_over_silos(scores: np.ndarray) -> np.ndarray:
    """What RSEA's selection probabilities look like: each column sums to 1."""
    e = np.exp(scores - scores.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


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
        p = softmax_over_silos(rng.normal(size=(num_silos, c.num_experts)) * 3)
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
        p = softmax_over_silos(rng.normal(size=(10, 30)) * temperature)
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
    assert solver_version("flow").startswith("flow (ortools 9.")
    assert solver_version("scip").startswith("scip (pyscipopt ")
    assert solver_version("lp").startswith("lp (scipy ")


def test_lp_is_exact_at_scale_where_flow_is_slow() -> None:
    c = AssignmentConstraints(num_experts=64, k_e=2, k_c=8, b=8)
    p = softmax_over_silos(np.random.default_rng(5).normal(size=(200, 64)))
    d_lp, d_scip = solve_assignment(p, c, "lp"), solve_assignment(p, c, "scip")
    assert_feasible(d_lp, c, 200)
    assert assignment_objective(p, d_lp) == pytest.approx(
        assignment_objective(p, d_scip), rel=1e-9
    )


@pytest.mark.parametrize("solver", SOLVERS)
def test_random_assignment_feasible_and_seeded(solver: str) -> None:
    c = AssignmentConstraints(num_experts=30, k_e=2, k_c=2, b=8)
    first = random_assignment(10, c, np.random.default_rng(5), solver)
    again = random_assignment(10, c, np.random.default_rng(5), solver)
    assert_feasible(first, c, 10)
    np.testing.assert_array_equal(first, again)
    others = [random_assignment(10, c, np.random.default_rng(s), solver) for s in range(6, 9)]
    assert any(not np.array_equal(first, o) for o in others)


def test_bad_inputs() -> None:
    c = AssignmentConstraints(num_experts=4, k_e=1, k_c=1, b=4)
    with pytest.raises(ValueError, match="expert columns"):
        solve_assignment(np.ones((2, 3)), c)
    with pytest.raises(ValueError, match="unknown solver"):
        solve_assignment(np.ones((2, 4)), c, "glpk")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        solve_assignment(np.full((2, 4), np.nan), c)
