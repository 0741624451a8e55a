"""The injector: the layer kind an AMoLEConfig names, looked up in one table, put in place of
every targeted linear layer (as PEFT's `_create_new_module` dispatches to a tuner's layer).

It sits above the layer kinds it knows (AMoLE's, FedLEASE's), which sit above
`fedsilo.sdk.adapters.layer`; a new kind is one more entry in `LAYER_KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn

from fedsilo.sdk.amole.config import AMoLEConfig, LayerKind
from fedsilo.sdk.amole.layer import AMoLELinear
from fedsilo.sdk.lease.layer import LeaseLinear

from .layer import AdapterLayer
from .model import replace_targets

LayerFactory = Callable[[nn.Linear, AMoLEConfig], AdapterLayer]
"""Builds a layer of one kind around a frozen base layer (its class, as a rule)."""

LAYER_KINDS: Mapping[LayerKind, LayerFactory] = {"amole": AMoLELinear, "lease": LeaseLinear}
"""AMoLEConfig.layer -> the layer injected: AMoLE's (FedAMoLE, FedIT, FDLoRA), FedLEASE's."""


def inject_adapters(
    model: nn.Module, config: AMoLEConfig, kinds: Mapping[str, LayerFactory] = LAYER_KINDS
) -> dict[str, AdapterLayer]:
    """Wrap every targeted nn.Linear in a layer of kind config.layer (looked up in `kinds`)
    and freeze everything else.

    A layer is targeted when the last component of its dotted name is in
    config.target_modules (LLaMA: q_proj/v_proj; BERT: query/value). Layers start with no
    domain experts: call set_assignment. Returns {dotted path: layer}.
    """
    make_layer = kinds.get(config.layer)
    if make_layer is None:
        raise ValueError(
            f"no adapter layer of kind {config.layer!r}; known kinds: {sorted(kinds)}"
        )
    return replace_targets(model, config.target_modules, lambda base: make_layer(base, config))
