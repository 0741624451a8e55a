"""The exported personalised model's config file: what a folder needs to be used alone.

Why a typed file of its own: an exported folder travels without the run that made it, so it
must name its base model (and the digest of its weights, to refuse another one), the adapter
settings and the silo's architecture to install the tensors, and the prompt format to ask
it questions as in training.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.data.recipe import PromptFormat

FORMAT = "fedsilo-personalised"
FORMAT_VERSION = 1
CONFIG_FILE = "personalised.json"
ADAPTER_FILE = "adapter.safetensors"
PEFT_DIR = "peft"
MERGED_DIR = "merged"


class PersonalisedError(ValueError):
    """A folder that cannot be exported, loaded or evaluated; the message says what is
    missing and what to do."""


def fedsilo_version() -> str:
    """The installed fedsilo's version (recorded with every adapter and export)."""
    try:
        return importlib.metadata.version("fedsilo")
    except importlib.metadata.PackageNotFoundError:  # running from a bare checkout
        return "0+unknown"


@dataclass(frozen=True)
class BaseModelRef:
    """The backbone an adapter was trained on, as `load_model` takes it."""

    source: str
    """builtin:tiny | smollm2 | a local Hugging Face folder | a .gguf file"""
    dtype: str = "float32"
    seed: int = 0
    """Seed of a built-in model's random weights (ignored for real models)."""
    digest: str = ""
    """`weights_digest` of the backbone: another model with the same shapes is refused."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BaseModelRef:
        return cls(str(data["source"]), str(data.get("dtype", "float32")),
                   int(data.get("seed", 0)), str(data.get("digest", "")))


def adapter_from_json(data: Mapping[str, Any]) -> AMoLEConfig:
    known = {f.name for f in fields(AMoLEConfig)}
    return AMoLEConfig(**{k: v for k, v in data.items() if k in known})


def adapter_to_json(adapter: AMoLEConfig) -> dict[str, Any]:
    data = asdict(adapter)
    data["target_modules"] = list(adapter.target_modules)
    return data


@dataclass(frozen=True)
class PersonalisedConfig:
    """`personalised.json`: one silo's personalised model, ready to install."""

    silo_id: str
    strategy: str
    round: int
    """The run's last round (the final evaluation plan's number)."""
    base_model: BaseModelRef
    adapter: AMoLEConfig
    assignment: dict[str, list[int]]
    """Expert ids per adapted module: the silo's own architecture."""
    prompt: PromptFormat | None = None
    max_length: int = 128
    max_new_tokens: int = 64
    details: dict[str, Any] = field(default_factory=dict)
    """How the strategy built this model from what the silo kept (FDLoRA: its fusion)."""
    fedsilo_version: str = ""
    files: dict[str, str] = field(default_factory=dict)
    """What the folder holds: adapter, and peft / merged where written."""

    @property
    def plain_lora(self) -> bool:
        """One LoRA per module, no router: what PEFT can load and what merges."""
        return self.adapter.layer == "amole" and not self.adapter.use_router

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fedsilo_version": self.fedsilo_version,
            "silo_id": self.silo_id,
            "strategy": self.strategy,
            "round": self.round,
            "base_model": asdict(self.base_model),
            "adapter": adapter_to_json(self.adapter),
            "assignment": self.assignment,
            "prompt": None if self.prompt is None else self.prompt.to_json(),
            "max_length": self.max_length,
            "max_new_tokens": self.max_new_tokens,
            "details": self.details,
            "files": self.files,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "personalised.json"
                  ) -> PersonalisedConfig:
        if data.get("format") != FORMAT:
            raise PersonalisedError(f"{where} is not a fedsilo personalised-model config "
                                    f"(format {data.get('format')!r}); export one with "
                                    "`fedsilo export`")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise PersonalisedError(
                f"{where} has format version {data['format_version']}, newer than this "
                f"fedsilo reads ({FORMAT_VERSION}); upgrade fedsilo"
            )
        try:
            prompt = data.get("prompt")
            return cls(
                silo_id=str(data["silo_id"]), strategy=str(data["strategy"]),
                round=int(data["round"]), base_model=BaseModelRef.from_json(data["base_model"]),
                adapter=adapter_from_json(data["adapter"]),
                assignment={str(k): [int(i) for i in v]
                            for k, v in data["assignment"].items()},
                prompt=None if prompt is None else PromptFormat.from_json(prompt),
                max_length=int(data.get("max_length", 128)),
                max_new_tokens=int(data.get("max_new_tokens", 64)),
                details=dict(data.get("details") or {}),
                fedsilo_version=str(data.get("fedsilo_version", "")),
                files={str(k): str(v) for k, v in (data.get("files") or {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PersonalisedError(f"{where} is damaged or incomplete ({exc}); export the "
                                    "silo again with `fedsilo export`") from None

    def save(self, folder: Path) -> Path:
        path = Path(folder) / CONFIG_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        return path


def read_personalised_config(folder: str | Path) -> PersonalisedConfig:
    """The config of an exported folder (raises PersonalisedError saying what is wrong)."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise PersonalisedError(f"{folder} does not exist or is not a folder; pass the folder "
                                "`fedsilo export --out` wrote")
    if not path.is_file():
        raise PersonalisedError(f"{folder} has no {CONFIG_FILE}: it is not an exported "
                                "personalised model; make one with `fedsilo export RUN_DIR "
                                "--silo ID --out DIR`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PersonalisedError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise PersonalisedError(f"{path} does not hold a JSON object; export the silo again")
    return PersonalisedConfig.from_json(data, where=str(path))
