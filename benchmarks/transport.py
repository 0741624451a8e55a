"""Transport benchmark: one round's uploads for C silos through the real RabbitMQ broker.

    python benchmarks/transport.py                       # LLaMA-3.2-1B uploads, C = 10, 50, 100
    python benchmarks/transport.py --silos 10 --publishers 2
    python benchmarks/transport.py --smoke --out-json /tmp/t.json --out-md /tmp/t.md   # CI

What one run (one value of C) does:

1. Creates a fresh vhost on the broker (`rabbitmqctl add_vhost` + `set_permissions`), and
   deletes it afterwards, so nothing is left on the broker (`--vhost url` uses the vhost of
   `--url` as is instead: the test suite's throw-away vhost).
2. Starts one aggregator process and `--publishers` publisher processes (spawned, each with
   its own `AmqpTransport`, as silos are separate machines). Publishers build their silos'
   uploads before the start signal, so tensor creation is not timed; `send_upload` (encode +
   chunking + publisher confirms) is.
3. The aggregator does what the real one does with an upload: `receive_upload`, fold the
   params into a `RunningMean` (streaming FedAvg) and the expert embeddings into another,
   keep the client embeddings, `ack`. It records the time of the last fold and its own
   resident memory: the peak (VmHWM, reset via /proc/self/clear_refs once it is connected)
   minus the baseline (VmRSS at that moment), and VmRSS after every fold.
4. Reports wall time from the first publish to the last fold, MB/s (encoded wire bytes /
   wall time; MB = 10^6 bytes), the publish window alone (first publish to last confirm),
   the aggregator's peak memory above its baseline, the size of its accumulators (bounded
   by the global adapter, not by C), and, where the broker runs on this machine, the broker
   process's CPU seconds and bytes written to disk during the run.

`--mode phased` publishes everything first and lets the aggregator drain the queue only
afterwards: the publish window then measures broker ingest alone, the drain the consumer.

Upload of the default profile (FedAMoLE on LLaMA-3.2-1B, r=8, q_proj and v_proj adapted in
16 layers, E=30 experts per module): per module the shared expert A (r x d_in) and B
(d_out x r), the router W_t (r x d_in), `--experts-per-silo` domain experts' A and B (the
silo's assignment), the client embedding (r) and one embedding (r) per held expert. The
default of 2 experts per module is k_e (= routing top-k = 2), the least a silo holds, and
what every silo holds once C * k_e >= E * k_c (30 silos with the defaults k_c=2; 50 and 100
silos need k_c >= 4 and >= 7, and leave each silo about 2 experts per module); it gives
12.4 MB per silo, the issue's "about 12.5 MB" (3 experts would be 15.7 MB). Tensors are
float32 random normals (the content does not matter: nothing is compressed). The upload
size is held fixed as C grows, so C is the only variable.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import queue
import statistics
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import torch

from fedsilo.sdk.aggregation.fedavg import RunningMean
from fedsilo.sdk.messages import Upload
from fedsilo.sdk.params import (
    ModuleShape,
    TensorDict,
    client_embedding_key,
    expert_embedding_key,
    expert_key,
    parse_expert_embedding,
    parse_expert_param,
    router_key,
    shared_key,
)
from fedsilo.sdk.protocol import decode, encode, tensor_bytes
from fedsilo.sdk.transport.amqp import AmqpTransport
from fedsilo.sdk.transport.amqp_connection import mask_url

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import reset_peak_rss, status_kb
from stamp import RESULTS, command_line, git_info, machine, now, run_quietly

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
MB = 1e6
#: What the measured path runs through: uncommitted changes here are stamped on the results.
BENCHED_CODE = (
    "sdk/transport",
    "sdk/protocol.py",
    "sdk/messages.py",
    "sdk/params.py",
    "sdk/aggregation/fedavg.py",
    "benchmarks/transport.py",
)


# -- the upload -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    name: str
    model: str
    layers: int
    hidden: int
    kv_dim: int  # v_proj output: KV heads x head dim (grouped-query attention)
    r: int
    num_experts: int  # E per module
    experts_per_silo: int  # domain experts per module in each silo's upload

    def shapes(self) -> dict[str, ModuleShape]:
        out: dict[str, ModuleShape] = {}
        for i in range(self.layers):
            out[f"model.layers.{i}.self_attn.q_proj"] = ModuleShape(self.hidden, self.hidden)
            out[f"model.layers.{i}.self_attn.v_proj"] = ModuleShape(self.hidden, self.kv_dim)
        return out


PROFILES = {
    # LLaMA-3.2-1B: hidden 2048, 16 layers, 32 query heads, 8 KV heads x 64 (v_proj -> 512).
    "llama-3.2-1b": Profile("llama-3.2-1b", "meta-llama/Llama-3.2-1B", 16, 2048, 512, 8, 30, 2),
    "smoke": Profile("smoke", "tiny (CI smoke)", 2, 64, 16, 4, 6, 2),
}


def assigned_experts(profile: Profile, silo: int, module: int) -> list[int]:
    """Expert ids silo `silo` holds in module `module`: consecutive ids from a start that
    moves with the silo and the module, so uploads cover the whole pool (as RSEA does)."""
    start = (silo * profile.experts_per_silo + module) % profile.num_experts
    return [(start + j) % profile.num_experts for j in range(profile.experts_per_silo)]


def make_templates(profile: Profile, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Per module, one tensor per upload slot. Every silo sends these values (under its own
    expert ids), so the aggregated shared tensors must equal the template: the check."""
    g = torch.Generator().manual_seed(seed)
    r = profile.r
    out: dict[str, dict[str, torch.Tensor]] = {}
    for module, shape in profile.shapes().items():
        slots = {
            "shared.A": torch.randn(r, shape.in_features, generator=g),
            "shared.B": torch.randn(shape.out_features, r, generator=g),
            "router": torch.randn(r, shape.in_features, generator=g),
            "client": torch.randn(r, generator=g),
        }
        for j in range(profile.experts_per_silo):
            slots[f"expert{j}.A"] = torch.randn(r, shape.in_features, generator=g)
            slots[f"expert{j}.B"] = torch.randn(shape.out_features, r, generator=g)
            slots[f"emb{j}"] = torch.randn(r, generator=g)
        out[module] = slots
    return out


