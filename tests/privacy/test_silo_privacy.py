"""A silo's DP over a run: noise calibrated to the planned rounds, every release charged
before it leaves, the ledger surviving restarts, and a refusal past the budget."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedsilo.cli.main import app
from fedsilo.privacy.dp import DPConfig, DPSGDConfig
from fedsilo.privacy.ledger import BudgetExceeded, compose_epsilon
from fedsilo.privacy.silo import LEDGER_FILE, SiloPrivacy
from fedsilo.simulation.engine import SimulationConfig, run_simulation


def _per_example(n: int = 50) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"m.client": torch.randn(n, 4, generator=g),
            "m.expert.1": torch.randn(n, 4, generator=g)}


def test_the_planned_rounds_spend_exactly_the_budget(tmp_path: Path) -> None:
    config = DPConfig(epsilon=4.0, delta=1e-5, clip=1.0)
    privacy = SiloPrivacy.open(config, tmp_path, "s")
    for server_round in range(5):
        privacy.begin_round(server_round, total_rounds=5, local_steps=3, batch_size=2, num_train=50)
        out = privacy.release_embeddings(_per_example())
        assert out.keys() == {"m.client", "m.expert.1"} and out["m.client"].shape == (4,)
    spent = privacy.ledger.spent()
    assert 3.9 < spent <= 4.0 + 1e-9
    assert privacy.noise_multiplier is not None and privacy.noise_multiplier > 0
    with pytest.raises(BudgetExceeded, match="budget"):  # a sixth round was never planned
        privacy.begin_round(5, total_rounds=5, local_steps=3, batch_size=2, num_train=50)
        privacy.release_embeddings(_per_example())
    assert len(privacy.ledger.releases) == 5  # the refused release was not recorded


def test_a_restart_keeps_what_was_spent(tmp_path: Path) -> None:
    config = DPConfig(epsilon=4.0, delta=1e-5)
    first = SiloPrivacy.open(config, tmp_path, "s")
    first.begin_round(0, total_rounds=4, local_steps=0, batch_size=1, num_train=10)
    first.release_embeddings(_per_example())
    assert (tmp_path / LEDGER_FILE).stat().st_mode & 0o777 == 0o600
    first.close()  # the process ends: its lock on the folder goes with it
    second = SiloPrivacy.open(config, tmp_path, "s")
    assert math.isclose(second.ledger.spent(), first.ledger.spent())
    # Recalibrated for the 3 rounds left on top of what was spent: still within budget.
    second.begin_round(1, total_rounds=4, local_steps=0, batch_size=1, num_train=10)
    for _ in range(3):
        second.release_embeddings(_per_example())
    assert second.ledger.spent() <= 4.0 + 1e-9


def test_dp_sgd_and_embeddings_share_one_budget(tmp_path: Path) -> None:
    config = DPConfig(epsilon=8.0, delta=1e-5, sgd=DPSGDConfig(enabled=True, noise_multiplier=1.2))
    privacy = SiloPrivacy.open(config, tmp_path, "s")
    for server_round in range(3):
        privacy.begin_round(server_round, total_rounds=3, local_steps=5, batch_size=2, num_train=40)
        privacy.charge_training(5, 2, 40)
        privacy.release_embeddings(_per_example())
    kinds = [r.kind for r in privacy.ledger.releases]
    assert kinds.count("dp-sgd") == 3 and kinds.count("embeddings") == 3
    history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in privacy.ledger.releases]
    assert math.isclose(privacy.ledger.spent(), compose_epsilon(history, 1e-5), rel_tol=1e-9)
    assert privacy.ledger.spent() <= 8.0 + 1e-9


def test_no_noise_when_dp_is_off(tmp_path: Path, caplog) -> None:
    privacy = SiloPrivacy.open(DPConfig(epsilon=math.inf), tmp_path, "s")
    privacy.begin_round(0, total_rounds=2, local_steps=1, batch_size=1, num_train=5)
    assert not privacy.protects_embeddings
    assert "dp_off" in caplog.text


def test_the_agent_says_when_only_the_embeddings_are_private(tmp_path: Path, caplog) -> None:
    privacy = SiloPrivacy.open(DPConfig(epsilon=8.0), tmp_path, "s")  # DP-SGD off
    privacy.begin_round(0, total_rounds=2, local_steps=1, batch_size=1, num_train=5)
    assert privacy.protects_embeddings and not privacy.protects_training
    assert "dp_sgd_off" in caplog.text and "LoRA updates leave WITHOUT DP" in caplog.text
    caplog.clear()
    sgd = SiloPrivacy.open(DPConfig(epsilon=8.0, sgd=DPSGDConfig(enabled=True)),
                           tmp_path / "sgd", "s")
    sgd.begin_round(0, total_rounds=2, local_steps=1, batch_size=1, num_train=5)
    assert "dp_sgd_off" not in caplog.text


def test_simulate_with_dp_runs_rsea_and_records_noise(tmp_path: Path) -> None:
    base = SimulationConfig(silos=3, rounds=2, local_steps=2, num_experts=6, b=4,
                            examples_per_silo=60, eval_limit=8, out_dir=str(tmp_path))
    clean = run_simulation(base, run_dir=tmp_path / "clean")
    noisy = run_simulation(replace(base, dp_epsilon=1.0), run_dir=tmp_path / "noisy")
    assert math.isfinite(noisy.mtal)
    # The noise reaches RSEA: the round-1 assignments differ from the noiseless run's
    # or, at the least, the final parameters do.
    assert any(not torch.equal(v, noisy.final_params[k]) for k, v in clean.final_params.items())


def test_agent_privacy_command_prints_the_ledger(tmp_path: Path) -> None:
    state = tmp_path / "state"
    privacy = SiloPrivacy.open(DPConfig(epsilon=4.0), state, "silo-0")
    privacy.begin_round(0, total_rounds=2, local_steps=0, batch_size=1, num_train=10)
    privacy.release_embeddings(_per_example())
    config = tmp_path / "silo.toml"
    config.write_text(f'silo_id = "silo-0"\nstate_dir = "{state}"\n[dp]\nepsilon = 4.0\n')
    result = CliRunner().invoke(app, ["agent", "privacy", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    assert '"releases": 1' in result.output and '"epsilon_budget": 4.0' in result.output
    table = CliRunner().invoke(app, ["agent", "privacy", "--config", str(config)])
    assert "epsilon spent" in table.output and "embeddings" in table.output


def test_dp_sgd_training_is_charged_and_moves_the_adapter(tmp_path: Path) -> None:
    from fedsilo.sdk.models.loading import load_model
    from fedsilo.sdk.training import LocalTrainer
    from fedsilo.simulation.engine import build_silo_data

    sim = SimulationConfig(silos=2, examples_per_silo=40, batch_size=2)
    loaded = load_model(sim.model, seed=0)
    trainer = LocalTrainer(loaded.model, loaded.tokenizer, build_silo_data(sim)[0],
                           sim.adapter(), sim.training(), seed=0, silo_id="s")
    config = DPConfig(epsilon=8.0, sgd=DPSGDConfig(enabled=True, noise_multiplier=1.0))
    trainer.privacy = SiloPrivacy.open(config, tmp_path, "s", torch.Generator().manual_seed(1))
    trainer.privacy.begin_round(0, total_rounds=2, local_steps=3, batch_size=2,
                                num_train=trainer.num_train)
    before = {k: v.clone() for k, v in trainer.extract().items()}
    stats = trainer.train(3, 1e-2, 0)
    assert len(stats.losses) == 3 and all(math.isfinite(x) for x in stats.losses)
    after = trainer.extract()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    (release,) = trainer.privacy.ledger.releases
    assert release.kind == "dp-sgd" and release.steps == 3
    assert math.isclose(release.sample_rate, 2 / trainer.num_train)
    embeddings = trainer.embed()  # noised and charged as well
    assert len(trainer.privacy.ledger.releases) == 2 and embeddings


def test_nan_embeddings_are_a_divergence_not_a_budget_problem(tmp_path: Path) -> None:
    from fedsilo.privacy.dp import NonFiniteValues

    privacy = SiloPrivacy.open(DPConfig(epsilon=4.0), tmp_path, "s")
    privacy.begin_round(0, total_rounds=2, local_steps=0, batch_size=1, num_train=10)
    broken = _per_example()
    broken["m.client"][3, 1] = float("nan")
    with pytest.raises(NonFiniteValues, match=r"m\.client hold NaN or inf.*nothing was released"):
        privacy.release_embeddings(broken)
    assert privacy.ledger.releases == []  # nothing charged
    assert not isinstance(NonFiniteValues("x"), BudgetExceeded)
