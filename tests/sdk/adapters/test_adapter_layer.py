"""The abstract adapter layer is enforced, and the injector builds the kind the config names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

import pytest
import torch
from torch import Tensor, nn

from fedsilo.sdk.adapters.inject import LAYER_KINDS, inject_adapters
from fedsilo.sdk.adapters.layer import AdapterLayer
from fedsilo.sdk.adapters.model import adapter_layers
from fedsilo.sdk.amole import AMoLEConfig, AMoLELinear, LayerKind
from fedsilo.sdk.lease import LeaseLinear


class _NoWireTensors(AdapterLayer):
    def __init__(self, base: nn.Linear, config: AMoLEConfig) -> None:
        super().__init__(base)
        self.expert_ids = []

    def set_experts(self, expert_ids: Sequence[int]) -> None:
        self.expert_ids = list(expert_ids)


class _Identity(_NoWireTensors):
    """The smallest complete layer: the base output, no tensors."""

    def wire_tensors(self, name: str) -> dict[str, Tensor]:
        return {}

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(4, 4)
        self.v_proj = nn.Linear(4, 3)
        self.o_proj = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.o_proj(self.v_proj(self.q_proj(x)))


def test_a_layer_missing_a_method_cannot_be_built() -> None:
    with pytest.raises(TypeError, match="wire_tensors"):
        _NoWireTensors(nn.Linear(4, 4), AMoLEConfig())
    layer = _Identity(nn.Linear(4, 4), AMoLEConfig())
    assert not layer.base.weight.requires_grad
    assert layer.plain_lora() is None
    with pytest.raises(ValueError, match="no plain LoRA"):
        layer.swap_plain_lora(nn.Parameter(torch.zeros(1, 4)), nn.Parameter(torch.zeros(4, 1)))


def test_a_layer_wraps_only_a_linear() -> None:
    with pytest.raises(TypeError, match=r"_Identity wraps an nn\.Linear, got Conv1d"):
        _Identity(nn.Conv1d(4, 4, 1), AMoLEConfig())  # type: ignore[arg-type]


def test_the_table_builds_every_kind_the_config_names() -> None:
    assert set(LAYER_KINDS) == set(get_args(LayerKind))


@pytest.mark.parametrize(("kind", "layer_class"), [("amole", AMoLELinear), ("lease", LeaseLinear)])
def test_injector_dispatches_by_kind(kind: LayerKind, layer_class: type[AdapterLayer]) -> None:
    model = _Tiny()
    layers = inject_adapters(model, AMoLEConfig(r=2, layer=kind))
    assert set(layers) == {"q_proj", "v_proj"}
    assert all(type(layer) is layer_class for layer in layers.values())
    assert adapter_layers(model) == layers


def test_injector_builds_from_the_table_it_is_given() -> None:
    model = _Tiny()
    layers = inject_adapters(model, AMoLEConfig(layer="lease"), kinds={"lease": _Identity})
    assert all(type(layer) is _Identity for layer in layers.values())
    x = torch.randn(2, 4)
    assert torch.equal(model.q_proj(x), model.q_proj.base(x))


def test_unknown_kind_is_a_clear_error() -> None:
    model = _Tiny()
    with pytest.raises(ValueError, match=r"kind 'amole'; known kinds: \['lease'\]"):
        inject_adapters(model, AMoLEConfig(), kinds={"lease": _Identity})
    assert adapter_layers(model) == {}
