"""Fault injection for crash tests: `FEDSILO_FAULT=point@round[,point@round]` makes the
process SIGKILL itself the first time it reaches `point` in `round`.

Why: "kill the aggregator during aggregation" must hit a window of milliseconds; a signal
sent from outside cannot aim that well, a kill from inside can, and it is still a real
SIGKILL (no cleanup, no flush) of a real process. Unset in production, it costs one dict
lookup per point.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping

ENV = "FEDSILO_FAULT"


class FaultPlan:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        spec = (os.environ if env is None else env).get(ENV, "")
        self._points: set[tuple[str, int]] = set()
        for item in filter(None, (s.strip() for s in spec.split(","))):
            point, _, round_ = item.partition("@")
            try:
                self._points.add((point, int(round_)))
            except ValueError:
                raise ValueError(f"{ENV}: {item!r} is not point@round") from None

    def reach(self, point: str, round: int) -> None:
        if (point, round) in self._points:
            os.kill(os.getpid(), signal.SIGKILL)
