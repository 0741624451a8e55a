"""The privacy ledger has one writer, the holder of the state folder's lock; a read-only look
(`fedsilo agent privacy`) never blocks it; a restart checks the ledger against what the
agent's checkpoint recorded (issue 14). The real-process side: tests/cli/test_ledger_guard.py."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedsilo.cli.main import app
from fedsilo.privacy.dp import DPConfig
from fedsilo.privacy.ledger import LedgerError, PrivacyLedger
from fedsilo.privacy.silo import LEDGER_FILE, SiloPrivacy
from fedsilo.sdk.checkpoint import save_checkpoint
from fedsilo.sdk.files import FolderInUse, FolderLock, holds_folder_lock
from fedsilo.silo_agent.service import CHECKPOINT, recorded_ledger

CONFIG = DPConfig(epsilon=8.0, delta=1e-5)


def _per_example(n: int = 20) -> dict[str, torch.Tensor]:
    return {"m.client": torch.randn(n, 4, generator=torch.Generator().manual_seed(0))}


def _release(privacy: SiloPrivacy, server_round: int) -> None:
    privacy.begin_round(server_round, total_rounds=4, local_steps=0, batch_size=1, num_train=20)
    privacy.release_embeddings(_per_example())


def _checkpoint(state: Path, privacy: SiloPrivacy, server_round: int) -> None:
    """What the agent's `_checkpoint` writes about the ledger (its tensors left out)."""
    save_checkpoint(state / CHECKPOINT, {}, {
        "silo_id": "silo-0", "last_round": server_round,
        "privacy": privacy.ledger.record(server_round).to_json()})


def test_two_writers_on_one_state_folder_cannot_both_charge(tmp_path: Path) -> None:
    """The reviewer's case: two processes each spending from their own copy of the ledger.
    The second writer cannot even open it."""
    first = SiloPrivacy.open(CONFIG, tmp_path, "silo-0")
    _release(first, 0)
    with pytest.raises(FolderInUse, match=rf"in use by another running privacy-ledger writer "
                       rf"of silo-0 \(pid {os.getpid()}\)"):
        SiloPrivacy.open(CONFIG, tmp_path, "silo-0")
    # An agent (which takes the same lock) cannot start beside it either.
    with pytest.raises(FolderInUse):
        FolderLock(tmp_path, "agent of silo-0").acquire()
    first.close()
    second = SiloPrivacy.open(CONFIG, tmp_path, "silo-0")
    assert second.ledger.releases == first.ledger.releases  # it continues the spend
    second.close()


def test_the_agents_lock_makes_it_the_writer_and_losing_it_stops_the_charges(
    tmp_path: Path,
) -> None:
    lock = FolderLock(tmp_path, "agent of silo-0")
    lock.acquire()
    try:
        privacy = SiloPrivacy.open(CONFIG, tmp_path, "silo-0", lock=lock)
        _release(privacy, 0)
        assert len(privacy.ledger.releases) == 1 and holds_folder_lock(tmp_path)
    finally:
        lock.release()
    assert not holds_folder_lock(tmp_path)
    before = (tmp_path / LEDGER_FILE).read_bytes()
    with pytest.raises(LedgerError, match=r"no longer holds the lock.*Nothing was recorded or "
                       r"released"):
        _release(privacy, 1)
    assert (tmp_path / LEDGER_FILE).read_bytes() == before
    with pytest.raises(LedgerError, match="does not hold the lock"):  # a lock not held
        SiloPrivacy.open(CONFIG, tmp_path, "silo-0", lock=lock)


