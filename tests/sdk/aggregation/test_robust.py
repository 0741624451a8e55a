"""Coordinate-wise median and trimmed mean: a minority cannot move them, order-free, resumable."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from fedsilo.sdk.aggregation.fedavg import RunningMean
from fedsilo.sdk.aggregation.robust import RobustMean, new_mean
from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.messages import Upload
from fedsilo.sdk.params import ModuleShape
from fedsilo.sdk.strategies import StrategyConfig, get_strategy


def _values() -> list[torch.Tensor]:
    return [torch.tensor([1.0, 10.0]), torch.tensor([2.0, 20.0]), torch.tensor([3.0, 30.0]),
            torch.tensor([1e30, -1e30])]  # one silo far out, in both directions


def test_the_median_ignores_a_minority_per_coordinate() -> None:
    for order in itertools.permutations(_values()):
        mean = RobustMean("median")
        for value in order:
            mean.add({"w": value}, weight=1e6 if value[0] > 100 else 1.0)  # weight ignored
        assert torch.equal(mean.result()["w"], torch.tensor([2.5, 15.0]))  # even n: middle two


def test_the_trimmed_mean_drops_each_end() -> None:
    mean = RobustMean("trimmed_mean", trim=0.25)
    for value in _values():
        mean.add({"w": value})
    assert torch.equal(mean.result()["w"], torch.tensor([2.5, 15.0]))  # 1 of 4 cut per end
    no_cut = RobustMean("trimmed_mean", trim=0.0)
    for value in _values()[:3]:
        no_cut.add({"w": value})
    assert torch.allclose(no_cut.result()["w"], torch.tensor([2.0, 20.0]))


def test_keys_previous_values_dtype_and_resume() -> None:
    mean = RobustMean("median")
    mean.add({"a": torch.ones(2, dtype=torch.bfloat16)})
    mean.add({"a": torch.full((2,), 3.0, dtype=torch.bfloat16), "b": torch.zeros(1)})
    previous = {"a": torch.zeros(2), "untouched": torch.full((1,), 7.0)}
    tensors, meta = mean.state_dict()
    resumed = RobustMean("median")
    resumed.load_state_dict({k: tensors[k] for k in RobustMean.tensor_names(meta)}, meta)
    for m in (mean, resumed):
        out = m.result(previous)
        assert list(out) == ["a", "untouched", "b"]
        assert out["a"].dtype == torch.bfloat16
        assert torch.equal(out["a"].float(), torch.full((2,), 2.0))
        assert out["untouched"] is previous["untouched"]
        assert m.contributors("a") == 2 and m.contributors("b") == 1


def test_rules_and_shares_are_checked() -> None:
    assert isinstance(new_mean("mean"), RunningMean)
    with pytest.raises(ValueError, match="not known"):
        new_mean("mode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"trim = 0\.5"):
        RobustMean("trimmed_mean", trim=0.5)
    with pytest.raises(ValueError, match=r"strategy\.trim"):
        StrategyConfig(name="fedit", aggregation="trimmed_mean", trim=-0.1)
    with pytest.raises(ValueError, match=r"strategy\.aggregation"):
        StrategyConfig(name="fedit", aggregation="mode")  # type: ignore[arg-type]


def test_a_strategy_aggregates_with_the_median_and_checkpoints_it() -> None:
    spec = get_strategy("fedit")
    config = StrategyConfig(name="fedit", aggregation="median")
    server = spec.server(spec.adapter(AMoLEConfig(r=2)), config, 0)
    server.initialize({"m": ModuleShape(3, 3)}, ["a", "b", "c"])
    server.begin_round(0)
    params = server.configure_round(0, ["a", "b", "c"])["a"].params
    for silo, value in (("a", 1.0), ("b", 2.0)):
        server.accumulate(Upload(0, silo, {k: torch.full_like(v, value)
                                           for k, v in params.items()}, {}, 1))
    tensors, meta = server.state_dict()
    resumed = spec.server(spec.adapter(AMoLEConfig(r=2)), config, 0)
    resumed.load_state_dict(tensors, json.loads(json.dumps(meta)))  # as from a checkpoint
    resumed.accumulate(Upload(0, "c", {k: torch.full_like(v, 1e30)
                                       for k, v in params.items()}, {}, 1))
    resumed.end_round(0)
    for value in resumed.global_params.values():
        assert torch.equal(value, torch.full_like(value, 2.0))
