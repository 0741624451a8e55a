"""Each strategy's own settings, as PEFT has a config per tuner and Flower's strategies take
their own arguments.

`StrategyConfig` holds what every strategy takes (how parameters are averaged); FedIT,
FedIT-FT and local-only take nothing else. FedAMoLE, FedLEASE and FDLoRA extend it with
their knobs. The registry ties a strategy's name to its class (`StrategySpec.config`), and
`[strategy].name` picks it: federation.toml refuses another strategy's keys
(`sdk.config.TaggedConfig`), and the simulation's flat flags are built from these classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, ClassVar, Literal, get_args

from fedsilo.sdk.aggregation.relevance import Relevance, RelevanceOptions
from fedsilo.sdk.aggregation.rules import RULES, Rule
from fedsilo.sdk.config import TaggedConfig

#: Fields that do not change results (a resume may use other values).
SPEED_ONLY = frozenset({"solver_processes"})

# The values a field allows, named once: its type and its check.
Assignment = Literal["rsea", "random", "static"]
Solver = Literal["scip", "flow", "lp"]
ClientEmbedding = Literal["trained", "received"]
Weighting = Literal["uniform", "samples"]
ExpertInit = Literal["own", "mean"]


def _one_of(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"strategy.{key} = {value!r} is not allowed; use one of "
                         + ", ".join(repr(v) for v in allowed))


def _integer_at_least(key: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or value < low:
        raise ValueError(f"strategy.{key} = {value!r}: use an integer >= {low}")


@dataclass(frozen=True)
class StrategyConfig(TaggedConfig):
    """What every strategy takes: the `weighting` of FedAvg ("uniform", as the paper's code,
    or "samples"), and the `aggregation` rule of the parameters ("mean", FedAvg; "median"
    or "trimmed_mean" with `trim` cut from each end, coordinate-wise, robust to a minority
    of bad silos at one copy per silo of memory and no sample weighting:
    `aggregation.robust`). A tensor fewer than `min_contributors` silos trained in a round
    keeps its value, so nobody's update is published verbatim."""

    tag: ClassVar[str] = "name"

    name: str
    weighting: Weighting = "uniform"
    aggregation: Rule = "mean"
    trim: float = 0.1
    min_contributors: int = 2

    def __post_init__(self) -> None:
        own = self.variants().get(self.name)
        if own is not None and own is not type(self):
            raise ValueError(f"strategy.name = {self.name!r} takes a {own.__name__}, "
                             f"not a {type(self).__name__}")
        _one_of("weighting", self.weighting, get_args(Weighting))
        _one_of("aggregation", self.aggregation, RULES)
        _integer_at_least("min_contributors", self.min_contributors, 1)
        if not (isinstance(self.trim, (int, float)) and 0 <= self.trim < 0.5):
            raise ValueError(f"strategy.trim = {self.trim!r}: use a share in [0, 0.5)")

    @classmethod
    def variants(cls) -> Mapping[str, type[StrategyConfig]]:
        from fedsilo.sdk.strategies.registry import STRATEGIES  # the registry imports us

        return {name: spec.config for name, spec in STRATEGIES.items()}

    def settings(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: every knob but those that change
        only how fast a round is computed, never its result."""
        return {k: v for k, v in asdict(self).items() if k not in SPEED_ONLY}

    def check_contributors(self, num_silos: int) -> None:
        """A federation too small for `min_contributors` would never update anything."""
        if num_silos < self.min_contributors:
            raise ValueError(
                f"strategy.min_contributors = {self.min_contributors} but the federation has "
                f"{num_silos} silo(s): no tensor could ever be updated; add silos or set "
                "min_contributors = 1 (then a tensor one silo trained is published as it "
                "trained it)"
            )


@dataclass(frozen=True)
class FedAMoLEConfig(StrategyConfig):
    """`num_experts` per module (E), `k_c` silos per expert, `b` max experts per silo (k_e
    is the adapter's routing top-k), `assignment` ("rsea"; "random" re-draws every round
    and "static" keeps round 0's: the paper's ablations), `solver` ("flow", exact min-cost
    flow; "scip", the paper's MILP and the reference; "lp": see `aggregation.assignment`),
    in how many `solver_processes` (0: one per CPU, for programs large enough to gain; 1:
    in the aggregator's process: `aggregation.solver_pool`), how experts score silos
    (`relevance` "paper" | "standardised" | "trainers" | "anchor", the softmax
    `temperature`, and `stickiness` towards the silos that trained an expert: see
    `aggregation.rsea.RelevanceOptions`), and which pass a silo's client embedding comes
    from (`client_embedding` "trained": after local training, as the paper; "received":
    with the parameters as received, before training, so every silo embeds with the same
    shared token projection W_t and the embeddings of different silos are comparable)."""

    name: str = "fedamole"
    num_experts: int = 30
    k_c: int = 2
    b: int = 8
    assignment: Assignment = "rsea"
    solver: Solver = "flow"
    solver_processes: int = 0
    # The decisive benchmark's validation choice (benchmarks/README.md, Accuracy); the
    # paper's eq. 26 is relevance = "paper", temperature = 1.0.
    relevance: Relevance = "anchor"
    temperature: float = 0.1
    stickiness: float = 0.0
    client_embedding: ClientEmbedding = "trained"

    def __post_init__(self) -> None:
        super().__post_init__()
        _one_of("assignment", self.assignment, get_args(Assignment))
        _one_of("solver", self.solver, get_args(Solver))
        _one_of("client_embedding", self.client_embedding, get_args(ClientEmbedding))
        _integer_at_least("solver_processes", self.solver_processes, 0)
        try:
            self.relevance_options()  # checked in one place, named as the config names it
        except ValueError as exc:
            raise ValueError(f"strategy.{exc}") from None

    def relevance_options(self) -> RelevanceOptions:
        return RelevanceOptions(self.relevance, self.temperature, self.stickiness)


@dataclass(frozen=True)
class FedLEASEConfig(StrategyConfig):
    """`warmup_rounds` (W) of one LoRA per silo before clustering, `max_clusters` (M is
    chosen in 2..max_clusters by silhouette), `expert_init` of a silo's own expert ("own"
    warm-up LoRA, the authors' code, or the cluster "mean", the paper)."""

    name: str = "fedlease"
    warmup_rounds: int = 2
    max_clusters: int = 8
    expert_init: ExpertInit = "own"

    def __post_init__(self) -> None:
        super().__post_init__()
        _one_of("expert_init", self.expert_init, get_args(ExpertInit))
        _integer_at_least("warmup_rounds", self.warmup_rounds, 1)
        _integer_at_least("max_clusters", self.max_clusters, 2)


@dataclass(frozen=True)
class FDLoRAConfig(StrategyConfig):
    """`sync_every` rounds the personal adapter restarts from the shared one; the outer
    optimizer (`outer_lr`, `outer_momentum`, Nesterov); the fusion search (`fusion_budget`
    evaluations, `fusion_l1` penalty, on `fusion_batches` validation batches)."""

    name: str = "fdlora"
    sync_every: int = 5
    outer_lr: float = 1.0
    outer_momentum: float = 0.5
    fusion_budget: int = 5
    fusion_l1: float = 0.05
    fusion_batches: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("sync_every", "fusion_budget", "fusion_batches"):
            _integer_at_least(key, getattr(self, key), 1)
        if not self.outer_lr > 0:
            raise ValueError(f"strategy.outer_lr = {self.outer_lr!r}: use a number > 0")
        if not 0 <= self.outer_momentum < 1:
            raise ValueError(
                f"strategy.outer_momentum = {self.outer_momentum!r}: use a number in [0, 1)"
            )
        if not self.fusion_l1 >= 0:
            raise ValueError(f"strategy.fusion_l1 = {self.fusion_l1!r}: use a number >= 0")


def own_knobs(config_class: type[StrategyConfig], values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` less the knobs only other strategies take. Setups and checkpoints written
    before each strategy had its own config hold every strategy's knobs; the others never
    changed a result. A key no strategy takes is kept, for the caller to refuse."""
    own = {f.name for f in fields(config_class)}
    others = {f.name for cls in StrategyConfig.variants().values() for f in fields(cls)}
    return {k: v for k, v in values.items() if k in own or k not in others}


def config_from_values(values: Mapping[str, Any]) -> StrategyConfig:
    """The config class `values["name"]` picks, filled from `values` (`own_knobs`).
    Raises ValueError for an unknown name, TypeError for a key no strategy takes."""
    name = values.get(StrategyConfig.tag)
    config_class = StrategyConfig.variants().get(name) if isinstance(name, str) else None
    if config_class is None:
        raise ValueError(f"unknown strategy {name!r}; available: "
                         + ", ".join(sorted(StrategyConfig.variants())))
    return config_class(**own_knobs(config_class, values))


def flat_knobs(config: StrategyConfig) -> dict[str, Any]:
    """`config` as fedsilo wrote it before each strategy had its own config: every
    strategy's knobs, the others at their defaults. Recognises an aggregator state folder of
    that time (`aggregator.service`)."""
    flat: dict[str, Any] = {}
    for config_class in StrategyConfig.variants().values():
        flat |= {f.name: f.default for f in fields(config_class) if f.default is not MISSING}
    return flat | asdict(config)


def knob_names(config_class: type[StrategyConfig]) -> tuple[str, ...]:
    """The fields of `config_class` a user sets: all but the `name` tag."""
    return tuple(f.name for f in fields(config_class) if f.name != StrategyConfig.tag)
