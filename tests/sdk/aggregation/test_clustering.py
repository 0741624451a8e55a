"""FedLEASE clustering: hand-computed distances, linkage and silhouette; planted clusters found."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsilo.sdk.aggregation.clustering import (
    Clustering,
    average_linkage_labels,
    b_distance_matrix,
    choose_clusters,
    silhouette_score,
)

Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def canonical(labels: np.ndarray | list[int]) -> list[int]:
    """Relabel a partition by each cluster's smallest member, to compare partitions."""
    seen: dict[int, int] = {}
    return [seen.setdefault(int(x), len(seen)) for x in labels]


# A 5-silo matrix, hand-worked below. {0, 1} and {3, 4} are tight pairs; silo 2 is nearest
# to silo 0 (single linkage would join it to {0, 1}) but nearer on average to {3, 4}.
D5 = np.array(
    [
        [0.0, 1.0, 2.0, 10.0, 10.0],
        [1.0, 0.0, 8.0, 10.0, 10.0],
        [2.0, 8.0, 0.0, 3.0, 5.0],
        [10.0, 10.0, 3.0, 0.0, 1.5],
        [10.0, 10.0, 5.0, 1.5, 0.0],
    ]
)


# ---------------------------------------------------------------------------------------------
# b_distance_matrix


def test_distance_one_module_by_hand() -> None:
    # vec B0 = (3, 0, 0, 4), |B0| = 5; vec B1 = (3, 0, 0, -4), |B1| = 5; vec B2 = (0, 1, 0, 0).
    # cos(0, 1) = (9 - 16) / 25 = -7/25 -> distance 32/25; B2 is orthogonal to both -> 1.
    adapters = [{Q: t([[3, 0], [0, 4]])}, {Q: t([[3, 0], [0, -4]])}, {Q: t([[0, 1], [0, 0]])}]
    d = b_distance_matrix(adapters, [Q])
    expected = np.array([[0, 32 / 25, 1], [32 / 25, 0, 1], [1, 1, 0]])
    assert d.dtype == np.float64
    np.testing.assert_allclose(d, expected, rtol=0, atol=1e-12)


def test_distance_averages_over_modules_by_hand() -> None:
    # q as in the test above: d_q(0,1) = 32/25, d_q(0,2) = d_q(1,2) = 1.
    # v: vec B0 = (1, 1), vec B1 = (2, 2) (same direction, distance 0), vec B2 = (1, 0):
    # cos(B0, B2) = cos(B1, B2) = 1/sqrt(2) -> distance 1 - 1/sqrt(2).
    # Mean over the two modules: d(0,1) = (32/25 + 0)/2 = 0.64,
    # d(0,2) = d(1,2) = (1 + 1 - 1/sqrt(2))/2.
    adapters = [
        {Q: t([[3, 0], [0, 4]]), V: t([[1, 1]])},
        {Q: t([[3, 0], [0, -4]]), V: t([[2, 2]])},
        {Q: t([[0, 1], [0, 0]]), V: t([[1, 0]])},
    ]
    d = b_distance_matrix(adapters, [Q, V])
    far = (2 - 1 / math.sqrt(2)) / 2
    expected = np.array([[0, 0.64, far], [0.64, 0, far], [far, far, 0]])
    np.testing.assert_allclose(d, expected, rtol=0, atol=1e-12)
    # Only the listed modules count: q alone gives the one-module answer.
    np.testing.assert_allclose(b_distance_matrix(adapters, [Q])[0, 1], 32 / 25, atol=1e-12)


def test_distance_zero_b() -> None:
    # q: B0 = B1 = 0, B2 = (1, 2). Two zero vectors: cos 1 -> distance 0; zero vs non-zero:
    # cos 0 -> distance 1. v: identical non-zero everywhere -> distance 0.
    # Mean over modules: d(0,1) = 0, d(0,2) = d(1,2) = (1 + 0)/2 = 0.5.
    zero = torch.zeros(1, 2)
    adapters = [
        {Q: zero, V: t([[1, -1]])},
        {Q: zero.clone(), V: t([[1, -1]])},
        {Q: t([[1, 2]]), V: t([[1, -1]])},
    ]
    d = b_distance_matrix(adapters, [Q, V])
    assert np.isfinite(d).all()
    expected = np.array([[0, 0, 0.5], [0, 0, 0.5], [0.5, 0.5, 0]])
    np.testing.assert_allclose(d, expected, rtol=0, atol=1e-12)


