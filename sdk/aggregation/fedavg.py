"""Streaming FedAvg over named tensors (ALGORITHM.md, Aggregation, eq. 22 and 24).

Why streaming: the aggregator folds each upload into running sums as it arrives, so memory
holds one accumulator per tensor key, never one copy per silo (DESIGN.md, One round, step 3).
Why per key: a domain expert is averaged only over the silos that trained it this round,
while the shared expert and W_t are averaged over all silos; keying the mean by tensor name
gives both behaviours from the same code.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..params import TensorDict

__all__ = ["RunningMean", "TensorMean", "fedavg", "parse_dtype"]


class TensorMean(ABC):
    """What a strategy folds a round's tensors into: a mean per key over the contributions
    that carried the key (`RunningMean`, or a robust rule of `aggregation.robust`).

    `min_contributors`: a key fewer contributions carried keeps its previous value, so no
    silo's update is published verbatim (one contributor) by the average."""

    def __init__(self, min_contributors: int = 1) -> None:
        if not isinstance(min_contributors, int) or min_contributors < 1:
            raise ValueError(f"min_contributors = {min_contributors!r}: use an integer >= 1")
        self.min_contributors = min_contributors

    def add(self, tensors: Mapping[str, Tensor], weight: float = 1.0) -> None:
        """Fold one contribution (e.g. one silo's upload).

        The whole contribution is validated before anything is folded, so a bad upload
        leaves the state unchanged.
        """
        weight = float(weight)
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be a finite number > 0, got {weight}")
        for key, value in tensors.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"{key!r}: expected a torch.Tensor, got {type(value).__name__}")
            shape = self._shape(key)
            if shape is not None and shape != value.shape:
                raise ValueError(
                    f"shape mismatch for {key!r}: got {tuple(value.shape)}, "
                    f"earlier contributions had {tuple(shape)}"
                )
        self._fold(tensors, weight)

    @abstractmethod
    def _shape(self, key: str) -> torch.Size | None:
        """The shape earlier contributions gave `key` (None before the first)."""

    @abstractmethod
    def _fold(self, tensors: Mapping[str, Tensor], weight: float) -> None:
        """Take in a contribution that `add` validated."""

    @abstractmethod
    def contributors(self, key: str) -> int: ...

    @abstractmethod
    def keys(self) -> set[str]: ...

    @abstractmethod
    def combined(self, key: str) -> Tensor:
        """The aggregate of `key` over the contributions that carried it."""

    def result(self, previous: Mapping[str, Tensor] | None = None) -> TensorDict:
        """The aggregate of each key over the contributions that had it (eq. 22: expert j
        over the silos that trained it; shared/W_t over all).

        Keys in `previous` that nobody sent, or fewer than `min_contributors` did, keep their
        previous value (the same tensor, not a copy: experts nobody trained keep their
        values); a new key below the minimum is left out. Output dtype = dtype of the first
        contribution for that key (or of `previous` for untouched keys). Key order: that of
        `previous`, then new keys sorted, so it does not depend on arrival order either.
        """
        out: TensorDict = {}
        seen = {key for key in self.keys() if self.contributors(key) >= self.min_contributors}
        if previous is not None:
            for key, value in previous.items():
                out[key] = self.combined(key) if key in seen else value
        for key in sorted(seen - out.keys()):
            out[key] = self.combined(key)
        return out

    @abstractmethod
    def state_dict(self) -> tuple[TensorDict, dict[str, Any]]: ...

    @abstractmethod
    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        ...

    @staticmethod
    @abstractmethod
    def tensor_names(meta: Mapping[str, Any]) -> list[str]:
        """The tensor names a `state_dict` with this `meta` holds (to load it back)."""


