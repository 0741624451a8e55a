"""AMoLE, the adaptive mixture-of-LoRA-experts module of FedAMoLE: its config, its layer
(which plugs into `fedsilo.sdk.adapters`), its routing, and what only its router gives:
the load-balance loss and the RSEA embeddings. The generic adapter helpers are in
`fedsilo.sdk.adapters`."""

from .config import AMoLEConfig, LayerKind
from .layer import AMoLELinear, EmbeddingAccumulator
from .model import (
    ModuleEmbedding,
    TokenSums,
    client_sums_from,
    compute_embeddings,
    compute_embeddings_per_example,
    embedding_sums,
    embeddings_to_tensors,
    load_balance,
    per_example_embedding_tensors,
    pooled_embeddings,
)
from .routing import load_balance_loss, route

__all__ = [
    "AMoLEConfig",
    "AMoLELinear",
    "EmbeddingAccumulator",
    "LayerKind",
    "ModuleEmbedding",
    "TokenSums",
    "client_sums_from",
    "compute_embeddings",
    "compute_embeddings_per_example",
    "embedding_sums",
    "embeddings_to_tensors",
    "load_balance",
    "load_balance_loss",
    "per_example_embedding_tensors",
    "pooled_embeddings",
    "route",
]
