"""Error texts as the user sees them: whole (not wrapped, no markup eaten), naming the table,
the key and the source that set a bad value; and `fedsilo --version`."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from typer.testing import CliRunner

from fedsilo.cli.main import app

runner = CliRunner()


def test_version_prints_the_installed_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"fedsilo {importlib.metadata.version('fedsilo')}"


def test_a_misspelled_key_names_its_table(tmp_path: Path) -> None:
    path = tmp_path / "federation.toml"
    path.write_text('silos = ["a"]\n[strategy]\nkc = 2\n')
    result = runner.invoke(app, ["aggregator", "run", "--config", str(path)])
    assert result.exit_code == 2
    assert 'did you mean "strategy.k_c"? allowed keys in [strategy]: name,' in result.output
    assert "allowed keys in :" not in result.output


def test_another_strategys_key_names_the_strategy_that_takes_it(tmp_path: Path) -> None:
    path = tmp_path / "federation.toml"
    path.write_text('silos = ["a"]\n[strategy]\nname = "fedit"\nnum_experts = 4\n')
    result = runner.invoke(app, ["aggregator", "run", "--config", str(path),
                                 "--set", "strategy.sync_every=2"])
    assert result.exit_code == 2
    assert (f'{path}: "strategy.num_experts" is a setting of name = "fedamole" only; '
            '[strategy] with name = "fedit" takes: name, weighting, aggregation, trim, '
            "min_contributors") in result.output
    assert '--set strategy.sync_every: "strategy.sync_every" is a setting of name = "fdlora"' \
        in result.output


def test_a_missing_config_file_lists_its_tables_and_nothing_else(tmp_path: Path) -> None:
    result = runner.invoke(app, ["aggregator", "run", "--config", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    assert "config file not found" in result.output
    assert "model_digest, [broker], [security], [schedule]" in result.output
    assert ", , " not in result.output
    # the defaults' own checks ("list the federation's silo ids") are noise here
    assert "silo ids" not in result.output and "defaults" not in result.output


def test_a_bad_value_blames_the_source_that_set_it(tmp_path: Path) -> None:
    path = tmp_path / "federation.toml"
    path.write_text('silos = ["a"]\n[strategy]\nname = "fedamolex"\n')
    env = {"FEDSILO_BROKER__URLS": '["amqp://guest:guest@127.0.0.1:5672/"]'}
    result = runner.invoke(app, ["aggregator", "run", "--config", str(path)], env=env)
    assert result.exit_code == 2
    assert f"{path}: the top-level table is invalid: strategy.name 'fedamolex'" in result.output
    assert "FEDSILO_BROKER__URLS" not in result.output
    by_env = runner.invoke(app, ["aggregator", "run", "--config", str(path)],
                           env={**env, "FEDSILO_STRATEGY__NAME": "nope"})
    assert "FEDSILO_STRATEGY__NAME: the top-level table is invalid" in by_env.output
    assert str(path) + ":" not in by_env.output and "FEDSILO_BROKER__URLS" not in by_env.output


def test_long_errors_are_not_wrapped(tmp_path: Path) -> None:
    result = runner.invoke(app, ["aggregator", "run", "--config", str(tmp_path / "nope.toml")])
    line = next(x for x in result.output.splitlines() if "config file not found" in x)
    assert line.endswith("or pass another path") and len(line) > 200