class RunningMean(TensorMean):
    """Streaming (weighted) mean per tensor key: memory holds one running sum per key, not one
    copy per silo.

    Sums are kept in float64 whatever the contributions' dtype. Why: uploads arrive over the
    broker in any order, and an aggregator resumed from a checkpoint may fold them in another
    order than before the crash; the result must not depend on that order. Float addition is
    not associative, but float32/fp16/bf16 values (24, 11, 8 significant bits) times integer
    weights (1.0, or sample counts) are exact in float64 (53 bits), and so is their sum, hence
    order-free, while the terms span less than about 2^(53 - 24 - bits of the weights and of
    the silo count) in magnitude; beyond that the float64 error lies far below the output's
    last bit and rounding to the output dtype removes it except in vanishingly rare ties.
    float64 contributions and fractional weights get no such guarantee. Float64 sums also keep
    bf16 uploads from losing precision, at twice float32's accumulator memory.
    """

    def __init__(self, min_contributors: int = 1) -> None:
        super().__init__(min_contributors)
        self._sums: dict[str, Tensor] = {}
        self._weights: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._dtypes: dict[str, torch.dtype] = {}

    def _shape(self, key: str) -> torch.Size | None:
        held = self._sums.get(key)
        return None if held is None else held.shape

    def _fold(self, tensors: Mapping[str, Tensor], weight: float) -> None:
        for key, value in tensors.items():
            held = self._sums.get(key)
            device = value.device if held is None else held.device
            # The product is rounded the same way whichever position the upload arrives in.
            term = value.detach().to(device=device, dtype=torch.float64, copy=True).mul_(weight)
            if held is None:
                self._sums[key] = term
                self._weights[key] = weight
                self._counts[key] = 1
                self._dtypes[key] = value.dtype
            else:
                held.add_(term)
                self._weights[key] += weight
                self._counts[key] += 1

    def contributors(self, key: str) -> int:
        """How many contributions carried `key` (0 if none)."""
        return self._counts.get(key, 0)

    def keys(self) -> set[str]:
        """Keys that at least one contribution carried."""
        return set(self._sums)

    def combined(self, key: str) -> Tensor:
        return (self._sums[key] / self._weights[key]).to(self._dtypes[key])

    def state_dict(self) -> tuple[TensorDict, dict[str, Any]]:
        """Copies of the float64 sums by key, and JSON-able weights, counts and dtypes: all a
        fresh instance needs (`load_state_dict`) to continue exactly (checkpointing)."""
        tensors = {key: total.detach().clone() for key, total in self._sums.items()}
        meta: dict[str, Any] = {
            "weights": dict(self._weights),
            "counts": dict(self._counts),
            "dtypes": {key: str(d).removeprefix("torch.") for key, d in self._dtypes.items()},
        }
        return tensors, meta

    @staticmethod
    def tensor_names(meta: Mapping[str, Any]) -> list[str]:
        return list(meta["weights"])

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Replace the state with one from `state_dict` (the tensors are copied)."""
        weights, counts, dtypes = meta["weights"], meta["counts"], meta["dtypes"]
        if not (set(weights) == set(counts) == set(dtypes) == set(tensors)):
            raise ValueError(
                "RunningMean state is inconsistent: tensors, weights, counts and dtypes name "
                f"different keys ({sorted(tensors)} vs {sorted(weights)})"
            )
        self._sums = {key: tensors[key].to(torch.float64, copy=True) for key in weights}
        self._weights = {key: float(w) for key, w in weights.items()}
        self._counts = {key: int(c) for key, c in counts.items()}
        self._dtypes = {key: parse_dtype(name) for key, name in dtypes.items()}


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r} in RunningMean state")
    return dtype


def fedavg(
    updates: Sequence[tuple[Mapping[str, Tensor], float]],
    previous: Mapping[str, Tensor] | None = None,
) -> TensorDict:
    """Weighted mean per key of `(tensors, weight)` pairs; see `RunningMean.result`.

    Pass weight 1.0 for the paper's uniform mean, or sample counts for sample-weighted FedAvg.
    """
    mean = RunningMean()
    for tensors, weight in updates:
        mean.add(tensors, weight)
    return mean.result(previous)