def silo_id(index: int) -> str:
    return f"silo-{index:03d}"


def build_upload(
    profile: Profile, templates: dict[str, dict[str, torch.Tensor]], silo: int
) -> Upload:
    params: TensorDict = {}
    embeddings: TensorDict = {}
    for m, module in enumerate(profile.shapes()):
        t = templates[module]
        params[shared_key(module, "A")] = t["shared.A"]
        params[shared_key(module, "B")] = t["shared.B"]
        params[router_key(module)] = t["router"]
        embeddings[client_embedding_key(module)] = t["client"]
        for j, eid in enumerate(assigned_experts(profile, silo, m)):
            params[expert_key(module, eid, "A")] = t[f"expert{j}.A"]
            params[expert_key(module, eid, "B")] = t[f"expert{j}.B"]
            embeddings[expert_embedding_key(module, eid)] = t[f"emb{j}"]
    return Upload(
        round=1,
        silo_id=silo_id(silo),
        params=params,
        embeddings=embeddings,
        n_samples=1000 + silo,
        metrics={"loss": 1.0, "personalized_acc": 0.5},
        timings={"train_s": 60.0},
    )


def payload_sizes(profile: Profile) -> dict[str, Any]:
    upload = build_upload(profile, make_templates(profile), 0)
    raw_params = tensor_bytes(upload.params)
    raw_emb = tensor_bytes(upload.embeddings)
    wire = len(encode(upload))
    raw = raw_params + raw_emb
    return {
        "tensors": len(upload.params) + len(upload.embeddings),
        "raw_params_bytes": raw_params,
        "raw_embeddings_bytes": raw_emb,
        "raw_bytes": raw,
        "wire_bytes": wire,
        "overhead_pct": 100.0 * (wire - raw) / raw,
    }


# -- memory and broker probes ---------------------------------------------------------------


def broker_pid(url: str) -> int | None:
    """PID of the broker's Erlang VM when it runs on this machine (for its CPU and disk I/O)."""
    host = urlsplit(url).hostname or "localhost"
    if host not in ("127.0.0.1", "localhost", "::1"):
        return None
    out = run_quietly(["rabbitmqctl", "eval", "os:getpid()."])
    try:
        pid = int(out.strip().strip('"'))
    except (AttributeError, ValueError):
        return None
    return pid if os.path.exists(f"/proc/{pid}") else None


def broker_alarms(pid: int | None) -> str | None:
    """The broker's active resource alarms ("" when none; None when not asked: remote)."""
    if pid is None:
        return None
    out = run_quietly(["rabbitmqctl", "eval", "rabbit_alarm:get_alarms()."])
    return None if out is None else ("" if out.strip() == "[]" else out.strip())


