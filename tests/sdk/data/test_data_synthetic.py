from collections import Counter

import numpy as np
import pytest

from fedsilo.sdk.data import CANDIDATES, FAMILY_NAMES, DataError, family_mix, synthetic_federation
from fedsilo.sdk.data.synthetic import FAMILIES


def _families(silo):
    return Counter(e.group.split(":")[0] for e in silo)


def test_deterministic_and_seed_dependent():
    a, task_a = synthetic_federation(4, seed=1, examples_per_silo=50)
    b, task_b = synthetic_federation(4, seed=1, examples_per_silo=50)
    c, _ = synthetic_federation(4, seed=2, examples_per_silo=50)
    assert a == b and task_a == task_b and a != c


def test_shape_and_shared_candidates():
    silos, task = synthetic_federation(5, seed=0, examples_per_silo=120)
    assert len(silos) == 5 and all(len(s) == 120 for s in silos)
    assert task.kind == "classification" and task.candidates == CANDIDATES
    assert len({c[0] for c in CANDIDATES}) == len(CANDIDATES)  # distinct first byte
    assert all(e.response in CANDIDATES for s in silos for e in s)


def test_prompts_short_and_newline_terminated():
    for family in FAMILIES:
        for prompt, label in family.items:
            assert len(prompt.encode()) < 48 and prompt.endswith("\n")
            assert label in CANDIDATES


def test_silos_have_different_mixes():
    silos, _ = synthetic_federation(6, seed=0, examples_per_silo=200)
    dominant = [_families(s).most_common(1)[0][0] for s in silos]
    assert len(set(dominant)) >= 3
    mixes = np.stack([family_mix(i, 0) for i in range(6)])
    assert np.allclose(mixes.sum(1), 1.0)
    assert np.abs(mixes[:, None] - mixes[None]).sum(-1)[np.triu_indices(6, 1)].min() > 0.1


def test_mix_independent_of_federation_size():
    assert np.array_equal(family_mix(2, 5), family_mix(2, 5))
    small, _ = synthetic_federation(3, seed=5, examples_per_silo=80)
    large, _ = synthetic_federation(7, seed=5, examples_per_silo=80)
    assert small == large[:3]


def test_conflicting_families_share_prompts_with_flipped_labels():
    by_name = {f.name: dict(f.items) for f in FAMILIES}
    sentiment, irony = by_name["sentiment"], by_name["irony"]
    assert sentiment.keys() == irony.keys()
    flip = {"good": "bad", "bad": "good"}
    assert all(irony[p] == flip[label] for p, label in sentiment.items())
    # other families never reuse those prompts
    assert not (set(by_name["colour"]) | set(by_name["topic"])) & set(sentiment)


def test_families_separable_within_family():
    for family in FAMILIES:
        labels_by_prompt = Counter(p for p, _ in family.items)
        assert max(labels_by_prompt.values()) == 1  # each prompt has one label per family
    assert FAMILY_NAMES == ("sentiment", "irony", "colour", "topic")


def test_bad_arguments():
    with pytest.raises(DataError):
        synthetic_federation(0, seed=0)
    with pytest.raises(DataError, match="skew"):
        synthetic_federation(2, seed=0, skew=0)
