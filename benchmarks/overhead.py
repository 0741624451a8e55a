"""System overhead (the paper's Table IV): memory, bytes on the wire and seconds per silo per
round, for FedIT-FT and for FedAMoLE with E = 15, 20, 25, 30 experts per module.

    python benchmarks/overhead.py                             # quick profile: SmolLM2-135M
    python benchmarks/overhead.py --experts 30 --rounds 3 --out /tmp/ov
    python benchmarks/overhead.py --profile smoke --out /tmp/ov   # CI, seconds

Part 1, a real federation per configuration, in one process. The same parts as
`fedsilo simulate` (`simulation/engine.py`): a `LocalTrainer` per silo on a shared backbone,
the strategy's server in the real `Aggregator`, `SiloAgent`s, on the AG News presets
(quick; the embedded synthetic set for smoke). What differs: encryption is on. Every party
has its own keys (`Keyring.create`, pinned peers in a `TrustStore`) and its own
`EnvelopeCodec` (`SecuritySettings.codec`, as a deployment builds it), and `SealedTransport`
below routes the sealed bytes between per-party `MemoryTransport` inboxes: the sender seals
with its keys for the recipient, the recipient's inbox opens with its own. So the bytes the
aggregator records per silo (`RoundRecord.bytes_up`/`bytes_down`) are the sealed envelopes a
broker would carry. Measured per silo per training round (the final, evaluation-only round
carries no tensors and is left out): upload and download bytes, train_s and test_s (the
silo's own timings in its upload), aggregation seconds (the server's `AggregationReport`:
FedAvg, plus RSEA's next assignment for FedAMoLE), and memory:

- memory MB: the process's peak resident memory (VmHWM, reset via /proc/self/clear_refs)
  above its resident memory just before the configuration starts, i.e. after the backbone
  was loaded (and a warm-up step ran). It holds everything this one process plays: all C
  silos' adapters and the state their optimisers leave, the aggregator's global adapter and
  accumulators, the sealed messages in flight, and the activations of one silo's training at
  a time (silos take turns). The shared backbone itself is in the baseline; its size is
  reported separately (model MB: RSS growth while loading it).
- silo round peak MB: the largest growth of resident memory during one silo's turn
  (open the plan, install, train, test, embed, seal the upload) above what was resident
  when the turn began: the working memory one silo adds.

Part 2, LLaMA-3.2-1B byte counts without weights: its shapes (16 layers, q_proj
2048 -> 2048, v_proj 2048 -> 512, r = 8), the strategy's real `initialize` and
`configure_round` plans for 30 silos (FedAMoLE: E = 30, k_e = 2, k_c = 2, b = 8, so each
silo holds exactly k_e = 2 experts per module), the `RoundPlan` as the aggregator builds it,
an upload of zeros with exactly the tensors `upload_schema` demands, each sealed by the real
`EnvelopeCodec` of its sender and opened by its recipient's. Reported: raw tensor bytes,
the plain wire format (`protocol.encode`) and the sealed envelope, next to the paper's.
MB = 10^6 bytes throughout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from memory import release_free_memory, reset_peak_rss, status_kb
from stamp import RESULTS, command_line, git_info, machine, now, stamp_lines

from fedsilo.aggregator.coordinator import Aggregator
from fedsilo.aggregator.schedule import Schedule
from fedsilo.privacy.keys import Keyring, TrustStore
from fedsilo.privacy.settings import SecuritySettings
from fedsilo.privacy.validation import check_tensors
from fedsilo.sdk import protocol
from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.messages import Announce, RoundPlan, Upload
from fedsilo.sdk.models.loading import LoadedModel, load_model
from fedsilo.sdk.params import ModuleShape, TensorDict
from fedsilo.sdk.schema import Schema
from fedsilo.sdk.strategies import get_strategy
from fedsilo.sdk.strategies.config import knob_names
from fedsilo.sdk.training import LocalTrainer
from fedsilo.sdk.transport.base import Delivery, Inbound, TrafficCounter, Transport
from fedsilo.sdk.transport.codec import AGGREGATOR, Codec
from fedsilo.sdk.transport.memory import MemoryTransport
from fedsilo.silo_agent.agent import SiloAgent
from fedsilo.simulation.engine import (
    SimulationConfig,
    build_silo_data,
    share_backbone,
    silo_ids,
)

NAME = "overhead"
MB = 1e6
FEDERATION = "overhead-bench"
K_C = 2  # silos per expert (the FedAMoLEConfig default)
TARGET_OVERHEAD = 0.02  # wire bytes within 2 % of the raw tensor bytes
#: What the measured path runs through: uncommitted changes there are stamped on the results.
BENCHED_CODE = (
    "sdk",
    "aggregator",
    "silo_agent",
    "privacy",
    "simulation/engine.py",
    "benchmarks/overhead.py",
    "benchmarks/stamp.py",
)

#: The paper's Table IV (LLaMA-3.2-1B, one RTX 3090), as far as it is quoted here.
PAPER: dict[str, dict[str, float]] = {
    "fedamole": {"experts": 30, "memory_MB": 2798, "upload_MB": 12.52, "download_MB": 12.51,
                 "train_s": 16.49, "aggregation_s": 5.85, "test_s": 5.72},
    "fedit-ft": {"upload_MB": 1.64, "train_s": 4.85, "aggregation_s": 0.02},
}


@dataclass(frozen=True)
class Profile:
    model: str
    data: str | None  # None: the embedded synthetic set
    silos: int
    rounds: int
    local_steps: int
    batch_size: int
    max_length: int
    eval_limit: int
    examples_per_silo: int
    experts: tuple[int, ...]
    llama_silos: int  # how many of the 30 LLaMA silos' plans and uploads are sealed
    threads: int


PROFILES: dict[str, Profile] = {
    # Estimated 7-9 minutes with one torch thread on an otherwise idle 2-core machine
    # (SmolLM2 training steps and candidate scoring dominate).
    "quick": Profile("smollm2", "agnews", 3, 2, 2, 2, 64, 4, 60, (15, 20, 25, 30), 30, 1),
    "smoke": Profile("builtin:tiny", None, 3, 1, 1, 2, 32, 2, 40, (15, 20, 25, 30), 2, 1),
}


@dataclass(frozen=True)
class LlamaShapes:
    """LLaMA-3.2-1B's adapted modules (from its config): 16 layers, hidden 2048, 32 query
    heads, 8 KV heads x 64 (v_proj -> 512). FedAMoLE as in the paper's Table IV: E = 30,
    k_e = 2; with 30 silos and k_c = 2 every silo holds exactly k_e experts per module."""

    layers: int = 16
    hidden: int = 2048
    kv_dim: int = 512
    r: int = 8
    num_experts: int = 30
    top_k: int = 2
    k_c: int = 2
    b: int = 8
    silos: int = 30

    def shapes(self) -> dict[str, ModuleShape]:
        out: dict[str, ModuleShape] = {}
        for i in range(self.layers):
            out[f"model.layers.{i}.self_attn.q_proj"] = ModuleShape(self.hidden, self.hidden)
            out[f"model.layers.{i}.self_attn.v_proj"] = ModuleShape(self.hidden, self.kv_dim)
        return out


LLAMA = LlamaShapes()


# -- small pure helpers -----------------------------------------------------------------------


def experts_cap(num_experts: int, k_c: int, silos: int, k_e: int) -> int:
    """b for a run: each silo may hold at most its even share of the E * k_c expert slots
    (rounded up), so the slots are spread evenly and every silo's upload has about the
    same size."""
    return max(k_e, math.ceil(num_experts * k_c / silos))


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def overhead(wire: float, raw: float) -> float:
    """(wire - raw) / raw: what framing and encryption add to the tensors."""
    return (wire - raw) / raw if raw > 0 else math.nan


def zeros_for(schema: Schema) -> TensorDict:
    """Tensors of exactly the names, shapes and dtypes of `schema` (the content does not
    matter: nothing on the wire is compressed)."""
    return {name: torch.zeros(spec.shape, dtype=spec.dtype) for name, spec in schema.items()}


def summarize(rows: Sequence[Mapping[str, Any]], rounds: Sequence[Mapping[str, Any]]
              ) -> dict[str, float]:
    """Per silo per round means over the training rounds' rows (one per silo and round) and
    per round means of the aggregation."""
    def col(key: str) -> list[float]:
        return [float(r[key]) for r in rows]

    up, down = mean(col("wire_up")), mean(col("wire_down"))
    raw_up, raw_down = mean(col("raw_up")), mean(col("raw_down"))
    return {
        "experts_per_silo_per_module": mean(col("experts_per_module")),
        "upload_MB": up / MB,
        "download_MB": down / MB,
        "raw_upload_MB": raw_up / MB,
        "raw_download_MB": raw_down / MB,
        "wire_over_raw_up": up / raw_up if raw_up else math.nan,
        "wire_over_raw_down": down / raw_down if raw_down else math.nan,
        "train_s": mean(col("train_s")),
        "test_s": mean(col("test_s")),
        "silo_round_peak_MB": max(col("peak_MB")) if rows else math.nan,
        "seal_upload_s": mean(col("seal_up_s")),
        "open_upload_s": mean(col("open_up_s")),
        "aggregation_s": mean([float(r["aggregation_s"]) for r in rounds]),
        "fedavg_s": mean([float(r["fedavg_s"]) for r in rounds]),
        "assignment_s": mean([float(r["assignment_s"]) for r in rounds]),
    }


# -- memory -----------------------------------------------------------------------------------


class PeakTracker:
    """The process's peak RSS above a baseline, across inner segments that each measure
    their own peak (VmHWM is reset per segment, so the overall peak is the max of them)."""

    def __init__(self) -> None:
        release_free_memory()
        self.works = reset_peak_rss()
        self.baseline_kb = status_kb("VmRSS")
        self.peak_kb = self.baseline_kb

    def _fold(self) -> None:
        self.peak_kb = max(self.peak_kb, status_kb("VmHWM"))

    @contextmanager
    def segment(self) -> Iterator[dict[str, float]]:
        """Yields a dict that gets `peak_MB`: this segment's peak above its start."""
        self._fold()
        reset_peak_rss()
        start = status_kb("VmRSS")
        out: dict[str, float] = {}
        try:
            yield out
        finally:
            hwm = status_kb("VmHWM")
            self.peak_kb = max(self.peak_kb, hwm)
            out["peak_MB"] = (hwm - start) * 1024 / MB if self.works else math.nan

    def above_baseline_MB(self) -> float:
        self._fold()
        return (self.peak_kb - self.baseline_kb) * 1024 / MB if self.works else math.nan


