"""Rich progress for the service commands: local training steps and chunked transfers.

Shown only when `--progress` allows it (by default: stderr is a terminal this process has
to itself, without `--log-json`; see cli/output.py); otherwise the structured log lines
carry the same events and nothing redraws.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

if TYPE_CHECKING:
    from fedsilo.sdk.transport.amqp import TransferProgress as Transfer


class TrainingProgress:
    """An `AgentObserver`: one bar per round of local training."""

    def __init__(self, console: Console, silo_id: str) -> None:
        self.console = console
        self.silo_id = silo_id
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[loss]}"),
            TimeElapsedColumn(), console=console, transient=True,
        )
        self.task: TaskID | None = None
        self.label = silo_id

    def round_started(self, server_round: int, steps: int) -> None:
        self.progress.start()
        self.label = f"{self.silo_id} round {server_round}"
        self.task = self.progress.add_task(self.label, total=max(steps, 1), loss="")

    def train_step(self, step: int, total: int, loss: float) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=step, loss=f"loss {loss:.3f}")

    def eval_step(self, done: int, total: int) -> None:
        """Scoring the test split after training: the round's bar becomes a testing bar."""
        if self.task is not None:
            self.progress.update(self.task, description=f"{self.label} testing",
                                 total=max(total, 1), completed=done, loss="")

    def round_finished(self, server_round: int, metrics: dict[str, float]) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        self.progress.stop()
        shown = "  ".join(f"{k} {v:.0f}" if k.endswith("_n") else f"{k} {v:.4f}"
                          for k, v in metrics.items())
        self.console.print(f"{self.silo_id}: round {server_round} done  {shown}".rstrip(),
                           highlight=False)


class TransferProgress:
    """A transport `progress` callback: a bar per chunked message while it moves."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), console=console, transient=True,
        )
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, event: Transfer) -> None:
        mid, done, total = event.message_id, event.done_bytes, event.total_bytes
        if mid not in self.tasks:
            if not self.tasks:
                self.progress.start()
            self.tasks[mid] = self.progress.add_task(f"{event.direction} {mid[:8]}", total=total)
        self.progress.update(self.tasks[mid], completed=done)
        if done >= total:
            self.progress.remove_task(self.tasks.pop(mid))
            if not self.tasks:
                self.progress.stop()
