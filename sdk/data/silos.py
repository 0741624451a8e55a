"""One federation's data, cut into per-silo splits: what simulation gives each silo, and
what an agent reproduces for its own index in demos and tests (`[data] partitions`).

A real silo reads only its own data (a dataset description file) with `partitions = 1`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedsilo.sdk.data.examples import DataError, Example, SiloData, TaskInfo
from fedsilo.sdk.data.loading import load_examples
from fedsilo.sdk.data.partition import partition as partition_groups
from fedsilo.sdk.data.presets import resolve_dataset
from fedsilo.sdk.data.splits import split_silo
from fedsilo.sdk.data.synthetic import synthetic_federation

SYNTHETIC = "synthetic"


def build_silo_data(
    source: str | None,
    num_silos: int,
    seed: int,
    examples_per_silo: int,
    partition: str = "dirichlet",
    alpha: float = 1.0,
    data_dir: str | None = None,
) -> list[SiloData]:
    """Per-silo train/emb/val/test splits of `source` (None or "synthetic": the embedded
    multi-task set; else a preset name or a dataset description file)."""
    if num_silos < 1:
        raise DataError(f"the number of silos must be >= 1 (got {num_silos})")
    rng = np.random.default_rng(seed)
    if source is None or source == SYNTHETIC:
        per_silo, task = synthetic_federation(
            num_silos, seed, examples_per_silo=examples_per_silo
        )
    else:
        spec = resolve_dataset(source, data_dir)
        examples, task = load_examples(spec, limit=num_silos * examples_per_silo, seed=seed)
        groups = [e.group or "" for e in examples]
        parts = partition_groups(groups, num_silos, partition, rng, alpha=alpha)
        per_silo = [[examples[i] for i in idx] for idx in parts]
    return [_split(examples, task, rng) for examples in per_silo]


def _split(examples: Sequence[Example], task: TaskInfo, rng: np.random.Generator) -> SiloData:
    data = split_silo(examples, task, rng)
    if not data.train or not data.test:
        raise DataError(
            f"a silo got {len(examples)} examples, too few to split into train and test; "
            "raise the examples per silo or lower the number of silos"
        )
    return data
