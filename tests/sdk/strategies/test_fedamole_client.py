"""FedAMoLE's silo half: where its client embedding comes from, and what DP charges for it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsilo.privacy.dp import DPConfig
from fedsilo.privacy.silo import SiloPrivacy
from fedsilo.sdk.amole.model import embeddings_to_tensors, pooled_embeddings
from fedsilo.sdk.messages import RoundPlan
from fedsilo.sdk.models.loading import load_model
from fedsilo.sdk.params import client_embedding_key, parse_expert_embedding
from fedsilo.sdk.strategies import FedAMoLEConfig, get_strategy
from fedsilo.sdk.strategies.base import ClientStrategy
from fedsilo.sdk.training import LocalTrainer
from fedsilo.simulation.engine import SimulationConfig, build_silo_data

SIM = SimulationConfig(silos=2, examples_per_silo=40, batch_size=2, num_experts=4, b=4)


def _trainer_and_plan() -> tuple[LocalTrainer, RoundPlan]:
    loaded = load_model(SIM.model, seed=0)
    trainer = LocalTrainer(loaded.model, loaded.tokenizer, build_silo_data(SIM)[0],
                           SIM.adapter(), SIM.training(), seed=0, silo_id="silo-0")
    server = get_strategy("fedamole").server(SIM.adapter(), SIM.strategy_config(), 0)
    server.initialize(trainer.shapes(), ["silo-0", "silo-1"])
    silo_plan = server.configure_round(0, ["silo-0", "silo-1"])["silo-0"]
    plan = RoundPlan(0, "silo-0", 3, 1e-2, SIM.batch_size, silo_plan.assignment,
                     silo_plan.params)
    return trainer, plan


def _now(trainer: LocalTrainer) -> dict[str, torch.Tensor]:
    """The embeddings of the trainer's model as it is now (eqs. 23, 25)."""
    return embeddings_to_tensors(pooled_embeddings(trainer.embedding_pass()))


def _client(client_embedding: str) -> ClientStrategy:
    return get_strategy("fedamole").client(
        FedAMoLEConfig(client_embedding=client_embedding)  # type: ignore[arg-type]
    )


def test_received_client_embedding_is_the_one_before_local_training() -> None:
    trainer, plan = _trainer_and_plan()
    trainer.install(plan.assignment, plan.params)
    received = _now(trainer)
    upload = _client("received").run_round(plan, trainer)
    trained = _now(trainer)
    assert set(upload.embeddings) == set(trained)
    for key, value in upload.embeddings.items():
        if parse_expert_embedding(key) is None:  # client part: as received
            assert torch.allclose(value, received[key], atol=1e-6), key
            assert not torch.allclose(value, trained[key], atol=1e-6), key
        else:  # expert part: as trained
            assert torch.allclose(value, trained[key], atol=1e-6), key


def test_trained_client_embedding_is_the_papers() -> None:
    trainer, plan = _trainer_and_plan()
    upload = _client("trained").run_round(plan, trainer)
    trained = _now(trainer)
    for key, value in upload.embeddings.items():
        assert torch.allclose(value, trained[key], atol=1e-6), key


def test_with_dp_both_passes_are_one_release(tmp_path: Path) -> None:
    trainer, plan = _trainer_and_plan()
    trainer.privacy = SiloPrivacy.open(DPConfig(epsilon=8.0), tmp_path, "silo-0",
                                       torch.Generator().manual_seed(1))
    trainer.privacy.begin_round(0, total_rounds=1, local_steps=3, batch_size=2,
                                num_train=trainer.num_train)
    upload = _client("received").run_round(plan, trainer)
    (release,) = trainer.privacy.ledger.releases  # one vector per example, clipped once
    assert release.kind == "embeddings"
    module = next(iter(plan.assignment))
    assert upload.embeddings[client_embedding_key(module)].shape == (SIM.r,)


def test_unknown_client_embedding_is_refused() -> None:
    with pytest.raises(ValueError, match=r"strategy.client_embedding = 'before'.*'received'"):
        FedAMoLEConfig(client_embedding="before")  # type: ignore[arg-type]
