"""The silo's loop: take a plan, let the strategy act on the local model, upload."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import save as serialize

from fedsilo.sdk.files import write_atomic
from fedsilo.sdk.messages import RoundPlan, Upload
from fedsilo.sdk.personalised.record import adapter_metadata
from fedsilo.sdk.strategies.base import ClientStrategy
from fedsilo.sdk.training import LocalTrainer
from fedsilo.sdk.transport.base import Transport

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"


class SiloAgent:
    def __init__(
        self,
        silo_id: str,
        client: ClientStrategy,
        trainer: LocalTrainer,
        transport: Transport,
        out_dir: Path | None = None,
        provenance: Mapping[str, str] | None = None,
    ) -> None:
        self.silo_id = silo_id
        self.client = client
        self.trainer = trainer
        self.transport = transport
        self.out_dir = out_dir
        # Recorded with the adapter (strategy, base model, data): `silo_provenance`.
        self.provenance = dict(provenance or {})

    def poll(self, timeout: float | None = None) -> Upload | None:
        """Handle the next plan if one is waiting; returns what was uploaded."""
        delivery = self.transport.receive_plan(self.silo_id, timeout=timeout)
        if delivery is None:
            return None
        upload = self.handle(delivery.message)
        delivery.ack()
        return upload

    def handle(self, plan: RoundPlan) -> Upload:
        if plan.silo_id != self.silo_id:
            raise ValueError(f"plan for {plan.silo_id!r} reached silo {self.silo_id!r}")
        privacy = self.trainer.privacy
        if privacy is not None and not plan.final:
            privacy.begin_round(plan.round, plan.total_rounds, plan.local_steps,
                                self.trainer.config.batch_size, self.trainer.num_train)
        upload = self.client.run_round(plan, self.trainer)
        self.transport.send_upload(upload)
        if plan.final and self.out_dir is not None:
            self.save_adapter(self.out_dir / ADAPTER_FILE, plan)
        return upload

    def save_adapter(self, path: Path, plan: RoundPlan) -> None:
        """The silo's personalised adapter: every adapter tensor it holds, what the strategy
        keeps on the silo (under `client/`, e.g. FDLoRA's personal LoRA and fusion), and
        its architecture, with what `fedsilo export` needs to use it alone (adapter settings,
        and the strategy, base model and data the agent was given as `provenance`)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "silo_id": self.silo_id,
            "round": str(plan.round),
            "assignment": json.dumps(self.trainer.assignment()),
            **adapter_metadata(self.trainer.adapter, self.trainer.config),
            **self.provenance,
        }
        tensors = self.trainer.state()
        tensors.update({f"client/{k}": v for k, v in self.client.state_dict().items()})
        # Owner-only and atomic: the adapter is learned from the silo's private data.
        write_atomic(path, serialize(tensors, metadata=metadata), mode=0o600)
        log.info("saved personalised adapter of %s to %s", self.silo_id, path)
