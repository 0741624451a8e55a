"""AMoLELinear: a frozen nn.Linear plus a shared LoRA expert and routed LoRA domain experts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fedsilo.sdk.adapters.layer import AdapterLayer
from fedsilo.sdk.params import expert_key, router_key, shared_key

from .config import AMoLEConfig
from .routing import route


@dataclass
class EmbeddingAccumulator:
    """Per-example token sums gathered by one layer while the model embeds a data set.

    One entry per forward call: query_sums (B, r) = sum over real tokens of W_t x,
    key_sums (B, n, r) = sum over real tokens of A_j x, counts (B,) = number of real tokens.
    Kept as sums (float32) so that both token-pooled means and per-example means follow.
    """

    query_sums: list[Tensor] = field(default_factory=list)
    key_sums: list[Tensor] = field(default_factory=list)
    counts: list[Tensor] = field(default_factory=list)


def _init_lora_A(rows: int, cols: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """LoRA A init (kaiming-uniform, a=sqrt(5)), one draw per call so experts differ."""
    weight = torch.empty(rows, cols, device=device, dtype=dtype)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


class AMoLELinear(AdapterLayer):
    """y = W x + s B_s A_s drop(x) + sum_{j in top-k} g_j s B_j A_j drop(x)   (eqs. 8-15).

    The backbone weight stays frozen. Adapter parameters are kept in float32 whatever the base
    dtype (small Adam steps vanish in bf16) and cast to the base layer's dtype for the forward.
    Experts are stacked so the whole expert mix is two matmuls, with no loop over experts.
    """

    def __init__(
        self, base: nn.Linear, config: AMoLEConfig, expert_ids: Sequence[int] = ()
    ) -> None:
        super().__init__(base)
        self.config = config
        r, d_in, d_out = config.r, base.in_features, base.out_features
        device = base.weight.device
        param_dtype = self._param_dtype(base.weight.dtype)

        self.shared_A = nn.Parameter(_init_lora_A(r, d_in, device=device, dtype=param_dtype))
        self.shared_B = nn.Parameter(torch.zeros(d_out, r, device=device, dtype=param_dtype))
        self.token_proj: nn.Linear | None = (
            nn.Linear(d_in, r, bias=False, device=device, dtype=param_dtype)
            if config.use_router
            else None
        )
        self.lora_dropout: nn.Module = (
            nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        )
        self.scaling = config.scaling
        dim = r if config.score_scale == "r" else d_in
        self.score_scale = 1.0 / math.sqrt(dim)

        # Set by compute_embeddings; inert otherwise.
        self.embedding_accumulator: EmbeddingAccumulator | None = None

        self.expert_ids: list[int] = []
        self.expert_A = nn.Parameter(torch.zeros(0, r, d_in, device=device, dtype=param_dtype))
        self.expert_B = nn.Parameter(torch.zeros(0, d_out, r, device=device, dtype=param_dtype))
        self.set_experts(expert_ids)

    @staticmethod
    def _param_dtype(base_dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype

    def set_experts(
        self,
        expert_ids: Sequence[int],
        tensors: Mapping[int, tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        """Replace the local expert set in place, without rebuilding the model.

        Experts in `tensors` take those (A, B) values; the others start fresh (A kaiming-uniform,
        drawn separately per expert so they differ; B zeros, so a new expert changes nothing
        until trained). New Parameter objects are created: build the optimizer afterwards.
        """
        ids = [int(i) for i in expert_ids]
        if len(set(ids)) != len(ids) or any(i < 0 for i in ids):
            raise ValueError(f"expert ids must be distinct non-negative integers, got {ids}")
        if ids and not self.config.use_router:
            raise ValueError(
                "this layer has use_router=False (plain LoRA): it holds no domain experts, "
                f"got expert ids {ids}"
            )
        tensors = tensors or {}
        unknown = sorted(set(tensors) - set(ids))
        if unknown:
            raise ValueError(f"tensors given for experts {unknown} that are not in {ids}")
        r, d_in, d_out = self.config.r, self.in_features, self.out_features
        device, dtype = self.shared_A.device, self.shared_A.dtype
        a_list, b_list = [], []
        for i in ids:
            if i in tensors:
                a, b = tensors[i]
                if tuple(a.shape) != (r, d_in) or tuple(b.shape) != (d_out, r):
                    raise ValueError(
                        f"expert {i}: expected A {(r, d_in)} and B {(d_out, r)}, "
                        f"got A {tuple(a.shape)} and B {tuple(b.shape)}"
                    )
                a_list.append(a.detach().to(device=device, dtype=dtype))
                b_list.append(b.detach().to(device=device, dtype=dtype))
            else:
                a_list.append(_init_lora_A(r, d_in, device=device, dtype=dtype))
                b_list.append(torch.zeros(d_out, r, device=device, dtype=dtype))
        if ids:
            new_A, new_B = torch.stack(a_list), torch.stack(b_list)
        else:
            new_A = torch.zeros(0, r, d_in, device=device, dtype=dtype)
            new_B = torch.zeros(0, d_out, r, device=device, dtype=dtype)
        self.expert_A = nn.Parameter(new_A.clone())
        self.expert_B = nn.Parameter(new_B.clone())
        self.expert_ids = ids

    def wire_tensors(self, name: str) -> dict[str, Tensor]:
        out = {shared_key(name, "A"): self.shared_A, shared_key(name, "B"): self.shared_B}
        if self.token_proj is not None:
            out[router_key(name)] = self.token_proj.weight
        for pos, expert_id in enumerate(self.expert_ids):
            out[expert_key(name, expert_id, "A")] = self.expert_A[pos]
            out[expert_key(name, expert_id, "B")] = self.expert_B[pos]
        return out

    def plain_lora(self) -> tuple[nn.Parameter, nn.Parameter] | None:
        """The shared expert when the layer has no router (FedIT, FDLoRA: plain LoRA)."""
        return (self.shared_A, self.shared_B) if self.token_proj is None else None

    def swap_plain_lora(
        self, a: nn.Parameter, b: nn.Parameter
    ) -> tuple[nn.Parameter, nn.Parameter]:
        own = self.plain_lora()
        if own is None:
            return super().swap_plain_lora(a, b)
        self.shared_A, self.shared_B = a, b
        return own

    def _real_token_mask(self, lead_shape: torch.Size, device: torch.device) -> Tensor:
        """token_mask flattened to (N,), or all-True when it is unset or does not fit x.

        It does not fit e.g. during cached generation (x holds only the new token); the mask
        only affects statistics, so falling back to 'all real' is always safe.
        """
        n_tokens = math.prod(lead_shape)
        mask = self.token_mask
        if mask is not None and (
            tuple(mask.shape) == tuple(lead_shape)
            or (len(lead_shape) == 1 and mask.numel() == n_tokens)
        ):
            return mask.reshape(-1).to(device=device, dtype=torch.bool)
        return torch.ones(n_tokens, dtype=torch.bool, device=device)

    def forward(self, x: Tensor) -> Tensor:
        result = self.base(x)
        dtype = self.base.weight.dtype
        lead = x.shape[:-1]
        h = x.reshape(-1, self.in_features).to(dtype)  # (N, d_in)
        n_tokens, n, r = h.shape[0], self.num_experts, self.config.r
        use_dropout = self.training and self.config.dropout > 0
        dropped = self.lora_dropout(h) if use_dropout else h

        delta = (dropped @ self.shared_A.to(dtype).T) @ self.shared_B.to(dtype).T  # (N, d_out)

        routed = n > 0 or self.embedding_accumulator is not None
        if self.token_proj is not None and routed:
            query = h @ self.token_proj.weight.to(dtype).T  # (N, r)
            a_flat = self.expert_A.to(dtype).reshape(n * r, self.in_features)
            keys = (h @ a_flat.T).view(n_tokens, n, r)  # routing sees x without dropout
            if n > 0:
                probs, gates, topk_idx = route(query, keys, self.config.top_k, self.score_scale)
                if self.record_routing:
                    self.last_probs, self.last_topk = probs, topk_idx
                proj = (dropped @ a_flat.T).view(n_tokens, n, r) if use_dropout else keys
                mixed = (gates.unsqueeze(-1) * proj).reshape(n_tokens, n * r)
                # B_flat[:, j*r + q] = B_j[:, q], matching mixed's layout: one matmul for all.
                b_flat = self.expert_B.to(dtype).permute(1, 0, 2).reshape(self.out_features, -1)
                delta = delta + mixed @ b_flat.T
            if self.embedding_accumulator is not None:
                self._accumulate(self.embedding_accumulator, query, keys, lead)

        return result + (self.scaling * delta).view(*lead, self.out_features).to(result.dtype)

    @torch.no_grad()
    def _accumulate(
        self, acc: EmbeddingAccumulator, query: Tensor, keys: Tensor, lead: torch.Size
    ) -> None:
        """Add per-example sums over real tokens of W_t x and A_j x to the accumulator."""
        batch = lead[0] if len(lead) >= 2 else 1
        steps = math.prod(lead) // max(batch, 1)
        n, r = keys.shape[-2], keys.shape[-1]
        real = self._real_token_mask(lead, query.device).float().view(batch, steps)
        q = query.float().view(batch, steps, r)
        k = keys.float().view(batch, steps, n, r)
        acc.query_sums.append(torch.einsum("bt,btr->br", real, q))
        acc.key_sums.append(torch.einsum("bt,btnr->bnr", real, k))
        acc.counts.append(real.sum(dim=1))

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"in={self.in_features}, out={self.out_features}, r={c.r}, alpha={c.alpha}, "
            f"top_k={c.top_k}, router={c.use_router}, experts={self.expert_ids}"
        )
