"""A real silo agent's state_dir: `fedsilo export` needs no --silo there, and `fedsilo
evaluate` reproduces the score the aggregator recorded for the silo.

The aggregator and the agents are the real services over the test broker, from the
TOML files `Deployment` writes, run in threads of this process (test_deployment.py runs
them as processes; here that would only add their start-up time)."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fedsilo.cli.main import app
from fedsilo.sdk.personalised import complete, load_personalised, read_personalised_config

runner = CliRunner()


def test_state_dir_exports_and_scores_as_the_aggregator_recorded(deployment, tmp_path) -> None:
    deployment.sim = replace(deployment.sim, silos=2, rounds=1, local_steps=4, num_experts=3,
                             b=3, examples_per_silo=80, eval_limit=8)
    deployment.write()
    _run_in_threads(deployment)
    state_dir = deployment.silo_dir("silo-1")

    result = runner.invoke(app, ["export", str(state_dir), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    config = read_personalised_config(tmp_path / "out")
    assert (config.silo_id, config.strategy) == ("silo-1", "fedamole")
    assert config.base_model.digest == deployment.model_digest()
    assert any(config.assignment.values())  # its own experts
    model, tokenizer = load_personalised(tmp_path / "out")
    assert complete(model, tokenizer, config.prompt.render("topic: rain"), max_new_tokens=4)

    scored = runner.invoke(app, ["evaluate", str(state_dir), "--json"])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout) == {"silo": "silo-1", "metric": "accuracy",
                                         "value": deployment.summary()["per_silo"]["silo-1"]}

    # An agent of an older fedsilo recorded less: its silo.toml names the base model and data.
    adapter = state_dir / "adapter.safetensors"
    with safe_open(str(adapter), "pt") as handle:
        meta = handle.metadata()
    save_file(load_file(str(adapter)), str(adapter),
              {k: meta[k] for k in ("silo_id", "round", "assignment")})
    refused = runner.invoke(app, ["evaluate", str(state_dir)])
    assert refused.exit_code == 2 and "--config silo.toml" in refused.output, refused.output
    again = runner.invoke(app, ["evaluate", str(state_dir), "--json", "--config",
                                str(deployment.root / "silo-1.toml")])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) == json.loads(scored.stdout)


def _run_in_threads(deployment: Any) -> None:
    import torch

    from fedsilo.aggregator.config import FederationConfig
    from fedsilo.aggregator.service import AggregatorService
    from fedsilo.sdk.config import load_config
    from fedsilo.silo_agent.config import SiloConfig
    from fedsilo.silo_agent.service import AgentService

    services: list[Any] = [AggregatorService(load_config(
        FederationConfig, deployment.root / "federation.toml"), poll_s=0.1)]
    services += [AgentService(load_config(SiloConfig, deployment.root / f"{silo}.toml"))
                 for silo in deployment.silos]
    errors: list[BaseException] = []

    def run(service: Any) -> None:
        try:
            service.run()
        except BaseException as exc:  # reported below, with the others stopped
            errors.append(exc)
            for other in services:
                other.request_stop("a service failed")

    threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in services]
    threads_before = torch.get_num_threads()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        torch.set_num_threads(threads_before)  # the agents' `threads = 1`
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "the federation did not finish in 120 s"
