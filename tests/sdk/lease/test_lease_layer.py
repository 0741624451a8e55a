"""LeaseLinear against a reference written out per token, and its wire tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedsilo.sdk.adapters.inject import inject_adapters
from fedsilo.sdk.adapters.model import (
    adapter_layers,
    extract_state,
    extract_trainable,
    load_trainable,
    set_assignment,
)
from fedsilo.sdk.amole import AMoLEConfig
from fedsilo.sdk.lease import LeaseLinear
from fedsilo.sdk.params import expert_key, gate_key

D_IN, D_OUT, R = 6, 5, 2
CONFIG = AMoLEConfig(r=R, alpha=6.0, dropout=0.0, layer="lease")


def _layer(ids: list[int], config: AMoLEConfig = CONFIG, base: nn.Linear | None = None):
    torch.manual_seed(0)
    layer = LeaseLinear(base if base is not None else nn.Linear(D_IN, D_OUT), config)
    layer.set_experts(ids)
    return layer


def _randomise(layer: LeaseLinear) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        layer.own_A.normal_()
        layer.own_B.normal_()
        layer.other_A.normal_()
        layer.other_B.normal_()
        if layer.router is not None:
            layer.router.weight.normal_(std=3.0)  # sharp routing: tokens pick different sets


def _experts_by_id(layer: LeaseLinear) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Own expert from own_A/own_B; other_A/other_B rows hold the other ids in id order."""
    others = [e for e in range(len(layer.expert_ids)) if e != layer.own]
    out = {layer.own: (layer.own_A, layer.own_B)}
    for pos, e in enumerate(others):
        out[e] = (layer.other_A[pos], layer.other_B[pos])
    return out


def _reference(layer: LeaseLinear, x: torch.Tensor) -> tuple[torch.Tensor, set[int]]:
    """y = W x + b + s sum_e w_e B_e A_e x, token by token; also the distinct expert
    counts seen, to check the test exercised mixing."""
    m, own, s = len(layer.expert_ids), layer.own, layer.config.alpha / layer.config.r
    experts = _experts_by_id(layer)
    slot_to_expert = [*range(m), *([own] * (m - 1))]
    out, counts = [], set()
    for token in x.reshape(-1, layer.in_features):
        y = layer.base.weight @ token + layer.base.bias
        if m == 1:
            w = [1.0]
        else:
            logits = (layer.router.weight @ token).tolist()
            top = max(logits)
            probs = [math.exp(v - top) for v in logits]
            chosen = sorted(range(2 * m - 1), key=lambda i: -probs[i])[:m]
            mass = sum(probs[i] for i in chosen)
            w = [0.0] * m
            for i in chosen:
                w[slot_to_expert[i]] += probs[i] / mass
        counts.add(sum(v > 0 for v in w))
        for e, weight in enumerate(w):
            a, b = experts[e]
            y = y + weight * s * (b @ (a @ token))
        out.append(y)
    return torch.stack(out).reshape(*x.shape[:-1], layer.out_features), counts


@pytest.mark.parametrize("ids", [[2, 0, 1], [1, 2, 0]])
def test_forward_matches_reference_m3(ids: list[int]) -> None:
    layer = _layer(ids).eval()
    _randomise(layer)
    x = torch.randn(40, D_IN)
    expected, counts = _reference(layer, x)
    assert len(counts) >= 2  # some tokens mix experts, some do not
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_forward_with_batch_and_seq_dims() -> None:
    layer = _layer([1, 2, 0]).eval()
    _randomise(layer)
    x = torch.randn(3, 4, D_IN)
    expected, _ = _reference(layer, x)
    with torch.no_grad():
        out = layer(x)
    assert out.shape == (3, 4, D_OUT)
    assert torch.allclose(out, expected, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(layer(x[1]), out[1], atol=1e-6)


def test_own_expert_matters_only_through_its_slot() -> None:
    """Moving expert 2's tensors changes the output only where expert 2 has weight."""
    layer = _layer([2, 0, 1]).eval()
    _randomise(layer)
    x = torch.randn(30, D_IN)
    with torch.no_grad():
        before = layer(x)
        layer.other_A[1].add_(1.0)  # other_A rows hold experts 0, 1: this is expert 1
        after = layer(x)
    expected, _ = _reference(layer, x)
    assert torch.allclose(after, expected, atol=1e-5)
    assert not torch.allclose(before, after)


def test_single_expert_is_plain_lora_without_router() -> None:
    layer = _layer([0]).eval()
    _randomise(layer)
    assert layer.router is None
    assert layer.other_A.shape == (0, R, D_IN) and layer.other_B.shape == (0, D_OUT, R)
    names = {n for n, _ in layer.named_parameters()}
    assert not any(n.startswith("router") for n in names)
    x = torch.randn(2, 3, D_IN)
    s = CONFIG.alpha / CONFIG.r
    expected = layer.base(x) + s * x @ layer.own_A.T @ layer.own_B.T
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-5)
    assert set(layer.wire_tensors("m")) == {"m.expert.0.A", "m.expert.0.B"}


