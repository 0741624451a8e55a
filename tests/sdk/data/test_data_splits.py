import numpy as np
import pytest

from fedsilo.sdk.data import DataError, Example, SplitConfig, TaskInfo, build_silos, split_silo

CLS = TaskInfo("classification", ("a", "b"), "t")
GEN = TaskInfo("generation", (), "g")


def _examples(n):
    return [Example(f"p{i}\n", "a" if i % 2 else "b", "a" if i % 2 else "b") for i in range(n)]


def _all(silo):
    return silo.train + silo.emb + silo.val + silo.test


def test_ratios_and_disjoint():
    silo = split_silo(_examples(200), CLS, np.random.default_rng(0))
    assert len(silo.test) == 20 and len(silo.val) == 20
    assert len(silo.emb) == 8  # 5% of 160
    assert len(silo.train) == 152
    prompts = [e.prompt for e in _all(silo)]
    assert len(prompts) == len(set(prompts)) == 200
    assert silo.task is CLS
    assert silo.sizes() == {"train": 152, "emb": 8, "val": 20, "test": 20}


def test_caps():
    silo = split_silo(_examples(5000), CLS, np.random.default_rng(0))
    assert len(silo.val) == 200 and len(silo.test) == 200
    assert len(silo.emb) == 200  # 5% of 4000 capped
    assert len(silo.train) == 3800
    gen = split_silo(_examples(5000), GEN, np.random.default_rng(0))
    assert len(gen.test) == 50
    custom = split_silo(_examples(5000), GEN, np.random.default_rng(0), SplitConfig(test_cap=7))
    assert len(custom.test) == 7


def test_small_silo_minimums():
    silo = split_silo(_examples(10), CLS, np.random.default_rng(0))
    assert len(silo.test) == 1 and len(silo.emb) == 4 and len(silo.train) >= 1
    with pytest.raises(DataError, match="too small"):
        split_silo(_examples(5), CLS, np.random.default_rng(0))


def test_deterministic_and_shuffled():
    a = split_silo(_examples(100), CLS, np.random.default_rng(3))
    b = split_silo(_examples(100), CLS, np.random.default_rng(3))
    assert a == b
    assert [e.prompt for e in a.train] != [f"p{i}\n" for i in range(len(a.train))]


def test_bad_config():
    with pytest.raises(DataError, match="sum to 1"):
        SplitConfig(train=0.9, val=0.1, test=0.1)
    with pytest.raises(DataError, match="emb_min"):
        SplitConfig(emb_min=0)


def test_build_silos():
    silos = build_silos(_examples(400), CLS, 4, "dirichlet", seed=0, alpha=1.0)
    assert len(silos) == 4
    prompts = [e.prompt for s in silos for e in _all(s)]
    assert len(prompts) == len(set(prompts)) == 400
    again = build_silos(_examples(400), CLS, 4, "dirichlet", seed=0, alpha=1.0)
    assert silos == again
