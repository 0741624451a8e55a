"""A silo's personalised model outside the federation: export it from a run folder or an
agent's state_dir, load it as a Hugging Face causal LM, generate with it, score it again."""

from .config import (
    ADAPTER_FILE,
    CONFIG_FILE,
    MERGED_DIR,
    PEFT_DIR,
    BaseModelRef,
    PersonalisedConfig,
    PersonalisedError,
    fedsilo_version,
    read_personalised_config,
)
from .evaluate import SiloScore, evaluate_run, own_test_split, spec_examples
from .export import export_personalised, export_run, personalise, write_peft
from .loading import build_personalised_model, complete, load_base_model, load_personalised
from .record import (
    SiloRun,
    adapter_metadata,
    locate_silo_adapter,
    read_silo_run,
    silo_provenance,
)

__all__ = [
    "ADAPTER_FILE",
    "CONFIG_FILE",
    "MERGED_DIR",
    "PEFT_DIR",
    "BaseModelRef",
    "PersonalisedConfig",
    "PersonalisedError",
    "SiloRun",
    "SiloScore",
    "adapter_metadata",
    "build_personalised_model",
    "complete",
    "evaluate_run",
    "export_personalised",
    "export_run",
    "fedsilo_version",
    "load_base_model",
    "load_personalised",
    "locate_silo_adapter",
    "own_test_split",
    "personalise",
    "read_personalised_config",
    "read_silo_run",
    "silo_provenance",
    "spec_examples",
    "write_peft",
]
