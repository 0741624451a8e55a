"""Fault injection for crash tests: `FEDSILO_FAULT=point@round[,point@round]` makes the
process SIGKILL itself the first time it reaches `point` in `round`;
`point@round:sleep=S` makes it pause S seconds there instead (a slow silo).

Why: "kill the aggregator during aggregation" must hit a window of milliseconds; a signal
sent from outside cannot aim that well, a kill from inside can, and it is still a real
SIGKILL (no cleanup, no flush) of a real process. Unset in production, it costs one dict
lookup per point.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping

ENV = "FEDSILO_FAULT"


class FaultPlan:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        spec = (os.environ if env is None else env).get(ENV, "")
        self._points: dict[tuple[str, int], float | None] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            where, _, action = item.partition(":")
            point, _, round_ = where.partition("@")
            try:
                pause = float(action.removeprefix("sleep=")) if action else None
                self._points[(point, int(round_))] = pause
            except ValueError:
                raise ValueError(f"{ENV}: {item!r} is not point@round[:sleep=S]") from None

    def reach(self, point: str, round: int) -> None:
        if (point, round) not in self._points:
            return
        pause = self._points[(point, round)]
        if pause is None:
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            time.sleep(pause)
