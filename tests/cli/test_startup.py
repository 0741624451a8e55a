"""`fedsilo --help` and every command's parsing load no torch, transformers, opacus or
pika: the heavy modules are imported by the command that needs them."""

import subprocess
import sys

import pytest

HEAVY = ("opacus", "pika", "torch", "transformers")


@pytest.mark.parametrize("module", [
    "fedsilo.cli.main", "fedsilo.simulation.config", "fedsilo.sdk.strategies.config",
    "fedsilo.sdk.strategies",
])
def test_the_cli_and_the_configs_import_nothing_heavy(module: str) -> None:
    code = (f"import sys, {module}\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_help_reads_the_simulation_defaults_without_the_engine() -> None:
    code = ("import sys\n"
            "from typer.testing import CliRunner\n"
            "from fedsilo.cli.main import app\n"
            "result = CliRunner().invoke(app, ['simulate', '--help'])\n"
            "assert result.exit_code == 0 and '--warmup-rounds' in result.output, result.output\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
