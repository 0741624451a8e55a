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
    silo = split_silo(_examples(1500), CLS, np.random.default_rng(0))
    sizes = silo.sizes()
    # shares in expectation (each record's own hash decides): within 4 standard deviations
    for name, share in {"test": 0.1, "val": 0.1, "emb": 0.8 * 0.05}.items():
        sd = (1500 * share * (1 - share)) ** 0.5
        assert abs(sizes[name] - 1500 * share) < 4 * sd, (name, sizes)
    assert sum(sizes.values()) == 1500  # under the caps: nothing dropped
    prompts = [e.prompt for e in _all(silo)]
    assert len(prompts) == len(set(prompts)) == 1500
    assert silo.task is CLS


def test_caps():
    silo = split_silo(_examples(6000), CLS, np.random.default_rng(0))
    assert len(silo.val) == 200 and len(silo.test) == 200
    assert len(silo.emb) == 200  # about 5% of 4800, capped; the rest trains
    assert len(silo.train) > 4500
    gen = split_silo(_examples(5000), GEN, np.random.default_rng(0))
    assert len(gen.test) == 50
    custom = split_silo(_examples(5000), GEN, np.random.default_rng(0), SplitConfig(test_cap=7))
    assert len(custom.test) == 7


def _members(silo):
    return {name: {e.prompt for e in getattr(silo, name)} for name in ("train", "emb")}


@pytest.mark.parametrize("n", [12, 60, 300, 6000])
def test_adding_or_removing_one_record_changes_one_training_and_embedding_record(n):
    """The DP neighbour relation (privacy.dp.EMBEDDING_SET_CHANGE): with the same key, one
    record more or less moves at most one record of train, and of D_emb at most one in and
    one out, whatever floors or caps bind (n = 12 and 60: the floors; 6000: the cap)."""
    from fedsilo.privacy.dp import EMBEDDING_SET_CHANGE

    base = _examples(n)
    rng = np.random.default_rng(7)
    cfg = SplitConfig(test_min=2, val_min=1)
    before = _members(split_silo(base, CLS, np.random.default_rng(1), cfg))
    for trial in range(25):
        i = int(rng.integers(len(base)))
        for neighbour in (base[:i] + base[i + 1:],  # one removed
                          [*base, Example(f"new{trial}\n", "a", "a")],  # one added
                          [base[i], *base]):  # a second copy of one added
            after = _members(split_silo(neighbour, CLS, np.random.default_rng(1), cfg))
            changed = before["train"] ^ after["train"]
            assert len(changed - {base[i].prompt, f"new{trial}\n"}) <= 1, changed
            out, into = before["emb"] - after["emb"], after["emb"] - before["emb"]
            assert len(out) <= 1 and len(into) <= 1, (out, into)
            assert len(out) + len(into) <= EMBEDDING_SET_CHANGE


def test_small_silo_minimums():
    silo = split_silo(_examples(10), CLS, np.random.default_rng(0))
    assert len(silo.test) >= 1 and len(silo.emb) >= 4 and len(silo.train) >= 1
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
