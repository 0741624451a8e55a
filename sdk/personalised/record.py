"""What a silo's run leaves for its personalised model: `adapter.safetensors` and its record.

Why the adapter file records its own provenance: a silo's folder (a run's `silos/<id>/` or
an agent's `state_dir`) is then enough to rebuild the personalised model, on any machine:
the metadata names the strategy, the adapter settings, the base model (with its weights'
digest), how the silo's data was cut and how its prompts look. Older files lack some of
it; readers pass what they know from elsewhere as `defaults`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.data.examples import TaskInfo
from fedsilo.sdk.data.recipe import PromptFormat, SiloDataRecipe
from fedsilo.sdk.params import TensorDict
from fedsilo.sdk.training import TrainingConfig

from .config import (
    ADAPTER_FILE,
    CONFIG_FILE,
    BaseModelRef,
    PersonalisedError,
    adapter_from_json,
    adapter_to_json,
    fedsilo_version,
)

CLIENT_PREFIX = "client/"  # the strategy's silo-only state in the adapter file
SILOS_DIR = "silos"  # a `fedsilo simulate` run folder: silos/<id>/adapter.safetensors

# What `read_silo_run` needs and where a user finds it when a file lacks it.
_REQUIRED = ("strategy", "adapter", "base_model")


def adapter_metadata(adapter: AMoLEConfig, training: TrainingConfig) -> dict[str, str]:
    """What the silo's trainer knows about its adapter, as safetensors metadata."""
    return {
        "adapter": json.dumps(adapter_to_json(adapter)),
        "training": json.dumps(asdict(training)),
        "fedsilo_version": fedsilo_version(),
    }


def silo_provenance(
    strategy: str,
    base_model: BaseModelRef,
    data: SiloDataRecipe | None = None,
    task: TaskInfo | None = None,
) -> dict[str, str]:
    """What only the process running the silo knows (its strategy's name, its base model,
    its data), as safetensors metadata for `SiloAgent(provenance=...)`."""
    out = {"strategy": strategy, "base_model": json.dumps(asdict(base_model))}
    if data is not None:
        out["data"] = json.dumps(data.to_json())
        if task is not None:
            prompt = PromptFormat.for_source(data.held(), data.data_dir, task)
            out["prompt"] = json.dumps(prompt.to_json())
    return out


@dataclass(frozen=True)
class SiloRun:
    """One silo's adapter as its run left it, and everything known about how it was made."""

    path: Path
    silo_id: str
    round: int
    strategy: str
    adapter: AMoLEConfig
    base_model: BaseModelRef
    assignment: dict[str, list[int]]
    tensors: TensorDict
    """The adapter's tensors under their wire names (`fedsilo.sdk.params`)."""
    client_state: TensorDict = field(default_factory=dict)
    """What the strategy kept on the silo (FDLoRA's personal LoRA and fusion weights)."""
    training: TrainingConfig | None = None
    data: SiloDataRecipe | None = None
    prompt: PromptFormat | None = None
    written_by: str = ""
    """The fedsilo version that wrote the adapter ("" before versions were recorded)."""


