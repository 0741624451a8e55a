"""`fedsilo export`: a silo's personalised model as a self-describing folder.

    DIR/personalised.json      what to load (`PersonalisedConfig`)
    DIR/adapter.safetensors    the adapter's tensors under fedsilo's wire names
    DIR/peft/                  plain-LoRA strategies: a PEFT LoRA adapter
                               (`peft.PeftModel.from_pretrained(base, DIR / "peft")`)
    DIR/merged/                with merged=True: the base model with that LoRA merged in

Why PEFT only for plain LoRA: FedAMoLE's and FedLEASE's experts are routed per token, a
computation PEFT's LoRA layer does not have, so those load with `load_personalised` only.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from safetensors.torch import save as serialize

from fedsilo.sdk.files import write_atomic
from fedsilo.sdk.models.digest import weights_digest
from fedsilo.sdk.params import TensorDict
from fedsilo.sdk.strategies import get_strategy

from .config import (
    ADAPTER_FILE,
    CONFIG_FILE,
    FORMAT,
    MERGED_DIR,
    PEFT_DIR,
    PersonalisedConfig,
    PersonalisedError,
    fedsilo_version,
)
from .loading import load_base_model
from .record import SiloRun, locate_silo_adapter, read_silo_run

PEFT_WEIGHTS = "adapter_model.safetensors"
_WRITTEN = (CONFIG_FILE, ADAPTER_FILE, PEFT_DIR, MERGED_DIR)


def personalise(run: SiloRun) -> tuple[PersonalisedConfig, TensorDict]:
    """The model the silo's final score is of (see `StrategySpec.personalised`), as a
    config and the tensors to install."""
    try:
        result = get_strategy(run.strategy).personalised(run.adapter, run.tensors,
                                                         run.client_state)
    except ValueError as exc:
        raise PersonalisedError(f"{run.path}: {exc}") from None
    training = run.training
    config = PersonalisedConfig(
        silo_id=run.silo_id, strategy=run.strategy, round=run.round,
        base_model=run.base_model, adapter=result.adapter, assignment=run.assignment,
        prompt=run.prompt,
        max_length=training.max_length if training else PersonalisedConfig.max_length,
        max_new_tokens=(training.max_new_tokens if training
                        else PersonalisedConfig.max_new_tokens),
        details=result.details, fedsilo_version=fedsilo_version(),
    )
    return config, result.tensors


def peft_tensors(tensors: Mapping[str, Any]) -> TensorDict:
    """fedsilo's plain-LoRA wire names -> PEFT's (`base_model.model.<module>.lora_A.weight`)."""
    out: TensorDict = {}
    for key, value in tensors.items():
        module, _, part = key.rpartition(".shared.")
        if not module or part not in ("A", "B"):
            raise PersonalisedError(f"{key!r} is not a plain-LoRA tensor; PEFT export needs a "
                                    "strategy without routed experts")
        out[f"base_model.model.{module}.lora_{part}.weight"] = value.contiguous()
    return out


def write_peft(config: PersonalisedConfig, tensors: TensorDict, folder: Path) -> Path:
    """A PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) giving
    the same forward as fedsilo's layer: scale lora_alpha / r on B A x, no dropout at eval."""
    from peft import LoraConfig

    if not config.plain_lora:
        raise PersonalisedError(
            f"{config.strategy} routes each token to its own experts; PEFT's LoRA cannot "
            "express that: load it with fedsilo.load_personalised (plain-LoRA strategies: "
            "fedit, fedit-ft, fdlora, local)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    source = Path(config.base_model.source)
    lora = LoraConfig(
        r=config.adapter.r, lora_alpha=config.adapter.alpha,
        target_modules=list(config.adapter.target_modules),
        lora_dropout=config.adapter.dropout, bias="none", task_type="CAUSAL_LM",
        # only a Hugging Face folder is something AutoPeftModel could load by itself
        base_model_name_or_path=str(source) if (source / "config.json").is_file() else None,
    )
    lora.save_pretrained(str(folder))
    write_atomic(folder / PEFT_WEIGHTS, serialize(peft_tensors(tensors), {"format": "pt"}))
    return folder


def write_merged(config: PersonalisedConfig, peft_dir: Path, folder: Path,
                 base_model: str | None = None) -> Path:
    """The base model with the LoRA merged into its weights, saved as a Hugging Face
    folder (with the tokenizer where it is a Hugging Face one)."""
    from peft import PeftModel

    loaded = load_base_model(config.base_model, base_model)
    merged = PeftModel.from_pretrained(loaded.model, str(peft_dir)).merge_and_unload()
    merged.save_pretrained(str(folder))
    if hasattr(loaded.tokenizer, "save_pretrained"):
        loaded.tokenizer.save_pretrained(str(folder))
    return folder


def _prepare(out: Path, force: bool, source: Path) -> None:
    if out.exists() and not out.is_dir():
        raise PersonalisedError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and (out.resolve() == source.parent.resolve() or any(out.glob("*.ckpt"))
                         or (out / "summary.json").exists()):
        raise PersonalisedError(f"--out {out} holds a run or a silo's state; export into a "
                                "folder of its own, e.g. exports/<silo>")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise PersonalisedError(f"--out {out} exists and is not empty; choose a new folder "
                                    "or pass --force to replace an earlier export there")
        for name in _WRITTEN:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def export_personalised(
    source: str | Path,
    out: str | Path,
    silo: str | None = None,
    *,
    merged: bool = False,
    force: bool = False,
    base_model: str | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> PersonalisedConfig:
    """Export `silo`'s personalised model from a `fedsilo simulate` run folder, or the
    silo's from an agent's state_dir, into `out` (see the module docstring).

    `defaults` fill what an older adapter file does not record (`read_silo_run`);
    `base_model` is where the base model is on this machine, when not where it was.
    """
    path, silo_id = locate_silo_adapter(source, silo)
    run = read_silo_run(path, defaults)
    if not run.silo_id:
        run = replace(run, silo_id=silo_id)
    return export_run(run, out, merged=merged, force=force, base_model=base_model)


def export_run(run: SiloRun, out: str | Path, *, merged: bool = False, force: bool = False,
               base_model: str | None = None) -> PersonalisedConfig:
    """`export_personalised` for a run already read. A `base_model` given is checked
    against the recorded digest and recorded as the source."""
    out = Path(out)
    config, tensors = personalise(run)
    if merged and not config.plain_lora:
        raise PersonalisedError(
            f"--merged needs a plain-LoRA strategy (fedit, fedit-ft, fdlora, local); "
            f"{config.strategy}'s experts are chosen per token, so no single weight holds them"
        )
    if base_model is not None or not config.base_model.digest:
        loaded = load_base_model(config.base_model, base_model)  # checks a recorded digest
        config = replace(config, base_model=replace(  # older records: pin the weights now
            config.base_model, source=base_model or config.base_model.source,
            digest=weights_digest(loaded.model)))
    _prepare(out, force, run.path)
    files = {"config": CONFIG_FILE, "adapter": ADAPTER_FILE}
    # Owner-only, as the silo's own copy: the adapter is learned from its private data.
    write_atomic(out / ADAPTER_FILE, serialize(
        {k: v.contiguous() for k, v in tensors.items()},
        {"format": FORMAT, "silo_id": config.silo_id, "strategy": config.strategy}))
    if config.plain_lora:
        write_peft(config, tensors, out / PEFT_DIR)
        files["peft"] = PEFT_DIR
        if merged:
            write_merged(config, out / PEFT_DIR, out / MERGED_DIR, base_model)
            files["merged"] = MERGED_DIR
    config = replace(config, files=files)
    config.save(out)
    return config
