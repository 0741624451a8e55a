"""AMoLELinear against slow references written out per token and per expert."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedsilo.sdk.amole import AMoLEConfig, AMoLELinear

D_IN, D_OUT = 12, 10


def _layer(config: AMoLEConfig, experts: tuple[int, ...] = (3, 7, 1)) -> AMoLELinear:
    torch.manual_seed(0)
    return AMoLELinear(nn.Linear(D_IN, D_OUT), config, expert_ids=experts)


def _randomise(layer: AMoLELinear) -> None:
    with torch.no_grad():
        for param in (layer.shared_A, layer.shared_B, layer.expert_A, layer.expert_B):
            param.normal_()


def _reference(layer: AMoLELinear, x: torch.Tensor) -> torch.Tensor:
    """Eqs. 8-15 one token and one expert at a time (eval mode: no dropout)."""
    c = layer.config
    s = c.alpha / c.r
    dim = c.r if c.score_scale == "r" else layer.in_features
    out = []
    for token in x.reshape(-1, layer.in_features):
        y = layer.base.weight @ token + layer.base.bias
        y = y + s * layer.shared_B @ (layer.shared_A @ token)
        n = len(layer.expert_ids)
        if n:
            t = layer.token_proj.weight @ token
            logits = []
            for j in range(n):
                e_j = layer.expert_A[j] @ token
                logits.append(float(t @ e_j) / math.sqrt(dim))
            m = max(logits)
            exps = [math.exp(v - m) for v in logits]
            p = [v / sum(exps) for v in exps]
            chosen = sorted(range(n), key=lambda j: -p[j])[: min(c.top_k, n)]
            mass = sum(p[j] for j in chosen)
            for j in chosen:
                y = y + (p[j] / mass) * s * layer.expert_B[j] @ (layer.expert_A[j] @ token)
        out.append(y)
    return torch.stack(out).reshape(*x.shape[:-1], layer.out_features)


def test_output_equals_base_at_init() -> None:
    layer = _layer(AMoLEConfig(r=4))
    x = torch.randn(2, 5, D_IN)
    assert torch.allclose(layer(x), layer.base(x))
    assert layer.expert_A.shape == (3, 4, D_IN) and layer.expert_B.shape == (3, D_OUT, 4)
    assert torch.all(layer.expert_B == 0) and torch.all(layer.shared_B == 0)


@pytest.mark.parametrize(
    "config, experts",
    [
        (AMoLEConfig(r=4), (3, 7, 1)),
        (AMoLEConfig(r=4, top_k=1, score_scale="d"), (3, 7, 1, 0)),
        (AMoLEConfig(r=2, top_k=3), (5, 2)),  # fewer experts than top_k
        (AMoLEConfig(r=4), ()),  # no domain experts: shared expert only
    ],
)
def test_forward_matches_slow_reference(config: AMoLEConfig, experts: tuple[int, ...]) -> None:
    layer = _layer(config, experts).eval()
    _randomise(layer)
    with torch.no_grad():
        x3 = torch.randn(2, 4, D_IN)
        assert torch.allclose(layer(x3), _reference(layer, x3), atol=1e-4, rtol=1e-4)
        x2 = torch.randn(6, D_IN)
        assert torch.allclose(layer(x2), _reference(layer, x2), atol=1e-4, rtol=1e-4)


def test_set_experts_keeps_given_tensors_and_initialises_new_ones_distinctly() -> None:
    layer = _layer(AMoLEConfig(r=4), experts=(3,))
    a3, b3 = torch.randn(4, D_IN), torch.randn(D_OUT, 4)
    old_param = layer.expert_A
    layer.set_experts([9, 3, 5], tensors={3: (a3, b3)})
    assert layer.expert_ids == [9, 3, 5]
    assert layer.expert_A is not old_param and isinstance(layer.expert_A, nn.Parameter)
    assert torch.equal(layer.expert_A[1], a3) and torch.equal(layer.expert_B[1], b3)
    assert not torch.allclose(layer.expert_A[0], layer.expert_A[2])
    assert torch.all(layer.expert_B[0] == 0) and torch.all(layer.expert_B[2] == 0)
    bound = 1 / math.sqrt(D_IN)  # kaiming_uniform_(a=sqrt 5) on fan_in D_IN
    assert layer.expert_A[0].abs().max() <= bound and layer.expert_A[0].abs().max() > bound / 2
    assert layer.expert_A.dtype == layer.shared_A.dtype
    # the layer's parameters are the new ones (what an optimizer built afterwards sees)
    names = dict(layer.named_parameters())
    assert names["expert_A"] is layer.expert_A and names["expert_A"].requires_grad
    layer.set_experts([])
    assert layer.expert_A.shape == (0, 4, D_IN) and layer.expert_ids == []


def test_set_experts_rejects_bad_input() -> None:
    layer = _layer(AMoLEConfig(r=4), experts=())
    with pytest.raises(ValueError, match="distinct"):
        layer.set_experts([1, 1])
    with pytest.raises(ValueError, match="expected A"):
        layer.set_experts([1], tensors={1: (torch.zeros(3, D_IN), torch.zeros(D_OUT, 4))})
    with pytest.raises(ValueError, match="not in"):
        layer.set_experts([1], tensors={2: (torch.zeros(4, D_IN), torch.zeros(D_OUT, 4))})


def test_without_router_is_plain_lora() -> None:
    config = AMoLEConfig(r=4, alpha=8.0, use_router=False)
    layer = _layer(config, experts=()).eval()
    assert layer.token_proj is None
    _randomise(layer)
    x = torch.randn(3, 5, D_IN)
    expected = layer.base(x) + 2.0 * x @ layer.shared_A.T @ layer.shared_B.T
    assert torch.allclose(layer(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match="use_router=False"):
        layer.set_experts([0])


def test_without_router_matches_peft_lora() -> None:
    peft = pytest.importorskip("peft")

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(D_IN, D_OUT)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.q_proj(x)

    torch.manual_seed(0)
    ours = AMoLELinear(nn.Linear(D_IN, D_OUT), AMoLEConfig(r=4, use_router=False)).eval()
    _randomise(ours)
    tiny = Tiny()
    tiny.q_proj.load_state_dict(ours.base.state_dict())
    lora = peft.get_peft_model(
        tiny, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"], lora_dropout=0.0)
    ).eval()
    q = lora.base_model.model.q_proj
    with torch.no_grad():
        q.lora_A["default"].weight.copy_(ours.shared_A)
        q.lora_B["default"].weight.copy_(ours.shared_B)
    x = torch.randn(2, 3, D_IN)
    assert torch.allclose(lora(x), ours(x), atol=1e-5)


def test_gradients_reach_adapters_and_router_but_not_base() -> None:
    layer = _layer(AMoLEConfig(r=4, top_k=2), experts=(0, 1, 2)).train()
    _randomise(layer)
    layer(torch.randn(2, 5, D_IN)).pow(2).mean().backward()
    for name in ("shared_A", "shared_B", "expert_A", "expert_B"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert layer.token_proj.weight.grad is not None
    assert layer.token_proj.weight.grad.abs().sum() > 0
    assert layer.base.weight.grad is None and not layer.base.weight.requires_grad
    assert layer.base.bias.grad is None


def test_routing_ignores_dropout_and_is_recorded() -> None:
    layer = _layer(AMoLEConfig(r=4, dropout=0.5), experts=(0, 1, 2))
    _randomise(layer)
    x = torch.randn(2, 5, D_IN)
    layer.record_routing = True
    layer.train()
    torch.manual_seed(1)
    train_out = layer(x)
    train_probs, train_topk = layer.last_probs, layer.last_topk
    layer.eval()
    eval_out = layer(x)
    assert train_probs.shape == (10, 3) and train_topk.shape == (10, 2)
    assert torch.allclose(train_probs, layer.last_probs)  # same routing with and without dropout
    assert torch.equal(train_topk, layer.last_topk)
    assert not torch.allclose(train_out, eval_out)  # but dropout did act on the experts


def test_mismatched_token_mask_is_ignored() -> None:
    layer = _layer(AMoLEConfig(r=4)).eval()
    _randomise(layer)
    x = torch.randn(2, 1, D_IN)  # e.g. cached generation: one new token, mask covers 6
    expected = layer(x)
    layer.token_mask = torch.ones(2, 6, dtype=torch.bool)
    layer.record_routing = True
    assert torch.allclose(layer(x), expected)


def test_bf16_base_computes_in_bf16_with_float32_parameters() -> None:
    torch.manual_seed(0)
    layer = AMoLELinear(nn.Linear(D_IN, D_OUT).to(torch.bfloat16), AMoLEConfig(r=4), [0, 1])
    assert layer.shared_A.dtype == torch.float32 and layer.expert_A.dtype == torch.float32
    y = layer(torch.randn(2, 3, D_IN, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.shared_B.grad is not None and layer.shared_B.grad.dtype == torch.float32
