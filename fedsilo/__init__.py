"""fedsilo: personalised federated fine-tuning of LLMs across data silos.

The packages live in the repository's top-level folders (`fedsilo.sdk`, `fedsilo.cli`, ...,
see README "Layout"); this module only offers the few names a user reaches for first:

    import fedsilo
    model, tokenizer = fedsilo.load_personalised("exports/silo-0")

They are imported on first use, so `import fedsilo.sdk.params` costs no more than before.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedsilo.sdk.personalised import (
        PersonalisedConfig,
        export_personalised,
        load_personalised,
        read_personalised_config,
    )

_LAZY = {
    "load_personalised": "fedsilo.sdk.personalised",
    "export_personalised": "fedsilo.sdk.personalised",
    "read_personalised_config": "fedsilo.sdk.personalised",
    "PersonalisedConfig": "fedsilo.sdk.personalised",
}

__all__ = ["PersonalisedConfig", "__version__", "export_personalised", "load_personalised",
           "read_personalised_config"]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        try:
            return importlib.metadata.version("fedsilo")
        except importlib.metadata.PackageNotFoundError:  # a bare checkout, not installed
            return "0+unknown"
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedsilo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
