"""Lazy package namespaces resolve each name from its module, once."""

import pytest


def test_lazy_names_resolve_and_cache() -> None:
    from fedsilo.sdk import strategies
    from fedsilo.sdk.strategies.config import FedAMoLEConfig
    from fedsilo.sdk.strategies.registry import get_strategy

    assert strategies.FedAMoLEConfig is FedAMoLEConfig
    assert strategies.get_strategy is get_strategy
    assert "get_strategy" in vars(strategies)  # cached: the next look-up is plain
    assert "StrategySpec" in dir(strategies)
    with pytest.raises(AttributeError, match=r"'fedsilo\.sdk\.strategies' has no attribute 'Nope'"):
        strategies.Nope  # noqa: B018