# -- encryption on the wire ---------------------------------------------------------------------


def make_codecs(folder: Path, silos: Sequence[str]) -> dict[str, Codec]:
    """Every party's own codec, as `fedsilo provision` sets them up: a keyring per party,
    the aggregator pins every silo, each silo pins the aggregator."""
    keys = {p: Keyring.create(folder / p, p) for p in (AGGREGATOR, *silos)}
    TrustStore(FEDERATION, {s: keys[s].public() for s in silos}).save(folder / "aggregator.json")
    for silo in silos:
        TrustStore(FEDERATION, {AGGREGATOR: keys[AGGREGATOR].public()}).save(
            folder / f"{silo}.json"
        )
    return {
        p: SecuritySettings(keys_dir=folder / p, trust_file=folder / f"{p}.json").codec(
            p, FEDERATION if p == AGGREGATOR else None
        )
        for p in keys
    }


def raw_bytes(message: RoundPlan | Upload | Announce) -> int:
    if isinstance(message, Announce):
        return 0
    extra = protocol.tensor_bytes(message.embeddings) if isinstance(message, Upload) else 0
    return protocol.tensor_bytes(message.params) + extra


class SealedTransport(Transport):
    """`MemoryTransport`'s queues with one codec per party, as in a deployment: a message is
    sealed by its sender's codec (signed by the sender, encrypted to the recipient) and put
    in the recipient's inbox, whose codec (the recipient's) opens it. Records each message's
    raw tensor bytes, sealed (wire) bytes and the time to seal and to open it."""

    def __init__(self, codecs: Mapping[str, Codec]) -> None:
        self.codecs = dict(codecs)
        self.inbox = {party: MemoryTransport(codec) for party, codec in self.codecs.items()}
        self.traffic = TrafficCounter()
        self.sent: dict[tuple[str, int, str], dict[str, float]] = {}

    @property
    def rejected(self) -> dict[str, int]:  # type: ignore[override]
        out: dict[str, int] = {}
        for inbox in self.inbox.values():
            for reason, n in inbox.rejected.items():
                out[reason] = out.get(reason, 0) + n
        return out

    def _seal(self, sender: str, message: RoundPlan | Upload | Announce) -> bytes:
        start = time.perf_counter()
        data = self.codecs[sender].seal(message)
        kind = type(message).__name__.lower()
        server_round = -1 if isinstance(message, Announce) else message.round
        self.sent[(kind, server_round, message.silo_id)] = {
            "raw": raw_bytes(message), "wire": len(data),
            "seal_s": time.perf_counter() - start, "open_s": math.nan,
        }
        return data

    def _opened(self, delivery: Delivery[Any] | None, start: float) -> Delivery[Any] | None:
        if delivery is not None:
            m = delivery.message
            kind = type(m).__name__.lower()
            key = (kind, -1 if isinstance(m, Announce) else m.round, m.silo_id)
            if key in self.sent:
                self.sent[key]["open_s"] = time.perf_counter() - start
        return delivery

    def send_plan(self, plan: RoundPlan) -> int:
        n = self.inbox[plan.silo_id].deliver_plan(plan.silo_id, self._seal(AGGREGATOR, plan))
        self.traffic.add("down", plan.silo_id, n)
        return n

    def send_upload(self, upload: Upload) -> int:
        n = self.inbox[AGGREGATOR].deliver_upload(
            upload.silo_id, self._seal(upload.silo_id, upload)
        )
        self.traffic.add("up", upload.silo_id, n)
        return n

    def send_announce(self, announce: Announce) -> int:
        n = self.inbox[AGGREGATOR].deliver_upload(
            announce.silo_id, self._seal(announce.silo_id, announce)
        )
        self.traffic.add("up", announce.silo_id, n)
        return n

    def receive_plan(self, silo_id: str, timeout: float | None = None
                     ) -> Delivery[RoundPlan] | None:
        start = time.perf_counter()
        return self._opened(self.inbox[silo_id].receive_plan(silo_id), start)

    def receive_upload(self, timeout: float | None = None) -> Delivery[Inbound] | None:
        start = time.perf_counter()
        return self._opened(self.inbox[AGGREGATOR].receive_upload(), start)


