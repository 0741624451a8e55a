"""Streaming FedAvg over named tensors (ALGORITHM.md, Aggregation, eq. 22 and 24).

Why streaming: the aggregator folds each upload into running sums as it arrives, so memory
holds one accumulator per tensor key, never one copy per silo (DESIGN.md, One round, step 3).
Why per key: a domain expert is averaged only over the silos that trained it this round,
while the shared expert and W_t are averaged over all silos; keying the mean by tensor name
gives both behaviours from the same code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..params import TensorDict

__all__ = ["RunningMean", "fedavg"]


class RunningMean:
    """Streaming (weighted) mean per tensor key: memory holds one running sum per key, not one
    copy per silo.

    Sums are kept in float32 (float64 when a contribution is float64), so bf16 uploads do not
    lose precision while being added up.
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._weights: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._dtypes: dict[str, torch.dtype] = {}

    def add(self, tensors: Mapping[str, Tensor], weight: float = 1.0) -> None:
        """Fold one contribution (e.g. one silo's upload) into the running sums.

        The whole contribution is validated before anything is summed, so a bad upload
        leaves the state unchanged.
        """
        weight = float(weight)
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be a finite number > 0, got {weight}")
        for key, value in tensors.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"{key!r}: expected a torch.Tensor, got {type(value).__name__}")
            held = self._sums.get(key)
            if held is not None and held.shape != value.shape:
                raise ValueError(
                    f"shape mismatch for {key!r}: got {tuple(value.shape)}, "
                    f"earlier contributions had {tuple(held.shape)}"
                )
        for key, value in tensors.items():
            value = value.detach()
            held = self._sums.get(key)
            if held is None:
                acc_dtype = torch.promote_types(value.dtype, torch.float32)
                self._sums[key] = value.to(dtype=acc_dtype, copy=True).mul_(weight)
                self._weights[key] = weight
                self._counts[key] = 1
                self._dtypes[key] = value.dtype
            else:
                if held.dtype != torch.float64 and value.dtype == torch.float64:
                    held = self._sums[key] = held.double()
                held.add_(value.to(device=held.device, dtype=held.dtype), alpha=weight)
                self._weights[key] += weight
                self._counts[key] += 1

    def contributors(self, key: str) -> int:
        """How many contributions carried `key` (0 if none)."""
        return self._counts.get(key, 0)

    def keys(self) -> set[str]:
        """Keys that at least one contribution carried."""
        return set(self._sums)

    def result(self, previous: Mapping[str, Tensor] | None = None) -> TensorDict:
        """Mean of each key over the contributions that had it (eq. 22: expert j averaged over
        the silos that trained it; shared/W_t over all).

        Keys in `previous` that nobody sent keep their previous value (the same tensor, not a
        copy: experts nobody trained keep their values). Output dtype = dtype of the first
        contribution for that key (or of `previous` for untouched keys).
        """
        out: TensorDict = {}
        if previous is not None:
            for key, value in previous.items():
                if key not in self._sums:
                    out[key] = value
        for key, total in self._sums.items():
            out[key] = (total / self._weights[key]).to(self._dtypes[key])
        return out


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
