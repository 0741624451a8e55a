"""FedLEASE and FDLoRA as real processes over the real broker (the FedAMoLE harness of
test_deployment.py), each checked against `fedsilo simulate`."""

from __future__ import annotations

import math
import signal
from dataclasses import replace

import torch
from safetensors.torch import load_file

from fedsilo.simulation.engine import SimulationResult, run_simulation


def _assert_matches_simulate(deployment) -> SimulationResult:
    reference = run_simulation(deployment.sim, run_dir=deployment.root / "sim")
    summary = deployment.summary()
    assert summary["per_silo"].keys() == set(deployment.silos)
    for silo, value in summary["per_silo"].items():
        ref = next(r.silos[silo].metric for r in reversed(reference.rounds)
                   if r.silos[silo].metric is not None)
        assert math.isclose(value, ref, abs_tol=1e-9), (silo, value, ref)
    params = load_file(str(deployment.aggregator_dir / "global_params.safetensors"))
    assert params.keys() == reference.final_params.keys()
    for key, value in params.items():
        assert torch.equal(value, reference.final_params[key]), key
    return reference


def test_fedlease_federation_clusters_and_matches_simulate(deployment, one_thread) -> None:
    # One warm-up round, then two with the cluster experts and the adaptive router.
    deployment.sim = replace(deployment.sim, strategy="fedlease", rounds=3, warmup_rounds=1)
    deployment.write()
    deployment.start_all()
    deployment.wait_all(timeout=300)
    _assert_matches_simulate(deployment)
    clustered = [e for e in deployment.events("aggregator", "round_closed") if e["round"] == 0]
    assert clustered and clustered[0].get("clusters") == 2.0, clustered
    for silo in deployment.silos:
        adapter = load_file(str(deployment.silo_dir(silo) / "adapter.safetensors"))
        assert any(k.endswith(".router.gate") for k in adapter), "no router after clustering"


def test_fdlora_agent_killed_after_upload_resumes_its_personal_adapter(
    deployment, one_thread
) -> None:
    # silo-1 dies right after sending round 1's upload (before its checkpoint): restarted,
    # it must redo round 1 from its saved personal adapter, or its score would differ.
    deployment.sim = replace(deployment.sim, strategy="fdlora", rounds=3, sync_every=2)
    deployment.write()
    deployment.start_aggregator()
    for silo in deployment.silos:
        env = {"FEDSILO_FAULT": "uploaded@1"} if silo == "silo-1" else None
        deployment.start_agent(silo, env=env)
    assert deployment.wait("silo-1", timeout=180) == -signal.SIGKILL
    deployment.start_agent("silo-1")
    deployment.wait_all(timeout=300)
    _assert_matches_simulate(deployment)
    adapter = load_file(str(deployment.silo_dir("silo-1") / "adapter.safetensors"))
    personal = [k for k in adapter if k.startswith("client/")]
    assert "client/fusion.weights" in personal and len(personal) > 1