# -- part 1: a real federation per configuration ----------------------------------------------


def sim_config(profile: Profile, method: str, experts: int) -> SimulationConfig:
    """`fedsilo simulate`'s settings for one configuration (FedIT-FT ignores E and b)."""
    base = SimulationConfig()
    if method == "fedamole":
        experts, b = experts, experts_cap(experts, K_C, profile.silos, base.top_k)
    else:
        experts, b = base.num_experts, base.b
    return SimulationConfig(
        silos=profile.silos, rounds=profile.rounds, local_steps=profile.local_steps,
        strategy=method, batch_size=profile.batch_size, max_length=profile.max_length,
        model=profile.model, num_experts=experts, k_c=K_C, b=b,
        data=profile.data, examples_per_silo=profile.examples_per_silo,
        eval_limit=profile.eval_limit,
    )


def warm_up(profile: Profile, loaded: LoadedModel, datasets: Sequence[Any], keys_dir: Path
            ) -> None:
    """A miniature of every configuration's path (2 silos, one round, one step, one test
    example) run and thrown away first, so one-time costs (kernel set-up, the solver's first
    use, first allocations) fall on no configuration's figures."""
    mini = replace(profile, silos=2, rounds=1, local_steps=1, eval_limit=1)
    for i, (method, experts) in enumerate((("fedit-ft", 0), ("fedamole", min(profile.experts)))):
        run_config(mini, method, experts, loaded, datasets[:2], keys_dir / f"warm-up-{i}")


