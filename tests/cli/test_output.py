"""The service commands' output: `--log-json` (every line JSON, the closing one and errors
too), `--log-file`, and `--progress` (bars only on a terminal a process has to itself)."""

from __future__ import annotations

import json
import os
import pty
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from fedsilo.cli.main import app
from fedsilo.cli.output import owns_terminal, progress_wanted

runner = CliRunner()


class _DoneAggregator:
    """Stands in for AggregatorService: a federation that finished at once."""

    def __init__(self, cfg: object) -> None:
        self.state = SimpleNamespace(phase="done", round=3)

    def run(self) -> None:
        import logging

        from fedsilo.sdk.logs import log_event

        log_event(logging.getLogger("fedsilo.aggregator.service"), "round_closed", round=3)

    def request_stop(self, reason: str) -> None: ...


class _DoneAgent:
    def __init__(self, cfg: object, observer: object = None, progress: object = None) -> None:
        self.state = SimpleNamespace(finished=True)
        self.observer = observer

    def run(self) -> None: ...

    def request_stop(self, reason: str) -> None: ...


def _json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "no output at all"
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}\nin:\n{text}") from None
    return out


def _federation(tmp_path: Path) -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(f'name = "fed"\nsilos = ["a"]\nstate_dir = "{tmp_path / "st"}"\n')
    return path


def _silo(tmp_path: Path) -> Path:
    path = tmp_path / "silo.toml"
    path.write_text(f'silo_id = "a"\nstate_dir = "{tmp_path / "sa"}"\n')
    return path


def test_log_json_makes_every_aggregator_line_json_including_the_closing_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fedsilo.aggregator.service.AggregatorService", _DoneAggregator)
    result = runner.invoke(app, ["aggregator", "run", "--config", str(_federation(tmp_path)),
                                 "--log-json"])
    assert result.exit_code == 0, result.output
    lines = _json_lines(result.output)
    assert [x["event"] for x in lines] == ["round_closed", "aggregator_exit"]
    closing = lines[-1]
    assert closing["finished"] is True and closing["summary"].endswith("summary.json")
    assert "federation fed finished" in closing["msg"]


def test_log_json_makes_the_agents_closing_line_json(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fedsilo.silo_agent.service.AgentService", _DoneAgent)
    result = runner.invoke(app, ["agent", "start", "--config", str(_silo(tmp_path)),
                                 "--log-json"])
    assert result.exit_code == 0, result.output
    (closing,) = _json_lines(result.output)
    assert closing["event"] == "agent_exit" and closing["silo"] == "a"
    assert closing["adapter"].endswith("adapter.safetensors")


def test_log_json_errors_are_json_lines_with_the_exit_code(tmp_path: Path) -> None:
    bad = tmp_path / "federation.toml"
    bad.write_text('silos = ["a"]\n[strategy]\nkc = 2\n')
    result = runner.invoke(app, ["aggregator", "run", "--config", str(bad), "--log-json"])
    assert result.exit_code == 2
    (error,) = _json_lines(result.output)
    assert error["event"] == "error" and error["level"] == "error" and error["exit_code"] == 2
    assert "allowed keys in [strategy]" in error["msg"]


def test_log_file_takes_every_line_and_errors_are_repeated_on_stderr(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fedsilo.aggregator.service.AggregatorService", _DoneAggregator)
    log = tmp_path / "logs" / "aggregator.log"
    ok = runner.invoke(app, ["aggregator", "run", "--config", str(_federation(tmp_path)),
                             "--log-file", str(log)])
    assert ok.exit_code == 0 and ok.output == ""
    text = log.read_text()
    assert "round_closed round=3" in text and "federation fed finished" in text
    assert "\x1b[" not in text  # a file gets no colour codes
    bad = tmp_path / "bad.toml"
    bad.write_text('silos = ["a"]\nsilo = 1\n')
    failed = runner.invoke(app, ["aggregator", "run", "--config", str(bad), "--log-file",
                                 str(log), "--log-json"])
    assert failed.exit_code == 2
    assert 'unknown key "silo"' in failed.stderr  # never silent on the terminal
    assert json.loads(log.read_text().splitlines()[-1])["event"] == "error"


def test_an_unwritable_log_file_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = runner.invoke(app, ["aggregator", "run", "--config", str(_federation(tmp_path)),
                                 "--log-file", str(blocker / "x.log")])
    assert result.exit_code == 2 and "cannot write the log file" in result.output


def test_progress_modes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read, write = os.pipe()
    with os.fdopen(write, "w") as pipe:
        assert not owns_terminal(pipe)  # a pipe or a file: no bars
        assert not progress_wanted("auto", pipe, json_lines=False)
        assert progress_wanted("on", pipe, json_lines=True)
        assert not progress_wanted("off", pipe, json_lines=False)
    os.close(read)
    monkeypatch.setattr("fedsilo.cli.output.owns_terminal", lambda stream: True)
    assert progress_wanted("auto", sys.stderr, json_lines=False)
    assert not progress_wanted("auto", sys.stderr, json_lines=True)  # bars are not JSON
    seen = {}

    def agent(cfg: object, observer: object = None, progress: object = None) -> _DoneAgent:
        seen["observer"] = observer
        return _DoneAgent(cfg)

    monkeypatch.setattr("fedsilo.silo_agent.service.AgentService", agent)
    config = str(_silo(tmp_path))
    assert runner.invoke(app, ["agent", "start", "--config", config]).exit_code == 0
    assert seen["observer"] is not None
    assert runner.invoke(app, ["agent", "start", "--config", config,
                               "--progress", "off"]).exit_code == 0
    assert seen["observer"] is None
    bad = runner.invoke(app, ["agent", "start", "--config", config, "--progress", "maybe"])
    assert bad.exit_code == 2 and "use one of auto, on, off" in bad.output


def test_auto_draws_bars_only_in_the_foreground_job_of_a_terminal() -> None:
    """Processes started with `&` from one shell share its terminal: only the foreground
    job draws, so background agents do not garble each other's bars."""
    pid, fd = pty.fork()
    if pid == 0:  # child: session leader with the pty as controlling terminal
        try:
            stderr = open(2, "w", closefd=False)  # noqa: SIM115 (fd 2: pytest swaps sys.stderr)
            fg = owns_terminal(stderr)
            child = os.fork()
            if child == 0:  # a background job: its own process group
                os.setpgid(0, 0)
                os._exit(0 if not owns_terminal(stderr) else 1)
            _, status = os.waitpid(child, 0)
            os._exit(0 if fg and os.waitstatus_to_exitcode(status) == 0 else 1)
        except BaseException:
            os._exit(2)
    output = b""
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, output
