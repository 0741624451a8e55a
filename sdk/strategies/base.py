"""The strategy interface, split by side as in Flower.

The aggregator loop talks to a `ServerStrategy`, the silo loop to a `ClientStrategy`;
neither loop nor any transport knows which algorithm runs. A `StrategySpec` ties the
two halves of one algorithm together with the adapter architecture it needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from torch import Tensor

from fedsilo.sdk.aggregation.fedavg import TensorMean
from fedsilo.sdk.aggregation.robust import RULES, Rule, new_mean
from fedsilo.sdk.aggregation.rsea import Relevance, RelevanceOptions
from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.messages import RoundPlan, Upload
from fedsilo.sdk.params import ModuleShape, TensorDict
from fedsilo.sdk.schema import Schema, schema_of

if TYPE_CHECKING:
    from fedsilo.sdk.training import LocalTrainer


#: StrategyConfig fields that do not change results (a resume may use other values).
SPEED_ONLY = frozenset({"solver_processes"})

# The values a StrategyConfig field allows, named once: its type and its check.
Assignment = Literal["rsea", "random", "static"]
Solver = Literal["scip", "flow", "lp"]
ClientEmbedding = Literal["trained", "received"]
Weighting = Literal["uniform", "samples"]
ExpertInit = Literal["own", "mean"]


@dataclass(frozen=True)
class StrategyConfig:
    """Knobs of every strategy; each reads the ones it understands.

    FedAMoLE: `num_experts` per module (E), `k_c` silos per expert, `b` max experts per
    silo (k_e is the adapter's routing top-k), `assignment` ("rsea"; "random" re-draws
    every round and "static" keeps round 0's: the paper's ablations), `solver` ("scip",
    the reference; "flow" or "lp", exact fast paths: see `aggregation.assignment`), in how
    many `solver_processes` (0: one per CPU, for programs large enough to gain; 1: in the
    aggregator's process: `aggregation.solver_pool`), how experts
    score silos (`relevance` "paper" | "standardised" | "trainers" | "anchor", the softmax
    `temperature`, and `stickiness` towards the silos that trained an expert: see
    `aggregation.rsea.RelevanceOptions`), and which pass a silo's client embedding comes from
    (`client_embedding` "trained": after local training, as the paper; "received": with
    the parameters as received, before training, so every silo embeds with the same
    shared token projection W_t and the embeddings of different silos are comparable).
    FedLEASE: `warmup_rounds` (W) of one LoRA per silo before clustering, `max_clusters`
    (M is chosen in 2..max_clusters by silhouette), `expert_init` of a silo's own expert
    ("own" warm-up LoRA, the authors' code, or the cluster "mean", the paper).
    FDLoRA: `sync_every` rounds the personal adapter restarts from the shared one; the
    outer optimizer (`outer_lr`, `outer_momentum`, Nesterov); the fusion search
    (`fusion_budget` evaluations, `fusion_l1` penalty, on `fusion_batches` validation
    batches).
    All: `weighting` of FedAvg ("uniform", as the paper's code, or "samples"), and the
    `aggregation` rule of the parameters ("mean", FedAvg; "median" or "trimmed_mean" with
    `trim` cut from each end, coordinate-wise, robust to a minority of bad silos at one
    copy per silo of memory and no sample weighting: `aggregation.robust`).
    """

    name: str = "fedamole"
    num_experts: int = 30
    k_c: int = 2
    b: int = 8
    assignment: Assignment = "rsea"
    # exact min-cost flow (OR-Tools); "scip" is the paper's MILP, the reference
    solver: Solver = "flow"
    # worker processes for large programs: 0 one per CPU, 1 none (aggregation.solver_pool)
    solver_processes: int = 0
    # The decisive benchmark's validation choice (benchmarks/README.md, Accuracy); the
    # paper's eq. 26 is relevance = "paper", temperature = 1.0.
    relevance: Relevance = "anchor"
    temperature: float = 0.1
    stickiness: float = 0.0
    client_embedding: ClientEmbedding = "trained"
    weighting: Weighting = "uniform"
    aggregation: Rule = "mean"
    trim: float = 0.1
    # A tensor fewer silos trained in a round keeps its value (nobody's update verbatim).
    min_contributors: int = 2
    warmup_rounds: int = 2
    max_clusters: int = 8
    expert_init: ExpertInit = "own"
    sync_every: int = 5
    outer_lr: float = 1.0
    outer_momentum: float = 0.5
    fusion_budget: int = 5
    fusion_l1: float = 0.05
    fusion_batches: int = 2

    def __post_init__(self) -> None:
        allowed = {
            "assignment": get_args(Assignment),
            "solver": get_args(Solver),
            "weighting": get_args(Weighting),
            "expert_init": get_args(ExpertInit),
            "client_embedding": get_args(ClientEmbedding),
            "aggregation": RULES,
        }
        for key, values in allowed.items():
            if getattr(self, key) not in values:
                raise ValueError(
                    f"strategy.{key} = {getattr(self, key)!r} is not allowed; use one of "
                    + ", ".join(repr(v) for v in values)
                )
        at_least = {"warmup_rounds": 1, "max_clusters": 2, "sync_every": 1, "min_contributors": 1,
                    "fusion_budget": 1, "fusion_batches": 1, "solver_processes": 0}
        for key, low in at_least.items():
            value = getattr(self, key)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"strategy.{key} = {value!r}: use an integer >= {low}")
        if not self.outer_lr > 0:
            raise ValueError(f"strategy.outer_lr = {self.outer_lr!r}: use a number > 0")
        if not 0 <= self.outer_momentum < 1:
            raise ValueError(
                f"strategy.outer_momentum = {self.outer_momentum!r}: use a number in [0, 1)"
            )
        try:
            self.relevance_options()  # checked in one place, named as the config names it
        except ValueError as exc:
            raise ValueError(f"strategy.{exc}") from None
        if not self.fusion_l1 >= 0:
            raise ValueError(f"strategy.fusion_l1 = {self.fusion_l1!r}: use a number >= 0")
        if not (isinstance(self.trim, (int, float)) and 0 <= self.trim < 0.5):
            raise ValueError(f"strategy.trim = {self.trim!r}: use a share in [0, 0.5)")

    def settings(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: every knob but those that change
        only how fast a round is computed, never its result."""
        return {k: v for k, v in asdict(self).items() if k not in SPEED_ONLY}

    def parameter_mean(self) -> TensorMean:
        """A fresh accumulator for a round's parameters under `aggregation`."""
        return new_mean(self.aggregation, self.trim, self.min_contributors)

    def check_contributors(self, num_silos: int) -> None:
        """A federation too small for `min_contributors` would never update anything."""
        if num_silos < self.min_contributors:
            raise ValueError(
                f"strategy.min_contributors = {self.min_contributors} but the federation has "
                f"{num_silos} silo(s): no tensor could ever be updated; add silos or set "
                "min_contributors = 1 (then a tensor one silo trained is published as it "
                "trained it)"
            )

    def relevance_options(self) -> RelevanceOptions:
        return RelevanceOptions(self.relevance, self.temperature, self.stickiness)


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
class StrategySpec:
    name: str
    description: str
    adapter: Callable[[AMoLEConfig], AMoLEConfig]
    server: Callable[[AMoLEConfig, StrategyConfig, int], ServerStrategy]
    client: Callable[[StrategyConfig], ClientStrategy]
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
