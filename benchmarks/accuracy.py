"""Accuracy against the baselines (the paper's Table I/II and ablation, at CPU scale).

Every method runs the same federation through `fedsilo simulate`'s engine
(`run_simulation`): same silos, data partitions, base model, schedule and seeds (paired:
one seed gives every method the same partition and initial adapters); only the strategy
differs. Reported per scenario (data set(s) x Dirichlet alpha): MTAL (mean over silos of
the final local test metric), mean and 95% t-interval over seeds, the paired difference
of FedAMoLE to every other method with its 95% interval, the MTA curve per round, the
training compute, and for FedAMoLE the RSEA diagnostics per round.

    python benchmarks/accuracy.py --profile decisive      # the decisive CPU profile
    python benchmarks/accuracy.py                         # quick: AG News, alpha 0.1 and 1.0
    python benchmarks/accuracy.py --profile full --device cuda
    python benchmarks/accuracy.py --profile smoke --out /tmp/acc     # CI, seconds

Fair tuning: with a learning-rate grid, every method runs each grid value on the tuning
scenario (validation split only is looked at) and keeps the best for every scenario;
methods with variants (FedAMoLE's RSEA relevance) choose their variant the same way.
Every finished simulation is cached under `<out>/<profile>-runs/`, keyed by its whole
configuration: a rerun skips what is done, so a long run cut short continues next time.

Rounds are aligned by the number of local training rounds behind a score: FedAMoLE,
FedLEASE, FedIT-FT and local-only are scored after training in round r (r + 1 rounds of
training); FedIT and FDLoRA on receipt of round r's plan (r rounds) and on the final plan.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stamp import RESULTS, command_line, git_info, machine, now, stamp_lines

NAME = "accuracy"
#: What a simulation runs (the results and the run cache are not code).
BENCHED_CODE = ("sdk", "cli", "aggregator", "silo_agent", "privacy", "benchmarks/accuracy.py")


@dataclass(frozen=True)
class Method:
    """A method: SimulationConfig overrides, and how its scores line up with training."""

    overrides: dict[str, Any]
    on_receipt: bool = False  # scored on receipt of a plan rather than after training
    steps_factor: float = 1.0  # local_steps x this (FDLoRA at equal compute: 0.5)
    trainings: int = 1  # trainings of local_steps per round (FDLoRA: shared and personal)
    ablation: bool = False


METHODS: dict[str, Method] = {
    "FedAMoLE": Method({"strategy": "fedamole"}),
    "FedLEASE": Method({"strategy": "fedlease"}),
    "FedIT": Method({"strategy": "fedit"}, on_receipt=True),
    "FedIT-FT": Method({"strategy": "fedit-ft"}),
    "FDLoRA": Method({"strategy": "fdlora"}, on_receipt=True, trainings=2),
    "FDLoRA-equal": Method({"strategy": "fdlora"}, on_receipt=True, steps_factor=0.5,
                           trainings=2),
    "local-only": Method({"strategy": "local"}),
    "FedAMoLE-random": Method({"strategy": "fedamole", "assignment": "random"},
                              ablation=True),
    "FedAMoLE-static": Method({"strategy": "fedamole", "assignment": "static"},
                              ablation=True),
    "FedAMoLE-paper": Method({"strategy": "fedamole", "relevance": "paper",
                              "temperature": 1.0, "stickiness": 0.0}, ablation=True),
    "FedAMoLE-standardised": Method({"strategy": "fedamole", "relevance": "standardised",
                                     "temperature": 1.0, "stickiness": 0.0}, ablation=True),
    "FedAMoLE-trainers": Method({"strategy": "fedamole", "relevance": "trainers",
                                 "temperature": 0.1, "stickiness": 0.0}, ablation=True),
    "FedAMoLE-anchor": Method({"strategy": "fedamole", "relevance": "anchor",
                               "temperature": 0.1, "stickiness": 0.0}, ablation=True),
    "FedAMoLE-sticky": Method({"strategy": "fedamole", "relevance": "standardised",
                               "temperature": 1.0, "stickiness": 1.0}, ablation=True),
    "FedAMoLE-more-emb": Method({"strategy": "fedamole", "relevance": "standardised",
                                 "temperature": 1.0, "stickiness": 0.0, "emb_cap": 64},
                                ablation=True),
    "FedAMoLE-longer": Method({"strategy": "fedamole", "relevance": "standardised",
                               "temperature": 1.0, "stickiness": 0.0}, steps_factor=2.0,
                              ablation=True),
    # Client embeddings with the token projection as received (the same on every silo).
    "FedAMoLE-received": Method({"strategy": "fedamole", "relevance": "anchor",
                                 "temperature": 0.1, "stickiness": 0.0,
                                 "client_embedding": "received"}, ablation=True),
    "FedAMoLE-standardised-received": Method(
        {"strategy": "fedamole", "relevance": "standardised", "temperature": 1.0,
         "stickiness": 0.0, "client_embedding": "received"}, ablation=True),
}
ABLATIONS = tuple(name for name, m in METHODS.items() if m.ablation)
#: The reference row: each silo predicts its most frequent test label (no training).
MAJORITY = "majority-label"
BASELINES = ("FedLEASE", "FedIT", "FedIT-FT", "FDLoRA", "FDLoRA-equal", "local-only")

_FAST = {"model": "smollm2", "dtype": "bfloat16", "batch_size": 1, "max_length": 64,
         "scoring": "first_token"}

#: The decisive profile's federation (its ablation shares it, and so its cached runs).
_DECISIVE = {**_FAST, "rounds": 3, "local_steps": 12, "examples_per_silo": 500,
             "partition_min_size": 260, "test_min": 100, "test_cap": 100, "val_min": 50,
             "val_cap": 50, "emb_cap": 16, "curve_eval_limit": 20, "report_val": True,
             "warmup_rounds": 1, "max_clusters": 4, "sync_every": 5, "fusion_batches": 1}

#: Profiles: the federation (SimulationConfig fields), the scenarios and seeds, the methods,
#: the learning-rate grid and where it is tuned, and the variants a method chooses among.
PROFILES: dict[str, dict[str, Any]] = {
    # CI: the embedded model and data, seconds; exercises tuning and variant choice.
    "smoke": {
        "scenarios": [{"task": "synthetic", "alpha": 1.0}],
        "seeds": [0],
        "methods": ["FedAMoLE", "FedLEASE", "FedIT", "FedIT-FT", "FDLoRA", "FDLoRA-equal",
                    "local-only", "FedAMoLE-random", "FedAMoLE-static", "FedAMoLE-paper"],
        "lr_grid": [3e-3, 6e-3],
        "variants": {"FedAMoLE": ["FedAMoLE-paper", "FedAMoLE-trainers"]},
        "config": {"silos": 3, "rounds": 2, "local_steps": 2, "num_experts": 4, "b": 3,
                   "examples_per_silo": 60, "eval_limit": 8, "warmup_rounds": 1,
                   "max_clusters": 2, "report_val": True},
    },
    # A 2-core CPU within about an hour: SmolLM2-135M, short sequences, batch 1, one
    # forward per test prompt (first-token scoring). One seed, one lr: indicative only.
    "quick": {
        "scenarios": [{"task": "agnews", "alpha": 0.1}, {"task": "agnews", "alpha": 1.0}],
        "seeds": [0],
        "methods": ["FedAMoLE", "FedLEASE", "FedIT", "FedIT-FT", "FDLoRA", "local-only",
                    "FedAMoLE-random", "FedAMoLE-static"],
        "config": {"model": "smollm2", "silos": 5, "rounds": 5, "local_steps": 20,
                   "batch_size": 1, "max_length": 64, "lr": 1e-3, "examples_per_silo": 400,
                   "eval_limit": 40, "scoring": "first_token", "num_experts": 10, "b": 6,
                   "warmup_rounds": 1, "max_clusters": 4, "sync_every": 5},
    },
    # The decisive CPU profile: three scenarios (one data set per silo group, AG News and
    # SNLI label-skewed), three paired seeds, lr tuned on validation, 100 test examples per
    # silo scored in full at the end; bf16 backbone (fp32 adapters), 2x faster on a CPU.
    "decisive": {
        # Dirichlet alpha = 0.1 makes most silos (nearly) single-label: predicting the
        # silo's majority label scores 70-100 %, so those scenarios measure the label prior
        # (see the majority-label row); alpha = 1.0 ones come first after the tuning one.
        "scenarios": [
            {"task": "agnews+sst2+snli", "alpha": 0.1,
             "config": {"silos": 6, "num_experts": 8, "b": 4}},
            {"task": "agnews+sst2+snli", "alpha": 1.0,
             "config": {"silos": 6, "num_experts": 8, "b": 4}},
            {"task": "snli", "alpha": 1.0, "config": {"silos": 4, "num_experts": 6, "b": 4}},
            {"task": "agnews", "alpha": 0.1, "config": {"silos": 4, "num_experts": 6, "b": 4}},
        ],
        "seeds": [0, 1, 2],
        "methods": ["FedAMoLE", "FedLEASE", "FedIT", "FedIT-FT", "FDLoRA", "FDLoRA-equal",
                    "local-only", "FedAMoLE-paper"],
        "lr_grid": [1e-3, 2e-3],
        "tune": {"scenario": 0, "seed": 0},
        "variants": {"FedAMoLE": ["FedAMoLE-paper", "FedAMoLE-standardised",
                                  "FedAMoLE-trainers", "FedAMoLE-anchor"]},
        "config": _DECISIVE,
    },
    # FedAMoLE's assignment options against each other on the decisive profile's tuning
    # scenario and federation, at the lr FedAMoLE got there (validation and test both
    # reported); it shares the decisive profile's cache, so runs both need are made once.
    "ablation": {
        "scenarios": [{"task": "agnews+sst2+snli", "alpha": 0.1,
                       "config": {"silos": 6, "num_experts": 8, "b": 4}}],
        "seeds": [0, 1, 2],
        "methods": ["FedAMoLE-paper", "FedAMoLE-standardised", "FedAMoLE-trainers",
                    "FedAMoLE-anchor", "FedAMoLE-received", "FedAMoLE-standardised-received",
                    "FedAMoLE-sticky", "FedAMoLE-more-emb", "FedAMoLE-random",
                    "FedAMoLE-static", "FedAMoLE-longer"],
        "config": {**_DECISIVE, "lr": 1e-3},
        "cache_of": "decisive",
    },
    # The paper's schedule, for a GPU (--device cuda): 10 silos, 30 rounds, 200 steps.
    "full": {
        "scenarios": [{"task": t, "alpha": a} for t in ("agnews", "snli", "dolly")
                      for a in (0.1, 1.0, 100.0)],
        "seeds": [0, 1, 2],
        "methods": ["FedAMoLE", "FedLEASE", "FedIT", "FedIT-FT", "FDLoRA", "local-only",
                    "FedAMoLE-random", "FedAMoLE-static"],
        "config": {"model": "smollm2", "silos": 10, "rounds": 30, "local_steps": 200,
                   "batch_size": 8, "max_length": 256, "lr": 5e-4,
                   "examples_per_silo": 1000, "num_experts": 30, "b": 8,
                   "warmup_rounds": 5, "max_clusters": 8, "sync_every": 5,
                   "max_new_tokens": 128},
    },
}


# -- one simulation ---------------------------------------------------------------------


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One simulation (in a worker process): scores, curve, compute, RSEA diagnostics."""
    import torch

    from fedsilo.simulation.engine import SimulationConfig, run_simulation

    torch.set_num_threads(job["threads"])
    config = SimulationConfig(**job["config"])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedsilo-accuracy-") as tmp:
        run_dir = Path(tmp) / "run"
        result = run_simulation(config, run_dir=run_dir)
        groups = [v["data"] for v in json.loads(
            (run_dir / "config.json").read_text())["silo_data"].values()]
        assignments = [json.loads(p.read_text())
                       for p in sorted((run_dir / "assignments").glob("round_*.json"))]
    seconds = time.perf_counter() - start
    curve, final, final_val, train_s = [], {}, {}, []
    for summary in result.rounds:
        if summary.mta is not None:
            curve.append({"round": summary.round, "mta": summary.mta})
        for silo, row in summary.silos.items():
            if row.metric is not None:
                final[silo] = row.metric
            if row.val_metric is not None:
                final_val[silo] = row.val_metric
            if row.train_s > 0:
                train_s.append(row.train_s)
    return {
        "mtal": result.mtal,
        "val_mtal": statistics.fmean(final_val.values()) if final_val else None,
        "per_silo": final, "per_silo_val": final_val, "curve": curve,
        "silo_data": groups,
        "train_s_per_silo_round": statistics.fmean(train_s) if train_s else 0.0,
        # Bounded influence must not touch honest runs: how often it clipped, how far the
        # largest update norm was from the round's median.
        "clipped": sum(int(r.aggregation.get("clipped", 0)) for r in result.rounds),
        "update_norm_max_ratio": max((r.aggregation.get("update_norm_max_ratio", 0.0)
                                      for r in result.rounds), default=0.0),
        "rsea": rsea_rounds(result.rounds, assignments, groups, config.k_c),
        "seconds": round(seconds, 1),
    }