_HOLDER = """
import sys, time
from pathlib import Path
from fedsilo.sdk.files import FolderLock
FolderLock(Path(sys.argv[1]), "agent of silo-0").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_lock_file_deleted_and_taken_by_another_process_stops_the_charges(
    tmp_path: Path,
) -> None:
    """flock locks the inode: delete `.lock` and another process can lock a new one. The
    writer notices at its next charge rather than writing beside the other."""
    lock = FolderLock(tmp_path, "agent of silo-0")
    lock.acquire()
    proc = None
    try:
        privacy = SiloPrivacy.open(CONFIG, tmp_path, "silo-0", lock=lock)
        _release(privacy, 0)
        (tmp_path / FolderLock.NAME).unlink()
        with pytest.raises(LedgerError, match="no longer holds the lock"):
            _release(privacy, 1)  # no lock file at all
        proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        with pytest.raises(LedgerError, match="taken by another process"):
            _release(privacy, 1)
        assert len(PrivacyLedger.load(tmp_path / LEDGER_FILE, epsilon=8.0, delta=1e-5)
                   .releases) == 1
    finally:
        lock.release()
        if proc is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def test_a_read_only_look_takes_no_lock_and_cannot_charge(tmp_path: Path) -> None:
    writer = SiloPrivacy.open(CONFIG, tmp_path, "silo-0")
    _release(writer, 0)
    look = SiloPrivacy.open(CONFIG, tmp_path, "silo-0", read_only=True)  # beside the writer
    assert look.ledger.releases == writer.ledger.releases
    with pytest.raises(LedgerError, match="opened read-only"):
        _release(look, 1)
    _release(writer, 1)  # the writer was not blocked
    assert len(writer.ledger.releases) == 2
    writer.close()


def test_killed_after_the_charge_before_the_checkpoint_a_restart_keeps_the_spend(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = SiloPrivacy.open(CONFIG, tmp_path, "silo-0")
    _release(first, 0)
    _checkpoint(tmp_path, first, 0)
    _release(first, 1)  # charged and saved; the process dies before its checkpoint
    spent = first.ledger.spent()
    first.close()
    recorded = recorded_ledger(tmp_path)
    assert recorded is not None and recorded.releases == 1
    with caplog.at_level(logging.WARNING):
        again = SiloPrivacy.open(CONFIG, tmp_path, "silo-0", recorded=recorded)
    assert again.ledger.releases == first.ledger.releases and again.ledger.spent() == spent
    assert "privacy_ledger_ahead" in caplog.text
    again.close()


def test_a_restart_refuses_a_ledger_deleted_or_replaced_behind_the_checkpoint(
    tmp_path: Path,
) -> None:
    writer = SiloPrivacy.open(CONFIG, tmp_path, "silo-0")
    _release(writer, 0)
    backup = (tmp_path / LEDGER_FILE).read_bytes()
    _release(writer, 1)
    _checkpoint(tmp_path, writer, 1)
    writer.close()
    current = (tmp_path / LEDGER_FILE).read_bytes()
    (tmp_path / LEDGER_FILE).unlink()
    with pytest.raises(LedgerError, match=r"is missing from .* but agent\.ckpt recorded 2 release"):
        SiloPrivacy.open(CONFIG, tmp_path, "silo-0", recorded=recorded_ledger(tmp_path))
    (tmp_path / LEDGER_FILE).write_bytes(backup)
    with pytest.raises(LedgerError, match=r"holds 1 release\(s\)"):
        SiloPrivacy.open(CONFIG, tmp_path, "silo-0", recorded=recorded_ledger(tmp_path))
    # A refused open leaves the folder free (its own lock released): the next start may try.
    with FolderLock(tmp_path, "agent of silo-0"):
        pass
    (tmp_path / LEDGER_FILE).write_bytes(current)
    again = SiloPrivacy.open(CONFIG, tmp_path, "silo-0", recorded=recorded_ledger(tmp_path))
    assert len(again.ledger.releases) == 2
    again.close()


def test_agent_privacy_refuses_a_deleted_or_replaced_ledger_and_never_blocks_the_agent(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    config = tmp_path / "silo.toml"
    config.write_text(f'silo_id = "silo-0"\nstate_dir = "{state}"\n[dp]\nepsilon = 8.0\n')

    def privacy_command() -> tuple[int, str]:
        result = CliRunner().invoke(app, ["agent", "privacy", "--config", str(config),
                                          "--json"])
        return result.exit_code, " ".join(result.output.split())

    writer = SiloPrivacy.open(CONFIG, state, "silo-0")  # the agent, running
    _release(writer, 0)
    older = (state / LEDGER_FILE).read_bytes()
    _release(writer, 1)
    _checkpoint(state, writer, 1)
    code, output = privacy_command()  # beside the running writer: no lock, no wait
    assert code == 0 and '"releases": 2' in output, output
    _release(writer, 2)  # and the writer goes on charging
    writer.close()

    ledger = state / LEDGER_FILE
    current = ledger.read_bytes()
    ledger.unlink()
    code, output = privacy_command()
    assert code == 2, output
    assert "privacy-ledger.json is missing from" in output, output
    assert "but agent.ckpt recorded 2 release(s) at round 1" in output
    assert "refuses to restart the spend at zero" in output
    ledger.write_bytes(older)
    code, output = privacy_command()
    assert code == 2 and "holds 1 release(s)" in output, output
    ledger.write_bytes(current)  # restored from the right backup: fine again
    code, output = privacy_command()
    assert code == 0 and '"releases": 3' in output, output
