"""LeaseLinear: a frozen nn.Linear plus FedLEASE's M cluster experts and adaptive router."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fedsilo.sdk.adapters.layer import AdapterLayer
from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.params import expert_key, gate_key

from .routing import adaptive_top_m, num_slots


class LeaseLinear(AdapterLayer):
    """y = W x + s sum_e w_e(x) B_e A_e drop(x), e over the module's M experts (one per
    cluster of silos), w from the adaptive top-M router (`routing.adaptive_top_m`).

    The silo trains only its own expert (its cluster's) and the router: the other experts
    are buffers, so no optimiser or DP-SGD noise can move them. `set_experts` takes the
    ids with the silo's own expert first; the ids must be 0..M-1 (every expert is held).
    With one expert there is no router and the layer is plain LoRA (FedLEASE's warm-up).
    """

    def __init__(self, base: nn.Linear, config: AMoLEConfig) -> None:
        super().__init__(base)
        self.config = config
        self.scaling = config.scaling
        self.lora_dropout: nn.Module = (
            nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        )
        dtype = torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else (
            base.weight.dtype
        )
        factory = {"device": base.weight.device, "dtype": dtype}
        self.expert_ids: list[int] = []
        self.own_A = nn.Parameter(torch.zeros(0, base.in_features, **factory))
        self.own_B = nn.Parameter(torch.zeros(base.out_features, 0, **factory))
        self.register_buffer("other_A", torch.zeros(0, 0, base.in_features, **factory))
        self.register_buffer("other_B", torch.zeros(0, base.out_features, 0, **factory))
        self.router: nn.Linear | None = None

    @property
    def own(self) -> int:
        """The silo's own (trained) expert."""
        return self.expert_ids[0]

    def set_experts(self, expert_ids: Sequence[int]) -> None:
        ids = [int(i) for i in expert_ids]
        if sorted(ids) != list(range(len(ids))) or not ids:
            raise ValueError(
                "a FedLEASE layer holds every expert 0..M-1, its own first; "
                f"got expert ids {ids}"
            )
        r, d_in, d_out, m = self.config.r, self.in_features, self.out_features, len(ids)
        # Where the layer's tensors are now (as AMoLELinear): the layer may have been moved
        # (model.to(device)) since __init__, and new experts must live beside the base.
        factory = {"device": self.own_A.device, "dtype": self.own_A.dtype}
        a = torch.empty(r, d_in, **factory)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.own_A = nn.Parameter(a)
        self.own_B = nn.Parameter(torch.zeros(d_out, r, **factory))
        self.other_A = torch.zeros(m - 1, r, d_in, **factory)
        self.other_B = torch.zeros(m - 1, d_out, r, **factory)
        self.router = nn.Linear(d_in, num_slots(m), bias=False, **factory) if m > 1 else None
        self.expert_ids = ids

    def _others(self) -> list[int]:
        """Expert ids of other_A/other_B's rows, in order."""
        return sorted(self.expert_ids[1:])

    def wire_tensors(self, name: str) -> dict[str, Tensor]:
        out = {expert_key(name, self.own, "A"): self.own_A, expert_key(name, self.own, "B"):
               self.own_B}
        for pos, expert in enumerate(self._others()):
            out[expert_key(name, expert, "A")] = self.other_A[pos]
            out[expert_key(name, expert, "B")] = self.other_B[pos]
        if self.router is not None:
            out[gate_key(name)] = self.router.weight
        return out

    def _stacked(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """All experts' A (M, r, d_in) and B (M, d_out, r) in id order."""
        own = self.own
        a = torch.cat([self.other_A[:own], self.own_A[None], self.other_A[own:]])
        b = torch.cat([self.other_B[:own], self.own_B[None], self.other_B[own:]])
        return a.to(dtype), b.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        result = self.base(x)
        if not self.expert_ids:
            return result
        dtype = self.base.weight.dtype
        lead = x.shape[:-1]
        h = x.reshape(-1, self.in_features).to(dtype)
        dropped = self.lora_dropout(h) if self.training else h
        a, b = self._stacked(dtype)
        m, r = a.shape[0], self.config.r
        proj = (dropped @ a.reshape(m * r, -1).T).view(-1, m, r)  # (N, M, r)
        if self.router is None:
            mixed = proj.reshape(-1, m * r)
        else:
            weights, _ = adaptive_top_m(h @ self.router.weight.to(dtype).T, self.own)
            mixed = (weights.unsqueeze(-1) * proj).reshape(-1, m * r)
        delta = mixed @ b.permute(1, 0, 2).reshape(self.out_features, m * r).T
        return result + (self.scaling * delta).view(*lead, self.out_features).to(result.dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.config.r}, "
            f"experts={self.expert_ids}"
        )
