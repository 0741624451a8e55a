from pathlib import Path

import pytest

from fedsilo.sdk.data import PRESETS, DataError, data_dir, load_examples, resolve_dataset


def _real_dir() -> Path:
    try:
        return data_dir()
    except DataError as exc:
        pytest.skip(f"real data folder absent ({exc})")


def test_data_dir_precedence(tmp_path, monkeypatch):
    other = tmp_path / "env"
    other.mkdir()
    monkeypatch.setenv("FEDSILO_DATA_DIR", str(other))
    assert data_dir() == other.resolve()
    assert data_dir(tmp_path) == tmp_path.resolve()


def test_data_dir_missing_explains(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSILO_DATA_DIR", str(tmp_path / "absent"))
    with pytest.raises(DataError, match="FEDSILO_DATA_DIR"):
        data_dir()


def test_resolve_dataset_errors(tmp_path):
    with pytest.raises(DataError, match=r"preset \(agnews, dolly, snli, sst2\)"):
        resolve_dataset("imagenet", data_dir=tmp_path)
    with pytest.raises(DataError, match="not found"):
        resolve_dataset("my/own.csv", data_dir=tmp_path)


def test_presets_point_into_data_dir(tmp_path):
    for name in PRESETS:
        spec = resolve_dataset(name, data_dir=tmp_path)
        assert Path(spec.path).parent == tmp_path.resolve()
        assert spec.name == name


def test_agnews():
    examples, task = load_examples(resolve_dataset("agnews", _real_dir()), limit=50)
    assert len(examples) == 50
    assert task.candidates == ("World", "Sports", "Business", "Technology")
    assert {e.response for e in examples} <= set(task.candidates)
    assert all(e.prompt.endswith("Answer:\n") for e in examples)


def test_sst2():
    examples, task = load_examples(resolve_dataset("sst2", _real_dir()), limit=50)
    assert task.candidates == ("negative", "positive")
    assert {e.response for e in examples} == {"negative", "positive"}


def test_snli():
    examples, task = load_examples(resolve_dataset("snli", _real_dir()), limit=200)
    assert task.candidates == ("Yes", "Maybe", "No")
    assert {e.response for e in examples} == {"Yes", "Maybe", "No"}
    assert all(e.prompt.startswith("Suppose ") and e.prompt.endswith("Maybe?\n") for e in examples)


def test_dolly():
    examples, task = load_examples(resolve_dataset("dolly", _real_dir()), limit=100, seed=3)
    assert task.kind == "generation"
    assert len({e.group for e in examples}) >= 5  # 8 categories in all
    assert all(e.response and e.prompt.endswith("### Response:\n") for e in examples)
    assert any("### Input:" in e.prompt for e in examples)
    assert any("### Input:" not in e.prompt for e in examples)
