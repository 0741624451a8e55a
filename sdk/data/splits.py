"""Per-silo train / embedding / validation / test splits, as the paper's schedule sets them.

The embedding set D_emb (the examples whose mean hidden states become the client and expert
embeddings that RSEA uses) is a sample of the training split that is *removed* from training.
Why disjoint: the embeddings a silo releases then summarise records that the released LoRA
updates never trained on, so the two releases touch disjoint records (DP parallel
composition in the privacy ledger), and the embeddings describe how the silo's data looks to
the model rather than what it memorised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .examples import DataError, Example, SiloData, TaskInfo
from .partition import partition

DEFAULT_TEST_CAP = {"classification": 200, "generation": 50}


@dataclass(frozen=True)
class SplitConfig:
    """Split ratios, floors and caps. ``test_cap=None`` -> 200 (classification) or 50
    (generation).

    Examples beyond the val/test caps are dropped, not moved to train, so train keeps the
    paper's 80% share whatever the silo size. ``test_min``/``val_min`` raise a small silo's
    test and validation splits to a floor (taken from train): a score over a handful of
    examples measures nothing, so benchmarks ask for at least 100.
    """

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    emb_fraction: float = 0.05
    emb_cap: int = 200
    emb_min: int = 4
    val_cap: int = 200
    test_cap: int | None = None
    val_min: int = 0
    test_min: int = 1

    def __post_init__(self) -> None:
        ratios = (self.train, self.val, self.test)
        if min(ratios) < 0 or abs(sum(ratios) - 1.0) > 1e-6 or self.test <= 0:
            raise DataError(
                f"split ratios train={self.train}, val={self.val}, test={self.test} must be "
                "non-negative, sum to 1 and give test a share (the paper uses 0.8/0.1/0.1)"
            )
        if not 0 <= self.emb_fraction < 1:
            raise DataError(f"emb_fraction must be in [0, 1), got {self.emb_fraction}")
        if not 1 <= self.emb_min <= self.emb_cap:
            raise DataError(
                f"need 1 <= emb_min <= emb_cap, got emb_min={self.emb_min}, emb_cap={self.emb_cap}"
            )
        if self.val_cap < 0 or (self.test_cap is not None and self.test_cap < 1):
            raise DataError(
                f"val_cap must be >= 0 and test_cap >= 1 (or None), got val_cap={self.val_cap}, "
                f"test_cap={self.test_cap}"
            )
        if self.val_min < 0 or self.test_min < 1:
            raise DataError(
                f"val_min must be >= 0 and test_min >= 1, got val_min={self.val_min}, "
                f"test_min={self.test_min}"
            )
        if self.val_min > self.val_cap or (
            self.test_cap is not None and self.test_min > self.test_cap
        ):
            raise DataError(
                f"a floor above its cap: val_min={self.val_min} > val_cap={self.val_cap} or "
                f"test_min={self.test_min} > test_cap={self.test_cap}; lower the floor or "
                "raise the cap"
            )


def split_silo(
    examples: Sequence[Example],
    task: TaskInfo,
    rng: np.random.Generator,
    cfg: SplitConfig = SplitConfig(),
) -> SiloData:
    """Shuffle, split train/val/test by ratio (at least the floors), cap val/test, carve D_emb
    from train.

    D_emb holds ``emb_fraction`` of train, at least ``emb_min`` and at most ``emb_cap``, and
    at least one training example always remains.
    """
    n = len(examples)
    n_test = max(cfg.test_min, round(n * cfg.test))
    n_val = max(cfg.val_min, round(n * cfg.val))
    n_train = n - n_test - n_val
    n_emb = min(cfg.emb_cap, max(cfg.emb_min, round(cfg.emb_fraction * n_train)))
    if n_train - n_emb < 1:
        raise DataError(
            f"a silo with {n} examples is too small: after {n_test} test and {n_val} "
            f"validation examples, {n_train} remain for training, and the embedding set needs "
            f"{n_emb} of them plus at least 1 to train on; give each silo more data (e.g. a "
            "larger partition min_size) or lower emb_min"
        )
    order = rng.permutation(n)
    shuffled = [examples[i] for i in order]
    train = shuffled[:n_train]
    val = shuffled[n_train : n_train + n_val]
    test = shuffled[n_train + n_val :]
    test_cap = (max(DEFAULT_TEST_CAP[task.kind], cfg.test_min) if cfg.test_cap is None
                else cfg.test_cap)
    return SiloData(
        train=train[n_emb:],
        emb=train[:n_emb],
        val=val[: cfg.val_cap],
        test=test[:test_cap],
        task=task,
    )


def build_silos(
    examples: Sequence[Example],
    task: TaskInfo,
    num_silos: int,
    scheme: str,
    seed: int,
    alpha: float = 1.0,
    min_size: int = 10,
    cfg: SplitConfig = SplitConfig(),
) -> list[SiloData]:
    """Partition over ``Example.group`` and split each silo's share; deterministic in ``seed``.

    Silo i's split draws from its own generator, so it does not depend on the other silos.
    """
    groups = [e.group for e in examples]
    parts = partition(
        groups, num_silos, scheme, np.random.default_rng([seed, 0]), alpha=alpha, min_size=min_size
    )
    return [
        split_silo([examples[j] for j in part], task, np.random.default_rng([seed, 1, i]), cfg)
        for i, part in enumerate(parts)
    ]
