"""A simulation tells its observer about scoring too, and records each score's test-set
size (`test_n`) in metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from fedsilo.aggregator.report import RoundSummary
from fedsilo.simulation.engine import SimulationConfig, run_simulation


class _Recorder:
    def __init__(self) -> None:
        self.evals: dict[str, list[tuple[int, int]]] = {}
        self.summaries: list[RoundSummary] = []

    def round_started(self, server_round: int, final: bool) -> None: ...
    def silo_started(self, silo_id: str, steps: int) -> None: ...
    def train_step(self, silo_id: str, step: int, total: int, loss: float) -> None: ...

    def eval_step(self, silo_id: str, done: int, total: int) -> None:
        self.evals.setdefault(silo_id, []).append((done, total))

    def round_finished(self, summary: RoundSummary) -> None:
        self.summaries.append(summary)

    def stop(self) -> None: ...


def test_scoring_progress_and_test_sizes_reach_the_observer(tmp_path: Path) -> None:
    config = SimulationConfig(silos=3, rounds=1, local_steps=1, num_experts=4, b=3,
                              examples_per_silo=60, eval_limit=4, out_dir=str(tmp_path))
    recorder = _Recorder()
    result = run_simulation(config, recorder)
    assert set(recorder.evals) == {"silo-0", "silo-1", "silo-2"}
    assert all(seen[-1][0] == seen[-1][1] for seen in recorder.evals.values())
    scored = recorder.summaries[0].silos
    assert all(row.test_n is not None and 1 <= row.test_n <= 4 for row in scored.values())
    line = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert {s: v["test_n"] for s, v in line["silos"].items()} == {
        s: row.test_n for s, row in scored.items()}
