"""Process memory probes shared by the benchmarks (Linux /proc; None where unavailable)."""

from __future__ import annotations

import contextlib
import ctypes
import gc


def status_kb(field: str, pid: str = "self") -> int | None:
    """A /proc/<pid>/status field in kB (VmRSS, VmHWM, ...), or None if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Make VmHWM = VmRSS now (Linux >= 4.0), so the peak read later is this phase's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the OS, so memory freed by
    an earlier run is not silently reused (and left uncounted) by the next one."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
