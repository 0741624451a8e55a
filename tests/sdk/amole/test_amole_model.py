"""AMoLE on a tiny LLaMA: the load balance over real tokens and the embeddings RSEA uses."""

from __future__ import annotations

import pytest
import torch
from tiny_llama import Q0, V1, randomise, routed_llama, tiny_llama
from torch import nn

from fedsilo.sdk.adapters.inject import inject_adapters
from fedsilo.sdk.adapters.model import (
    adapter_layers,
    routing_context,
    set_assignment,
)
from fedsilo.sdk.amole import (
    AMoLEConfig,
    client_sums_from,
    compute_embeddings,
    compute_embeddings_per_example,
    embedding_sums,
    embeddings_to_tensors,
    load_balance,
    per_example_embedding_tensors,
    pooled_embeddings,
)


def test_routing_context_load_balance_ignores_right_padding() -> None:
    model = routed_llama()
    randomise(model)
    ids = torch.randint(1, 64, (1, 6))
    with routing_context(model, torch.ones(1, 6)):
        model(input_ids=ids)
        plain = load_balance(model, torch.ones(1, 6))
    padded_ids = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    with routing_context(model, mask):
        model(input_ids=padded_ids, attention_mask=mask)
        masked = load_balance(model, mask)
        unmasked = load_balance(model, None)
    assert plain.dim() == 0 and plain.item() > 0
    assert masked.item() == pytest.approx(plain.item(), rel=1e-5)
    assert unmasked.item() != pytest.approx(plain.item(), rel=1e-5)
    assert all(
        layer.last_probs is None and layer.token_mask is None
        for layer in adapter_layers(model).values()
    )


def test_load_balance_is_differentiable_and_zero_without_experts() -> None:
    model = routed_llama()
    randomise(model)
    ids = torch.randint(0, 64, (2, 4))
    with routing_context(model, torch.ones(2, 4)):
        model(input_ids=ids)
        loss = load_balance(model, torch.ones(2, 4))
    loss.backward()
    assert adapter_layers(model)[Q0].token_proj.weight.grad is not None
    # only modules with >= 2 experts and a real choice contribute; v_proj of layer 1 has none
    bare = tiny_llama()
    inject_adapters(bare, AMoLEConfig(r=4))
    with routing_context(bare, None):
        bare(input_ids=ids)
        zero = load_balance(bare, None)
    assert zero.dim() == 0 and zero.item() == 0.0


