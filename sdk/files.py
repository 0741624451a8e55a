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
import os
import secrets
from pathlib import Path

__all__ = ["fsync_dir", "write_atomic"]


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
