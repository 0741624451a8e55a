"""`fedsilo simulate` interrupted for real (SIGINT to a `fedsilo simulate` process) and
continued with `--resume RUN_DIR` ends exactly where an uninterrupted run ends; and the
folders `--resume` must refuse."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedsilo.aggregator.history import fedsilo_version
from fedsilo.cli.main import app
from fedsilo.simulation.state import CHECKPOINT

runner = CliRunner()
ARGS = ["--silos", "3", "--rounds", "3", "--local-steps", "3", "--experts", "4", "--b", "3",
        "--examples-per-silo", "60", "--eval-limit", "8"]
SILOS = ("silo-0", "silo-1", "silo-2")


def _simulate(*args: str):
    return runner.invoke(app, ["simulate", *args], catch_exceptions=False)


def _only_run(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


def _interrupt_after_round_0(out: Path, args: list[str]) -> tuple[Path, str]:
    """`fedsilo simulate` in its own process, held inside round 1 after the first silo
    trained (FEDSILO_FAULT wait point) and sent SIGINT there, as Ctrl-C would."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "FEDSILO_FAULT": f"silo_done@1:wait={out / 'never'}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "fedsilo.cli.main", "simulate", *args, "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob(f"*/{CHECKPOINT}")):  # round 0 saved: round 1 under way
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "round 0 never finished"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, output
    return _only_run(out), output


def _releases(run: Path, silo: str) -> list[dict]:
    """The silo's DP releases as its ledger holds them, less when each was recorded."""
    ledger = json.loads((run / "silos" / silo / "privacy-ledger.json").read_text())
    return [{k: v for k, v in r.items() if k != "time"} for r in ledger["releases"]]


@pytest.mark.parametrize(
    "extra",
    [
        ["--dp-epsilon", "8"],  # the seeded DP noise and its calibration carry over
        ["--strategy", "local"],  # each silo's adapter lives only on the silo
        ["--strategy", "fdlora"],  # so does FDLoRA's personal adapter (client state)
    ],
    ids=["fedamole-dp", "local", "fdlora"],
)
def test_an_interrupted_run_resumed_ends_as_an_uninterrupted_one(
    tmp_path: Path, one_thread: None, extra: list[str]
) -> None:
    args = [*ARGS, *extra]
    run, output = _interrupt_after_round_0(tmp_path / "cut", args)
    printed = " ".join(output.split())
    assert "Traceback" not in output
    assert f"round 0 of 3 is done and saved in {run}" in printed
    assert f"fedsilo simulate --resume {run}" in output  # on one line: copy and paste
    assert not (run / "summary.json").exists()
    assert [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()] \
        == [0]

    resumed = _simulate("--resume", str(run))
    assert resumed.exit_code == 0, resumed.output
    assert "continuing at round 1" in " ".join(resumed.output.split())
    reference = _simulate(*args, "--out", str(tmp_path / "whole"))
    assert reference.exit_code == 0, reference.output
    whole = _only_run(tmp_path / "whole")

    assert json.loads((run / "summary.json").read_text()) == \
        json.loads((whole / "summary.json").read_text())
    scores = [[(s, row["metric"]) for s, row in json.loads(line)["silos"].items()]
              for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert scores == [[(s, row["metric"]) for s, row in json.loads(line)["silos"].items()]
                      for line in (whole / "metrics.jsonl").read_text().splitlines()]
    for silo in SILOS:  # the personalised adapters, bit for bit
        mine = load_file(run / "silos" / silo / "adapter.safetensors")
        theirs = load_file(whole / "silos" / silo / "adapter.safetensors")
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), silo
        if "--dp-epsilon" in extra:  # the same spend: each round released once, same noise
            assert _releases(run, silo) == _releases(whole, silo)
            assert [r["round"] for r in _releases(run, silo)] == [0, 1, 2]
    assert not (run / CHECKPOINT).exists()  # complete: nothing left to resume
    config = json.loads((run / "config.json").read_text())
    assert config["fedsilo_version"] == fedsilo_version() and config["run_format"] == 1
    assert config["created_at"].endswith("+00:00")  # UTC, ISO 8601

    again = _simulate("--resume", str(run))  # a complete run says so
    assert again.exit_code == 2
    assert f"{run} is complete" in " ".join(again.output.split())


def _started_run(tmp_path: Path) -> Path:
    """A run folder as an interrupted run leaves it before its first round: config.json."""
    result = _simulate(*ARGS, "--rounds", "1", "--out", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    run = _only_run(tmp_path / "runs")
    (run / "summary.json").unlink()
    return run


@pytest.mark.parametrize(
    ("change", "flags", "message"),
    [
        (None, ["--rounds", "5"], "--rounds 5 (the run has 1)"),
        (None, ["--experts", "6", "--seed", "3"], "--experts 6 (the run has 4); --seed 3"),
        ({"fedsilo_version": "0.0.1"}, [], "was started by fedsilo 0.0.1"),
        ({"run_format": 99}, [], "in run format 99"),
    ],
)
def test_resume_refuses_what_would_not_continue_the_same_run(
    tmp_path: Path, change: dict | None, flags: list[str], message: str
) -> None:
    run = _started_run(tmp_path)
    if change:
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**config, **change}))
    result = _simulate("--resume", str(run), *flags)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_resume_of_a_folder_that_is_not_a_run_says_what_to_give(tmp_path: Path) -> None:
    result = _simulate("--resume", str(tmp_path))
    assert result.exit_code == 2
    assert "not a `fedsilo simulate` run folder" in " ".join(result.output.split())
    result = _simulate("--resume", str(tmp_path / "missing"))
    assert result.exit_code == 2 and "no such folder" in result.output


def test_resume_with_the_same_value_as_recorded_is_no_conflict(tmp_path: Path) -> None:
    run = _started_run(tmp_path)
    result = _simulate("--resume", str(run), "--rounds", "1", "--silos", "3")
    assert result.exit_code == 0, result.output
    assert (run / "summary.json").exists()
