"""The expert-assignment program of RSEA and its exact solvers (no torch: worker processes
import this module alone).

    max <P, D>  s.t.  k_e <= sum_j D_ij <= b  (every silo i),
                      sum_i D_ij = k_c        (every expert j),  D binary.

Three exact solvers: "flow" (the default: min-cost flow on OR-Tools), "scip" (pyscipopt
MILP, the paper's reference) and "lp" (the LP relaxation with HiGHS, through scipy). The
last two are valid because the constraint matrix is that of a bipartite degree-constrained
subgraph, hence totally unimodular: the LP optimum is integral. All three solve the centred
scores (`_centred`), which leaves the optimum unchanged and lifts near-uniform differences
above the solvers' tolerances. `solver_pool` solves many modules in parallel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "FLOW_COST_SCALE",
    "AssignmentConstraints",
    "InfeasibleAssignmentError",
    "Solver",
    "assignment_objective",
    "random_assignment",
    "random_scores",
    "solve_assignment",
    "solver_version",
]

Solver = Literal["scip", "flow", "lp"]


class InfeasibleAssignmentError(ValueError):
    """The assignment program has no solution for these sizes; the message says what to change."""


@dataclass(frozen=True)
class AssignmentConstraints:
    """Sizes of the assignment program for one module."""

    num_experts: int  # E per module
    k_e: int  # min experts per silo (= routing top-k)
    k_c: int  # silos per expert
    b: int  # max experts per silo

    def check(self, num_silos: int) -> None:
        """Raise InfeasibleAssignmentError explaining which condition fails and what to change.

        The conditions checked (all values >= 1, k_e <= b, k_c <= C, C*k_e <= E*k_c <= C*b) are
        also sufficient: a balanced silo-degree sequence then lies in [k_e, b] and satisfies
        Gale-Ryser, so both solvers always find an assignment.
        """
        c, e, k_e, k_c, b = num_silos, self.num_experts, self.k_e, self.k_c, self.b
        named = (("num_silos (C)", c), ("num_experts (E)", e), ("k_e", k_e), ("k_c", k_c), ("b", b))
        for name, value in named:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise InfeasibleAssignmentError(f"{name} must be an integer, got {value!r}")
            if value < 1:
                raise InfeasibleAssignmentError(f"{name} must be at least 1, got {value}")
        if k_e > b:
            raise InfeasibleAssignmentError(
                f"infeasible expert assignment: k_e <= b fails (k_e = {k_e} > b = {b}): a silo "
                f"holds at least k_e and at most b experts; lower k_e to at most {b} or raise b "
                f"to at least {k_e}"
            )
        if k_c > c:
            raise InfeasibleAssignmentError(
                f"infeasible expert assignment: k_c <= C fails (k_c = {k_c} > C = {c}): an "
                f"expert cannot pick more silos than exist; lower k_c to at most {c} or add silos"
            )
        if c * k_e > e * k_c:
            need_kc = math.ceil(c * k_e / e)
            fixes = [
                f"raise num_experts to at least {math.ceil(c * k_e / k_c)}",
                f"lower k_e to at most {e * k_c // c}" if e * k_c >= c else "",
                f"raise k_c to at least {need_kc}" if need_kc <= c else "",
            ]
            raise InfeasibleAssignmentError(
                f"infeasible expert assignment: C*k_e <= E*k_c fails "
                f"(C*k_e = {c}*{k_e} = {c * k_e} > E*k_c = {e}*{k_c} = {e * k_c}): the silos "
                f"need at least {c * k_e} expert slots but the experts fill only {e * k_c}; "
                + " or ".join(f for f in fixes if f)
            )
        if e * k_c > c * b:
            fixes = [
                f"raise b to at least {math.ceil(e * k_c / c)}",
                f"lower num_experts to at most {c * b // k_c}",
                f"lower k_c to at most {c * b // e}" if c * b >= e else "",
            ]
            raise InfeasibleAssignmentError(
                f"infeasible expert assignment: E*k_c <= C*b fails "
                f"(E*k_c = {e}*{k_c} = {e * k_c} > C*b = {c}*{b} = {c * b}): the experts fill "
                f"{e * k_c} slots but the silos hold at most {c * b}; "
                + " or ".join(f for f in fixes if f)
            )


def assignment_objective(probs: np.ndarray, assignment: np.ndarray) -> float:
    """<P, D>, the quantity every solver maximises."""
    return float((np.asarray(probs, dtype=np.float64)
                  * np.asarray(assignment, dtype=np.float64)).sum())


def solve_assignment(
    probs: np.ndarray, c: AssignmentConstraints, solver: Solver = "flow"
) -> np.ndarray:
    """max <P,D> s.t. k_e <= row sums <= b, column sums == k_c, D binary; bool array (C, E).

    'flow' (the default) is an exact min-cost flow on OR-Tools, 'scip' the paper's MILP
    (the reference), 'lp' the LP relaxation with HiGHS; all reach the same optimal
    objective (ties may be broken differently). Checks feasibility first.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be (C, E), got shape {p.shape}")
    num_silos, num_experts = p.shape
    if num_experts != c.num_experts:
        raise ValueError(
            f"probs has {num_experts} expert columns but num_experts = {c.num_experts}"
        )
    if not np.isfinite(p).all():
        raise ValueError("probs contains NaN or infinite values")
    c.check(num_silos)
    if solver == "scip":
        d = _solve_scip(p, c)
    elif solver == "flow":
        d = _solve_flow(p, c)
    elif solver == "lp":
        d = _solve_lp(p, c)
    else:
        raise ValueError(f"unknown solver {solver!r}; use 'scip', 'flow' or 'lp'")
    _verify(d, c)
    return d


