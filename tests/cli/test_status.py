"""`fedsilo status` during a run: each silo's latest score and their mean from the
aggregator's metrics.jsonl beside this round's bytes (after the run, the whole run's bytes:
tests/cli/test_report.py, on a real deployment)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from fedsilo.aggregator.report import RoundSummary, SiloRow
from fedsilo.cli.main import app

runner = CliRunner()


def _row(metric: float | None, up: int) -> SiloRow:
    return SiloRow(metric=metric, experts_min=1, experts_mean=1.0, experts_max=1,
                   bytes_up=up, bytes_down=up, train_s=1.0, test_s=0.1)


def test_status_during_a_run_shows_latest_scores_and_this_rounds_bytes(tmp_path: Path) -> None:
    (tmp_path / "status.json").write_text(json.dumps({
        "federation": "f", "pid": 999999999, "updated_at": 0, "phase": "collecting",
        "round": 2, "total_rounds": 5, "deadline_at": None, "deadline_in_s": None,
        "extensions": 0, "roster": ["a", "b"], "joined": ["a", "b"], "expected": ["a", "b"],
        "uploaded": {"a": 7_000_000}, "missing": ["b"], "bytes_down": {"a": 10, "b": 10},
        "counters": {}, "reconnects": 0, "last_error": None, "rejected": {},
    }))
    rounds = [RoundSummary(0, False, {"a": _row(0.25, 1), "b": _row(0.5, 1)}, 0.1, 0.375,
                           "accuracy"),
              RoundSummary(1, False, {"a": _row(0.75, 1), "b": _row(None, 1)}, 0.1, 0.75,
                           "accuracy")]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r.to_json()) + "\n" for r in rounds))
    result = runner.invoke(app, ["status", "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "latest accuracy" in result.output and "total up MB" not in result.output
    assert re.search(r"a\s*│\s*yes\s*│\s*uploaded\s*│\s*0\.7500\s*│\s*7\.000", result.output)
    assert re.search(r"b\s*│\s*yes\s*│\s*waiting\s*│\s*0\.5000\s*│\s*0\.000", result.output)
    shown = " ".join(result.output.split())
    assert "mean of the latest scores so far 0.6250 (accuracy" in shown
