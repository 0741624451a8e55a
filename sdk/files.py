"""Writing files atomically, with an exact mode.

Why: a crash (SIGKILL, power cut) at any instant must leave either the old file or the new
one, never a torn mix; and a secret (a private key, a password, the privacy ledger) must never
be readable by others, not even for the moment between creating and chmod-ing it. So the data
goes to a temporary file in the same folder, created with its final mode (the umask can only
narrow it, and `fchmod` then sets it exactly), is fsynced, renamed over the target
(`os.replace` is atomic on POSIX), and the folder is fsynced so the rename itself is durable.
On failure the temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from pathlib import Path

__all__ = ["FolderInUse", "FolderLock", "fsync_dir", "holds_folder_lock", "write_atomic"]


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so readers see the old or the new file, never a mix, and
    the file has exactly `mode` and never a wider one (created with it, umask only narrows).

    The folder must exist. The temporary file `.<name>.<random>.tmp` is opened with O_EXCL and
    O_NOFOLLOW, so a planted file or symlink of that name is never written through.
    """
    path = Path(path)
    folder = path.parent
    tmp = folder / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        try:
            os.fchmod(fd, mode)  # exactly `mode` (the umask may have narrowed a public file)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)  # on disk before the rename makes it visible
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    """Persist renames and deletions: a directory entry is only durable once its folder is.

    A no-op where folders cannot be opened (some platforms)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FolderInUse(ValueError):
    """Another live process holds the folder: two writers of one state would corrupt it."""


class FolderLock:
    """An exclusive lock on a state folder for the life of one process (`.lock`, flock).

    Why flock: the kernel releases it when the holder dies, even by SIGKILL, so a crashed
    process never leaves a stale lock behind and a restart needs no cleanup. The holder's
    pid is written into the file for the refusal message only."""

    NAME = ".lock"

    def __init__(self, folder: Path, holder: str) -> None:
        self.path = Path(folder) / self.NAME
        self.holder = holder
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FolderInUse(
                f"{self.path.parent} is in use by another running {self.holder} (pid "
                f"{other}); stop that one first, or give this one its own state_dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holds_folder_lock(folder: Path) -> bool:
    """Whether this process holds `folder`'s FolderLock now, asked of the kernel: the lock
    file at that path is exclusively locked and names this pid (the holder writes its pid
    after taking the lock). A lock file deleted, or replaced and taken by another, is no."""
    try:
        fd = os.open(Path(folder) / FolderLock.NAME, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # someone holds it exclusively: us?
            return os.pread(fd, 64, 0).decode(errors="replace").strip() == str(os.getpid())
        fcntl.flock(fd, fcntl.LOCK_UN)  # nobody holds it
        return False
    finally:
        os.close(fd)
