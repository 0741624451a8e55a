"""Load a local data file into `Example`s.

Why `datasets`: one reader for JSON Lines, JSON, CSV/TSV and Parquet with Arrow-backed
memory use and an on-disk cache (the user's default Hugging Face cache, never the repo).
Only packaged local builders are used, so nothing is ever downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..progress_bars import quiet_progress_bars
from .examples import DataError, Example, TaskInfo
from .templates import PromptTemplate, get_template

_SUFFIX_FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
_FORMATS = ("json", "jsonl", "csv", "tsv", "parquet")
# Filled by the loader for classification templates unless a column is mapped to it.
_CHOICES_FIELD = "choices"


@dataclass(frozen=True)
class DatasetSpec:
    """Where a data set lives and how its columns become prompts and responses.

    ``columns`` maps template fields to column names; a field left out is read from the
    column of the same name. ``label_column`` holds the label (classification) or an optional
    group such as Dolly's ``category`` (generation). ``label_words`` maps raw label values,
    as strings, to answer words; it may be omitted when the labels already are words.
    """

    path: str
    kind: Literal["classification", "generation"]
    template: str = "alpaca"
    columns: Mapping[str, str] = field(default_factory=dict)
    response_column: str | None = None
    label_column: str | None = None
    label_words: Mapping[str, str] | None = None
    format: str | None = None
    name: str = ""


def infer_format(spec: DatasetSpec) -> str:
    """The reader to use: the explicit ``format`` or one inferred from the file suffix."""
    if spec.format is not None:
        fmt = spec.format.lower().lstrip(".")
        if fmt not in _FORMATS:
            raise DataError(
                f"unknown data format {spec.format!r} for {spec.path}; use one of "
                f"{', '.join(_FORMATS)}"
            )
        return "json" if fmt == "jsonl" else fmt
    suffix = Path(spec.path).suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise DataError(
            f"cannot tell the format of {spec.path} from its suffix {suffix!r}; rename it to "
            f"one of {', '.join(_SUFFIX_FORMATS)} or set format to one of {', '.join(_FORMATS)}"
        )
    return _SUFFIX_FORMATS[suffix]


def _read(spec: DatasetSpec, fmt: str, cache_dir: str | Path | None) -> Any:
    """Read the whole file as a `datasets.Dataset` (imported lazily: it is slow to import)."""
    import datasets

    path = Path(spec.path).expanduser()
    if not path.is_file():
        where = "" if path.is_absolute() else (
            f" (looked at {path.absolute()}: a relative path is resolved against the current "
            f"directory {Path.cwd()})")
        raise DataError(
            f"data file {path} does not exist{where}; check the path, or set "
            "FEDSILO_DATA_DIR to the folder holding the built-in presets' files"
        )
    builder, kwargs = ("csv", {"delimiter": "\t"}) if fmt == "tsv" else (fmt, {})
    try:
        with quiet_progress_bars():
            return datasets.load_dataset(
                builder,
                data_files=str(path),
                split="train",
                cache_dir=None if cache_dir is None else str(cache_dir),
                **kwargs,
            )
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; all mean "unreadable as fmt"
        raise DataError(
            f"could not read {path} as {fmt}: {type(exc).__name__}: {exc}; check the file "
            "or set format explicitly"
        ) from exc


def _column(available: list[str], column: str, setting: str, spec: DatasetSpec) -> None:
    """Fail naming the missing column, the columns there are, and the setting to change."""
    if column not in available:
        raise DataError(
            f"column {column!r} not found in {Path(spec.path).name}; available columns: "
            f"{', '.join(available)}. Set {setting} to one of them"
        )


def _field_columns(
    template: PromptTemplate, spec: DatasetSpec, available: list[str]
) -> dict[str, str]:
    """Template field -> column, checking every mapped and needed column exists."""
    unused = [f for f in spec.columns if f not in template.fields]
    if unused:
        raise DataError(
            f"columns maps field(s) {', '.join(map(repr, unused))} but template "
            f"{template.name!r} has fields {', '.join(template.fields)}; rename the keys"
        )
    needed = set(template.required_fields(with_context=False))
    mapping: dict[str, str] = {}
    for name in template.fields:
        if name == _CHOICES_FIELD and spec.kind == "classification" and name not in spec.columns:
            continue
        column = spec.columns.get(name, name)
        if name not in spec.columns and name not in needed and column not in available:
            continue  # optional field (e.g. alpaca's context) that this data set lacks
        _column(available, column, f"columns[{name!r}] (template field {name!r})", spec)
        mapping[name] = column
    return mapping


def _label_words(spec: DatasetSpec, raw_labels: list[str]) -> dict[str, str]:
    """Raw label -> answer word; every label present in the file must have one."""
    present = sorted(set(raw_labels))
    if spec.label_words is None:
        numeric = [v for v in present if _looks_numeric(v)]
        if numeric:
            raise DataError(
                f"labels of {Path(spec.path).name} are not words (e.g. {numeric[0]!r}); set "
                "label_words, e.g. label_words={'" + numeric[0] + "': 'positive', ...}"
            )
        return {v: v for v in present}
    words = {str(k): str(v) for k, v in spec.label_words.items()}
    missing = [v for v in present if v not in words]
    if missing:
        raise DataError(
            f"label value(s) {', '.join(map(repr, missing))} in column {spec.label_column!r} "
            f"of {Path(spec.path).name} have no label word (label_words covers "
            f"{', '.join(map(repr, words))}); add them to label_words or filter the file"
        )
    return words


def _looks_numeric(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _as_text(value: object) -> str:
    return "" if value is None else str(value)


def load_examples(
    spec: DatasetSpec,
    limit: int | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> tuple[list[Example], TaskInfo]:
    """Read ``spec`` and render every row into an `Example`.

    ``limit`` keeps a seeded random subset (shuffle, then take) so that runs stay small and
    still cover every label; candidates are computed over the whole file, not the subset.
    ``cache_dir`` overrides the Arrow cache folder (default: the Hugging Face cache).
    """
    if spec.kind not in ("classification", "generation"):
        raise DataError(
            f"dataset kind {spec.kind!r} is not supported; use 'classification' or 'generation'"
        )
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of examples, got {limit}")
    fmt = infer_format(spec)
    template = get_template(spec.template)
    ds = _read(spec, fmt, cache_dir)
    available = list(ds.column_names)
    name = spec.name or Path(spec.path).stem
    fields = _field_columns(template, spec, available)

    if spec.kind == "classification":
        if spec.label_column is None:
            raise DataError(
                f"classification data set {name!r} needs label_column; available columns: "
                f"{', '.join(available)}"
            )
        _column(available, spec.label_column, "label_column", spec)
        words = _label_words(spec, [_as_text(v) for v in ds.unique(spec.label_column)])
        candidates = tuple(dict.fromkeys(words.values()))
        task = TaskInfo("classification", candidates, name)
    else:
        if spec.response_column is None:
            raise DataError(
                f"generation data set {name!r} needs response_column; available columns: "
                f"{', '.join(available)}"
            )
        _column(available, spec.response_column, "response_column", spec)
        if spec.label_column is not None:
            _column(available, spec.label_column, "label_column (the group column)", spec)
        words = {}
        task = TaskInfo("generation", (), name)

    if limit is not None and limit < len(ds):
        order = np.random.default_rng(seed).permutation(len(ds))[:limit]
        ds = ds.select(order.tolist(), keep_in_memory=True)
    wanted = [*dict.fromkeys([*fields.values(), spec.label_column, spec.response_column])]
    rows = ds.select_columns([c for c in wanted if c is not None]).to_dict()
    n = len(ds)

    choices = ", ".join(task.candidates)
    examples: list[Example] = []
    for i in range(n):
        values: dict[str, object] = {f: rows[c][i] for f, c in fields.items()}
        if spec.kind == "classification":
            values.setdefault(_CHOICES_FIELD, choices)
            word = words[_as_text(rows[spec.label_column][i])]
            examples.append(Example(template.render(**values), word, word))
        else:
            group = None if spec.label_column is None else _as_text(rows[spec.label_column][i])
            response = _as_text(rows[spec.response_column][i])
            examples.append(Example(template.render(**values), response, group))
    return examples, task
