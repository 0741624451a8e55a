"""A silo's differential privacy across a federation: the noise calibrated once for the
planned rounds, every release charged to the ledger *before* it leaves, the ledger saved
at once (a crash after a release must not forget it).

The trainer asks this object; strategies and loops never see DP. A round that is re-run
after a crash releases fresh noise and is charged again: it is a new release.

One writer per ledger: only the process holding the state folder's lock (`.lock`,
:class:`~fedsilo.sdk.files.FolderLock`, the agent's) may charge it, and every charge checks
that it still holds it; `read_only` opens (`fedsilo agent privacy`) take no lock, so they
never block the agent, and cannot charge.
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
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
from fedsilo.privacy.dpsgd import dpsgd_release, private_gradients
from fedsilo.privacy.ledger import LedgerError, LedgerRecord, PrivacyLedger, Release
from fedsilo.sdk.files import FolderLock, holds_folder_lock
from fedsilo.sdk.logs import log_event

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy-ledger.json"


@dataclass
class SiloPrivacy:
    """`generator` draws the noise: OS entropy in deployments (the default); a seeded one
    only in simulation, where reproducibility matters more than secrecy. What the trainer
    calls is fedsilo.sdk.training.TrainingPrivacy."""

    config: DPConfig
    ledger: PrivacyLedger
    path: Path | None = None
    generator: torch.Generator | None = None
    silo_id: str = "silo"
    noise_multiplier: float | None = None  # embeddings; calibrated at the first round
    round: int = 0
    _announced: bool = field(default=False, repr=False)
    read_only: bool = False  # opened to look (no lock taken): charging is refused
    _own_lock: FolderLock | None = field(default=None, repr=False)

    @classmethod
    def open(cls, config: DPConfig, state_dir: Path | None, silo_id: str,
             generator: torch.Generator | None = None, *, lock: FolderLock | None = None,
             read_only: bool = False, recorded: LedgerRecord | None = None) -> SiloPrivacy:
        """The silo's ledger from `state_dir` (a fresh one if none): budgets never reset.

        Writers hold `state_dir`'s lock: `lock` is the one the caller holds (the agent's);
        without it this object takes the lock itself and holds it until :meth:`close`
        (FolderInUse if another process holds it). `read_only` takes none and cannot charge.
        `recorded` is what the checkpoint remembers of the ledger: a ledger missing, shorter
        than it or different from it is refused (LedgerError); one with more releases is
        kept (spend charged before a crash prevented the checkpoint) and logged.
        """
        if state_dir is None:
            return cls(config, PrivacyLedger(config.epsilon, config.delta, config.accountant),
                       None, generator, silo_id)
        folder = Path(state_dir)
        path = folder / LEDGER_FILE
        own: FolderLock | None = None
        if not read_only and lock is None:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            own = FolderLock(folder, f"privacy-ledger writer of {silo_id}")
            own.acquire()
        elif not read_only:
            assert lock is not None
            if not _same_folder(lock.path.parent, folder) or not holds_folder_lock(folder):
                raise LedgerError(
                    f"cannot open {path} for writing: this process does not hold the lock of "
                    f"{folder} ({FolderLock.NAME}); only the process holding it may charge "
                    "the ledger"
                )
        try:
            ledger = PrivacyLedger.load(path, epsilon=config.epsilon, delta=config.delta,
                                        accountant=config.accountant, recorded=recorded)
        except BaseException:
            if own is not None:
                own.release()
            raise
        privacy = cls(config, ledger, path, generator, silo_id, read_only=read_only,
                      _own_lock=own)
        if own is not None:
            weakref.finalize(privacy, own.release)  # dropped without close(): still released
        if recorded is not None and len(ledger.releases) > recorded.releases:
            log_event(log, "privacy_ledger_ahead", logging.WARNING, silo=silo_id,
                      path=str(path), releases=len(ledger.releases),
                      recorded=recorded.releases, checkpoint=recorded.source,
                      effect="spend charged before a release whose checkpoint was not "
                      "written (a crash): kept")
        return privacy

    def close(self) -> None:
        """Release the state folder's lock if this object took it (not the caller's)."""
        if self._own_lock is not None:
            self._own_lock.release()
            self._own_lock = None

    @property
    def protects_embeddings(self) -> bool:
        return self.config.adds_noise

    @property
    def protects_training(self) -> bool:
        return self.config.enabled and self.config.sgd.enabled

    def begin_round(self, server_round: int, total_rounds: int, local_steps: int,
                    batch_size: int, num_train: int) -> None:
        """Calibrate the embedding noise for the rounds still planned (once), so that they
        and the planned DP-SGD steps together spend at most the budget."""
        self.round = server_round
        if not self._announced:
            self._announced = True
            if not self.config.enabled or not math.isfinite(self.config.epsilon):
                log_event(log, "dp_off", logging.WARNING, silo=self.silo_id,
                          reason="dp.enabled = false" if not self.config.enabled
                          else "dp.epsilon = inf",
                          effect="embeddings and adapter updates leave WITHOUT noise")
            elif not self.protects_training:
                log_event(log, "dp_sgd_off", logging.WARNING, silo=self.silo_id,
                          effect="the embeddings are DP; the LoRA updates leave WITHOUT DP "
                          "(the aggregator, and silos that train the same experts, see "
                          "them); set [dp.sgd] enabled = true to protect them")
        if not self.protects_embeddings or self.noise_multiplier is not None:
            return
        remaining = max(1, total_rounds - server_round)
        planned: list[Release] = list(self.ledger.releases)
        if self.protects_training and local_steps > 0:
            sgd = dpsgd_release(server_round, local_steps, min(batch_size, num_train), num_train,
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

    def private_gradients(self, params: Sequence[torch.nn.Parameter],
                          example_losses: Sequence[Callable[[], Tensor]]) -> None:
        """DP-SGD gradients of one batch (`private_gradients`) with the configured clip and
        noise, drawn from `generator`; the round's charge was taken by `charge_training`."""
        sgd = self.config.sgd
        private_gradients(params, example_losses, clip=sgd.clip,
                          noise_multiplier=sgd.noise_multiplier, generator=self.generator)

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
        self._check_writer()
        self.ledger.charge([release])  # BudgetExceeded: nothing recorded, nothing released
        if self.path is not None:
            self.ledger.save(self.path)
        log_event(log, "dp_release", silo=self.silo_id, kind=release.kind, round=release.round,
                  noise_multiplier=release.noise_multiplier, epsilon_spent=self.ledger.spent(),
                  epsilon_budget=self.config.epsilon)

    def _check_writer(self) -> None:
        """Refuse to charge unless this process holds the state folder's lock now."""
        if self.path is None:
            return
        if self.read_only:
            raise LedgerError(
                f"{self.path} was opened read-only: only the agent holding "
                f"{self.path.parent / FolderLock.NAME} may charge it"
            )
        if not holds_folder_lock(self.path.parent):
            raise LedgerError(
                f"refusing to charge {self.path}: this process (pid {os.getpid()}) no longer "
                f"holds the lock of {self.path.parent} ({FolderLock.NAME} was released, "
                "deleted or taken by another process), so another process may be writing "
                "the ledger. Nothing was recorded or released. Stop every agent on this "
                "state_dir and start one"
            )


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


__all__ = ["LEDGER_FILE", "SiloPrivacy"]
