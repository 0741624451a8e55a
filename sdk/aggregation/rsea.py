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

import heapq
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "AssignmentConstraints",
    "InfeasibleAssignmentError",
    "assign_module",
    "assignment_lists",
    "assignment_objective",
    "random_assignment",
    "relevance",
    "selection_probs",
    "solve_assignment",
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


def selection_probs(scores: Tensor) -> Tensor:
    """Softmax over silos (dim 0): each expert distributes its choice over the silos."""
    return torch.softmax(scores, dim=0)


def assignment_objective(probs: Tensor | np.ndarray, assignment: np.ndarray) -> float:
    """<P, D>, the quantity both solvers maximise."""
    return float((_as_numpy(probs) * np.asarray(assignment, dtype=np.float64)).sum())


def solve_assignment(
    probs: Tensor | np.ndarray, c: AssignmentConstraints, solver: Solver = "scip"
) -> np.ndarray:
    """max <P,D> s.t. k_e <= row sums <= b, column sums == k_c, D binary; bool array (C, E).

    'scip' is the reference MILP (silent); 'flow' is an exact min-cost flow with the same
    optimal objective (ties may be broken differently). Checks feasibility first.
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
    num_silos: int, c: AssignmentConstraints, rng: np.random.Generator, solver: Solver = "scip"
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
    solver: Solver = "scip",
) -> np.ndarray:
    """One module's RSEA: relevance -> softmax over silos -> solve; bool array (C, E)."""
    return solve_assignment(selection_probs(relevance(client_emb, expert_emb, scale)), c, solver)


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
    unimodular polytope, hence 0/1 up to rounding, which `_verify` then checks."""
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix, vstack

    num_silos, num_experts = p.shape
    n = num_silos * num_experts  # x[i * E + j] = D_ij
    cols = np.arange(n)
    rows = csr_matrix((np.ones(n), (cols // num_experts, cols)), shape=(num_silos, n))
    experts = csr_matrix((np.ones(n), (cols % num_experts, cols)), shape=(num_experts, n))
    bounds_ub = np.concatenate([np.full(num_silos, float(c.b)), np.full(num_silos, -c.k_e)])
    result = linprog(
        -p.reshape(-1), A_ub=vstack([rows, -rows]).tocsr(), b_ub=bounds_ub,
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


def _solve_flow(p: np.ndarray, c: AssignmentConstraints) -> np.ndarray:
    """Min-cost flow: source -> expert j (cap k_c) -> silo i (cap 1) -> sink.

    Costs are made non-negative so Dijkstra with potentials applies: an edge expert j -> silo i
    costs max(P) - P_ij (every unit crosses exactly one such edge, so the shift is a constant).
    Silo lower bounds: each silo has a sink edge of capacity k_e at cost 0 and one of capacity
    b - k_e at cost M > any total of edge costs; since the flow value is fixed at E*k_c and a
    solution meeting every lower bound exists (`check`), the min-cost flow meets them all.
    Successive shortest paths (Dijkstra with potentials) in plain Python: scipy is not a
    dependency, and E*k_c augmentations on a (C+E+2)-node graph take milliseconds.
    """
    num_silos, num_experts = p.shape
    total = num_experts * c.k_c
    src, sink = 0, 1 + num_experts + num_silos
    silo_node = 1 + num_experts
    # Edges as parallel lists; edge e and e ^ 1 are a pair (forward, residual).
    head: list[list[int]] = [[] for _ in range(sink + 1)]
    to: list[int] = []
    cap: list[int] = []
    cost: list[float] = []

    def add_edge(u: int, v: int, capacity: int, w: float) -> int:
        forward = len(to)
        head[u].append(forward)
        head[v].append(forward + 1)
        to.extend((v, u))
        cap.extend((capacity, 0))
        cost.extend((w, -w))
        return forward

    top = float(p.max())
    big = total * (top - float(p.min())) + 1.0
    for j in range(num_experts):
        add_edge(src, 1 + j, c.k_c, 0.0)
    middle = np.empty((num_silos, num_experts), dtype=np.int64)
    for j in range(num_experts):
        for i in range(num_silos):
            middle[i, j] = add_edge(1 + j, silo_node + i, 1, top - float(p[i, j]))
    cap_b = min(c.b, num_experts)
    for i in range(num_silos):
        add_edge(silo_node + i, sink, c.k_e, 0.0)
        if cap_b > c.k_e:
            add_edge(silo_node + i, sink, cap_b - c.k_e, big)

    potential = [0.0] * (sink + 1)
    flow = 0
    while flow < total:
        dist = [math.inf] * (sink + 1)
        prev_edge = [-1] * (sink + 1)
        dist[src] = 0.0
        heap = [(0.0, src)]
        while heap:
            du, u = heapq.heappop(heap)
            if du > dist[u]:
                continue
            for e in head[u]:
                if cap[e] <= 0:
                    continue
                v = to[e]
                # Reduced costs are >= 0 up to rounding; clamp so Dijkstra stays valid.
                nd = du + max(0.0, cost[e] + potential[u] - potential[v])
                if nd < dist[v] - 1e-15:
                    dist[v] = nd
                    prev_edge[v] = e
                    heapq.heappush(heap, (nd, v))
        if math.isinf(dist[sink]):
            raise InfeasibleAssignmentError("no feasible assignment (flow saturates early)")
        for v in range(sink + 1):
            if not math.isinf(dist[v]):
                potential[v] += dist[v]
        push, v = total - flow, sink
        while v != src:
            e = prev_edge[v]
            push = min(push, cap[e])
            v = to[e ^ 1]
        v = sink
        while v != src:
            e = prev_edge[v]
            cap[e] -= push
            cap[e ^ 1] += push
            v = to[e ^ 1]
        flow += push
    residual = np.array(cap, dtype=np.int64)[middle]
    return residual == 0