def rsea_rounds(rounds: Sequence[Any], assignments: Sequence[dict[str, Any]],
                groups: Sequence[str], k_c: int) -> list[dict[str, float | None]]:
    """Per closed round: the strategy's RSEA diagnostics and the co-assignment purity of
    the architecture it chose (the next round's), with what chance gives."""
    from fedsilo.sdk.aggregation.rsea import chance_purity, co_assignment_purity

    out: list[dict[str, float | None]] = []
    mixed = len(set(groups)) > 1
    for summary in rounds:
        if summary.final or "assignment_s" not in summary.aggregation:
            continue
        row: dict[str, float | None] = {
            "round": summary.round,
            **{k.removeprefix("rsea_"): v for k, v in summary.aggregation.items()
               if k.startswith("rsea_")},
        }
        nxt = summary.round + 1
        chosen = assignments[nxt] if nxt < len(assignments) else {}
        if mixed and chosen and any(chosen.values()):
            row["purity"] = _purity(chosen, groups, co_assignment_purity)
            row["purity_chance"] = chance_purity(groups, k_c)
        out.append(row)
    return out


def _purity(assignment: dict[str, dict[str, list[int]]], groups: Sequence[str],
            purity: Any) -> float | None:
    import numpy as np

    silos = list(assignment)
    modules = list(assignment[silos[0]]) if silos else []
    values = []
    for module in modules:
        experts = 1 + max((j for s in silos for j in assignment[s][module]), default=-1)
        d = np.zeros((len(silos), experts), dtype=bool)
        for i, silo in enumerate(silos):
            d[i, assignment[silo][module]] = True
        values.append(purity(d, groups))
    return statistics.fmean(values) if values else None


