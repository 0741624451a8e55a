"""Routing math of the AMoLE module (eqs. 8-11, 19-20), as pure functions on tensors.

The router of an AMoLE module has no per-expert weights: a token's query t = W_t x and each
local expert's key e_j = A_j x live in the same r-dimensional space, so the router's shape does
not depend on how many experts a silo holds (what makes it FedAvg-compatible).
"""

from __future__ import annotations

import torch
from torch import Tensor


def route(query: Tensor, keys: Tensor, top_k: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax over the local experts of scale * (query . key_j), then renormalised top-k gates.

    query (..., r), keys (..., n, r) ->
      probs (..., n): routing probabilities p_j,
      gates (..., n): the top-k probs renormalised to sum to 1 (as the authors' code does), zero
                      for experts not chosen; dense so the expert mix is one matmul,
      topk_idx (..., k) with k = min(top_k, n).
    The softmax and top-k run in float32 (bf16 logits tie and round badly); probs and gates are
    returned in the query's dtype.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    n = keys.shape[-2]
    lead = torch.broadcast_shapes(query.shape[:-1], keys.shape[:-2])
    if n == 0:
        empty = query.new_zeros((*lead, 0))
        return empty, empty.clone(), torch.zeros((*lead, 0), dtype=torch.long, device=query.device)
    k = min(top_k, n)
    logits = torch.einsum("...r,...nr->...n", query, keys).float() * scale
    probs = logits.softmax(dim=-1)
    top_probs, topk_idx = probs.topk(k, dim=-1)
    gates = torch.zeros_like(probs).scatter(
        -1, topk_idx, top_probs / top_probs.sum(dim=-1, keepdim=True)
    )
    return probs.to(query.dtype), gates.to(query.dtype), topk_idx


def load_balance_loss(probs: Tensor, topk_idx: Tensor, mask: Tensor | None = None) -> Tensor:
    """Switch-style load balance n * sum_j f_j * P_j over the real tokens (eqs. 19-20).

    probs (N, n), topk_idx (N, k), mask (N,) bool marking real tokens (None: all real).
    f_j is the fraction of the N_real * k top-k picks that went to expert j (the authors' code
    counts top-k picks, the paper top-1), P_j the mean routing probability of j. Padding is
    excluded (the authors' code counts it; masking it is better). Equals 1 when perfectly
    balanced; 0 when there are no experts or no real tokens. Computed in float32 and
    differentiable through probs.
    """
    n = probs.shape[-1]
    if n == 0 or probs.shape[0] == 0 or topk_idx.shape[-1] == 0:
        return probs.new_zeros((), dtype=torch.float32)
    probs = probs.float()
    if mask is None:
        real = torch.ones(probs.shape[0], dtype=torch.float32, device=probs.device)
    else:
        real = mask.reshape(-1).to(device=probs.device, dtype=torch.float32)
        if real.shape[0] != probs.shape[0]:
            raise ValueError(
                f"mask has {real.shape[0]} entries but probs has {probs.shape[0]} tokens"
            )
    n_real = real.sum().clamp(min=1.0)  # no real token: f and P are 0, and so is the loss
    k = topk_idx.shape[-1]
    picks = torch.zeros_like(probs).scatter_add(
        -1, topk_idx, torch.ones_like(topk_idx, dtype=probs.dtype)
    )  # (N, n): how many of a token's top-k picks went to j (0 or 1)
    f = (picks * real[:, None]).sum(0) / (n_real * k)
    p_mean = (probs * real[:, None]).sum(0) / n_real
    return n * (f * p_mean).sum()
