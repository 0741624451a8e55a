from collections import Counter

import numpy as np
import pytest

from fedsilo.sdk.data import (
    DataError,
    dirichlet_partition,
    iid_partition,
    label_per_silo_partition,
    partition,
)

GROUPS = [f"g{i % 5}" for i in range(1000)]


def _check_cover(parts, n):
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))  # disjoint and complete


def _mean_top_share(parts, groups):
    return np.mean([Counter(groups[i] for i in p).most_common(1)[0][1] / len(p) for p in parts])


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_dirichlet_min_size_and_cover(alpha):
    parts = dirichlet_partition(GROUPS, 10, alpha, np.random.default_rng(0), min_size=10)
    assert len(parts) == 10
    assert min(len(p) for p in parts) >= 10
    _check_cover(parts, len(GROUPS))


def test_dirichlet_deterministic():
    a = dirichlet_partition(GROUPS, 6, 0.5, np.random.default_rng(7))
    b = dirichlet_partition(GROUPS, 6, 0.5, np.random.default_rng(7))
    c = dirichlet_partition(GROUPS, 6, 0.5, np.random.default_rng(8))
    assert a == b and a != c


def test_small_alpha_gives_skew():
    skewed = dirichlet_partition(GROUPS, 10, 0.1, np.random.default_rng(0))
    flat = dirichlet_partition(GROUPS, 10, 100.0, np.random.default_rng(0))
    assert _mean_top_share(skewed, GROUPS) > 0.6
    assert _mean_top_share(flat, GROUPS) < 0.35


def test_dirichlet_impossible_and_exhausted():
    with pytest.raises(DataError, match="needs 100"):
        dirichlet_partition(GROUPS[:50], 10, 1.0, np.random.default_rng(0))
    with pytest.raises(DataError, match="tries"):
        dirichlet_partition(GROUPS[:100], 10, 0.01, np.random.default_rng(0), max_tries=1)


def test_label_partition_more_groups_than_silos():
    parts = label_per_silo_partition(GROUPS, 2, np.random.default_rng(0))
    _check_cover(parts, len(GROUPS))
    group_sets = [{GROUPS[i] for i in p} for p in parts]
    assert sorted(len(s) for s in group_sets) == [2, 3]
    assert not group_sets[0] & group_sets[1]


def test_label_partition_one_group_per_silo_and_sharing():
    parts = label_per_silo_partition(GROUPS, 5, np.random.default_rng(0))
    assert sorted(len({GROUPS[i] for i in p}) for p in parts) == [1] * 5
    shared = label_per_silo_partition(GROUPS, 8, np.random.default_rng(0))
    _check_cover(shared, len(GROUPS))
    assert all(len({GROUPS[i] for i in p}) == 1 for p in shared)
    assert all(len(p) == 100 for p in shared if len(p) < 200)  # 3 groups split between 2 silos


def test_iid_partition():
    parts = iid_partition(103, 4, np.random.default_rng(0))
    _check_cover(parts, 103)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    with pytest.raises(DataError):
        iid_partition(3, 4, np.random.default_rng(0))


def test_partition_dispatch():
    rng = np.random.default_rng
    assert partition(GROUPS, 3, "iid", rng(1)) == iid_partition(1000, 3, rng(1))
    assert partition(GROUPS, 3, "label", rng(1)) == label_per_silo_partition(GROUPS, 3, rng(1))
    assert partition(GROUPS, 3, "dirichlet", rng(1), alpha=0.3) == dirichlet_partition(
        GROUPS, 3, 0.3, rng(1)
    )
    with pytest.raises(DataError, match="dirichlet, label, iid"):
        partition(GROUPS, 3, "zipf", rng(1))
