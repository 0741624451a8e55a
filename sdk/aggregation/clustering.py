"""FedLEASE silo clustering: B-matrix distances, average linkage, silhouette model selection.

Why: FedLEASE gives each group of similar silos its own LoRA expert. After warm-up, the
aggregator clusters silos by their LoRA B matrices: distance(i, k) is the mean over adapted
modules of 1 - cos(vec B_i, vec B_k) (q_proj and v_proj are separate entries, so with both in
every layer this is the mean over layers of the q/v average); silos are merged by agglomerative
clustering with average linkage on those precomputed distances, for M = 2..max_clusters, and M
is picked by the best silhouette score.

Pure math, no global state. Average linkage is written here in numpy rather than taken from
scipy, because scipy is not a declared dependency (see `rsea`), C (the number of silos) is
small, and owning the merge loop pins down tie-breaking: on equal distances the pair with the
smallest member indices merges first, so the result never depends on a library's internals.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "Clustering",
    "average_linkage_labels",
    "b_distance_matrix",
    "choose_clusters",
    "silhouette_score",
]

# Tolerance for accepting a caller's distance matrix as symmetric with a zero diagonal and no
# negatives (relative to its largest entry): distances computed in float64 elsewhere may carry
# rounding, which is cleaned up rather than rejected.
_TOL = 1e-9


def _flat_b(b: torch.Tensor) -> np.ndarray:
    """One silo's B for one module as a float64 vector (any dtype or device in)."""
    return b.detach().to(device="cpu", dtype=torch.float64).reshape(-1).numpy()


def b_distance_matrix(
    adapters: Sequence[Mapping[str, torch.Tensor]], modules: Sequence[str]
) -> np.ndarray:
    """(C, C) FedLEASE distances between silos: mean over `modules` of 1 - cos(vec B_i, vec B_k).

    `adapters[i]` maps a module's dotted name (e.g. "model.layers.0.self_attn.q_proj") to silo
    i's LoRA B (d_out x r) for it; keys not in `modules` are ignored. Each module is its own
    entry of the mean, so passing every layer's q_proj and v_proj gives the mean over layers of
    the q/v average. Why cosine of B: B carries what warm-up learned (A starts random), and the
    angle ignores how far each silo moved, only where.

    Zero B (norm 0, e.g. a silo whose warm-up never updated B): cos with a zero vector is 0
    (distance 1) and cos of two zero vectors is 1 (distance 0), so no NaN reaches the
    clustering. Computed in float64; the result is exactly symmetric with a zero diagonal, and
    rounding below zero is clipped. Entries lie in [0, 2].

    Raises ValueError when there are no adapters or modules, a module is listed twice, an
    adapter lacks a module, shapes differ between silos, or a B holds NaN or inf.
    """
    num_silos = len(adapters)
    if num_silos == 0:
        raise ValueError("b_distance_matrix needs at least one adapter (one per silo), got none")
    if isinstance(modules, str):
        raise ValueError(f"modules must be a sequence of module names, not one string {modules!r}")
    if len(modules) == 0:
        raise ValueError("b_distance_matrix needs at least one module name, got none")
    duplicates = sorted(m for m, n in Counter(modules).items() if n > 1)
    if duplicates:
        raise ValueError(
            f"modules lists {duplicates} more than once; each module must appear once, "
            "or it would weigh more in the mean"
        )
    total = np.zeros((num_silos, num_silos), dtype=np.float64)
    for module in modules:
        rows = []
        shape0: tuple[int, ...] | None = None
        for i, adapter in enumerate(adapters):
            if module not in adapter:
                raise ValueError(f"adapter {i} has no LoRA B for module {module!r}")
            b = adapter[module]
            shape = tuple(b.shape)
            if shape0 is None:
                shape0 = shape
            elif shape != shape0:
                raise ValueError(
                    f"LoRA B for module {module!r} has shape {shape} in adapter {i} but "
                    f"{shape0} in adapter 0; all silos must share one LoRA shape"
                )
            rows.append(_flat_b(b))
        x = np.stack(rows)
        if not np.isfinite(x).all():
            bad = [i for i in range(num_silos) if not np.isfinite(x[i]).all()]
            raise ValueError(f"LoRA B for module {module!r} holds NaN or inf in adapters {bad}")
        # Scale each row by its largest |entry| before the norm so float64 inputs far from 1
        # neither overflow nor underflow; the direction is unchanged.
        scale = np.abs(x).max(axis=1, initial=0.0)
        zero = scale == 0.0
        u = np.zeros_like(x)
        u[~zero] = x[~zero] / scale[~zero, None]
        u[~zero] /= np.linalg.norm(u[~zero], axis=1)[:, None]
        cos = np.clip(u @ u.T, -1.0, 1.0)
        cos[np.ix_(zero, zero)] = 1.0  # two zero vectors point "the same way"
        total += 1.0 - cos
    d = total / len(modules)
    d = (d + d.T) / 2.0
    np.clip(d, 0.0, None, out=d)
    np.fill_diagonal(d, 0.0)
    return d


