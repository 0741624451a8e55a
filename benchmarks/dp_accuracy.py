"""DP and accuracy: what differential privacy of the embedding uploads costs FedAMoLE.

    python benchmarks/dp_accuracy.py                          # quick profile, eps inf,8,2,0.5
    python benchmarks/dp_accuracy.py --epsilons inf,8 --seeds 0 1 2
    python benchmarks/dp_accuracy.py --profile smoke --out /tmp/dp   # CI, seconds
    python benchmarks/dp_accuracy.py --epsilons 1e6 --out /tmp/clip  # control: clipping only
    python benchmarks/dp_accuracy.py --assignment random --epsilons inf --out /tmp/rand

For every (epsilon, seed) it runs the one-process simulation
(`fedsilo.simulation.engine.run_simulation`: the real silo agents, aggregator and RSEA over
`MemoryTransport`) on the embedded synthetic data and model (`builtin:tiny`), with
`dp_epsilon=None` for "inf" (DP off, the paper's setting) and the budget otherwise. With DP,
each silo clips every example's concatenated embeddings (all modules, client and expert
vectors) to L2 norm `dp_clip`, sums, adds Gaussian noise of std sigma * clip and divides by the
embedding-set size; sigma (the noise multiplier) is calibrated once by the opacus RDP
accountant so that the planned releases (one per training round) spend (epsilon, delta). RSEA
then assigns experts from those noisy embeddings. Training itself is not noised (no DP-SGD).

Reported per budget: MTAL (mean over silos of the final metric, here accuracy) as mean and
sample std over seeds, the paired difference to the noiseless run of the same seed, the noise
multiplier the silos used (read from the run: each silo's `dp_calibrated` log event, checked
against `noise_multiplier_for(epsilon, delta, releases=rounds)`), the expected norm of the
noise relative to the clip bound of the released mean (sigma * S * sqrt(d) / (clip * n):
S = `privacy.dp.sensitivity(clip)`, the release's L2 sensitivity, 2 x clip x sqrt(1.25); d
the released vector's length, n the silo's embedding-set size), and how often the
assignments of rounds 1.. differ from the noiseless run's, with their Jaccard distance
(from the run folder's `assignments/round_XXX.json`; the final round's plans carry no
assignment), next to what two independent random feasible assignments give (the level of
"nothing kept"). Round 1's assignment is the one DP alone changes: round 0 (random
assignment, training) is identical with and without DP, so any difference there comes from
clipping and noise; later rounds also differ because the trained experts differ.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsilo.privacy.dp import noise_multiplier_for, sensitivity
from fedsilo.sdk.aggregation.rsea import AssignmentConstraints, random_assignment
from fedsilo.simulation.engine import SimulationConfig, build_silo_data, run_simulation

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stamp import RESULTS, command_line, git_info, machine, now

NAME = "dp_accuracy"
DEFAULT_EPSILONS = (math.inf, 8.0, 2.0, 0.5)
DEFAULT_SEEDS = (0, 1)

#: quick = the SimulationConfig defaults (4 silos, 6 rounds, 30 local steps, 300 examples per
#: silo, 8 experts per module); smoke = a seconds-long miniature for CI (one round, so the
#: noise reaches no assignment: it checks the plumbing, not the effect).
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {},
    "smoke": {"silos": 3, "rounds": 1, "local_steps": 2, "num_experts": 6, "b": 4,
              "examples_per_silo": 60, "eval_limit": 8},
}


# -- one run --------------------------------------------------------------------------------


class _Calibrations(logging.Handler):
    """Keeps the noise multiplier each silo calibrated (its `dp_calibrated` event)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.by_silo: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "fedsilo_event", None) == "dp_calibrated":
            fields = record.fedsilo_fields  # type: ignore[attr-defined]
            self.by_silo[str(fields["silo"])] = float(fields["noise_multiplier"])