class _OneLayer(nn.Module):
    """Embedding then a single q_proj: its input is exactly the token embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 6)
        self.q_proj = nn.Linear(6, 6)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.q_proj(self.embed(input_ids))


def test_embeddings_equal_hand_mean_over_real_tokens() -> None:
    torch.manual_seed(0)
    model = _OneLayer()
    inject_adapters(model, AMoLEConfig(r=3))
    set_assignment(model, {"q_proj": [5, 2]})
    model.train()
    layer = model.q_proj
    batches = [
        {
            "input_ids": torch.tensor([[1, 2, 3], [4, 5, 0]]),
            "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
            "labels": torch.tensor([[-100, 2, 3], [-100, 5, -100]]),
        },
        {"input_ids": torch.tensor([[7, 0, 0]]), "attention_mask": torch.tensor([[1, 0, 0]])},
    ]
    emb = compute_embeddings(model, batches)["q_proj"]
    assert model.training  # mode restored
    real_tokens = torch.tensor([1, 2, 3, 4, 5, 7])  # 6 tokens, pooled over examples
    x = model.embed.weight[real_tokens].detach()
    assert torch.allclose(emb.client, (x @ layer.token_proj.weight.T).mean(0), atol=1e-6)
    assert set(emb.experts) == {5, 2}
    assert torch.allclose(emb.experts[5], (x @ layer.expert_A[0].T).mean(0), atol=1e-6)
    assert torch.allclose(emb.experts[2], (x @ layer.expert_A[1].T).mean(0), atol=1e-6)
    # per-example means, and the pooled mean is their token-count-weighted mean
    client, experts = compute_embeddings_per_example(model, batches)["q_proj"]
    assert client.shape == (3, 3) and experts.shape == (3, 2, 3)
    x1 = model.embed.weight[torch.tensor([4, 5])].detach()
    assert torch.allclose(client[1], (x1 @ layer.token_proj.weight.T).mean(0), atol=1e-6)
    counts = torch.tensor([3.0, 2.0, 1.0])
    assert torch.allclose((client * counts[:, None]).sum(0) / 6, emb.client, atol=1e-6)
    wire = embeddings_to_tensors({"q_proj": emb})
    assert set(wire) == {"q_proj.client", "q_proj.expert.5", "q_proj.expert.2"}


def test_embeddings_unchanged_by_padding_and_batching() -> None:
    model = routed_llama()
    randomise(model)
    a, b = torch.randint(1, 64, (1, 5)), torch.randint(1, 64, (1, 3))
    separate = [
        {"input_ids": a, "attention_mask": torch.ones(1, 5, dtype=torch.long)},
        {"input_ids": b, "attention_mask": torch.ones(1, 3, dtype=torch.long)},
    ]
    padded_b = torch.cat([b, torch.full((1, 2), 9)], dim=1)
    together = [
        {
            "input_ids": torch.cat([a, padded_b]),
            "attention_mask": torch.tensor([[1] * 5, [1] * 3 + [0] * 2]),
        }
    ]
    one = compute_embeddings(model, separate)
    two = compute_embeddings(model, together)
    assert set(one) == set(adapter_layers(model))
    for name in one:
        assert torch.allclose(one[name].client, two[name].client, atol=1e-5)
        for eid, value in one[name].experts.items():
            assert torch.allclose(value, two[name].experts[eid], atol=1e-5)
    assert set(one[Q0].experts) == {4, 2, 9} and one[V1].experts == {}
    # counting the padding would change the result
    unmasked = [{"input_ids": together[0]["input_ids"], "attention_mask": torch.ones(2, 5)}]
    assert not torch.allclose(compute_embeddings(model, unmasked)[Q0].client, one[Q0].client)


def test_client_part_from_an_earlier_pass() -> None:
    """The client embedding of the pass made with the received W_t, the expert embeddings of
    the pass after training: pooled and per example, and the passes must see the same data."""
    torch.manual_seed(0)
    model = _OneLayer()
    inject_adapters(model, AMoLEConfig(r=3))
    set_assignment(model, {"q_proj": [1]})
    batches = [{"input_ids": torch.tensor([[1, 2, 3], [4, 5, 0]]),
                "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}]
    received = embedding_sums(model, batches)
    before = pooled_embeddings(received)["q_proj"]
    with torch.no_grad():  # local training moves W_t and the expert
        model.q_proj.token_proj.weight.add_(1.0)
        model.q_proj.expert_A[0].add_(1.0)
    after = compute_embeddings(model, batches)["q_proj"]
    mixed_sums = client_sums_from(embedding_sums(model, batches), received)
    mixed = pooled_embeddings(mixed_sums)["q_proj"]
    assert not torch.allclose(before.client, after.client)
    assert torch.equal(mixed.client, before.client)
    assert torch.equal(mixed.experts[1], after.experts[1])
    rows = per_example_embedding_tensors(mixed_sums)
    assert set(rows) == {"q_proj.client", "q_proj.expert.1"}
    assert rows["q_proj.client"].shape == (2, 3)
    fewer = embedding_sums(model, [{"input_ids": torch.tensor([[1, 2, 3]])}])
    with pytest.raises(ValueError, match="same embedding set"):
        client_sums_from(fewer, received)
    with pytest.raises(ValueError, match="different modules"):
        client_sums_from({}, received)


def test_embeddings_need_the_router() -> None:
    model = tiny_llama()
    inject_adapters(model, AMoLEConfig(r=4, use_router=False))
    with pytest.raises(ValueError, match="use_router=False"):
        compute_embeddings(model, [{"input_ids": torch.zeros(1, 2, dtype=torch.long)}])
