"""`fedsilo report RUN_OR_STATE_DIR`: PNG plots and one self-contained HTML page of what a
federation produced, from a `fedsilo simulate` run folder or an aggregator's state_dir
(both write the same metrics.jsonl and assignments files; `aggregator/history.py` reads
them, `cli/plots.py` draws them)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fedsilo.aggregator.history import RunFolderError, RunHistory, load_history

REPORT_PAGE = "report.html"


def write_report(history: RunHistory, out: Path) -> list[Path]:
    """Write one PNG per figure and the page into `out`; returns the files written."""
    from fedsilo.cli.plots import render_page, sections

    out.mkdir(parents=True, exist_ok=True)
    written, images = [], []
    for section in sections(history):
        buffer = io.BytesIO()
        section.figure.savefig(buffer, format="png", dpi=100)
        png = buffer.getvalue()
        path = out / f"{section.name}.png"
        path.write_bytes(png)
        written.append(path)
        images.append((section, png))
    page = out / REPORT_PAGE
    page.write_text(render_page(history, images), encoding="utf-8")
    return [*written, page]


def report_command(
    run: Annotated[Path, typer.Argument(
        metavar="RUN_OR_STATE_DIR",
        help="A `fedsilo simulate` run folder, or an aggregator's state_dir.")],
    out: Annotated[Path | None, typer.Option(
        metavar="DIR", help="Folder for the PNGs and report.html (default: RUN/report).")] = None,
    silo_dir: Annotated[list[Path] | None, typer.Option(
        "--silo-dir", metavar="DIR", help="A silo's state_dir whose privacy ledger to plot "
        "(repeatable): a deployment's ledgers stay with the silos.")] = None,
) -> None:
    """Plot a run: each silo's score per round and MTAL, each silo's experts per module,
    bytes up and down, round times, privacy spent; PNGs and one HTML page."""
    console = Console()

    def fail(message: str) -> typer.Exit:
        console.print("[bold red]error:[/] " + escape(message), highlight=False, soft_wrap=True)
        return typer.Exit(code=2)

    try:
        history = load_history(run, silo_dir or ())
    except RunFolderError as exc:
        raise fail(str(exc)) from None
    if not history.rounds:
        raise fail(f"{run} has no finished round yet, so nothing to plot; run `fedsilo "
                   "report` again once round 0 has closed")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise fail("fedsilo report draws with matplotlib, which is not installed: "
                   "pip install 'fedsilo[report]'") from None
    target = out if out is not None else Path(run) / "report"
    if target.exists() and not target.is_dir():
        raise fail(f"--out {target} is a file; give a folder")
    try:
        files = write_report(history, target)
    except OSError as exc:
        raise fail(f"cannot write the report into {target}: {exc.strerror or exc}") from None
    mtal = history.mtal()
    console.print(
        f"[bold]{escape(history.name)}[/] ({history.kind}, {escape(history.strategy)}): "
        f"MTAL {'-' if mtal is None else f'{mtal:.4f}'} {history.metric}; "
        f"{len(files) - 1} plots", highlight=False)
    console.print(f"report: {escape(str(files[-1]))}", highlight=False, soft_wrap=True)
