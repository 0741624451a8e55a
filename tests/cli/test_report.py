"""`fedsilo report` from a `fedsilo simulate` run folder and from a real deployment's
aggregator state_dir (real processes over the broker), and `fedsilo status` of that
deployment: latest scores, MTAL and whole-run totals; the score's name is the same in both
kinds of run."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from fedsilo.aggregator.history import load_history
from fedsilo.cli.main import app
from fedsilo.simulation.engine import run_simulation

runner = CliRunner()
QUICK = ["--silos", "3", "--rounds", "2", "--local-steps", "3", "--experts", "4", "--b", "3",
         "--examples-per-silo", "60", "--eval-limit", "8"]


def _invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def _check_report(folder: Path, expected: set[str]) -> str:
    """Every expected PNG is a real image, and the page embeds exactly those bytes and
    fetches nothing from anywhere."""
    pngs = {p.stem: p.read_bytes() for p in folder.glob("*.png")}
    assert set(pngs) == expected
    for name, data in pngs.items():
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), name
        height, width, _ = imread(folder / f"{name}.png").shape
        assert height > 100 and width > 100, name
    page = (folder / "report.html").read_text()
    embedded = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', page)
    assert sorted(base64.b64decode(x) for x in embedded) == sorted(pngs.values())
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # no external asset
    assert "<script" not in page and "<link" not in page
    assert "MTAL is the mean over silos of each silo" in page  # defined on the page
    return page


def test_report_of_a_simulate_run(tmp_path: Path) -> None:
    result = _invoke("simulate", *QUICK, "--dp-epsilon", "8", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    (run,) = tmp_path.iterdir()
    result = _invoke("report", str(run))
    assert result.exit_code == 0, result.output
    assert str(run / "report" / "report.html") in " ".join(result.output.split())
    page = _check_report(run / "report", {"scores", "experts", "experts_count", "bytes",
                                          "times", "privacy"})

    summary = json.loads((run / "summary.json").read_text())
    history = load_history(run)
    assert history.latest() == summary["per_silo"]
    assert history.mtal() == pytest.approx(summary["mtal"])
    assert f"{summary['mtal']:.4f} (accuracy)" in page
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(history.bytes_by_silo()["silo-1"]) == sum(
        line["silos"]["silo-1"]["bytes_up"] + line["silos"]["silo-1"]["bytes_down"]
        for line in lines)
    last = history.experts_round()
    assignment = json.loads((run / "assignments" / f"round_{last:03d}.json").read_text())
    silos, width, grid = history.expert_grid(last)  # the heat map's cells are the file's
    for module, matrix in grid.items():
        for silo, row in zip(silos, matrix, strict=True):
            assert [j for j in range(width) if row[j]] == sorted(assignment[silo][module])
    for silo in silos:  # the spend the ledger gives at the end, per silo
        ledger = json.loads((run / "silos" / silo / "privacy-ledger.json").read_text())
        assert [r for r, _ in history.privacy[silo].by_round] == sorted(
            {r["round"] for r in ledger["releases"]})
        assert 0 < history.privacy[silo].spent <= 8.0 + 1e-9


def test_report_of_a_folder_that_is_not_a_run_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    for folder, message in [(tmp_path, "is not a fedsilo run"),
                            (tmp_path / "missing", "no such folder"),
                            (tmp_path / "notes.txt", "is a file")]:
        result = _invoke("report", str(folder))
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split())
        assert "Traceback" not in result.output


def test_report_and_status_of_a_real_deployment(deployment, tmp_path: Path) -> None:
    deployment.sim = replace(deployment.sim, silos=2, rounds=2, local_steps=2, num_experts=3,
                             b=3, examples_per_silo=60, eval_limit=8)
    deployment.dp = {"enabled": True, "epsilon": 8.0}
    deployment.write()
    deployment.start_all()
    deployment.wait_all(timeout=300)
    state = deployment.aggregator_dir
    summary = deployment.summary()
    lines = [json.loads(x) for x in (state / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2]  # each round once, final included
    assert len(list((state / "assignments").glob("round_*.json"))) == 3

    # The score is named as `fedsilo simulate` names it, in every file of both.
    sim = run_simulation(deployment.sim, run_dir=tmp_path / "sim")
    sim_summary = json.loads((sim.run_dir / "summary.json").read_text())
    sim_lines = [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["metric"] == sim_summary["metric"] == "accuracy"
    assert {r["metric"] for r in summary["rounds"]} == {line["metric"] for line in lines} \
        == {line["metric"] for line in sim_lines} == {"accuracy"}
    assert lines[0].keys() == sim_lines[0].keys()
    assert lines[0]["silos"]["silo-0"].keys() == sim_lines[0]["silos"]["silo-0"].keys()

    result = _invoke("status", "--state-dir", str(state))
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.split())
    assert "latest accuracy" in shown and "total up MB" in shown
    for silo, value in summary["per_silo"].items():  # latest score, then the run's bytes
        row = re.search(rf"{silo}\s*│\s*yes\s*│\s*-\s*│\s*([\d.]+)\s*│\s*([\d.]+)\s*│"
                        rf"\s*([\d.]+)", result.output)
        assert row is not None, result.output
        up = sum(line["silos"][silo]["bytes_up"] for line in lines)
        down = sum(line["silos"][silo]["bytes_down"] for line in lines)
        assert (row[1], row[2], row[3]) == (f"{value:.4f}", f"{up / 1e6:.3f}",
                                            f"{down / 1e6:.3f}")
        assert up > lines[-1]["silos"][silo]["bytes_up"] + lines[0]["silos"][silo]["bytes_up"]
    assert f"MTAL {summary['mtal']:.4f}" in shown
    up = sum(row["bytes_up"] for line in lines for row in line["silos"].values())
    down = sum(row["bytes_down"] for line in lines for row in line["silos"].values())
    assert f"{up / 1e6:.3f} MB up, {down / 1e6:.3f} MB down" in shown  # the whole run's
    data = json.loads(_invoke("status", "--state-dir", str(state), "--json").output)
    assert data["results"]["bytes_up_total"]["silo-0"] == sum(
        line["silos"]["silo-0"]["bytes_up"] for line in lines)

    out = tmp_path / "report"
    result = _invoke("report", str(state), "--out", str(out),
                     *[f"--silo-dir={deployment.silo_dir(s)}" for s in deployment.silos])
    assert result.exit_code == 0, result.output
    page = _check_report(out, {"scores", "experts", "experts_count", "bytes", "times",
                               "privacy"})
    assert "deployment:" in page and f"{summary['mtal']:.4f} (accuracy)" in page
    assert set(load_history(state, [deployment.silo_dir(s) for s in deployment.silos])
               .privacy) == set(deployment.silos)
