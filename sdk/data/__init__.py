"""Data for fedsilo: loading, templates, partitioning, per-silo splits, synthetic tasks and
tokenisation. Files are read from local disk only; nothing is downloaded."""

from .examples import DataError, Example, SiloData, TaskInfo
from .loading import DatasetSpec, infer_format, load_examples
from .partition import (
    SCHEMES,
    dirichlet_partition,
    iid_partition,
    label_per_silo_partition,
    partition,
)
from .presets import ENV_VAR, PRESETS, data_dir, resolve_dataset
from .splits import SplitConfig, build_silos, split_silo
from .synthetic import CANDIDATES, FAMILY_NAMES, family_mix, synthetic_federation
from .templates import ALPACA, CLASSIFY, SNLI, TEMPLATES, PromptTemplate, get_template
from .tokenize import (
    IGNORE_INDEX,
    EncodedExample,
    TrainStream,
    batches,
    collate,
    encode_example,
    encode_examples,
    eos_id,
    pad_id,
)

__all__ = [
    "ALPACA",
    "CANDIDATES",
    "CLASSIFY",
    "ENV_VAR",
    "FAMILY_NAMES",
    "IGNORE_INDEX",
    "PRESETS",
    "SCHEMES",
    "SNLI",
    "TEMPLATES",
    "DataError",
    "DatasetSpec",
    "EncodedExample",
    "Example",
    "PromptTemplate",
    "SiloData",
    "SplitConfig",
    "TaskInfo",
    "TrainStream",
    "batches",
    "build_silos",
    "collate",
    "data_dir",
    "dirichlet_partition",
    "encode_example",
    "encode_examples",
    "eos_id",
    "family_mix",
    "get_template",
    "iid_partition",
    "infer_format",
    "label_per_silo_partition",
    "load_examples",
    "pad_id",
    "partition",
    "resolve_dataset",
    "split_silo",
    "synthetic_federation",
]
