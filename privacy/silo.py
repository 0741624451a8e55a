"""A silo's differential privacy across a federation: the noise calibrated once for the
planned rounds, every release charged to the ledger *before* it leaves, the ledger saved
at once (a crash after a release must not forget it).

The trainer asks this object; strategies and loops never see DP. A round that is re-run
after a crash releases fresh noise and is charged again: it is a new release.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fedsilo.privacy.dp import (
    DPConfig,
    NonFiniteValues,
    embeddings_release,
    noise_multiplier_for,
    private_mean,
)
from fedsilo.privacy.dpsgd import dpsgd_release
from fedsilo.privacy.ledger import PrivacyLedger, Release
from fedsilo.sdk.logs import log_event

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy-ledger.json"


@dataclass
class SiloPrivacy:
    """`generator` draws the noise: OS entropy in deployments (the default); a seeded one
    only in simulation, where reproducibility matters more than secrecy."""

    config: DPConfig
    ledger: PrivacyLedger
    path: Path | None = None
    generator: torch.Generator | None = None
    silo_id: str = "silo"
    noise_multiplier: float | None = None  # embeddings; calibrated at the first round
    round: int = 0
    _announced: bool = field(default=False, repr=False)

    @classmethod
    def open(cls, config: DPConfig, state_dir: Path | None, silo_id: str,
             generator: torch.Generator | None = None) -> SiloPrivacy:
        """The silo's ledger from `state_dir` (a fresh one if none): budgets never reset."""
        path = None if state_dir is None else Path(state_dir) / LEDGER_FILE
        if path is not None:
            ledger = PrivacyLedger.load(path, epsilon=config.epsilon, delta=config.delta,
                                        accountant=config.accountant)
        else:
            ledger = PrivacyLedger(config.epsilon, config.delta, config.accountant)
        return cls(config, ledger, path, generator, silo_id)

    @property
    def protects_embeddings(self) -> bool:
        return self.config.adds_noise

    @property
    def protects_training(self) -> bool:
        return self.config.enabled and self.config.sgd.enabled

    def begin_round(self, round: int, total_rounds: int, local_steps: int, batch_size: int,
                    num_train: int) -> None:
        """Calibrate the embedding noise for the rounds still planned (once), so that they
        and the planned DP-SGD steps together spend at most the budget."""
        self.round = round
        if not self._announced:
            self._announced = True
            if not self.config.enabled or not math.isfinite(self.config.epsilon):
                log_event(log, "dp_off", logging.WARNING, silo=self.silo_id,
                          reason="dp.enabled = false" if not self.config.enabled
                          else "dp.epsilon = inf",
                          effect="embeddings and adapter updates leave WITHOUT noise")
        if not self.protects_embeddings or self.noise_multiplier is not None:
            return
        remaining = max(1, total_rounds - round)
        planned: list[Release] = list(self.ledger.releases)
        if self.protects_training and local_steps > 0:
            sgd = dpsgd_release(round, local_steps, min(batch_size, num_train), num_train,
                                self.config.sgd)
            planned += [sgd] * remaining
        self.noise_multiplier = noise_multiplier_for(
            self.config.epsilon, self.config.delta, releases=remaining,
            accountant=self.config.accountant, prior=planned,
        )
        log_event(log, "dp_calibrated", silo=self.silo_id, epsilon=self.config.epsilon,
                  delta=self.config.delta, clip=self.config.clip, rounds=remaining,
                  noise_multiplier=self.noise_multiplier,
                  dp_sgd=self.protects_training, spent=self.ledger.spent())

    def charge_training(self, steps: int, batch_size: int, num_train: int) -> None:
        """Charge this round's DP-SGD before it starts (BudgetExceeded refuses it)."""
        if self.protects_training and steps > 0:
            self._charge(dpsgd_release(self.round, steps, min(batch_size, num_train),
                                       num_train, self.config.sgd))

    def release_embeddings(self, per_example: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Clip per example, sum, add noise, divide by the (public) count: charged first."""
        assert self.noise_multiplier is not None, "begin_round calibrates the noise first"
        for key, value in per_example.items():
            if not bool(torch.isfinite(value).all()):
                raise NonFiniteValues(
                    f"the embeddings {key} hold NaN or inf: the model diverged (or the data "
                    "is broken); nothing was released or charged"
                )
        self._charge(embeddings_release(self.round, noise_multiplier=self.noise_multiplier,
                                        clip=self.config.clip))
        return private_mean(per_example, clip=self.config.clip,
                            noise_multiplier=self.noise_multiplier, generator=self.generator)

    def _charge(self, release: Release) -> None:
        self.ledger.charge([release])  # BudgetExceeded: nothing recorded, nothing released
        if self.path is not None:
            self.ledger.save(self.path)
        log_event(log, "dp_release", silo=self.silo_id, kind=release.kind, round=release.round,
                  noise_multiplier=release.noise_multiplier, epsilon_spent=self.ledger.spent(),
                  epsilon_budget=self.config.epsilon)


__all__ = ["LEDGER_FILE", "SiloPrivacy"]
