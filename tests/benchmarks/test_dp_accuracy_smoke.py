"""`benchmarks/dp_accuracy.py --profile smoke` runs end to end and writes sane results (to
tmp_path: the committed results under benchmarks/results/ are never touched)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark: Callable[[str], ModuleType]) -> ModuleType:
    return load_benchmark("dp_accuracy.py")




def test_dp_accuracy_benchmark_smoke(
    bench: ModuleType, tmp_path: Path, snapshot_results: Callable[[], dict[str, bytes]]
) -> None:
    before = snapshot_results()
    # Two rounds (one more than the smoke profile) so round 1 has an RSEA assignment to
    # compare with the noiseless run's; still a few seconds in all.
    argv = ["--profile", "smoke", "--rounds", "2", "--seeds", "0", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    assert snapshot_results() == before, "the smoke run must not write benchmarks/results/"

    report = json.loads((tmp_path / "dp_accuracy.json").read_text())
    assert report["benchmark"] == "dp_accuracy"
    assert "--profile smoke" in report["command"]
    assert report["git"]["commit"] and report["seeds"] == [0]
    for key in ("cpu_model", "cpu_count", "ram_GB", "python", "torch", "opacus"):
        assert report["machine"][key], key

    rows = {str(row["epsilon"]): row for row in report["summary"]}
    assert list(rows) == ["inf", "8.0", "2.0", "0.5"]  # a row per default budget
    for row in rows.values():
        assert math.isfinite(row["mtal_mean"]) and 0.0 <= row["mtal_mean"] <= 1.0
        assert len(row["mtal_per_seed"]) == 1
    assert rows["inf"]["noise_multiplier"] == 0.0
    sigmas = [rows[e]["noise_multiplier"] for e in ("8.0", "2.0", "0.5")]
    assert 0 < sigmas[0] < sigmas[1] < sigmas[2], "a smaller budget needs more noise"
    for eps in ("8.0", "2.0", "0.5"):
        assert rows[eps]["noise_multiplier_source"].startswith("run")
        assert 0.0 <= rows[eps]["round1_assignments_differ_share"] <= 1.0
        assert 0.0 <= rows[eps]["round1_jaccard_distance"] <= 1.0
    for run in report["runs"]:
        if run["epsilon"] != "inf":
            assert run["noise_multiplier"] == pytest.approx(run["noise_multiplier_expected"])

    unrelated = report["unrelated_assignments"]
    assert 0.0 < unrelated["mean_jaccard_distance"] <= unrelated["differ_share"] <= 1.0
    md = (tmp_path / "dp_accuracy.md").read_text()
    assert md.startswith("# DP and accuracy benchmark")
    assert report["git"]["commit"] in md
    assert "| inf (off) |" in md and "| 0.5 |" in md


def test_assignment_difference_counts_changed_expert_sets(bench: ModuleType) -> None:
    reference = {1: {"silo-0": {"m": [0, 1], "n": [2, 3]}, "silo-1": {"m": [2, 3], "n": [0, 1]}}}
    ours = {1: {"silo-0": {"m": [1, 0], "n": [2, 4]}, "silo-1": {"m": [2, 3], "n": [0, 1]}}}
    diff = bench.assignment_difference(ours, reference)
    assert diff["entries"] == 4 and diff["differ"] == 1
    assert diff["differ_share"] == diff["round1_differ_share"] == 0.25
    assert diff["mean_jaccard_distance"] == pytest.approx((1 - 1 / 3) / 4)
    assert diff["round1_jaccard_distance"] == diff["mean_jaccard_distance"]
    empty = bench.assignment_difference({}, {})
    assert empty["differ_share"] is None and empty["round1_differ_share"] is None
