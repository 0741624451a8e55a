"""Each strategy's own config class, and how settings written before they existed read."""

from __future__ import annotations

from dataclasses import asdict, fields

import pytest

from fedsilo.sdk.federation import FederationSetup
from fedsilo.sdk.strategies import (
    STRATEGIES,
    FDLoRAConfig,
    FedAMoLEConfig,
    FedLEASEConfig,
    StrategyConfig,
)
from fedsilo.sdk.strategies.config import config_from_values, flat_knobs, own_knobs

#: StrategyConfig as fedsilo wrote it before each strategy had its own config (every
#: strategy's knobs, at their defaults): what state folders and plans of that time hold.
FLAT_DEFAULTS = {
    "name": "fedamole", "num_experts": 30, "k_c": 2, "b": 8, "assignment": "rsea",
    "solver": "flow", "solver_processes": 0, "relevance": "anchor", "temperature": 0.1,
    "stickiness": 0.0, "client_embedding": "trained", "weighting": "uniform",
    "aggregation": "mean", "trim": 0.1, "min_contributors": 2, "warmup_rounds": 2,
    "max_clusters": 8, "expert_init": "own", "sync_every": 5, "outer_lr": 1.0,
    "outer_momentum": 0.5, "fusion_budget": 5, "fusion_l1": 0.05, "fusion_batches": 2,
}
COMMON = ["name", "weighting", "aggregation", "trim", "min_contributors"]


def test_each_strategy_registers_its_own_config_class() -> None:
    assert {name: spec.config for name, spec in STRATEGIES.items()} == {
        "fedamole": FedAMoLEConfig, "fedlease": FedLEASEConfig, "fedit": StrategyConfig,
        "fedit-ft": StrategyConfig, "fdlora": FDLoRAConfig, "local": StrategyConfig,
    }
    assert [f.name for f in fields(StrategyConfig)] == COMMON
    assert [f.name for f in fields(FedLEASEConfig)] == [
        *COMMON, "warmup_rounds", "max_clusters", "expert_init"]
    for config_class in (FedAMoLEConfig, FedLEASEConfig, FDLoRAConfig):
        assert config_class().name in STRATEGIES  # each defaults to its own name


def test_a_config_of_another_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="'fedlease' takes a FedLEASEConfig, not a FedAMoLE"):
        FedAMoLEConfig(name="fedlease")
    with pytest.raises(TypeError):
        StrategyConfig()  # type: ignore[call-arg]  # the base names no strategy by itself


@pytest.mark.parametrize(("config_class", "knob", "value", "message"), [
    (StrategyConfig, "weighting", "votes", r"strategy\.weighting = 'votes' is not allowed"),
    (FedAMoLEConfig, "solver", "greedy", r"strategy\.solver = 'greedy' is not allowed"),
    (FedAMoLEConfig, "temperature", 0.0, r"strategy\.temperature = 0\.0"),
    (FedLEASEConfig, "max_clusters", 1, r"strategy\.max_clusters = 1: use an integer >= 2"),
    (FDLoRAConfig, "outer_momentum", 1.0, r"strategy\.outer_momentum = 1\.0"),
])
def test_each_class_checks_its_own_knobs(config_class: type[StrategyConfig], knob: str,
                                         value: object, message: str) -> None:
    kwargs = {"name": "fedit"} if config_class is StrategyConfig else {}
    with pytest.raises(ValueError, match=message):
        config_class(**kwargs, **{knob: value})  # type: ignore[arg-type]


def test_the_flat_form_of_earlier_versions_is_every_strategys_knobs_at_their_defaults() -> None:
    """What lets an aggregator state folder of that time resume (aggregator.service)."""
    assert flat_knobs(FedAMoLEConfig()) == FLAT_DEFAULTS
    assert flat_knobs(FedLEASEConfig(warmup_rounds=3)) == {
        **FLAT_DEFAULTS, "name": "fedlease", "warmup_rounds": 3}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_settings_of_earlier_versions_read_as_the_strategys_own(name: str) -> None:
    config = config_from_values({**FLAT_DEFAULTS, "name": name})
    assert type(config) is STRATEGIES[name].config
    assert asdict(config) == {k: v for k, v in FLAT_DEFAULTS.items()
                              if k in asdict(config)} | {"name": name}


def test_only_other_strategies_knobs_are_dropped() -> None:
    values = {"name": "fedit", "num_experts": 4, "sync_every": 3, "trim": 0.2, "typo": 1}
    assert own_knobs(StrategyConfig, values) == {"name": "fedit", "trim": 0.2, "typo": 1}
    with pytest.raises(TypeError, match="typo"):
        config_from_values(values)
    with pytest.raises(ValueError, match="unknown strategy 'magic'; available: fdlora"):
        config_from_values({"name": "magic"})


def test_a_setup_travels_with_its_strategys_knobs_only() -> None:
    setup = FederationSetup(strategy=FedLEASEConfig(warmup_rounds=3))
    sent = setup.to_json()
    assert set(sent["strategy"]) == {*COMMON, "warmup_rounds", "max_clusters", "expert_init"}
    assert FederationSetup.from_json(sent) == setup
    # as a plan or an agent's state folder of an earlier version holds it
    flat = {**sent, "strategy": flat_knobs(setup.strategy)}
    assert FederationSetup.from_json(flat) == setup
    with pytest.raises(ValueError, match="cannot read"):
        FederationSetup.from_json({**sent, "strategy": {**sent["strategy"], "typo": 1}})
