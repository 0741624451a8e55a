"""`RunHistory`: one reader for simulate run folders and aggregator state_dirs, on files
written here the way both writers write them (RoundSummary.to_json lines)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedsilo.aggregator.history import (
    RUN_FORMAT,
    RunFolderError,
    load_history,
    read_rounds,
    run_header,
)
from fedsilo.aggregator.report import RoundSummary, SiloRow


def _line(server_round: int, scores: dict[str, float | None], up: int = 10, down: int = 20,
          final: bool = False) -> str:
    rows = {s: SiloRow(metric=v, experts_min=1, experts_mean=1.5, experts_max=2,
                       bytes_up=up, bytes_down=down, train_s=0.5, test_s=0.1)
            for s, v in scores.items()}
    values = [v for v in scores.values() if v is not None]
    summary = RoundSummary(round=server_round, final=final, silos=rows, aggregate_s=0.01,
                           mta=sum(values) / len(values) if values else None,
                           metric_name="accuracy", round_s=1.0)
    return json.dumps(summary.to_json()) + "\n"


def _run(tmp_path: Path, lines: str, **config: object) -> Path:
    run = tmp_path / "run"
    (run / "assignments").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(
        {"strategy": "fedamole", "rounds": 2, **run_header(), **config}))
    (run / "metrics.jsonl").write_text(lines)
    return run


def test_scores_mtal_and_totals_follow_the_lines(tmp_path: Path) -> None:
    run = _run(tmp_path, _line(0, {"a": 0.2, "b": 0.4}) + _line(1, {"a": 0.6, "b": None})
               + _line(2, {"a": None, "b": None}, up=1, down=2, final=True))
    (run / "assignments" / "round_001.json").write_text(json.dumps(
        {"a": {"m.q": [0, 2]}, "b": {"m.q": [1]}}))
    history = load_history(run)
    assert history.kind == "simulate" and history.metric == "accuracy"
    assert history.latest() == {"a": 0.6, "b": 0.4}  # b's latest is round 0's
    assert history.mtal() == pytest.approx(0.5)
    assert history.mta() == [(0, pytest.approx(0.3)), (1, pytest.approx(0.6))]
    assert history.bytes_by_silo() == {"a": (21, 42), "b": (21, 42)}  # every round summed
    assert history.bytes_per_round()[-1] == (2, 2, 4)
    silos, width, grid = history.expert_grid(history.experts_round())
    assert silos == ["a", "b"] and width == 3
    assert grid == {"m.q": [[1, 0, 1], [0, 1, 0]]}
    assert history.round_times()[0]["round_s"] == 1.0


def test_a_torn_last_line_is_skipped_and_a_round_written_twice_counts_once(
    tmp_path: Path
) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(_line(0, {"a": 0.1}) + _line(0, {"a": 0.3}) + _line(1, {"a": 0.5})[:40])
    assert [(r["round"], r["silos"]["a"]["metric"]) for r in read_rounds(path)] == [(0, 0.3)]
    path.write_text(_line(0, {"a": 0.1}) + "not json\n" + _line(1, {"a": 0.5}))
    with pytest.raises(RunFolderError, match=r"line 2 of .* is not JSON"):
        read_rounds(path)


def test_folders_that_are_not_runs_are_refused_saying_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(RunFolderError, match="no such folder"):
        load_history(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFolderError, match=r"neither config\.json .* nor status\.json"):
        load_history(tmp_path / "empty")
    run = _run(tmp_path, _line(0, {"a": 0.1}))
    with pytest.raises(RunFolderError, match=rf"holds 1 run folder.*e\.g\. {re.escape(str(run))}"):
        load_history(tmp_path)
    newer = _run(tmp_path / "n", "", run_format=RUN_FORMAT + 1, fedsilo_version="9.9")
    with pytest.raises(RunFolderError, match=r"written by fedsilo 9\.9 .*Use fedsilo 9\.9"):
        load_history(newer)
    with pytest.raises(RunFolderError, match=r"no privacy-ledger\.json in"):
        load_history(run, silo_dirs=[tmp_path / "empty"])
