"""`fedsilo status`: render the status file the aggregator rewrites at every event."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

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
    return data


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
    table = Table()
    for column in ("silo", "joined", "this round", "up MB", "down MB"):
        table.add_column(column)
    joined, expected = set(data["joined"]), set(data["expected"])
    for silo in data["roster"]:
        if silo in data["uploaded"]:
            this = "[green]uploaded[/]"
        elif silo in expected:
            this = "[yellow]waiting[/]"
        else:
            this = "-"
        table.add_row(
            silo, "yes" if silo in joined else "[dim]no[/]", this,
            f"{data['uploaded'].get(silo, 0) / 1e6:.3f}",
            f"{data['bytes_down'].get(silo, 0) / 1e6:.3f}",
        )
    console.print(table)
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
