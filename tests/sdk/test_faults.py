"""FEDSILO_FAULT: the crash tests' way to kill, slow down or hold back a real process."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fedsilo.sdk.faults import ENV, FaultPlan


def test_points_not_named_or_of_another_round_do_nothing() -> None:
    plan = FaultPlan({ENV: "uploaded@1:sleep=0"})
    plan.reach("uploaded", 0)
    plan.reach("plan_received", 1)
    plan.reach("uploaded", 1)


@pytest.mark.parametrize("spec", ["uploaded", "uploaded@x", "uploaded@1:nap=2",
                                  "uploaded@1:wait=", "uploaded@1:sleep=soon"])
def test_a_malformed_spec_says_what_is_accepted(spec: str) -> None:
    with pytest.raises(ValueError, match="point@round:wait=PATH or point@round:poison"):
        FaultPlan({ENV: spec})


def test_wait_holds_the_process_until_the_file_exists(tmp_path: Path) -> None:
    go = tmp_path / "go"
    plan = FaultPlan({ENV: f"plan_received@0:wait={go}"})
    released = threading.Event()

    def reach() -> None:
        plan.reach("plan_received", 0)
        released.set()

    threading.Thread(target=reach, daemon=True).start()
    assert not released.wait(0.5)  # held while the file is missing
    go.touch()
    assert released.wait(60)


def test_a_bare_point_is_a_real_sigkill() -> None:
    code = ("from fedsilo.sdk.faults import FaultPlan, ENV\n"
            "FaultPlan({ENV: 'uploaded@2'}).reach('uploaded', 2)\n"
            "print('survived')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == -signal.SIGKILL and "survived" not in done.stdout


def test_sleep_pauses_at_least_that_long() -> None:
    start = time.monotonic()
    FaultPlan({ENV: "uploaded@0:sleep=0.2"}).reach("uploaded", 0)
    assert time.monotonic() - start >= 0.2


def test_poison_only_marks_its_point() -> None:
    plan = FaultPlan({ENV: "plan_received@1:poison"})
    plan.reach("plan_received", 1)  # neither kills nor pauses
    assert plan.poisons("plan_received", 1)
    assert not plan.poisons("plan_received", 0) and not plan.poisons("uploaded", 1)