def broker_counters(pid: int | None) -> dict[str, float] | None:
    """The broker VM's CPU seconds and bytes written to storage so far (None if unreadable)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        io: dict[str, int] = {}
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                key, value = line.split(":")
                io[key] = int(value)
        return {"cpu_s": cpu, "write_bytes": io["write_bytes"], "read_bytes": io["read_bytes"]}
    except (OSError, ValueError, IndexError, KeyError):
        return None


# -- worker processes -----------------------------------------------------------------------


class _Warnings(logging.Handler):
    """Keeps the transport's warnings (e.g. "broker blocked publishing"): they go into the
    results, since they mean the run was disturbed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.messages) < 20:
            self.messages.append(f"{record.name}: {record.getMessage()}")


def _quiet() -> _Warnings:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pika").setLevel(logging.ERROR)
    warnings = _Warnings()
    logging.getLogger("fedsilo").addHandler(warnings)
    # Two cores shared by the broker, the aggregator and the publishers: one torch thread
    # each, so OpenMP spinning does not steal CPU from the broker.
    torch.set_num_threads(1)
    return warnings


def publisher_main(
    index: int,
    url: str,
    profile: Profile,
    silos: list[int],
    chunk_size: int,
    events: mp.Queue,
    go: Any,
) -> None:
    try:
        warnings = _quiet()
        templates = make_templates(profile)
        uploads = [build_upload(profile, templates, s) for s in silos]
        transport = AmqpTransport(url, silo_id(silos[0]), chunk_size=chunk_size)
        events.put(("ready", f"publisher-{index}", None))
        go.wait()
        sends = []
        for upload in uploads:
            start = time.monotonic()
            size = transport.send_upload(upload)
            sends.append((start, time.monotonic(), size))
        transport.close()
        events.put(
            (
                "publisher",
                f"publisher-{index}",
                {
                    "first_start": sends[0][0],
                    "last_end": sends[-1][1],
                    "bytes": sum(s[2] for s in sends),
                    "send_s": [end - start for start, end, _ in sends],
                    "warnings": warnings.messages,
                },
            )
        )
    except BaseException:
        events.put(("error", f"publisher-{index}", traceback.format_exc()))


def _warm_up(profile: Profile) -> None:
    """Touch once, before the baseline, the code an upload goes through (decode, fold), so
    the pages of lazily loaded kernels count in the baseline and not as per-upload memory."""
    tiny = Profile(**{**asdict(profile), "layers": 1, "hidden": 8, "kv_dim": 8})
    upload = decode(encode(build_upload(tiny, make_templates(tiny), 0)))
    assert isinstance(upload, Upload)
    mean = RunningMean()
    mean.add(upload.params, 1.0)
    mean.add(upload.params, 1.0)
    mean.result()


def aggregator_main(
    url: str,
    profile: Profile,
    expected: int,
    chunk_size: int,
    timeout: float,
    events: mp.Queue,
    consume: Any,
) -> None:
    try:
        warnings = _quiet()
        transport = AmqpTransport(url, "aggregator", chunk_size=chunk_size)
        events.put(("ready", "aggregator", None))
        _warm_up(profile)
        consume.wait()
        peak_reset = reset_peak_rss()
        baseline_kb = status_kb("VmRSS")
        consume_start = time.monotonic()
        params, expert_emb = RunningMean(), RunningMean()
        clients: dict[str, TensorDict] = {}
        deadline = time.monotonic() + timeout
        first = None
        received = 0
        wire = 0
        fold_s = 0.0
        rss_kb: list[int] = []
        done_at: list[float] = []  # seconds after consume_start at which each fold ended
        while received < expected:
            delivery = transport.receive_upload(timeout=max(0.0, deadline - time.monotonic()))
            if delivery is None:
                raise TimeoutError(f"only {received} of {expected} uploads within {timeout}s")
            if first is None:
                first = time.monotonic()
            upload = delivery.message
            if not isinstance(upload, Upload):
                raise TypeError(f"unexpected {type(upload).__name__} on the uploads queue")
            start = time.monotonic()
            params.add(upload.params, 1.0)
            experts, client = {}, {}
            for key, value in upload.embeddings.items():
                (experts if parse_expert_embedding(key) is not None else client)[key] = value
            expert_emb.add(experts)
            clients[upload.silo_id] = client
            delivery.ack()
            fold_s += time.monotonic() - start
            received += 1
            wire += delivery.size
            del delivery, upload, experts, client
            rss_kb.append(status_kb("VmRSS"))
            done_at.append(time.monotonic() - consume_start)
        last = time.monotonic()
        peak_kb = status_kb("VmHWM")
        transport.close()

        result = params.result()
        emb = expert_emb.result()
        module0 = next(iter(profile.shapes()))
        expert_contribs = sum(
            params.contributors(k) for k in result if parse_expert_param(k) is not None
        )
        events.put(
            (
                "aggregator",
                "aggregator",
                {
                    "warnings": warnings.messages,
                    "consume_start": consume_start,
                    "first_delivery": first,
                    "last_fold": last,
                    "received": received,
                    "bytes": wire,
                    "fold_s": fold_s,
                    "peak_reset": peak_reset,
                    "baseline_kb": baseline_kb,
                    "peak_kb": peak_kb,
                    "rss_kb": rss_kb,
                    "done_at": done_at,
                    "accumulator_bytes": tensor_bytes(result) + tensor_bytes(emb),
                    "shared_contributors": params.contributors(shared_key(module0, "A")),
                    "expert_contributions": expert_contribs,
                    "check": result[shared_key(module0, "A")].tolist(),  # plain data over the pipe
                },
            )
        )
    except BaseException:
        events.put(("error", "aggregator", traceback.format_exc()))


