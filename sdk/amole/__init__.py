"""AMoLE: the adaptive mixture-of-LoRA-experts module of FedAMoLE, and model-level helpers."""

from .config import AMoLEConfig
from .layer import AMoLELinear, EmbeddingAccumulator
from .model import (
    ModuleEmbedding,
    TokenSums,
    adapter_layers,
    assignment_of,
    client_sums_from,
    compute_embeddings,
    compute_embeddings_per_example,
    embedding_sums,
    embeddings_to_tensors,
    extract_trainable,
    inject_amole,
    load_balance,
    load_trainable,
    module_shapes,
    per_example_embedding_tensors,
    pooled_embeddings,
    routing_context,
    set_assignment,
)
from .routing import load_balance_loss, route

__all__ = [
    "AMoLEConfig",
    "AMoLELinear",
    "EmbeddingAccumulator",
    "ModuleEmbedding",
    "TokenSums",
    "adapter_layers",
    "assignment_of",
    "client_sums_from",
    "compute_embeddings",
    "compute_embeddings_per_example",
    "embedding_sums",
    "embeddings_to_tensors",
    "extract_trainable",
    "inject_amole",
    "load_balance",
    "load_balance_loss",
    "load_trainable",
    "module_shapes",
    "per_example_embedding_tensors",
    "pooled_embeddings",
    "route",
    "routing_context",
    "set_assignment",
]
