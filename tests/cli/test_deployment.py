"""A federation of real processes over the real broker: `fedsilo aggregator run` and three
`fedsilo agent start` subprocesses, checked against `fedsilo simulate`."""

from __future__ import annotations

import json
import math
import signal
import subprocess
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import torch
from safetensors.torch import load_file

from fedsilo.sdk.messages import Upload
from fedsilo.sdk.transport.amqp import AmqpTransport
from fedsilo.simulation.engine import run_simulation


def _global_params(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(root / "aggregator" / "global_params.safetensors"))


def _twin_is_refused(deployment, name: str, args: list[str], holder: str) -> None:
    """A second live process on a running party's state folder exits at once, saying why."""
    deployment._spawn(name, args, None)
    code = deployment.wait(name, timeout=120)
    deployment.processes.pop(name)
    assert code == 2, deployment.log(name)
    assert f"is in use by another running {holder}" in " ".join(deployment.log(name).split())


def test_three_agents_and_an_aggregator_match_simulate(deployment, one_thread) -> None:
    deployment.write()
    deployment.start_aggregator()
    deployment.start_agent("silo-0")
    # Round 0 waits for every silo, so both stay live while their twins try to start.
    deployment.wait_for_event("silo-0", "agent_started")
    deployment.wait_for_event("aggregator", "aggregator_started")
    _twin_is_refused(deployment, "silo-0-twin", [
        "agent", "start", "--config", str(deployment.root / "silo-0.toml")], "agent of silo-0")
    _twin_is_refused(deployment, "aggregator-twin", [
        "aggregator", "run", "--config", str(deployment.root / "federation.toml")],
        "aggregator")
    # The same silo from another folder (another machine): the broker refuses it.
    elsewhere = deployment.root / "silo-0-elsewhere.toml"
    text = (deployment.root / "silo-0.toml").read_text()
    old_dir = str(deployment.silo_dir("silo-0"))
    assert old_dir in text
    elsewhere.write_text(text.replace(old_dir, str(deployment.root / "elsewhere")))
    deployment._spawn("silo-0-elsewhere", ["agent", "start", "--config", str(elsewhere)], None)
    assert deployment.wait("silo-0-elsewhere", timeout=180) == 2
    deployment.processes.pop("silo-0-elsewhere")
    assert "another agent of silo-0 is connected" in " ".join(
        deployment.log("silo-0-elsewhere").split())
    for silo in deployment.silos[1:]:
        deployment.start_agent(silo)
    deployment.wait_all(timeout=300)

    summary = deployment.summary()
    reference = run_simulation(deployment.sim, run_dir=deployment.root / "sim")
    assert summary["per_silo"].keys() == set(deployment.silos)
    for silo, value in summary["per_silo"].items():
        ref = next(r.silos[silo].metric for r in reversed(reference.rounds)
                   if r.silos[silo].metric is not None)
        assert math.isclose(value, ref, abs_tol=1e-9), (silo, value, ref)
    params = _global_params(deployment.root)
    assert params.keys() == reference.final_params.keys()
    for key, value in params.items():
        assert torch.equal(value, reference.final_params[key]), key
    for silo in deployment.silos:
        assert (deployment.silo_dir(silo) / "adapter.safetensors").exists()


def _reference(deployment) -> dict[str, torch.Tensor]:
    return run_simulation(deployment.sim, run_dir=deployment.root / "sim").final_params


def _assert_same_params(deployment, reference: dict[str, torch.Tensor]) -> None:
    params = _global_params(deployment.root)
    assert params.keys() == reference.keys()
    for key, value in params.items():
        assert torch.equal(value, reference[key]), key


