"""What every adapter layer offers the model-level helpers (as PEFT's BaseTunerLayer).

A layer wraps a frozen nn.Linear and holds tensors that travel under wire names
(`fedsilo.sdk.params`); the helpers that inject, install, extract and checkpoint adapters
only speak this interface, so a new layer kind (AMoLE, FedLEASE's) needs no new plumbing.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

from torch import Tensor, nn


class AdapterLayer(nn.Module):
    base: nn.Linear
    expert_ids: list[int]

    def __init__(self) -> None:
        super().__init__()
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
