"""Strategies: one registry entry per algorithm, each with its own config class; loops look
them up by name only."""

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
