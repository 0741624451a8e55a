"""FedLEASE's adaptive top-M routing: the assigned-expert guarantee, checked exhaustively."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fedsilo.sdk.lease import adaptive_top_m, num_slots, slot_experts


def _logits_choosing(subset: tuple[int, ...], slots: int) -> torch.Tensor:
    """Logits (slots,) whose top-len(subset) slots are exactly `subset`, with distinct values
    inside and outside it so the weights differ from slot to slot."""
    logits = torch.empty(slots)
    for i in range(slots):
        logits[i] = 2.0 + 0.3 * i if i in subset else -2.0 - 0.3 * i
    return logits


def _expected_weights(logits: torch.Tensor, subset: tuple[int, ...], mapping: list[int], m: int):
    """Softmax, keep `subset`, renormalise, add up per expert: written out slot by slot."""
    probs = [math.exp(v) for v in logits.tolist()]
    mass = sum(probs[s] for s in subset)
    out = [0.0] * m
    for s in subset:
        out[mapping[s]] += probs[s] / mass
    return torch.tensor(out)


def test_num_slots_and_slot_experts() -> None:
    assert [num_slots(m) for m in (1, 2, 3, 5)] == [1, 3, 5, 9]
    assert slot_experts(1, 0).tolist() == [0]
    assert slot_experts(3, 1).tolist() == [0, 1, 2, 1, 1]
    assert slot_experts(4, 3).tolist() == [0, 1, 2, 3, 3, 3, 3]
    assert slot_experts(3, 0).dtype == torch.long


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_assigned_expert_always_chosen_exhaustive(m: int) -> None:
    slots = num_slots(m)
    subsets = list(itertools.combinations(range(slots), m))
    assert len(subsets) == math.comb(slots, m)
    logits = torch.stack([_logits_choosing(s, slots) for s in subsets])  # one token per subset
    for assigned in range(m):
        mapping = [*range(m), *([assigned] * (m - 1))]
        weights, experts = adaptive_top_m(logits, assigned)
        assert weights.shape == (len(subsets), m) and experts.shape == (len(subsets), m)
        assert weights.dtype == torch.float32 and experts.dtype == torch.long
        assert torch.all(weights >= 0)
        assert torch.allclose(weights.sum(-1), torch.ones(len(subsets)), atol=1e-6)
        used_counts = set()
        for row, subset in enumerate(subsets):
            chosen = experts[row].tolist()
            # the chosen experts are exactly the experts of the subset's slots
            assert sorted(chosen) == sorted(mapping[s] for s in subset)
            assert assigned in chosen
            assert weights[row, assigned] > 0
            assert torch.allclose(
                weights[row], _expected_weights(logits[row], subset, mapping, m), atol=1e-6
            )
            # only chosen experts get weight
            unchosen = [e for e in range(m) if e not in chosen]
            assert torch.all(weights[row, unchosen] == 0)
            used = int((weights[row] > 0).sum())
            assert 1 <= used <= m
            assert used == len(set(chosen))
            used_counts.add(used)
        # the number of experts a token uses is learned: every value 1..M occurs
        assert used_counts == (set(range(1, m + 1)) if m >= 2 else {1})


def test_hand_computed_example_m3() -> None:
    # slots stand for experts (0, 1, 2, 1, 1); top 3 slots: 3 (3.0), 0 (2.0), 2 (1.0)
    logits = torch.tensor([[2.0, 0.0, 1.0, 3.0, -1.0],
                           [0.0, 1.0, -2.0, 2.0, 3.0]])
    weights, experts = adaptive_top_m(logits, assigned=1)
    z = math.exp(3) + math.exp(2) + math.exp(1)
    first = torch.tensor([math.exp(2) / z, math.exp(3) / z, math.exp(1) / z])
    assert torch.allclose(weights[0], first, atol=1e-6)
    assert sorted(experts[0].tolist()) == [0, 1, 2]
    # second token: top 3 slots are 4, 3, 1, all standing for expert 1
    assert torch.allclose(weights[1], torch.tensor([0.0, 1.0, 0.0]))
    assert experts[1].tolist() == [1, 1, 1]


def test_m1_is_a_single_expert_with_weight_one() -> None:
    weights, experts = adaptive_top_m(torch.randn(4, 1), assigned=0)
    assert torch.equal(weights, torch.ones(4, 1))
    assert torch.equal(experts, torch.zeros(4, 1, dtype=torch.long))


def test_leading_dims_are_kept() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)  # M = 4
    weights, experts = adaptive_top_m(logits, assigned=2)
    assert weights.shape == (2, 3, 4) and experts.shape == (2, 3, 4)
    flat_w, flat_e = adaptive_top_m(logits.reshape(6, 7), assigned=2)
    assert torch.equal(weights.reshape(6, 4), flat_w)
    assert torch.equal(experts.reshape(6, 4), flat_e)
    assert torch.all(weights[..., 2] > 0)


@pytest.mark.parametrize("slots", [0, 2, 4, 6])
def test_even_slot_count_raises(slots: int) -> None:
    with pytest.raises(ValueError, match="odd"):
        adaptive_top_m(torch.zeros(3, slots), assigned=0)


@pytest.mark.parametrize("assigned", [-1, 3, 7])
def test_assigned_out_of_range_raises(assigned: int) -> None:
    with pytest.raises(ValueError, match="not one of"):
        adaptive_top_m(torch.zeros(2, 5), assigned=assigned)
    with pytest.raises(ValueError, match="not one of"):
        slot_experts(3, assigned)


def test_bf16_logits_give_bf16_weights() -> None:
    torch.manual_seed(1)
    logits = torch.randn(5, 5)
    w32, _ = adaptive_top_m(logits, assigned=0)
    w16, e16 = adaptive_top_m(logits.bfloat16(), assigned=0)
    assert w16.dtype == torch.bfloat16 and e16.dtype == torch.long
    assert torch.allclose(w16.float().sum(-1), torch.ones(5), atol=1e-2)
    assert torch.allclose(w16.float(), w32, atol=2e-2)
    assert torch.all(w16[:, 0] > 0)


def test_weights_are_differentiable_in_the_logits() -> None:
    logits = torch.tensor([[2.0, 0.0, 1.0, 3.0, -1.0]], requires_grad=True)
    weights, _ = adaptive_top_m(logits, assigned=1)
    weights[0, 0].backward()
    assert logits.grad is not None
    assert logits.grad[0, 0] > 0  # raising expert 0's slot raises its weight
    assert logits.grad[0, 4] == 0  # a slot outside the top M has no say
