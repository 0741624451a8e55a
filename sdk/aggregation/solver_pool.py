"""Many modules' assignment programs at once, in worker processes.

Why processes: OR-Tools' binding holds the GIL while it solves, so threads solve the
modules one after another (measured: 2 threads 1.02 s, 1 thread 1.03 s for 16 modules of
1000 silos x 256 experts). The modules of a round are independent programs; each worker
imports `aggregation.assignment` (numpy and the solvers, no torch) and solves whole
programs, so the result is the one the aggregator's own process would compute, bit for
bit. Small programs are solved in-process: sending them costs more than it saves.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from fedsilo.sdk.aggregation.assignment import AssignmentConstraints, Solver, solve_assignment
from fedsilo.sdk.logs import log_event

__all__ = ["POOL_MIN_CELLS", "SolverPool", "available_cpus"]

log = logging.getLogger(__name__)

#: Silos x experts of one module from which solving in workers pays (about 10 ms a solve;
#: measured in benchmarks/scaling.py: 100 x 120 solves in 2 ms, 1000 x 256 in 60 ms).
POOL_MIN_CELLS = 50_000


def available_cpus() -> int:
    """The CPUs this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class SolverPool:
    """Solves a round's programs, in up to `processes` workers when they are large.

    `processes`: 0 = one per available CPU, 1 = always in this process, n = at most n;
    programs of fewer than `min_cells` silos x experts are solved in this process.
    The workers start at the first large round and stay for the next; `close` ends them
    (they also end with this process, even when it is killed: each watches its parent).
    A worker that dies is reported and its round solved here instead: never a lost round.
    """

    def __init__(self, processes: int = 0, min_cells: int = POOL_MIN_CELLS) -> None:
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 0:
            raise ValueError(
                f"solver_processes = {processes!r}: use 0 (one per CPU), 1 (in the "
                "aggregator's process) or the most worker processes"
            )
        self.processes = available_cpus() if processes == 0 else processes
        self.min_cells = min_cells
        self._executor: ProcessPoolExecutor | None = None

    @property
    def running(self) -> bool:
        """Whether worker processes are up (they start at the first large round)."""
        return self._executor is not None

    def workers_for(self, programs: Mapping[str, np.ndarray]) -> int:
        """How many workers `solve` would use for `programs` (1: in this process)."""
        if not programs:
            return 1
        cells = max(p.shape[0] * p.shape[1] for p in programs.values())
        if cells < self.min_cells:
            return 1
        return max(1, min(self.processes, len(programs)))

    def solve(
        self, programs: Mapping[str, np.ndarray], c: AssignmentConstraints, solver: Solver
    ) -> dict[str, np.ndarray]:
        """`solve_assignment` for every program, in the order given; equal to solving them
        one after another here."""
        names = list(programs)
        if self.workers_for(programs) == 1:
            return {m: solve_assignment(programs[m], c, solver) for m in names}
        c.check(programs[names[0]].shape[0])  # infeasible sizes fail here, before any send
        try:
            executor = self._start()
            solved = list(executor.map(solve_assignment, [programs[m] for m in names],
                                       [c] * len(names), [solver] * len(names)))
        except BrokenProcessPool as exc:
            log_event(log, "solver_pool_broken", logging.ERROR, reason=str(exc),
                      action="solving this round in the aggregator's process")
            self.close()
            return {m: solve_assignment(programs[m], c, solver) for m in names}
        return dict(zip(names, solved, strict=True))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _start(self) -> ProcessPoolExecutor:
        if self._executor is None:
            # spawn: a fork of a process with threads (pika, torch's pool) may deadlock.
            self._executor = ProcessPoolExecutor(
                self.processes, mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
            )
        return self._executor


def _worker_init() -> None:
    """Ctrl-C goes to the aggregator, which shuts the pool down; a worker whose aggregator
    died (SIGKILL) exits instead of waiting forever for work."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        sentinel = parent.sentinel

        def watch() -> None:
            multiprocessing.connection.wait([sentinel])
            os._exit(0)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
