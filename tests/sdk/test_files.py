"""`write_atomic` / `fsync_dir`: exact modes, whole-file replacement, no temporary left."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedsilo.sdk import files
from fedsilo.sdk.files import fsync_dir, write_atomic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000, 0o027])
@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640])
def test_mode_is_exact_whatever_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    path = tmp_path / "f.bin"
    with _umask(umask):
        write_atomic(path, b"data", mode)
    assert _mode(path) == mode
    assert path.read_bytes() == b"data"


def test_default_mode_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    with _umask(0o000):
        write_atomic(path, b"s3cret")
    assert _mode(path) == 0o600


def test_no_temporary_file_left_after_success(tmp_path: Path) -> None:
    write_atomic(tmp_path / "a.json", b"{}", 0o644)
    write_atomic(tmp_path / "a.json", b"[]", 0o644)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_existing_file_is_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_bytes(b"a much longer old content that must not leave a tail")
    os.chmod(path, 0o666)
    before = path.stat().st_ino
    write_atomic(path, b"short", 0o600)
    assert path.read_bytes() == b"short"
    assert _mode(path) == 0o600  # the old, wider mode is not inherited
    assert path.stat().st_ino != before  # a new file renamed over, not rewritten in place


def test_empty_data_gives_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"old")
    write_atomic(path, b"", 0o644)
    assert path.read_bytes() == b""


def test_short_writes_are_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:3])))
    data = bytes(range(256)) * 4
    write_atomic(tmp_path / "f", data)
    assert (tmp_path / "f").read_bytes() == data


def test_failing_replace_leaves_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f.json"
    path.write_bytes(b"old")

    def fail(src: object, dst: object) -> None:
        raise OSError("simulated rename failure")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="simulated rename failure"):
        write_atomic(path, b"new", 0o644)
    assert path.read_bytes() == b"old"
    assert _temps(tmp_path) == []


def test_failing_write_leaves_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f.json"
    path.write_bytes(b"old")

    def fail(fd: int, data: object) -> int:
        raise OSError("disk full")

    monkeypatch.setattr(os, "write", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, b"new", 0o600)
    assert path.read_bytes() == b"old"
    assert _temps(tmp_path) == []


def test_failing_fsync_leaves_no_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(fd: int) -> None:
        raise OSError("I/O error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="I/O error"):
        write_atomic(tmp_path / "new.bin", b"data")
    assert list(tmp_path.iterdir()) == []


def test_interrupt_also_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(src: object, dst: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "f", b"data")
    assert list(tmp_path.iterdir()) == []


def test_symlink_at_path_is_replaced_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"untouched")
    link = tmp_path / "f"
    link.symlink_to(target)
    write_atomic(link, b"new", 0o600)
    assert not link.is_symlink()
    assert link.read_bytes() == b"new"
    assert target.read_bytes() == b"untouched"


def test_missing_folder_raises_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "missing" / "f", b"data")
    assert list(tmp_path.iterdir()) == []


def test_folder_is_synced_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[tuple[Path, bool]] = []
    path = tmp_path / "f"
    monkeypatch.setattr(files, "fsync_dir", lambda folder: synced.append((folder, path.exists())))
    write_atomic(path, b"data")
    assert synced == [(tmp_path, True)]


def test_fsync_dir_syncs_an_existing_folder_and_ignores_a_missing_one(tmp_path: Path) -> None:
    fsync_dir(tmp_path)
    fsync_dir(tmp_path / "does-not-exist")  # nothing to open: a no-op, not an error


_HOLDER = """
import sys, time
from pathlib import Path
from fedsilo.sdk.files import FolderLock
FolderLock(Path(sys.argv[1]), "agent of s").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_folder_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        with pytest.raises(files.FolderInUse, match=rf"in use by another running agent of s "
                           rf"\(pid {proc.pid}\).*own state_dir"):
            files.FolderLock(tmp_path, "agent of s").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)  # no cleanup: the kernel drops the lock
        proc.wait()
    with files.FolderLock(tmp_path, "agent of s"):
        assert _mode(tmp_path / files.FolderLock.NAME) == 0o600
    with files.FolderLock(tmp_path, "agent of s"):  # released on exit, taken again
        pass
