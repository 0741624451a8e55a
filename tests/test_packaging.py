"""`pip install .` (not editable) gives a working `fedsilo` and installs only fedsilo.*."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_gives_a_working_cli(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(
        ROOT, src,
        ignore=shutil.ignore_patterns(".venv*", ".git", "runs", "build", "*.egg-info",
                                      "__pycache__", ".pytest_cache", ".ruff_cache"),
    )
    # --target installs into that folder only; --prefix would uninstall the developer's
    # own (editable) fedsilo from the running environment first.
    purelib = tmp_path / "target"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--target", str(purelib), str(src)],
        check=True, capture_output=True, text=True,
    )
    top_level = sorted(
        p.name for p in purelib.iterdir() if not p.name.endswith("-info") and p.name != "bin"
    )
    assert top_level == ["fedsilo"], top_level  # nothing installs a bare `sdk` or `cli`
    assert not (purelib / "fedsilo" / "tests").exists()
    env = {**os.environ, "PYTHONPATH": str(purelib)}
    where = subprocess.run(
        [sys.executable, "-c", "import fedsilo, fedsilo.sdk, fedsilo.cli.main; "
         "assert callable(fedsilo.load_personalised), fedsilo.__version__; "
         "print(fedsilo.sdk.__file__)"],
        check=True, capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert where.stdout.strip().startswith(str(purelib))
    shown = subprocess.run(
        [str(purelib / "bin" / "fedsilo"), "--help"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert shown.returncode == 0, shown.stderr
    assert "simulate" in shown.stdout
    assert importlib.util.find_spec("fedsilo.sdk") is not None  # our own install is intact


def test_every_package_folder_is_declared_in_pyproject() -> None:
    """A new sub-package that pyproject.toml does not list would vanish on `pip install .`."""
    import tomllib

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                   ["packages"])
    found = {"fedsilo"} if (ROOT / "fedsilo" / "__init__.py").is_file() else set()
    for top in ("sdk", "silo_agent", "aggregator", "privacy", "simulation", "provision", "cli"):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).parts
            found.add(".".join(("fedsilo", *rel)))
    assert found == declared
