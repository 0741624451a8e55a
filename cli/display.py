"""Rich output for `fedsilo simulate`: a progress bar while silos train, a table per round."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedsilo.aggregator.report import RoundSummary

if TYPE_CHECKING:
    from fedsilo.privacy.dp import DPConfig


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f}"


def round_table(summary: RoundSummary, metric_name: str) -> Table:
    title = "final evaluation" if summary.final else f"round {summary.round}"
    mta = "-" if summary.mta is None else f"{summary.mta:.4f}"
    # "test n": how many test examples each score is over, so a score on 8 examples is not
    # read like one on 800. Short headers keep the table within 80 columns.
    table = Table(
        title=f"{title}  ·  mean {metric_name} {mta}  ·  aggregate {summary.aggregate_s:.2f}s",
        caption="test n: test examples scored; experts: domain experts per module, "
        "min/mean/max",
    )
    for column in ("silo", metric_name, "test n", "experts", "up MB", "down MB",
                   "train s", "test s"):
        table.add_column(column, justify="left" if column == "silo" else "right")
    for silo, row in summary.silos.items():
        table.add_row(
            silo,
            "-" if row.metric is None else f"{row.metric:.4f}",
            "-" if row.test_n is None or row.metric is None else str(row.test_n),
            f"{row.experts_min}/{row.experts_mean:.1f}/{row.experts_max}",
            _mb(row.bytes_up),
            _mb(row.bytes_down),
            f"{row.train_s:.2f}",
            f"{row.test_s:.2f}",
        )
    return table


class RichObserver:
    """Renders simulation events; one progress task per silo per round."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task: int | None = None

    def round_started(self, server_round: int, final: bool) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[loss]}"),
            TimeElapsedColumn(), console=self.console, transient=True,
        )
        self.progress.start()

    def silo_started(self, silo_id: str, steps: int) -> None:
        assert self.progress is not None
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(f"{silo_id} training", total=max(steps, 1), loss="")

    def train_step(self, silo_id: str, step: int, total: int, loss: float) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=step, loss=f"loss {loss:.3f}")

    def eval_step(self, silo_id: str, done: int, total: int) -> None:
        """Scoring the test split: the silo's bar turns into a testing bar."""
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, description=f"{silo_id} testing", total=max(total, 1),
                                 completed=done, loss="")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()

    def round_finished(self, summary: RoundSummary) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.progress, self.task = None, None
        if summary.final and summary.mta is None:
            self.console.print("final round: every silo kept its personalised adapter")
            return
        self.console.print(round_table(summary, summary.metric_name))


def render_privacy(console: Console, silo_id: str, dp: DPConfig, summary: dict) -> None:
    """`fedsilo agent privacy`: the silo's DP ledger in one table."""
    enabled = dp.enabled
    table = Table(title=f"privacy ledger of {silo_id}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    spent, budget = summary["epsilon_spent"], summary["epsilon_budget"]
    table.add_row("differential privacy", "on" if enabled else "[bold red]off[/]")
    table.add_row("epsilon spent", f"{spent:.4g}")
    table.add_row("epsilon budget", f"{budget:.4g}")
    table.add_row("epsilon remaining", f"{summary['epsilon_remaining']:.4g}")
    table.add_row("delta", f"{summary['delta']:g}")
    table.add_row("accountant", str(summary["accountant"]))
    table.add_row("releases", str(summary["releases"]))
    for kind, n in sorted(summary.get("by_kind", {}).items()):
        table.add_row(f"  {kind}", str(n))
    last = summary.get("last")
    if last:
        table.add_row("last release", f"{last['kind']} round {last['round']}, "
                      f"noise multiplier {last['noise_multiplier']:.4g}")
    console.print(table)
