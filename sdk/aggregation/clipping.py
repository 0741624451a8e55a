"""Bounded influence: each silo's update is clipped to a norm bound before it is averaged.

Why: a silo with valid keys may still send an update scaled by 1e30 (finite, so no schema
check catches it); averaged in, it ruins the global model and every honest silo's next
round. An update is what the silo changed, `uploaded - sent` over all its tensors as one
vector; clipping scales it down to the bound, keeping its direction, so one silo moves the
average by at most bound / (number of silos). The adaptive bound is a multiple of the
median update norm of the round (as in Flower's and the robust-FL literature's norm
bounding): honest silos with alike data have alike norms, and a minority cannot move the
median, however large its updates.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

TensorDict = dict[str, Tensor]


@dataclass(frozen=True)
class ClipSettings:
    """`factor` x the round's median update norm (0: no adaptive bound), capped by `norm`
    (0: no fixed bound). Both 0: updates are not clipped."""

    factor: float = 5.0
    norm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("factor", "norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} = {value!r}: use a finite number >= 0 (0: off)")

    def bound(self, norms: Sequence[float]) -> float | None:
        """The clipping bound for a round whose updates have `norms`; None: no bound."""
        bounds = []
        if self.factor > 0 and norms:
            bounds.append(self.factor * statistics.median(norms))
        if self.norm > 0:
            bounds.append(self.norm)
        return min(bounds) if bounds else None


def update_norm(uploaded: Mapping[str, Tensor], sent: Mapping[str, Tensor]) -> float:
    """L2 norm of `uploaded - sent` over every uploaded tensor (a tensor the plan did not
    send counts whole), in float64."""
    total = 0.0
    for key, value in uploaded.items():
        delta = value.double() - _sent(sent, key, value)
        total += float(torch.sum(delta * delta))
    return math.sqrt(total)


def clip_update(
    uploaded: Mapping[str, Tensor], sent: Mapping[str, Tensor], bound: float | None
) -> tuple[TensorDict, float]:
    """`uploaded` with its update scaled to norm <= `bound`, and the scale used (1.0: as
    it was). Tensors keep their dtype."""
    norm = update_norm(uploaded, sent)
    if bound is None or norm <= bound:
        return dict(uploaded), 1.0
    scale = bound / norm
    out = {}
    for key, value in uploaded.items():
        base = _sent(sent, key, value)
        out[key] = (base + (value.double() - base) * scale).to(value.dtype)
    return out, scale


def _sent(sent: Mapping[str, Tensor], key: str, like: Tensor) -> Tensor:
    base = sent.get(key)
    if base is None:
        return torch.zeros(like.shape, dtype=torch.float64)
    return base.detach().to(device="cpu", dtype=torch.float64)
