"""RSEA: reverse selection expert assignment, per adapted module (ALGORITHM.md, RSEA).

Each expert "chooses" silos: relevance s_ij = h_t[i] . h_e[j] / sqrt(r), softmax over silos,
then the 0/1 program

    max <P, D>  s.t.  k_e <= sum_j D_ij <= b  (every silo i),
                      sum_i D_ij = k_c        (every expert j),  D binary.

Three exact solvers: "scip" (pyscipopt MILP, the paper's reference), "flow" (min-cost flow in
plain Python) and "lp" (the LP relaxation with HiGHS, through scipy). The last two are valid
because the constraint matrix is that of a bipartite degree-constrained subgraph, hence
totally unimodular: the LP optimum is integral. "flow" is quickest for small programs, "lp"
for large ones (1000 silos x 256 experts: seconds, where flow takes minutes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "AssignmentConstraints",
    "InfeasibleAssignmentError",
    "RelevanceOptions",
    "SelectionDiagnostics",
    "assign_module",
    "assignment_lists",
    "assignment_objective",
    "chance_purity",
    "co_assignment_purity",
    "kept_share",
    "random_assignment",
    "relevance",
    "relevance_scores",
    "selection_diagnostics",
    "selection_probs",
    "solve_assignment",
    "solver_version",
    "standardise",
    "trainer_profiles",
]

Solver = Literal["scip", "flow", "lp"]
Relevance = Literal["paper", "standardised", "trainers", "anchor"]
RELEVANCE_MODES: tuple[str, ...] = ("paper", "standardised", "trainers", "anchor")


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


def relevance(client_emb: Tensor, expert_emb: Tensor, scale: float) -> Tensor:
    """s_ij = h_t[i] . h_e[j] * scale, shape (C, E); the caller passes scale = 1/sqrt(r).

    Computed in float32 at least, so bf16 embeddings do not distort the ranking.
    """
    if client_emb.ndim != 2 or expert_emb.ndim != 2 or client_emb.shape[1] != expert_emb.shape[1]:
        raise ValueError(
            f"expected client_emb (C, r) and expert_emb (E, r) with the same r, got "
            f"{tuple(client_emb.shape)} and {tuple(expert_emb.shape)}"
        )
    dtype = torch.promote_types(
        torch.promote_types(client_emb.dtype, expert_emb.dtype), torch.float32
    )
    h_t = client_emb.detach().to(dtype)
    h_e = expert_emb.detach().to(device=h_t.device, dtype=dtype)
    return (h_t @ h_e.T) * scale


def selection_probs(scores: Tensor, temperature: float = 1.0) -> Tensor:
    """Softmax over silos (dim 0) of scores / temperature: each expert distributes its
    choice over the silos; a lower temperature makes the choice sharper."""
    return torch.softmax(scores / temperature, dim=0)


class NonFiniteRelevance(ArithmeticError):
    """Scores that overflowed: the module keeps a feasible assignment instead."""


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
    The defaults are the paper's eq. 26; fedsilo's own defaults are `StrategyConfig`'s.
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


def standardise(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Per column: subtract the mean over rows, divide by the standard deviation over rows
    (columns that do not vary become 0). All-zero rows stand for "no embedding" (a silo that
    has not uploaded yet, an expert nobody trained): they are left out of the statistics
    and stay zero, i.e. neutral to every score."""
    x = x.detach().to(torch.promote_types(x.dtype, torch.float32))
    present = x.abs().sum(dim=1) > 0
    out = torch.zeros_like(x)
    if int(present.sum()) < 2:
        return out
    rows = x[present]
    centred = rows - rows.mean(dim=0, keepdim=True)
    out[present] = centred / (centred.std(dim=0, keepdim=True) + eps)
    return out


def trainer_profiles(client_emb: Tensor, trained: np.ndarray) -> Tensor:
    """Per expert, the mean of the rows of `client_emb` (C, r) of the silos that trained it
    (`trained`: bool (C, E)); zeros for an expert nobody trained. Shape (E, r)."""
    d = torch.as_tensor(np.asarray(trained, dtype=np.float64), dtype=client_emb.dtype)
    counts = d.sum(dim=0).clamp(min=1.0)
    return (d.T @ client_emb) / counts[:, None]


def relevance_scores(
    client_emb: Tensor,
    expert_emb: Tensor,
    scale: float,
    mode: Relevance = "paper",
    trained: np.ndarray | None = None,
) -> Tensor:
    """s (C, E) for `mode` (see `RelevanceOptions`); "trainers" and "anchor" need
    `trained`, the assignment of the round just closed (bool (C, E))."""
    if mode == "paper":
        return relevance(client_emb, expert_emb, scale)
    if mode == "standardised":
        return relevance(standardise(client_emb), standardise(expert_emb), scale)
    if mode == "trainers":
        if trained is None:
            raise ValueError("relevance 'trainers' needs the assignment of the closed round")
        z = torch.nn.functional.normalize(standardise(client_emb), dim=1)
        profiles = torch.nn.functional.normalize(trainer_profiles(z, trained), dim=1)
        return z @ profiles.T
    if mode == "anchor":
        if trained is None:
            raise ValueError("relevance 'anchor' needs the assignment of the closed round")
        z = torch.nn.functional.normalize(standardise(client_emb), dim=1)
        d = np.asarray(trained, dtype=bool)
        anchors = torch.as_tensor(d.argmax(axis=0))  # first trainer; 0 for none (masked)
        has_anchor = torch.as_tensor(d.any(axis=0), dtype=z.dtype)
        return (z @ z[anchors].T) * has_anchor
    raise ValueError(f"unknown relevance mode {mode!r}; use one of {RELEVANCE_MODES}")


