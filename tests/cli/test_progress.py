import io

from rich.console import Console

from fedsilo.cli.progress import TrainingProgress, TransferProgress
from fedsilo.sdk.transport.amqp import TransferProgress as Transfer


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=100, no_color=True), out


def test_training_progress_reports_each_round() -> None:
    console, out = _console()
    progress = TrainingProgress(console, "silo-a")
    progress.round_started(2, steps=3)
    for step in range(1, 4):
        progress.train_step(step, 3, 1.0 / step)
    progress.round_finished(2, {"metric": 0.75})
    assert "silo-a: round 2 done  metric 0.7500" in out.getvalue()
    assert progress.task is None


def test_transfer_progress_opens_and_closes_a_bar_per_message() -> None:
    console, _ = _console()
    progress = TransferProgress(console)
    for done in (10, 20, 30):
        progress(Transfer(direction="send", name="fedsilo.uploads", message_id="m1",
                          done_bytes=done, total_bytes=30, chunks_done=done // 10,
                          chunks_total=3))
        if done < 30:
            assert "m1" in progress.tasks
    assert progress.tasks == {}
