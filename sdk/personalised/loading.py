"""Load an exported personalised model as a plain Hugging Face causal LM.

Why `generate` needs care here: the adapter was trained on prompts written with the silo's
template, each answer followed by the tokenizer's EOS. Asked in another format (no template,
no final newline) it usually finds EOS the likeliest first token, so `generate` stops at
once and the decoded output is the prompt alone. Hence the export records the template
(`PromptFormat.render`, `fedsilo generate`), and the loaded model is set up as generation
expects: left padding for batches (the built-in tokenizer pads right, for training, so a
batch would continue after its pad tokens), and the training EOS among the stop tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fedsilo.sdk.adapters.inject import inject_adapters
from fedsilo.sdk.adapters.model import load_trainable, set_assignment
from fedsilo.sdk.models.digest import weights_digest
from fedsilo.sdk.models.loading import LoadedModel, ModelLoadError, load_model
from fedsilo.sdk.params import TensorDict

from .config import ADAPTER_FILE, BaseModelRef, PersonalisedConfig, PersonalisedError
from .config import read_personalised_config as read_config


def load_base_model(ref: BaseModelRef, base_model: str | None = None,
                    device: str = "cpu") -> LoadedModel:
    """The backbone `ref` names (or `base_model`, the same model elsewhere on this machine),
    refused when its weights' digest is not the one the adapter was trained on."""
    source = base_model or ref.source
    try:
        loaded = load_model(source, dtype=ref.dtype, seed=ref.seed, device=device)
    except ModelLoadError as exc:
        raise PersonalisedError(
            f"cannot load the base model {source!r}: {exc}; pass the same model as it is on "
            "this machine (base_model= / --base-model)"
        ) from None
    if ref.digest:
        found = weights_digest(loaded.model)
        if found != ref.digest:
            raise PersonalisedError(
                f"the base model {source!r} ({ref.dtype}) has weights digest {found[:12]}..., "
                f"but the adapter was trained on {ref.digest[:12]}... ({ref.source!r}); pass "
                "the base model the federation used (base_model= / --base-model)"
            )
    return loaded


def install_personalised(model: torch.nn.Module, config: PersonalisedConfig,
                         tensors: TensorDict) -> None:
    """Put the silo's adapter layers, architecture and tensors into a fresh backbone."""
    try:
        inject_adapters(model, config.adapter)
        set_assignment(model, config.assignment)
        load_trainable(model, tensors, strict=True)
    except ValueError as exc:
        raise PersonalisedError(
            f"the adapter of silo {config.silo_id} does not fit its base model "
            f"{config.base_model.source!r}: {exc}"
        ) from None
    model.eval()


def prepare_for_generation(model: Any, tokenizer: Any) -> None:
    """Left padding, and the tokenizer's EOS (the one every training answer ends with)
    among the model's stop tokens, so `model.generate` stops where training taught it to."""
    if hasattr(tokenizer, "padding_side"):
        tokenizer.padding_side = "left"
    generation = getattr(model, "generation_config", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if generation is None or eos is None:
        return
    stops = generation.eos_token_id
    if stops is None:
        generation.eos_token_id = eos
    elif isinstance(stops, int) and stops != eos:
        generation.eos_token_id = [stops, eos]
    elif isinstance(stops, list) and eos not in stops:
        generation.eos_token_id = [*stops, eos]
    if generation.pad_token_id is None:
        pad = getattr(tokenizer, "pad_token_id", None)
        generation.pad_token_id = eos if pad is None else pad


def build_personalised_model(
    config: PersonalisedConfig, tensors: TensorDict, base_model: str | None = None,
    device: str = "cpu",
) -> tuple[Any, Any]:
    """(model, tokenizer) from a config and its tensors (what `load_personalised` reads)."""
    loaded = load_base_model(config.base_model, base_model, device)
    install_personalised(loaded.model, config, tensors)
    prepare_for_generation(loaded.model, loaded.tokenizer)
    return loaded.model, loaded.tokenizer


def read_adapter_tensors(folder: Path) -> TensorDict:
    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        raise PersonalisedError(f"{folder} has no {ADAPTER_FILE}; export the silo again with "
                                "`fedsilo export`")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise PersonalisedError(f"cannot read {path}: {exc}; export the silo again") from None


def complete(
    model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int = 64,
    sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
) -> str:
    """`model.generate` on one prompt; the new text only (without the prompt and EOS).
    Greedy by default; `sample` draws with `temperature` and `top_p` from a generator
    seeded by `seed` (the caller's RNG state is left as it was)."""
    # as in training: no special tokens before the prompt (the scorers do the same)
    encoded = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in encoded.items()}
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": sample}
    if sample:
        options.update(temperature=temperature, top_p=top_p)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(**inputs, **options)
    new = out[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True)


def load_personalised(
    folder: str | Path, base_model: str | None = None, *, device: str = "cpu"
) -> tuple[Any, Any]:
    """A silo's personalised model from a `fedsilo export` folder: a transformers causal LM
    with the silo's adapters installed (in eval mode) and its tokenizer.

    `base_model` replaces the recorded base model source (the same weights stored elsewhere:
    its digest must match). `model.generate(**tokenizer([prompt]), max_new_tokens=...)`
    works as on any causal LM; write prompts as in training (`read_personalised_config(
    folder).prompt.render(text)`), or the model may answer with EOS at once.
    """
    config = read_config(folder)
    return build_personalised_model(config, read_adapter_tensors(Path(folder)), base_model,
                                    device)
