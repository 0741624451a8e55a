"""Robust per-key aggregation: coordinate-wise median and trimmed mean (as Flower offers).

Why: the mean lets each silo pull the result by its whole (clipped) update; the median of
each coordinate ignores a minority of silos however they answer, and the trimmed mean
drops the `trim` share of highest and lowest values per coordinate before averaging.
Cost: these need every contribution at once, so memory holds one copy per silo per key
(the streaming mean holds one sum), and each coordinate is sorted over the silos
(O(C log C)); sample weights are not used (a claimed sample count cannot buy influence).
Same interface and key semantics as `RunningMean` (experts averaged over the silos that
trained them; untouched keys keep their previous value), so strategies take either.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..params import TensorDict
from .fedavg import RunningMean, TensorMean, parse_dtype
from .rules import RULES, Rule

__all__ = ["RULES", "RobustMean", "Rule", "new_mean"]


def new_mean(rule: Rule = "mean", trim: float = 0.1, min_contributors: int = 1) -> TensorMean:
    """The accumulator for `rule`: the streaming mean, or a robust rule over held values."""
    if rule == "mean":
        return RunningMean(min_contributors)
    if rule in ("median", "trimmed_mean"):
        return RobustMean(rule, trim, min_contributors)
    raise ValueError(f"aggregation {rule!r} is not known; use one of {', '.join(RULES)}")


class RobustMean(TensorMean):
    def __init__(self, rule: Rule = "median", trim: float = 0.1, min_contributors: int = 1
                 ) -> None:
        super().__init__(min_contributors)
        if rule not in ("median", "trimmed_mean"):
            raise ValueError(f"RobustMean rule must be 'median' or 'trimmed_mean', got {rule!r}")
        if not (isinstance(trim, (int, float)) and 0 <= trim < 0.5):
            raise ValueError(f"trim = {trim!r}: use a share in [0, 0.5)")
        self.rule, self.trim = rule, float(trim)
        self._values: dict[str, list[Tensor]] = {}
        self._dtypes: dict[str, torch.dtype] = {}

    def _shape(self, key: str) -> torch.Size | None:
        held = self._values.get(key)
        return held[0].shape if held else None

    def _fold(self, tensors: Mapping[str, Tensor], weight: float) -> None:
        """Hold one contribution (its weight was checked, and is ignored: see the module)."""
        for key, value in tensors.items():
            self._values.setdefault(key, []).append(value.detach().to("cpu", copy=True))
            self._dtypes.setdefault(key, value.dtype)

    def contributors(self, key: str) -> int:
        return len(self._values.get(key, ()))

    def keys(self) -> set[str]:
        return set(self._values)

    def combined(self, key: str) -> Tensor:
        """Sorted over silos per coordinate, so the arrival order does not matter."""
        ordered = torch.stack([v.double() for v in self._values[key]]).sort(dim=0).values
        n = ordered.shape[0]
        if self.rule == "trimmed_mean":
            k = math.floor(self.trim * n)
            if n - 2 * k >= 1:
                return ordered[k : n - k].mean(dim=0).to(self._dtypes[key])
        middle = ordered[(n - 1) // 2 : n // 2 + 1]  # one value (odd n) or the two middle ones
        return middle.mean(dim=0).to(self._dtypes[key])

    def state_dict(self) -> tuple[TensorDict, dict[str, Any]]:
        tensors = {f"{key}/{i}": v.clone() for key, vs in self._values.items()
                   for i, v in enumerate(vs)}
        meta = {
            "rule": self.rule, "trim": self.trim, "names": sorted(tensors),
            "counts": {key: len(vs) for key, vs in self._values.items()},
            "dtypes": {key: str(d).removeprefix("torch.") for key, d in self._dtypes.items()},
        }
        return tensors, meta

    @staticmethod
    def tensor_names(meta: Mapping[str, Any]) -> list[str]:
        return list(meta["names"])

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        counts, dtypes = meta["counts"], meta["dtypes"]
        if set(counts) != set(dtypes):
            raise ValueError("RobustMean state is inconsistent: counts and dtypes differ")
        self._values = {key: [tensors[f"{key}/{i}"].clone() for i in range(int(n))]
                        for key, n in counts.items()}
        self._dtypes = {key: parse_dtype(name) for key, name in dtypes.items()}