def locate_silo_adapter(folder: str | Path, silo: str | None = None) -> tuple[Path, str]:
    """The adapter file of `silo` in a `fedsilo simulate` run folder, or of the silo whose
    agent `state_dir` `folder` is (then `silo` may be omitted). Returns (path, silo id)."""
    folder = Path(folder)
    what = ("pass a `fedsilo simulate` run folder (runs/<name>) or a silo agent's state_dir")
    if not folder.exists():
        raise PersonalisedError(f"{folder} does not exist; {what}")
    if not folder.is_dir():
        raise PersonalisedError(f"{folder} is a file, not a folder; {what}")
    if (folder / SILOS_DIR).is_dir() or (folder / "config.json").is_file():
        silos = sorted(p.name for p in (folder / SILOS_DIR).glob("*") if p.is_dir())
        if silo is None:
            shown = ", ".join(silos) or "none yet"
            raise PersonalisedError(f"{folder} is a run folder; choose a silo with --silo "
                                    f"(its silos: {shown})")
        path = folder / SILOS_DIR / silo / ADAPTER_FILE
        if silo not in silos:
            shown = ", ".join(silos) or "none"
            raise PersonalisedError(f"run {folder} has no silo {silo!r}; its silos: {shown}")
        if not path.is_file():
            raise PersonalisedError(
                f"run {folder} has no adapter for {silo} ({path} is missing): the run did not "
                "finish (its final round writes every silo's adapter); run it to the end"
            )
        return path, silo
    path = folder / ADAPTER_FILE
    if path.is_file():
        found = read_metadata(path).get("silo_id", "")
        if silo is not None and found and silo != found:
            raise PersonalisedError(f"{folder} is the state_dir of silo {found!r}, not "
                                    f"{silo!r}; drop --silo or pass that silo's state_dir")
        return path, found or silo or folder.name
    if (folder / CONFIG_FILE).is_file():
        raise PersonalisedError(f"{folder} is already an exported personalised model; use it "
                                f"with `fedsilo generate {folder} PROMPT` or "
                                "fedsilo.load_personalised")
    if any(folder.glob("*.ckpt")):
        raise PersonalisedError(
            f"{folder} is a silo agent's state_dir whose federation has not finished: "
            f"{ADAPTER_FILE} is written with the final round; wait for the agent to finish"
        )
    raise PersonalisedError(
        f"{folder} is neither a `fedsilo simulate` run folder (config.json, "
        f"silos/<id>/{ADAPTER_FILE}) nor a silo agent's state_dir ({ADAPTER_FILE}); pass "
        "one of those"
    )


def read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), "pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise PersonalisedError(f"cannot read {path}: {exc}; the file is damaged or not a "
                                "fedsilo adapter") from None


def _parse(key: str, raw: str) -> Any:
    value = json.loads(raw)
    if key == "adapter":
        return adapter_from_json(value)
    if key == "base_model":
        return BaseModelRef.from_json(value)
    if key == "training":
        known = {f.name for f in fields(TrainingConfig)}
        return TrainingConfig(**{k: v for k, v in value.items() if k in known})
    if key == "data":
        return SiloDataRecipe.from_json(value)
    if key == "prompt":
        return PromptFormat.from_json(value)
    return value


def read_silo_run(path: str | Path, defaults: Mapping[str, Any] | None = None) -> SiloRun:
    """Read an adapter file and its record. `defaults` (parsed values under the metadata's
    keys: strategy, adapter, base_model, training, data, prompt) fill what an older file
    lacks; anything still missing is refused, naming it."""
    path = Path(path)
    meta = read_metadata(path)
    known: dict[str, Any] = dict(defaults or {})
    for key in ("adapter", "base_model", "training", "data", "prompt"):
        if key in meta:
            try:
                known[key] = _parse(key, meta[key])
            except (ValueError, TypeError, KeyError) as exc:
                raise PersonalisedError(f"{path}: its {key!r} record is unreadable ({exc}); "
                                        "the file is damaged") from None
    if "strategy" in meta:
        known["strategy"] = meta["strategy"]
    missing = [key for key in _REQUIRED if key not in known]
    if missing or "assignment" not in meta:
        lacking = ", ".join(missing + ([] if "assignment" in meta else ["assignment"]))
        raise PersonalisedError(
            f"{path} does not record its {lacking} (written by an older fedsilo); export "
            "from the run folder (its config.json has them) or, for an agent's state_dir, "
            "pass --config silo.toml; or re-run the federation with this fedsilo"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise PersonalisedError(f"cannot read the tensors of {path}: {exc}") from None
    client = {k.removeprefix(CLIENT_PREFIX): v for k, v in tensors.items()
              if k.startswith(CLIENT_PREFIX)}
    adapter = {k: v for k, v in tensors.items() if not k.startswith(CLIENT_PREFIX)}
    prompt = known.get("prompt")
    data: SiloDataRecipe | None = known.get("data")
    if prompt is None and data is not None:  # older files: the format follows from the data
        prompt = PromptFormat.for_source(data.held(), data.data_dir, data.build().task)
    return SiloRun(
        path=path, silo_id=meta.get("silo_id", ""), round=int(meta.get("round", -1)),
        strategy=str(known["strategy"]), adapter=known["adapter"],
        base_model=known["base_model"],
        assignment={str(k): [int(i) for i in v]
                    for k, v in json.loads(meta["assignment"]).items()},
        tensors=adapter, client_state=client, training=known.get("training"), data=data,
        prompt=prompt, written_by=meta.get("fedsilo_version", ""),
    )
