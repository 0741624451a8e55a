"""Model-level adapter helpers: find targets, move the travelling tensors in and out, fuse.

Everything here speaks only the `AdapterLayer` interface, whatever the layer kind, and
addresses layers by their dotted path in the base model, the same names
`fedsilo.sdk.params` uses on the wire, so silo and aggregator agree without sharing objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from fedsilo.sdk.params import ModuleShape, TensorDict, parse_expert_param, shared_key

from .layer import AdapterLayer


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


def replace_targets(
    model: nn.Module, target_modules: Iterable[str], make_layer: Callable[[nn.Linear], AdapterLayer]
) -> dict[str, AdapterLayer]:
    """Wrap every targeted nn.Linear in `make_layer(base)` and freeze everything else.

    A layer is targeted when the last component of its dotted name is in target_modules
    (LLaMA: q_proj/v_proj; BERT: query/value). Returns {dotted path: layer}.
    """
    if adapter_layers(model):
        raise ValueError("model already has adapter layers; inject into a fresh model")
    targets = set(target_modules)
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
        layer = make_layer(base).train(base.training)  # keep the model's train/eval mode
        setattr(parent, attr, layer)
        layers[name] = layer
    return layers


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """All adapter layers by dotted path, in named_modules order (stable across processes)."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, AdapterLayer)}


def layers_or_raise(model: nn.Module) -> dict[str, AdapterLayer]:
    """`adapter_layers`, or a ValueError that says to inject first when there are none."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no adapter layers; call inject_adapters first"
        )
    return layers


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters are (CPU for a model without any)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


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


def stacked_lora(
    module: str, adapters: Sequence[Mapping[str, Tensor]], weights: Sequence[float],
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Module `module`'s sum_k w_k B_k A_k as one LoRA of rank K*r: (A (K*r, d_in),
    B (d_out, K*r)). Shared by `fused_lora` and FDLoRA's export, so both give the same bits."""
    a_key, b_key = shared_key(module, "A"), shared_key(module, "B")
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
    layers = layers_or_raise(model)
    saved: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
    try:
        for name, layer in layers.items():
            own = layer.plain_lora()
            if own is None:
                raise ValueError(f"{name}: fusion works on plain LoRA layers (use_router=False)")
            a, b = stacked_lora(name, adapters, weights, own[0].dtype, own[0].device)
            saved[name] = layer.swap_plain_lora(nn.Parameter(a, False), nn.Parameter(b, False))
        yield
    finally:
        for name, (a, b) in saved.items():
            layers[name].swap_plain_lora(a, b)


def set_assignment(model: nn.Module, assignment: Mapping[str, Sequence[int]]) -> None:
    """Give each layer a fresh set of experts (modules not named get none)."""
    layers = layers_or_raise(model)
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
    for name, layer in layers_or_raise(model).items():
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
    layers = layers_or_raise(model)
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
