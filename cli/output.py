"""Where a service command's output goes and in which form (`aggregator run`, `agent start`).

One object decides for the whole process, so that every line obeys the same choice:
`--log-json` makes every line a JSON object (log events, the closing line and errors alike),
`--log-file` sends them all to a file (errors are repeated on stderr, so a failed start is
never silent), and `--progress` says whether bars are drawn: by default only when the
output is a terminal this process has to itself (the terminal's foreground job), so several
processes started with `&` from one shell do not draw over each other.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape

from fedsilo.sdk.logs import log_event, setup_logging

ProgressMode = Literal["auto", "on", "off"]
PROGRESS_MODES: tuple[str, ...] = ("auto", "on", "off")
log = logging.getLogger("fedsilo.cli")


def owns_terminal(stream: IO[str] | None) -> bool:
    """Whether `stream` is a terminal whose foreground job is this process: not a pipe or a
    file, and not a background job (`cmd &`) sharing the terminal with others."""
    try:
        fd = stream.fileno() if stream is not None else -1
        return fd >= 0 and os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp()
    except (AttributeError, OSError, ValueError):  # no file descriptor, or no terminal
        return False


def progress_wanted(mode: str, stream: IO[str] | None, json_lines: bool) -> bool:
    """`on`: always; `off`: never; `auto`: only on a terminal of our own and without
    `--log-json` (bars are not JSON)."""
    if mode not in PROGRESS_MODES:
        raise ValueError(f"--progress {mode!r}: use one of {', '.join(PROGRESS_MODES)}")
    if mode != "auto":
        return mode == "on"
    return not json_lines and owns_terminal(stream)


@dataclass
class ServiceOutput:
    """The console (stderr or the log file), the log lines' form, and whether bars show."""

    console: Console
    json_lines: bool
    progress: bool
    name: str = "fedsilo"
    _file: IO[str] | None = field(default=None, repr=False)
    _handler: logging.Handler | None = field(default=None, repr=False)

    @classmethod
    def open(cls, name: str, json_lines: bool, log_file: Path | None, progress: str,
             verbose: bool) -> ServiceOutput:
        """Set up logging to the chosen stream; an unusable `--log-file` or `--progress` is
        one clear line and exit code 2."""
        if progress not in PROGRESS_MODES:
            _stderr_fail(f"--progress {progress!r} is not a mode; use one of "
                         + ", ".join(PROGRESS_MODES))
        file: IO[str] | None = None
        if log_file is not None:
            try:
                log_file.parent.mkdir(parents=True, exist_ok=True)
                file = log_file.open("a", encoding="utf-8", buffering=1)
            except OSError as exc:
                _stderr_fail(f"cannot write the log file {log_file}: {exc.strerror or exc}; "
                             "pass a writable path")
        stream = file if file is not None else sys.stderr
        console = Console(file=stream, soft_wrap=True) if file is not None else Console(
            stderr=True, soft_wrap=True)
        setup_logging(logging.DEBUG if verbose else logging.INFO, json_lines=json_lines,
                      stream=stream)
        if json_lines:
            logging.captureWarnings(True)  # a library's warning is a line too: make it JSON
        handler = logging.getLogger().handlers[-1]
        out = cls(console, json_lines, progress_wanted(progress, stream, json_lines), name,
                  file, handler)
        ctx = _click_context()
        if ctx is not None:
            ctx.call_on_close(out.close)
        return out

    def say(self, event: str, text: str, style: str = "", **fields: Any) -> None:
        """One line for the reader: a JSON event under `--log-json`, else `text`."""
        if self.json_lines:
            log_event(log, event, msg=text, **fields)
        else:
            shown = f"[{style}]{escape(text)}[/]" if style else escape(text)
            self.console.print(shown, highlight=False)

    def fail(self, message: str, code: int = 2, label: str = "error") -> typer.Exit:
        """Report `message` (an `error` event under `--log-json`) and the exit to raise.
        With `--log-file` it is repeated on stderr."""
        if self.json_lines:
            log_event(log, label, logging.ERROR, msg=message, exit_code=code)
        else:
            self.console.print(f"[bold red]{label}:[/] {escape(message)}", highlight=False)
        if self._file is not None:
            print(f"{self.name}: {label}: {message}", file=sys.stderr)
        return typer.Exit(code=code)

    def close(self) -> None:
        """Detach our handler from logging and close the log file (idempotent): nothing
        is left pointing at a stream that is gone once the command returns."""
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler = None
            if self.json_lines:
                logging.captureWarnings(False)
        if self._file is not None:
            self._file.close()
            self._file = None


def _stderr_fail(message: str) -> None:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}",
                                               highlight=False)
    raise typer.Exit(code=2)


def _click_context() -> Any:
    import click

    return click.get_current_context(silent=True)
