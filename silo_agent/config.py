"""silo.toml: what belongs to one organisation (identity, data, base model, broker).

Training settings are not here: the aggregator sends them in every plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fedsilo.privacy.dp import DPConfig
from fedsilo.privacy.settings import SecuritySettings
from fedsilo.sdk.config.loader import NamesOrPaths
from fedsilo.sdk.transport.settings import BrokerSettings

_SYNTHETIC = NamesOrPaths("synthetic")


@dataclass(frozen=True)
class DataSection:
    """The silo's data. A real silo points `source` at its own dataset description file
    (partitions = 1). Demos and tests cut a shared set into `partitions` the way
    `fedsilo simulate` does and keep part `index`."""

    source: NamesOrPaths = _SYNTHETIC
    """synthetic | agnews | sst2 | snli | dolly | path/to/dataset.toml (a relative path is
    resolved against this file's folder, like every path in silo.toml)"""
    data_dir: str | None = None
    partitions: int = 1
    index: int = 0
    partition: Literal["dirichlet", "label", "iid"] = "dirichlet"
    alpha: float = 1.0
    examples: int = 300
    """Examples drawn per partition."""

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ValueError(f"partitions must be >= 1 (got {self.partitions})")
        if not 0 <= self.index < self.partitions:
            raise ValueError(
                f"index must be in [0, {self.partitions}) for {self.partitions} partitions "
                f"(got {self.index})"
            )
        if self.examples < 2:
            raise ValueError(f"examples must be >= 2 (got {self.examples})")


@dataclass(frozen=True)
class SiloConfig:
    silo_id: str = ""
    state_dir: Path = Path("state/silo")
    model: str = "builtin:tiny"
    """builtin:tiny | smollm2 | a local Hugging Face folder | a .gguf file"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    seed: int = 0
    """Seed of the built-in demo models' random weights and of cutting demo partitions
    (the same as the federation's seed to reproduce `fedsilo simulate`)."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    poll_s: float = 1.0
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    dp: DPConfig = field(default_factory=DPConfig)
    """Differential privacy of what this silo releases; the silo decides, not the aggregator."""
    data: DataSection = field(default_factory=DataSection)

    def __post_init__(self) -> None:
        if not self.silo_id or not all(c.isalnum() or c in "-_." for c in self.silo_id):
            raise ValueError(
                "silo_id must be set, using only letters, digits, '-', '_' and '.' "
                f"(got {self.silo_id!r}); it must match an id in the federation's roster"
            )
        if self.threads < 0 or not self.poll_s > 0:
            raise ValueError("threads must be >= 0 and poll_s > 0")
