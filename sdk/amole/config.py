"""Hyper-parameters of the AMoLE adapter, shared by every adapted layer of a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

LayerKind = Literal["amole", "lease"]
"""The adapter layer kinds (`fedsilo.sdk.adapters.inject.LAYER_KINDS` builds each)."""


@dataclass(frozen=True)
class AMoLEConfig:
    """How each targeted linear layer is adapted.

    Defaults follow the paper and the authors' code: LoRA r=8, alpha=16 on q/v
    projections, dropout 0.05, two experts per token, load-balance weight 1e-3.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    top_k: int = 2
    """k_e: domain experts each token is routed to."""
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Attribute names (last dotted component) of the nn.Linear layers to adapt."""
    use_router: bool = True
    """False gives plain LoRA (shared expert only, no W_t, no domain experts): FedIT baselines."""
    score_scale: Literal["r", "d"] = "r"
    """Routing logits are divided by sqrt(r) (authors' code, default) or sqrt(d_in) (paper)."""
    lb_coef: float = 1e-3
    """beta: weight of the load-balance loss."""
    layer: LayerKind = "amole"
    """The layer injected: AMoLE's (FedAMoLE, FedIT, FDLoRA) or FedLEASE's (cluster experts,
    adaptive top-M router; r, alpha, dropout and target_modules apply, the rest not)."""

    def __post_init__(self) -> None:
        # Accept one name or any sequence of names, but store a tuple so the config stays hashable.
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", (self.target_modules,))
        elif not isinstance(self.target_modules, tuple):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"AMoLEConfig.r (LoRA rank) must be an integer > 0, got {self.r!r}")
        if self.alpha <= 0:
            raise ValueError(f"AMoLEConfig.alpha must be > 0, got {self.alpha!r}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"AMoLEConfig.top_k must be an integer >= 1, got {self.top_k!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AMoLEConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if len(self.target_modules) == 0 or not all(
            isinstance(name, str) and name for name in self.target_modules
        ):
            raise ValueError(
                "AMoLEConfig.target_modules must be a non-empty tuple of linear-layer names, "
                f"e.g. ('q_proj', 'v_proj') or ('query', 'value'); got {self.target_modules!r}"
            )
        if self.score_scale not in ("r", "d"):
            raise ValueError(
                f"AMoLEConfig.score_scale must be 'r' (divide by sqrt(r)) or 'd' "
                f"(divide by sqrt(d_in)), got {self.score_scale!r}"
            )
        if self.layer not in get_args(LayerKind):
            kinds = " or ".join(repr(kind) for kind in get_args(LayerKind))
            raise ValueError(f"AMoLEConfig.layer must be {kinds}, got {self.layer!r}")
        if self.lb_coef < 0:
            raise ValueError(f"AMoLEConfig.lb_coef must be >= 0, got {self.lb_coef!r}")

    @property
    def scaling(self) -> float:
        """LoRA scale s = alpha / r applied to every expert's output."""
        return self.alpha / self.r
