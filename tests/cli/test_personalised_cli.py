"""`fedsilo export`, `generate` and `evaluate` on real `fedsilo simulate` runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fedsilo.cli.main import app

runner = CliRunner()
RUN = ["--silos", "3", "--rounds", "2", "--local-steps", "6", "--examples-per-silo", "80",
       "--eval-limit", "8"]


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _per_silo(run: Path) -> dict[str, float]:
    return json.loads((run / "summary.json").read_text())["per_silo"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FedIT-FT run made with the CLI itself."""
    out = tmp_path_factory.mktemp("runs")
    result = _invoke("simulate", *RUN, "--strategy", "fedit-ft", "--out", out)
    assert result.exit_code == 0, result.output
    (folder,) = out.iterdir()
    return folder


def test_export_generate_evaluate(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "silo-2"
    result = _invoke("export", run, "--silo", "silo-2", "--out", out)
    assert result.exit_code == 0, result.output
    assert "exported silo-2" in result.output
    config = json.loads((out / "personalised.json").read_text())
    assert config["strategy"] == "fedit-ft" and config["base_model"]["source"] == "builtin:tiny"
    assert (out / "peft" / "adapter_config.json").is_file()

    greedy = _invoke("generate", out, "colour: car is teal")
    assert greedy.exit_code == 0, greedy.output
    assert greedy.stdout.strip(), "the completion is empty"
    assert _invoke("generate", out, "colour: car is teal").stdout == greedy.stdout
    sampled = [_invoke("generate", out, "colour: car is teal", "--sample", "--seed", seed,
                       "--temperature", "1.5", "--max-new-tokens", "5").stdout
               for seed in (7, 7)]
    assert sampled[0] == sampled[1] and sampled[0].strip()
    assert len(sampled[0].rstrip("\n")) <= 5  # byte tokens: at most 5 new characters

    scored = _invoke("evaluate", run, "--silo", "silo-2", "--json")
    assert scored.exit_code == 0, scored.output
    (line,) = scored.stdout.splitlines()  # one JSON line, no progress bar off a terminal
    assert json.loads(line) == {"silo": "silo-2", "metric": "accuracy",
                                "value": _per_silo(run)["silo-2"]}
    shown = _invoke("evaluate", run, "--silo", "silo-0")
    assert "the run's final score" in shown.stdout and "(the same)" in shown.stdout


def test_an_older_run_exports_from_its_config_json(run: Path, tmp_path: Path) -> None:
    """Adapters written before they recorded their provenance: config.json fills it in."""
    old = tmp_path / "old-run"
    shutil.copytree(run, old)
    adapter = old / "silos" / "silo-1" / "adapter.safetensors"
    with safe_open(str(adapter), "pt") as handle:
        meta = handle.metadata()
    save_file(load_file(str(adapter)), str(adapter),
              {k: meta[k] for k in ("silo_id", "round", "assignment")})
    result = _invoke("export", old, "--silo", "silo-1", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    digest = json.loads((tmp_path / "out" / "personalised.json").read_text())["base_model"]
    assert len(digest["digest"]) == 64  # pinned at export
    scored = _invoke("evaluate", old, "--silo", "silo-1", "--json")
    assert json.loads(scored.stdout)["value"] == _per_silo(run)["silo-1"]


def test_a_generation_task_keeps_its_template(tmp_path: Path) -> None:
    rows = [{"q": f"say {w}", "a": w, "topic": t}
            for t, words in {"x": ["red", "blue"], "y": ["one", "two"]}.items()
            for w in words * 15]
    (tmp_path / "own.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    spec = tmp_path / "own.toml"
    spec.write_text('path = "own.jsonl"\nkind = "generation"\nresponse_column = "a"\n'
                    'label_column = "topic"\n[columns]\ninstruction = "q"\n')
    result = _invoke("simulate", "--silos", "2", "--rounds", "1", "--local-steps", "4",
                     "--experts", "2", "--k-c", "1", "--b", "2", "--k-e", "1",
                     "--min-contributors", "1", "--data", spec, "--partition", "iid",
                     "--examples-per-silo", "30", "--eval-limit", "4", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "r").iterdir()
    assert _invoke("export", run, "--silo", "silo-0", "--out", tmp_path / "e").exit_code == 0
    prompt = json.loads((tmp_path / "e" / "personalised.json").read_text())["prompt"]
    assert prompt["template"] == "alpaca" and prompt["kind"] == "generation"
    generated = _invoke("generate", tmp_path / "e", "say red", "--max-new-tokens", "4")
    assert generated.exit_code == 0, generated.output
    scored = json.loads(_invoke("evaluate", run, "--silo", "silo-0", "--json").stdout)
    assert scored == {"silo": "silo-0", "metric": "rouge-l", "value": _per_silo(run)["silo-0"]}
    other = _invoke("evaluate", run, "--silo", "silo-0", "--data", spec, "--limit", "5")
    assert other.exit_code == 0 and "on 5 examples" in other.stdout, other.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "{tmp}/missing", "--out", "{tmp}/o"], "does not exist"),
        (["export", "{run}", "--silo", "silo-9", "--out", "{tmp}/o"], "its silos: silo-0"),
        (["export", "{run}", "--out", "{tmp}/o"], "--silo"),
        (["export", "{tmp}", "--out", "{tmp}/o"], "neither a `fedsilo simulate` run folder"),
        (["evaluate", "{run}/assignments"], "neither"),
        (["evaluate", "{run}", "--silo", "silo-0", "--data", "{tmp}/none.toml"], "not found"),
        (["generate", "{run}", "hello"], "not an exported personalised model"),
        (["generate", "{tmp}/missing", "hello"], "does not exist"),
        (["export", "{run}", "--silo", "silo-0", "--out", "{run}"], "a folder of its own"),
        (["export", "{run}", "--silo", "silo-0", "--out", "{run}/silos/silo-0", "--force"],
         "a folder of its own"),
        (["export", "{run}", "--silo", "silo-0", "--out", "{run}/assignments"], "--force"),
    ],
)
def test_bad_input_is_one_clear_line(run: Path, tmp_path: Path, args: list[str],
                                     message: str) -> None:
    filled = [a.format(tmp=tmp_path, run=run) for a in args]
    result = runner.invoke(app, filled)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in result.output, result.output
    assert "Traceback" not in result.output


def test_generate_fields_must_be_name_value(run: Path, tmp_path: Path) -> None:
    assert _invoke("export", run, "--silo", "silo-0", "--out", tmp_path / "e").exit_code == 0
    result = runner.invoke(app, ["generate", str(tmp_path / "e"), "hi", "--field", "oops"])
    assert result.exit_code == 2 and "NAME=VALUE" in result.output, result.output
