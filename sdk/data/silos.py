"""One federation's data, cut into per-silo splits: what simulation gives each silo, and
what an agent reproduces for its own index in demos and tests (`[data] partitions`).

A real silo reads only its own data (a dataset description file) with `partitions = 1`.

A comma-separated source ("agnews,sst2,snli") is a feature-skewed federation: silo i holds
the (i mod n)-th data set, and the silos sharing one data set partition it among
themselves as a single-source federation would.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedsilo.sdk.data.examples import DataError, Example, SiloData, TaskInfo
from fedsilo.sdk.data.loading import load_examples
from fedsilo.sdk.data.partition import partition as partition_groups
from fedsilo.sdk.data.presets import resolve_dataset
from fedsilo.sdk.data.splits import SplitConfig, split_silo
from fedsilo.sdk.data.synthetic import synthetic_federation

SYNTHETIC = "synthetic"


def data_sources(source: str | None) -> list[str]:
    """The data sets of a federation: "agnews,sst2" -> ["agnews", "sst2"]; None or ""
    -> ["synthetic"]. Raises DataError on an empty entry or a repeated data set."""
    if source is None or not source.strip():
        return [SYNTHETIC]
    entries = [part.strip() for part in source.split(",")]
    if any(not e for e in entries):
        raise DataError(
            f"data {source!r} has an empty entry; list data sets separated by commas, "
            "e.g. 'agnews,sst2,snli'"
        )
    seen = [e.lower() for e in entries]
    repeated = sorted({e for e in seen if seen.count(e) > 1})
    if repeated:
        raise DataError(
            f"data {source!r} names {', '.join(repeated)} more than once; list each data set "
            "once (the silos that share a data set partition it among themselves)"
        )
    return entries


def silo_sources(source: str | None, num_silos: int) -> list[str]:
    """Which data set each silo holds: silo i takes the (i mod n)-th entry."""
    sources = data_sources(source)
    if num_silos < len(sources):
        raise DataError(
            f"{len(sources)} data sets ({', '.join(sources)}) need at least {len(sources)} "
            f"silos, got {num_silos}; add silos or list fewer data sets"
        )
    return [sources[i % len(sources)] for i in range(num_silos)]


def build_silo_data(
    source: str | None,
    num_silos: int,
    seed: int,
    examples_per_silo: int,
    partition: str = "dirichlet",
    alpha: float = 1.0,
    data_dir: str | None = None,
    split: SplitConfig | None = None,
    min_size: int = 10,
) -> list[SiloData]:
    """Per-silo train/emb/val/test splits of `source` (None or "synthetic": the embedded
    multi-task set; else a preset name, a dataset description file, or several of them
    separated by commas). `min_size` is the partition's smallest silo."""
    if num_silos < 1:
        raise DataError(f"the number of silos must be >= 1 (got {num_silos})")
    split = split or SplitConfig()
    holders = silo_sources(source, num_silos)
    sources = data_sources(source)
    if len(sources) == 1:
        # One generator for partition and splits: the single-source federation as before.
        return _one_source(sources[0], num_silos, seed, examples_per_silo, partition, alpha,
                           data_dir, split, min_size, np.random.default_rng(seed))
    out: list[SiloData | None] = [None] * num_silos
    for k, name in enumerate(sources):
        members = [i for i, held in enumerate(holders) if held == name]
        parts = _one_source(name, len(members), seed, examples_per_silo, partition, alpha,
                            data_dir, split, min_size, np.random.default_rng([seed, k]))
        for silo, data in zip(members, parts, strict=True):
            out[silo] = data
    return [data for data in out if data is not None]


def _one_source(
    source: str, num_silos: int, seed: int, examples_per_silo: int, partition: str,
    alpha: float, data_dir: str | None, split: SplitConfig, min_size: int,
    rng: np.random.Generator,
) -> list[SiloData]:
    if source == SYNTHETIC:
        per_silo, task = synthetic_federation(
            num_silos, seed, examples_per_silo=examples_per_silo
        )
    else:
        spec = resolve_dataset(source, data_dir)
        examples, task = load_examples(spec, limit=num_silos * examples_per_silo, seed=seed)
        groups = [e.group or "" for e in examples]
        parts = partition_groups(groups, num_silos, partition, rng, alpha=alpha,
                                 min_size=min_size)
        per_silo = [[examples[i] for i in idx] for idx in parts]
    return [_split(examples, task, rng, split) for examples in per_silo]


def _split(
    examples: Sequence[Example], task: TaskInfo, rng: np.random.Generator, split: SplitConfig
) -> SiloData:
    data = split_silo(examples, task, rng, split)
    if not data.train or not data.test:
        raise DataError(
            f"a silo got {len(examples)} examples, too few to split into train and test; "
            "raise the examples per silo or lower the number of silos"
        )
    return data
