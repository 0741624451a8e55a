"""What every adapter layer offers the model-level helpers (as PEFT's BaseTunerLayer).

A layer wraps a frozen nn.Linear and holds tensors that travel under wire names
(`fedsilo.sdk.params`); the helpers that inject, install, extract and checkpoint adapters
only speak this interface, so a new layer kind (AMoLE, FedLEASE's) needs no new plumbing.
An ABC: a layer kind that misses a method fails when it is built, not when a helper calls it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from torch import Tensor, nn


class AdapterLayer(nn.Module, ABC):
    """The frozen `base` layer and the adapter around it; subclasses add the tensors."""

    base: nn.Linear
    expert_ids: list[int]

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps an nn.Linear, got {type(base).__name__}")
        self.base = base
        self.base.requires_grad_(False)
        # Set by the model-level helpers (routing_context); inert otherwise.
        self.token_mask: Tensor | None = None
        self.record_routing = False
        self.last_probs: Tensor | None = None
        self.last_topk: Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def num_experts(self) -> int:
        return len(self.expert_ids)

    @abstractmethod
    def set_experts(self, expert_ids: Sequence[int]) -> None:
        """Hold exactly these experts from now on (fresh values until loaded)."""

    @abstractmethod
    def wire_tensors(self, name: str) -> dict[str, Tensor]:
        """Every travelling tensor of the layer (module `name`), keyed by wire name. The
        values are the live tensors (or views): loading copies into them in place, and the
        ones with requires_grad are what the silo trains and uploads."""

    def plain_lora(self) -> tuple[nn.Parameter, nn.Parameter] | None:
        """The (A, B) of a layer that computes plain LoRA, s B A x, which FDLoRA's fusion
        swaps out; None (the default) for a layer that routes or mixes experts."""
        return None

    def swap_plain_lora(
        self, a: nn.Parameter, b: nn.Parameter
    ) -> tuple[nn.Parameter, nn.Parameter]:
        """Compute s B A x with these (A, B) from now on; returns the pair they replace (give
        it back the same way). Only for a layer whose `plain_lora` is not None."""
        raise ValueError(f"{type(self).__name__} computes no plain LoRA to swap")
