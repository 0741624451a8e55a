"""Dependencies run one way: each package imports only packages below it (the developers'
guide). Read from the source with `ast`, so every import counts: at module level, inside
functions and under TYPE_CHECKING alike; a lazy import is still a dependency.

Order, bottom to top: sdk < privacy < {silo_agent, aggregator} < {simulation, provision}
< cli. Packages on one level are independent of each other. fedsilo/ (the top-level names,
imported lazily) may use anything and is not checked."""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: package (folder) -> level; a package may import only packages of a lower level.
LEVELS = {
    "sdk": 0,
    "privacy": 1,
    "silo_agent": 2,
    "aggregator": 2,
    "simulation": 3,
    "provision": 3,
    "cli": 4,
}
EXEMPT = {"fedsilo"}

#: (importing file, imported package) edges that break the order but live in files this
#: change could not edit, each with its reason. Empty: none remain.
ALLOWED: frozenset[tuple[str, str]] = frozenset()


def _package_dirs() -> dict[str, str]:
    """fedsilo.<name> -> folder, from pyproject.toml's package-dir."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir = pyproject["tool"]["setuptools"]["package-dir"]
    return {name.removeprefix("fedsilo."): folder for name, folder in package_dir.items()
            if name != "fedsilo"}


def _module_name(path: Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imported_packages(path: Path) -> Iterator[tuple[int, str]]:
    """(line, fedsilo package) for every import of a fedsilo package in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "fedsilo" and len(parts) > 1:
                    yield node.lineno, parts[1]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved inside this package's folder
                base = package[: len(package) - (node.level - 1)]
                target = [*base, *(node.module or "").split(".")] if node.module else base
                if target:
                    yield node.lineno, target[0]
                continue
            parts = (node.module or "").split(".")
            if parts[0] != "fedsilo":
                continue
            if len(parts) > 1:
                yield node.lineno, parts[1]
            else:  # from fedsilo import sdk
                for alias in node.names:
                    yield node.lineno, alias.name


def test_every_package_has_a_level() -> None:
    """A new package must take its place in the order rather than escape the check."""
    packages = set(_package_dirs()) - EXEMPT
    top_level = {name.split(".")[0] for name in packages}
    assert top_level <= set(LEVELS), f"packages without a level: {top_level - set(LEVELS)}"
    for name in LEVELS:
        assert (ROOT / name / "__init__.py").is_file(), f"{name}/ is not a package"


@pytest.mark.parametrize("package", sorted(LEVELS))
def test_package_imports_only_packages_below_it(package: str) -> None:
    level = LEVELS[package]
    wrong: list[str] = []
    for path in sorted((ROOT / package).rglob("*.py")):
        file = path.relative_to(ROOT).as_posix()
        for line, imported in _imported_packages(path):
            if imported == package or imported in EXEMPT or imported not in LEVELS:
                continue
            if LEVELS[imported] < level or (file, imported) in ALLOWED:
                continue
            wrong.append(f"{file}:{line} imports fedsilo.{imported} (level "
                         f"{LEVELS[imported]}, not below {package}'s {level})")
    assert not wrong, "dependencies must run one way:\n" + "\n".join(wrong)


def test_allowed_edges_still_exist() -> None:
    """An allowed edge that is gone must leave the list, so the list only shrinks."""
    for file, imported in ALLOWED:
        found = {name for _, name in _imported_packages(ROOT / file)}
        assert imported in found, f"{file} no longer imports fedsilo.{imported}: unlist it"
