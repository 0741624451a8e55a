"""Load a benchmark script as a module, and check a smoke run leaves the committed results
alone."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
RESULTS = BENCHMARKS / "results"


def load_script(name: str) -> ModuleType:
    """`benchmarks/<name>` as a module (its folder on sys.path, as `python benchmarks/...`
    puts it, for `from stamp import ...`)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"{Path(name).stem}_bench", BENCHMARKS / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def results_snapshot() -> dict[str, bytes]:
    if not RESULTS.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in RESULTS.iterdir() if p.is_file()}


@pytest.fixture(scope="session")
def load_benchmark() -> Callable[[str], ModuleType]:
    return load_script


@pytest.fixture
def snapshot_results() -> Callable[[], dict[str, bytes]]:
    return results_snapshot