def random_scores(num_silos: int, c: AssignmentConstraints, rng: np.random.Generator) -> np.ndarray:
    """Uniform random scores: through the program, a random feasible assignment (round 0
    and the random-assignment ablation). Checks feasibility first."""
    c.check(num_silos)
    return rng.random((num_silos, c.num_experts))


def random_assignment(
    num_silos: int, c: AssignmentConstraints, rng: np.random.Generator, solver: Solver = "flow"
) -> np.ndarray:
    """A random feasible assignment; same rng state -> same assignment."""
    return solve_assignment(random_scores(num_silos, c, rng), c, solver)


def _verify(d: np.ndarray, c: AssignmentConstraints) -> None:
    """Why: a solver bug must never turn into a silently wrong architecture."""
    rows, cols = d.sum(axis=1), d.sum(axis=0)
    if not ((rows >= c.k_e).all() and (rows <= c.b).all() and (cols == c.k_c).all()):
        raise RuntimeError(f"solver returned an assignment violating the constraints: {d}")


def _solve_scip(p: np.ndarray, c: AssignmentConstraints) -> np.ndarray:
    from pyscipopt import Model, quicksum

    num_silos, num_experts = p.shape
    model = Model("rsea")
    model.hideOutput()
    x = [
        [model.addVar(vtype="B", name=f"d_{i}_{j}") for j in range(num_experts)]
        for i in range(num_silos)
    ]
    for i in range(num_silos):
        model.addCons(quicksum(x[i]) >= c.k_e)
        model.addCons(quicksum(x[i]) <= c.b)
    for j in range(num_experts):
        model.addCons(quicksum(x[i][j] for i in range(num_silos)) == c.k_c)
    model.setObjective(
        quicksum(float(p[i, j]) * x[i][j] for i in range(num_silos) for j in range(num_experts)),
        "maximize",
    )
    model.optimize()
    status = model.getStatus()
    if status == "infeasible":
        raise InfeasibleAssignmentError("SCIP reports the assignment program infeasible")
    if status != "optimal":
        raise RuntimeError(f"SCIP stopped with status {status!r} instead of 'optimal'")
    return np.array(
        [[model.getVal(x[i][j]) > 0.5 for j in range(num_experts)] for i in range(num_silos)],
        dtype=bool,
    )


