"""The service commands' behaviour on bad input: one clear line and an exit code, no
traceback, no secret. (The federation itself is tested in test_deployment.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsilo.aggregator.config import FederationConfig
from fedsilo.cli.main import app
from fedsilo.sdk.config import load_config
from fedsilo.silo_agent.config import SiloConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "local"
runner = CliRunner()


@pytest.mark.parametrize("name", ["federation.toml", "silo-0.toml", "silo-1.toml", "silo-2.toml"])
def test_example_configs_load(name: str) -> None:
    cls = FederationConfig if name == "federation.toml" else SiloConfig
    config = load_config(cls, EXAMPLES / name, env={})
    assert config.state_dir.is_relative_to(EXAMPLES)


DIGEST = f'model_digest = "{"0" * 64}"\n'


def _fed(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(text)
    return path


def test_unknown_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    path = _fed(tmp_path, 'silos = ["a"]\n[rounds]\ndedline_s = 5\n')
    result = runner.invoke(app, ["aggregator", "run", "--config", str(path)])
    assert result.exit_code == 2
    assert "rounds.dedline_s" in result.output and "deadline_s" in result.output
    assert "Traceback" not in result.output


def test_bad_value_names_the_allowed_ones(tmp_path: Path) -> None:
    path = _fed(tmp_path, 'silos = ["a"]\n[rounds]\non_missing = "wait"\n')
    result = runner.invoke(app, ["aggregator", "run", "--config", str(path)])
    assert result.exit_code == 2 and '"extend", "abort"' in result.output


def test_rsea_relevance_settings_come_from_the_federation_file(tmp_path: Path) -> None:
    path = _fed(tmp_path, 'silos = ["a"]\n[strategy]\nrelevance = "standardised"\n'
                'temperature = 0.5\nstickiness = 1\n')
    config = load_config(FederationConfig, path, env={})
    assert (config.strategy.relevance, config.strategy.temperature,
            config.strategy.stickiness) == ("standardised", 0.5, 1.0)
    bad = _fed(tmp_path, 'silos = ["a"]\n[strategy]\nrelevance = "cosine"\n')
    result = runner.invoke(app, ["aggregator", "run", "--config", str(bad)])
    assert result.exit_code == 2
    assert all(f'"{mode}"' in result.output for mode in ("paper", "standardised", "trainers",
                                                              "anchor"))


def test_print_config_masks_the_broker_password(tmp_path: Path) -> None:
    path = _fed(tmp_path, 'silos = ["a"]\n[broker]\nurls = ["amqp://u:hunter2@h:5672/v"]\n')
    result = runner.invoke(app, ["aggregator", "run", "--config", str(path), "--print-config",
                                 "--set", "rounds.deadline_s=5"])
    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output and "u:***@h" in result.output
    assert "deadline_s = 5" in result.output


def test_unreachable_broker_is_one_clear_line_without_the_password(tmp_path: Path) -> None:
    path = _fed(tmp_path, f'silos = ["a"]\nstate_dir = "{tmp_path / "st"}"\n{DIGEST}[broker]\n'
                'urls = ["amqp://u:hunter2@127.0.0.1:1/v"]\nconnect_timeout_s = 1\n'
                '[security]\nenabled = false\n')
    result = subprocess.run(
        [sys.executable, "-m", "fedsilo.cli.main", "aggregator", "run", "--config", str(path)],
        capture_output=True, text=True, timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 4, output
    assert "127.0.0.1:1" in output and "rabbitmq-server" in output
    assert "hunter2" not in output and "Traceback" not in output


def test_missing_keys_are_one_clear_line_naming_the_fix(tmp_path: Path) -> None:
    path = _fed(tmp_path, f'silos = ["a"]\nstate_dir = "{tmp_path / "st"}"\n{DIGEST}[security]\n'
                f'keys_dir = "{tmp_path / "nokeys"}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "fedsilo.cli.main", "aggregator", "run", "--config", str(path)],
        capture_output=True, text=True, timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "nokeys" in output and "fedsilo provision" in output and "Traceback" not in output


def test_status_reads_the_aggregators_status_file(tmp_path: Path) -> None:
    (tmp_path / "status.json").write_text(json.dumps({
        "federation": "f", "pid": 999999999, "updated_at": 0, "phase": "collecting",
        "round": 2, "total_rounds": 5, "deadline_at": 10.0, "deadline_in_s": 30.0,
        "extensions": 0, "roster": ["a", "b"], "joined": ["a", "b"], "expected": ["a", "b"],
        "uploaded": {"a": 1000}, "missing": ["b"], "bytes_down": {"a": 10, "b": 10},
        "counters": {"duplicate": 1}, "reconnects": 2, "last_error": "boom",
        "rejected": {"signature": 3},
    }))
    result = runner.invoke(app, ["status", "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for text in ("collecting", "round 2 of 5", "uploaded", "waiting", "duplicate 1",
                 "reconnects: 2", "boom", "not running", "signature 3"):
        assert text in result.output, text


def test_status_without_a_state_folder_says_how_to_start(tmp_path: Path) -> None:
    result = runner.invoke(app, ["status", "--state-dir", str(tmp_path)])
    assert result.exit_code == 2 and "fedsilo aggregator run" in result.output


def test_broker_settings_repr_hides_the_urls() -> None:
    from fedsilo.sdk.transport.settings import BrokerSettings

    assert "hunter2" not in repr(BrokerSettings(urls=("amqp://u:hunter2@h/",)))


def test_no_model_digest_is_one_clear_line_naming_the_fix(tmp_path: Path) -> None:
    path = _fed(tmp_path, f'silos = ["a"]\nstate_dir = "{tmp_path / "st"}"\n')
    result = runner.invoke(app, ["aggregator", "run", "--config", str(path)])
    output = " ".join(result.output.split())
    assert result.exit_code == 2, output
    assert "no model_digest" in output and "fedsilo digest MODEL" in output