def _vhost(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def test_aggregator_killed_during_aggregation_and_mid_round_resumes_exactly(
    deployment, one_thread
) -> None:
    deployment.write()
    # SIGKILL inside round 0's aggregation, then again right after folding round 1's
    # first upload (before that fold was checkpointed or acknowledged).
    deployment.start_aggregator(env={"FEDSILO_FAULT": "aggregating@0"})
    for silo in deployment.silos:
        deployment.start_agent(silo)
    assert deployment.wait("aggregator", timeout=120) == -signal.SIGKILL
    deployment.start_aggregator(env={"FEDSILO_FAULT": "folded@1"})
    assert deployment.wait("aggregator", timeout=120) == -signal.SIGKILL
    deployment.start_aggregator()
    deployment.wait_all(timeout=240)

    loaded = deployment.events("aggregator", "state_loaded")
    assert [e["phase"] for e in loaded] == ["collecting", "collecting"]
    assert [e["round"] for e in loaded] == [0, 1]
    closed = [e["round"] for e in deployment.events("aggregator", "round_closed")]
    assert closed == [0, 1, 2]  # each round closed once: no upload lost or folded twice
    _assert_same_params(deployment, _reference(deployment))


def test_broker_dropping_connections_and_an_agent_stopped_mid_round_change_nothing(
    deployment, one_thread
) -> None:
    deployment.sim = replace(deployment.sim, local_steps=40)  # long enough to stop mid-way
    deployment.write()
    deployment.start_all()
    deployment.wait_for_event("aggregator", "round_opened", round=1)
    subprocess.run(
        ["rabbitmqctl", "close_all_connections", "-p", _vhost(deployment.broker_url),
         "test: broker-side close"], check=True, capture_output=True, timeout=60,
    )
    # SIGTERM mid-training: the agent abandons the round, keeps the plan unacknowledged,
    # exits 0; started again, it re-runs the round exactly.
    deployment.processes["silo-1"].send_signal(signal.SIGTERM)
    assert deployment.wait("silo-1", timeout=60) == 0
    stopping = deployment.events("silo-1", "agent_stopping")
    assert stopping and stopping[0]["reason"] == "SIGTERM"
    deployment.start_agent("silo-1")
    deployment.wait_all(timeout=240)
    status = json.loads((deployment.aggregator_dir / "status.json").read_text())
    assert status["reconnects"] >= 1
    # What the broker redelivered after the close was handled as itself, never refused as
    # a replay (dead-lettered and counted as an attack) by the aggregator or an agent.
    assert "replay" not in status["rejected"], status["rejected"]
    for silo in deployment.silos:
        assert "(replay)" not in deployment.log(silo), silo
    _assert_same_params(deployment, _reference(deployment))


def test_dead_agent_round_closes_with_quorum_and_it_rejoins(deployment, tmp_path) -> None:
    deployment.sim = replace(deployment.sim, rounds=3)
    deployment.rounds = {"deadline_s": 10.0, "quorum": 0.6}
    deployment.write()
    deployment.start_aggregator()
    for silo in deployment.silos[:2]:
        deployment.start_agent(silo)
    deployment.start_agent("silo-2", env={"FEDSILO_FAULT": "plan_received@1"})
    assert deployment.wait("silo-2", timeout=120) == -signal.SIGKILL

    # While round 1 waits for its deadline: a repeated upload and one for a closed round.
    folded = deployment.wait_for_event("aggregator", "upload_folded", round=1, silo="silo-0")
    assert folded["missing"]
    fake = {"m.shared.A": torch.zeros(1)}
    for silo, server_round in (("silo-0", 1), ("silo-1", 0)):  # signed by the silo it claims
        sender = AmqpTransport(deployment.broker_url, silo, codec=deployment.codec(silo))
        try:
            sender.send_upload(Upload(server_round, silo, fake, {}, 1))
        finally:
            sender.close()
    deployment.wait_for_event("aggregator", "upload_duplicate", silo="silo-0")
    deployment.wait_for_event("aggregator", "upload_late", silo="silo-1")

    closed = deployment.wait_for_event("aggregator", "round_closed_at_deadline", timeout=60)
    assert closed["round"] == 1 and closed["missing"] == ["silo-2"]
    # Round 2 must not close at its deadline while silo-2 starts again, however slow the
    # machine: freeze the aggregator once the others uploaded, thaw it when silo-2 did.
    deployment.wait_for_event("aggregator", "round_opened", round=2)
    for silo in ("silo-0", "silo-1"):
        deployment.wait_for_event("aggregator", "upload_folded", round=2, silo=silo)
    aggregator = deployment.processes["aggregator"]
    aggregator.send_signal(signal.SIGSTOP)
    try:
        deployment.start_agent("silo-2")
        deployment.wait_for_event("silo-2", "round_done", round=2, timeout=240)
    finally:
        aggregator.send_signal(signal.SIGCONT)
    deployment.wait_all(timeout=240)

    assert deployment.events("aggregator", "silo_rejoined")[0]["silo"] == "silo-2"
    skipped = deployment.events("silo-2", "plan_skipped")
    assert skipped and skipped[0]["round"] == 1  # the stale plan was not trained on
    summary = deployment.summary()
    assert set(summary["per_silo"]) == set(deployment.silos)
    status = json.loads((deployment.aggregator_dir / "status.json").read_text())
    assert status["counters"]["duplicate"] == 1 and status["counters"]["late"] == 1


def test_uploads_redelivered_before_their_checkpoint_are_not_lost(deployment, one_thread) -> None:
    """Round 1: silo-0 and silo-1 uploaded (held, not yet checkpointed), silo-2 is down; the
    broker closes every connection, so it redelivers the two uploads: they are the same
    messages, not replays. The aggregator is SIGKILLed while handling the redelivery, before
    any checkpoint: restarted, it gets them again, and the run equals the fault-free one."""
    deployment.rounds = {"checkpoint_interval_s": 1e6, "deadline_s": 900.0}
    deployment.write()
    deployment.start_aggregator(env={"FEDSILO_FAULT": "duplicate@1"})
    deployment.start_agent("silo-0")
    deployment.start_agent("silo-1")
    deployment.start_agent("silo-2", env={"FEDSILO_FAULT": "plan_received@1"})
    assert deployment.wait("silo-2", timeout=180) == -signal.SIGKILL
    for silo in ("silo-0", "silo-1"):
        deployment.wait_for_event("aggregator", "upload_folded", round=1, silo=silo,
                                  timeout=180)
    subprocess.run(
        ["rabbitmqctl", "close_all_connections", "-p", _vhost(deployment.broker_url),
         "test: broker-side close"], check=True, capture_output=True, timeout=60,
    )
    # Handling the first redelivered upload as the duplicate it is: killed right there.
    assert deployment.wait("aggregator", timeout=180) == -signal.SIGKILL
    deployment.start_aggregator()
    deployment.start_agent("silo-2")
    deployment.wait_all(timeout=300)

    status = json.loads((deployment.aggregator_dir / "status.json").read_text())
    assert "replay" not in status["rejected"], status["rejected"]
    closed = [e["round"] for e in deployment.events("aggregator", "round_closed")]
    assert closed == [0, 1, 2]
    _assert_same_params(deployment, _reference(deployment))


def test_an_agent_killed_after_its_plan_was_redelivered_loses_nothing(
    deployment, tmp_path, one_thread
) -> None:
    """silo-0 holds its round-1 plan (taken, not yet acknowledged) when the broker closes
    every connection, so the broker puts the plan back for redelivery; silo-0 goes on,
    uploads on a new connection and is SIGKILLed before its checkpoint. Restarted, it takes
    the redelivered plan as the same plan, not as a replay (nothing refused or
    dead-lettered): it runs round 1 again, or skips it for round 2's plan if round 1 closed
    meanwhile with the upload it sent; the aggregator folds silo-0 once, and the run equals
    the fault-free one."""
    go = tmp_path / "silo-0.go"
    deployment.rounds = {"deadline_s": 900.0}
    deployment.write()
    deployment.start_aggregator()
    deployment.start_agent("silo-0", env={"FEDSILO_FAULT": f"plan_received@1:wait={go},"
                                                          "uploaded@1"})
    deployment.start_agent("silo-1")
    deployment.start_agent("silo-2")
    deployment.wait_for_event("silo-0", "fault_waiting", round=1, timeout=240)
    subprocess.run(
        ["rabbitmqctl", "close_all_connections", "-p", _vhost(deployment.broker_url),
         "test: broker-side close"], check=True, capture_output=True, timeout=60,
    )
    go.touch()
    assert deployment.wait("silo-0", timeout=240) == -signal.SIGKILL
    deployment.start_agent("silo-0")
    deployment.wait_all(timeout=300)

    status = json.loads((deployment.aggregator_dir / "status.json").read_text())
    assert "replay" not in status["rejected"], status["rejected"]
    for silo in deployment.silos:
        assert "(replay)" not in deployment.log(silo), silo
    folded = [e for e in deployment.events("aggregator", "upload_folded")
              if e["silo"] == "silo-0" and e["round"] == 1]
    assert len(folded) == 1
    again = deployment.events("silo-0", "round_done") + deployment.events("silo-0",
                                                                         "plan_skipped")
    assert any(e["round"] == 1 for e in again), deployment.log("silo-0")  # it got the plan
    closed = [e["round"] for e in deployment.events("aggregator", "round_closed")]
    assert closed == [0, 1, 2]
    _assert_same_params(deployment, _reference(deployment))


def test_a_silo_whose_model_diverges_skips_the_round_and_the_federation_goes_on(
    deployment,
) -> None:
    """silo-2's model diverges on its round-1 plan (its values become non-finite) with DP
    on: it releases and is charged nothing, says so (not "privacy budget exhausted"), skips
    the round and takes the next plan; the round closes by quorum without it."""
    deployment.sim = replace(deployment.sim, rounds=3)
    deployment.rounds = {"deadline_s": 20.0, "quorum": 0.6}
    deployment.dp = {"enabled": True, "epsilon": 8.0}
    deployment.write()
    deployment.start_aggregator()
    deployment.start_agent("silo-0")
    deployment.start_agent("silo-1")
    deployment.start_agent("silo-2", env={"FEDSILO_FAULT": "plan_received@1:poison"})
    deployment.wait_all(timeout=400)

    skipped = deployment.events("silo-2", "round_skipped")
    assert [(e["round"], e["reason"]) for e in skipped] == [(1, "non-finite values")]
    assert "NaN or inf" in skipped[0]["detail"]
    assert not deployment.events("silo-2", "privacy_budget_exhausted")
    done = [e["round"] for e in deployment.events("silo-2", "round_done")]
    assert 1 not in done and done == [0, *range(2, done[-1] + 1)]
    folded = {(e["silo"], e["round"]) for e in deployment.events("aggregator", "upload_folded")}
    assert ("silo-2", 1) not in folded and ("silo-2", 0) in folded
    closed = [e["round"] for e in deployment.events("aggregator", "round_closed")]
    assert closed == list(range(done[-1] + 1))
    params = _global_params(deployment.root)
    assert all(bool(torch.isfinite(v).all()) for v in params.values())
    # Only what was released was charged: not the skipped round.
    ledger = json.loads((deployment.silo_dir("silo-2") / "privacy-ledger.json").read_text())
    charged = {r["round"] for r in ledger["releases"]}
    assert 1 not in charged and {0, 2} <= charged, ledger  # the final round only evaluates
