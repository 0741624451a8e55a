"""Built-in data sets: the public files beside the project (never inside it, never downloaded).

Why presets: the paper's benchmarks need column mappings, label words and templates that a
user should not have to rediscover; a preset turns a name into a full `DatasetSpec`.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from dataclasses import fields
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
    """A preset by name, or a dataset description file (TOML) for the user's own data.

    A bare data file is refused: without a column mapping it cannot become prompts."""
    key = name_or_path.strip().lower()
    if key in PRESETS:
        return PRESETS[key](_resolve_dir(data_dir))
    known = ", ".join(sorted(PRESETS))
    path = Path(name_or_path)
    looks_like_path = path.suffix != "" or os.sep in name_or_path
    if not looks_like_path and not path.exists():
        raise DataError(
            f"unknown data set {name_or_path!r}; use a preset ({known}) or a dataset "
            "description file (.toml)"
        )
    if not path.is_file():
        raise DataError(f"dataset description {name_or_path} not found{_looked_at(path)}; "
                        f"check the path, or use a preset ({known})")
    if path.suffix.lower() == ".toml":
        return load_spec_file(path)
    raise DataError(
        f"{name_or_path!r} is a data file, and a file needs more than its path: describe it "
        "in a .toml file (path, kind, template, columns, label_column or response_column, "
        f"label_words) and pass that, or use a preset: {known}"
    )


def _looked_at(path: Path) -> str:
    """Where a missing file was looked for, naming the folder a relative path meant."""
    if path.expanduser().is_absolute():
        return ""
    return (f" (looked at {path.expanduser().resolve()}: a relative path is resolved "
            f"against the current directory {Path.cwd()})")


_SPEC_KEYS = {f.name for f in fields(DatasetSpec)}


def load_spec_file(path: Path) -> DatasetSpec:
    """A `DatasetSpec` from TOML; a relative `path` inside is relative to the TOML file."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DataError(f"cannot read dataset description {path}: {exc}") from None
    unknown = sorted(set(raw) - _SPEC_KEYS)
    if unknown:
        raise DataError(
            f"unknown key(s) {', '.join(unknown)} in {path}; "
            f"allowed: {', '.join(sorted(_SPEC_KEYS))}"
        )
    for required in ("path", "kind"):
        if required not in raw:
            raise DataError(f"{path} must set {required!r}")
    if raw["kind"] not in ("classification", "generation"):
        raise DataError(
            f"kind = {raw['kind']!r} in {path}; allowed: 'classification', 'generation'"
        )
    data_path = Path(raw["path"]).expanduser()
    if not data_path.is_absolute():
        data_path = path.parent / data_path
    if not data_path.is_file():
        folder = path.parent.resolve()
        relative = "" if Path(raw["path"]).expanduser().is_absolute() else (
            f"; a relative path is resolved against the description's own folder {folder}")
        raise DataError(
            f"data file {raw['path']!r} named by path in {path} not found (looked at "
            f"{data_path.resolve()}{relative}); fix path there or move the file"
        )
    raw["path"] = str(data_path)
    if "label_words" in raw:
        raw["label_words"] = {str(k): str(v) for k, v in raw["label_words"].items()}
    raw.setdefault("name", path.stem)
    return DatasetSpec(**raw)


def _resolve_dir(explicit: str | Path | None) -> Path:
    # `data_dir` the argument shadows `data_dir` the function inside resolve_dataset.
    return data_dir(explicit)