def test_distance_is_scale_free_symmetric_and_clipped() -> None:
    # Same direction at very different scales (and in bf16): distance 0 exactly, never < 0.
    # Opposite directions: distance 2.
    b = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    adapters = [{Q: b}, {Q: 1e-3 * b}, {Q: (7 * b).to(torch.bfloat16)}, {Q: -b}]
    d = b_distance_matrix(adapters, [Q])
    assert (d >= 0).all()
    assert (d == d.T).all()
    assert (np.diag(d) == 0).all()
    np.testing.assert_allclose(d[0, 1], 0.0, atol=1e-12)
    np.testing.assert_allclose(d[0, 3], 2.0, atol=1e-12)
    # bf16 rounds 7b a little, so it is only close to b's direction.
    assert d[0, 2] < 1e-3


def test_distance_matches_brute_force_cosine() -> None:
    gen = torch.Generator().manual_seed(1)
    modules = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(3) for p in "qv"]
    adapters = [{m: torch.randn(6, 2, generator=gen) for m in modules} for _ in range(5)]
    d = b_distance_matrix(adapters, modules)
    for i in range(5):
        for k in range(5):
            per_module = [
                1
                - torch.nn.functional.cosine_similarity(
                    adapters[i][m].double().flatten(), adapters[k][m].double().flatten(), dim=0
                ).item()
                for m in modules
            ]
            # Mean over modules == mean over layers of the q/v average (both in every layer).
            per_layer = [(per_module[2 * j] + per_module[2 * j + 1]) / 2 for j in range(3)]
            expected = 0.0 if i == k else np.mean(per_layer)
            np.testing.assert_allclose(d[i, k], expected, rtol=0, atol=1e-12)


def test_distance_errors() -> None:
    ok = {Q: t([[1, 2]]), V: t([[3, 4]])}
    with pytest.raises(ValueError, match=r"adapter 1 has no LoRA B for module .*v_proj"):
        b_distance_matrix([ok, {Q: t([[1, 2]])}], [Q, V])
    with pytest.raises(ValueError, match=r"shape \(2, 1\) in adapter 1 but \(1, 2\) in adapter 0"):
        b_distance_matrix([ok, {Q: t([[1], [2]]), V: t([[3, 4]])}], [Q, V])
    with pytest.raises(ValueError, match="at least one adapter"):
        b_distance_matrix([], [Q])
    with pytest.raises(ValueError, match="at least one module"):
        b_distance_matrix([ok], [])
    with pytest.raises(ValueError, match="more than once"):
        b_distance_matrix([ok, ok], [Q, V, Q])
    with pytest.raises(ValueError, match="not one string"):
        b_distance_matrix([ok, ok], Q)
    with pytest.raises(ValueError, match=r"NaN or inf in adapters \[1\]"):
        b_distance_matrix([ok, {Q: t([[1, float("nan")]]), V: t([[3, 4]])}], [Q, V])


def test_distance_single_adapter() -> None:
    assert b_distance_matrix([{Q: t([[1, 2]])}], [Q]).tolist() == [[0.0]]


# ---------------------------------------------------------------------------------------------
# average_linkage_labels


def test_average_linkage_by_hand() -> None:
    # Merge 1: (0, 1) at 1.  A = {0,1}: d(A,2) = (2+8)/2 = 5, d(A,3) = d(A,4) = 10.
    # Merge 2: (3, 4) at 1.5. B = {3,4}: d(B,2) = (3+5)/2 = 4, d(A,B) = 10.
    # Merge 3: (2, B) at 4 (< d(A,2) = 5; single linkage would take min(2, 8) = 2 and join A).
    # Merge 4: everything, at mean(10, 10, 10, 10, 2, 8) = 50/6.
    assert average_linkage_labels(D5, 5).tolist() == [0, 1, 2, 3, 4]
    assert average_linkage_labels(D5, 4).tolist() == [0, 0, 1, 2, 3]
    assert average_linkage_labels(D5, 3).tolist() == [0, 0, 1, 2, 2]
    assert average_linkage_labels(D5, 2).tolist() == [0, 0, 1, 1, 1]
    assert average_linkage_labels(D5, 1).tolist() == [0, 0, 0, 0, 0]


def test_average_linkage_label_order() -> None:
    # New silo j is old silo perm[j]. Old 2-cluster partition {0,1}, {2,3,4} becomes
    # new {1, 4} and {0, 2, 3}; silo 0 is always in cluster 0, so [0, 1, 0, 0, 1].
    perm = [3, 0, 2, 4, 1]
    d = D5[np.ix_(perm, perm)]
    labels = average_linkage_labels(d, 2)
    assert labels.tolist() == [0, 1, 0, 0, 1]
    assert labels.dtype.kind == "i"
    # 3 clusters: old {0,1}, {2}, {3,4} -> new {1,4}, {2}, {0,3} -> numbered 0: {0,3}, 1: {1,4},
    # 2: {2}.
    assert average_linkage_labels(d, 3).tolist() == [0, 1, 2, 0, 1]


