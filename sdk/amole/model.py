"""Model-level AMoLE: inject layers, move the travelling tensors in and out, embed data.

Everything here addresses layers by their dotted path in the base model, the same names
`fedsilo.sdk.params` uses on the wire, so silo and aggregator agree without sharing objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedsilo.sdk.adapter_layer import AdapterLayer
from fedsilo.sdk.lease.layer import LeaseLinear
from fedsilo.sdk.params import (
    ModuleShape,
    TensorDict,
    client_embedding_key,
    expert_embedding_key,
    parse_expert_param,
)

from .config import AMoLEConfig
from .layer import AMoLELinear, EmbeddingAccumulator
from .routing import load_balance_loss


def is_target(name: str, target_modules: Iterable[str]) -> bool:
    """The one rule (used by silos and the aggregator alike) for which layers are adapted."""
    return name.rsplit(".", 1)[-1] in set(target_modules)


def linear_shapes(model: nn.Module) -> dict[str, ModuleShape]:
    """Every nn.Linear of a base model: what a silo announces, so the aggregator (which
    holds no model) can pick the adapted modules and check every silo has the same model."""
    return {
        name: ModuleShape(in_features=mod.in_features, out_features=mod.out_features)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear)
    }


def target_shapes(
    shapes: Mapping[str, ModuleShape], target_modules: Iterable[str]
) -> dict[str, ModuleShape]:
    """The adapted modules among `linear_shapes`, in model order (as `module_shapes`)."""
    targets = set(target_modules)
    return {name: shape for name, shape in shapes.items() if is_target(name, targets)}


def inject_amole(model: nn.Module, config: AMoLEConfig) -> dict[str, AdapterLayer]:
    """Wrap every targeted nn.Linear in an adapter layer (AMoLELinear, or LeaseLinear when
    config.layer is "lease") and freeze everything else.

    A layer is targeted when the last component of its dotted name is in
    config.target_modules (LLaMA: q_proj/v_proj; BERT: query/value). Layers start with no
    domain experts: call set_assignment. Returns {dotted path: layer}.
    """
    if adapter_layers(model):
        raise ValueError("model already has adapter layers; inject into a fresh model")
    targets = set(config.target_modules)
    linear_names = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    chosen = [name for name in linear_names if is_target(name, targets)]
    if not chosen:
        available = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
        raise ValueError(
            f"no nn.Linear named {sorted(targets)} in {type(model).__name__}; "
            f"linear layer names available: {available[:12]}"
        )
    model.requires_grad_(False)
    layers: dict[str, AdapterLayer] = {}
    for name in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, attr)
        kind = LeaseLinear if config.layer == "lease" else AMoLELinear
        layer = kind(base, config).train(base.training)  # keep the model's train/eval mode
        setattr(parent, attr, layer)
        layers[name] = layer
    return layers


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """All adapter layers by dotted path, in named_modules order (stable across processes)."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, AdapterLayer)}


def _layers_or_raise(model: nn.Module) -> dict[str, AdapterLayer]:
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapter layers; call inject_amole first")
    return layers


def module_shapes(model: nn.Module) -> dict[str, ModuleShape]:
    """What the aggregator needs to build a module's global state, with no weights."""
    return {
        name: ModuleShape(in_features=layer.in_features, out_features=layer.out_features)
        for name, layer in adapter_layers(model).items()
    }


@contextmanager
def routing_context(
    model: nn.Module, attention_mask: Tensor | None, record: bool = True
) -> Iterator[None]:
    """Tell every layer which tokens are real and whether to keep routing stats for the LB loss.

    Inside, each forward overwrites layer.last_probs / last_topk; call load_balance after the
    forward that the loss belongs to. Everything is cleared on exit.
    """
    layers = list(adapter_layers(model).values())
    mask = attention_mask.bool() if attention_mask is not None else None
    for layer in layers:
        layer.token_mask = mask
        layer.record_routing = record
    try:
        yield
    finally:
        for layer in layers:
            layer.token_mask = None
            layer.record_routing = False
            layer.last_probs = None
            layer.last_topk = None


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
        return torch.zeros((), device=_device_of(model))
    return total


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def stacked_lora(
    module: str, adapters: Sequence[Mapping[str, Tensor]], weights: Sequence[float],
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Module `module`'s sum_k w_k B_k A_k as one LoRA of rank K*r: (A (K*r, d_in),
    B (d_out, K*r)). Shared by `fused_lora` and FDLoRA's export, so both give the same bits."""
    a_key, b_key = f"{module}.shared.A", f"{module}.shared.B"
    a = torch.cat([adapter[a_key].to(device, dtype) for adapter in adapters])
    b = torch.cat(
        [w * adapter[b_key].to(device, dtype) for adapter, w in zip(adapters, weights,
                                                                    strict=True)],
        dim=1,
    )
    return a, b