# -- jobs, tuning and the cache ----------------------------------------------------------


@dataclass
class Job:
    method: str  # the reported name
    runs_as: str  # the METHODS entry whose overrides it uses (a variant for a chooser)
    task: str
    alpha: float
    seed: int
    lr: float
    stage: str  # "tune" or "main"
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The cache key: the whole simulation configuration, nothing else."""
        blob = json.dumps(self.config, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        return f"{self.task} α={self.alpha:g} seed {self.seed} {self.method} lr {self.lr:g}"


def scenario_config(profile: dict[str, Any], scenario: dict[str, Any], method: str,
                    seed: int, lr: float, device: str) -> dict[str, Any]:
    spec = METHODS[method]
    config = {**profile["config"], **scenario.get("config", {}), **spec.overrides,
              "seed": seed, "alpha": scenario["alpha"], "lr": lr, "device": device,
              "data": None if scenario["task"] == "synthetic"
              else scenario["task"].replace("+", ",")}
    steps = config.get("local_steps", 30)
    config["local_steps"] = max(1, round(steps * spec.steps_factor))
    return config


def grid(profile: dict[str, Any]) -> list[float]:
    return list(profile.get("lr_grid") or [profile["config"].get("lr", 3e-3)])


def tuning_jobs(profile: dict[str, Any], methods: Sequence[str], device: str) -> list[Job]:
    """Each method (each variant of a method that has variants) at every grid value, on
    the tuning scenario. Empty when the grid has one value and no method has variants."""
    lrs = grid(profile)
    variants = profile.get("variants", {})
    if len(lrs) == 1 and not any(m in variants for m in methods):
        return []
    tune = profile.get("tune", {"scenario": 0, "seed": profile["seeds"][0]})
    scenario = profile["scenarios"][tune["scenario"]]
    jobs = []
    for method in methods:
        for runs_as in variants.get(method, [method]):
            for lr in lrs:
                jobs.append(Job(runs_as, runs_as, scenario["task"], scenario["alpha"],
                                tune["seed"], lr, "tune",
                                scenario_config(profile, scenario, runs_as, tune["seed"], lr,
                                                device)))
    return jobs


def choose(tuned: Sequence[dict[str, Any]], profile: dict[str, Any],
           methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per method: the (variant, lr) with the best validation MTAL in the tuning runs
    (ties: the earlier variant, then the smaller lr). Test scores are never looked at."""
    lrs = grid(profile)
    variants = profile.get("variants", {})
    chosen: dict[str, dict[str, Any]] = {}
    for method in methods:
        options = variants.get(method, [method])
        best: tuple[float, str, float] | None = None
        for runs_as in options:
            for lr in lrs:
                match = [r for r in tuned if r["method"] == runs_as and r["lr"] == lr]
                if not match:
                    continue
                score = match[0]["val_mtal"]
                score = -math.inf if score is None or math.isnan(score) else score
                if best is None or score > best[0]:
                    best = (score, runs_as, lr)
        if best is None:
            chosen[method] = {"runs_as": options[0], "lr": lrs[0], "val_mtal": None}
        else:
            chosen[method] = {"runs_as": best[1], "lr": best[2],
                              "val_mtal": None if best[0] == -math.inf else best[0]}
    return chosen


