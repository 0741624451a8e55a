"""Strategies: one registry entry per algorithm, each with its own config class; loops look
them up by name only.

The names below are imported on first use, so `fedsilo.sdk.strategies.config` (read by
`fedsilo simulate`'s flags and federation.toml) loads without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsilo.sdk.lazy import lazy_names

if TYPE_CHECKING:
    from fedsilo.sdk.strategies.base import (
        AggregationReport,
        ClientStrategy,
        ServerStrategy,
        SiloPlan,
        StrategySpec,
    )
    from fedsilo.sdk.strategies.config import (
        FDLoRAConfig,
        FedAMoLEConfig,
        FedLEASEConfig,
        StrategyConfig,
    )
    from fedsilo.sdk.strategies.registry import STRATEGIES, get_strategy

_BASE = "fedsilo.sdk.strategies.base"
_CONFIG = "fedsilo.sdk.strategies.config"
_REGISTRY = "fedsilo.sdk.strategies.registry"
_LAZY = {
    "AggregationReport": _BASE,
    "ClientStrategy": _BASE,
    "FDLoRAConfig": _CONFIG,
    "FedAMoLEConfig": _CONFIG,
    "FedLEASEConfig": _CONFIG,
    "STRATEGIES": _REGISTRY,
    "ServerStrategy": _BASE,
    "SiloPlan": _BASE,
    "StrategyConfig": _CONFIG,
    "StrategySpec": _BASE,
    "get_strategy": _REGISTRY,
}

__all__ = [
    "STRATEGIES",
    "AggregationReport",
    "ClientStrategy",
    "FDLoRAConfig",
    "FedAMoLEConfig",
    "FedLEASEConfig",
    "ServerStrategy",
    "SiloPlan",
    "StrategyConfig",
    "StrategySpec",
    "get_strategy",
]

__getattr__, __dir__ = lazy_names(__name__, _LAZY)
