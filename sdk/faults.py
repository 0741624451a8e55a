"""Fault injection for crash tests: `FEDSILO_FAULT=point@round[,point@round]` makes the
process SIGKILL itself the first time it reaches `point` in `round`;
`point@round:sleep=S` makes it pause S seconds there instead (a slow silo), and
`point@round:wait=PATH` pauses it until the file PATH exists (a silo held back until a
test says go, so the test waits for an event rather than for a duration), and
`point@round:poison` makes `poisons(point, round)` true there (the caller corrupts what it
holds: a silo whose model diverges).

Why: "kill the aggregator during aggregation" must hit a window of milliseconds; a signal
sent from outside cannot aim that well, a kill from inside can, and it is still a real
SIGKILL (no cleanup, no flush) of a real process. Unset in production, it costs one dict
lookup per point.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedsilo.sdk.logs import log_event

ENV = "FEDSILO_FAULT"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Action:
    sleep: float | None = None  # pause this long
    wait_for: Path | None = None  # pause until this file exists
    poison: bool = False  # the caller corrupts its values
    # none of them: SIGKILL


def _action(text: str) -> _Action:
    if not text:
        return _Action()
    if text.startswith("sleep="):
        return _Action(sleep=float(text.removeprefix("sleep=")))
    if text == "poison":
        return _Action(poison=True)
    if text.startswith("wait=") and len(text) > len("wait="):
        return _Action(wait_for=Path(text.removeprefix("wait=")))
    raise ValueError(text)


class FaultPlan:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        spec = (os.environ if env is None else env).get(ENV, "")
        self._points: dict[tuple[str, int], _Action] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            where, _, action = item.partition(":")
            point, _, round_ = where.partition("@")
            try:
                self._points[(point, int(round_))] = _action(action)
            except ValueError:
                raise ValueError(
                    f"{ENV}: {item!r} is not point@round[:sleep=S], point@round:wait=PATH "
                    "or point@round:poison"
                ) from None

    def reach(self, point: str, server_round: int) -> None:
        action = self._points.get((point, server_round))
        if action is None:
            return
        if action.poison:
            return
        if action.sleep is not None:
            time.sleep(action.sleep)
        elif action.wait_for is not None:
            log_event(log, "fault_waiting", point=point, round=server_round,
                      file=str(action.wait_for))
            while not action.wait_for.exists():
                time.sleep(0.1)
        else:
            os.kill(os.getpid(), signal.SIGKILL)

    def poisons(self, point: str, server_round: int) -> bool:
        action = self._points.get((point, server_round))
        return action is not None and action.poison
