"""Model-level AMoLE: the load-balance loss of a forward and the RSEA embeddings of a data set.

The generic helpers (inject, install, extract, fuse) are in `fedsilo.sdk.adapters.model`;
what is here needs AMoLE's router (W_t, the experts' A as keys), so only AMoLE layers have it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedsilo.sdk.adapters.model import adapter_layers, device_of, layers_or_raise
from fedsilo.sdk.params import TensorDict, client_embedding_key, expert_embedding_key

from .layer import AMoLELinear, EmbeddingAccumulator
from .routing import load_balance_loss


def load_balance(model: nn.Module, mask: Tensor | None) -> Tensor:
    """Sum over routed layers of the load-balance loss of their last forward (eq. 19).

    mask: the batch's attention mask (real tokens); None counts every token. Multiply by
    config.lb_coef (beta) yourself. A 0-dim zero when no layer routed anything.
    """
    total: Tensor | None = None
    for layer in adapter_layers(model).values():
        if layer.last_probs is None or layer.last_topk is None:
            continue
        n_tokens = layer.last_probs.shape[0]
        flat = mask.reshape(-1) if mask is not None and mask.numel() == n_tokens else None
        loss = load_balance_loss(layer.last_probs, layer.last_topk, flat)
        total = loss if total is None else total + loss.to(total.device)
    if total is None:
        return torch.zeros((), device=device_of(model))
    return total


@dataclass
class ModuleEmbedding:
    """One module's RSEA embeddings on a silo: h_t (eq. 23) and h_e per local expert (eq. 25)."""

    client: Tensor  # (r,); per example (N, r)
    experts: dict[int, Tensor]  # expert id -> (r,); per example (N, r)


@dataclass(frozen=True)
class TokenSums:
    """One module's pass over the embedding set: per-example sums over real tokens, enough
    for both the pooled embeddings (eqs. 23, 25) and the per-example vectors DP clips."""

    query: Tensor  # (N, r): per-example sum over real tokens of W_t x
    keys: Tensor  # (N, n, r): per-example sum over real tokens of A_j x
    counts: Tensor  # (N,): real tokens per example
    expert_ids: tuple[int, ...]  # the order of `keys`' second dimension

    def means(self, per_example: bool = False) -> tuple[Tensor, Tensor]:
        """Token means (client (r,), experts (n, r)): pooled, sum of token vectors / number
        of real tokens over the whole set (eqs. 23, 25), not a mean of per-example means;
        or per example (client (N, r), experts (N, n, r)), each over its own real tokens."""
        if per_example:
            query, keys, counts = self.query, self.keys, self.counts.clamp(min=1.0)[:, None]
        else:
            query, keys = self.query.sum(0), self.keys.sum(0)
            counts = self.counts.sum().clamp(min=1.0)
        return query / counts, keys / counts[..., None]


def embedding_sums(
    model: nn.Module, batches: Iterable[Mapping[str, Tensor]]
) -> dict[str, TokenSums]:
    """Run the model over `batches` (eval, no_grad) with its current parameters and gather
    per-example token sums per layer (float32, CPU)."""
    layers = {
        name: layer for name, layer in layers_or_raise(model).items()
        if isinstance(layer, AMoLELinear) and layer.token_proj is not None
    }
    no_router = [name for name in adapter_layers(model) if name not in layers]
    if no_router:
        raise ValueError(
            f"embeddings need the AMoLE router (W_t), but {no_router[0]} has none "
            "(use_router=False, or not an AMoLE layer)"
        )
    accumulators = {name: EmbeddingAccumulator() for name in layers}
    device = device_of(model)
    was_training = model.training
    model.eval()
    try:
        for name, layer in layers.items():
            layer.embedding_accumulator = accumulators[name]
        with torch.no_grad():
            for batch in batches:
                input_ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
                for layer in layers.values():
                    layer.token_mask = mask.bool()
                model(input_ids=input_ids, attention_mask=mask)
    finally:
        for layer in layers.values():
            layer.embedding_accumulator = None
            layer.token_mask = None
        model.train(was_training)

    out: dict[str, TokenSums] = {}
    for name, layer in layers.items():
        acc = accumulators[name]
        r, n, ids = layer.config.r, layer.num_experts, tuple(layer.expert_ids)
        if acc.counts:
            out[name] = TokenSums(
                query=torch.cat(acc.query_sums).cpu(),
                keys=torch.cat(acc.key_sums).cpu(),
                counts=torch.cat(acc.counts).cpu(),
                expert_ids=ids,
            )
        else:
            out[name] = TokenSums(torch.zeros(0, r), torch.zeros(0, n, r), torch.zeros(0), ids)
    return out


