"""Initial global adapter tensors, built by the aggregator from shapes alone (no weights)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedsilo.sdk.params import ModuleShape, TensorDict, expert_key, router_key, shared_key


def kaiming_a(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """nn.Linear's default init (kaiming-uniform, a = sqrt 5): LoRA A and W_t use it."""
    weight = torch.empty(rows, cols)
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    return weight


def initial_params(
    shapes: Mapping[str, ModuleShape],
    r: int,
    num_experts: int,
    use_router: bool,
    generator: torch.Generator,
) -> TensorDict:
    """Shared expert, W_t and the pool of `num_experts` domain experts per module.

    Each expert gets its own A draw so experts differ from the start; every B is zero so
    the adapted model starts equal to the base model."""
    params: TensorDict = {}
    for module, shape in shapes.items():
        params[shared_key(module, "A")] = kaiming_a(r, shape.in_features, generator)
        params[shared_key(module, "B")] = torch.zeros(shape.out_features, r)
        if use_router:
            params[router_key(module)] = kaiming_a(r, shape.in_features, generator)
        for j in range(num_experts):
            params[expert_key(module, j, "A")] = kaiming_a(r, shape.in_features, generator)
            params[expert_key(module, j, "B")] = torch.zeros(shape.out_features, r)
    return params
