"""`fedsilo status`: render the status file the aggregator rewrites at every event."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedsilo.aggregator.history import RunFolderError, load_history

STATUS = "status.json"


def read_status(state_dir: Path) -> dict[str, Any]:
    path = Path(state_dir) / STATUS
    if not path.exists():
        raise FileNotFoundError(
            f"no {STATUS} in {state_dir}: the aggregator has not run with this state_dir "
            "yet (start it with `fedsilo aggregator run --config federation.toml`)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    data["alive"] = _alive(data.get("pid"))
    data["age_s"] = time.time() - float(data.get("updated_at", 0))
    data["results"] = run_results(Path(state_dir))
    return data


def run_results(state_dir: Path) -> dict[str, Any] | None:
    """Each silo's latest score, their mean (MTAL once the run is over) and each silo's
    bytes summed over every round so far, from the aggregator's metrics.jsonl. None when
    no round closed yet or the file is unreadable: the rest of the status still shows."""
    try:
        history = load_history(state_dir)
    except RunFolderError:
        return None
    if not history.rounds:
        return None
    totals = history.bytes_by_silo()
    return {
        "metric": history.metric,
        "rounds_closed": len(history.rounds),
        "latest": history.latest(),
        "mtal": history.mtal(),
        "bytes_up_total": {s: up for s, (up, _) in totals.items()},
        "bytes_down_total": {s: down for s, (_, down) in totals.items()},
    }


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def render_status(console: Console, data: dict[str, Any]) -> None:
    running = "running" if data["alive"] else "[yellow]not running[/]"
    console.print(
        f"[bold]{data['federation']}[/]: {running}, phase [bold]{data['phase']}[/], "
        f"round {data['round']} of {data['total_rounds']}"
        f" (updated {data['age_s']:.0f} s ago)"
    )
    if data.get("deadline_in_s") is not None:
        console.print(f"deadline in {data['deadline_in_s'] - data['age_s']:.0f} s"
                      f" (extensions: {data.get('extensions', 0)})")
    results = data.get("results") or {}
    latest = results.get("latest", {})
    # After the run, what each silo moved over the whole run; during it, this round.
    whole = data["phase"] == "done" and bool(results)
    table = Table()
    for column in ("silo", "joined", "this round", f"latest {results.get('metric', 'score')}",
                   "total up MB" if whole else "up MB",
                   "total down MB" if whole else "down MB"):
        table.add_column(column)
    joined, expected = set(data["joined"]), set(data["expected"])
    for silo in data["roster"]:
        if silo in data["uploaded"]:
            this = "[green]uploaded[/]"
        elif silo in expected:
            this = "[yellow]waiting[/]"
        else:
            this = "-"
        up = results["bytes_up_total"].get(silo, 0) if whole else data["uploaded"].get(silo, 0)
        down = (results["bytes_down_total"].get(silo, 0) if whole
                else data["bytes_down"].get(silo, 0))
        table.add_row(
            silo, "yes" if silo in joined else "[dim]no[/]", this,
            "-" if silo not in latest else f"{latest[silo]:.4f}",
            f"{up / 1e6:.3f}", f"{down / 1e6:.3f}",
        )
    console.print(table)
    if results.get("mtal") is not None:
        what = "MTAL" if data["phase"] == "done" else "mean of the latest scores so far"
        console.print(f"{what} {results['mtal']:.4f} ({results['metric']}: the mean over silos "
                      "of each silo's latest score)", highlight=False)
    if whole:
        console.print(
            "whole run (every round, the final evaluation included): "
            f"{sum(results['bytes_up_total'].values()) / 1e6:.3f} MB up, "
            f"{sum(results['bytes_down_total'].values()) / 1e6:.3f} MB down", highlight=False)
    counters = data.get("counters") or {}
    if counters or data.get("reconnects"):
        shown = ", ".join(f"{k} {v}" for k, v in sorted(counters.items()))
        console.print(f"ignored/refused: {shown or 'none'}; broker reconnects: "
                      f"{data.get('reconnects', 0)}")
    rejected = data.get("rejected") or {}
    if rejected:
        shown = ", ".join(f"{k} {v}" for k, v in sorted(rejected.items()))
        console.print(f"[bold red]rejected messages[/] (dead-lettered to fedsilo.dead): {shown}")
    if data.get("last_error"):
        console.print(f"[red]last error:[/] {data['last_error']}", highlight=False)
