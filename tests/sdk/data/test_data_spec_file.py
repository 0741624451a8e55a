from pathlib import Path

import pytest

from fedsilo.sdk.data.examples import DataError
from fedsilo.sdk.data.loading import load_examples
from fedsilo.sdk.data.presets import resolve_dataset

ROWS = '{"q": "2+2?", "a": "4", "topic": "math"}\n{"q": "sky colour?", "a": "blue", "topic": "x"}\n'


def _spec(tmp_path: Path, body: str) -> Path:
    (tmp_path / "own.jsonl").write_text(ROWS)
    path = tmp_path / "own.toml"
    path.write_text(body)
    return path


def test_dataset_description_file_maps_a_users_columns(tmp_path: Path) -> None:
    path = _spec(tmp_path, 'path = "own.jsonl"\nkind = "generation"\ntemplate = "alpaca"\n'
                 'response_column = "a"\nlabel_column = "topic"\n[columns]\ninstruction = "q"\n')
    spec = resolve_dataset(str(path))
    assert spec.path == str(tmp_path / "own.jsonl") and spec.name == "own"
    examples, task = load_examples(spec, cache_dir=tmp_path / "cache")
    assert task.kind == "generation" and len(examples) == 2
    assert "2+2?" in examples[0].prompt and examples[0].response == "4"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('path = "own.jsonl"\nkind = "generation"\ncolumn = 1\n', "unknown key(s) column"),
        ('kind = "generation"\n', "must set 'path'"),
        ('path = "own.jsonl"\nkind = "regression"\n', "allowed: 'classification'"),
        ("path = [", "cannot read"),
    ],
)
def test_bad_description_files_are_explained(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_dataset(str(_spec(tmp_path, body)))


def test_missing_file_and_bare_data_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        resolve_dataset(str(tmp_path / "absent.jsonl"))
    (tmp_path / "x.jsonl").write_text(ROWS)
    with pytest.raises(DataError, match=r"describe it in a \.toml file"):
        resolve_dataset(str(tmp_path / "x.jsonl"))