def test_fresh_experts_leave_base_output() -> None:
    layer = _layer([1, 0, 2, 3]).eval()
    assert layer.own_A.shape == (R, D_IN) and layer.own_B.shape == (D_OUT, R)
    assert layer.other_A.shape == (3, R, D_IN) and layer.other_B.shape == (3, D_OUT, R)
    assert layer.router is not None and layer.router.weight.shape == (7, D_IN)
    assert layer.router.bias is None
    assert torch.all(layer.own_B == 0) and torch.any(layer.own_A != 0)
    x = torch.randn(4, D_IN)
    with torch.no_grad():
        assert torch.allclose(layer(x), layer.base(x))


def test_no_experts_is_the_base_layer() -> None:
    torch.manual_seed(0)
    layer = LeaseLinear(nn.Linear(D_IN, D_OUT), CONFIG)
    x = torch.randn(3, D_IN)
    assert layer.expert_ids == []
    assert torch.equal(layer(x), layer.base(x))


def test_only_own_expert_and_router_train() -> None:
    layer = _layer([1, 2, 0]).train()
    _randomise(layer)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"own_A", "own_B", "router.weight"}
    assert {n for n, _ in layer.named_buffers()} == {"other_A", "other_B"}
    frozen = {
        "other_A": layer.other_A.clone(), "other_B": layer.other_B.clone(),
        "base.weight": layer.base.weight.detach().clone(),
        "base.bias": layer.base.bias.detach().clone(),
    }
    trained = {
        "own_A": layer.own_A.detach().clone(), "own_B": layer.own_B.detach().clone(),
        "router": layer.router.weight.detach().clone(),
    }
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=0.05)
    x = torch.randn(16, D_IN)
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().sum().backward()
        assert layer.base.weight.grad is None and layer.base.bias.grad is None
        for p in (layer.own_A, layer.own_B, layer.router.weight):
            assert p.grad is not None and torch.any(p.grad != 0)
        opt.step()
    assert torch.equal(layer.other_A, frozen["other_A"])
    assert torch.equal(layer.other_B, frozen["other_B"])
    assert torch.equal(layer.base.weight, frozen["base.weight"])
    assert torch.equal(layer.base.bias, frozen["base.bias"])
    assert not torch.equal(layer.own_A, trained["own_A"])
    assert not torch.equal(layer.own_B, trained["own_B"])
    assert not torch.equal(layer.router.weight, trained["router"])


@pytest.mark.parametrize("ids", [[], [0, 2], [1, 1], [-1, 0], [1, 2], [0, 1, 3]])
def test_set_experts_needs_a_permutation(ids: list[int]) -> None:
    layer = _layer([0, 1])
    with pytest.raises(ValueError, match="every expert"):
        layer.set_experts(ids)
    assert layer.expert_ids == [0, 1]


def test_set_experts_replaces_the_expert_set() -> None:
    layer = _layer([2, 0, 1])
    layer.set_experts([0])
    assert layer.expert_ids == [0] and layer.router is None
    layer.set_experts([1, 0])
    assert layer.expert_ids == [1, 0] and layer.own == 1
    assert layer.router is not None and layer.router.weight.shape == (3, D_IN)
    assert layer.other_A.shape == (1, R, D_IN)


def test_set_experts_follows_a_moved_layer() -> None:
    """New experts live where the layer is now, not where it was built."""
    torch.manual_seed(0)
    layer = LeaseLinear(nn.Linear(D_IN, D_OUT), CONFIG).to("meta")
    layer.set_experts([1, 0])
    for t in (layer.own_A, layer.own_B, layer.other_A, layer.other_B, layer.router.weight):
        assert t.device.type == "meta"


def test_wire_tensors_keys_and_aliasing() -> None:
    layer = _layer([2, 0, 1])
    wire = layer.wire_tensors("m")
    assert set(wire) == {
        *(expert_key("m", e, p) for e in range(3) for p in "AB"), gate_key("m")
    }
    assert wire[expert_key("m", 2, "A")] is layer.own_A
    assert wire[expert_key("m", 2, "B")] is layer.own_B
    assert wire[gate_key("m")] is layer.router.weight
    with torch.no_grad():
        wire[expert_key("m", 1, "A")].fill_(7.0)  # a view: writes reach the buffer
        wire[expert_key("m", 0, "B")].fill_(3.0)
    assert torch.all(layer.other_A[1] == 7.0) and torch.all(layer.other_A[0] != 7.0)
    assert torch.all(layer.other_B[0] == 3.0) and torch.all(layer.other_B[1] == 0.0)
    assert {k for k, v in wire.items() if v.requires_grad} == {
        expert_key("m", 2, "A"), expert_key("m", 2, "B"), gate_key("m")
    }


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(D_IN, D_IN)
        self.v_proj = nn.Linear(D_IN, D_OUT)
        self.o_proj = nn.Linear(D_OUT, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.v_proj(self.q_proj(x)))