def client_sums_from(
    sums: Mapping[str, TokenSums], received: Mapping[str, TokenSums]
) -> dict[str, TokenSums]:
    """`sums` with each module's client part (W_t x) taken from `received`, a pass over the
    same embedding set made earlier (e.g. with the token projection as received, before
    local training): so every silo's client embedding uses the same shared W_t."""
    if set(sums) != set(received):
        differ = sorted(set(sums) ^ set(received))[:3]
        raise ValueError(f"the two embedding passes cover different modules, e.g. {differ}")
    out = {}
    for name, now in sums.items():
        before = received[name]
        if not torch.equal(before.counts, now.counts):
            raise ValueError(
                f"the two embedding passes of {name} saw different examples or tokens; make "
                "both over the same embedding set, in the same order"
            )
        out[name] = TokenSums(before.query, now.keys, now.counts, now.expert_ids)
    return out


def _embeddings(sums: Mapping[str, TokenSums], per_example: bool) -> dict[str, ModuleEmbedding]:
    """The one path from token sums to embeddings, pooled or per example (`TokenSums.means`)."""
    out: dict[str, ModuleEmbedding] = {}
    for name, module in sums.items():
        client, experts = module.means(per_example)
        out[name] = ModuleEmbedding(
            client=client,
            experts={eid: experts[..., pos, :] for pos, eid in enumerate(module.expert_ids)},
        )
    return out


def pooled_embeddings(sums: Mapping[str, TokenSums]) -> dict[str, ModuleEmbedding]:
    """Eqs. 23 and 25: per module, the mean of W_t x and of each A_j x over all real tokens
    (token-pooled, not a mean of per-example means)."""
    return _embeddings(sums, per_example=False)


def per_example_embedding_tensors(sums: Mapping[str, TokenSums]) -> TensorDict:
    """Wire keys of `embeddings_to_tensors`, each holding one row per example (N, r): the
    input of differentially private release, which clips each example's whole vector."""
    return embeddings_to_tensors(_embeddings(sums, per_example=True))


def compute_embeddings(
    model: nn.Module, batches: Iterable[Mapping[str, Tensor]]
) -> dict[str, ModuleEmbedding]:
    """The pooled embeddings of `model` as it is now on `batches` (float32, CPU)."""
    return pooled_embeddings(embedding_sums(model, batches))


def compute_embeddings_per_example(
    model: nn.Module, batches: Iterable[Mapping[str, Tensor]]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-example token means of `model` on `batches`: {module: (client (N, r), experts
    (N, n, r))}, experts in the layer's expert_ids order (what DP clips, stacked)."""
    return {
        name: module.means(per_example=True)
        for name, module in embedding_sums(model, batches).items()
    }


def embeddings_to_tensors(emb: Mapping[str, ModuleEmbedding]) -> TensorDict:
    """Wire form: '{module}.client' and '{module}.expert.{id}' (see fedsilo.sdk.params)."""
    out: TensorDict = {}
    for module, embedding in emb.items():
        out[client_embedding_key(module)] = embedding.client
        for expert_id, value in embedding.experts.items():
            out[expert_embedding_key(module, expert_id)] = value
    return out