@contextmanager
def _calibrations() -> Iterator[_Calibrations]:
    logger = logging.getLogger("fedsilo.privacy.silo")
    handler, level, propagate = _Calibrations(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # keep the per-release INFO lines off the console
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _assignments(run_dir: Path, rounds: int) -> dict[int, dict[str, dict[str, list[int]]]]:
    """Rounds 1 .. rounds-1: the assignments RSEA computed from released embeddings (round 0
    is random; the final evaluation round's plans carry none)."""
    return {
        k: json.loads((run_dir / "assignments" / f"round_{k:03d}.json").read_text())
        for k in range(1, rounds)
    }


def assignment_difference(
    ours: dict[int, dict[str, dict[str, list[int]]]],
    reference: dict[int, dict[str, dict[str, list[int]]]],
) -> dict[str, Any]:
    """Share of (round, silo, module) expert sets that differ from the reference's, and their
    mean Jaccard distance (1 - |A & B| / |A | B|): over all rounds, per round, and round 1."""
    differ: dict[int, list[float]] = {}
    jaccard: dict[int, list[float]] = {}
    for k, silos in reference.items():
        differ[k], jaccard[k] = [], []
        for silo, modules in silos.items():
            for module, experts in modules.items():
                a, b = set(experts), set(ours[k][silo][module])
                union = a | b
                differ[k].append(float(a != b))
                jaccard[k].append(1 - len(a & b) / len(union) if union else 0.0)
    every_d = [x for xs in differ.values() for x in xs]
    every_j = [x for xs in jaccard.values() for x in xs]
    return {
        "entries": len(every_d),
        "differ": int(sum(every_d)),
        "differ_share": statistics.fmean(every_d) if every_d else None,
        "mean_jaccard_distance": statistics.fmean(every_j) if every_j else None,
        "round1_differ_share": statistics.fmean(differ[1]) if differ.get(1) else None,
        "round1_jaccard_distance": statistics.fmean(jaccard[1]) if jaccard.get(1) else None,
        "per_round_differ_share": {str(k): statistics.fmean(v) for k, v in differ.items() if v},
        "per_round_jaccard_distance": {
            str(k): statistics.fmean(v) for k, v in jaccard.items() if v
        },
    }


def unrelated_baseline(config: SimulationConfig, draws: int = 500) -> dict[str, float]:
    """What `assignment_difference` gives for two independent random feasible assignments
    (the solver's, as in round 0) under the config's constraints: the level at which an
    assignment carries nothing of the reference's."""
    c = AssignmentConstraints(num_experts=config.num_experts, k_e=config.adapter().top_k,
                              k_c=config.k_c, b=config.b)
    rng = np.random.default_rng(12345)
    differ, jaccard = [], []
    for _ in range(draws):
        a = random_assignment(config.silos, c, rng, solver=config.solver)  # type: ignore[arg-type]
        b = random_assignment(config.silos, c, rng, solver=config.solver)  # type: ignore[arg-type]
        for row_a, row_b in zip(a.astype(bool), b.astype(bool), strict=True):
            differ.append(float((row_a != row_b).any()))
            jaccard.append(1 - (row_a & row_b).sum() / (row_a | row_b).sum())
    return {"draws": draws, "differ_share": statistics.fmean(differ),
            "mean_jaccard_distance": float(statistics.fmean(jaccard))}


def noise_to_signal(
    config: SimulationConfig, sigma: float, round0: dict[str, dict[str, list[int]]]
) -> float:
    """Mean over silos of sigma * S * sqrt(d) / (clip * n), S the release's sensitivity:
    the expected L2 norm of the noise in the released mean relative to `clip`, the largest
    norm the clipped mean itself can have.
    d = r * (1 + experts held) summed over modules (round 0's assignment), n = the silo's
    embedding-set size."""
    data = build_silo_data(config)
    ratios = []
    for silo, silo_data in zip(sorted(round0, key=lambda s: int(s.rsplit("-", 1)[1])), data,
                               strict=True):
        d = sum(config.r * (1 + len(experts)) for experts in round0[silo].values())
        n = len(silo_data.emb or silo_data.train)
        ratios.append(sigma * sensitivity(config.dp_clip) * math.sqrt(d)
                      / (config.dp_clip * n))
    return statistics.fmean(ratios)


def run_one(config: SimulationConfig, run_dir: Path) -> dict[str, Any]:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    start = time.perf_counter()
    with _calibrations() as calib:
        result = run_simulation(config, run_dir=run_dir)
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {
        "epsilon": math.inf if config.dp_epsilon is None else config.dp_epsilon,
        "seed": config.seed,
        "mtal": result.mtal,
        "mta_per_round": [r.mta for r in result.rounds],
        "seconds": seconds,
        "load_avg_1m_before": load,
        "noise_multiplier_by_silo": calib.by_silo,
    }
    if config.dp_epsilon is None:
        out["noise_multiplier"] = 0.0
        out["noise_multiplier_source"] = "DP off"
    else:
        expected = noise_multiplier_for(config.dp_epsilon, config.dp_delta,
                                        releases=config.rounds)
        seen = set(calib.by_silo.values())
        if len(calib.by_silo) == config.silos and len(seen) == 1:
            out["noise_multiplier"] = seen.pop()
            out["noise_multiplier_source"] = "run (each silo's dp_calibrated event)"
        else:  # not observed: what the silo computes without DP-SGD
            out["noise_multiplier"] = expected
            out["noise_multiplier_source"] = "noise_multiplier_for(eps, delta, releases=rounds)"
        out["noise_multiplier_expected"] = expected
        round0 = json.loads((run_dir / "assignments" / "round_000.json").read_text())
        out["noise_norm_over_clip"] = noise_to_signal(config, out["noise_multiplier"], round0)
    return out


# -- summary and tables ---------------------------------------------------------------------


def _fmt_eps(eps: float) -> str:
    return "inf (off)" if math.isinf(eps) else f"{eps:g}"


def summarize(runs: Sequence[dict[str, Any]], epsilons: Sequence[float]) -> list[dict[str, Any]]:
    off = {r["seed"]: r["mtal"] for r in runs if math.isinf(r["epsilon"])}
    rows = []
    for eps in epsilons:
        rs = [r for r in runs if r["epsilon"] == eps]
        mtals = [r["mtal"] for r in rs]
        paired = [r["mtal"] - off[r["seed"]] for r in rs if r["seed"] in off]
        diffs = [r["assignments_vs_off"] for r in rs if r.get("assignments_vs_off")]
        shares = [d["differ_share"] for d in diffs if d["differ_share"] is not None]
        round1 = [d["round1_differ_share"] for d in diffs if d["round1_differ_share"] is not None]
        jaccard = [d["mean_jaccard_distance"] for d in diffs
                   if d["mean_jaccard_distance"] is not None]
        jaccard1 = [d["round1_jaccard_distance"] for d in diffs
                    if d["round1_jaccard_distance"] is not None]
        sigmas = sorted({r["noise_multiplier"] for r in rs})
        ratios = [r["noise_norm_over_clip"] for r in rs if "noise_norm_over_clip" in r]
        rows.append({
            "epsilon": "inf" if math.isinf(eps) else eps,
            "seeds": [r["seed"] for r in rs],
            "mtal_per_seed": mtals,
            "mtal_mean": statistics.fmean(mtals),
            "mtal_std": statistics.stdev(mtals) if len(mtals) > 1 else None,
            "delta_vs_off_mean": statistics.fmean(paired) if paired else None,
            "noise_multiplier": sigmas[0] if len(sigmas) == 1 else sigmas,
            "noise_multiplier_source": rs[0]["noise_multiplier_source"],
            "noise_norm_over_clip": statistics.fmean(ratios) if ratios else None,
            "assignments_differ_share": statistics.fmean(shares) if shares else None,
            "round1_assignments_differ_share": statistics.fmean(round1) if round1 else None,
            "assignments_jaccard_distance": statistics.fmean(jaccard) if jaccard else None,
            "round1_jaccard_distance": statistics.fmean(jaccard1) if jaccard1 else None,
            "seconds_mean": statistics.fmean(r["seconds"] for r in rs),
        })
    return rows


def _num(x: Any, spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _vs(share: float | None, jaccard: float | None) -> str:
    return "-" if share is None else f"{share:.0%} ({_num(jaccard, '.2f')})"


def to_markdown(report: dict[str, Any]) -> str:
    m, c, u = report["machine"], report["config"], report["unrelated_assignments"]
    lines = [
        "# DP and accuracy benchmark",
        "",
        f"- command: `{report['command']}`",
        f"- commit: `{report['git']['commit']}`",
        f"- date: {report['date']}",
        f"- machine: {m['cpu_model']}, {m['cpu_count']} CPUs, {m['ram_GB']} GB RAM; "
        f"torch threads {report['torch_threads']}",
        f"- versions: python {m['python']}, torch {m['torch']}, transformers "
        f"{m['transformers']}, opacus {m['opacus']}",
        f"- profile: {report['profile']} (silos={c['silos']}, rounds={c['rounds']}, "
        f"local_steps={c['local_steps']}, examples_per_silo={c['examples_per_silo']}, "
        f"eval_limit={c['eval_limit']}, E={c['num_experts']} experts, k_c={c['k_c']}, "
        f"b={c['b']}, r={c['r']}, assignment={c['assignment']}; model {c['model']}, "
        "embedded synthetic data, "
        f"{c['partition']} alpha={c['alpha']})",
        f"- DP: delta={c['dp_delta']:g}, clip={c['dp_clip']:g}, RDP accountant, "
        f"planned releases per silo = rounds = {c['rounds']}, no DP-SGD",
        f"- seeds: {', '.join(map(str, report['seeds']))}",
        "",
        "| epsilon | noise multiplier | noise norm / clip | MTAL mean | MTAL std | "
        "MTAL per seed | vs off (paired) | assignments vs off, round 1 | "
        "assignments vs off, rounds 1+ | s per run |",
        "|---:|---:|---:|---:|---:|:---|---:|---:|---:|---:|",
    ]
    for row in report["summary"]:
        sigma = row["noise_multiplier"]
        sigma_s = (", ".join(f"{s:.4g}" for s in sigma) if isinstance(sigma, list)
                   else f"{sigma:.4g}")
        is_off = row["epsilon"] == "inf"
        round1 = "ref." if is_off else _vs(row["round1_assignments_differ_share"],
                                           row["round1_jaccard_distance"])
        later = "ref." if is_off else _vs(row["assignments_differ_share"],
                                          row["assignments_jaccard_distance"])
        lines.append(
            f"| {'inf (off)' if is_off else format(row['epsilon'], 'g')} | {sigma_s} | "
            f"{_num(row['noise_norm_over_clip'], '.2f')} | {row['mtal_mean']:.4f} | "
            f"{_num(row['mtal_std'], '.4f')} | "
            f"{', '.join(f'{x:.4f}' for x in row['mtal_per_seed'])} | "
            f"{'ref.' if is_off else _num(row['delta_vs_off_mean'], '+.4f')} | "
            f"{round1} | {later} | "
            f"{row['seconds_mean']:.0f} |"
        )
    lines += [
        "",
        "MTAL: mean over silos of the final accuracy (chance is about 0.5), mean and sample "
        "std over the seeds; vs off: mean over seeds of MTAL minus the noiseless run's MTAL "
        "at the same seed. noise multiplier: sigma, read from each silo's `dp_calibrated` "
        "event (`noise_multiplier_source` in the JSON), which `noise_multiplier_for(eps, "
        "delta, releases=rounds)` matches (`noise_multiplier_expected`). noise norm / clip: "
        "sigma * S * sqrt(d) / (clip * n) averaged over silos (S: the release's L2 "
        "sensitivity, 2 x clip x sqrt(1.25)), the expected norm of the noise in the "
        "released mean embedding relative to `clip`, the most the clipped mean can have "
        "(d: the released vector's length, n: the silo's embedding set). assignments vs "
        "off: share of the (silo, module) expert sets computed by RSEA that differ from the "
        "noiseless run's at the same seed, and in brackets their mean Jaccard distance "
        "(1 - |A & B| / |A | B|); round 1 is the effect of DP alone (round 0 is identical "
        "with and without DP), later rounds add the divergence of training. Two independent "
        "random feasible assignments under the same constraints "
        f"differ in {u['differ_share']:.1%} of the sets, at a Jaccard distance of "
        f"{u['mean_jaccard_distance']:.2f} ({u['draws']} pairs of the solver's random "
        "assignments): the level at which an assignment keeps nothing of the reference's. "
        "'-' where the profile has no round 1 RSEA assignment (one round).",
        "",
    ]
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------


def _floats(values: Sequence[str]) -> list[float]:
    out = []
    for value in values:
        for part in value.split(","):
            if part.strip():
                out.append(float(part))  # "inf" parses
    return out


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="MTAL of FedAMoLE (one-process simulation) with DP of the embedding "
        "uploads at several budgets.",
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                        help="quick: the SimulationConfig defaults (4 silos, 6 rounds, 30 "
                        "steps); smoke: seconds (default %(default)s)")
    parser.add_argument("--smoke", action="store_true", help="same as --profile smoke")
    parser.add_argument("--epsilons", nargs="+", default=None,
                        help="embedding DP budgets, space- or comma-separated; inf = DP off "
                        "(default inf 8 2 0.5)")
    parser.add_argument("--seeds", nargs="+", default=None,
                        help="simulation seeds, space- or comma-separated (default 0 1)")
    parser.add_argument("--delta", type=float, default=None,
                        help="DP delta (default the SimulationConfig's, 1e-5)")
    parser.add_argument("--clip", type=float, default=None,
                        help="per-example embedding L2 bound (default the SimulationConfig's, "
                        "1.0)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="training rounds, overriding the profile's (smoke: 1, which "
                        "leaves no RSEA assignment to compare; 2 gives one)")
    parser.add_argument("--assignment", choices=("rsea", "random", "static"), default=None,
                        help="expert assignment (default the SimulationConfig's, rsea); "
                        "random is the control that ignores the embeddings")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default %(default)s: on a shared 2-core machine "
                        "more threads spin against other processes and run many times "
                        "slower; 0 = torch's default)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for dp_accuracy.json and .md (default benchmarks/results; "
                        "smoke: none, the table is printed)")
    parser.add_argument("--keep-runs", type=Path, default=None,
                        help="keep the simulation run folders here (default: a temporary "
                        "folder, deleted)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.profile = "smoke"
    if args.out is None and args.profile != "smoke":
        args.out = RESULTS
    try:
        args.epsilon_list = (_floats(args.epsilons) if args.epsilons
                             else list(DEFAULT_EPSILONS))
        args.seed_list = ([int(float(s)) for s in _floats(args.seeds)] if args.seeds
                          else list(DEFAULT_SEEDS))
    except ValueError as exc:
        parser.error(f"--epsilons / --seeds: {exc}")
    if not args.epsilon_list or any(not e > 0 for e in args.epsilon_list):
        parser.error("--epsilons must be > 0 (inf = DP off)")
    if not args.seed_list:
        parser.error("--seeds must list at least one seed")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    # Noiseless runs first: the others' assignments are compared with theirs.
    args.epsilon_list = sorted(dict.fromkeys(args.epsilon_list), key=lambda e: -e)
    args.seed_list = list(dict.fromkeys(args.seed_list))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = SimulationConfig(**PROFILES[args.profile])
    if args.delta is not None:
        base = replace(base, dp_delta=args.delta)
    if args.clip is not None:
        base = replace(base, dp_clip=args.clip)
    if args.rounds is not None:
        base = replace(base, rounds=args.rounds)
    if args.assignment is not None:
        base = replace(base, assignment=args.assignment)
    epsilons = args.epsilon_list
    include_off = math.inf in epsilons
    # The noiseless reference is run for the assignment comparison even if not asked for.
    plan = epsilons if include_off else [math.inf, *epsilons]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dp_accuracy-") as tmp:
        root = args.keep_runs or Path(tmp)
        reference: dict[int, Any] = {}
        for eps in plan:
            for seed in args.seed_list:
                config = replace(base, seed=seed, out_dir=str(root),
                                 dp_epsilon=None if math.isinf(eps) else eps)
                run_dir = root / f"eps-{'inf' if math.isinf(eps) else f'{eps:g}'}-seed{seed}"
                result = run_one(config, run_dir)
                ours = _assignments(run_dir, config.rounds)
                if math.isinf(eps):
                    reference[seed] = ours
                else:
                    result["assignments_vs_off"] = assignment_difference(ours, reference[seed])
                runs.append(result)
                diff = result.get("assignments_vs_off") or {}
                print(
                    f"eps={_fmt_eps(eps):>9} seed={seed}: MTAL {result['mtal']:.4f}, "
                    f"sigma {result['noise_multiplier']:.4g}, assignments differ "
                    f"{_num(diff.get('differ_share'), '.0%')}, {result['seconds']:.1f} s",
                    flush=True,
                )
    for r in runs:  # the noiseless runs made only as the reference are kept, flagged
        r["requested"] = include_off or not math.isinf(r["epsilon"])
    report = {
        "benchmark": NAME,
        "command": command_line("dp_accuracy.py", argv),
        # The whole working tree at run time (others may edit files the run does not use).
        "git": git_info(),
        "date": now(),
        "machine": machine(("torch", "transformers", "opacus")),
        "torch_threads": torch.get_num_threads(),
        "profile": args.profile,
        "config": asdict(base) | {"out_dir": None, "seed": None, "dp_epsilon": None},
        "epsilons": ["inf" if math.isinf(e) else e for e in epsilons],
        "seeds": args.seed_list,
        "summary": summarize(runs, epsilons),
        "unrelated_assignments": unrelated_baseline(base),
        "runs": [{**r, "epsilon": "inf" if math.isinf(r["epsilon"]) else r["epsilon"]}
                 for r in runs],
    }
    md = to_markdown(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{NAME}.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / f"{NAME}.md").write_text(md)
        print(f"wrote {args.out / f'{NAME}.json'} and {args.out / f'{NAME}.md'}")
    else:
        print(md)
    ok = all(math.isfinite(r["mtal"]) for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
