"""The two messages of a round. Transports move them; strategies fill them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedsilo.sdk.params import ModuleShape, TensorDict

PROTOCOL_VERSION = 1


@dataclass
class RoundPlan:
    """Aggregator -> silo: what to install and how to train this round.

    `final` marks the evaluation-only message sent after the last aggregation
    (local_steps is 0 then): strategies that test the global model use it. `setup` is the
    federation's settings (strategy, adapter, training, seed) as JSON-able data, so an agent
    process learns them from the aggregator instead of trusting its own copy.
    """

    round: int
    silo_id: str
    total_rounds: int
    lr: float
    local_steps: int
    assignment: dict[str, list[int]]
    params: TensorDict
    final: bool = False
    setup: dict[str, Any] = field(default_factory=dict)

    @property
    def last_training_round(self) -> bool:
        """The last round that trains: strategies that score the locally trained model
        give their final score here."""
        return not self.final and self.round == self.total_rounds - 1


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


@dataclass
class Announce:
    """Silo -> aggregator: "I am here, with this base model"; sent at every agent start.

    `linear_shapes` lists every nn.Linear of the silo's backbone, so the aggregator (which
    holds no model) can find the adapted modules by name, and refuse a silo whose base
    model differs from the others'. `incarnation` is random per process start: logs show
    restarts."""

    silo_id: str
    model: str
    linear_shapes: dict[str, ModuleShape]
    n_samples: int
    incarnation: str = ""
    model_digest: str = ""
    """SHA-256 of the backbone weights: silos must all fine-tune the same base model."""
    metric: str = ""
    """What the silo's score is ("accuracy", "rouge-l"): the name the aggregator's
    metrics.jsonl and summary.json give it, as `fedsilo simulate` does ("": not said)."""
