"""AMoLE: the adaptive mixture-of-LoRA-experts module of FedAMoLE, and model-level helpers."""

from .config import AMoLEConfig
from .layer import AMoLELinear, EmbeddingAccumulator
from .model import (
    ModuleEmbedding,
    adapter_layers,
    assignment_of,
    compute_embeddings,
    compute_embeddings_per_example,
    embeddings_to_tensors,
    extract_trainable,
    inject_amole,
    load_balance,
    load_trainable,
    module_shapes,
    routing_context,
    set_assignment,
)
from .routing import load_balance_loss, route

__all__ = [
    "AMoLEConfig",
    "AMoLELinear",
    "EmbeddingAccumulator",
    "ModuleEmbedding",
    "adapter_layers",
    "assignment_of",
    "compute_embeddings",
    "compute_embeddings_per_example",
    "embeddings_to_tensors",
    "extract_trainable",
    "inject_amole",
    "load_balance",
    "load_balance_loss",
    "load_trainable",
    "module_shapes",
    "route",
    "routing_context",
    "set_assignment",
]
