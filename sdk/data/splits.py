"""Per-silo train / embedding / validation / test splits, as the paper's schedule sets them.

The embedding set D_emb (the examples whose mean hidden states become the client and expert
embeddings that RSEA uses) is a sample of the training split that is *removed* from training.
Why disjoint: the embeddings a silo releases then summarise records that the released LoRA
updates never trained on, so the two releases touch disjoint records (DP parallel
composition in the privacy ledger), and the embeddings describe how the silo's data looks to
the model rather than what it memorised.

Why each record's split is decided by a keyed hash of the record itself: differential
privacy is about adding or removing one record. A shuffled cut (a permutation of the whole
set) moves many records between splits when one is added; a per-record position u in
[0, 1) moves none, so one added or removed record changes the training set by at most one
record and D_emb by at most one in and one out (a floor or cap that binds passes one record
on). `privacy.dp.EMBEDDING_SET_CHANGE` is that bound, and `tests/sdk/data/test_data_splits.py`
checks it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
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
    """Split by each record's keyed-hash position u (key drawn from `rng`): u below
    ``test`` -> test, then ``val`` -> validation, then a ``train x emb_fraction`` band ->
    D_emb, the rest -> train. So the shares hold in expectation, not exactly.

    Floors (``test_min``, ``val_min``, ``emb_min``) take the training records of smallest
    u; caps keep the records of smallest u (val/test: the rest is dropped; D_emb: the rest
    trains). At least one training record always remains.
    """
    key = rng.bytes(32)
    copies: dict[Example, int] = {}
    placed = []
    for example in examples:  # the k-th copy of a repeated record has its own place
        k = copies[example] = copies.get(example, -1) + 1
        placed.append((_position(key, example, k), example))
    placed.sort(key=lambda item: item[0])
    positions = [where[0] for where, _ in placed]
    ranked = [example for _, example in placed]
    rank = {id(example): i for i, (_, example) in enumerate(placed)}
    test_end = cfg.test
    val_end = test_end + cfg.val
    emb_end = val_end + cfg.train * cfg.emb_fraction
    bands: dict[str, list[Example]] = {"test": [], "val": [], "emb": [], "train": []}
    for u, example in zip(positions, ranked, strict=True):
        band = ("test" if u < test_end else "val" if u < val_end
                else "emb" if u < emb_end else "train")
        bands[band].append(example)
    test_cap = (max(DEFAULT_TEST_CAP[task.kind], cfg.test_min) if cfg.test_cap is None
                else cfg.test_cap)
    train = bands["train"]
    test, train = _floor(bands["test"], train, cfg.test_min)
    val, train = _floor(bands["val"], train, cfg.val_min)
    emb, train = _floor(bands["emb"], train, cfg.emb_min)
    train = sorted([*train, *emb[cfg.emb_cap:]], key=lambda e: rank[id(e)])
    emb = emb[: cfg.emb_cap]
    if not train:
        raise DataError(
            f"a silo with {len(examples)} examples is too small: after {len(test)} test, "
            f"{len(val)} validation and {len(emb)} embedding examples none remains to train "
            "on; give each silo more data (e.g. a larger partition min_size) or lower the "
            "floors (test_min, val_min, emb_min)"
        )
    return SiloData(train=train, emb=emb, val=val[: cfg.val_cap], test=test[:test_cap],
                    task=task)


def _position(key: bytes, example: Example, copy: int = 0) -> tuple[float, bytes]:
    """The place in [0, 1) of the `copy`-th copy of a record, from its content alone (and
    the bytes, for ties). Copies are indistinguishable, so adding or removing one copy
    adds or removes one place: the others keep theirs."""
    content = json.dumps([example.prompt, example.response, example.group, copy]
                         ).encode("utf-8")
    digest = hmac.new(key, content, hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64, digest


def _floor(band: list[Example], train: list[Example], floor: int
           ) -> tuple[list[Example], list[Example]]:
    """`band` raised to `floor` records with the training records of smallest u."""
    short = max(0, floor - len(band))
    if short >= len(train):
        raise DataError(
            f"a silo is too small: a split needs {short} more examples for its floor of "
            f"{floor} but only {len(train)} remain for training; give each silo more data "
            "(e.g. a larger partition min_size) or lower the floors (test_min, val_min, "
            "emb_min)"
        )
    return band + train[:short], train[short:]


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