def test_average_linkage_ties_give_exactly_k_clusters() -> None:
    # All distances equal: every merge ties; the smallest pair of indices merges first:
    # (0, 1), then ({0,1}, 2), then ({0,1,2}, 3). A height cut would give one cluster here.
    d = np.ones((4, 4)) - np.eye(4)
    assert average_linkage_labels(d, 3).tolist() == [0, 0, 1, 2]
    assert average_linkage_labels(d, 2).tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_linkage_matches_scipy(seed: int) -> None:
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    distance = pytest.importorskip("scipy.spatial.distance")
    x = np.random.default_rng(seed).normal(size=(9, 3))
    d = np.linalg.norm(x[:, None] - x[None, :], axis=-1)
    tree = hierarchy.linkage(distance.squareform(d, checks=False), method="average")
    for k in range(1, 10):
        ref = hierarchy.cut_tree(tree, n_clusters=k).ravel()
        assert average_linkage_labels(d, k).tolist() == canonical(ref), k


def test_average_linkage_errors() -> None:
    with pytest.raises(ValueError, match=r"between 1 and the number of silos \(5\), got 0"):
        average_linkage_labels(D5, 0)
    with pytest.raises(ValueError, match=r"between 1 and the number of silos \(5\), got 6"):
        average_linkage_labels(D5, 6)
    with pytest.raises(ValueError, match="square"):
        average_linkage_labels(np.zeros((2, 3)), 1)
    bad = D5.copy()
    bad[0, 1] = 3.0
    with pytest.raises(ValueError, match="symmetric"):
        average_linkage_labels(bad, 2)
    with pytest.raises(ValueError, match="zero diagonal"):
        average_linkage_labels(D5 + np.eye(5), 2)
    with pytest.raises(ValueError, match="non-negative"):
        average_linkage_labels(-D5, 2)
    with pytest.raises(ValueError, match="NaN"):
        average_linkage_labels(np.full((2, 2), np.nan), 1)


# ---------------------------------------------------------------------------------------------
# silhouette_score


def test_silhouette_by_hand_two_clusters() -> None:
    # labels {0,1}, {2,3,4} on D5:
    # s0: a = d01 = 1;             b = (2+10+10)/3 = 22/3;  s = (22/3 - 1)/(22/3) = 19/22
    # s1: a = d10 = 1;             b = (8+10+10)/3 = 28/3;  s = (28/3 - 1)/(28/3) = 25/28
    # s2: a = (3+5)/2 = 4;         b = (2+8)/2 = 5;         s = (5 - 4)/5 = 1/5
    # s3: a = (3+1.5)/2 = 2.25;    b = (10+10)/2 = 10;      s = 7.75/10
    # s4: a = (5+1.5)/2 = 3.25;    b = 10;                  s = 6.75/10
    expected = (19 / 22 + 25 / 28 + 1 / 5 + 0.775 + 0.675) / 5
    assert silhouette_score(D5, np.array([0, 0, 1, 1, 1])) == pytest.approx(expected, abs=1e-12)
    # Label values are only names.
    assert silhouette_score(D5, np.array([7, 7, 3, 3, 3])) == pytest.approx(expected, abs=1e-12)


def test_silhouette_by_hand_singleton_and_b_is_min() -> None:
    # labels {0,1}, {2}, {3,4}: b takes the nearest other cluster; a lone point scores 0.
    # s0: a = 1;   b = min(d02 = 2, (10+10)/2 = 10) = 2;  s = (2 - 1)/2 = 0.5
    # s1: a = 1;   b = min(d12 = 8, 10) = 8;              s = 7/8
    # s2: alone -> 0
    # s3: a = 1.5; b = min(d32 = 3, 10) = 3;              s = 1.5/3 = 0.5
    # s4: a = 1.5; b = min(d42 = 5, 10) = 5;              s = 3.5/5 = 0.7
    expected = (0.5 + 0.875 + 0 + 0.5 + 0.7) / 5  # 0.515
    assert silhouette_score(D5, np.array([0, 0, 1, 2, 2])) == pytest.approx(expected, abs=1e-12)


def test_silhouette_by_hand_negative() -> None:
    # labels {0}, {1,2,3,4}: silos 1 and 2 sit nearer to silo 0 than to their own cluster.
    # s0: alone -> 0
    # s1: a = (8+10+10)/3 = 28/3;   b = 1;   s = (1 - 28/3)/(28/3) = -25/28
    # s2: a = (8+3+5)/3 = 16/3;     b = 2;   s = (2 - 16/3)/(16/3) = -5/8
    # s3: a = (10+3+1.5)/3 = 14.5/3; b = 10; s = (10 - 14.5/3)/10 = 31/60
    # s4: a = (10+5+1.5)/3 = 5.5;   b = 10;  s = 4.5/10
    expected = (0 - 25 / 28 - 5 / 8 + 31 / 60 + 0.45) / 5
    assert silhouette_score(D5, np.array([0, 1, 1, 1, 1])) == pytest.approx(expected, abs=1e-12)


