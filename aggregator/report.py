"""What a round looked like, per silo: the rows of `fedsilo simulate`'s tables, of
metrics.jsonl and of `fedsilo status`. Shared by simulation and the aggregator service."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fedsilo.aggregator.coordinator import RoundRecord


@dataclass
class SiloRow:
    metric: float | None
    experts_min: int
    experts_mean: float
    experts_max: int
    bytes_up: int
    bytes_down: int
    train_s: float
    test_s: float
    val_metric: float | None = None  # with training.report_val, on the final score
    test_n: int | None = None  # test examples the metric is over (None: not scored/said)


@dataclass
class RoundSummary:
    round: int
    final: bool
    silos: dict[str, SiloRow]
    aggregate_s: float
    mta: float | None
    metric_name: str = "metric"
    aggregation: dict[str, float] = field(default_factory=dict)
    """The strategy's report of its aggregation step (timings, assignment diagnostics)."""
    round_s: float | None = None
    """Wall time from the plans going out to the round's close (None: not recorded)."""

    def to_json(self) -> dict[str, Any]:
        """One metrics.jsonl line: what `fedsilo simulate` and the aggregator both write,
        and what `fedsilo report` and `fedsilo status` read back."""
        return {
            "round": self.round,
            "final": self.final,
            "metric": self.metric_name,
            "mta": self.mta,
            "aggregate_s": self.aggregate_s,
            "round_s": self.round_s,
            "aggregation": dict(self.aggregation),
            "silos": {k: asdict(v) for k, v in self.silos.items()},
        }



def summarise(record: RoundRecord, metric: str) -> RoundSummary:
    rows: dict[str, SiloRow] = {}
    for silo, assignment in record.assignment.items():
        counts = [len(ids) for ids in assignment.values()] or [0]
        timings = record.timings.get(silo, {})
        rows[silo] = SiloRow(
            metric=record.metrics.get(silo, {}).get("metric"),
            experts_min=min(counts),
            experts_mean=sum(counts) / len(counts),
            experts_max=max(counts),
            bytes_up=record.bytes_up.get(silo, 0),
            bytes_down=record.bytes_down.get(silo, 0),
            train_s=timings.get("train_s", 0.0),
            test_s=timings.get("test_s", 0.0),
            val_metric=record.metrics.get(silo, {}).get("val_metric"),
            test_n=_count(record.metrics.get(silo, {}).get("test_n")),
        )
    values = [row.metric for row in rows.values() if row.metric is not None]
    return RoundSummary(
        round=record.round,
        final=record.final,
        silos=rows,
        aggregate_s=record.aggregation.seconds if record.aggregation else 0.0,
        mta=sum(values) / len(values) if values else None,
        metric_name=metric,
        aggregation=dict(record.aggregation.details) if record.aggregation else {},
        round_s=None if record.opened_at is None or record.closed_at is None
        else record.closed_at - record.opened_at,
    )


def _count(value: float | None) -> int | None:
    """An upload's example count (metrics travel as floats); None when it sent none."""
    return None if value is None or value != value else int(value)


def latest_metrics(rounds: Sequence[RoundSummary]) -> dict[str, float]:
    """Each silo's most recent score: the personalised model after the last round."""
    latest: dict[str, float] = {}
    for summary in rounds:
        for silo, row in summary.silos.items():
            if row.metric is not None:
                latest[silo] = row.metric
    return latest
