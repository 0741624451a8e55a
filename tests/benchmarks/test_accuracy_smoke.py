"""`benchmarks/accuracy.py --profile smoke` runs every method end to end and writes sane,
stamped results (to tmp_path: the committed results are never touched)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark: Callable[[str], ModuleType]) -> ModuleType:
    return load_benchmark("accuracy.py")




def test_accuracy_benchmark_smoke(
    bench: ModuleType, tmp_path: Path, snapshot_results: Callable[[], dict[str, bytes]]
) -> None:
    before = snapshot_results()
    assert bench.main(["--profile", "smoke", "--jobs", "1", "--out", str(tmp_path)]) == 0
    assert snapshot_results() == before, "the smoke run must not write benchmarks/results/"

    report = json.loads((tmp_path / "accuracy.json").read_text())
    assert report["benchmark"] == "accuracy" and "--profile smoke" in report["command"]
    assert report["git"]["commit"] and report["machine"]["cpu_count"]
    assert {r["method"] for r in report["runs"]} == set(bench.METHODS)
    for run in report["runs"]:
        assert 0.0 <= run["mtal"] <= 1.0 and len(run["per_silo"]) == 3
        assert run["curve"], run["method"]
        assert all(math.isfinite(p["mta"]) for p in run["curve"])
    best = [r for r in report["summary"] if r.get("best")]
    assert best and all(r["method"] not in bench.ABLATIONS for r in best)
    md = (tmp_path / "accuracy.md").read_text()
    assert md.startswith("# Accuracy benchmark (smoke profile)")
    assert "| FedAMoLE |" in md and "(ablation)" in md and "**" in md
    assert (tmp_path / "accuracy.png").stat().st_size > 1000


def test_rounds_are_aligned_by_training_behind_the_score(bench: ModuleType) -> None:
    runs = [
        {"task": "t", "alpha": 1.0, "method": "FedIT", "curve": [
            {"trained_rounds": 0, "mta": 0.2}, {"trained_rounds": 1, "mta": 0.4}]},
        {"task": "t", "alpha": 1.0, "method": "FedIT", "curve": [
            {"trained_rounds": 0, "mta": 0.4}, {"trained_rounds": 1, "mta": 0.6}]},
    ]
    assert bench.curves(runs) == {"t|1.0": {"FedIT": [[0, pytest.approx(0.3)],
                                                      [1, pytest.approx(0.5)]]}}
    summary = bench.summarize([
        {"task": "t", "alpha": 1.0, "method": "FedAMoLE", "mtal": 0.8},
        {"task": "t", "alpha": 1.0, "method": "FedAMoLE", "mtal": 0.6},
        {"task": "t", "alpha": 1.0, "method": "FedIT", "mtal": 0.5},
        {"task": "t", "alpha": 1.0, "method": "FedAMoLE-random", "mtal": 0.9},
    ])
    rows = {r["method"]: r for r in summary}
    assert rows["FedAMoLE"]["mtal_mean"] == pytest.approx(0.7)
    assert rows["FedAMoLE"]["mtal_std"] == pytest.approx(math.sqrt(0.02))
    assert rows["FedAMoLE"]["best"] and not rows["FedIT"]["best"]
    assert "best" not in rows["FedAMoLE-random"]  # ablations are not ranked