# -- orchestration --------------------------------------------------------------------------


def _rabbitmqctl(*args: str) -> str:
    """`rabbitmqctl args`'s stdout; RuntimeError (with its stderr) if it is missing or fails."""
    cmd = ["rabbitmqctl", *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {exc}") from None
    if out.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {out.stderr.strip()}")
    return out.stdout


class Vhost:
    """A fresh vhost for one run (deleted on exit), or the URL's own vhost when `fresh` is
    False."""

    def __init__(self, base_url: str, fresh: bool) -> None:
        self.base_url = base_url
        self.fresh = fresh
        self.name: str | None = None

    def __enter__(self) -> str:
        if not self.fresh:
            return self.base_url
        parts = urlsplit(self.base_url)
        user = unquote(parts.username or "guest")
        self.name = f"fedsilo-bench-{uuid.uuid4().hex[:12]}"
        _rabbitmqctl("add_vhost", self.name)
        try:
            _rabbitmqctl("set_permissions", "-p", self.name, user, ".*", ".*", ".*")
        except BaseException:
            self.__exit__()
            raise
        return urlunsplit((parts.scheme, parts.netloc, "/" + quote(self.name, safe=""), "", ""))

    def __exit__(self, *exc: object) -> None:
        if self.name is not None:
            run_quietly(["rabbitmqctl", "delete_vhost", self.name])
            self.name = None


def _collect(
    events: mp.Queue, procs: list[Any], kinds: set[str], count: int, timeout: float
) -> dict[str, Any]:
    """`count` events of the given kinds; raises on a worker's error, death or the timeout."""
    got: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while len(got) < count:
        try:
            kind, who, payload = events.get(timeout=1.0)
        except queue.Empty:
            dead = [p.name for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"worker(s) died without reporting: {dead}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout}s for {kinds}; got {sorted(got)}") from None
            continue
        if kind == "error":
            raise RuntimeError(f"{who} failed:\n{payload}")
        if kind in kinds:
            got[who] = payload
    return got


def run_once(
    url: str,
    profile: Profile,
    silos: int,
    publishers: int,
    chunk_size: int,
    mode: str,
    timeout: float,
    broker: int | None,
) -> dict[str, Any]:
    load = os.getloadavg()
    ctx = mp.get_context("spawn")
    events: mp.Queue = ctx.Queue()
    go, consume = ctx.Event(), ctx.Event()
    publishers = max(1, min(publishers, silos))
    groups = [list(range(silos))[k::publishers] for k in range(publishers)]
    agg = ctx.Process(
        target=aggregator_main,
        args=(url, profile, silos, chunk_size, timeout, events, consume),
        name="aggregator",
    )
    pubs = [
        ctx.Process(
            target=publisher_main,
            args=(k, url, profile, group, chunk_size, events, go),
            name=f"publisher-{k}",
        )
        for k, group in enumerate(groups)
    ]
    procs = [agg, *pubs]
    try:
        agg.start()
        _collect(events, procs, {"ready"}, 1, 300)  # topology declared by the aggregator
        for p in pubs:
            p.start()
        _collect(events, procs, {"ready"}, len(pubs), 600)
        alarms_before = broker_alarms(broker)
        before = broker_counters(broker)
        if mode == "concurrent":
            consume.set()
        go.set()
        pub_results = _collect(events, procs, {"publisher"}, len(pubs), timeout)
        consume.set()
        agg_result = _collect(events, procs, {"aggregator"}, 1, timeout)["aggregator"]
        after = broker_counters(broker)
        alarms_after = broker_alarms(broker)
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)

    pub_start = min(r["first_start"] for r in pub_results.values())
    pub_end = max(r["last_end"] for r in pub_results.values())
    published = sum(r["bytes"] for r in pub_results.values())
    send_s = [s for r in pub_results.values() for s in r["send_s"]]
    wire = agg_result["bytes"]
    wall = agg_result["last_fold"] - pub_start
    publish = pub_end - pub_start
    drain = agg_result["last_fold"] - max(agg_result["consume_start"], pub_start)
    # Steady state: the second half of the uploads, once the accumulators exist (the first
    # uploads also allocate them) and, in phased mode, with a full queue to drain.
    done_at = agg_result["done_at"]
    half = len(done_at) // 2
    steady = (
        (len(done_at) - 1 - half) * wire / silos / MB / (done_at[-1] - done_at[half])
        if len(done_at) >= 4 and done_at[-1] > done_at[half]
        else None
    )
    baseline_mb = agg_result["baseline_kb"] * 1024 / MB
    peak_mb = agg_result["peak_kb"] * 1024 / MB
    accumulator_mb = agg_result["accumulator_bytes"] / MB
    rss_mb = [kb * 1024 / MB for kb in agg_result["rss_kb"]]
    expected_experts = silos * profile.experts_per_silo * 2 * len(profile.shapes())
    template = make_templates(profile)[next(iter(profile.shapes()))]["shared.A"]
    check = {
        "uploads_received": agg_result["received"] == silos,
        "bytes_match": wire == published,
        "shared_contributors": agg_result["shared_contributors"] == silos,
        "expert_contributions": agg_result["expert_contributions"] == expected_experts,
        "mean_equals_upload": bool(
            torch.allclose(torch.tensor(agg_result["check"]), template, atol=1e-5)
        ),
    }
    out: dict[str, Any] = {
        "silos": silos,
        "load_avg_1m_before": round(load[0], 2),
        "publishers": publishers,
        "mode": mode,
        "wire_bytes": wire,
        "wall_s": wall,
        "throughput_MBps": wire / MB / wall,
        "publish_s": publish,
        "publish_MBps": published / MB / publish,
        "drain_s": drain,
        "drain_MBps": wire / MB / drain,
        "drain_second_half_MBps": steady,
        "aggregator_lag_s": agg_result["last_fold"] - pub_end,
        "send_upload_s": {
            "mean": sum(send_s) / len(send_s),
            "min": min(send_s),
            "max": max(send_s),
        },
        "fold_s_total": agg_result["fold_s"],
        "fold_ms_per_upload": 1000 * agg_result["fold_s"] / silos,
        "aggregator_baseline_rss_MB": baseline_mb,
        "aggregator_peak_rss_MB": peak_mb,
        "aggregator_peak_minus_baseline_MB": peak_mb - baseline_mb,
        "aggregator_accumulator_MB": accumulator_mb,
        "aggregator_working_MB": peak_mb - baseline_mb - accumulator_mb,
        "aggregator_peak_is_reset": agg_result["peak_reset"],
        "aggregator_rss_after_fold_MB": [round(v, 1) for v in rss_mb],
        "aggregator_fold_done_s": [round(v, 3) for v in done_at],
        "check": check,
        "ok": all(check.values()),
        # Anything that disturbed the run: broker alarms (memory, disk) around it and the
        # transport's warnings in the workers (e.g. publishing blocked by an alarm).
        "broker_alarms": [a for a in (alarms_before, alarms_after) if a],
        "warnings": [w for r in [*pub_results.values(), agg_result] for w in r["warnings"]],
    }
    if before is not None and after is not None:
        out["broker"] = {
            "cpu_s": after["cpu_s"] - before["cpu_s"],
            "disk_write_MB": (after["write_bytes"] - before["write_bytes"]) / MB,
            "disk_read_MB": (after["read_bytes"] - before["read_bytes"]) / MB,
        }
    return out