@contextmanager
def fused_lora(
    model: nn.Module, adapters: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
) -> Iterator[None]:
    """Inside, every plain-LoRA layer computes s * sum_k w_k B_k A_k x (FDLoRA's fusion of
    its shared and personal adapters), the layer's own shared tensors set aside.

    Exact in any dtype, with no weight merged: the K adapters are stacked into one LoRA of
    rank K*r (A_k rows on top of each other, w_k B_k side by side).
    """
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(f"{len(adapters)} adapters for {len(weights)} weights")
    layers = _layers_or_raise(model)
    saved: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
    try:
        for name, layer in layers.items():
            if not isinstance(layer, AMoLELinear) or layer.token_proj is not None:
                raise ValueError(f"{name}: fusion works on plain LoRA layers (use_router=False)")
            a, b = stacked_lora(name, adapters, weights, layer.shared_A.dtype,
                                layer.shared_A.device)
            saved[name] = (layer.shared_A, layer.shared_B)
            layer.shared_A, layer.shared_B = nn.Parameter(a, False), nn.Parameter(b, False)
        yield
    finally:
        for name, (a, b) in saved.items():
            layers[name].shared_A, layers[name].shared_B = a, b


def set_assignment(model: nn.Module, assignment: Mapping[str, Sequence[int]]) -> None:
    """Give each layer a fresh set of experts (modules not named get none)."""
    layers = _layers_or_raise(model)
    unknown = sorted(set(assignment) - set(layers))
    if unknown:
        raise ValueError(
            f"assignment names modules that are not AMoLE layers: {unknown[:5]}; "
            f"known modules include {list(layers)[:3]}"
        )
    for name, layer in layers.items():
        layer.set_experts(assignment.get(name, ()))


def assignment_of(model: nn.Module) -> dict[str, list[int]]:
    """The expert ids each layer holds, in stacking order."""
    return {name: list(layer.expert_ids) for name, layer in adapter_layers(model).items()}


def extract_trainable(model: nn.Module) -> TensorDict:
    """Exactly what a silo uploads: the tensors it trains (AMoLE: shared A/B, W_t if
    routed, each local expert's A/B; FedLEASE: its own expert and the router).

    Detached CPU clones, so later training does not change what was extracted.
    """
    return extract_state(model, trainable_only=True)


def extract_state(model: nn.Module, trainable_only: bool = False) -> TensorDict:
    """Every travelling tensor (what a checkpoint needs to restore the adapter exactly)."""
    out: TensorDict = {}
    for name, layer in _layers_or_raise(model).items():
        for key, value in layer.wire_tensors(name).items():
            if value.requires_grad or not trainable_only:
                out[key] = value.detach().to("cpu", copy=True)
    return out


def _describe_unexpected(key: str, layers: Mapping[str, AdapterLayer]) -> str:
    expert = parse_expert_param(key)
    if expert is not None and expert.module in layers:
        assigned = layers[expert.module].expert_ids
        return (
            f"{key!r}: expert {expert.expert_id} is not assigned to {expert.module} "
            f"(assigned: {assigned}); call set_assignment first"
        )
    return f"{key!r} is not a trainable tensor of this model"


@torch.no_grad()
def load_trainable(model: nn.Module, tensors: Mapping[str, Tensor], strict: bool = True) -> None:
    """Copy received values into the layers in place (the assignment must already be set).

    Raises ValueError for a key the model does not hold (e.g. a non-assigned expert), a shape
    mismatch, or, when strict, a tensor the model holds that `tensors` lacks.
    """
    layers = _layers_or_raise(model)
    targets: dict[str, Tensor] = {}
    for name, layer in layers.items():
        targets.update(layer.wire_tensors(name))
    unexpected = [key for key in tensors if key not in targets]
    if unexpected:
        raise ValueError(_describe_unexpected(unexpected[0], layers))
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(targets[key].shape):
            raise ValueError(
                f"{key!r}: expected shape {tuple(targets[key].shape)}, got {tuple(value.shape)}"
            )
    if strict:
        missing = [key for key in targets if key not in tensors]
        if missing:
            raise ValueError(f"missing {len(missing)} tensors, e.g. {missing[:3]}")
    for key, value in tensors.items():
        dest = targets[key]
        dest.copy_(value.to(device=dest.device, dtype=dest.dtype))


