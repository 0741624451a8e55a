"""`fedsilo simulate`'s output: the round table gives each score's test-set size, and the
bars follow scoring as well as training (cli/display.py, cli/progress.py)."""

from __future__ import annotations

import io

from rich.console import Console

from fedsilo.aggregator.report import RoundSummary, SiloRow
from fedsilo.cli.display import RichObserver, round_table
from fedsilo.cli.progress import TrainingProgress


def _console(terminal: bool = False) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=80, no_color=True), out


def _row(metric: float | None, test_n: int | None) -> SiloRow:
    return SiloRow(metric=metric, experts_min=1, experts_mean=1.5, experts_max=2, bytes_up=10,
                   bytes_down=20, train_s=0.1, test_s=0.2, test_n=test_n)


def test_the_round_table_gives_each_silos_test_set_size() -> None:
    summary = RoundSummary(round=2, final=False, aggregate_s=0.1, mta=0.5,
                           silos={"silo-0": _row(0.25, 8), "silo-1": _row(0.75, 812),
                                  "silo-2": _row(None, None)})
    console, out = _console()
    console.print(round_table(summary, "accuracy"))
    text = out.getvalue()
    assert "test n" in text and "test examples scored" in text
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if "silo-" in line}
    assert "│      8 │" in lines["silo-0"] and "│    812 │" in lines["silo-1"]
    assert "│      - │" in lines["silo-2"]
    assert all(len(line) <= 80 for line in text.splitlines())  # still fits a terminal


def test_simulation_bars_follow_scoring() -> None:
    console, _ = _console(terminal=True)
    observer = RichObserver(console)
    observer.round_started(0, final=False)
    observer.silo_started("silo-0", steps=3)
    observer.train_step("silo-0", 3, 3, 0.5)
    observer.eval_step("silo-0", 4, 10)
    assert observer.progress is not None and observer.task is not None
    task = observer.progress.tasks[0]
    assert task.description == "silo-0 testing" and (task.completed, task.total) == (4, 10)


def test_agent_bars_follow_scoring_and_counts_print_as_integers() -> None:
    console, out = _console(terminal=True)
    progress = TrainingProgress(console, "silo-a")
    progress.round_started(1, steps=2)
    progress.eval_step(3, 6)
    task = progress.progress.tasks[0]
    assert task.description == "silo-a round 1 testing" and task.completed == 3
    progress.round_finished(1, {"metric": 0.5, "test_n": 6.0})
    assert "metric 0.5000  test_n 6" in out.getvalue()