def _solve_lp(p: np.ndarray, c: AssignmentConstraints) -> np.ndarray:
    """The LP relaxation (0 <= D <= 1) by HiGHS's dual simplex: a vertex of a totally
    unimodular polytope, hence 0/1 up to rounding, which `_verify` then checks. On the
    centred scores, so HiGHS's tolerance (~1e-7) does not swallow near-uniform ones."""
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix, vstack

    num_silos, num_experts = p.shape
    n = num_silos * num_experts  # x[i * E + j] = D_ij
    cols = np.arange(n)
    rows = csr_matrix((np.ones(n), (cols // num_experts, cols)), shape=(num_silos, n))
    experts = csr_matrix((np.ones(n), (cols % num_experts, cols)), shape=(num_experts, n))
    bounds_ub = np.concatenate([np.full(num_silos, float(c.b)), np.full(num_silos, -c.k_e)])
    result = linprog(
        -_centred(p).reshape(-1), A_ub=vstack([rows, -rows]).tocsr(), b_ub=bounds_ub,
        A_eq=experts, b_eq=np.full(num_experts, float(c.k_c)), bounds=(0.0, 1.0),
        method="highs-ds",
    )
    if result.status == 2:
        raise InfeasibleAssignmentError("HiGHS reports the assignment program infeasible")
    if result.status != 0:
        raise RuntimeError(f"HiGHS stopped without an optimum: {result.message}")
    x = result.x.reshape(num_silos, num_experts)
    if np.abs(x - np.round(x)).max() > 1e-6:
        raise RuntimeError("HiGHS returned a fractional vertex; use solver 'scip' or 'flow'")
    return x > 0.5


def _centred(p: np.ndarray) -> np.ndarray:
    """p with each expert's column shifted to start at 0, then scaled to max 1. Every
    feasible D holds exactly k_c silos per column, so a per-column shift moves every
    objective by the same constant and one common scale multiplies them all: the optimum
    is unchanged, while near-uniform scores (differences of 1e-7) now span [0, 1], above
    the solvers' tolerances. (A per-column *scale* would change the optimum.)"""
    shifted = p - p.min(axis=0, keepdims=True)
    top = float(shifted.max())
    return shifted / top if top > 0 else shifted


#: Integer costs for the min-cost flow: the centred scores times this (OR-Tools refuses
#: cost ranges near 2^48; 2^40 keeps a resolution of 1e-12 of the largest difference).
FLOW_COST_SCALE = 2.0**40


def _solve_flow(p: np.ndarray, c: AssignmentConstraints) -> np.ndarray:
    """Exact min-cost flow (OR-Tools' SimpleMinCostFlow): each expert supplies k_c units,
    each silo demands k_e and passes up to b - k_e more to a sink that absorbs the rest;
    an expert -> silo arc (capacity 1) costs the negated centred score in integers. A
    degree-constrained bipartite subgraph is a flow problem, so integral flows are
    optimal: D_ij = flow on arc (j, i)."""
    from ortools.graph.python import min_cost_flow

    num_silos, num_experts = p.shape
    cost = np.rint((1.0 - _centred(p)) * FLOW_COST_SCALE).astype(np.int64)  # >= 0
    sink = num_experts + num_silos
    experts = np.repeat(np.arange(num_experts), num_silos)  # arc (j, i), j-major
    silos = num_experts + np.tile(np.arange(num_silos), num_experts)
    cap_b = min(c.b, num_experts)
    flow = min_cost_flow.SimpleMinCostFlow()
    middle = flow.add_arcs_with_capacity_and_unit_cost(
        experts, silos, np.ones(experts.size, dtype=np.int64), cost.T.reshape(-1))
    flow.add_arcs_with_capacity_and_unit_cost(
        num_experts + np.arange(num_silos), np.full(num_silos, sink),
        np.full(num_silos, cap_b - c.k_e, dtype=np.int64), np.zeros(num_silos, dtype=np.int64))
    supplies = np.concatenate([np.full(num_experts, c.k_c), np.full(num_silos, -c.k_e),
                               [-(num_experts * c.k_c - num_silos * c.k_e)]])
    flow.set_nodes_supplies(np.arange(sink + 1), supplies.astype(np.int64))
    status = flow.solve()
    if status == flow.INFEASIBLE:
        raise InfeasibleAssignmentError("OR-Tools reports the assignment program infeasible")
    if status != flow.OPTIMAL:
        raise RuntimeError(f"OR-Tools min-cost flow stopped with status {status}")
    return flow.flows(middle).reshape(num_experts, num_silos).T > 0


def solver_version(solver: Solver) -> str:
    """The solver and its library version: a resumed aggregator must solve with the same
    one, or tied assignments may come out otherwise (`FedAMoLEServer` checkpoints this)."""
    from importlib.metadata import PackageNotFoundError, version

    package = {"scip": "pyscipopt", "flow": "ortools", "lp": "scipy"}[solver]
    try:
        return f"{solver} ({package} {version(package)})"
    except PackageNotFoundError:
        return f"{solver} ({package} unknown)"