def _check_distances(distances: np.ndarray) -> np.ndarray:
    """Validate a precomputed distance matrix; return a cleaned float64 copy.

    Cleaned: exactly symmetric, zero diagonal, no negatives. Rounding within a relative
    tolerance is repaired; anything larger is a caller's bug and raises ValueError.
    """
    d = np.array(distances, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"distances must be a square (C, C) matrix, got shape {d.shape}")
    if d.shape[0] == 0:
        raise ValueError("distances is empty: need at least one silo")
    if not np.isfinite(d).all():
        raise ValueError("distances holds NaN or inf")
    tol = _TOL * max(1.0, float(np.abs(d).max()))
    if not np.allclose(d, d.T, rtol=0.0, atol=tol):
        raise ValueError("distances must be symmetric")
    if np.abs(np.diag(d)).max() > tol:
        raise ValueError("distances must have a zero diagonal")
    if d.min() < -tol:
        raise ValueError("distances must be non-negative")
    d = (d + d.T) / 2.0
    np.clip(d, 0.0, None, out=d)
    np.fill_diagonal(d, 0.0)
    return d


def _average_linkage_merges(d: np.ndarray, num_merges: int) -> list[tuple[int, int]]:
    """The first `num_merges` merges of average-linkage (UPGMA) clustering on checked `d`.

    A cluster is named by its smallest member; each merge (a, b), a < b, folds cluster b into
    cluster a. The pair at the smallest average distance merges first; ties go to the
    lexicographically smallest (a, b). The cluster-to-cluster distance is updated with the
    Lance-Williams rule for average linkage, (n_a d(a, c) + n_b d(b, c)) / (n_a + n_b), which
    equals the mean of all member-to-member distances.
    """
    n = d.shape[0]
    cd = d.copy()
    sizes = np.ones(n, dtype=np.float64)
    active = np.ones(n, dtype=bool)
    merges: list[tuple[int, int]] = []
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    for _ in range(num_merges):
        candidates = upper & active[:, None] & active[None, :]
        masked = np.where(candidates, cd, np.inf)
        a, b = divmod(int(np.argmin(masked)), n)  # row-major: first of the ties is smallest
        merged = (sizes[a] * cd[a] + sizes[b] * cd[b]) / (sizes[a] + sizes[b])
        cd[a, :] = merged
        cd[:, a] = merged
        cd[a, a] = 0.0
        sizes[a] += sizes[b]
        active[b] = False
        merges.append((a, b))
    return merges


def _labels_from_merges(num_silos: int, merges: Sequence[tuple[int, int]]) -> np.ndarray:
    """Labels after applying `merges`, numbered by each cluster's smallest member."""
    root = np.arange(num_silos)
    for a, b in merges:
        root[root == b] = a
    labels = np.empty(num_silos, dtype=np.int64)
    seen: dict[int, int] = {}
    for i in range(num_silos):
        labels[i] = seen.setdefault(int(root[i]), len(seen))
    return labels


def average_linkage_labels(distances: np.ndarray, num_clusters: int) -> np.ndarray:
    """Agglomerative clustering with average linkage, cut into exactly `num_clusters` clusters.

    Why average linkage on precomputed distances: FedLEASE's distances are cosine-based, not
    Euclidean, so centroid-based methods do not apply; average linkage uses only the matrix.
    Cutting by merge count (not by a height threshold) returns exactly `num_clusters` clusters
    even when merge heights tie.

    Labels are ints 0..num_clusters-1 numbered in order of each cluster's smallest member
    index, so the labelling is deterministic and silo 0 is always in cluster 0. Raises
    ValueError unless 1 <= num_clusters <= C or when `distances` is not a valid matrix.
    """
    d = _check_distances(distances)
    num_silos = d.shape[0]
    if not 1 <= num_clusters <= num_silos:
        raise ValueError(
            f"num_clusters must be between 1 and the number of silos ({num_silos}), "
            f"got {num_clusters}"
        )
    merges = _average_linkage_merges(d, num_silos - num_clusters)
    return _labels_from_merges(num_silos, merges)