def assignment_objective(probs: Tensor | np.ndarray, assignment: np.ndarray) -> float:
    """<P, D>, the quantity both solvers maximise."""
    return float((_as_numpy(probs) * np.asarray(assignment, dtype=np.float64)).sum())


def solve_assignment(
    probs: Tensor | np.ndarray, c: AssignmentConstraints, solver: Solver = "flow"
) -> np.ndarray:
    """max <P,D> s.t. k_e <= row sums <= b, column sums == k_c, D binary; bool array (C, E).

    'flow' (the default) is an exact min-cost flow on OR-Tools, 'scip' the paper's MILP
    (the reference), 'lp' the LP relaxation with HiGHS; all reach the same optimal
    objective (ties may be broken differently). Checks feasibility first.
    """
    p = _as_numpy(probs)
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


def random_assignment(
    num_silos: int, c: AssignmentConstraints, rng: np.random.Generator, solver: Solver = "flow"
) -> np.ndarray:
    """A random feasible assignment: uniform random scores through the same program (round 0
    and the random-assignment ablation). Same rng state -> same assignment."""
    c.check(num_silos)
    return solve_assignment(rng.random((num_silos, c.num_experts)), c, solver)


def assign_module(
    client_emb: Tensor,
    expert_emb: Tensor,
    c: AssignmentConstraints,
    scale: float,
    solver: Solver = "flow",
    options: RelevanceOptions | None = None,
    trained: np.ndarray | None = None,
) -> tuple[np.ndarray, Tensor]:
    """One module's RSEA: relevance -> softmax over silos -> solve. Returns the bool
    assignment (C, E) and the selection probabilities P it maximised (before stickiness).
    `trained`: the closed round's assignment (for "trainers" and stickiness)."""
    options = options or RelevanceOptions()
    scores = relevance_scores(client_emb, expert_emb, scale, options.mode, trained)
    probs = selection_probs(scores, options.temperature)
    if not bool(torch.isfinite(probs).all()):
        raise NonFiniteRelevance(
            "RSEA's selection probabilities are not finite (embeddings too large for the "
            "relevance scores); bound the embeddings (security.max_embedding_norm)"
        )
    objective = probs
    if options.stickiness > 0 and trained is not None:
        bonus = torch.as_tensor(np.asarray(trained, dtype=np.float64), dtype=probs.dtype)
        objective = probs + bonus * (options.stickiness / probs.shape[0])
    return solve_assignment(objective, c, solver), probs


@dataclass(frozen=True)
class SelectionDiagnostics:
    """How far one module's selection probabilities are from uniform, over experts."""

    spread: float  # mean over experts of max_i P_ij - min_i P_ij (0: uniform)
    entropy: float  # mean over experts of H(P_:j) / log C (1: uniform)


def selection_diagnostics(probs: Tensor | np.ndarray) -> SelectionDiagnostics:
    p = _as_numpy(probs)
    num_silos = p.shape[0]
    spread = float((p.max(axis=0) - p.min(axis=0)).mean())
    if num_silos > 1:
        logs = np.log(np.clip(p, 1e-300, None))
        entropy = float((-(p * logs).sum(axis=0) / math.log(num_silos)).mean())
    else:
        entropy = 0.0
    return SelectionDiagnostics(spread, entropy)


def kept_share(previous: np.ndarray, current: np.ndarray) -> float:
    """Mean over silos (that held an expert) of |old & new| / |old|: what a silo keeps of
    its architecture (RSEA that follows no data keeps what random re-drawing keeps)."""
    old, new = np.asarray(previous, dtype=bool), np.asarray(current, dtype=bool)
    held = old.sum(axis=1)
    rows = held > 0
    if not rows.any():
        return math.nan
    return float(((old & new).sum(axis=1)[rows] / held[rows]).mean())


def co_assignment_purity(assignment: np.ndarray, groups: Sequence[str]) -> float:
    """Share of experts all of whose silos hold the same data set (`groups[i]`: silo i's)."""
    d = np.asarray(assignment, dtype=bool)
    if d.shape[0] != len(groups):
        raise ValueError(f"{d.shape[0]} silos in the assignment but {len(groups)} groups")
    pure = [len({groups[i] for i in np.flatnonzero(d[:, j])}) == 1 for j in range(d.shape[1])]
    return float(np.mean(pure)) if pure else math.nan


def chance_purity(groups: Sequence[str], k_c: int) -> float:
    """`co_assignment_purity` expected when each expert's k_c silos are a uniform random
    set: sum over data sets of C(n_g, k_c) / C(C, k_c)."""
    total = math.comb(len(groups), k_c)
    counts = [list(groups).count(g) for g in set(groups)]
    return sum(math.comb(n, k_c) for n in counts) / total if total else math.nan


def assignment_lists(d: np.ndarray) -> list[list[int]]:
    """Per silo, the sorted expert ids assigned to it."""
    d = np.asarray(d)
    if d.ndim != 2:
        raise ValueError(f"assignment must be (C, E), got shape {d.shape}")
    return [np.flatnonzero(row).tolist() for row in d]


def _as_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


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


