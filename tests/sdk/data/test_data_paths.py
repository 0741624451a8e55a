"""A missing data file's error names the folder a relative path was resolved against: the
dataset description's own folder for its `path`, the current directory for a bare
`--data` value (silo.toml's [data] source resolves against silo.toml's folder at load)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsilo.sdk.data.examples import DataError
from fedsilo.sdk.data.loading import DatasetSpec, load_examples
from fedsilo.sdk.data.presets import resolve_dataset


def test_a_descriptions_relative_path_is_reported_against_its_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "specs"
    folder.mkdir()
    (folder / "own.toml").write_text('path = "train.jsonl"\nkind = "generation"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(DataError) as info:
        resolve_dataset("../specs/own.toml")
    message = str(info.value)
    assert f"looked at {folder.resolve() / 'train.jsonl'}" in message
    assert f"resolved against the description's own folder {folder.resolve()}" in message
    assert str(elsewhere) not in message and "current directory" not in message


def test_an_absolute_path_in_a_description_gets_no_relative_hint(tmp_path: Path) -> None:
    spec = tmp_path / "own.toml"
    spec.write_text(f'path = "{tmp_path / "absent.jsonl"}"\nkind = "generation"\n')
    with pytest.raises(DataError, match="not found") as info:
        resolve_dataset(str(spec))
    assert "relative path" not in str(info.value)


def test_a_missing_description_names_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as info:
        resolve_dataset("data/own.toml")
    message = str(info.value)
    assert f"looked at {tmp_path.resolve() / 'data' / 'own.toml'}" in message
    assert f"current directory {tmp_path.resolve()}" in message


def test_a_direct_specs_relative_path_is_reported_against_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as info:
        load_examples(DatasetSpec(path="x.jsonl", kind="generation", response_column="a"))
    assert f"looked at {tmp_path.resolve() / 'x.jsonl'}" in str(info.value)
