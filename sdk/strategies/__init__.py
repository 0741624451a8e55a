"""Strategies: one registry entry per algorithm; loops look them up by name only."""

from fedsilo.sdk.strategies.base import (
    AggregationReport,
    ClientStrategy,
    ServerStrategy,
    SiloPlan,
    StrategyConfig,
    StrategySpec,
)
from fedsilo.sdk.strategies.registry import STRATEGIES, get_strategy

__all__ = [
    "STRATEGIES",
    "AggregationReport",
    "ClientStrategy",
    "ServerStrategy",
    "SiloPlan",
    "StrategyConfig",
    "StrategySpec",
    "get_strategy",
]
