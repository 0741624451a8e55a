"""Built-in data sets: the public files beside the project (never inside it, never downloaded).

Why presets: the paper's benchmarks need column mappings, label words and templates that a
user should not have to rediscover; a preset turns a name into a full `DatasetSpec`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .examples import DataError
from .loading import DatasetSpec

ENV_VAR = "FEDSILO_DATA_DIR"


def _default_dir() -> Path:
    # sdk/data/presets.py -> parents[2] is the repository root; data sits beside the repo.
    return Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def data_dir(explicit: str | Path | None = None) -> Path:
    """The data folder: ``explicit`` > ``$FEDSILO_DATA_DIR`` > ``<repo>/../shared/data``."""
    if explicit is not None:
        candidate, source = Path(explicit).expanduser(), "the explicit data_dir argument"
    elif os.environ.get(ENV_VAR):
        candidate, source = Path(os.environ[ENV_VAR]).expanduser(), f"${ENV_VAR}"
    else:
        candidate, source = _default_dir(), "the default <repo root>/../shared/data"
    if not candidate.is_dir():
        raise DataError(
            f"data folder {candidate.resolve()} (from {source}) does not exist; put the data "
            f"files there or set {ENV_VAR} to the folder that holds them "
            "(fedsilo never downloads data)"
        )
    return candidate.resolve()


def _agnews(root: Path) -> DatasetSpec:
    # agnews_classes.txt: World, Sports, Business, Sci/Tech (label k = line k); one word each
    # keeps candidate answers short and distinct in their first token.
    return DatasetSpec(
        path=str(root / "agnews_8k.csv"),
        kind="classification",
        template="classify",
        columns={"text": "content"},
        label_column="label",
        label_words={"1": "World", "2": "Sports", "3": "Business", "4": "Technology"},
        name="agnews",
    )


def _sst2(root: Path) -> DatasetSpec:
    return DatasetSpec(
        path=str(root / "sst2_train.tsv"),
        kind="classification",
        template="classify",
        columns={"text": "sentence"},
        label_column="label",
        label_words={"0": "negative", "1": "positive"},
        name="sst2",
    )


def _snli(root: Path) -> DatasetSpec:
    return DatasetSpec(
        path=str(root / "snli_dev.jsonl"),
        kind="classification",
        template="snli",
        columns={"premise": "premise", "hypothesis": "hypothesis"},
        label_column="label",
        label_words={"entailment": "Yes", "neutral": "Maybe", "contradiction": "No"},
        name="snli",
    )


def _dolly(root: Path) -> DatasetSpec:
    return DatasetSpec(
        path=str(root / "dolly_15k.jsonl"),
        kind="generation",
        template="alpaca",
        columns={"instruction": "instruction", "context": "context"},
        response_column="response",
        label_column="category",
        name="dolly",
    )


PRESETS: dict[str, Callable[[Path], DatasetSpec]] = {
    "agnews": _agnews,
    "sst2": _sst2,
    "snli": _snli,
    "dolly": _dolly,
}


def resolve_dataset(name_or_path: str, data_dir: str | Path | None = None) -> DatasetSpec:
    """A preset's spec by name; a bare file path is refused because it lacks a mapping."""
    key = name_or_path.strip().lower()
    if key in PRESETS:
        return PRESETS[key](_resolve_dir(data_dir))
    known = ", ".join(sorted(PRESETS))
    looks_like_path = Path(name_or_path).suffix != "" or os.sep in name_or_path
    if looks_like_path or Path(name_or_path).exists():
        raise DataError(
            f"{name_or_path!r} is a file, and a file needs more than its path: describe it in "
            "the config's data section (path, kind, template, columns, label_column or "
            f"response_column, label_words), or use a preset: {known}"
        )
    raise DataError(f"unknown data set {name_or_path!r}; presets: {known}, or a config with a path")


def _resolve_dir(explicit: str | Path | None) -> Path:
    # `data_dir` the argument shadows `data_dir` the function inside resolve_dataset.
    return data_dir(explicit)
