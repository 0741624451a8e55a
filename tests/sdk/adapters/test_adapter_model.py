"""The generic adapter machinery on a real model: the injector, the architecture a silo
installs, and the trainable tensors that travel (AMoLE layers as the example)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_llama import Q0, V1, an_assignment, randomise, routed_llama, tiny_llama
from transformers import BertConfig, BertModel

from fedsilo.sdk.adapters.inject import inject_adapters
from fedsilo.sdk.adapters.model import (
    adapter_layers,
    assignment_of,
    extract_trainable,
    load_trainable,
    module_shapes,
    set_assignment,
)
from fedsilo.sdk.amole import AMoLEConfig, AMoLELinear
from fedsilo.sdk.params import ModuleShape


def test_inject_into_llama_freezes_backbone() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 5))
    before = model(input_ids=ids).logits
    layers = inject_adapters(model, AMoLEConfig(r=4))
    assert list(layers) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert all(isinstance(layer, AMoLELinear) for layer in layers.values())
    assert adapter_layers(model) == layers
    assert not any(layer.training for layer in layers.values())  # keeps the model's eval mode
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        name.rsplit(".", 2)[-2:][0] in {"q_proj", "v_proj", "token_proj"}
        or name.rsplit(".", 1)[-1] in {"shared_A", "shared_B", "expert_A", "expert_B"}
        for name in trainable
    )
    assert not any(".base." in name or "embed" in name or "mlp" in name for name in trainable)
    assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-6)  # B = 0 at init
    assert module_shapes(model)[Q0] == ModuleShape(in_features=32, out_features=32)
    with pytest.raises(ValueError, match="already"):
        inject_adapters(model, AMoLEConfig(r=4))


def test_inject_into_bert_with_query_value_targets() -> None:
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
        )
    ).eval()
    layers = inject_adapters(bert, AMoLEConfig(r=4, target_modules=("query", "value")))
    assert sorted(layers) == [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.self.value",
        "encoder.layer.1.attention.self.query",
        "encoder.layer.1.attention.self.value",
    ]
    assert not any(
        p.requires_grad for n, p in bert.named_parameters() if "query" not in n and "value" not in n
    )
    set_assignment(bert, {name: [0, 1] for name in layers})
    randomise(bert)
    out = bert(input_ids=torch.randint(0, 64, (2, 6))).last_hidden_state
    out.sum().backward()
    assert layers["encoder.layer.1.attention.self.value"].expert_B.grad is not None


def test_inject_unknown_target_lists_available_names() -> None:
    with pytest.raises(ValueError, match="q_proj") as info:
        inject_adapters(tiny_llama(), AMoLEConfig(target_modules=("nope",)))
    assert "nope" in str(info.value)


def test_set_assignment_and_assignment_of() -> None:
    model = routed_llama()
    expected = {name: [] for name in adapter_layers(model)} | an_assignment()
    assert assignment_of(model) == expected
    with pytest.raises(ValueError, match="not AMoLE layers"):
        set_assignment(model, {"model.layers.9.self_attn.q_proj": [1]})


def test_extract_trainable_keys_and_detached_copies() -> None:
    model = routed_llama()
    tensors = extract_trainable(model)
    assert f"{Q0}.shared.A" in tensors and f"{Q0}.router.W_t" in tensors
    assert {k for k in tensors if k.startswith(f"{Q0}.expert.")} == {
        f"{Q0}.expert.{i}.{p}" for i in (4, 2, 9) for p in "AB"
    }
    assert not any(k.startswith(f"{V1}.expert.") for k in tensors)
    n_keys = 4 * 3 + 2 * (3 + 2 + 1)  # shared A/B + W_t per module, A/B per expert
    assert len(tensors) == n_keys
    assert tensors[f"{Q0}.expert.2.A"].shape == (4, 32)
    assert tensors[f"{Q0}.expert.2.B"].shape == (32, 4)
    assert all(t.device.type == "cpu" and not t.requires_grad for t in tensors.values())
    layer = adapter_layers(model)[Q0]
    assert torch.equal(tensors[f"{Q0}.expert.2.A"], layer.expert_A[1])
    snapshot = tensors[f"{Q0}.expert.2.A"].clone()
    with torch.no_grad():
        layer.expert_A.add_(1.0)
    assert torch.equal(tensors[f"{Q0}.expert.2.A"], snapshot)


def test_extract_without_router_has_only_shared_expert() -> None:
    model = tiny_llama()
    inject_adapters(model, AMoLEConfig(r=4, use_router=False))
    tensors = extract_trainable(model)
    assert len(tensors) == 8 and all(".shared." in k for k in tensors)


def test_extract_load_round_trip_reproduces_outputs() -> None:
    source = tiny_llama()
    backbone = copy.deepcopy(source)
    inject_adapters(source, AMoLEConfig(r=4))
    set_assignment(source, an_assignment())
    randomise(source)
    tensors = extract_trainable(source)

    torch.manual_seed(123)  # different adapter init in the receiving model
    target = backbone
    inject_adapters(target, AMoLEConfig(r=4))
    set_assignment(target, an_assignment())
    ids = torch.randint(0, 64, (2, 7))
    assert not torch.allclose(target(input_ids=ids).logits, source(input_ids=ids).logits)
    load_trainable(target, tensors)
    assert torch.equal(target(input_ids=ids).logits, source(input_ids=ids).logits)


def test_load_trainable_errors_name_the_key() -> None:
    model = routed_llama()
    tensors = extract_trainable(model)
    bad = dict(tensors)
    bad[f"{V1}.expert.3.A"] = torch.zeros(4, 32)
    with pytest.raises(ValueError, match=r"expert 3 is not assigned"):
        load_trainable(model, bad)
    missing = dict(tensors)
    del missing[f"{Q0}.router.W_t"]
    with pytest.raises(ValueError, match=r"router\.W_t"):
        load_trainable(model, missing)
    load_trainable(model, missing, strict=False)
    wrong = dict(tensors)
    wrong[f"{Q0}.shared.B"] = torch.zeros(4, 32)
    with pytest.raises(ValueError, match=r"shared\.B.*expected shape \(32, 4\), got \(4, 32\)"):
        load_trainable(model, wrong)
