"""The data types every other part of fedsilo consumes.

Why one tiny module: silo agents, strategies and evaluation all speak in `Example`s and
`SiloData`; keeping them free of loading/tokenising code keeps imports light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TaskKind = Literal["classification", "generation"]


class DataError(ValueError):
    """Bad data or data configuration; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Example:
    """One training/evaluation pair.

    The model sees ``prompt + response`` and is trained on the response only. Prompts carry
    their own separator (the templates end with a newline), so ``response`` is the bare
    answer: for classification exactly one of `TaskInfo.candidates`.
    """

    prompt: str
    response: str
    group: str | None = None  # partition key: class label or category (Dirichlet over this)


@dataclass(frozen=True)
class TaskInfo:
    """What kind of task a data set is, and its answer words for candidate scoring."""

    kind: TaskKind
    candidates: tuple[str, ...] = ()  # classification: every possible response, in order
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("classification", "generation"):
            raise DataError(
                f"task kind {self.kind!r} is not supported; use 'classification' or 'generation'"
            )
        if self.kind == "classification" and len(self.candidates) < 2:
            raise DataError(
                f"classification task {self.name!r} needs at least 2 candidate answers, "
                f"got {list(self.candidates)}; check the label words"
            )
        if len(set(self.candidates)) != len(self.candidates):
            raise DataError(
                f"candidate answers of task {self.name!r} repeat: {list(self.candidates)}; "
                "give each label a distinct word"
            )


@dataclass
class SiloData:
    """One silo's private data, split as the schedule prescribes.

    ``emb`` is the embedding set D_emb: held out of ``train`` (see `splits.split_silo`).
    """

    train: list[Example]
    emb: list[Example]
    val: list[Example]
    test: list[Example]
    task: TaskInfo

    def sizes(self) -> dict[str, int]:
        """Split sizes, for logs and upload sample counts."""
        return {
            "train": len(self.train),
            "emb": len(self.emb),
            "val": len(self.val),
            "test": len(self.test),
        }
