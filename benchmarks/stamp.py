"""What every benchmark result is stamped with: the command, the commit, the machine.

Imported by the scripts beside it (`from stamp import ...`: a script's folder is on
sys.path when it runs; the smoke tests put it there too).
"""

from __future__ import annotations

import datetime as dt
import importlib
import os
import platform
import shlex
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def run_quietly(cmd: Sequence[str]) -> str | None:
    """A command's stdout, or None if it is missing or fails."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_info(paths: Iterable[str] = ()) -> dict[str, Any]:
    """HEAD, and the uncommitted changes (in `paths`, or anywhere) at run time."""
    commit = run_quietly(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    status = run_quietly(["git", "-C", str(REPO), "status", "--porcelain", "--", *paths])
    changed = [ln[3:] for ln in (status or "").splitlines() if ln.strip()]
    head = commit.strip() if commit else "unknown"
    return {
        "commit": head + (" + uncommitted changes" if changed else ""),
        "head": head,
        "uncommitted_changes": changed,
    }


def machine(packages: Iterable[str] = ("torch", "transformers")) -> dict[str, Any]:
    """CPU model and count, RAM, OS, Python and the versions of `packages`."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    models = [ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
              if ln.startswith("model name")]
    ram_kb = None
    if Path("/proc/meminfo").exists():
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_kb = int(line.split()[1])
    info: dict[str, Any] = {
        "cpu_model": models[0] if models else platform.processor() or "unknown",
        "cpu_count": len(models) or os.cpu_count(),
        "ram_GB": round(ram_kb * 1024 / 1e9, 1) if ram_kb else None,
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    for name in packages:
        try:
            info[name] = getattr(importlib.import_module(name), "__version__", "unknown")
        except ImportError:
            info[name] = "not installed"
    return info


def command_line(script: str, argv: Sequence[str]) -> str:
    """The command as a reader would type it, from the repository root."""
    return " ".join(shlex.quote(a) for a in ["python", f"benchmarks/{script}", *argv])


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def stamp_lines(report: dict[str, Any]) -> list[str]:
    """The markdown header lines every result file starts with."""
    m = report["machine"]
    return [
        f"- command: `{report['command']}`",
        f"- commit: `{report['git']['commit']}`",
        f"- date: {report['date']}",
        f"- machine: {m['cpu_model']}, {m['cpu_count']} CPUs, {m['ram_GB']} GB RAM; "
        + ", ".join(f"{k} {v}" for k, v in m.items()
                    if k not in ("cpu_model", "cpu_count", "ram_GB", "os")),
    ]