# -- stamping and output --------------------------------------------------------------------


def broker_machine() -> dict[str, Any]:
    """The machine (stamp.machine, with torch and pika) and the broker's RabbitMQ version."""
    info = machine(("torch", "pika"))
    rabbit = run_quietly(["rabbitmqctl", "version"])
    info["rabbitmq"] = rabbit.strip() if rabbit else "unknown"
    return info


def masked_command_line(argv: Sequence[str]) -> str:
    """stamp.command_line, with the password in `--url` masked: never written to results."""
    args = list(argv)
    for i, arg in enumerate(args):
        if i > 0 and args[i - 1] == "--url":
            args[i] = mask_url(arg)
        elif arg.startswith("--url="):
            args[i] = "--url=" + mask_url(arg[len("--url="):])
    return command_line("transport.py", args)


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per silo count: median throughput (and its range over repeats), the largest memory."""
    out = []
    keys = dict.fromkeys((r["mode"], r["silos"]) for r in runs)  # in run order
    for mode, c in keys:
        rs = [r for r in runs if r["silos"] == c and r["mode"] == mode]
        out.append(
            {
                "mode": mode,
                "silos": c,
                "repeats": len(rs),
                "wire_MB": rs[0]["wire_bytes"] / MB,
                "wall_s_median": statistics.median(r["wall_s"] for r in rs),
                "throughput_MBps_median": statistics.median(r["throughput_MBps"] for r in rs),
                "throughput_MBps_min": min(r["throughput_MBps"] for r in rs),
                "throughput_MBps_max": max(r["throughput_MBps"] for r in rs),
                "publish_MBps_median": statistics.median(r["publish_MBps"] for r in rs),
                "drain_MBps_median": statistics.median(r["drain_MBps"] for r in rs),
                "aggregator_peak_minus_baseline_MB_max": max(
                    r["aggregator_peak_minus_baseline_MB"] for r in rs
                ),
                "aggregator_accumulator_MB": max(r["aggregator_accumulator_MB"] for r in rs),
                "aggregator_working_MB_max": max(r["aggregator_working_MB"] for r in rs),
                "ok": all(r["ok"] for r in rs),
            }
        )
    return out


def _disturbed(run: dict[str, Any]) -> str:
    parts = (["alarm"] if run["broker_alarms"] else []) + (
        [f"{len(run['warnings'])} warnings"] if run["warnings"] else []
    )
    return ", ".join(parts) or "no"


def to_markdown(report: dict[str, Any]) -> str:
    m, p, s = report["machine"], report["profile"], report["payload"]
    lines = [
        "# Transport benchmark",
        "",
        f"- command: `{report['command']}`",
        f"- commit: `{report['git']['commit']}`"
        + (
            f" (in {', '.join(report['git']['uncommitted_changes'])})"
            if report["git"]["uncommitted_changes"]
            else ""
        ),
        f"- date: {report['date']}",
        f"- machine: {m['cpu_model']}, {m['cpu_count']} CPUs, {m['ram_GB']} GB RAM; "
        f"RabbitMQ {m['rabbitmq']} (broker on {report['broker_host']})",
        f"- versions: python {m['python']}, torch {m['torch']}, pika {m['pika']}",
        f"- modes: {', '.join(report['modes'])}; chunk size {report['chunk_size'] / 2**20:g} MiB, "
        "quorum queues, persistent messages, publisher confirms",
        "",
        f"Upload per silo ({p['name']}: {p['layers']} layers x q_proj/v_proj, hidden "
        f"{p['hidden']}, v_proj out {p['kv_dim']}, r={p['r']}, {p['experts_per_silo']} of "
        f"E={p['num_experts']} experts per module, fp32):",
        "",
        "| tensors | raw params MB | raw embeddings MB | raw total MB | wire MB | overhead |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {s['tensors']} | {s['raw_params_bytes'] / MB:.3f} | "
        f"{s['raw_embeddings_bytes'] / MB:.3f} | {s['raw_bytes'] / MB:.3f} | "
        f"{s['wire_bytes'] / MB:.3f} | {s['overhead_pct']:.2f} % |",
        "",
        f"Summary over {report['repeats']} repeat(s) per silo count (median; range in "
        "brackets; memory: the largest of the repeats):",
        "",
        "| mode | silos | wire MB | wall s | MB/s | publish MB/s | drain MB/s | "
        "agg. peak - baseline MB | accumulators MB | agg. working MB | check |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for x in report["summary"]:
        lines.append(
            f"| {x['mode']} | {x['silos']} | {x['wire_MB']:.1f} | {x['wall_s_median']:.2f} | "
            f"{x['throughput_MBps_median']:.1f} [{x['throughput_MBps_min']:.1f}-"
            f"{x['throughput_MBps_max']:.1f}] | {x['publish_MBps_median']:.1f} | "
            f"{x['drain_MBps_median']:.1f} | {x['aggregator_peak_minus_baseline_MB_max']:.1f} | "
            f"{x['aggregator_accumulator_MB']:.1f} | {x['aggregator_working_MB_max']:.1f} | "
            f"{'ok' if x['ok'] else 'FAILED'} |"
        )
    lines += [
        "",
        "Every run:",
        "",
        "| mode | silos | # | load 1m | wall s | MB/s | publish s | publish MB/s | drain MB/s | "
        "agg. lag s | fold ms/upload | agg. peak - baseline MB | accumulators MB | "
        "agg. working MB | broker CPU s | broker disk write MB | disturbed | check |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"
        ":---:|",
    ]
    for r in report["runs"]:
        b = r.get("broker") or {}
        lines.append(
            f"| {r['mode']} | {r['silos']} | {r['repeat']} | {r['load_avg_1m_before']:.1f} | "
            f"{r['wall_s']:.2f} | {r['throughput_MBps']:.1f} | {r['publish_s']:.2f} | "
            f"{r['publish_MBps']:.1f} | {r['drain_MBps']:.1f} | {r['aggregator_lag_s']:.2f} | "
            f"{r['fold_ms_per_upload']:.1f} | {r['aggregator_peak_minus_baseline_MB']:.1f} | "
            f"{r['aggregator_accumulator_MB']:.1f} | {r['aggregator_working_MB']:.1f} | "
            f"{b.get('cpu_s', float('nan')):.1f} | {b.get('disk_write_MB', float('nan')):.0f} | "
            f"{_disturbed(r)} | {'ok' if r['ok'] else 'FAILED'} |"
        )
    notes = sorted({w for r in report["runs"] for w in r["warnings"] + r["broker_alarms"]})
    if notes:
        lines += ["", "Disturbances (broker alarms, transport warnings):", ""]
        lines += [f"- `{n}`" for n in notes]
    lines += [
        "",
        f"{report['runs'][0]['publishers']} publisher processes. MB = 10^6 bytes. wall: first "
        "publish to last fold; MB/s: wire bytes / wall. publish: first publish to last confirm "
        "(all publishers). drain: the aggregator's bytes / (last fold - the later of first "
        "publish and its start; in phased mode it starts when all is published). agg. lag: "
        "last confirm to last fold. load 1m: the machine's load average before the run. "
        "agg. peak - baseline: the aggregator process's VmHWM (reset once connected) minus its "
        "VmRSS then; accumulators: the RunningMean sums it holds (bounded by the global adapter: "
        "shared, W_t and every expert some silo sent); working = peak - baseline - accumulators "
        "(decoded uploads and chunks in flight). broker: the RabbitMQ VM's CPU seconds and bytes "
        "written to disk during the run (whole broker: other vhosts' traffic counts too).",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time one round's uploads for C silos through RabbitMQ, with the "
        "aggregator's streaming FedAvg and its peak memory.",
    )
    parser.add_argument("--url", default=os.environ.get("FEDSILO_BENCH_BROKER_URL", DEFAULT_URL),
                        help="base broker URL (default %(default)s)")
    parser.add_argument("--vhost", choices=("fresh", "url"), default="fresh",
                        help="fresh: a new vhost per run via rabbitmqctl, deleted afterwards; "
                        "url: the vhost in --url as is (default %(default)s)")
    parser.add_argument("--silos", default=None,
                        help="comma-separated silo counts (default 10,50,100; smoke: 3)")
    parser.add_argument("--publishers", type=int, default=None,
                        help="publisher processes (default 4; smoke: 2)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None,
                        help="upload shapes (default llama-3.2-1b; smoke: smoke)")
    parser.add_argument("--experts-per-silo", type=int, default=None,
                        help="domain experts per module in each upload (profile default 2)")
    parser.add_argument("--chunk-size", type=int, default=4 * 2**20,
                        help="AmqpTransport chunk size in bytes (default 4 MiB, its default)")
    parser.add_argument("--mode", default="concurrent",
                        help="comma-separated: concurrent (the aggregator consumes while silos "
                        "publish) and/or phased (publish everything, then drain) "
                        "(default %(default)s)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per silo count; the summary reports medians "
                        "(default %(default)s)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds one run may take (default %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny CI run: C=3, small tensors, a few seconds; writes results "
                        "only where --out-json/--out-md say")
    parser.add_argument("--out-json", type=Path, default=None,
                        help="default benchmarks/results/transport.json (none with --smoke)")
    parser.add_argument("--out-md", type=Path, default=None,
                        help="default benchmarks/results/transport.md (none with --smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.silos = args.silos or "3"
        args.publishers = args.publishers or 2
        args.profile = args.profile or "smoke"
    else:
        args.silos = args.silos or "10,50,100"
        args.publishers = args.publishers or 4
        args.profile = args.profile or "llama-3.2-1b"
        args.out_json = args.out_json or RESULTS / "transport.json"
        args.out_md = args.out_md or RESULTS / "transport.md"
    args.modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    if not args.modes or set(args.modes) - {"concurrent", "phased"}:
        parser.error(f"--mode must list concurrent and/or phased, got {args.mode!r}")
    try:
        args.silo_counts = [int(c) for c in args.silos.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--silos must be comma-separated integers, got {args.silos!r}")
    if not args.silo_counts or min(args.silo_counts) < 1 or min(args.publishers, args.repeat) < 1:
        parser.error("--silos, --publishers and --repeat must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    profile = PROFILES[args.profile]
    if args.experts_per_silo is not None:
        if not 0 <= args.experts_per_silo <= profile.num_experts:
            raise SystemExit(f"--experts-per-silo must be in [0, {profile.num_experts}]")
        profile = Profile(**{**asdict(profile), "experts_per_silo": args.experts_per_silo})
    sizes = payload_sizes(profile)
    print(
        f"upload per silo ({profile.name}): {sizes['tensors']} tensors, raw "
        f"{sizes['raw_bytes'] / MB:.3f} MB (params {sizes['raw_params_bytes'] / MB:.3f}, "
        f"embeddings {sizes['raw_embeddings_bytes'] / MB:.3f}), wire "
        f"{sizes['wire_bytes'] / MB:.3f} MB, overhead {sizes['overhead_pct']:.2f} %",
        flush=True,
    )
    broker = broker_pid(args.url)
    runs = []
    plan = [(m, c, k) for m in args.modes for c in args.silo_counts for k in range(args.repeat)]
    for mode, c, repeat in plan:
        with Vhost(args.url, fresh=args.vhost == "fresh") as url:
            result = run_once(
                url, profile, c, args.publishers, args.chunk_size, mode, args.timeout, broker
            )
        result = {"repeat": repeat, **result}
        runs.append(result)
        b = result.get("broker") or {}
        print(
            f"{mode:>10} C={c:>4} #{repeat}: {result['wire_bytes'] / MB:8.1f} MB in "
            f"{result['wall_s']:7.2f} s = "
            f"{result['throughput_MBps']:6.1f} MB/s (publish {result['publish_s']:.2f} s = "
            f"{result['publish_MBps']:.1f} MB/s, drain {result['drain_MBps']:.1f} MB/s, lag "
            f"{result['aggregator_lag_s']:.2f} s); "
            f"aggregator peak - baseline {result['aggregator_peak_minus_baseline_MB']:.1f} MB "
            f"(accumulators {result['aggregator_accumulator_MB']:.1f}, working "
            f"{result['aggregator_working_MB']:.1f}); broker CPU {b.get('cpu_s', 0):.1f} s, "
            f"disk write {b.get('disk_write_MB', 0):.0f} MB; "
            f"{'ok' if result['ok'] else 'CHECK FAILED ' + str(result['check'])}",
            flush=True,
        )
    report = {
        "benchmark": "transport",
        "command": masked_command_line(argv),
        # Uncommitted changes, at run time, in the code this benchmark runs.
        "git": git_info(BENCHED_CODE),
        "date": now(),
        "machine": broker_machine(),
        "broker_host": urlsplit(args.url).hostname,
        "modes": args.modes,
        "chunk_size": args.chunk_size,
        "torch_threads_per_process": 1,
        "profile": asdict(profile),
        "payload": sizes,
        "repeats": args.repeat,
        "summary": summarize(runs),
        "runs": runs,
        "ok": all(r["ok"] for r in runs),
    }
    if args.out_json is not None:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out_json}")
    if args.out_md is not None:
        args.out_md.parent.mkdir(parents=True, exist_ok=True)
        args.out_md.write_text(to_markdown(report))
        print(f"wrote {args.out_md}")
    if args.out_json is None and args.out_md is None:
        print(to_markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