def run_config(profile: Profile, method: str, experts: int, loaded: LoadedModel,
               datasets: Sequence[Any], keys_dir: Path) -> dict[str, Any]:
    config = sim_config(profile, method, experts)
    spec = get_strategy(method)
    adapter = config.adapter()
    ids = silo_ids(config.silos)
    start = time.perf_counter()
    tracker = PeakTracker()
    server = spec.server(adapter, config.strategy_config(), config.seed)
    server.validate(config.silos)
    server.validate_rounds(config.rounds)
    transport = SealedTransport(make_codecs(keys_dir, ids))
    agents = [
        SiloAgent(silo, spec.client(config.strategy_config()),
                  LocalTrainer(share_backbone(loaded.model), loaded.tokenizer, data, adapter,
                               config.training(), seed=config.seed, silo_id=silo),
                  transport)
        for silo, data in zip(ids, datasets, strict=True)
    ]
    schedule = Schedule(config.rounds, config.local_steps, config.lr, config.lr_decay)
    aggregator = Aggregator(server, transport, schedule)
    aggregator.start(agents[0].trainer.shapes(), ids)
    rows: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    for server_round in range(config.rounds + 1):
        record = aggregator.publish(server_round)
        peaks: dict[str, float] = {}
        for agent in agents:
            with tracker.segment() as seg:
                agent.poll()
            peaks[agent.silo_id] = seg["peak_MB"]
        aggregator.close(aggregator.collect(record))
        if record.missing or transport.rejected:
            raise RuntimeError(f"round {server_round}: missing {record.missing}, "
                               f"rejected {transport.rejected}")
        if record.final:
            continue
        report = record.aggregation
        assert report is not None
        rounds.append({
            "round": server_round, "aggregation_s": report.seconds,
            "fedavg_s": report.details.get("fedavg_s", report.seconds),
            "assignment_s": report.details.get("assignment_s", 0.0),
        })
        for silo in ids:
            up = transport.sent[("upload", server_round, silo)]
            down = transport.sent[("roundplan", server_round, silo)]
            counts = [len(v) for v in record.assignment[silo].values()]
            rows.append({
                "round": server_round, "silo": silo,
                "experts_per_module": mean(counts) if counts else 0.0,
                "wire_up": record.bytes_up[silo], "wire_down": record.bytes_down[silo],
                "raw_up": up["raw"], "raw_down": down["raw"],
                "train_s": record.timings[silo].get("train_s", math.nan),
                "test_s": record.timings[silo].get("test_s", math.nan),
                "peak_MB": peaks[silo],
                "seal_up_s": up["seal_s"], "open_up_s": up["open_s"],
                "seal_down_s": down["seal_s"], "open_down_s": down["open_s"],
                "metric": record.metrics[silo].get("metric", math.nan),
            })
        # Wire bytes as the aggregator recorded them are the sealed envelopes' lengths.
        assert all(r["wire_up"] == transport.sent[("upload", r["round"], r["silo"])]["wire"]
                   for r in rows)
    memory = tracker.above_baseline_MB()
    summary = {
        "method": method,
        "experts": experts if method == "fedamole" else None,
        "b": config.b if method == "fedamole" else None,
        "memory_MB": memory,
        **summarize(rows, rounds),
        "wall_s": time.perf_counter() - start,
    }
    return {"summary": summary, "rows": rows, "rounds": rounds}


# -- part 2: LLaMA-3.2-1B byte counts ----------------------------------------------------------


