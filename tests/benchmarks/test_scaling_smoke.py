"""`benchmarks/scaling.py --profile smoke` runs end to end and writes sane results (to tmp_path:
the committed results under benchmarks/results/ are never touched); its small helpers."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark: Callable[[str], ModuleType]) -> ModuleType:
    return load_benchmark("scaling.py")


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_scaling_benchmark_smoke(
    bench: ModuleType, tmp_path: Path, snapshot_results: Callable[[], dict[str, bytes]]
) -> None:
    before = snapshot_results()
    assert bench.main(["--profile", "smoke", "--out", str(tmp_path)]) == 0
    assert snapshot_results() == before, "the smoke run must not write benchmarks/results/"

    report = json.loads((tmp_path / "scaling.json").read_text())
    assert report["benchmark"] == "scaling" and report["profile"] == "smoke"
    assert "--profile smoke" in report["command"]
    assert report["git"]["commit"] and report["date"]
    for key in ("cpu_model", "cpu_count", "ram_GB", "python", "torch", "transformers", "peft",
                "pyscipopt", "scipy"):
        assert report["machine"][key], key
    params = report["parameters"]
    assert params["parts"] == ["rsea", "aggregation", "layer"]
    assert params["flow_budget_s"] == params["lp_budget_s"] == params["scip_budget_s"] == 10.0
    assert params["agg_solver"] == "flow" and params["agg_compare_silos"] == [3]

    (rsea,) = report["rsea"]
    assert (rsea["silos"], rsea["experts"], rsea["modules"]) == (10, 30, 4)
    assert rsea["k_c"] == 2 and rsea["silos"] * rsea["k_e"] <= rsea["experts"] * rsea["k_c"]
    assert list(rsea["solvers"]) == ["flow", "lp", "scip"]
    for res in rsea["solvers"].values():
        assert res["modules_timed"] == 4 and not res["extrapolated"]
        assert _positive(res["round_s"]) and all(_positive(s) for s in res["module_s"])
        assert all(_positive(o) for o in res["objectives"])
        assert _positive(res["speedup_vs_scip"])
    assert rsea["solvers"]["scip"]["speedup_vs_scip"] == pytest.approx(1.0)
    # The three exact solvers reach the same optimum on every module, pairwise.
    flow, lp, scip = (rsea["solvers"][s]["objectives"] for s in ("flow", "lp", "scip"))
    for m in range(4):
        assert flow[m] == pytest.approx(lp[m], rel=1e-6) == pytest.approx(scip[m], rel=1e-6)
    assert set(rsea["objective_pairs"]) == {"flow-lp", "flow-scip", "lp-scip"}
    for pair in rsea["objective_pairs"].values():
        assert pair["modules_compared"] == 4 and pair["equal"]
        assert pair["max_rel_diff"] == pytest.approx(0.0, abs=1e-6)
    assert rsea["objectives_equal"]
    assert rsea["objective_max_rel_diff"] == pytest.approx(0.0, abs=1e-6)
    server = rsea["server_round"]  # a round as FedAMoLEServer runs it: small, in-process
    assert server["workers"] == 1 and server["rounds_timed"] >= 1
    assert _positive(server["round_s"]) and _positive(server["first_round_s"])

    runs = {(r["silos"], r["solver"]): r for r in report["aggregation"]}
    assert set(runs) == {(3, "flow"), (6, "flow"), (3, "lp"), (3, "scip")}
    for (silos, _), run in runs.items():
        assert run["num_uploads"] == silos
        for key in ("accumulate_s", "fedavg_s", "assignment_s", "end_round_s", "total_s",
                    "upload_MB_mean", "accumulator_MB", "peak_rss_MB"):
            assert _positive(run[key]), key
        assert run["total_s"] == pytest.approx(run["accumulate_s"] + run["end_round_s"])
        assert run["end_round_s"] >= run["fedavg_s"] + run["assignment_s"] - 1e-9
        peak = run["peak_above_baseline_MB"]
        assert peak is not None and math.isfinite(peak) and peak >= 0
        assert run["experts_per_silo_module_mean"] >= run["k_e"]
        assert run["rss_after_fold_MB"][-1][0] == silos
    # Every expert of every module was trained by some silo: the accumulators cover the
    # whole global adapter, whatever the number of silos.
    assert runs[(3, "flow")]["accumulator_MB"] == pytest.approx(runs[(6, "flow")]["accumulator_MB"])
    assert runs[(3, "flow")]["accumulator_MB"] == pytest.approx(
        2 * runs[(3, "flow")]["global_params_MB"]  # float64 sums of float32 params
    )
    # Same uploads whatever the solver: the solver changes end_round's RSEA only.
    for solver in ("flow", "scip"):
        assert runs[(3, solver)]["upload_MB_mean"] == runs[(3, "lp")]["upload_MB_mean"]

    layer = report["layer"]
    assert layer["model"] == "builtin:tiny" and layer["repeats"] == 2
    variants = {v["variant"]: v for v in layer["variants"]}
    assert list(variants) == ["peft_lora", "fedsilo_lora", "amole_6", "amole_12"]
    assert variants["peft_lora"]["step_ratio_to_peft"] == pytest.approx(1.0)
    for v in variants.values():
        assert len(v["step_s"]) == 2 and len(v["forward_s"]) == 2
        for key in ("step_s_median", "forward_s_median", "step_ratio_to_peft",
                    "forward_ratio_to_peft", "trainable_params"):
            assert _positive(v[key]), (v["variant"], key)
    # Plain LoRA, PEFT's and ours, train the same tensors; experts add to them.
    assert variants["fedsilo_lora"]["trainable_params"] == variants["peft_lora"]["trainable_params"]
    assert (variants["fedsilo_lora"]["trainable_params"] < variants["amole_6"]["trainable_params"]
            < variants["amole_12"]["trainable_params"])
    assert any("step <=" in t["target"] for t in report["targets"])

    md = (tmp_path / "scaling.md").read_text()
    assert md.startswith("# Scaling benchmark")
    assert report["git"]["commit"] in md and report["command"] in md
    for heading in ("## RSEA", "## Aggregation", "## AMoLE layer", "## Against the targets"):
        assert heading in md, heading
    for solver in ("flow", "lp", "scip"):
        assert f"| 10 | 30 | 4 | 2 | 8 | {solver} |" in md, solver
    assert "| 10 | 30 | 4 | 2 | 8 | flow, server (1 process(es)" in md
    for pair in ("flow-lp", "flow-scip", "lp-scip"):
        assert f"| 10 | 30 | 4 | {pair} | 4 |" in md, pair
    assert "| 6 | flow |" in md and "| 3 | flow |" in md
    assert "| 3 | flow |" in md and "| 3 | scip |" in md
    assert "| PEFT LoRA |" in md and "| AMoLE, 12 experts |" in md
    png = (tmp_path / "scaling.png").read_bytes()
    assert len(png) > 1000 and png.startswith(b"\x89PNG")


def test_smoke_profile_requires_out(bench: ModuleType) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--profile", "smoke"])


def test_feasible_k_c_and_b(bench: ModuleType) -> None:
    # The brief's RSEA sizes: k_e = 2 -> k_c = 2, 2, 8 (never below the default 2).
    assert [bench.feasible_k_c(c, e) for c, e in ((10, 30), (100, 120), (1000, 256))] == [2, 2, 8]
    # Aggregation with E = 30: k_c = 2, 7, 67, and b = 8 suffices for each.
    assert [bench.feasible_k_c(c, 30) for c in (10, 100, 1000)] == [2, 7, 67]
    assert [bench.feasible_b(c, 30, bench.feasible_k_c(c, 30)) for c in (10, 100, 1000)] == [
        8, 8, 8
    ]
    assert bench.feasible_b(3, 30, 10) == 100  # E*k_c = 300 slots over 3 silos
    for c, e in ((10, 30), (7, 5), (1000, 256), (3, 6)):
        k_c = bench.feasible_k_c(c, e)
        b = bench.feasible_b(c, e, k_c)
        assert c * 2 <= e * k_c <= c * b
        assert k_c == 2 or c * 2 > e * (k_c - 1)  # the smallest feasible one


def test_per_round_sums_or_extrapolates(bench: ModuleType) -> None:
    assert bench.per_round([0.1, 0.2, 0.3], 3) == (pytest.approx(0.6), False)
    assert bench.per_round([1.0, 3.0], 32) == (pytest.approx(64.0), True)
    with pytest.raises(ValueError):
        bench.per_round([], 4)


def test_run_until_budget_stops_after_the_budget(bench: ModuleType) -> None:
    calls: list[int] = []
    seconds, results = bench.run_until_budget(5, 0.0, lambda i: calls.append(i) or i * 10)
    assert calls == [0] and results == [0] and len(seconds) == 1  # at least one
    seconds, results = bench.run_until_budget(4, 1e9, lambda i: i)
    assert results == [0, 1, 2, 3] and len(seconds) == 4 and min(seconds) >= 0


def test_relative_difference_and_growth(bench: ModuleType) -> None:
    assert bench.relative_difference(0.0, 0.0) == 0.0
    assert bench.relative_difference(2.0, 1.0) == pytest.approx(0.5)
    assert bench.relative_difference(15.2, 15.2) == 0.0
    assert bench.growth([100.0, 110.0, 120.0]) == pytest.approx(1.2)
    assert bench.growth([5.0]) is None and bench.growth([0.0, 1.0]) is None


def test_argument_parsers(bench: ModuleType) -> None:
    assert bench.parse_parts("layer,rsea") == ["rsea", "layer"]  # canonical order
    assert bench.parse_sizes("10x30x32,100X120x4") == [(10, 30, 32), (100, 120, 4)]
    assert bench.parse_ints("10,100") == [10, 100]
    for parser, text in ((bench.parse_parts, "rsea,bogus"), (bench.parse_sizes, "10x30"),
                         (bench.parse_ints, "10,x"), (bench.parse_ints, "0")):
        with pytest.raises(argparse.ArgumentTypeError):
            parser(text)


def test_compare_objectives_pairwise(bench: ModuleType) -> None:
    solvers = {"flow": {"objectives": [1.0, 2.0, 3.0]}, "lp": {"objectives": [1.0, 2.0]},
               "scip": {"objectives": [1.0, 2.5]}}
    pairs = bench.compare_objectives(solvers)
    assert list(pairs) == ["flow-lp", "flow-scip", "lp-scip"]
    assert pairs["flow-lp"] == {"modules_compared": 2, "max_rel_diff": 0.0, "equal": True}
    assert pairs["flow-scip"]["max_rel_diff"] == pytest.approx(0.2)
    assert not pairs["flow-scip"]["equal"] and not pairs["lp-scip"]["equal"]


def test_a_partial_rerun_carries_the_other_parts_over(bench: ModuleType, tmp_path: Path) -> None:
    previous = tmp_path / "scaling.json"
    previous.write_text(json.dumps({
        "command": "python benchmarks/scaling.py", "git": {"commit": "abc1234"},
        "date": "2026-11-30T00:00:00+00:00", "rsea": [{"old": True}], "layer": {"variants": []},
    }))
    report: dict[str, Any] = {"rsea": [{"new": True}]}
    bench.carry_over(report, previous, ["rsea"])
    assert report["rsea"] == [{"new": True}]  # rerun: the new figures
    assert report["layer"] == {"variants": []}  # not rerun: kept, with who measured it
    assert report["carried_over"] == {"layer": {
        "command": "python benchmarks/scaling.py", "commit": "abc1234",
        "date": "2026-11-30T00:00:00+00:00"}}
    bench.carry_over(fresh := {}, tmp_path / "absent.json", ["rsea"])
    assert fresh == {}


def test_verdicts_read_the_targets(bench: ModuleType) -> None:
    agg = {"silos": 10, "experts": 30, "modules": 32, "solver": "lp", "total_s": 0.6,
           "end_round_s": 0.2, "accumulate_s": 0.4, "fedavg_s": 0.1, "assignment_s": 0.1,
           "peak_above_baseline_MB": 300.0}
    flow = {**agg, "solver": "flow", "end_round_s": 0.3, "total_s": 0.45}
    scip = {**agg, "solver": "scip", "end_round_s": 1.2, "total_s": 1.6}
    big = {**flow, "silos": 1000, "total_s": 9.0, "peak_above_baseline_MB": 330.0}
    # Memory is read on the default solver's (flow) rows only: an lp row must not count.
    big_lp = {**big, "solver": "lp", "peak_above_baseline_MB": 3000.0}
    layer = {"variants": [
        {"variant": "peft_lora", "label": "PEFT LoRA", "step_s_median": 1.0,
         "step_ratio_to_peft": 1.0},
        {"variant": "amole_6", "label": "AMoLE, 6 experts", "step_s_median": 1.4,
         "step_ratio_to_peft": 1.4},
        {"variant": "amole_12", "label": "AMoLE, 12 experts", "step_s_median": 1.6,
         "step_ratio_to_peft": 1.6},
    ]}
    verdicts = bench.verdicts(
        {"aggregation": [scip, agg, big, big_lp, flow], "layer": layer}
    )
    aggregation = [(v["target"], v["value_s"], v["met"]) for v in verdicts
                   if v["target"].startswith("aggregation incl. RSEA")]
    # Per solver (flow, lp, scip), (a) end_round alone then (b) accumulate + end_round.
    assert [(t.split("(")[1].split(")")[0], "(a) end_round alone" in t,
             "(b) accumulate of the 10 uploads + end_round" in t, value, met)
            for t, value, met in aggregation] == [
        ("flow", True, False, 0.3, True), ("flow", False, True, 0.45, True),
        ("lp", True, False, 0.2, True), ("lp", False, True, 0.6, False),
        ("scip", True, False, 1.2, False), ("scip", False, True, 1.6, False),
    ]
    others = {v["target"].split(":")[0].split(" (")[0]: v["met"] for v in verdicts
              if not v["target"].startswith("aggregation incl. RSEA")}
    assert others == {"aggregator memory flat in the number of silos": True,
                      "AMoLE, 6 experts": True, "AMoLE, 12 experts": False}
    (memory,) = [v for v in verdicts if v["target"].startswith("aggregator memory")]
    assert "flow rows" in memory["target"] and memory["value_ratio"] == pytest.approx(1.1)
