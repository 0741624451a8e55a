"""How one silo's data was made and how its prompts look, recorded beside its adapter.

Why: a personalised adapter is only usable with prompts formatted as in training (the
template, the answer words), and its score can only be checked on the test split the run
held out. Both are decided here from the same settings the run used, so `fedsilo export`
and `fedsilo evaluate` reproduce them exactly instead of guessing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .examples import DataError, SiloData, TaskInfo, TaskKind
from .presets import resolve_dataset
from .silos import SYNTHETIC, build_silo_data, silo_sources
from .splits import SplitConfig
from .templates import PromptTemplate, get_template

CHOICES_FIELD = "choices"  # filled with the answer words, as the loader does
_HELPER_FIELDS = (CHOICES_FIELD, "context")


@dataclass(frozen=True)
class SiloDataRecipe:
    """Everything `build_silo_data` needs to cut this silo's part again, bit for bit.

    `source` is the federation's data (None or "synthetic": the embedded set; a preset, a
    dataset description file, or several separated by commas); `partitions` how many silos
    shared it; `index` this silo's part.
    """

    source: str | None
    partitions: int
    index: int
    seed: int
    examples: int
    partition: str = "dirichlet"
    alpha: float = 1.0
    data_dir: str | None = None
    split: SplitConfig = field(default_factory=SplitConfig)
    min_size: int = 10

    def held(self) -> str:
        """The data set this silo holds (one entry of `source`)."""
        return silo_sources(self.source, self.partitions)[self.index]

    def build(self) -> SiloData:
        parts = build_silo_data(
            self.source, self.partitions, self.seed, self.examples, partition=self.partition,
            alpha=self.alpha, data_dir=self.data_dir, split=self.split, min_size=self.min_size,
        )
        return parts[self.index]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SiloDataRecipe:
        values = {k: v for k, v in data.items() if k in {f.name for f in fields(cls)}}
        values["split"] = SplitConfig(**values.get("split", {}))
        return cls(**values)


@dataclass(frozen=True)
class PromptFormat:
    """How a silo's prompts were written: the template's two variants (with and without a
    context), the task kind and, for classification, the answer words."""

    kind: TaskKind
    template: str
    with_context: str
    without_context: str
    task: str = ""
    candidates: tuple[str, ...] = ()
    label_words: dict[str, str] = field(default_factory=dict)
    """Raw label value -> answer word (classification)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", tuple(self.candidates))
        self._template()  # a bad format string fails here, not at the first prompt

    @classmethod
    def for_source(cls, source: str, data_dir: str | None, task: TaskInfo) -> PromptFormat:
        """The format of data set `source` (one silo's entry, see `SiloDataRecipe.held`)."""
        if source.strip().lower() == SYNTHETIC:
            # The synthetic prompts are "<family>: <text>\n": the text plus a newline.
            return cls(task.kind, SYNTHETIC, "{text}\n", "{text}\n", task.name or SYNTHETIC,
                       task.candidates, {c: c for c in task.candidates})
        spec = resolve_dataset(source, data_dir)
        template = get_template(spec.template)
        words = dict(spec.label_words or {c: c for c in task.candidates})
        return cls(task.kind, template.name, template.with_context, template.without_context,
                   task.name or spec.name, task.candidates,
                   words if task.kind == "classification" else {})

    def _template(self) -> PromptTemplate:
        return PromptTemplate(self.template, self.with_context, self.without_context)

    @property
    def fields(self) -> tuple[str, ...]:
        return self._template().fields

    @property
    def main_field(self) -> str:
        """The field a single piece of text fills (`text`, `instruction`, `premise`...)."""
        names = [f for f in self.fields if f not in _HELPER_FIELDS]
        if not names:
            raise DataError(f"template {self.template!r} has no field for the prompt text")
        return names[0]

    def render(self, text: str, extra: Mapping[str, str] | None = None) -> str:
        """`text` as the template's main field, other fields from `extra` (a `context`
        selects the with-context variant); `choices` defaults to the answer words."""
        values: dict[str, object] = {CHOICES_FIELD: ", ".join(self.candidates)}
        values.update(extra or {})
        values[self.main_field] = text
        return self._template().render(**values)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["candidates"] = list(self.candidates)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PromptFormat:
        values = {k: v for k, v in data.items() if k in {f.name for f in fields(cls)}}
        values["candidates"] = tuple(values.get("candidates", ()))
        values["label_words"] = {str(k): str(v) for k, v in
                                 (values.get("label_words") or {}).items()}
        return cls(**values)
