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
    bench: ModuleType, tmp_path: Path, snapshot_results: Callable[[], dict[str, bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = snapshot_results()
    assert bench.main(["--profile", "smoke", "--jobs", "1", "--out", str(tmp_path)]) == 0
    assert snapshot_results() == before, "the smoke run must not write benchmarks/results/"

    report = json.loads((tmp_path / "accuracy.json").read_text())
    assert report["benchmark"] == "accuracy" and "--profile smoke" in report["command"]
    assert report["git"]["commit"] and report["machine"]["cpu_count"]
    profile = bench.PROFILES["smoke"]
    assert {r["method"] for r in report["runs"]} == set(profile["methods"])
    for run in report["runs"]:
        assert 0.0 <= run["mtal"] <= 1.0 and len(run["per_silo"]) == 3
        assert 0.0 <= run["val_mtal"] <= 1.0 and len(run["per_silo_val"]) == 3
        assert run["curve"], run["method"]
        assert all(math.isfinite(p["mta"]) for p in run["curve"])
        assert run["steps_per_silo_round"] >= 1
    # tuning: every method got an lr from the grid, FedAMoLE one of its variants, on
    # validation scores of the tuning runs
    chosen = report["tuning"]["chosen"]
    assert set(chosen) == set(profile["methods"])
    assert all(pick["lr"] in profile["lr_grid"] for pick in chosen.values())
    assert chosen["FedAMoLE"]["runs_as"] in profile["variants"]["FedAMoLE"]
    fedamole = [r for r in report["runs"] if r["method"] == "FedAMoLE"]
    assert fedamole[0]["runs_as"] == chosen["FedAMoLE"]["runs_as"] and fedamole[0]["rsea"]
    assert report["compute"]["FDLoRA"]["steps"] == 2 * report["compute"]["FedIT"]["steps"]
    assert report["compute"]["FDLoRA-equal"]["steps"] == report["compute"]["FedIT"]["steps"]
    (majority,) = [r for r in report["summary"] if r["method"] == bench.MAJORITY]
    assert 0.0 < majority["mtal_mean"] <= 1.0 and "best" not in majority
    best = [r for r in report["summary"] if r.get("best")]
    assert best and all(r["method"] not in bench.ABLATIONS for r in best)
    md = (tmp_path / "accuracy.md").read_text()
    assert md.startswith("# Accuracy benchmark (smoke profile)")
    assert "| FedAMoLE |" in md and "(ablation)" in md and "**" in md
    assert "## Tuning (validation split only)" in md and "paired by seed" in md
    assert "majority-label (reference, no training)" in md
    assert (tmp_path / "accuracy.png").stat().st_size > 1000

    # resumable: a rerun finds every simulation in the cache and runs none
    def no_simulation(job: dict) -> dict:
        raise AssertionError("a cached simulation was run again")

    monkeypatch.setattr(bench, "run_one", no_simulation)
    assert bench.main(["--profile", "smoke", "--jobs", "1", "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "accuracy.json").read_text())
    assert again["summary"] == report["summary"]


def test_intervals_and_paired_differences(bench: ModuleType) -> None:
    mean, lo, hi = bench.t_interval([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6)
    assert (lo, hi) == (pytest.approx(0.6 - 4.302653 * 0.1 / math.sqrt(3), abs=1e-6),
                        pytest.approx(0.6 + 4.302653 * 0.1 / math.sqrt(3), abs=1e-6))
    assert math.isnan(bench.t_interval([0.5])[1])
    runs = [{"task": "t", "alpha": 0.1, "method": m, "seed": s, "mtal": v}
            for m, values in (("FedAMoLE", [0.80, 0.70, 0.90]), ("FedIT", [0.70, 0.61, 0.79]),
                              ("local-only", [0.90, 0.60, 0.80]))
            for s, v in enumerate(values)]
    rows = {p["method"]: p for p in bench.paired(runs)}
    assert rows["FedIT"]["diffs"] == pytest.approx([0.10, 0.09, 0.11])
    assert rows["FedIT"]["supported"] and rows["FedIT"]["ci_low"] > 0
    assert not rows["local-only"]["supported"]  # +0.0 on average, wide interval


def test_tuning_looks_at_validation_only(bench: ModuleType) -> None:
    profile = {"lr_grid": [1e-3, 2e-3], "variants": {"FedAMoLE": ["FedAMoLE-paper",
                                                                  "FedAMoLE-trainers"]}}
    tuned = [
        {"method": "FedAMoLE-paper", "lr": 1e-3, "val_mtal": 0.5, "mtal": 0.99},
        {"method": "FedAMoLE-paper", "lr": 2e-3, "val_mtal": 0.6, "mtal": 0.10},
        {"method": "FedAMoLE-trainers", "lr": 1e-3, "val_mtal": 0.6, "mtal": 0.10},
        {"method": "FedAMoLE-trainers", "lr": 2e-3, "val_mtal": 0.7, "mtal": 0.10},
        {"method": "FedIT", "lr": 1e-3, "val_mtal": 0.4, "mtal": 0.10},
        {"method": "FedIT", "lr": 2e-3, "val_mtal": 0.4, "mtal": 0.99},
    ]
    chosen = bench.choose(tuned, profile, ["FedAMoLE", "FedIT"])
    assert chosen["FedAMoLE"] == {"runs_as": "FedAMoLE-trainers", "lr": 2e-3, "val_mtal": 0.7}
    assert chosen["FedIT"]["lr"] == 1e-3  # a tie keeps the smaller lr; test never looked at


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


def test_majority_reference_is_the_label_prior(bench: ModuleType) -> None:
    profile = {**bench.PROFILES["smoke"], "scenarios": [{"task": "synthetic", "alpha": 1.0}]}
    (row,) = bench.majority_reference(profile, [0])
    from collections import Counter

    from fedsilo.simulation.engine import SimulationConfig, build_silo_data

    config = bench.scenario_config(profile, profile["scenarios"][0], "FedIT", 0, 1e-3, "cpu")
    silos = build_silo_data(SimulationConfig(**config))
    want = sum(max(Counter(e.response for e in s.test).values()) / len(s.test)
               for s in silos) / len(silos)
    assert row["mtal"] == pytest.approx(want) and row["method"] == bench.MAJORITY
