import torch

from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.messages import Upload
from fedsilo.sdk.params import ModuleShape
from fedsilo.sdk.strategies import StrategyConfig, get_strategy


def _server(weighting: str = "uniform"):
    spec = get_strategy("fedit")
    adapter = spec.adapter(AMoLEConfig(r=2))
    assert adapter.use_router is False
    config = StrategyConfig(name="fedit", weighting=weighting)  # type: ignore[arg-type]
    server = spec.server(adapter, config, 0)
    server.initialize({"m": ModuleShape(3, 3)}, ["a", "b"])
    return server


def test_fedit_sends_one_lora_and_averages_it() -> None:
    server = _server()
    plans = server.configure_round(0, ["a", "b"])
    assert set(plans["a"].params) == {"m.shared.A", "m.shared.B"}
    server.begin_round(0)
    b = torch.ones(3, 2)
    server.accumulate(Upload(0, "a", {"m.shared.A": torch.ones(2, 3), "m.shared.B": b}, {}, 1))
    server.accumulate(Upload(0, "b", {"m.shared.A": torch.zeros(2, 3), "m.shared.B": b}, {}, 3))
    server.end_round(0)
    assert torch.allclose(server.global_params["m.shared.A"], torch.full((2, 3), 0.5))


def test_sample_weighting() -> None:
    server = _server("samples")
    server.begin_round(0)
    server.accumulate(Upload(0, "a", {"m.shared.A": torch.ones(2, 3)}, {}, 1))
    server.accumulate(Upload(0, "b", {"m.shared.A": torch.zeros(2, 3)}, {}, 3))
    server.end_round(0)
    assert torch.allclose(server.global_params["m.shared.A"], torch.full((2, 3), 0.25))
