"""Crash-safe checkpoint files: one safetensors file holding tensors plus JSON metadata.

Why one file written atomically: the aggregator may be killed (SIGKILL) at any instant, and
on restart it must find either the previous checkpoint or the new one, never a mix. So it is
written by the one atomic writer, `fedsilo.sdk.files.write_atomic` (temporary file, fsync,
rename, folder fsync). No pickle: loading a checkpoint cannot execute code.

Layout: safetensors metadata (a str -> str map) holds `format` = "fedsilo-checkpoint",
`format_version` = "2", `meta` = the caller's metadata as JSON and `sha256` = a digest of
the meta and every tensor (name, dtype, shape, bytes), so a bit flipped on disk is refused
rather than resumed from; the tensors are the caller's, under their own names. Version 1
files (no digest) are still read. The file is owner-only (0o600): it holds model state.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as serialize

from fedsilo.sdk.files import write_atomic

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "check_settings",
    "load_checkpoint",
    "namespaced",
    "save_checkpoint",
    "take_namespace",
]

FORMAT = "fedsilo-checkpoint"
FORMAT_VERSION = 2
_READABLE_VERSIONS = ("1", "2")  # 1: no digest


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message names the file and the fix."""


def save_checkpoint(
    path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> None:
    """Atomically replace `path` with `tensors` and JSON-able `meta`.

    Tensors are stored as contiguous CPU copies (so live state may keep changing after the
    call, and tensors that share memory are fine). The folder is created (0o700) if missing.
    One writer per path: temporary files left by a killed writer are removed.
    """
    path = Path(path)
    for key, value in tensors.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"cannot write checkpoint {path}: entry {key!r} must map a str to a "
                f"torch.Tensor, got {type(value).__name__}"
            )
    try:
        meta_json = json.dumps(dict(meta), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"cannot write checkpoint {path}: its metadata is not plain JSON ({exc}); "
            "store only str/int/float/bool/None, lists and str-keyed dicts"
        ) from None
    flat = {
        key: torch.empty_like(value, device="cpu", memory_format=torch.contiguous_format)
        .copy_(value.detach())
        for key, value in tensors.items()
    }
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "meta": meta_json,
                "sha256": digest(flat, meta_json)}

    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    # A writer killed mid-write leaves its temporary file behind; one writer per path.
    for stale in folder.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
    # Serialised here and written by our own atomic writer: safetensors' `save_file` may use
    # temporary files of its own, which a SIGKILL would leave behind under names we cannot know.
    write_atomic(path, serialize(flat, metadata=metadata), mode=0o600)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The `(tensors, meta)` that `save_checkpoint` wrote; CPU tensors.

    Raises CheckpointError for a missing, truncated, corrupt or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}: check the path, or start a fresh run instead of resuming"
        )
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({exc}); delete it to start afresh, "
            "or restore an earlier copy"
        ) from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not a fedsilo checkpoint (no "
            f"format={FORMAT!r} in its metadata); point to the aggregator's checkpoint file"
        )
    version = metadata.get("format_version", "")
    if version not in _READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}, this fedsilo reads "
            f"{FORMAT_VERSION}; resume with the fedsilo version that wrote it, or start afresh"
        )
    if version != "1" and metadata.get("sha256") != digest(tensors, metadata.get("meta", "")):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its contents do not match the digest written with "
            "them (a disk or copy error); restore an earlier copy, or delete it to start afresh"
        )
    try:
        meta = json.loads(metadata["meta"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} has unreadable metadata ({exc}); delete it to start afresh, "
            "or restore an earlier copy"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: metadata is not a JSON object")
    return tensors, meta


def digest(tensors: Mapping[str, torch.Tensor], meta_json: str) -> str:
    """SHA-256 of the metadata JSON and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(meta_json.encode())
    for key in sorted(tensors):
        value = tensors[key].detach().cpu().contiguous()
        h.update(json.dumps([key, str(value.dtype), list(value.shape)]).encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def namespaced(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`{prefix}/{key}` names, so several groups of tensors share one checkpoint."""
    return {f"{prefix}/{key}": value for key, value in tensors.items()}


def take_namespace(
    prefix: str, tensors: Mapping[str, torch.Tensor], keys: Sequence[str]
) -> dict[str, torch.Tensor]:
    """The inverse of `namespaced` for `keys` (in that order, as recorded in the metadata)."""
    missing = [key for key in keys if f"{prefix}/{key}" not in tensors]
    if missing:
        raise CheckpointError(
            f"checkpoint state lacks {len(missing)} tensor(s) under {prefix}/, e.g. "
            f"{prefix}/{missing[0]}: the file was not written by this strategy; start afresh"
        )
    return {key: tensors[f"{prefix}/{key}"] for key in keys}


def namespaced_groups(
    prefix: str, groups: Mapping[str, Mapping[str, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], list[list[Any]]]:
    """One group of tensors per party (e.g. per silo) under `{prefix}/{position}/{key}`,
    and the metadata naming them ([[party, keys], ...]). By position, not by party id, so an
    id may hold any character."""
    tensors: dict[str, torch.Tensor] = {}
    for i, group in enumerate(groups.values()):
        tensors.update(namespaced(f"{prefix}/{i}", group))
    return tensors, [[party, list(group)] for party, group in groups.items()]


def take_groups(
    prefix: str, tensors: Mapping[str, torch.Tensor], meta: Sequence[Sequence[Any]]
) -> dict[str, dict[str, torch.Tensor]]:
    """The inverse of `namespaced_groups`."""
    return {
        party: take_namespace(f"{prefix}/{i}", tensors, keys)
        for i, (party, keys) in enumerate(meta)
    }


def check_settings(meta: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    """Refuse state written under other settings: continuing it would silently mix runs."""
    expected = json.loads(json.dumps(dict(settings)))
    found = meta.get("settings")
    if found == expected:
        return
    if not isinstance(found, dict):
        found = {}
    changed = [
        f"{key}: {found.get(key, '<absent>')!r} -> {expected.get(key, '<absent>')!r}"
        for key in sorted(set(found) | set(expected))
        if found.get(key) != expected.get(key)
    ]
    raise CheckpointError(
        "the checkpoint was written with other strategy settings ("
        + "; ".join(changed)
        + "): resume with the settings of that run, or start afresh"
    )
