"""What a set of tensors looks like (names, shapes, dtypes), without the tensors: the
strategies declare the upload they expect with it, and privacy.validation checks received
tensors against it. Pure description, so it sits in sdk, below everything that checks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: Tensor) -> TensorSpec:
        return cls(tuple(tensor.shape), tensor.dtype)


Schema = Mapping[str, TensorSpec]


def schema_of(tensors: Mapping[str, Tensor]) -> dict[str, TensorSpec]:
    return {name: TensorSpec.of(t) for name, t in tensors.items()}


__all__ = ["Schema", "TensorSpec", "schema_of"]
