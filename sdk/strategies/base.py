"""The strategy interface, split by side as in Flower.

The aggregator loop talks to a `ServerStrategy`, the silo loop to a `ClientStrategy`;
neither loop nor any transport knows which algorithm runs. A `StrategySpec` ties the
two halves of one algorithm together with its settings (`config`) and the adapter
architecture it needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from torch import Tensor

from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.messages import RoundPlan, Upload
from fedsilo.sdk.params import ModuleShape, TensorDict
from fedsilo.sdk.schema import Schema, schema_of
from fedsilo.sdk.strategies.config import StrategyConfig

if TYPE_CHECKING:
    from fedsilo.sdk.training import LocalTrainer

C = TypeVar("C", bound=StrategyConfig)


@dataclass(frozen=True)
class SiloPlan:
    """The strategy's part of a round plan: the architecture and the tensors to install."""

    assignment: dict[str, list[int]]
    params: TensorDict


@dataclass(frozen=True)
class UploadSchema:
    """The tensors a silo's upload must hold (names, shapes, dtypes), checked before the
    upload is folded in."""

    params: Schema
    embeddings: Schema


@dataclass
class AggregationReport:
    round: int
    num_uploads: int
    seconds: float
    details: dict[str, float] = field(default_factory=dict)


class Checkpointable(ABC):
    """State a long-running party saves after every step and restores on restart."""

    @abstractmethod
    def state_dict(self) -> tuple[TensorDict, dict[str, Any]]:
        """Everything needed to continue exactly, at any point between calls: tensors under
        namespaced keys (`params/...`, `sum/...`) and JSON-able metadata (no pickle).

        Why: the aggregator checkpoints after every step and must survive SIGKILL; a
        resumed run must end with the same parameters as one that never failed. The
        tensors may alias live state: save them (`save_checkpoint` copies) before the next
        call."""

    @abstractmethod
    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore `state_dict()`'s output into a freshly constructed instance (same
        constructor arguments; no `initialize` before). Raises CheckpointError if the state
        was written under other settings."""


class ServerStrategy(Checkpointable):
    """Aggregator half. Uploads are folded in one at a time (`accumulate`), so memory
    does not grow with the number of silos. `averaging.AveragingServer` implements the
    bookkeeping every algorithm shares."""

    def validate(self, num_silos: int) -> None:
        """Raise a clear error if the settings cannot work for `num_silos` (before any
        expensive loading happens)."""

    def validate_rounds(self, rounds: int) -> None:
        """Raise a clear error if the settings cannot work for a run of `rounds` rounds."""

    @abstractmethod
    def initialize(self, shapes: Mapping[str, ModuleShape], silo_ids: Sequence[str]) -> None:
        """Create the global state for the adapted modules and the round-0 architecture."""

    @abstractmethod
    def configure_round(
        self, server_round: int, silo_ids: Sequence[str]
    ) -> dict[str, SiloPlan]:
        """What each silo installs this round. `silo_ids` are the round's participants and
        may differ from the previous round's (a silo joined late or left): the strategy
        adapts to exactly them. Deterministic given the state, since a resumed aggregator
        asks again for the plans of the round it was in."""

    def configure_final(self, silo_ids: Sequence[str]) -> dict[str, SiloPlan]:
        """The evaluation-only plan after the last aggregation. By default the global
        state, for strategies whose score is the global model's."""
        return self.configure_round(-1, silo_ids)

    def upload_schema(self, silo_id: str, part: SiloPlan, final: bool) -> UploadSchema:
        """What `silo_id` must send back for the plan `part`. By default: exactly the
        tensors it was sent, trained; nothing after the final (evaluation-only) plan."""
        if final:
            return UploadSchema({}, {})
        return UploadSchema(schema_of(part.params), {})

    @abstractmethod
    def begin_round(self, server_round: int) -> None: ...

    @abstractmethod
    def accumulate(self, upload: Upload) -> None: ...

    @abstractmethod
    def end_round(self, server_round: int) -> AggregationReport:
        """Close the round: aggregate the uploads that arrived (a participant may have
        missed the deadline), then decide the next round's architecture."""

    @property
    @abstractmethod
    def global_params(self) -> TensorDict: ...


class ClientStrategy(ABC):
    """Silo half: what a silo does with a plan, using its `LocalTrainer`."""

    @abstractmethod
    def run_round(self, plan: RoundPlan, trainer: LocalTrainer) -> Upload:
        """Handle one plan (a training round, or the final evaluation-only plan)."""

    def state_dict(self) -> TensorDict:
        """What the silo keeps between rounds besides the installed adapter (FDLoRA's
        personal adapter): never uploaded, saved in the agent's checkpoint."""
        return {}

    def load_state_dict(self, tensors: Mapping[str, Tensor]) -> None:  # noqa: B027
        """Restore `state_dict()`'s output after an agent restart."""


@dataclass(frozen=True)
class StrategySpec(Generic[C]):
    name: str
    description: str
    config: type[C]
    """The strategy's own settings (`[strategy]` with this `name`)."""
    adapter: Callable[[AMoLEConfig], AMoLEConfig]
    server: Callable[[AMoLEConfig, C, int], ServerStrategy]
    client: Callable[[C], ClientStrategy]
    personalised: Callable[[AMoLEConfig, TensorDict, TensorDict], Personalised] = (
        lambda adapter, tensors, client_state: Personalised(adapter, dict(tensors))
    )
    """The model the silo's final score is of, from its saved adapter (`tensors`) and
    `ClientStrategy.state_dict()`: by default the adapter as saved; FDLoRA fuses."""


@dataclass(frozen=True)
class Personalised:
    """A silo's personalised model as one installable adapter (`fedsilo export`)."""

    adapter: AMoLEConfig
    tensors: TensorDict
    details: dict[str, Any] = field(default_factory=dict)
    """JSON-able notes on how it was built (recorded in the export's config)."""
