"""The solver pool: the same assignments as in-process, small rounds stay in-process, a
dead worker costs no round, and workers never outlive a killed aggregator."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from fedsilo.sdk.aggregation.assignment import (
    AssignmentConstraints,
    InfeasibleAssignmentError,
    solve_assignment,
)
from fedsilo.sdk.aggregation.solver_pool import SolverPool

C = AssignmentConstraints(num_experts=30, k_e=2, k_c=4, b=8)


def programs(count: int, silos: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"layers.{i}.q_proj": 1 / silos + rng.random((silos, 30)) * 1e-7
            for i in range(count)}


@pytest.fixture
def pool() -> SolverPool:
    solvers = SolverPool(processes=2, min_cells=1)
    yield solvers
    solvers.close()


def test_workers_give_the_assignments_of_the_aggregators_own_process(pool: SolverPool) -> None:
    rounds = [programs(6, seed=s) for s in range(2)]
    for program in rounds:
        assert pool.workers_for(program) == 2
        solved = pool.solve(program, C, "flow")
        assert list(solved) == list(program)  # the modules' order is kept
        for m, p in program.items():
            np.testing.assert_array_equal(solved[m], solve_assignment(p, C, "flow"))
    assert pool.running


def test_small_rounds_and_one_process_never_start_workers() -> None:
    small = SolverPool(processes=2)  # the default threshold: 40 x 30 is far below it
    one = SolverPool(processes=1, min_cells=1)
    for solvers in (small, one):
        program = programs(3)
        assert solvers.workers_for(program) == 1
        solved = solvers.solve(program, C, "flow")
        assert all((solved[m] == solve_assignment(p, C, "flow")).all()
                   for m, p in program.items())
        assert not solvers.running


def test_infeasible_sizes_fail_before_anything_is_sent(pool: SolverPool) -> None:
    too_few_experts = AssignmentConstraints(num_experts=30, k_e=8, k_c=2, b=8)
    with pytest.raises(InfeasibleAssignmentError, match="C\\*k_e <= E\\*k_c fails"):
        pool.solve(programs(2), too_few_experts, "flow")
    assert not pool.running
    with pytest.raises(ValueError, match="NaN"):  # raised in a worker, reported here
        pool.solve({"a": np.full((40, 30), np.nan), "b": programs(1)["layers.0.q_proj"]},
                   C, "flow")


def test_a_killed_worker_costs_no_round(
    pool: SolverPool, caplog: pytest.LogCaptureFixture
) -> None:
    program = programs(4)
    pool.solve(program, C, "flow")
    workers = [w for w in multiprocessing.active_children() if w.is_alive()]
    assert workers
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.kill(worker.pid, signal.SIGKILL)
        worker.join()
    with caplog.at_level(logging.ERROR):
        solved = pool.solve(program, C, "flow")
    for m, p in program.items():
        np.testing.assert_array_equal(solved[m], solve_assignment(p, C, "flow"))
    assert "solver_pool_broken" in caplog.text
    assert not pool.running  # the next large round starts fresh workers
    pool.solve(program, C, "flow")
    assert pool.running


def test_workers_exit_when_the_aggregator_is_killed(tmp_path) -> None:
    script = textwrap.dedent("""
        import multiprocessing, sys, time
        import numpy as np
        from fedsilo.sdk.aggregation.assignment import AssignmentConstraints
        from fedsilo.sdk.aggregation.solver_pool import SolverPool

        if __name__ == "__main__":
            pool = SolverPool(processes=2, min_cells=1)
            rng = np.random.default_rng(0)
            c = AssignmentConstraints(num_experts=30, k_e=2, k_c=4, b=8)
            pool.solve({str(i): rng.random((40, 30)) for i in range(4)}, c, "flow")
            print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
            time.sleep(3600)
    """)
    path = tmp_path / "aggregator.py"
    path.write_text(script)
    proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 120  # generous: the workers notice the parent's end
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, f"solver workers {pids} outlived the aggregator"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
