"""Local-only: the initial LoRA once, then nothing; uploads carry scores, no tensors."""

import json
from pathlib import Path

import pytest
import torch

from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.checkpoint import CheckpointError
from fedsilo.sdk.messages import Upload
from fedsilo.sdk.params import ModuleShape
from fedsilo.sdk.strategies import StrategyConfig, get_strategy
from fedsilo.simulation.engine import SimulationConfig, run_simulation


def _server(seed: int = 0):
    spec = get_strategy("local")
    server = spec.server(spec.adapter(AMoLEConfig(r=2)), StrategyConfig(name="local"), seed)
    server.initialize({"m": ModuleShape(3, 3)}, ["a", "b"])
    return server


def test_only_silos_that_never_trained_get_the_initial_lora() -> None:
    server = _server()
    plans = server.configure_round(0, ["a", "b"])
    assert set(plans["a"].params) == {"m.shared.A", "m.shared.B"}
    assert server.upload_schema("a", plans["a"], final=False).params == {}
    server.begin_round(0)
    server.accumulate(Upload(0, "a", {}, {}, 1))  # b missed the round
    server.end_round(0)
    plans = server.configure_round(1, ["a", "b", "c"])
    assert plans["a"].params == {}
    assert set(plans["b"].params) == set(plans["c"].params) == {"m.shared.A", "m.shared.B"}
    assert server.global_params == {}


def test_state_round_trip_and_settings_check() -> None:
    server = _server()
    server.begin_round(0)
    server.accumulate(Upload(0, "a", {}, {}, 1))
    server.end_round(0)
    tensors, meta = server.state_dict()
    meta = json.loads(json.dumps(meta))  # as a checkpoint file holds it
    again = _server()
    again.load_state_dict(tensors, meta)
    assert again.configure_round(1, ["a", "b"])["a"].params == {}
    other = _server(seed=1)
    with pytest.raises(CheckpointError):
        other.load_state_dict(tensors, meta)


def test_silos_train_alone_and_keep_their_models(tmp_path: Path) -> None:
    config = SimulationConfig(silos=2, rounds=2, local_steps=2, strategy="local",
                              examples_per_silo=40, eval_limit=4)
    result = run_simulation(config, run_dir=tmp_path)
    assert result.rounds[0].silos["silo-0"].metric is not None
    assert all(row.bytes_up < 1000 for r in result.rounds for row in r.silos.values())
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "silos" / "silo-0" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "silos" / "silo-1" / "adapter.safetensors"))
    key = next(k for k in a if k.endswith("shared.B"))
    assert a[key].abs().sum() > 0 and not torch.equal(a[key], b[key])
