"""A real federation on the test broker: TOML files, and the CLI run as subprocesses.

`Deployment` writes federation.toml and one silo.toml per silo, reproducing a
`SimulationConfig` (same data partitions, model, seeds), so a distributed run can be
compared with `fedsilo simulate`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsilo.simulation.engine import SimulationConfig, silo_ids


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def _write(path: Path, top: dict[str, Any], sections: dict[str, dict[str, Any]]) -> Path:
    lines = [f"{k} = {_toml(v)}" for k, v in top.items() if v is not None]
    for name, values in sections.items():
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items() if v is not None]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Deployment:
    root: Path
    broker_url: str
    sim: SimulationConfig
    rounds: dict[str, Any] = field(default_factory=dict)
    secure: bool = True  # signed, encrypted envelopes with keys made here
    dp: dict[str, Any] = field(default_factory=lambda: {"enabled": False})  # as `simulate`
    broker: dict[str, Any] = field(default_factory=dict)  # extra [broker] keys for all
    security_extra: dict[str, Any] = field(default_factory=dict)  # extra [security], aggregator
    # Per-party sections that replace the generated ones (e.g. a `fedsilo provision` kit's).
    party_sections: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[str]] = field(default_factory=dict)

    @property
    def silos(self) -> list[str]:
        return silo_ids(self.sim.silos)

    @property
    def aggregator_dir(self) -> Path:
        return self.root / "aggregator"

    def silo_dir(self, silo: str) -> Path:
        return self.root / silo

    def security(self, party: str) -> dict[str, Any]:
        if not self.secure:
            return {"enabled": False}
        return {"keys_dir": self.root / "keys" / party,
                "trust_file": self.root / "keys" / f"{party}.trust.json"}

    def _make_keys(self) -> None:
        """What `fedsilo provision` hands each party: its keys and its peers' public keys."""
        from fedsilo.privacy.keys import Keyring, TrustStore

        parties = ["aggregator", *self.silos]
        public = {p: Keyring.create(self.root / "keys" / p, p).public() for p in parties}
        TrustStore("test", {s: public[s] for s in self.silos}).save(
            self.root / "keys" / "aggregator.trust.json"
        )
        for silo in self.silos:
            TrustStore("test", {"aggregator": public["aggregator"]}).save(
                self.root / "keys" / f"{silo}.trust.json"
            )

    def codec(self, party: str) -> Any:
        """The codec `party` speaks (to send messages as it from a test)."""
        from fedsilo.privacy.settings import SecuritySettings

        settings = {k: Path(v) if k != "enabled" else v for k, v in self.security(party).items()}
        return SecuritySettings(**settings).codec(party, "test" if party == "aggregator" else None)

    def model_digest(self) -> str:
        """What `fedsilo digest` prints for the silos' base model."""
        from fedsilo.sdk.models.digest import weights_digest
        from fedsilo.sdk.models.loading import load_model

        s = self.sim
        return weights_digest(load_model(s.model, dtype=s.dtype, seed=s.seed).model)

    def write(self) -> None:
        s = self.sim
        if self.secure and not (self.root / "keys").exists():
            self._make_keys()
        broker = {"urls": [self.broker_url], "reconnect_timeout_s": 120.0,
                  "chunk_size_mb": 0.25, **self.broker}
        _write(self.root / "federation.toml", {
            "name": "test", "seed": s.seed, "silos": self.silos,
            "state_dir": self.aggregator_dir, "model_digest": self.model_digest(),
        }, {
            "broker": broker,
            "security": {**self.security("aggregator"), **self.security_extra},
            "schedule": {"rounds": s.rounds, "local_steps": s.local_steps, "lr": s.lr,
                         "lr_decay": s.lr_decay},
            "rounds": {"deadline_s": 120.0, "checkpoint_interval_s": 1.0, **self.rounds},
            "strategy": s.strategy_config().settings(),  # the chosen strategy's keys only
            "adapter": {"r": s.r, "alpha": s.lora_alpha, "dropout": s.dropout,
                        "top_k": s.top_k, "target_modules": list(s.target_modules),
                        "lb_coef": s.lb_coef},
            "training": {"batch_size": s.batch_size, "max_length": s.max_length,
                         "eval_limit": s.eval_limit, "max_new_tokens": s.max_new_tokens,
                         "scoring": s.scoring},
            **self.party_sections.get("aggregator", {}),
        })
        for index, silo in enumerate(self.silos):
            _write(self.root / f"{silo}.toml", {
                "silo_id": silo, "state_dir": self.silo_dir(silo), "model": s.model,
                "seed": s.seed, "poll_s": 0.2, "threads": 1,
            }, {
                "broker": broker,
                "security": self.security(silo),
                "dp": self.dp,
                "data": {"source": s.data or "synthetic", "partitions": s.silos,
                         "index": index, "partition": s.partition, "alpha": s.alpha,
                         "examples": s.examples_per_silo},
                **self.party_sections.get(silo, {}),
            })

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None) -> None:
        log = (self.root / f"{name}.log").open("a")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "fedsilo.cli.main", *args, "--log-json"],
            stdout=log, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    def start_aggregator(self, env: dict[str, str] | None = None) -> None:
        self._spawn("aggregator", ["aggregator", "run", "--config",
                                   str(self.root / "federation.toml")], env)

    def start_agent(self, silo: str, env: dict[str, str] | None = None) -> None:
        self._spawn(silo, ["agent", "start", "--config", str(self.root / f"{silo}.toml")], env)

    def start_all(self) -> None:
        self.start_aggregator()
        for silo in self.silos:
            self.start_agent(silo)

    def wait(self, name: str, timeout: float = 300.0) -> int:
        try:
            return self.processes[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{name} did not finish in {timeout} s:\n{self.log(name)}"
            ) from None

    def wait_all(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        for name in list(self.processes):
            code = self.wait(name, max(1.0, deadline - time.monotonic()))
            assert code == 0, f"{name} exited with {code}:\n{self.log(name)}"

    def kill(self, name: str) -> None:
        self.processes[name].send_signal(signal.SIGKILL)
        self.processes[name].wait(timeout=30)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def events(self, name: str, event: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log(name).splitlines():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(item, dict) and (event is None or item.get("event") == event):
                out.append(item)
        return out

    def wait_for_event(self, name: str, event: str, timeout: float = 120.0,
                       **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for item in self.events(name, event):
                if all(item.get(k) == v for k, v in match.items()):
                    return item
            process = self.processes.get(name)
            if process is not None and process.poll() is not None:
                raise AssertionError(f"{name} exited before {event}:\n{self.log(name)}")
            time.sleep(0.1)
        raise AssertionError(f"no {event} {match} from {name} in {timeout} s:\n{self.log(name)}")

    def summary(self) -> dict[str, Any]:
        return json.loads((self.aggregator_dir / "summary.json").read_text())

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Agents and interrupted simulate processes run with one thread (OMP_NUM_THREADS=1);
    a reference computed in the test process must too, to match them bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def deployment(tmp_path: Path, broker_url: str) -> Iterator[Deployment]:
    dep = Deployment(
        tmp_path, broker_url,
        SimulationConfig(silos=3, rounds=2, local_steps=4, num_experts=6, b=4,
                         examples_per_silo=120, eval_limit=12, out_dir=str(tmp_path / "sim")),
    )
    try:
        yield dep
    finally:
        dep.stop_all()
