"""Received tensors are checked against what the receiver expects before anything touches
a model: a malicious or broken silo must not be able to poison the aggregate with a NaN, a
tensor of the wrong shape, or an update blown up to an enormous norm."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fedsilo.sdk.refusal import Refusal
from fedsilo.sdk.schema import Schema, TensorSpec


class InvalidTensors(Refusal, ValueError):
    """Tensors that must not be used."""


def _names(names: set[str], limit: int = 5) -> str:
    shown = sorted(names)[:limit]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more


def check_tensors(
    tensors: Mapping[str, Tensor],
    expected: Schema | None,
    *,
    what: str,
    max_norm: float | None = None,
) -> None:
    """Raise `InvalidTensors` unless `tensors` has exactly the names, shapes and dtypes of
    `expected` (None: any names), only finite values, and (if `max_norm`) no tensor with an
    L2 norm above it. `what` names the tensors in messages ("upload params of silo-2")."""
    if expected is not None:
        missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {_names(missing)}")
            if unexpected:
                parts.append(f"unexpected {_names(unexpected)}")
            raise InvalidTensors("tensor schema", f"{what}: " + "; ".join(parts))
        for name, spec in expected.items():
            got = TensorSpec.of(tensors[name])
            if got != spec:
                raise InvalidTensors(
                    "tensor schema",
                    f"{what}: {name} is {list(got.shape)} {got.dtype}, expected "
                    f"{list(spec.shape)} {spec.dtype}",
                )
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise InvalidTensors("tensor schema", f"{what}: {name} is {tensor.dtype}, not float")
        if not bool(torch.isfinite(tensor).all()):
            raise InvalidTensors("non-finite", f"{what}: {name} holds NaN or Inf values")
        if max_norm is not None:
            norm = float(torch.linalg.vector_norm(tensor.double()))
            if not norm <= max_norm:
                raise InvalidTensors(
                    "norm bound",
                    f"{what}: {name} has L2 norm {norm:.4g} > the bound {max_norm:g}",
                )


#: What an upload's report (metrics, timings) may hold: how many entries, key length, and
#: the range of the values with a meaning (scores are accuracies or Rouge-L F in [0, 1]).
MAX_REPORT_ENTRIES = 32
MAX_REPORT_KEY = 64
MAX_REPORT_VALUE = 1e12
REPORT_RANGES = {"metric": (0.0, 1.0), "val_metric": (0.0, 1.0)}


@dataclass(frozen=True)
class UploadLimits:
    """What one upload may hold, checked before it touches any sum. Norm bounds are per
    tensor (None: none). The embedding bound keeps RSEA's scores finite (honest embeddings
    of SmolLM2-135M and the built-in model have norms about 1, DP ones about `dp.clip`);
    the sample count bounds what a silo can claim under `weighting = "samples"`."""

    max_param_norm: float | None = None
    max_embedding_norm: float | None = 1e4
    max_samples: int = 100_000_000
    max_seconds: float = 1e7  # a timing above 115 days is not a measurement

    def check_report(
        self, metrics: Mapping[str, float], timings: Mapping[str, float], what: str
    ) -> None:
        """An upload's scores and timings go into the round's table, MTAL and every
        checkpoint (plain JSON): each must be a finite number in its range, or one silo
        could stop the federation with an infinite score or bloat its state."""
        for kind, values in (("metrics", metrics), ("timings", timings)):
            if len(values) > MAX_REPORT_ENTRIES:
                raise InvalidTensors("report", f"{what}: {len(values)} {kind} entries, more "
                                     f"than the {MAX_REPORT_ENTRIES} a silo sends")
            for key, value in values.items():
                if not isinstance(key, str) or not 0 < len(key) <= MAX_REPORT_KEY:
                    raise InvalidTensors("report", f"{what}: {kind} key {key!r} is not a "
                                         f"name of 1..{MAX_REPORT_KEY} characters")
                low, high = (0.0, self.max_seconds) if kind == "timings" else REPORT_RANGES.get(
                    key, (-MAX_REPORT_VALUE, MAX_REPORT_VALUE))
                if key == "test_n":
                    high = float(self.max_samples)
                if (isinstance(value, bool) or not isinstance(value, int | float)
                        or not low <= value <= high):
                    raise InvalidTensors("report", f"{what}: {kind} {key} = {value!r} is not "
                                         f"a number in [{low:g}, {high:g}]")
            if kind == "metrics" and "test_n" in values and values["test_n"] != int(
                    values["test_n"]):
                raise InvalidTensors("report", f"{what}: metrics test_n = {values['test_n']!r} "
                                     "is not a whole number of examples")

    def check_samples(self, n_samples: object, what: str) -> None:
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or not (
            1 <= n_samples <= self.max_samples
        ):
            raise InvalidTensors(
                "sample count",
                f"{what}: n_samples = {n_samples!r} is not a whole number in "
                f"1..{self.max_samples} (security.max_samples)",
            )


def norm_bound(value: float) -> float | None:
    """Config convention: 0 (or inf) means no bound."""
    return None if value <= 0 or math.isinf(value) else value


__all__ = [
    "InvalidTensors",
    "UploadLimits",
    "check_tensors",
    "norm_bound",
]