def llama_bytes(method: str, sealed_silos: int, keys_dir: Path, profile: Profile
                ) -> dict[str, Any]:
    """Plans and uploads of the strategy's real round-0 plans on LLaMA-3.2-1B's shapes,
    sealed and opened by the real codecs; every silo's messages have the same size."""
    spec = get_strategy(method)
    adapter = spec.adapter(AMoLEConfig(r=LLAMA.r, top_k=LLAMA.top_k,
                                       target_modules=("q_proj", "v_proj")))
    pool = {"num_experts": LLAMA.num_experts, "k_c": LLAMA.k_c, "b": LLAMA.b}
    config = spec.config(name=method, **{k: v for k, v in pool.items()
                                         if k in knob_names(spec.config)})
    server = spec.server(adapter, config, 0)
    ids = silo_ids(LLAMA.silos)
    server.validate(len(ids))
    server.initialize(LLAMA.shapes(), ids)
    parts = server.configure_round(0, ids)
    chosen = ids[:sealed_silos]
    codecs = make_codecs(keys_dir, chosen)
    measured: list[dict[str, Any]] = []
    for silo in chosen:
        part = parts[silo]
        # As `Aggregator.send_plans` builds it (simulation: no `setup`).
        plan = RoundPlan(round=0, silo_id=silo, total_rounds=profile.rounds,
                         lr=SimulationConfig().lr,
                         local_steps=profile.local_steps, assignment=part.assignment,
                         params=part.params, final=False, setup={})
        schema = server.upload_schema(silo, part, final=False)
        upload = Upload(round=0, silo_id=silo, params=zeros_for(schema.params),
                        embeddings=zeros_for(schema.embeddings), n_samples=1234,
                        metrics={"metric": 0.8765432109876543},
                        timings={"train_s": 16.493827160493826, "test_s": 5.7160493827160495})
        counts = [len(v) for v in part.assignment.values()]
        row: dict[str, Any] = {
            "silo": silo, "experts_per_module": mean(counts) if counts else 0.0,
            # the same parameters in a 16-bit dtype (what a bf16/fp16 upload would carry)
            "raw_up_16bit": 2 * sum(math.prod(t.shape) for t in schema.params.values()),
        }
        for name, message, sender, recipient in (("down", plan, AGGREGATOR, silo),
                                                 ("up", upload, silo, AGGREGATOR)):
            sealed = codecs[sender].seal(message)
            opened = codecs[recipient].open(sealed)
            assert type(opened) is type(message)
            if isinstance(opened, Upload):
                check_tensors(opened.params, schema.params, what="llama upload")
                check_tensors(opened.embeddings, schema.embeddings, what="llama upload")
            row[f"raw_{name}"] = raw_bytes(message)
            row[f"encoded_{name}"] = len(protocol.encode(message))
            row[f"wire_{name}"] = len(sealed)
            embeddings = message.embeddings if isinstance(message, Upload) else {}
            row[f"tensors_{name}"] = len(message.params) + len(embeddings)
        measured.append(row)
    first = measured[0]
    same = all(r[k] == first[k] for r in measured for k in ("raw_up", "raw_down"))
    out: dict[str, Any] = {"method": method, "experts": LLAMA.num_experts
                           if method == "fedamole" else None,
                           "silos_in_plan": len(ids), "silos_sealed": len(chosen),
                           "same_raw_size_every_silo": same, "per_silo": measured}
    for name in ("up", "down"):
        for what in ("raw", "encoded", "wire"):
            out[f"{what}_{name}_MB"] = mean([r[f"{what}_{name}"] for r in measured]) / MB
        out[f"max_overhead_{name}"] = max(overhead(r[f"wire_{name}"], r[f"raw_{name}"])
                                          for r in measured)
    out["experts_per_silo_per_module"] = mean([r["experts_per_module"] for r in measured])
    out["raw_up_16bit_MB"] = mean([r["raw_up_16bit"] for r in measured]) / MB
    return out


# -- output -----------------------------------------------------------------------------------