def main_jobs(profile: dict[str, Any], methods: Sequence[str], chosen: dict[str, Any],
              seeds: Sequence[int], device: str) -> list[Job]:
    """Every scenario x seed x method at the chosen settings; ordered scenario by scenario,
    seed by seed, so a run cut short leaves whole paired comparisons behind."""
    jobs = []
    for scenario in profile["scenarios"]:
        for seed in seeds:
            for method in methods:
                pick = chosen[method]
                jobs.append(Job(method, pick["runs_as"], scenario["task"], scenario["alpha"],
                                seed, pick["lr"], "main",
                                scenario_config(profile, scenario, pick["runs_as"], seed,
                                                pick["lr"], device)))
    return jobs


def execute(jobs: Sequence[Job], cache: Path, workers: int, threads: int,
            partial: Path, commit: str, cached_only: bool = False) -> list[dict[str, Any]]:
    """Run what the cache does not hold yet (in `workers` processes); every record, cached
    or new, labelled with its job. `cached_only`: run nothing, report what is cached."""
    cache.mkdir(parents=True, exist_ok=True)
    todo: dict[str, Job] = {}
    for job in jobs:
        if not (cache / f"{job.key}.json").exists():
            todo.setdefault(job.key, job)
    if cached_only:
        if todo:
            print(f"{len(todo)} simulations not cached yet: left out of this report",
                  flush=True)
        jobs = [job for job in jobs if job.key not in todo]
        todo = {}
    if todo:
        print(f"{len(todo)} simulations to run ({len(jobs) - len(todo)} cached), "
              f"{workers} at a time, {threads} threads each", flush=True)
    payloads = [{"config": j.config, "threads": threads} for j in todo.values()]
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 and payloads else None
    results: Iterable[dict[str, Any]] = (
        pool.map(run_one, payloads) if pool is not None else map(run_one, payloads))
    try:
        for job, outcome in zip(todo.values(), results, strict=True):
            record = {"config": job.config, "git": commit, "date": now(),
                      **outcome}
            (cache / f"{job.key}.json").write_text(json.dumps(record, indent=1) + "\n")
            with partial.open("a") as f:
                f.write(json.dumps({"job": job.label, **outcome}) + "\n")
            print(f"{job.label}: MTAL {outcome['mtal']:.4f} val "
                  f"{_fmt(outcome['val_mtal'])} ({outcome['seconds']:.0f} s)", flush=True)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return [labelled(job, json.loads((cache / f"{job.key}.json").read_text()))
            for job in jobs]


def labelled(job: Job, record: dict[str, Any]) -> dict[str, Any]:
    spec = METHODS[job.runs_as]
    curve = [{"round": p["round"], "mta": p["mta"],
              "trained_rounds": p["round"] if spec.on_receipt else p["round"] + 1}
             for p in record["curve"]]
    steps = record["config"]["local_steps"] * spec.trainings
    return {
        "key": job.key, "method": job.method, "runs_as": job.runs_as, "task": job.task,
        "alpha": job.alpha,
        "seed": job.seed, "lr": job.lr, "stage": job.stage,
        "mtal": record["mtal"], "val_mtal": record.get("val_mtal"),
        "per_silo": record["per_silo"], "per_silo_val": record.get("per_silo_val", {}),
        "silo_data": record.get("silo_data", []), "curve": curve,
        "steps_per_silo_round": steps,
        "examples_per_silo_round": steps * record["config"].get("batch_size", 8),
        "train_s_per_silo_round": record.get("train_s_per_silo_round", 0.0),
        "rsea": record.get("rsea", []), "seconds": record["seconds"], "git": record["git"],
        "clipped": record.get("clipped"),  # None: run before clipping was recorded
        "update_norm_max_ratio": record.get("update_norm_max_ratio"),
    }


