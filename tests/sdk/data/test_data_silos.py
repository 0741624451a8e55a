"""Per-silo data sets: one source partitioned, or several sources dealt to the silos
round robin (feature skew), each silo keeping its own task."""

from pathlib import Path

import numpy as np
import pytest

from fedsilo.sdk.data import DataError, SplitConfig, data_dir
from fedsilo.sdk.data.silos import build_silo_data, data_sources, silo_sources


def _real_dir() -> Path:
    try:
        return data_dir()
    except DataError as exc:
        pytest.skip(f"real data folder absent ({exc})")


def test_sources_are_parsed_and_dealt_round_robin() -> None:
    assert data_sources(None) == data_sources("") == ["synthetic"]
    assert data_sources(" agnews, sst2 ,snli") == ["agnews", "sst2", "snli"]
    assert silo_sources("agnews,sst2,snli", 6) == ["agnews", "sst2", "snli"] * 2
    assert silo_sources("agnews,sst2", 3) == ["agnews", "sst2", "agnews"]
    assert silo_sources(None, 2) == ["synthetic", "synthetic"]


@pytest.mark.parametrize(
    ("source", "silos", "message"),
    [
        ("agnews,,snli", 3, "empty entry"),
        ("agnews,sst2,AGNEWS", 3, "more than once"),
        ("agnews,sst2,snli", 2, "need at least 3 silos"),
    ],
)
def test_bad_source_lists_are_explained(source: str, silos: int, message: str) -> None:
    with pytest.raises(DataError, match=message):
        silo_sources(source, silos)


def test_single_source_is_unchanged_by_the_mixed_path() -> None:
    """The single-source federation draws exactly as before (same seed, same splits)."""
    a = build_silo_data(None, 3, 5, 60)
    b = build_silo_data("synthetic", 3, 5, 60)
    assert [[e.prompt for e in s.train] for s in a] == [[e.prompt for e in s.train] for s in b]


def test_mixed_federation_gives_each_silo_its_data_set_and_task() -> None:
    root = _real_dir()
    silos = build_silo_data("agnews,sst2,snli", 6, 0, 120, alpha=0.5, data_dir=str(root))
    names = [s.task.name for s in silos]
    assert names == ["agnews", "sst2", "snli"] * 2
    assert silos[0].task.candidates == silos[3].task.candidates
    assert set(silos[1].task.candidates) == {"negative", "positive"}
    assert set(silos[2].task.candidates) == {"Yes", "Maybe", "No"}
    # the two AG News silos partition one draw: no example in both
    first = {e.prompt for e in silos[0].train + silos[0].test}
    second = {e.prompt for e in silos[3].train + silos[3].test}
    assert first and second and not first & second
    # deterministic in the seed
    again = build_silo_data("agnews,sst2,snli", 6, 0, 120, alpha=0.5, data_dir=str(root))
    assert [[e.prompt for e in s.test] for s in again] == [[e.prompt for e in s.test]
                                                           for s in silos]


def test_split_floors_and_partition_minimum_reach_every_silo() -> None:
    root = _real_dir()
    split = SplitConfig(test_min=100, test_cap=100, val_min=50, val_cap=50)
    silos = build_silo_data("agnews", 4, 0, 500, alpha=0.1, data_dir=str(root),
                            split=split, min_size=260)
    for silo in silos:
        assert len(silo.test) == 100 and len(silo.val) == 50
        assert len(silo.train) + len(silo.emb) >= 110


def test_split_floors_are_checked() -> None:
    with pytest.raises(DataError, match="floor above its cap"):
        SplitConfig(test_min=300, test_cap=100)
    with pytest.raises(DataError, match="test_min"):
        SplitConfig(test_min=0)
    rng = np.random.default_rng(0)
    from fedsilo.sdk.data import Example, TaskInfo, split_silo

    task = TaskInfo("generation", (), "g")
    examples = [Example(f"p{i}\n", "r", "g") for i in range(400)]
    # generation's default test cap (50) yields to a higher floor
    assert len(split_silo(examples, task, rng, SplitConfig(test_min=80)).test) == 80
