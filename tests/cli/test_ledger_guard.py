"""The privacy ledger cannot be bypassed, with real `fedsilo agent start` processes on the
real broker and DP on (issue 14): an agent killed after charging a release but before its
checkpoint keeps that spend when restarted; a second agent on the same state folder cannot
start; a ledger deleted, or replaced by an older or a foreign copy, makes the restarted agent
exit with a clear error (exit code 2) instead of restarting the spend."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from fedsilo.privacy.silo import LEDGER_FILE
from fedsilo.silo_agent.service import recorded_ledger


def _start_silo0(deployment, name: str, env: dict[str, str] | None = None) -> None:
    """`fedsilo agent start` for silo-0 logging to `<name>.log` (one log per start)."""
    deployment._spawn(name, ["agent", "start", "--config",
                             str(deployment.root / "silo-0.toml")], env)


def _refused(deployment, name: str) -> str:
    """Start silo-0 once more: it must exit 2 at once, saying why; returns why."""
    _start_silo0(deployment, name)
    code = deployment.wait(name, timeout=180)
    deployment.processes.pop(name)
    assert code == 2, deployment.log(name)
    (event,) = deployment.events(name, "privacy_ledger_refused")
    assert not deployment.events(name, "agent_started")
    (error,) = deployment.events(name, "error")  # --log-json: the closing error is JSON too
    assert error["msg"].startswith("agent silo-0: ") and error["exit_code"] == 2, error
    return event["detail"]


def _releases(path: Path) -> list[dict]:
    return json.loads(path.read_text())["releases"]


def test_a_deleted_or_replaced_ledger_stops_the_agent_and_crash_spend_stays(
    deployment, tmp_path
) -> None:
    go = tmp_path / "silo-0.go"
    deployment.dp = {"enabled": True, "epsilon": 8.0}
    deployment.rounds = {"deadline_s": 900.0}
    deployment.write()
    state = deployment.silo_dir("silo-0")
    ledger = state / LEDGER_FILE
    deployment.start_aggregator()
    # Killed right after round 1's upload: its release was charged, its checkpoint not written.
    deployment.start_agent("silo-0", env={"FEDSILO_FAULT": "uploaded@1"})
    deployment.start_agent("silo-1")
    deployment.start_agent("silo-2")
    assert deployment.wait("silo-0", timeout=400) == -signal.SIGKILL
    deployment.processes.pop("silo-0")
    crashed = _releases(ledger)
    recorded = recorded_ledger(state)
    assert recorded is not None and recorded.round == 0
    assert 1 in {r["round"] for r in crashed}, crashed  # round 1 charged before it left
    assert recorded.releases < len(crashed)

    # Round 1 closes with the upload silo-0 sent before it died; once round 2's plans are
    # out, the restarted agent skips round 1 for them (re-running round 1 would be a new
    # release, over this budget of two rounds: exit 3, which is not what this test is about).
    deployment.wait_for_event("aggregator", "round_opened", round=2, timeout=400)
    # Restarted: the spend charged before the crash stays (the ledger is ahead of the
    # checkpoint, which is legitimate). Held at its final plan, a twin on its folder is refused.
    _start_silo0(deployment, "silo-0-restarted", {"FEDSILO_FAULT": f"plan_received@2:wait={go}"})
    ahead = deployment.wait_for_event("silo-0-restarted", "privacy_ledger_ahead", timeout=240)
    assert (ahead["releases"], ahead["recorded"]) == (len(crashed), recorded.releases)
    deployment.wait_for_event("silo-0-restarted", "fault_waiting", round=2, timeout=400)
    _start_silo0(deployment, "silo-0-twin")
    assert deployment.wait("silo-0-twin", timeout=180) == 2
    deployment.processes.pop("silo-0-twin")
    assert "is in use by another running agent of silo-0" in " ".join(
        deployment.log("silo-0-twin").split())
    assert not deployment.events("silo-0-twin", "agent_started")
    go.touch()
    deployment.wait_all(timeout=400)
    final = _releases(ledger)
    assert final[: len(crashed)] == crashed  # nothing charged before the crash was lost
    done = recorded_ledger(state)
    assert done is not None and done.releases == len(final) and done.round == 2

    # Deleted between runs: refused, not restarted at zero.
    kept = tmp_path / "ledger-backup.json"
    shutil.move(ledger, kept)
    detail = _refused(deployment, "silo-0-deleted")
    assert "privacy-ledger.json is missing from" in detail, detail
    assert f"agent.ckpt recorded {len(final)} release(s) at round 2" in detail
    assert "restore the ledger from backup" in detail
    assert "refuses to restart the spend at zero" in detail
    assert not ledger.exists()  # and it wrote no fresh one
    look = subprocess.run(
        [sys.executable, "-m", "fedsilo.cli.main", "agent", "privacy", "--config",
         str(deployment.root / "silo-0.toml"), "--json"],
        capture_output=True, text=True, timeout=180)
    assert look.returncode == 2, look.stdout + look.stderr
    assert "refuses to restart the spend at zero" in " ".join(look.stdout.split())

    # Replaced by an older copy (a backup from before the last release): fewer releases.
    older = final[:-1]
    ledger.write_text(json.dumps({**json.loads(kept.read_text()), "releases": older}))
    detail = _refused(deployment, "silo-0-older")
    assert f"holds {len(older)} release(s)" in detail, detail
    assert "replaced by an older or foreign copy" in detail

    # Replaced by another silo's ledger (or an edited one): not the releases recorded.
    foreign = json.loads(kept.read_text())
    foreign["releases"] = [*_releases(deployment.silo_dir("silo-1") / LEDGER_FILE),
                           *foreign["releases"]][: len(final)]
    ledger.write_text(json.dumps(foreign))
    detail = _refused(deployment, "silo-0-foreign")
    assert "does not begin with the releases agent.ckpt recorded" in detail, detail
    assert "replaced or edited" in detail

    # The right ledger back: the agent starts again (and, finished, says so).
    shutil.copy(kept, ledger)
    _start_silo0(deployment, "silo-0-restored")
    assert deployment.wait("silo-0-restored", timeout=240) == 0, deployment.log("silo-0-restored")
    deployment.processes.pop("silo-0-restored")
    assert deployment.events("silo-0-restored", "agent_already_finished")
