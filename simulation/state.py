"""Resuming `fedsilo simulate`: the whole federation's state after a round, in one
checkpoint in the run folder, and the checks that decide whether a folder can go on.

Why one file: Ctrl-C may come at any instant, and the aggregator's state and every silo's
must be of the same round; written together and atomically (`sdk/checkpoint.py`), the
file holds the last completed round or the one before, never a mix. What a silo keeps
mirrors the deployment agent's checkpoint (`silo_agent/service.py`: its adapter, its
experts, its strategy's silo state), plus what only an exact continuation in one process
needs: the seeded DP noise generator, the calibrated noise multiplier and the ledger (an
agent keeps the ledger in its own file and draws noise from OS entropy), and torch's
global RNG. Training itself needs nothing more: every round draws its batches and
dropout from (seed, silo, round) with a fresh optimiser (`LocalTrainer.train`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from fedsilo.aggregator.coordinator import Aggregator
from fedsilo.aggregator.history import RunFolderError, check_format, fedsilo_version
from fedsilo.privacy.ledger import PrivacyLedger
from fedsilo.sdk.adapters.model import load_trainable, set_assignment
from fedsilo.sdk.checkpoint import (
    CheckpointError,
    load_checkpoint,
    namespaced,
    namespaced_groups,
    save_checkpoint,
    take_groups,
)
from fedsilo.silo_agent.agent import SiloAgent

if TYPE_CHECKING:
    from fedsilo.simulation.config import SimulationConfig

__all__ = [
    "CHECKPOINT",
    "ResumeError",
    "SimulationInterrupted",
    "completed_round",
    "option_field",
    "restore_state",
    "resume_config",
    "save_state",
    "settings_json",
]

CHECKPOINT = "simulate.ckpt"
STATE_VERSION = 1
# `fedsilo simulate` options whose SimulationConfig field has another name.
_FIELDS = {"experts": "num_experts", "k_e": "top_k", "out": "out_dir"}


def option_field(option: str) -> str:
    """The SimulationConfig field a `fedsilo simulate` option (its parameter name) sets."""
    return _FIELDS.get(option, option)


class ResumeError(ValueError):
    """A run folder that cannot be continued; says why and what to do instead."""


class SimulationInterrupted(Exception):
    """Ctrl-C stopped a run; `completed` is its last saved round (None: none yet)."""

    def __init__(self, run_dir: Path, completed: int | None, rounds: int) -> None:
        super().__init__(f"interrupted: {run_dir}")
        self.run_dir = run_dir
        self.completed = completed
        self.rounds = rounds

    def advice(self) -> str:
        """Where the partial run is and the exact command that continues it."""
        if self.completed is None:
            done = "no round finished yet"
        elif self.completed == 0:
            done = f"round 0 of {self.rounds} is done and saved"
        else:
            done = f"rounds 0-{self.completed} of {self.rounds} are done and saved"
        return (f"interrupted: {done} in {self.run_dir}. Continue it with:\n"
                f"  fedsilo simulate --resume {self.run_dir}")


def settings_json(config: SimulationConfig) -> dict[str, Any]:
    """The settings as JSON holds them (tuples become lists): what a checkpoint compares."""
    return json.loads(json.dumps(asdict(config)))


def save_state(path: Path, config: SimulationConfig, aggregator: Aggregator,
               agents: Sequence[SiloAgent], server_round: int) -> None:
    """Checkpoint the federation after `round` closed (atomic; replaces the last one)."""
    engine_tensors, engine_meta = aggregator.state_dict()
    tensors = namespaced("aggregator", engine_tensors)
    adapters, adapters_meta = namespaced_groups(
        "adapters", {a.silo_id: a.trainer.state() for a in agents})
    clients, clients_meta = namespaced_groups(
        "clients", {a.silo_id: a.client.state_dict() for a in agents})
    privacy: dict[str, Any] = {}
    noise: dict[str, dict[str, torch.Tensor]] = {}
    for agent in agents:
        dp = agent.trainer.privacy
        if dp is None:
            continue
        privacy[agent.silo_id] = {"ledger": dp.ledger.to_dict(),
                                  "noise_multiplier": dp.noise_multiplier, "round": dp.round}
        if dp.generator is not None:
            noise[agent.silo_id] = {"state": dp.generator.get_state()}
    noise_tensors, noise_meta = namespaced_groups("noise", noise)
    tensors.update(adapters)
    tensors.update(clients)
    tensors.update(noise_tensors)
    tensors["rng/torch"] = torch.get_rng_state()
    save_checkpoint(path, tensors, {
        "version": STATE_VERSION,
        "fedsilo_version": fedsilo_version(),
        "round": server_round,
        "settings": settings_json(config),
        "engine": engine_meta,
        "adapters": adapters_meta,
        "clients": clients_meta,
        "assignments": {a.silo_id: a.trainer.assignment() for a in agents},
        "privacy": privacy,
        "noise": noise_meta,
    })


def restore_state(path: Path, config: SimulationConfig, aggregator: Aggregator,
                  agents: Sequence[SiloAgent]) -> int:
    """Put the checkpoint's state into a freshly built federation (aggregator not started);
    returns the round it was saved after."""
    tensors, meta = load_checkpoint(path)
    if meta.get("version") != STATE_VERSION:
        raise CheckpointError(
            f"{path} is a simulate checkpoint of version {meta.get('version')!r}, this fedsilo "
            f"reads {STATE_VERSION}: resume with the fedsilo that wrote it, or start a new run"
        )
    if meta.get("settings") != settings_json(config):
        raise CheckpointError(
            f"{path} was written with other settings than the run's config.json (was the "
            "file edited or copied from another run?); start a new run"
        )
    prefix = "aggregator/"
    try:
        engine = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        aggregator.load_state_dict(engine, meta["engine"])
        adapters = take_groups("adapters", tensors, meta["adapters"])
        clients = take_groups("clients", tensors, meta["clients"])
        noise = take_groups("noise", tensors, meta["noise"])
        for agent in agents:
            trainer = agent.trainer
            set_assignment(trainer.model, meta["assignments"][agent.silo_id])
            if adapters[agent.silo_id]:
                load_trainable(trainer.model, adapters[agent.silo_id], strict=True)
            agent.client.load_state_dict(clients[agent.silo_id])
            saved = meta["privacy"].get(agent.silo_id)
            if trainer.privacy is not None and saved is not None:
                trainer.privacy.ledger = PrivacyLedger.from_dict(saved["ledger"])
                trainer.privacy.noise_multiplier = saved["noise_multiplier"]
                trainer.privacy.round = saved["round"]
                if agent.silo_id in noise and trainer.privacy.generator is not None:
                    trainer.privacy.generator.set_state(noise[agent.silo_id]["state"])
        torch.set_rng_state(tensors["rng/torch"])
    except (KeyError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(
            f"{path} does not fit this run ({exc}); it was not written for it: start a new run"
        ) from None
    return int(meta["round"])


def resume_config(run_dir: Path, given: SimulationConfig, flags: Iterable[str]) -> SimulationConfig:
    """The settings `run_dir` was started with, after checking it can be continued:
    a simulate run folder, of this fedsilo version, not complete, and no flag in `flags`
    (the options given with --resume) asking for another value than it recorded."""
    from fedsilo.simulation.config import SimulationConfig

    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise ResumeError(f"--resume {run_dir}: no such folder; give the run folder "
                          "`fedsilo simulate` printed when it was interrupted")
    if not config_path.exists():
        raise ResumeError(f"--resume {run_dir}: not a `fedsilo simulate` run folder (it has "
                          "no config.json); give the folder the interrupted run printed")
    try:
        data = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ResumeError(f"{config_path} is unreadable ({exc}); start a new run") from None
    if not isinstance(data, dict):
        raise ResumeError(f"{config_path} is not a JSON object; start a new run")
    try:
        check_format(data, config_path)
    except RunFolderError as exc:
        raise ResumeError(str(exc)) from None
    version, ours = data.get("fedsilo_version"), fedsilo_version()
    if version != ours:
        by = f"fedsilo {version}" if version else "a fedsilo that did not record its version"
        raise ResumeError(
            f"{run_dir} was started by {by}; this is fedsilo {ours}. A run continues only "
            "under the version that began it (otherwise its numbers are not one run's): "
            f"resume it with that version, or start a new run"
        )
    if (run_dir / "summary.json").exists():
        raise ResumeError(
            f"{run_dir} is complete: all its {data.get('rounds')} rounds ran (summary.json); "
            f"nothing to resume. `fedsilo report {run_dir}` plots it; `fedsilo simulate` "
            "starts a new run"
        )
    known = SimulationConfig.field_names()
    unknown = sorted(set(data) - set(known) - {"silo_data", "fedsilo_version", "run_format",
                                                 "created_at"})
    if unknown:
        raise ResumeError(f"{config_path} has settings this fedsilo does not know: "
                          f"{', '.join(unknown)}; start a new run")
    defaults = SimulationConfig()
    values = {k: (tuple(v) if isinstance(getattr(defaults, k), tuple) else v)
              for k, v in data.items() if k in known}
    try:
        recorded = SimulationConfig(**values)
    except TypeError as exc:
        raise ResumeError(f"{config_path} does not hold a run's settings ({exc})") from None
    conflicts = []
    for flag in flags:
        name = option_field(flag)
        if name in known and getattr(given, name) != getattr(recorded, name):
            conflicts.append(f"--{flag.replace('_', '-')} {getattr(given, name)!r} (the run "
                             f"has {getattr(recorded, name)!r})")
    if conflicts:
        raise ResumeError(
            "--resume continues a run with the settings it began with, and these options ask "
            f"for others: {'; '.join(conflicts)}. Drop them to continue {run_dir}, or start "
            "a new run with them (without --resume)"
        )
    return recorded


def completed_round(run_dir: Path) -> int | None:
    """The last round the checkpoint in `run_dir` saved (None: none), read from its
    metadata alone (restore_state checks the whole file)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return int(json.loads((f.metadata() or {})["meta"])["round"])
    except Exception:  # damaged: restore_state says so, with the fix
        return None