def _f(x: Any, spec: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def _label(s: Mapping[str, Any]) -> str:
    return "FedIT-FT" if s["method"] == "fedit-ft" else f"FedAMoLE (E={s['experts']})"


def _experts(s: Mapping[str, Any]) -> str:
    """Experts per silo per module; FedIT-FT has one plain LoRA per module instead."""
    return "- (one LoRA)" if s["method"] == "fedit-ft" else _f(s["experts_per_silo_per_module"],
                                                                 ".1f")


def targets(report: Mapping[str, Any]) -> dict[str, Any]:
    """The figures the paragraph "against the targets" states, computed from the report."""
    sums = [c["summary"] for c in report["configs"]]
    amole = sorted((s for s in sums if s["method"] == "fedamole"), key=lambda s: s["experts"])
    fedit = next((s for s in sums if s["method"] == "fedit-ft"), None)
    llama = {x["method"]: x for x in report["llama"]}
    out: dict[str, Any] = {}
    over = [llama[m][f"max_overhead_{d}"] for m in llama for d in ("up", "down")]
    out["llama_max_overhead"] = max(over)
    out["llama_within_target"] = max(over) <= TARGET_OVERHEAD
    run_over = [overhead(r["wire_up"], r["raw_up"]) for c in report["configs"]
                for r in c["rows"]] + [overhead(r["wire_down"], r["raw_down"])
                                       for c in report["configs"] for r in c["rows"]]
    out["run_max_overhead"] = max(run_over) if run_over else math.nan
    if "fedamole" in llama:
        out["llama_fedamole_upload_vs_paper"] = (llama["fedamole"]["wire_up_MB"]
                                                 / PAPER["fedamole"]["upload_MB"])
        out["llama_fedamole_download_vs_paper"] = (llama["fedamole"]["wire_down_MB"]
                                                   / PAPER["fedamole"]["download_MB"])
    if "fedit-ft" in llama:
        out["llama_fedit_upload_vs_paper"] = (llama["fedit-ft"]["wire_up_MB"]
                                              / PAPER["fedit-ft"]["upload_MB"])
    if len(amole) >= 2:
        ups = [s["upload_MB"] for s in amole]
        out["upload_grows_with_E"] = all(b > a for a, b in itertools.pairwise(ups))
        out["upload_ratio_last_first"] = ups[-1] / ups[0]
        out["experts_ratio_last_first"] = (amole[-1]["experts_per_silo_per_module"]
                                           / amole[0]["experts_per_silo_per_module"])
    if amole and fedit:
        out["fedamole_over_fedit_upload"] = amole[-1]["upload_MB"] / fedit["upload_MB"]
        out["fedamole_over_fedit_train"] = amole[-1]["train_s"] / fedit["train_s"]
    return out


def to_markdown(report: Mapping[str, Any]) -> str:
    p = report["profile"]
    t = report["targets"]
    lines = [
        "# System overhead benchmark",
        "",
        *stamp_lines(report),
        f"- torch threads: {report['threads']}; model: {report['model']['source']}"
        + (" (SmolLM2-135M-Instruct, Q4_1 GGUF dequantised)"
           if report["model"]["source"] == "smollm2" else "")
        + f", {report['model']['parameters'] / 1e6:.1f} M parameters, "
        f"{report['model']['dtype']}, {_f(report['model']['load_MB'], '.0f')} MB resident "
        f"(RSS growth while loading), {_f(report['model']['load_s'], '.1f')} s",
        "",
        f"## Per silo per round: {p['model']}, {p['data'] or 'synthetic'} data",
        "",
        f"{p['silos']} silos; training rounds: {p['rounds']}, local steps per round: "
        f"{p['local_steps']}, batch {p['batch_size']}, max_length {p['max_length']}, "
        f"{p['eval_limit']} test examples per silo per round, r = 8 on q_proj and v_proj, "
        f"k_c = {K_C}, b = ceil(E k_c / C) (every silo holds E k_c / C experts per module); "
        "every message sealed by its sender's EnvelopeCodec for its recipient. Means over "
        "silos and rounds (aggregation: over rounds).",
        "",
        "| method | experts per silo per module | memory MB | silo round peak MB | upload MB "
        "| download MB | wire / raw (up) | train s | aggregation s (FedAvg + RSEA) | test s |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in report["configs"]:
        s = c["summary"]
        agg = (f"{_f(s['aggregation_s'], '.3f')} ({_f(s['fedavg_s'], '.3f')} + "
               f"{_f(s['assignment_s'], '.3f')})" if s["method"] == "fedamole"
               else _f(s["aggregation_s"], ".3f"))
        lines.append(
            f"| {_label(s)} | {_experts(s)} | "
            f"{_f(s['memory_MB'], '.1f')} | {_f(s['silo_round_peak_MB'], '.1f')} | "
            f"{_f(s['upload_MB'], '.3f')} | {_f(s['download_MB'], '.3f')} | "
            f"{_f(s['wire_over_raw_up'], '.5f')} | {_f(s['train_s'], '.2f')} | {agg} | "
            f"{_f(s['test_s'], '.2f')} |"
        )
    pa, pf = PAPER["fedamole"], PAPER["fedit-ft"]
    lines += [
        f"| paper: FedAMoLE (E=30), LLaMA-3.2-1B, RTX 3090 | - | {pa['memory_MB']:.0f} (GPU) "
        f"| - | {pa['upload_MB']:.2f} | {pa['download_MB']:.2f} | - | {pa['train_s']:.2f} | "
        f"{pa['aggregation_s']:.2f} | {pa['test_s']:.2f} |",
        f"| paper: FedIT-FT, LLaMA-3.2-1B, RTX 3090 | - | - | - | {pf['upload_MB']:.2f} | - | "
        f"- | {pf['train_s']:.2f} | {pf['aggregation_s']:.2f} | - |",
        "",
        "memory MB: the process's peak RSS above its RSS when the configuration started (the "
        "backbone already loaded, so not in it): all silos' adapters and optimiser leftovers, "
        "the aggregator's global adapter and accumulators, sealed messages in flight and one "
        "silo's training activations at a time (silos take turns in this one process). silo "
        "round peak MB: the largest RSS growth during one silo's turn (open the plan, install, "
        "train, test, embed, seal the upload). CPU RSS, not GPU memory, and no backbone: not "
        "comparable to the paper's column. Seconds are CPU seconds of this machine; train s "
        f"covers {p['local_steps']} step(s) of batch {p['batch_size']} (the paper's rounds "
        "are longer), test s the scoring of the test examples. Sealing an upload took "
        + ", ".join(f"{_f(c['summary']['seal_upload_s'], '.3f')} s" for c in report["configs"])
        + " and opening it "
        + ", ".join(f"{_f(c['summary']['open_upload_s'], '.3f')} s" for c in report["configs"])
        + " (same row order; not in train s).",
        "",
        "## LLaMA-3.2-1B shapes: bytes per silo per round",
        "",
        f"{LLAMA.layers} layers, q_proj {LLAMA.hidden} -> {LLAMA.hidden}, v_proj {LLAMA.hidden}"
        f" -> {LLAMA.kv_dim}, r = {LLAMA.r}, float32; {LLAMA.silos} silos in the plan "
        f"(FedAMoLE: E = {LLAMA.num_experts}, k_e = {LLAMA.top_k}, k_c = {LLAMA.k_c}, "
        f"b = {LLAMA.b}), the strategy's real round-0 plans and uploads of zeros with exactly "
        "the tensors its upload schema demands, sealed by the sender's EnvelopeCodec and "
        "opened by the recipient's. No weights are loaded.",
        "",
        "| method | experts per silo per module | raw up MB | encoded up MB | upload MB (sealed) "
        "| paper upload MB | raw down MB | download MB (sealed) | paper download MB | "
        "wire / raw up | wire / raw down |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in report["llama"]:
        paper = PAPER.get(x["method"], {})
        lines.append(
            f"| {_label(x)} | {_experts(x)} | "
            f"{x['raw_up_MB']:.3f} | {x['encoded_up_MB']:.3f} | {x['wire_up_MB']:.3f} | "
            f"{_f(paper.get('upload_MB'))} | {x['raw_down_MB']:.3f} | "
            f"{x['wire_down_MB']:.3f} | {_f(paper.get('download_MB'))} | "
            f"{x['wire_up_MB'] / x['raw_up_MB']:.5f} | "
            f"{x['wire_down_MB'] / x['raw_down_MB']:.5f} |"
        )
    llama = {x["method"]: x for x in report["llama"]}
    para = [
        f"- Framing and encryption: on the LLaMA-3.2-1B shapes the sealed messages are at most "
        f"{100 * t['llama_max_overhead']:.3f} % larger than their raw tensors (target: within "
        f"{100 * TARGET_OVERHEAD:.0f} %: {'met' if t['llama_within_target'] else 'NOT met'}); "
        f"in the federation runs at most {100 * t['run_max_overhead']:.3f} % per message.",
    ]
    if "fedamole" in llama:
        a = llama["fedamole"]
        para.append(
            f"- FedAMoLE (E=30) on LLaMA-3.2-1B: {a['wire_up_MB']:.2f} MB up and "
            f"{a['wire_down_MB']:.2f} MB down per silo per round with "
            f"{a['experts_per_silo_per_module']:.1f} experts per module, "
            f"{100 * t['llama_fedamole_upload_vs_paper']:.1f} % and "
            f"{100 * t['llama_fedamole_download_vs_paper']:.1f} % of the paper's "
            f"{PAPER['fedamole']['upload_MB']} and {PAPER['fedamole']['download_MB']} MB; "
            "the download lacks only the embeddings."
        )
    if "fedit-ft" in llama:
        f = llama["fedit-ft"]
        para.append(
            f"- FedIT-FT on LLaMA-3.2-1B: {f['wire_up_MB']:.2f} MB in float32, "
            f"{t['llama_fedit_upload_vs_paper']:.2f} x the paper's "
            f"{PAPER['fedit-ft']['upload_MB']} MB; the same tensors in 16 bits would be "
            f"{f['raw_up_16bit_MB']:.2f} MB ({f['raw_up_16bit_MB'] * MB / 2**20:.2f} MiB)."
        )
    if "upload_ratio_last_first" in t:
        grows = "grows" if t["upload_grows_with_E"] else "does not grow"
        para.append(
            f"- In the run, FedAMoLE's upload {grows} with E: "
            f"x{t['upload_ratio_last_first']:.2f} from the smallest to the "
            f"largest E, with x{t['experts_ratio_last_first']:.2f} experts per silo (here each "
            f"silo holds E k_c / C of them; in the LLaMA-3.2-1B table {LLAMA.silos} silos share "
            f"E = {LLAMA.num_experts} and each holds k_e = {LLAMA.top_k} per module)."
        )
    if "fedamole_over_fedit_upload" in t:
        para.append(
            f"- At the largest E, FedAMoLE uploads {t['fedamole_over_fedit_upload']:.1f} x and "
            f"trains {t['fedamole_over_fedit_train']:.2f} x as long as FedIT-FT per round "
            f"(paper: {PAPER['fedamole']['upload_MB'] / PAPER['fedit-ft']['upload_MB']:.1f} x "
            f"and {PAPER['fedamole']['train_s'] / PAPER['fedit-ft']['train_s']:.2f} x)."
        )
    lines += ["", "## Against the targets", "", *para, ""]
    return "\n".join(lines)


def plot(report: Mapping[str, Any], path: Path) -> None:
    sums = [c["summary"] for c in report["configs"]]
    amole = sorted((s for s in sums if s["method"] == "fedamole"), key=lambda s: s["experts"])
    fedit = next((s for s in sums if s["method"] == "fedit-ft"), None)
    fig, (ax_mb, ax_s) = plt.subplots(1, 2, figsize=(10, 4))
    es = [s["experts"] for s in amole]
    for ax, keys in ((ax_mb, (("upload_MB", "upload"), ("download_MB", "download"))),
                     (ax_s, (("train_s", "train"), ("test_s", "test"),
                             ("aggregation_s", "aggregation")))):
        for i, (key, label) in enumerate(keys):
            color = f"C{i}"
            ax.plot(es, [s[key] for s in amole], "o-", color=color, label=f"FedAMoLE {label}")
            if fedit is not None:
                ax.axhline(fedit[key], color=color, ls="--", lw=1, label=f"FedIT-FT {label}")
        ax.set_xticks(es)
        ax.set_xlabel("experts per module (E)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ax_mb.set_ylabel("MB per silo per round (sealed)")
    ax_s.set_ylabel("seconds per silo per round (aggregation: per round)")
    p = report["profile"]
    fig.suptitle(f"System overhead: {p['model']}, {p['silos']} silos, encryption on")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Memory, sealed bytes and seconds per silo per round for FedIT-FT and "
        "FedAMoLE (the paper's Table IV), plus LLaMA-3.2-1B byte counts.")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                        help="quick: SmolLM2-135M on AG News, ~8 min (estimate); smoke: "
                        "builtin:tiny, synthetic data, seconds (default %(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for overhead.json/.md/.png (default benchmarks/results; "
                        "required with --profile smoke)")
    parser.add_argument("--experts", type=_ints, default=None,
                        help="comma-separated E values for FedAMoLE (profile: 15,20,25,30)")
    parser.add_argument("--silos", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--local-steps", type=int, default=None)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--llama-silos", type=int, default=None,
                        help=f"LLaMA silos whose messages are sealed, 1..{LLAMA.silos} "
                        "(quick: all; smoke: 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    if args.profile == "smoke" and args.out is None:
        parser.error("--profile smoke needs --out (it never writes benchmarks/results)")
    overrides = {k: v for k, v in {
        "experts": args.experts, "silos": args.silos, "rounds": args.rounds,
        "local_steps": args.local_steps, "eval_limit": args.eval_limit,
        "llama_silos": args.llama_silos, "threads": args.threads}.items() if v is not None}
    args.resolved = replace(PROFILES[args.profile], **overrides)
    r = args.resolved
    if min(r.silos, r.rounds, r.local_steps, r.eval_limit, r.threads) < 1:
        parser.error("--silos, --rounds, --local-steps, --eval-limit, --threads must be >= 1")
    if not 1 <= r.llama_silos <= LLAMA.silos:
        parser.error(f"--llama-silos must be in 1..{LLAMA.silos}")
    args.out = args.out or RESULTS
    return args


def _progress(text: str) -> None:
    print(text, flush=True)


def run(profile: Profile, progress: Callable[[str], None] = _progress) -> dict[str, Any]:
    methods = [("fedit-ft", 0)] + [("fedamole", e) for e in profile.experts]
    first = sim_config(profile, *methods[0])
    release_free_memory()
    rss0, start = status_kb("VmRSS"), time.perf_counter()
    loaded = load_model(first.model, dtype=first.dtype, seed=first.seed)
    model = {"source": loaded.source, "dtype": str(loaded.dtype).replace("torch.", ""),
             "load_s": time.perf_counter() - start,
             "load_MB": (status_kb("VmRSS") - rss0) * 1024 / MB,
             "parameters": sum(p.numel() for p in loaded.model.parameters())}
    datasets = build_silo_data(first)  # identical for every configuration (same seed)
    configs = []
    with tempfile.TemporaryDirectory(prefix="fedsilo-overhead-") as tmp:
        warm_up(profile, loaded, datasets, Path(tmp))
        release_free_memory()
        for i, (method, experts) in enumerate(methods):
            result = run_config(profile, method, experts, loaded, datasets,
                                Path(tmp) / f"keys-{i}")
            s = result["summary"]
            progress(f"{_label(s):>20}: memory {s['memory_MB']:.1f} MB, up "
                     f"{s['upload_MB']:.3f} MB, down {s['download_MB']:.3f} MB, train "
                     f"{s['train_s']:.2f} s, aggregation {s['aggregation_s']:.3f} s, test "
                     f"{s['test_s']:.2f} s ({s['wall_s']:.0f} s)")
            configs.append(result)
            release_free_memory()
        del loaded
        release_free_memory()
        llama = []
        for i, method in enumerate(("fedit-ft", "fedamole")):
            x = llama_bytes(method, profile.llama_silos, Path(tmp) / f"llama-{i}", profile)
            progress(f"LLaMA-3.2-1B {_label(x):>20}: up {x['wire_up_MB']:.3f} MB "
                     f"(raw {x['raw_up_MB']:.3f}), down {x['wire_down_MB']:.3f} MB "
                     f"(raw {x['raw_down_MB']:.3f})")
            llama.append(x)
    return {"model": model, "configs": configs, "llama": llama}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    profile: Profile = args.resolved
    threads = torch.get_num_threads()
    torch.set_num_threads(profile.threads)
    try:
        started = time.perf_counter()
        results = run(profile)
    finally:
        torch.set_num_threads(threads)
    report: dict[str, Any] = {
        "benchmark": NAME,
        "command": command_line("overhead.py", argv),
        "git": git_info(BENCHED_CODE),
        "date": now(),
        "machine": machine(("torch", "transformers", "cryptography", "safetensors")),
        "profile_name": args.profile,
        "profile": asdict(profile),
        "threads": profile.threads,
        "wall_s": time.perf_counter() - started,
        "paper": PAPER,
        "llama_shapes": asdict(LLAMA),
        **results,
    }
    report["targets"] = targets(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{NAME}.md").write_text(to_markdown(report))
    plot(report, args.out / f"{NAME}.png")
    print(f"wrote {args.out}/{NAME}.json, .md, .png ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
