"""fused_lora: s * sum_k w_k B_k A_k x in place of a plain-LoRA layer's own adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedsilo.sdk.adapters.inject import inject_adapters
from fedsilo.sdk.adapters.model import adapter_layers, fused_lora, load_trainable
from fedsilo.sdk.amole import AMoLEConfig
from fedsilo.sdk.params import shared_key

D, D_OUT, R = 6, 4, 2
PLAIN = AMoLEConfig(r=R, alpha=4.0, dropout=0.0, use_router=False)
S = PLAIN.alpha / PLAIN.r


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D_OUT)
        self.o_proj = nn.Linear(D_OUT, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(torch.tanh(self.v_proj(self.q_proj(x))))


def _model(config: AMoLEConfig = PLAIN) -> _Tiny:
    torch.manual_seed(0)
    model = _Tiny().eval()
    inject_adapters(model, config)
    with torch.no_grad():  # the model's own adapter: non-zero, so replacing it shows
        for layer in adapter_layers(model).values():
            layer.shared_A.normal_()
            layer.shared_B.normal_()
    return model


def _adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, d_in, d_out in (("q_proj", D, D), ("v_proj", D, D_OUT)):
        out[shared_key(name, "A")] = torch.randn(R, d_in, generator=g)
        out[shared_key(name, "B")] = torch.randn(d_out, R, generator=g)
    return out


def _lora(layer: nn.Module, x: torch.Tensor, parts: list[tuple[float, dict]], name: str):
    """W x + b + s sum_k w_k B_k A_k x, written out."""
    y = layer.base(x)
    for w, adapter in parts:
        a, b = adapter[shared_key(name, "A")], adapter[shared_key(name, "B")]
        y = y + S * w * (x @ a.T @ b.T)
    return y


def _manual(model: _Tiny, x: torch.Tensor, parts: list[tuple[float, dict]]) -> torch.Tensor:
    h = _lora(model.q_proj, x, parts, "q_proj")
    h = _lora(model.v_proj, h, parts, "v_proj")
    return model.o_proj(torch.tanh(h))


def test_fused_output_equals_weighted_sum() -> None:
    model = _model()
    a1, a2 = _adapter(1), _adapter(2)
    x = torch.randn(2, 3, D)
    with torch.no_grad():
        plain = model(x)
        with fused_lora(model, [a1, a2], [0.7, 0.3]):
            fused = model(x)
            layer_out = model.q_proj(x)
            assert model.q_proj.shared_A.shape == (2 * R, D)
            assert model.q_proj.shared_B.shape == (D, 2 * R)
            assert not model.q_proj.shared_A.requires_grad
        expected = _manual(model, x, [(0.7, a1), (0.3, a2)])
        expected_layer = _lora(model.q_proj, x, [(0.7, a1), (0.3, a2)], "q_proj")
    assert torch.allclose(fused, expected, atol=1e-5)
    assert torch.allclose(layer_out, expected_layer, atol=1e-5)
    assert not torch.allclose(fused, plain)


def test_three_adapters_and_negative_weight() -> None:
    model = _model()
    adapters = [_adapter(1), _adapter(2), _adapter(3)]
    weights = [1.5, -0.5, 0.25]
    x = torch.randn(5, D)
    with torch.no_grad(), fused_lora(model, adapters, weights):
        fused = model(x)
    expected = _manual(model, x, list(zip(weights, adapters, strict=True)))
    assert torch.allclose(fused, expected, atol=1e-5)


def test_weights_one_zero_equal_installing_the_first() -> None:
    model = _model()
    a1, a2 = _adapter(1), _adapter(2)
    installed = copy.deepcopy(model)
    load_trainable(installed, a1)
    x = torch.randn(4, D)
    with torch.no_grad():
        with fused_lora(model, [a1, a2], [1.0, 0.0]):
            fused = model(x)
        alone = installed(x)
    assert torch.allclose(fused, alone, atol=1e-6)


def _own(model: _Tiny) -> dict[str, tuple[nn.Parameter, nn.Parameter, torch.Tensor, torch.Tensor]]:
    return {
        name: (layer.shared_A, layer.shared_B, layer.shared_A.detach().clone(),
               layer.shared_B.detach().clone())
        for name, layer in adapter_layers(model).items()
    }


def _assert_restored(model: _Tiny, own: dict) -> None:
    for name, layer in adapter_layers(model).items():
        a, b, a_val, b_val = own[name]
        assert layer.shared_A is a and layer.shared_B is b
        assert torch.equal(layer.shared_A, a_val) and torch.equal(layer.shared_B, b_val)
        assert layer.shared_A.requires_grad and layer.shared_B.requires_grad
        assert dict(layer.named_parameters())["shared_A"] is a


def test_own_tensors_restored_after_context() -> None:
    model = _model()
    own = _own(model)
    x = torch.randn(3, D)
    with torch.no_grad():
        before = model(x)
        with fused_lora(model, [_adapter(1), _adapter(2)], [0.5, 0.5]):
            assert model.q_proj.shared_A is not own["q_proj"][0]
        _assert_restored(model, own)
        assert torch.equal(model(x), before)


def test_own_tensors_restored_after_exception() -> None:
    model = _model()
    own = _own(model)
    with pytest.raises(RuntimeError, match="boom"), fused_lora(model, [_adapter(1)], [1.0]):
        raise RuntimeError("boom")
    _assert_restored(model, own)


def test_router_layer_raises() -> None:
    model = _model(AMoLEConfig(r=R, dropout=0.0))
    own = _own(model)
    with pytest.raises(ValueError, match="use_router=False"), fused_lora(
        model, [_adapter(1)], [1.0]
    ):
        pass
    _assert_restored(model, own)


def test_lease_layer_raises() -> None:
    torch.manual_seed(0)
    model = _Tiny()
    inject_adapters(model, AMoLEConfig(r=R, layer="lease"))
    with pytest.raises(ValueError, match="plain LoRA"), fused_lora(model, [_adapter(1)], [1.0]):
        pass


def test_failure_on_a_later_layer_restores_earlier_ones() -> None:
    model = _model()
    own = _own(model)
    model.v_proj.token_proj = nn.Linear(D, R, bias=False)  # v_proj now has a router
    with pytest.raises(ValueError, match="v_proj"), fused_lora(model, [_adapter(1)], [1.0]):
        pass
    _assert_restored(model, own)


@pytest.mark.parametrize(("n_adapters", "weights"), [(2, [1.0]), (1, [0.5, 0.5]), (0, [])])
def test_mismatched_lengths_raise(n_adapters: int, weights: list[float]) -> None:
    model = _model()
    own = _own(model)
    adapters = [_adapter(i) for i in range(n_adapters)]
    with pytest.raises(ValueError, match="adapters for"), fused_lora(model, adapters, weights):
        pass
    _assert_restored(model, own)
