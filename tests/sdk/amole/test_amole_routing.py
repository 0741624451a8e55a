"""Routing math against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from fedsilo.sdk.amole import AMoLEConfig, load_balance_loss, route


def test_route_matches_hand_computation_one_token_three_experts() -> None:
    query = torch.tensor([1.0, 0.0])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    probs, gates, topk = route(query, keys, top_k=2, scale=1.0)
    # logits = [1, 0, 2]; exp = [e, 1, e^2]; sum = e + 1 + e^2
    e = math.e
    z = e + 1.0 + e**2
    expected_probs = torch.tensor([e / z, 1.0 / z, e**2 / z])  # [0.2447, 0.0900, 0.6652]
    assert torch.allclose(probs, expected_probs, atol=1e-6)
    assert probs[0].item() == pytest.approx(0.244728, abs=1e-6)
    # top-2 = experts 2 and 0, renormalised over their mass (e^2 + e)
    assert topk.tolist() == [2, 0]
    expected_gates = torch.tensor([e / (e + e**2), 0.0, e**2 / (e + e**2)])
    assert torch.allclose(gates, expected_gates, atol=1e-6)
    assert gates[2].item() == pytest.approx(0.731059, abs=1e-6)


def test_route_scale_multiplies_logits() -> None:
    torch.manual_seed(0)
    query, keys = torch.randn(5, 4), torch.randn(5, 3, 4)
    p1, g1, i1 = route(query, keys, top_k=2, scale=0.5)
    p2, g2, i2 = route(0.5 * query, keys, top_k=2, scale=1.0)
    assert torch.allclose(p1, p2, atol=1e-6) and torch.allclose(g1, g2, atol=1e-6)
    assert torch.equal(i1, i2)
    p3, _, _ = route(query, keys, top_k=2, scale=1.0)
    assert not torch.allclose(p1, p3)


def test_route_fewer_experts_than_top_k_uses_all() -> None:
    query = torch.tensor([[1.0, 2.0]])
    keys = torch.tensor([[[0.5, 0.0], [0.0, 0.5]]])
    probs, gates, topk = route(query, keys, top_k=5, scale=1.0)
    assert topk.shape == (1, 2)
    assert torch.allclose(gates, probs)  # all experts chosen: renormalising changes nothing
    _, single_gates, single_topk = route(query, keys[:, :1], top_k=2, scale=1.0)
    assert single_topk.tolist() == [[0]]
    assert single_gates.tolist() == [[1.0]]


def test_route_gates_sum_to_one_and_are_zero_outside_top_k() -> None:
    torch.manual_seed(1)
    query, keys = torch.randn(2, 7, 8), torch.randn(2, 7, 6, 8)
    probs, gates, topk = route(query, keys, top_k=3, scale=1 / math.sqrt(8))
    assert probs.shape == (2, 7, 6) and gates.shape == (2, 7, 6) and topk.shape == (2, 7, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 7), atol=1e-6)
    assert torch.allclose(gates.sum(-1), torch.ones(2, 7), atol=1e-6)
    assert ((gates > 0).sum(-1) == 3).all()
    chosen = torch.zeros_like(gates, dtype=torch.bool).scatter(-1, topk, True)
    assert torch.all(gates[~chosen] == 0)
    # the chosen experts are the most probable ones
    weakest_chosen = probs.gather(-1, topk).min(-1).values
    assert torch.all(weakest_chosen >= probs.masked_fill(chosen, -1).max(-1).values)


def test_route_no_experts_gives_empty_tensors() -> None:
    probs, gates, topk = route(torch.randn(4, 3), torch.randn(4, 0, 3), top_k=2, scale=1.0)
    assert probs.shape == (4, 0) and gates.shape == (4, 0) and topk.shape == (4, 0)
    assert topk.dtype == torch.long


def test_load_balance_loss_hand_value_top1() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    topk = torch.tensor([[0], [0], [1]])
    # f = [2/3, 1/3], P = [0.6, 0.4]; loss = 2 * (0.4 + 0.4/3) = 1.0666...
    assert load_balance_loss(probs, topk, None).item() == pytest.approx(2 * (0.4 + 0.4 / 3))


def test_load_balance_loss_hand_value_top2() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.3, 0.6]])
    topk = torch.tensor([[0, 1], [2, 1]])
    # picks: e0 1, e1 2, e2 1 out of 4 -> f = [.25, .5, .25]; P = [.3, .3, .4]
    # loss = 3 * (0.075 + 0.15 + 0.1) = 0.975
    assert load_balance_loss(probs, topk, None).item() == pytest.approx(0.975)


def test_load_balance_loss_masked_padding_equals_dropping_it() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.3, 0.6]])
    topk = torch.tensor([[0, 1], [2, 1]])
    pad_probs = torch.tensor([[0.0, 0.0, 1.0], [0.9, 0.05, 0.05], [0.0, 1.0, 0.0]])
    pad_topk = torch.tensor([[2, 1], [0, 1], [1, 0]])
    all_probs = torch.cat([pad_probs[:1], probs[:1], pad_probs[1:], probs[1:]])
    all_topk = torch.cat([pad_topk[:1], topk[:1], pad_topk[1:], topk[1:]])
    mask = torch.tensor([False, True, False, False, True])
    masked = load_balance_loss(all_probs, all_topk, mask)
    assert masked.item() == pytest.approx(load_balance_loss(probs, topk, None).item())
    assert load_balance_loss(all_probs, all_topk, None).item() != pytest.approx(masked.item())


def test_load_balance_loss_degenerate_cases_are_zero() -> None:
    probs = torch.tensor([[0.5, 0.5]])
    topk = torch.tensor([[0]])
    assert load_balance_loss(probs, topk, torch.tensor([False])).item() == 0.0
    assert load_balance_loss(torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.long), None) == 0


def test_load_balance_loss_is_differentiable_through_probs() -> None:
    logits = torch.randn(4, 3, requires_grad=True)
    probs = logits.softmax(-1)
    load_balance_loss(probs, probs.topk(2, -1).indices, None).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"r": 0},
        {"top_k": 0},
        {"dropout": 1.0},
        {"dropout": -0.1},
        {"target_modules": ()},
        {"score_scale": "x"},
    ],
)
def test_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="AMoLEConfig"):
        AMoLEConfig(**kwargs)


def test_config_defaults_and_scaling() -> None:
    config = AMoLEConfig()
    assert config.scaling == 2.0
    assert AMoLEConfig(target_modules=["query", "value"]).target_modules == ("query", "value")
