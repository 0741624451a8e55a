"""Accuracy against the baselines (the paper's Table I/II and ablation, at CPU scale).

Every method runs the same federation through `fedsilo simulate`'s engine
(`run_simulation`): same silos, data partitions, base model, schedule and seeds; only the
strategy differs. Reported per scenario (task x Dirichlet alpha): MTAL (mean over silos of
the final local test metric) as mean and sample std over seeds, the best in bold, and the
MTA curve per round.

    python benchmarks/accuracy.py                      # quick: AG News, alpha 0.1 and 1.0
    python benchmarks/accuracy.py --profile full --device cuda
    python benchmarks/accuracy.py --profile smoke --out /tmp/acc     # CI, seconds

Rounds are aligned by the number of local training rounds behind a score: FedAMoLE,
FedLEASE, FedIT-FT and local-only are scored after training in round r (r + 1 rounds of
training); FedIT and FDLoRA on receipt of round r's plan (r rounds) and on the final plan.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stamp import RESULTS, command_line, git_info, machine, now, stamp_lines

NAME = "accuracy"

#: method -> (SimulationConfig overrides, scored on receipt of the plan rather than after
#: local training)
METHODS: dict[str, tuple[dict[str, Any], bool]] = {
    "FedAMoLE": ({"strategy": "fedamole"}, False),
    "FedLEASE": ({"strategy": "fedlease"}, False),
    "FedIT": ({"strategy": "fedit"}, True),
    "FedIT-FT": ({"strategy": "fedit-ft"}, False),
    "FDLoRA": ({"strategy": "fdlora"}, True),
    "local-only": ({"strategy": "local"}, False),
    "FedAMoLE-random": ({"strategy": "fedamole", "assignment": "random"}, False),
    "FedAMoLE-static": ({"strategy": "fedamole", "assignment": "static"}, False),
}
ABLATIONS = ("FedAMoLE-random", "FedAMoLE-static")

#: Profiles: the federation (SimulationConfig fields) and the grid (tasks, alphas, seeds).
PROFILES: dict[str, dict[str, Any]] = {
    # CI: the embedded model and data, seconds.
    "smoke": {
        "grid": {"tasks": ["synthetic"], "alphas": [1.0], "seeds": [0]},
        "config": {"silos": 3, "rounds": 2, "local_steps": 2, "num_experts": 4, "b": 3,
                   "examples_per_silo": 60, "eval_limit": 8, "warmup_rounds": 1,
                   "max_clusters": 2},
    },
    # A 2-core CPU within about an hour: SmolLM2-135M, short sequences, batch 1, one
    # forward per test prompt (first-token scoring).
    "quick": {
        "grid": {"tasks": ["agnews"], "alphas": [0.1, 1.0], "seeds": [0]},
        "config": {"model": "smollm2", "silos": 5, "rounds": 5, "local_steps": 20,
                   "batch_size": 1, "max_length": 64, "lr": 1e-3, "examples_per_silo": 400,
                   "eval_limit": 40, "scoring": "first_token", "num_experts": 10, "b": 6,
                   "warmup_rounds": 1, "max_clusters": 4, "sync_every": 5},
    },
    # The paper's schedule, for a GPU (--device cuda): 10 silos, 30 rounds, 200 steps.
    "full": {
        "grid": {"tasks": ["agnews", "snli", "dolly"], "alphas": [0.1, 1.0, 100.0],
                 "seeds": [0, 1, 2]},
        "config": {"model": "smollm2", "silos": 10, "rounds": 30, "local_steps": 200,
                   "batch_size": 8, "max_length": 256, "lr": 5e-4,
                   "examples_per_silo": 1000, "num_experts": 30, "b": 8,
                   "warmup_rounds": 5, "max_clusters": 8, "sync_every": 5,
                   "max_new_tokens": 128},
    },
}


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One simulation (in a worker process): the MTAL, the MTA curve, the per-silo scores."""
    import torch

    from fedsilo.cli.simulation import SimulationConfig, run_simulation

    torch.set_num_threads(job["threads"])
    config = SimulationConfig(**job["config"])
    start = time.perf_counter()
    result = run_simulation(config, run_dir=Path(job["run_dir"]))
    seconds = time.perf_counter() - start
    on_receipt = METHODS[job["method"]][1]
    curve = []
    for summary in result.rounds:
        if summary.mta is None:
            continue
        trained = summary.round if on_receipt else summary.round + 1
        curve.append({"round": summary.round, "trained_rounds": trained, "mta": summary.mta})
    final = {}
    for summary in result.rounds:
        for silo, row in summary.silos.items():
            if row.metric is not None:
                final[silo] = row.metric
    return {
        "method": job["method"], "task": job["task"], "alpha": job["alpha"],
        "seed": job["seed"], "mtal": result.mtal, "per_silo": final, "curve": curve,
        "seconds": round(seconds, 1),
    }


