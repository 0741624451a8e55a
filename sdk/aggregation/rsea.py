"""RSEA: reverse selection expert assignment, per adapted module (ALGORITHM.md, RSEA).

Each expert "chooses" silos: relevance s_ij = h_t[i] . h_e[j] / sqrt(r), softmax over silos
(`selection_objective`), then the 0/1 program of `aggregation.assignment`, solved exactly
(`assign_module`; many modules at once in worker processes: `aggregation.solver_pool`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fedsilo.sdk.aggregation.assignment import (
    AssignmentConstraints,
    InfeasibleAssignmentError,
    Solver,
    assignment_objective,
    random_assignment,
    solve_assignment,
    solver_version,
)
from fedsilo.sdk.aggregation.relevance import RELEVANCE_MODES, Relevance, RelevanceOptions

__all__ = [
    "RELEVANCE_MODES",
    "AssignmentConstraints",
    "InfeasibleAssignmentError",
    "NonFiniteRelevance",
    "Relevance",
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
    "selection_objective",
    "selection_probs",
    "solve_assignment",
    "solver_version",
    "standardise",
    "trainer_profiles",
]



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


def selection_objective(
    client_emb: Tensor,
    expert_emb: Tensor,
    scale: float,
    options: RelevanceOptions | None = None,
    trained: np.ndarray | None = None,
) -> tuple[np.ndarray, Tensor]:
    """One module's program: relevance -> softmax over silos (-> stickiness). Returns what
    the solver maximises (float64 (C, E)) and the selection probabilities P (before
    stickiness). `trained`: the closed round's assignment (for "trainers", "anchor" and
    stickiness). Raises NonFiniteRelevance for scores that overflowed."""
    options = options or RelevanceOptions()
    scores = relevance_scores(client_emb, expert_emb, scale, options.mode, trained)
    probs = selection_probs(scores, options.temperature)
    if not bool(torch.isfinite(probs).all()):
        raise NonFiniteRelevance(
            "RSEA's selection probabilities are not finite (embeddings too large for the "
            "relevance scores); bound the embeddings (security.max_embedding_norm)"
        )
    objective = _as_numpy(probs)
    if options.stickiness > 0 and trained is not None:
        bonus = np.asarray(trained, dtype=np.float64)
        objective = objective + bonus * (options.stickiness / probs.shape[0])
    return objective, probs


def assign_module(
    client_emb: Tensor,
    expert_emb: Tensor,
    c: AssignmentConstraints,
    scale: float,
    solver: Solver = "flow",
    options: RelevanceOptions | None = None,
    trained: np.ndarray | None = None,
) -> tuple[np.ndarray, Tensor]:
    """One module's RSEA: `selection_objective`, then the exact solve. Returns the bool
    assignment (C, E) and the selection probabilities P it maximised (before stickiness)."""
    objective, probs = selection_objective(client_emb, expert_emb, scale, options, trained)
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