def silhouette_score(distances: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette over all points, from a precomputed distance matrix.

    For point i: a = mean distance to the other members of its cluster, b = the smallest, over
    the other clusters, of the mean distance to that cluster's members; s = (b - a) / max(a, b).
    A point alone in its cluster scores 0, and so does a point with a = b = 0 (as
    scikit-learn does). Why silhouette: it compares cohesion with separation without needing
    a Euclidean embedding, so FedLEASE can rank candidate M on the cosine distances alone.

    Raises ValueError unless `labels` has one entry per silo and 2 <= number of clusters <= C - 1
    (the silhouette is undefined for one cluster or all singletons).
    """
    d = _check_distances(distances)
    num_silos = d.shape[0]
    lab = np.asarray(labels)
    if lab.shape != (num_silos,):
        raise ValueError(f"labels must have shape ({num_silos},), got {lab.shape}")
    _, inverse, counts = np.unique(lab, return_inverse=True, return_counts=True)
    num_clusters = len(counts)
    if not 2 <= num_clusters <= num_silos - 1:
        raise ValueError(
            f"silhouette needs 2 <= number of clusters <= C - 1 = {num_silos - 1}, "
            f"got {num_clusters} clusters"
        )
    onehot = np.zeros((num_silos, num_clusters), dtype=np.float64)
    onehot[np.arange(num_silos), inverse] = 1.0
    sums = d @ onehot  # sums[i, c] = sum of distances from i to cluster c (d[i, i] = 0)
    own = counts[inverse]
    rows = np.arange(num_silos)
    a = np.zeros(num_silos)
    np.divide(sums[rows, inverse], own - 1, out=a, where=own > 1)
    means = sums / counts[None, :]
    means[rows, inverse] = np.inf
    b = means.min(axis=1)
    denom = np.maximum(a, b)
    s = np.zeros(num_silos)
    np.divide(b - a, denom, out=s, where=(own > 1) & (denom > 0))
    return float(s.mean())


@dataclass(frozen=True)
class Clustering:
    """FedLEASE's choice of experts: silo i's cluster is labels[i], in 0..num_clusters-1.

    `scores` maps each candidate M tried to its silhouette; empty when no choice was made
    (C <= 2).
    """

    labels: list[int]
    num_clusters: int
    scores: dict[int, float]


def choose_clusters(distances: np.ndarray, max_clusters: int) -> Clustering:
    """Cluster silos by average linkage for M = 2..min(max_clusters, C - 1); keep the M with
    the best silhouette (ties: the smaller M, i.e. fewer experts).

    Why min(max_clusters, C - 1): the silhouette is undefined when every silo is alone.
    Edge cases: C == 1 gives one cluster; C == 2 gives two clusters, each silo its own expert
    (no silhouette can be computed, so `scores` is empty). Labels follow
    `average_linkage_labels` (silo 0 is in cluster 0). If every distance is equal (e.g. all
    zero), every M scores alike and M = 2 is kept.

    Raises ValueError when max_clusters < 2 (FedLEASE needs at least two candidate experts)
    or `distances` is not a valid square, symmetric, non-negative matrix with zero diagonal.
    """
    if max_clusters < 2:
        raise ValueError(
            f"max_clusters must be at least 2, got {max_clusters}: set max_clusters to 2 or "
            "more (the number of experts FedLEASE may create)"
        )
    d = _check_distances(distances)
    num_silos = d.shape[0]
    if num_silos == 1:
        return Clustering(labels=[0], num_clusters=1, scores={})
    if num_silos == 2:
        return Clustering(labels=[0, 1], num_clusters=2, scores={})
    top = min(max_clusters, num_silos - 1)
    merges = _average_linkage_merges(d, num_silos - 2)  # the tree down to 2 clusters, once
    scores: dict[int, float] = {}
    best: tuple[float, int, np.ndarray] | None = None
    for m in range(2, top + 1):
        labels = _labels_from_merges(num_silos, merges[: num_silos - m])
        score = silhouette_score(d, labels)
        scores[m] = score
        if best is None or score > best[0]:
            best = (score, m, labels)
    assert best is not None
    _, m, labels = best
    return Clustering(labels=[int(x) for x in labels], num_clusters=m, scores=scores)
