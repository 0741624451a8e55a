"""A tiny LLaMA with AMoLE layers, shared by the adapter and AMoLE tests (tests/ is on
sys.path, as for tls_broker)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from fedsilo.sdk.adapters.inject import inject_adapters
from fedsilo.sdk.adapters.model import set_assignment
from fedsilo.sdk.amole import AMoLEConfig

Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    return LlamaForCausalLM(config).eval()


def randomise(model: nn.Module) -> None:
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(std=0.2)


def an_assignment() -> dict[str, list[int]]:
    return {
        Q0: [4, 2, 9],
        "model.layers.0.self_attn.v_proj": [1, 0],
        "model.layers.1.self_attn.q_proj": [7],
    }


def routed_llama(config: AMoLEConfig | None = None) -> LlamaForCausalLM:
    model = tiny_llama()
    inject_adapters(model, config or AMoLEConfig(r=4, dropout=0.0))
    set_assignment(model, an_assignment())
    return model
