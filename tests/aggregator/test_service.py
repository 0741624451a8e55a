"""The aggregator service's rules (roster, quorum, deadlines, checkpoints), driven step by
step through the in-memory transport with a controllable clock. The same service over the
real broker and real processes: tests/cli/test_deployment.py."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from fedsilo.aggregator.config import FederationConfig, RoundsSection, ScheduleSection
from fedsilo.aggregator.service import (
    CHECKPOINT,
    AggregatorService,
    FederationAborted,
    Phase,
    ServiceState,
)
from fedsilo.sdk.checkpoint import load_checkpoint, save_checkpoint
from fedsilo.sdk.messages import Announce, Upload
from fedsilo.sdk.params import ModuleShape
from fedsilo.sdk.strategies import StrategyConfig
from fedsilo.sdk.strategies.config import flat_knobs
from fedsilo.sdk.transport.memory import MemoryTransport

SHAPES = {"layer.q_proj": ModuleShape(3, 3), "layer.k_proj": ModuleShape(3, 3)}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


DIGEST = "d" * 64  # federation.toml's model_digest


def _config(tmp_path: Path, min_silos: int = 2, **rounds: object) -> FederationConfig:
    return FederationConfig(
        silos=("a", "b", "c"), min_silos=min_silos, state_dir=tmp_path / "state",
        model_digest=DIGEST,
        schedule=ScheduleSection(rounds=3, local_steps=1),
        rounds=RoundsSection(**{"deadline_s": 10.0, "quorum": 0.6, **rounds}),  # type: ignore[arg-type]
        strategy=StrategyConfig(name="fedit"),
    )


def _service(config: FederationConfig, transport: MemoryTransport, clock: Clock
             ) -> AggregatorService:
    service = AggregatorService(config, connect=lambda: transport, clock=clock, poll_s=0)
    service.open()
    return service


def _announce(silo: str, digest: str = DIGEST, shapes: dict | None = None) -> Announce:
    return Announce(silo, "m", shapes or SHAPES, 10, incarnation=silo, model_digest=digest)


def _upload(server_round: int, silo: str, value: float = 1.0) -> Upload:
    r = 8
    params = {"layer.q_proj.shared.A": torch.full((r, 3), value),
              "layer.q_proj.shared.B": torch.zeros(3, r)}
    return Upload(server_round, silo, params, {}, 10, metrics={"metric": value})


def _steps(service: AggregatorService, n: int = 10) -> None:
    for _ in range(n):
        service.step()


def test_round_zero_waits_for_min_silos_and_refuses_strangers(tmp_path: Path) -> None:
    transport, clock = MemoryTransport(), Clock()
    service = _service(_config(tmp_path), transport, clock)
    transport.send_announce(_announce("a"))
    transport.send_announce(_announce("intruder"))
    transport.send_announce(_announce("b", digest="other weights"))
    _steps(service)
    assert service.state.phase == "waiting"
    assert service.state.counters == {"unknown_silo": 1, "model_mismatch": 1}
    transport.send_announce(_announce("b"))
    _steps(service)
    assert service.state.phase == "collecting" and service.state.round == 0
    assert transport.receive_plan("a") is not None and transport.receive_plan("b") is not None
    assert transport.receive_plan("c") is None


def test_late_joiner_enters_at_the_next_round(tmp_path: Path) -> None:
    transport, clock = MemoryTransport(), Clock()
    service = _service(_config(tmp_path), transport, clock)
    for silo in "ab":
        transport.send_announce(_announce(silo))
    _steps(service)
    transport.send_announce(_announce("c"))
    transport.send_upload(_upload(0, "a"))
    transport.send_upload(_upload(0, "b"))
    _steps(service)
    assert service.state.round == 1 and service.state.phase == "collecting"
    plan = transport.receive_plan("c")
    assert plan is not None and plan.message.round == 1


def test_deadline_closes_with_quorum_else_extends_then_aborts(tmp_path: Path) -> None:
    transport, clock = MemoryTransport(), Clock()
    service = _service(_config(tmp_path, 3, max_extensions=1), transport, clock)
    for silo in "abc":
        transport.send_announce(_announce(silo))
    _steps(service)
    transport.send_upload(_upload(0, "a"))
    transport.send_upload(_upload(0, "b"))
    _steps(service)
    assert service.state.round == 0  # not everyone yet, deadline not reached
    clock.now += 11
    _steps(service)
    assert service.state.round == 1  # 2 of 3 >= quorum 0.6: closed at the deadline
    transport.send_upload(_upload(1, "a"))
    _steps(service)
    clock.now += 11
    _steps(service)
    assert service.state.extensions == 1 and service.state.round == 1
    clock.now += 11
    with pytest.raises(FederationAborted, match="missing b, c"):
        _steps(service)
    _, meta = load_checkpoint(tmp_path / "state" / CHECKPOINT)
    assert meta["service"]["round"] == 1  # resumable


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    transport, clock = MemoryTransport(), Clock()
    service = _service(_config(tmp_path), transport, clock)
    service.close()
    changed = FederationConfig(**{**_config(tmp_path).__dict__,
                                  "schedule": ScheduleSection(rounds=9)})
    with pytest.raises(ValueError, match="other settings"):
        AggregatorService(changed, connect=lambda: transport, clock=clock).open()


def test_a_stop_request_checkpoints_folded_uploads_before_acknowledging(tmp_path: Path) -> None:
    transport, clock = MemoryTransport(), Clock()
    config = _config(tmp_path, 3, checkpoint_interval_s=1e9)
    service = _service(config, transport, clock)
    for silo in "abc":
        transport.send_announce(_announce(silo))
    _steps(service)
    acked: list[str] = []
    transport.send_upload(_upload(0, "a"))
    delivery = transport.receive_upload()
    assert delivery is not None
    delivery.ack = lambda: acked.append("a")  # observe when the service acknowledges
    service._on_upload(delivery)  # as step() would, without acknowledging yet
    service._pending.append(delivery.ack)
    assert acked == []
    service.request_stop("SIGTERM")
    service.close()
    assert acked == ["a"]
    resumed = _service(config, transport, clock)
    assert resumed.engine is not None
    assert list(resumed.engine.history[-1].bytes_up) == ["a"]


def test_the_base_model_is_fixed_by_the_coordinator_not_by_the_first_silo(
    tmp_path: Path,
) -> None:
    transport, clock = MemoryTransport(), Clock()
    service = _service(_config(tmp_path), transport, clock)
    transport.send_announce(_announce("a", digest="e" * 64))  # races in with other weights
    transport.send_announce(_announce("b"))
    transport.send_announce(_announce("c"))
    _steps(service)
    assert service.state.counters == {"model_mismatch": 1}
    assert set(service.state.members) == {"b", "c"}
    assert "federation.toml model_digest" in (service.state.last_error or "")
    transport.send_announce(_announce("a"))  # the same silo with the federation's model
    _steps(service)
    assert service.state.phase == "collecting" and set(service.state.members) == {"a", "b", "c"}


def test_no_model_digest_no_run(tmp_path: Path) -> None:
    config = FederationConfig(**{**_config(tmp_path).__dict__, "model_digest": ""})
    with pytest.raises(ValueError, match=r"no model_digest.*fedsilo digest MODEL"):
        AggregatorService(config, connect=MemoryTransport).open()
    with pytest.raises(ValueError, match="not a SHA-256"):
        FederationConfig(**{**_config(tmp_path).__dict__, "model_digest": "abc"})


def test_refusal_counts_survive_a_restart(tmp_path: Path) -> None:
    transport, clock = MemoryTransport(), Clock()
    config = _config(tmp_path)
    service = _service(config, transport, clock)
    for silo in "abc":
        transport.send_announce(_announce(silo))
    _steps(service)
    bad = _upload(0, "a")
    bad.params["layer.q_proj.shared.A"][0, 0] = float("nan")
    transport.send_upload(bad)
    _steps(service)
    before = service.status()
    assert before["rejected"] == {"non-finite": 1}
    assert before["counters"]["rejected: non-finite"] == 1
    service.close()
    again = _service(config, MemoryTransport(), clock)  # a new process: fresh transport
    assert again.status()["rejected"] == {"non-finite": 1}
    assert again.status()["counters"] == before["counters"]
    again.close()
    third = _service(config, MemoryTransport(), clock)
    assert third.status()["rejected"] == {"non-finite": 1}  # not counted twice


def test_phase_keeps_its_string_in_checkpoints_and_status(tmp_path: Path) -> None:
    """Phases are an enum in the code and their plain values on disk: a checkpoint written
    before the enum (or by this version) loads as the member, and dumps as the string."""
    state = ServiceState.from_json({**ServiceState().to_json(), "phase": "collecting"})
    assert state.phase is Phase.COLLECTING
    assert json.loads(json.dumps(state.to_json()))["phase"] == "collecting"
    service = _service(_config(tmp_path), MemoryTransport(), Clock())
    assert json.loads(json.dumps(service.status()))["phase"] == "waiting"
    service.close()


def test_a_state_folder_of_an_earlier_version_resumes_and_is_rewritten(tmp_path: Path) -> None:
    """Before each strategy had its own config, the fingerprint covered every strategy's
    knobs (`strategies.config.flat_knobs`, pinned in tests/sdk/strategies/test_config.py):
    such a folder resumes with the same federation.toml, and its next checkpoint records
    the current fingerprint. Other settings are still refused."""
    transport, clock = MemoryTransport(), Clock()
    config = _config(tmp_path)
    service = _service(config, transport, clock)
    service.close()
    path = config.state_dir / CHECKPOINT
    tensors, meta = load_checkpoint(path)
    setup = {**config.setup().to_json(), "strategy": flat_knobs(config.strategy)}
    written = json.dumps({"setup": setup, "schedule": asdict(config.schedule)}, sort_keys=True)
    legacy = hashlib.sha256(written.encode()).hexdigest()[:16]
    assert legacy != meta["fingerprint"]
    save_checkpoint(path, tensors, {**meta, "fingerprint": legacy})
    resumed = _service(config, transport, clock)
    resumed.close()
    assert load_checkpoint(path)[1]["fingerprint"] == meta["fingerprint"]
    save_checkpoint(path, tensors, {**meta, "fingerprint": legacy})
    changed = FederationConfig(**{**config.__dict__, "strategy": StrategyConfig(
        name="fedit", min_contributors=1)})
    with pytest.raises(ValueError, match="other settings"):
        AggregatorService(changed, connect=lambda: transport, clock=clock).open()