# -- statistics ---------------------------------------------------------------------------


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two-sided t-interval of the mean (nan bounds with fewer than 2)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    from scipy.stats import t

    half = t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(
        len(values))
    return mean, mean - half, mean + half


def majority_reference(profile: dict[str, Any], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Per scenario and seed: the MTAL of predicting each silo's most frequent test label
    (classification only): how much of a score the label skew alone gives. Data only, no
    model: cheap."""
    from fedsilo.simulation.engine import SimulationConfig, build_silo_data

    out = []
    for scenario in profile["scenarios"]:
        for seed in seeds:
            config = scenario_config(profile, scenario, "local-only", seed, 1e-3, "cpu")
            silos = build_silo_data(SimulationConfig(**config))
            if any(s.task.kind != "classification" for s in silos):
                continue
            shares = [max(Counter(e.response for e in s.test).values()) / len(s.test)
                      for s in silos]
            out.append({"method": MAJORITY, "task": scenario["task"],
                        "alpha": scenario["alpha"], "seed": seed,
                        "mtal": statistics.fmean(shares)})
    return out


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, alpha, method): MTAL mean, sample std and 95% interval over seeds; the
    best non-ablation mean per scenario is marked."""
    rows: list[dict[str, Any]] = []
    for task, alpha in sorted({(r["task"], r["alpha"]) for r in runs}):
        scenario = [r for r in runs if (r["task"], r["alpha"]) == (task, alpha)]
        for method in (*METHODS, MAJORITY):
            by_seed = {r.get("seed", i): r["mtal"] for i, r in enumerate(scenario)
                       if r["method"] == method}
            if not by_seed:
                continue
            values = list(by_seed.values())
            mean, lo, hi = t_interval(values)
            rows.append({
                "task": task, "alpha": alpha, "method": method, "mtal_mean": mean,
                "mtal_std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "ci_low": lo, "ci_high": hi, "mtal_per_seed": values, "seeds": len(values),
            })
        main = [r for r in rows if (r["task"], r["alpha"]) == (task, alpha)
                and r["method"] not in (*ABLATIONS, MAJORITY)]
        best = max((r["mtal_mean"] for r in main), default=math.nan)
        for row in main:
            row["best"] = row["mtal_mean"] == best
    return rows


def paired(runs: Sequence[dict[str, Any]], reference: str = "FedAMoLE",
           metric: str = "mtal") -> list[dict[str, Any]]:
    """Per scenario and other method: reference minus method in `metric` ("mtal" on the
    test split, "val_mtal" on validation), paired by seed, with its 95% t-interval;
    `supported` when the interval excludes 0."""
    out = []
    for task, alpha in sorted({(r["task"], r["alpha"]) for r in runs}):
        scenario = [r for r in runs if (r["task"], r["alpha"]) == (task, alpha)
                    and r.get(metric) is not None]
        ref = {r["seed"]: r[metric] for r in scenario if r["method"] == reference}
        for method in METHODS:
            if method == reference:
                continue
            other = {r["seed"]: r[metric] for r in scenario if r["method"] == method}
            seeds = sorted(set(ref) & set(other))
            if not seeds:
                continue
            diffs = [ref[s] - other[s] for s in seeds]
            mean, lo, hi = t_interval(diffs)
            out.append({"task": task, "alpha": alpha, "method": method, "diff_mean": mean,
                        "ci_low": lo, "ci_high": hi, "diffs": diffs, "seeds": seeds,
                        "supported": bool(lo > 0 or hi < 0)})
    return out


def curves(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[list[float]]]]:
    """Per scenario and method: [trained_rounds, MTA mean over seeds]."""
    out: dict[str, dict[str, list[list[float]]]] = {}
    for run in runs:
        key = f"{run['task']}|{run['alpha']}"
        points = out.setdefault(key, {}).setdefault(run["method"], [])
        points.extend([p["trained_rounds"], p["mta"]] for p in run["curve"])
    for methods in out.values():
        for method, points in methods.items():
            grouped: dict[int, list[float]] = {}
            for x, y in points:
                grouped.setdefault(int(x), []).append(y)
            methods[method] = [[x, statistics.fmean(ys)] for x, ys in sorted(grouped.items())]
    return out


