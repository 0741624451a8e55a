"""Name -> strategy. A new strategy registers here and nowhere else."""

from __future__ import annotations

from fedsilo.sdk.strategies import fdlora, fedamole, fedit, fedlease, local
from fedsilo.sdk.strategies.base import StrategySpec

STRATEGIES: dict[str, StrategySpec] = {
    spec.name: spec
    for spec in (
        fedamole.SPEC, fedlease.SPEC, fedit.FEDIT, fedit.FEDIT_FT, fdlora.SPEC, local.SPEC
    )
}


def get_strategy(name: str) -> StrategySpec:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}; available: {', '.join(sorted(STRATEGIES))}"
        ) from None