@dataclass
class ModuleEmbedding:
    """One module's RSEA embeddings on a silo: h_t (eq. 23) and h_e per local expert (eq. 25)."""

    client: Tensor  # (r,)
    experts: dict[int, Tensor]  # expert id -> (r,)


@dataclass(frozen=True)
class TokenSums:
    """One module's pass over the embedding set: per-example sums over real tokens, enough
    for both the pooled embeddings (eqs. 23, 25) and the per-example vectors DP clips."""

    query: Tensor  # (N, r): per-example sum over real tokens of W_t x
    keys: Tensor  # (N, n, r): per-example sum over real tokens of A_j x
    counts: Tensor  # (N,): real tokens per example
    expert_ids: tuple[int, ...]  # the order of `keys`' second dimension


def embedding_sums(
    model: nn.Module, batches: Iterable[Mapping[str, Tensor]]
) -> dict[str, TokenSums]:
    """Run the model over `batches` (eval, no_grad) with its current parameters and gather
    per-example token sums per layer (float32, CPU)."""
    layers = {
        name: layer for name, layer in _layers_or_raise(model).items()
        if isinstance(layer, AMoLELinear) and layer.token_proj is not None
    }
    no_router = [name for name in adapter_layers(model) if name not in layers]
    if no_router:
        raise ValueError(
            f"embeddings need the AMoLE router (W_t), but {no_router[0]} has none "
            "(use_router=False, or not an AMoLE layer)"
        )
    accumulators = {name: EmbeddingAccumulator() for name in layers}
    device = _device_of(model)
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


def pooled_embeddings(sums: Mapping[str, TokenSums]) -> dict[str, ModuleEmbedding]:
    """Eqs. 23 and 25: per module, the mean of W_t x and of each A_j x over all real tokens.

    Token-pooled (sum of token vectors / number of real tokens over the whole set), not a
    mean of per-example means.
    """
    out: dict[str, ModuleEmbedding] = {}
    for name, module in sums.items():
        total = module.counts.sum().clamp(min=1.0)
        experts = module.keys.sum(0) / total  # (n, r)
        out[name] = ModuleEmbedding(
            client=module.query.sum(0) / total,
            experts={eid: experts[pos] for pos, eid in enumerate(module.expert_ids)},
        )
    return out


def compute_embeddings(
    model: nn.Module, batches: Iterable[Mapping[str, Tensor]]
) -> dict[str, ModuleEmbedding]:
    """The pooled embeddings of `model` as it is now on `batches` (float32, CPU)."""
    return pooled_embeddings(embedding_sums(model, batches))


def compute_embeddings_per_example(
    model: nn.Module, batches: Iterable[Mapping[str, Tensor]]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-example token means: {module: (client (N, r), experts (N, n, r))}.

    Experts are in the layer's expert_ids order. Differential privacy on the embeddings clips
    and averages these per-example vectors instead of pooling tokens.
    """
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name, module in embedding_sums(model, batches).items():
        counts = module.counts.clamp(min=1.0)
        out[name] = (module.query / counts[:, None], module.keys / counts[:, None, None])
    return out


def per_example_embedding_tensors(sums: Mapping[str, TokenSums]) -> TensorDict:
    """Wire keys of `embeddings_to_tensors`, each holding one row per example (N, r): the
    input of differentially private release, which clips each example's whole vector."""
    out: TensorDict = {}
    for name, module in sums.items():
        counts = module.counts.clamp(min=1.0)
        out[client_embedding_key(name)] = module.query / counts[:, None]
        experts = module.keys / counts[:, None, None]
        for pos, eid in enumerate(module.expert_ids):
            out[expert_embedding_key(name, eid)] = experts[:, pos]
    return out


def embeddings_to_tensors(emb: Mapping[str, ModuleEmbedding]) -> TensorDict:
    """Wire form: '{module}.client' and '{module}.expert.{id}' (see fedsilo.sdk.params)."""
    out: TensorDict = {}
    for module, embedding in emb.items():
        out[client_embedding_key(module)] = embedding.client
        for expert_id, value in embedding.experts.items():
            out[expert_embedding_key(module, expert_id)] = value
    return out
