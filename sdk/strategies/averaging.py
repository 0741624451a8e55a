"""The averaging base every server strategy extends (as Flower's FedProx extends FedAvg).

It holds what the algorithms share: the weighting of an upload, the running sums of the
open round, who was folded into it, and the settings a checkpoint records. A variant
overrides `fold` (what one upload adds) and `end_round` (what the sums become); it never
checks for a silo's second upload of a round: `aggregator.coordinator.Aggregator.offer`
refuses those before a strategy sees them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from torch import Tensor

from fedsilo.sdk.aggregation.fedavg import TensorMean
from fedsilo.sdk.aggregation.robust import new_mean
from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.checkpoint import check_settings, take_namespace
from fedsilo.sdk.messages import Upload
from fedsilo.sdk.params import TensorDict
from fedsilo.sdk.strategies.base import ServerStrategy
from fedsilo.sdk.strategies.config import StrategyConfig, own_knobs


class AveragingServer(ServerStrategy):
    """FedAvg's bookkeeping: `begin_round` opens fresh sums, `accumulate` folds one upload
    in with its weight ("uniform": 1 each; "samples": its sample count)."""

    name: str
    """The strategy's registry name, recorded in its checkpoint settings."""

    def __init__(self, adapter: AMoLEConfig, config: StrategyConfig, seed: int) -> None:
        self.adapter = adapter
        self.config = config
        self.seed = seed
        self._params: TensorDict = {}
        self._sum = self.parameter_mean()
        self._uploaded: list[str] = []  # silos folded into the open round

    @property
    def global_params(self) -> TensorDict:
        return self._params

    def validate(self, num_silos: int) -> None:
        self.config.check_contributors(num_silos)

    def begin_round(self, server_round: int) -> None:
        self._sum = self.parameter_mean()
        self._uploaded = []

    def accumulate(self, upload: Upload) -> None:
        self.fold(upload)
        self._uploaded.append(upload.silo_id)

    def fold(self, upload: Upload) -> None:
        """Add one upload to the open round's sums (by default its params, weighted)."""
        self._sum.add(upload.params, self.weight(upload))

    def parameter_mean(self) -> TensorMean:
        """A fresh accumulator for a round's parameters under `config.aggregation`."""
        return new_mean(self.config.aggregation, self.config.trim, self.config.min_contributors)

    def weight(self, upload: Upload) -> float:
        return float(upload.n_samples) if self.config.weighting == "samples" else 1.0

    def settings(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed (`checkpoint.check_settings`)."""
        return {
            "strategy": self.name,
            "seed": self.seed,
            "config": self.config.settings(),
            "adapter": asdict(self.adapter),
        }

    def check_resumable(self, meta: Mapping[str, Any]) -> None:
        """Refuse a checkpoint written under other settings (`checkpoint.check_settings`),
        comparing only this strategy's knobs (`config.own_knobs`)."""
        saved = meta.get("settings")
        if isinstance(saved, dict) and isinstance(saved.get("config"), dict):
            saved = {**saved, "config": own_knobs(type(self.config), saved["config"])}
            meta = {**meta, "settings": saved}
        check_settings(meta, self.settings())

    def load_sum(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore the running sums from `self._sum.state_dict()` saved under `sum/`."""
        self._sum = self.parameter_mean()
        self._sum.load_state_dict(
            take_namespace("sum", tensors, self._sum.tensor_names(meta)), meta
        )
