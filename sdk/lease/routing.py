"""FedLEASE's adaptive top-M routing, as a pure function on tensors.

A module with M experts has a router with 2M-1 outputs: slots 0..M-1 stand for experts
0..M-1 and slots M..2M-2 all stand for the silo's assigned expert. Of the 2M-1 slots only
M-1 stand for other experts, so every top-M pick holds the assigned expert at least once,
and the number of distinct experts a token uses (1..M) is learned, not fixed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def num_slots(num_experts: int) -> int:
    """Router outputs for M experts."""
    return 2 * num_experts - 1


def slot_experts(num_experts: int, assigned: int, device: torch.device | None = None) -> Tensor:
    """The expert each router slot stands for: (0, 1, .., M-1, assigned x (M-1))."""
    if not 0 <= assigned < num_experts:
        raise ValueError(f"assigned expert {assigned} is not one of the {num_experts} experts")
    own = torch.full((num_experts - 1,), assigned, dtype=torch.long, device=device)
    return torch.cat([torch.arange(num_experts, device=device), own])


def adaptive_top_m(logits: Tensor, assigned: int) -> tuple[Tensor, Tensor]:
    """Router logits (..., 2M-1) -> expert weights (..., M) and the chosen experts (..., M).

    Softmax over the slots, keep the top M, renormalise them to sum to 1, and add up the
    weights of slots that stand for the same expert. The softmax runs in float32; weights
    come back in the logits' dtype.
    """
    slots = logits.shape[-1]
    if slots < 1 or slots % 2 == 0:
        raise ValueError(f"a FedLEASE router has 2M-1 outputs (odd), got {slots}")
    m = (slots + 1) // 2
    probs = logits.float().softmax(dim=-1)
    top, idx = probs.topk(m, dim=-1)
    top = top / top.sum(dim=-1, keepdim=True)
    experts = slot_experts(m, assigned, logits.device)[idx]  # (..., M)
    weights = torch.zeros_like(probs[..., :m]).scatter_add(-1, experts, top)
    return weights.to(logits.dtype), experts