def _lease_model() -> _Tiny:
    torch.manual_seed(0)
    model = _Tiny().eval()
    layers = inject_adapters(model, CONFIG)
    assert set(layers) == {"q_proj", "v_proj"}
    assert all(isinstance(layer, LeaseLinear) for layer in layers.values())
    set_assignment(model, {"q_proj": [1, 0, 2], "v_proj": [0, 1]})
    return model


def test_extract_trainable_and_state() -> None:
    model = _lease_model()
    trainable = extract_trainable(model)
    assert set(trainable) == {
        "q_proj.expert.1.A", "q_proj.expert.1.B", "q_proj.router.gate",
        "v_proj.expert.0.A", "v_proj.expert.0.B", "v_proj.router.gate",
    }
    state = extract_state(model)
    assert set(state) == {
        *(f"q_proj.expert.{e}.{p}" for e in range(3) for p in "AB"), "q_proj.router.gate",
        *(f"v_proj.expert.{e}.{p}" for e in range(2) for p in "AB"), "v_proj.router.gate",
    }
    assert all(not v.requires_grad and v.device.type == "cpu" for v in state.values())
    q = model.q_proj
    assert torch.equal(state["q_proj.expert.1.A"], q.own_A)
    assert torch.equal(state["q_proj.expert.2.A"], q.other_A[1])
    assert state["q_proj.router.gate"].shape == (5, D_IN)
    with torch.no_grad():
        q.own_A.add_(1.0)
    assert not torch.equal(trainable["q_proj.expert.1.A"], q.own_A)  # clones, not views


def test_load_trainable_copies_in_place() -> None:
    model = _lease_model()
    q = model.q_proj
    objects = (q.own_A, q.own_B, q.router.weight)
    ptrs = (q.other_A.data_ptr(), q.other_B.data_ptr())
    torch.manual_seed(5)
    new = {k: torch.randn_like(v) for k, v in extract_state(model).items()}
    load_trainable(model, new)
    assert (q.own_A, q.own_B, q.router.weight) == objects
    assert (q.other_A.data_ptr(), q.other_B.data_ptr()) == ptrs
    assert torch.equal(q.own_A, new["q_proj.expert.1.A"])
    assert torch.equal(q.own_B, new["q_proj.expert.1.B"])
    assert torch.equal(q.other_A[0], new["q_proj.expert.0.A"])
    assert torch.equal(q.other_B[1], new["q_proj.expert.2.B"])
    assert torch.equal(q.router.weight, new["q_proj.router.gate"])
    assert torch.equal(model.v_proj.other_A[0], new["v_proj.expert.1.A"])
    assert q.own_A.requires_grad and not q.other_A.requires_grad
    state = extract_state(model)
    assert all(torch.equal(state[k], new[k]) for k in new)


def test_load_trainable_strict_needs_frozen_experts_too() -> None:
    model = _lease_model()
    trainable = extract_trainable(model)
    with pytest.raises(ValueError, match="missing"):
        load_trainable(model, trainable)
    load_trainable(model, trainable, strict=False)
    with pytest.raises(ValueError, match="not assigned"):
        load_trainable(model, {"v_proj.expert.2.A": torch.zeros(R, D_IN)}, strict=False)


def test_bf16_base_keeps_float32_adapters() -> None:
    base = nn.Linear(D_IN, D_OUT).to(torch.bfloat16)
    layer = _layer([1, 0, 2], base=base).eval()
    _randomise(layer)
    for t in (layer.own_A, layer.own_B, layer.other_A, layer.other_B, layer.router.weight):
        assert t.dtype == torch.float32
    assert layer.base.weight.dtype == torch.bfloat16
    x = torch.randn(2, 3, D_IN)
    with torch.no_grad():
        out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    # the float32 reference, on the bf16-rounded base weights
    layer.base.float()
    expected, _ = _reference(layer, x.bfloat16().float())
    assert torch.allclose(out.float(), expected, rtol=0.05, atol=0.3)
    assert {t.dtype for t in layer.wire_tensors("m").values()} == {torch.float32}


def test_inject_lease_model_forward_uses_layers() -> None:
    model = _lease_model()
    for layer in adapter_layers(model).values():
        _randomise(layer)
    x = torch.randn(3, D_IN)
    with torch.no_grad():
        h, _ = _reference(model.q_proj, x)
        v, _ = _reference(model.v_proj, h)
        assert torch.allclose(model(x), model.o_proj(v), atol=1e-4)
