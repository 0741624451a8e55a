"""Checkpoint files: exact round trip, atomic replacement, owner-only, clear errors."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedsilo.sdk import checkpoint, files
from fedsilo.sdk.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_round_trip_dtypes_views_and_meta(tmp_path: Path) -> None:
    base = torch.randn(3, 4)
    tensors = {
        "params/a": base,
        "params/a_t": base.T,  # non-contiguous, shares memory with params/a
        "sum/x": torch.randn(5, dtype=torch.float64),
        "bf16": torch.randn(2, 2).to(torch.bfloat16),
        "fp16": torch.randn(2).half(),
        "mask": torch.tensor([[True, False]]),
        "count": torch.tensor(7),
        "empty": torch.zeros(0, 3),
    }
    meta = {"rng": {"state": 2**127 + 5, "inc": 3}, "silos": ["a", "b/c"], "w": 0.1, "n": None}
    path = tmp_path / "state.safetensors"
    save_checkpoint(path, tensors, meta)
    loaded, loaded_meta = load_checkpoint(path)
    assert loaded_meta == meta
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
        assert loaded[key].device.type == "cpu" and loaded[key].is_contiguous()


def test_saved_values_are_copies(tmp_path: Path) -> None:
    live = torch.zeros(3)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"x": live}, {})
    live.add_(1)  # the aggregator keeps going after the checkpoint
    assert torch.equal(load_checkpoint(path)[0]["x"], torch.zeros(3))


def test_empty_tensors_and_meta(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    save_checkpoint(path, {}, {})
    assert load_checkpoint(path) == ({}, {})


def test_folder_created_owner_only_and_no_temporaries(tmp_path: Path) -> None:
    path = tmp_path / "new" / "deeper" / "agg.safetensors"
    save_checkpoint(path, {"x": torch.ones(2)}, {"round": 1})
    save_checkpoint(path, {"x": torch.full((2,), 2.0)}, {"round": 2})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["agg.safetensors"]
    tensors, meta = load_checkpoint(path)
    assert meta == {"round": 2} and torch.equal(tensors["x"], torch.full((2,), 2.0))


def test_failed_write_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "agg.safetensors"
    save_checkpoint(path, {"x": torch.ones(2)}, {"round": 1})

    def crash(fd: int) -> None:  # the temporary file holds the bytes; flushing them fails
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"x": torch.zeros(2)}, {"round": 2})
    assert load_checkpoint(path)[1] == {"round": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["agg.safetensors"]


_WRITER = """
import sys, torch
from pathlib import Path
from fedsilo.sdk.checkpoint import save_checkpoint
i = 0
while True:
    save_checkpoint(Path(sys.argv[1]), {"x": torch.full((256, 256), float(i))}, {"i": i})
    i += 1
"""


def test_sigkill_mid_write_leaves_a_complete_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "agg.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)])
    try:
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # many more replacements
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    tensors, meta = load_checkpoint(path)
    assert meta["i"] >= 1
    assert torch.equal(tensors["x"], torch.full((256, 256), float(meta["i"])))
    save_checkpoint(path, {}, {"i": -1})  # the next writer clears any leftover temporary
    assert [p.name for p in tmp_path.iterdir()] == ["agg.safetensors"]


def test_missing_file_says_which_and_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*nope\.safetensors.*fresh run"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [0, 5, 20, -1])
def test_truncated_file(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "agg.safetensors"
    save_checkpoint(path, {"x": torch.randn(64)}, {"round": 3})
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"agg\.safetensors is truncated or corrupt"):
        load_checkpoint(path)


@pytest.mark.parametrize("where", ["tensor", "meta"])
def test_a_flipped_bit_is_refused_not_resumed(tmp_path: Path, where: str) -> None:
    path = tmp_path / "agg.safetensors"
    save_checkpoint(path, {"x": torch.arange(64, dtype=torch.float32)}, {"round": 3})
    data = bytearray(path.read_bytes())
    if where == "tensor":
        at = len(data) - 10  # inside the tensor bytes, at the end of the file
    else:
        at = data.index(b'"round') + 2  # inside the meta JSON: still valid JSON after
        assert data[at : at + 1] == b"o"
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"agg\.safetensors is (corrupt|truncated)"):
        load_checkpoint(path)


def test_version_1_files_without_a_digest_are_still_read(tmp_path: Path) -> None:
    path = tmp_path / "old.safetensors"
    save_file({"x": torch.ones(2)}, path, metadata={
        "format": "fedsilo-checkpoint", "format_version": "1", "meta": '{"round": 1}'})
    tensors, meta = load_checkpoint(path)
    assert meta == {"round": 1} and torch.equal(tensors["x"], torch.ones(2))


def test_foreign_files(tmp_path: Path) -> None:
    other = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(2)}, other)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is a safetensors file but not"):
        load_checkpoint(other)
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"notes\.txt is truncated or corrupt"):
        load_checkpoint(text)
    newer = tmp_path / "newer.safetensors"
    save_file({}, newer, metadata={"format": "fedsilo-checkpoint", "format_version": "99"})
    with pytest.raises(CheckpointError, match="format version '99'"):
        load_checkpoint(newer)


def test_meta_must_be_plain_json(tmp_path: Path) -> None:
    path = tmp_path / "agg.safetensors"
    with pytest.raises(CheckpointError, match="not plain JSON"):
        save_checkpoint(path, {}, {"x": torch.ones(1)})
    with pytest.raises(CheckpointError, match="not plain JSON"):
        save_checkpoint(path, {}, {"loss": float("nan")})
    with pytest.raises(CheckpointError, match=r"torch\.Tensor"):
        save_checkpoint(path, {"x": [1.0]}, {})  # type: ignore[dict-item]
    assert not path.exists()


def test_settings_mismatch_is_named() -> None:
    settings = {"seed": 0, "config": {"k_c": 2}}
    checkpoint.check_settings({"settings": json.loads(json.dumps(settings))}, settings)
    with pytest.raises(CheckpointError, match=r"seed: 0 -> 1.*resume with the settings"):
        checkpoint.check_settings({"settings": settings}, {**settings, "seed": 1})


def test_missing_namespace_tensors_are_named() -> None:
    flat = checkpoint.namespaced("params", {"a": torch.ones(1)})
    assert list(checkpoint.take_namespace("params", flat, ["a"])) == ["a"]
    with pytest.raises(CheckpointError, match="params/b"):
        checkpoint.take_namespace("params", flat, ["a", "b"])


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_existing_folder_mode_is_left_alone(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o750)
    os.chmod(folder, 0o750)
    save_checkpoint(folder / "agg.safetensors", {}, {})
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