def rsea_summary(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Per scenario and FedAMoLE-like method: each diagnostic per round, mean over seeds."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for run in runs:
        if not run["rsea"]:
            continue
        key = f"{run['task']}|{run['alpha']}"
        per_round = out.setdefault(key, {}).setdefault(run["method"], [])
        per_round.extend(run["rsea"])
    for methods in out.values():
        for method, rows in methods.items():
            rounds = sorted({int(r["round"]) for r in rows})
            merged = []
            for rnd in rounds:
                at = [r for r in rows if int(r["round"]) == rnd]
                entry: dict[str, Any] = {"round": rnd}
                for name in ("spread", "entropy", "kept", "purity", "purity_chance"):
                    values = [r[name] for r in at if r.get(name) is not None
                              and not math.isnan(r[name])]
                    if values:
                        entry[name] = statistics.fmean(values)
                merged.append(entry)
            methods[method] = merged
    return out


def compute_table(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per method: optimiser steps and examples per silo per round, and measured seconds."""
    out: dict[str, dict[str, float]] = {}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method and r["stage"] == "main"]
        if mine:
            out[method] = {
                "steps": statistics.fmean(r["steps_per_silo_round"] for r in mine),
                "examples": statistics.fmean(r["examples_per_silo_round"] for r in mine),
                "train_s": statistics.fmean(r["train_s_per_silo_round"] for r in mine),
            }
    return out


# -- writing ------------------------------------------------------------------------------


def _fmt(value: float | None, scale: float = 1.0, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value * scale:.{digits}f}"


def _scenario_name(task: str, alpha: float) -> str:
    return f"{task} α={alpha:g}"


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    text = f"{row['mtal_mean'] * 100:.2f}"
    if row["seeds"] > 1:
        text += f" [{row['ci_low'] * 100:.1f}, {row['ci_high'] * 100:.1f}]"
    return f"**{text}**" if row.get("best") else text


def _paired_table(pairs: Sequence[dict[str, Any]],
                  scenarios: Sequence[tuple[str, float]]) -> list[str]:
    head = " | ".join(_scenario_name(t, a) for t, a in scenarios)
    lines = [f"| method | {head} |", "|---|" + "---:|" * len(scenarios)]
    for method in METHODS:
        cells = []
        for task, alpha in scenarios:
            match = [p for p in pairs if (p["task"], p["alpha"], p["method"])
                     == (task, alpha, method)]
            if not match:
                cells.append("-")
                continue
            p = match[0]
            text = f"{p['diff_mean'] * 100:+.2f}"
            if len(p["seeds"]) > 1:
                text += f" [{p['ci_low'] * 100:+.1f}, {p['ci_high'] * 100:+.1f}]"
            cells.append(f"**{text}**" if p["supported"] else text)
        if any(c != "-" for c in cells):
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    rows = report["summary"]
    scenarios = sorted({(r["task"], r["alpha"]) for r in rows})
    head = " | ".join(_scenario_name(t, a) for t, a in scenarios)
    lines = [f"# Accuracy benchmark ({report['profile']} profile)", "", *stamp_lines(report),
             f"- seeds: {', '.join(map(str, report['seeds']))}",
             f"- federation: {json.dumps(report['config'])}",
             f"- scenarios: {json.dumps(report['scenarios'])}", ""]
    if not report.get("complete", True):
        lines += [f"**Partial report** (`--cached-only`): {len(report['runs'])} of "
                  f"{report['expected_runs']} simulations of the profile have run; the "
                  "same command without `--cached-only` runs the rest (finished ones are "
                  "cached).", ""]
    if report.get("tuning"):
        lines += ["## Tuning (validation split only)", "",
                  f"Grid: lr in {report['lr_grid']}, on {report['tuning']['scenario']} "
                  f"seed {report['tuning']['seed']}; each method keeps its best validation "
                  "MTAL (methods with variants also choose the variant).", "",
                  "| method | candidate | " + " | ".join(f"lr {lr:g}" for lr in report["lr_grid"])
                  + " | chosen |", "|---|---|" + "---:|" * len(report["lr_grid"]) + "---|"]
        tuned = report["tuning"]["runs"]
        for method, pick in report["tuning"]["chosen"].items():
            candidates = report["variants"].get(method, [method])
            for runs_as in candidates:
                cells = []
                for lr in report["lr_grid"]:
                    match = [r for r in tuned if r["method"] == runs_as and r["lr"] == lr]
                    cells.append(_fmt(match[0]["val_mtal"], 100, 2) if match else "-")
                mark = (f"lr {pick['lr']:g}" if runs_as == pick["runs_as"] else "")
                lines.append(f"| {method} | {runs_as} | " + " | ".join(cells) + f" | {mark} |")
        lines.append("")
    lines += ["## MTAL", "",
              "Mean over silos of the final local test accuracy, in %: mean over seeds "
              "[95% t-interval]; best of the methods in bold (ablations excluded).", "",
              f"| method | {head} |", "|---|" + "---:|" * len(scenarios)]
    for method in (*METHODS, MAJORITY):
        cells = []
        for task, alpha in scenarios:
            match = [r for r in rows if (r["task"], r["alpha"], r["method"])
                     == (task, alpha, method)]
            cells.append(_cell(match[0] if match else None))
        if any(c != "-" for c in cells):
            label = (f"{method} (ablation)" if method in ABLATIONS
                     else f"*{method} (reference, no training)*" if method == MAJORITY
                     else method)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if report.get("paired"):
        lines += ["", "## FedAMoLE minus each method, paired by seed", "",
                  "Points of MTAL: mean [95% t-interval]; bold where the interval excludes 0.",
                  "", *_paired_table(report["paired"], scenarios)]
    if report.get("paired_val"):
        lines += ["", "## The same on the validation split", "",
                  "FedAMoLE minus each method in validation MTAL (points), paired by seed: "
                  "what a choice of defaults may look at (the test split never).", "",
                  *_paired_table(report["paired_val"], scenarios)]
    if report.get("compute"):
        lines += ["", "## Training compute per silo per round", "",
                  "| method | optimiser steps | examples | measured train s |",
                  "|---|---:|---:|---:|"]
        for method, c in report["compute"].items():
            lines.append(f"| {method} | {c['steps']:.0f} | {c['examples']:.0f} | "
                         f"{c['train_s']:.1f} |")
    recorded = [r for r in report["runs"] if r.get("clipped") is not None]
    if recorded:
        clipped = sum(r["clipped"] for r in recorded)
        ratio = max(r["update_norm_max_ratio"] or 0.0 for r in recorded)
        lines += ["", f"Bounded influence (update clipping at `security.update_clip_factor` "
                  f"x the round's median norm): {clipped} uploads clipped in the "
                  f"{len(recorded)} runs that record it; the largest update norm was "
                  f"{ratio:.2f} x its round's median."]
    if report.get("rsea"):
        lines += ["", "## Does RSEA follow the data?", "",
                  "Per closed round, mean over seeds and modules: spread = mean over experts "
                  "of max - min selection probability over silos (0: uniform); entropy = "
                  "normalised entropy of each expert's choice (1: uniform); kept = share of "
                  "its experts a silo keeps into the next round; purity = share of experts "
                  "whose silos hold one data set (mixed scenarios), chance = the same for "
                  "uniformly random silo sets.", ""]
        for key, methods in report["rsea"].items():
            task, alpha = key.split("|")
            lines += [f"**{_scenario_name(task, float(alpha))}**", "",
                      "| method | round | spread | entropy | kept | purity | chance |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for method, per_round in methods.items():
                for e in per_round:
                    lines.append(
                        f"| {method} | {e['round']} | {_fmt(e.get('spread'))} | "
                        f"{_fmt(e.get('entropy'))} | {_fmt(e.get('kept'), digits=3)} | "
                        f"{_fmt(e.get('purity'), digits=3)} | "
                        f"{_fmt(e.get('purity_chance'), digits=3)} |")
            lines.append("")
    lines += ["", "## MTA per round", "",
              "Mean over silos and seeds, %; column = local training rounds behind the score.",
              ""]
    for task, alpha in scenarios:
        series = report["curves"].get(f"{task}|{alpha}", {})
        width = 1 + max((int(p[0]) for c in series.values() for p in c), default=-1)
        lines += [f"**{_scenario_name(task, alpha)}**", "",
                  "| method | " + " | ".join(str(i) for i in range(width)) + " |",
                  "|---|" + "---:|" * width]
        for method, curve in series.items():
            by_round = {int(p[0]): p[1] for p in curve}
            cells = [f"{by_round[i] * 100:.1f}" if i in by_round else "-" for i in range(width)]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    seconds = sum(r["seconds"] for r in report["all_runs"])
    lines.append(f"{len(report['all_runs'])} simulations, {seconds / 60:.1f} min of run time "
                 f"in all ({report['wall_s'] / 60:.1f} min wall this invocation, "
                 f"{report['jobs']} parallel jobs; cached runs count their own time).")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(report["curves"])
    if not keys:
        return
    with_rsea = [k for k in keys if k in report.get("rsea", {})]
    rows = 2 if with_rsea else 1
    fig, axes = plt.subplots(rows, len(keys), figsize=(5.5 * len(keys), 4 * rows),
                             squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        task, alpha = key.split("|")
        for method, points in report["curves"][key].items():
            style = ":" if method in ABLATIONS else "-"
            ax.plot([p[0] for p in points], [p[1] * 100 for p in points], style, marker="o",
                    markersize=3, label=method)
        ax.set_title(f"{task}, α = {float(alpha):g}")
        ax.set_xlabel("local training rounds")
        ax.set_ylabel("MTA (%)")
        ax.grid(alpha=0.3)
    fullest = max(range(len(keys)), key=lambda i: len(report["curves"][keys[i]]))
    axes[0][fullest].legend(fontsize=7, loc="lower right")
    if with_rsea:
        for ax, key in zip(axes[1], keys, strict=True):
            for method, per_round in report.get("rsea", {}).get(key, {}).items():
                xs = [e["round"] for e in per_round]
                for name, style in (("kept", "-"), ("purity", "--"), ("spread", ":")):
                    ys = [e.get(name) for e in per_round]
                    if any(y is not None for y in ys):
                        ax.plot(xs, [math.nan if y is None else y for y in ys], style,
                                marker="o", markersize=3, label=f"{method} {name}")
                chance = [e.get("purity_chance") for e in per_round if e.get("purity_chance")]
                if chance:
                    ax.axhline(chance[0], color="grey", lw=0.8, label="purity by chance")
            ax.set_xlabel("closed round")
            ax.set_ylabel("RSEA diagnostic")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, loc="best")
    fig.suptitle(f"fedsilo accuracy, {report['profile']} profile, commit "
                 f"{report['git']['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line -------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--methods", help="comma-separated, from: " + ", ".join(METHODS))
    p.add_argument("--tasks", help="comma-separated scenarios' data: agnews, snli, dolly, "
                   "sst2, synthetic, or data sets joined by '+' (one per silo group, e.g. "
                   "agnews+sst2+snli)")
    p.add_argument("--alphas", help="comma-separated Dirichlet alphas")
    p.add_argument("--seeds", help="comma-separated seeds")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--jobs", type=int, default=None,
                   help="simulations in parallel (default: CPUs // 2 on cpu, 1 on cuda)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a federation setting, e.g. --set local_steps=10")
    p.add_argument("--out", type=Path, help="write the results here (default "
                   "benchmarks/results; the smoke profile requires --out)")
    p.add_argument("--cached-only", action="store_true",
                   help="run no simulation: report what the cache holds (a partial run)")
    return p.parse_args(list(argv))


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def select_profile(args: argparse.Namespace) -> dict[str, Any]:
    """The profile with the command line's overrides applied."""
    base = PROFILES[args.profile]
    profile = {**base, "config": dict(base["config"])}
    for item in args.set:
        key, _, value = item.partition("=")
        profile["config"][key] = _value(value)
    scenarios = list(base["scenarios"])
    if args.tasks or args.alphas:
        tasks = args.tasks.split(",") if args.tasks else sorted({s["task"] for s in scenarios})
        alphas = ([float(a) for a in args.alphas.split(",")] if args.alphas
                  else sorted({s["alpha"] for s in scenarios}))
        known = {(s["task"], s["alpha"]): s for s in scenarios}
        scenarios = [known.get((t, a), {"task": t, "alpha": a}) for t in tasks for a in alphas]
    profile["scenarios"] = scenarios
    if args.seeds:
        profile["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.methods:
        profile["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(profile["methods"]) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; use some of {list(METHODS)}")
    tune = profile.get("tune", {"scenario": 0, "seed": profile["seeds"][0]})
    profile["tune"] = {"scenario": min(tune["scenario"], len(scenarios) - 1),
                       "seed": tune["seed"]}
    return profile


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.profile == "smoke" and args.out is None:
        raise SystemExit("the smoke profile writes only where --out says")
    profile = select_profile(args)
    methods = profile["methods"]
    cpus = os.cpu_count() or 1
    jobs = args.jobs or (1 if args.device != "cpu" else max(1, cpus // 2))
    threads = max(1, cpus // jobs) if args.device == "cpu" else 1
    out = args.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    name = NAME if args.profile in ("quick", "smoke") else f"{NAME}_{args.profile}"
    cache = out / f"{NAME}_{profile['cache_of']}-runs" if "cache_of" in profile else (
        out / f"{name}-runs")
    partial = out / f".{name}.partial.jsonl"

    started = time.perf_counter()
    git = git_info(BENCHED_CODE)  # the code measured: before the runs, not after
    tuning_list = tuning_jobs(profile, methods, args.device)
    tuned = execute(tuning_list, cache, jobs, threads, partial, git["commit"],
                    args.cached_only)
    if tuning_list:
        chosen = choose(tuned, profile, methods)
    else:
        lr = grid(profile)[0]
        chosen = {m: {"runs_as": m, "lr": lr, "val_mtal": None} for m in methods}
    for method, pick in chosen.items():
        if tuning_list:
            print(f"tuned {method}: {pick['runs_as']} at lr {pick['lr']:g} "
                  f"(validation MTAL {_fmt(pick['val_mtal'])})", flush=True)
    runs = execute(main_jobs(profile, methods, chosen, profile["seeds"], args.device),
                   cache, jobs, threads, partial, git["commit"], args.cached_only)
    scenario_names = [f"{s['task']} α={s['alpha']:g}" for s in profile["scenarios"]]
    report: dict[str, Any] = {
        "benchmark": NAME, "profile": args.profile, "command": command_line("accuracy.py", argv),
        "git": git, "date": now(),
        "machine": machine(("torch", "transformers", "peft", "nevergrad")),
        "device": args.device, "jobs": jobs, "threads_per_job": threads,
        "config": profile["config"], "scenarios": profile["scenarios"],
        "tasks": sorted({s["task"] for s in profile["scenarios"]}),
        "alphas": sorted({s["alpha"] for s in profile["scenarios"]}),
        "seeds": profile["seeds"], "methods": methods, "lr_grid": grid(profile),
        "variants": profile.get("variants", {}),
        "wall_s": round(time.perf_counter() - started, 1),
        "expected_runs": len(profile["scenarios"]) * len(profile["seeds"]) * len(methods),
        "runs": runs,
    }
    report["complete"] = len(runs) == report["expected_runs"]
    if tuning_list:
        report["tuning"] = {"scenario": scenario_names[profile["tune"]["scenario"]],
                            "seed": profile["tune"]["seed"], "chosen": chosen, "runs": tuned}
    report["all_runs"] = [{"key": k, "seconds": r["seconds"]} for k, r in
                          {r["key"]: r for r in [*tuned, *runs]}.items()]
    report["majority"] = majority_reference(
        {**profile, "scenarios": [s for s in profile["scenarios"]
                                  if any((r["task"], r["alpha"]) == (s["task"], s["alpha"])
                                         for r in runs)]}, profile["seeds"])
    report["summary"] = summarize([*runs, *report["majority"]])
    report["paired"] = paired(runs) if "FedAMoLE" in methods else []
    report["paired_val"] = paired(runs, metric="val_mtal") if "FedAMoLE" in methods else []
    report["curves"] = curves(runs)
    report["rsea"] = rsea_summary(runs)
    report["compute"] = compute_table(runs)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{name}.md").write_text(to_markdown(report))
    plot(report, out / f"{name}.png")
    partial.unlink(missing_ok=True)
    print(f"wrote {out / name}.json, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