def jobs_for(profile: dict[str, Any], methods: Sequence[str], tasks: Sequence[str],
             alphas: Sequence[float], seeds: Sequence[int], device: str, threads: int,
             runs_dir: Path) -> list[dict[str, Any]]:
    jobs = []
    for task in tasks:
        for alpha in alphas:
            for seed in seeds:
                for method in methods:
                    overrides, _ = METHODS[method]
                    config = {**profile["config"], **overrides, "seed": seed, "alpha": alpha,
                              "data": None if task == "synthetic" else task,
                              "device": device, "out_dir": str(runs_dir)}
                    name = f"{task}-a{alpha:g}-s{seed}-{method}"
                    jobs.append({"method": method, "task": task, "alpha": alpha,
                                 "seed": seed, "config": config, "threads": threads,
                                 "run_dir": str(runs_dir / name)})
    return jobs


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, alpha, method): MTAL mean and sample std over seeds; best per scenario."""
    rows: list[dict[str, Any]] = []
    keys = sorted({(r["task"], r["alpha"]) for r in runs})
    for task, alpha in keys:
        scenario = [r for r in runs if (r["task"], r["alpha"]) == (task, alpha)]
        for method in METHODS:
            values = [r["mtal"] for r in scenario if r["method"] == method]
            if not values:
                continue
            rows.append({
                "task": task, "alpha": alpha, "method": method,
                "mtal_mean": statistics.fmean(values),
                "mtal_std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "mtal_per_seed": values, "seeds": len(values),
            })
        main = [r for r in rows if (r["task"], r["alpha"]) == (task, alpha)
                and r["method"] not in ABLATIONS]
        best = max((r["mtal_mean"] for r in main), default=math.nan)
        for row in main:
            row["best"] = row["mtal_mean"] == best
    return rows


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    text = f"{row['mtal_mean'] * 100:.2f}"
    if row["seeds"] > 1:
        text += f" ± {row['mtal_std'] * 100:.2f}"
    return f"**{text}**" if row.get("best") else text


def to_markdown(report: dict[str, Any]) -> str:
    rows = report["summary"]
    scenarios = sorted({(r["task"], r["alpha"]) for r in rows})
    head = " | ".join(f"{task} α={alpha:g}" for task, alpha in scenarios)
    lines = [f"# Accuracy benchmark ({report['profile']} profile)", "", *stamp_lines(report),
             f"- seeds: {', '.join(map(str, report['seeds']))}",
             f"- federation: {json.dumps(report['config'])}", "",
             "MTAL (mean over silos of the final local test accuracy, in %), mean ± sample "
             "std over seeds; best of the methods in bold (ablations excluded).", "",
             f"| method | {head} |", "|---|" + "---:|" * len(scenarios)]
    for method in METHODS:
        cells = []
        for task, alpha in scenarios:
            match = [r for r in rows if (r["task"], r["alpha"], r["method"])
                     == (task, alpha, method)]
            cells.append(_cell(match[0] if match else None))
        if any(c != "-" for c in cells):
            label = f"{method} (ablation)" if method in ABLATIONS else method
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "MTA per round (mean over silos and seeds, %; column = local training "
              "rounds behind the score):", ""]
    for task, alpha in scenarios:
        curves = report["curves"].get(f"{task}|{alpha}", {})
        width = max((len(c) for c in curves.values()), default=0)
        lines += [f"**{task} α={alpha:g}**", "",
                  "| method | " + " | ".join(str(i) for i in range(width)) + " |",
                  "|---|" + "---:|" * width]
        for method, curve in curves.items():
            by_round = {p[0]: p[1] for p in curve}
            cells = [f"{by_round[i] * 100:.1f}" if i in by_round else "-" for i in range(width)]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    seconds = sum(r["seconds"] for r in report["runs"])
    lines.append(f"{len(report['runs'])} runs, {seconds / 60:.1f} min of run time in all "
                 f"({report['wall_s'] / 60:.1f} min wall, {report['jobs']} parallel jobs).")
    return "\n".join(lines) + "\n"


def curves(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[list[float]]]]:
    """Per scenario and method: [trained_rounds, MTA mean over seeds]."""
    out: dict[str, dict[str, list[list[float]]]] = {}
    for run in runs:
        key = f"{run['task']}|{run['alpha']}"
        points = out.setdefault(key, {}).setdefault(run["method"], [])
        points.extend([p["trained_rounds"], p["mta"]] for p in run["curve"])
    for key, methods in out.items():
        for method, points in methods.items():
            grouped: dict[int, list[float]] = {}
            for x, y in points:
                grouped.setdefault(int(x), []).append(y)
            methods[method] = [[x, statistics.fmean(ys)] for x, ys in sorted(grouped.items())]
        out[key] = methods
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(report["curves"])
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
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
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"fedsilo accuracy, {report['profile']} profile, commit "
                 f"{report['git']['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated, from: " + ", ".join(METHODS))
    p.add_argument("--tasks", help="comma-separated: agnews, snli, dolly, sst2, synthetic")
    p.add_argument("--alphas", help="comma-separated Dirichlet alphas")
    p.add_argument("--seeds", help="comma-separated seeds")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--jobs", type=int, default=None,
                   help="simulations in parallel (default: CPUs // 2 on cpu, 1 on cuda)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a federation setting, e.g. --set local_steps=10")
    p.add_argument("--out", type=Path, help="write the results here (default "
                   "benchmarks/results; the smoke profile requires --out)")
    return p.parse_args(list(argv))


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.profile == "smoke" and args.out is None:
        raise SystemExit("the smoke profile writes only where --out says")
    profile = PROFILES[args.profile]
    profile = {**profile, "config": dict(profile["config"])}
    for item in args.set:
        field, _, value = item.partition("=")
        profile["config"][field] = _value(value)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; use some of {list(METHODS)}")
    grid = profile["grid"]
    tasks = args.tasks.split(",") if args.tasks else grid["tasks"]
    alphas = [float(a) for a in args.alphas.split(",")] if args.alphas else grid["alphas"]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else grid["seeds"]
    cpus = os.cpu_count() or 1
    jobs = args.jobs or (1 if args.device != "cpu" else max(1, cpus // 2))
    threads = max(1, cpus // jobs) if args.device == "cpu" else 1
    out = args.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    git = git_info()  # the code measured: before the runs, not after
    with tempfile.TemporaryDirectory(prefix="fedsilo-accuracy-") as tmp:
        todo = jobs_for(profile, methods, tasks, alphas, seeds, args.device, threads,
                        Path(tmp))
        print(f"{len(todo)} simulations, {jobs} at a time, {threads} threads each",
              flush=True)
        runs = []
        if jobs == 1:
            results = map(run_one, todo)
        else:
            pool = ProcessPoolExecutor(max_workers=jobs)
            results = pool.map(run_one, todo)
        partial = out / f".{NAME}.partial.jsonl"  # survives a run cut short
        partial.unlink(missing_ok=True)
        for run in results:
            runs.append(run)
            with partial.open("a") as f:
                f.write(json.dumps(run) + "\n")
            print(f"{run['task']} α={run['alpha']:g} seed {run['seed']} {run['method']}: "
                  f"MTAL {run['mtal']:.4f} ({run['seconds']:.0f} s)", flush=True)
        if jobs > 1:
            pool.shutdown()
    report: dict[str, Any] = {
        "benchmark": NAME, "profile": args.profile, "command": command_line("accuracy.py", argv),
        "git": git, "date": now(),
        "machine": machine(("torch", "transformers", "peft", "nevergrad")),
        "device": args.device, "jobs": jobs, "threads_per_job": threads,
        "config": profile["config"], "tasks": tasks, "alphas": alphas, "seeds": seeds,
        "methods": methods, "wall_s": round(time.perf_counter() - started, 1),
        "runs": runs,
    }
    report["summary"] = summarize(runs)
    report["curves"] = curves(runs)
    (out / f"{NAME}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{NAME}.md").write_text(to_markdown(report))
    plot(report, out / f"{NAME}.png")
    (out / f".{NAME}.partial.jsonl").unlink(missing_ok=True)
    print(f"wrote {out / NAME}.json, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