def test_silhouette_zero_distances_is_zero_not_nan() -> None:
    # a = b = 0 for every point: s = 0 (scikit-learn's convention).
    assert silhouette_score(np.zeros((3, 3)), np.array([0, 0, 1])) == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_silhouette_matches_sklearn(seed: int) -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(10, 4))
    d = np.linalg.norm(x[:, None] - x[None, :], axis=-1)
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 0])  # includes a singleton
    ref = metrics.silhouette_score(d, labels, metric="precomputed")
    assert silhouette_score(d, labels) == pytest.approx(ref, abs=1e-12)


def test_silhouette_errors() -> None:
    with pytest.raises(ValueError, match=r"2 <= number of clusters <= C - 1 = 4, got 1"):
        silhouette_score(D5, np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match=r"2 <= number of clusters <= C - 1 = 4, got 5"):
        silhouette_score(D5, np.arange(5))
    with pytest.raises(ValueError, match=r"labels must have shape \(5,\)"):
        silhouette_score(D5, np.array([0, 1]))


# ---------------------------------------------------------------------------------------------
# choose_clusters


def planted(seed: int, num_clusters: int, num_silos: int = 12) -> tuple[np.ndarray, list[int]]:
    """Distances between silos whose B matrices are a cluster centre plus small noise."""
    rng = np.random.default_rng(seed)
    truth = rng.permutation(np.arange(num_silos) % num_clusters)
    modules = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]
    centres = {m: rng.normal(size=(num_clusters, 16, 4)) for m in modules}
    adapters = [
        {
            m: torch.from_numpy(centres[m][c] + 0.1 * rng.normal(size=(16, 4))).float()
            for m in modules
        }
        for c in truth
    ]
    return b_distance_matrix(adapters, modules), canonical(truth)


@pytest.mark.parametrize("num_clusters", [3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_choose_clusters_finds_planted(num_clusters: int, seed: int) -> None:
    d, truth = planted(seed, num_clusters)
    result = choose_clusters(d, max_clusters=6)
    assert isinstance(result, Clustering)
    assert sorted(result.scores) == [2, 3, 4, 5, 6]
    assert result.num_clusters == num_clusters
    assert result.labels == truth
    assert all(type(x) is int for x in result.labels)
    assert result.scores[num_clusters] == max(result.scores.values())


def test_choose_clusters_scores_are_silhouettes_of_linkage() -> None:
    result = choose_clusters(D5, max_clusters=10)  # capped at C - 1 = 4
    assert sorted(result.scores) == [2, 3, 4]
    for m, score in result.scores.items():
        assert score == pytest.approx(silhouette_score(D5, average_linkage_labels(D5, m)))
    # Hand values from the silhouette tests: M = 2 scores ~0.68 > M = 3's 0.515.
    assert result.num_clusters == 2
    assert result.labels == [0, 0, 1, 1, 1]


def test_choose_clusters_ties_pick_smaller_m() -> None:
    # All silos identical: every silhouette is 0, so M = 2 (the fewest experts) wins.
    result = choose_clusters(np.zeros((5, 5)), max_clusters=4)
    assert result.scores == {2: 0.0, 3: 0.0, 4: 0.0}
    assert result.num_clusters == 2
    assert result.labels == [0, 0, 0, 0, 1]


def test_choose_clusters_edge_cases() -> None:
    assert choose_clusters(np.zeros((1, 1)), max_clusters=4) == Clustering([0], 1, {})
    two = np.array([[0.0, 0.3], [0.3, 0.0]])
    assert choose_clusters(two, max_clusters=4) == Clustering([0, 1], 2, {})
    # C = 3: only M = 2 can be scored.
    three = np.array([[0.0, 0.1, 1.0], [0.1, 0.0, 1.0], [1.0, 1.0, 0.0]])
    result = choose_clusters(three, max_clusters=5)
    assert list(result.scores) == [2]
    assert result.labels == [0, 0, 1]


def test_choose_clusters_errors() -> None:
    for bad in (1, 0):
        with pytest.raises(ValueError, match=rf"at least 2, got {bad}: set max_clusters to 2"):
            choose_clusters(D5, max_clusters=bad)
    with pytest.raises(ValueError, match="empty"):
        choose_clusters(np.zeros((0, 0)), max_clusters=3)
    with pytest.raises(ValueError, match="symmetric"):
        choose_clusters(np.triu(D5), max_clusters=3)
