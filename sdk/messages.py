"""The two messages of a round. Transports move them; strategies fill them."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedsilo.sdk.params import TensorDict

PROTOCOL_VERSION = 1


@dataclass
class RoundPlan:
    """Aggregator -> silo: what to install and how to train this round.

    `final` marks the evaluation-only message sent after the last aggregation
    (local_steps is 0 then): strategies that test the global model use it.
    """

    round: int
    silo_id: str
    total_rounds: int
    lr: float
    local_steps: int
    assignment: dict[str, list[int]]
    params: TensorDict
    final: bool = False


@dataclass
class Upload:
    """Silo -> aggregator: trained tensors, embeddings for assignment, and what it measured."""

    round: int
    silo_id: str
    params: TensorDict
    embeddings: TensorDict
    n_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
