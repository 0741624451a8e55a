"""What a federation produced, read back from its folder: a `fedsilo simulate` run folder
or an aggregator's state_dir. Both write the same files (metrics.jsonl: one
`RoundSummary.to_json()` line per closed round; assignments/round_NNN.json: each silo's
experts per module), so one reader serves `fedsilo report` and `fedsilo status`.

Why a reader of its own: the report and the status must agree with each other and with
what the run printed, whichever kind of folder they are given. Everything here is a pure
function of the files; nothing is written.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = [
    "ASSIGNMENTS",
    "METRICS",
    "RUN_FORMAT",
    "PrivacySpend",
    "RunFolderError",
    "RunHistory",
    "check_format",
    "fedsilo_version",
    "load_history",
    "read_rounds",
    "run_header",
]

RUN_FORMAT = 1
"""Layout of run folders and state_dirs this fedsilo writes and reads (config.json and
status.json record it); a reader refuses a newer one rather than misread it."""
METRICS = "metrics.jsonl"
ASSIGNMENTS = "assignments"
LEDGER_FILE = "privacy-ledger.json"  # privacy.silo.LEDGER_FILE (not imported: torch-free)
AGENT_CHECKPOINT = "agent.ckpt"  # silo_agent.service.CHECKPOINT


class RunFolderError(ValueError):
    """A folder that is not a run this fedsilo can read; the message says what to give."""


def fedsilo_version() -> str:
    try:
        return importlib.metadata.version("fedsilo")
    except importlib.metadata.PackageNotFoundError:  # running from a bare source tree
        return "unknown"


def run_header() -> dict[str, Any]:
    """What a run records about how it was made: which fedsilo, which layout, when (UTC)."""
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    return {"fedsilo_version": fedsilo_version(), "run_format": RUN_FORMAT,
            "created_at": now.isoformat()}


@dataclass(frozen=True)
class PrivacySpend:
    """One silo's DP ledger as a curve: epsilon spent after each round that released."""

    budget: float
    delta: float
    by_round: tuple[tuple[int, float], ...]

    @property
    def spent(self) -> float:
        return self.by_round[-1][1] if self.by_round else 0.0


@dataclass(frozen=True)
class RunHistory:
    """A run's rounds as written, and what can be derived from them."""

    path: Path
    kind: str  # "simulate" | "deployment"
    name: str
    strategy: str
    total_rounds: int | None  # training rounds planned (the final evaluation is one more)
    rounds: tuple[dict[str, Any], ...]  # metrics.jsonl lines, by round
    assignments: Mapping[int, Mapping[str, Mapping[str, list[int]]]] = field(
        default_factory=dict)
    privacy: Mapping[str, PrivacySpend] = field(default_factory=dict)
    complete: bool = False
    fedsilo_version: str | None = None
    created_at: str | None = None

    @property
    def metric(self) -> str:
        """The score's name as the run gave it (accuracy, rouge-l, accuracy/rouge-l)."""
        names = [r.get("metric") for r in self.rounds if r.get("metric")]
        return str(names[-1]) if names else "metric"

    @property
    def silos(self) -> list[str]:
        seen: dict[str, None] = {}
        for line in self.rounds:
            seen.update(dict.fromkeys(line["silos"]))
        for assignment in self.assignments.values():
            seen.update(dict.fromkeys(assignment))
        return list(seen)

    def scores(self) -> dict[str, list[tuple[int, float]]]:
        """Each silo's score per round it was scored in."""
        out: dict[str, list[tuple[int, float]]] = {s: [] for s in self.silos}
        for line in self.rounds:
            for silo, row in line["silos"].items():
                if _finite(row.get("metric")):
                    out[silo].append((line["round"], float(row["metric"])))
        return out

    def mta(self) -> list[tuple[int, float]]:
        """MTA per round: the mean over silos of that round's scores."""
        out = []
        for line in self.rounds:
            values = [float(r["metric"]) for r in line["silos"].values()
                      if _finite(r.get("metric"))]
            if values:
                out.append((line["round"], math.fsum(values) / len(values)))
        return out

    def latest(self) -> dict[str, float]:
        """Each silo's most recent score: after the last round that scored it."""
        return {s: points[-1][1] for s, points in self.scores().items() if points}

    def mtal(self) -> float | None:
        """MTAL: the mean over silos of each silo's latest score (summary.json's mtal)."""
        latest = self.latest()
        return math.fsum(latest.values()) / len(latest) if latest else None

    def bytes_per_round(self) -> list[tuple[int, int, int]]:
        """(round, bytes up, bytes down), summed over silos."""
        return [(line["round"],
                 sum(int(r.get("bytes_up", 0)) for r in line["silos"].values()),
                 sum(int(r.get("bytes_down", 0)) for r in line["silos"].values()))
                for line in self.rounds]

    def bytes_by_silo(self) -> dict[str, tuple[int, int]]:
        """Each silo's (bytes up, bytes down) summed over every round of the run."""
        out = {s: (0, 0) for s in self.silos}
        for line in self.rounds:
            for silo, row in line["silos"].items():
                up, down = out[silo]
                out[silo] = (up + int(row.get("bytes_up", 0)),
                             down + int(row.get("bytes_down", 0)))
        return out

    def round_times(self) -> list[dict[str, float | None]]:
        """Per round: its wall time (None if not recorded), the slowest silo's training and
        test seconds, and the aggregation's."""
        out = []
        for line in self.rounds:
            rows = list(line["silos"].values())
            out.append({
                "round": line["round"],
                "round_s": line.get("round_s"),
                "train_s": max((float(r.get("train_s", 0.0)) for r in rows), default=0.0),
                "test_s": max((float(r.get("test_s", 0.0)) for r in rows), default=0.0),
                "aggregate_s": float(line.get("aggregate_s", 0.0)),
            })
        return out

    def experts_round(self) -> int | None:
        """The last round whose assignment names experts: the silos' final architecture."""
        named = [r for r, a in self.assignments.items()
                 if any(ids for modules in a.values() for ids in modules.values())]
        return max(named) if named else None

    def expert_grid(self, server_round: int) -> tuple[list[str], int, dict[str, list[list[int]]]]:
        """(silos, number of experts E, {module: silos x E matrix of 0/1}) of `round`: which
        domain experts each silo holds in each adapted module (the paper's Figure 8)."""
        assignment = self.assignments.get(server_round, {})
        silos = [s for s in self.silos if s in assignment]
        modules = list(dict.fromkeys(m for s in silos for m in assignment[s]))
        width = 1 + max((i for a in self.assignments.values() for ids in a.values()
                         for i in (j for m in ids.values() for j in m)), default=-1)
        grid = {}
        for module in modules:
            grid[module] = [[1 if j in assignment[s].get(module, []) else 0 for j in range(width)]
                            for s in silos]
        return silos, width, grid


def read_rounds(path: Path) -> list[dict[str, Any]]:
    """The lines of a metrics.jsonl, one per round (a round written twice: the last one);
    a torn last line (a run stopped while writing it) is skipped."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise RunFolderError(f"cannot read {path}: {exc.strerror or exc}") from None
    lines = text.splitlines()
    by_round: dict[int, dict[str, Any]] = {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):
                break  # torn: the writer stopped mid-line
            raise RunFolderError(
                f"line {number} of {path} is not JSON: the file was edited or damaged; "
                "restore it, or rerun"
            ) from None
        _check_line(line, path, number)
        by_round[line["round"]] = line
    return [by_round[r] for r in sorted(by_round)]


def _check_line(line: Any, path: Path, number: int) -> None:
    ok = (isinstance(line, dict) and isinstance(line.get("round"), int)
          and isinstance(line.get("silos"), dict)
          and all(isinstance(row, dict) for row in line["silos"].values()))
    if not ok:
        raise RunFolderError(
            f"line {number} of {path} is not a fedsilo round summary (it needs round and "
            "silos): was the file written by fedsilo simulate or the aggregator?"
        )


def load_history(path: Path, silo_dirs: Sequence[Path] = ()) -> RunHistory:
    """Read a `fedsilo simulate` run folder or an aggregator state_dir. `silo_dirs`: silos'
    state_dirs whose privacy ledgers to show (a deployment's ledgers stay with the silos;
    a simulate run keeps them under silos/<id>/)."""
    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"no such folder: {path}")
    if not path.is_dir():
        raise RunFolderError(
            f"{path} is a file; give the run folder `fedsilo simulate` printed, or the "
            "aggregator's state_dir (federation.toml)"
        )
    if (path / "config.json").exists():
        history = _simulate_run(path)
    elif (path / "status.json").exists():
        history = _state_dir(path)
    else:
        raise RunFolderError(_not_a_run(path))
    if silo_dirs:
        privacy = dict(history.privacy)
        for folder in silo_dirs:
            silo, spend = _silo_ledger(Path(folder))
            privacy[silo] = spend
        history = replace(history, privacy=privacy)
    return history


def _not_a_run(path: Path) -> str:
    runs = sorted((p for p in path.iterdir() if p.is_dir() and (p / "config.json").exists()),
                  key=lambda p: p.name)
    if runs:
        return (f"{path} holds {len(runs)} run folder(s), it is not one: give one of them, "
                f"e.g. {runs[-1]}")
    return (f"{path} is not a fedsilo run: it has neither config.json (a `fedsilo simulate` "
            "run folder) nor status.json (an aggregator's state_dir). Give the folder "
            "`fedsilo simulate` printed, or federation.toml's state_dir")


def _json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{path} is unreadable ({exc}): {what}") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path} is not a JSON object: {what}")
    return data


def check_format(data: Mapping[str, Any], path: Path) -> None:
    """Refuse a folder written in a layout this fedsilo does not know (a newer one)."""
    fmt = data.get("run_format", 1)  # runs from before run_format were format 1
    if not isinstance(fmt, int) or isinstance(fmt, bool) or not 1 <= fmt <= RUN_FORMAT:
        by = data.get("fedsilo_version", "another version")
        raise RunFolderError(
            f"{path} was written by fedsilo {by} in run format {fmt!r}; this fedsilo "
            f"({fedsilo_version()}) reads format {RUN_FORMAT}. Use fedsilo {by} to read it"
        )


def _simulate_run(path: Path) -> RunHistory:
    config = _json_object(path / "config.json", "not a fedsilo simulate run folder?")
    check_format(config, path / "config.json")
    if "strategy" not in config or "rounds" not in config:
        raise RunFolderError(
            f"{path / 'config.json'} has no strategy or rounds: it is not the config of a "
            "`fedsilo simulate` run"
        )
    rounds = read_rounds(path / METRICS) if (path / METRICS).exists() else []
    privacy = {}
    for ledger in sorted((path / "silos").glob(f"*/{LEDGER_FILE}")):
        privacy[ledger.parent.name] = _spend(ledger)
    return RunHistory(
        path=path, kind="simulate", name=path.name, strategy=str(config["strategy"]),
        total_rounds=int(config["rounds"]), rounds=tuple(rounds),
        assignments=_assignments(path / ASSIGNMENTS), privacy=privacy,
        complete=(path / "summary.json").exists(),
        fedsilo_version=config.get("fedsilo_version"), created_at=config.get("created_at"),
    )


def _state_dir(path: Path) -> RunHistory:
    status = _json_object(path / "status.json", "is this an aggregator's state_dir?")
    check_format(status, path / "status.json")
    summary = (_json_object(path / "summary.json", "the aggregator writes it at the end")
               if (path / "summary.json").exists() else {})
    if (path / METRICS).exists():
        rounds = read_rounds(path / METRICS)
    else:  # an aggregator of before metrics.jsonl: summary.json has the same lines
        rounds = [r for r in summary.get("rounds", []) if isinstance(r, dict)]
        for number, line in enumerate(rounds, start=1):
            _check_line(line, path / "summary.json", number)
    return RunHistory(
        path=path, kind="deployment", name=str(status.get("federation", path.name)),
        strategy=str(status.get("strategy") or summary.get("strategy") or "?"),
        total_rounds=status.get("total_rounds"), rounds=tuple(rounds),
        assignments=_assignments(path / ASSIGNMENTS),
        complete=status.get("phase") == "done",
        fedsilo_version=status.get("fedsilo_version"), created_at=None,
    )


def _assignments(folder: Path) -> dict[int, dict[str, dict[str, list[int]]]]:
    out: dict[int, dict[str, dict[str, list[int]]]] = {}
    for file in sorted(folder.glob("round_*.json")):
        try:
            server_round = int(file.stem.removeprefix("round_"))
        except ValueError:
            continue
        data = _json_object(file, "each silo's experts per module, as the run wrote them")
        try:
            out[server_round] = {str(s): {str(m): [int(i) for i in ids] for m, ids in mods.items()}
                          for s, mods in data.items()}
        except (AttributeError, TypeError, ValueError):
            raise RunFolderError(
                f"{file} is not an assignment (silo -> module -> expert ids)") from None
    return out


def _spend(ledger_path: Path) -> PrivacySpend:
    from fedsilo.privacy.ledger import LedgerError, PrivacyLedger

    data = _json_object(ledger_path, "a silo's privacy ledger")
    try:
        ledger = PrivacyLedger.from_dict(data)
    except LedgerError as exc:
        raise RunFolderError(f"{ledger_path}: {exc}") from None
    by_round = []
    for server_round in sorted({r.round for r in ledger.releases}):
        upto = [r for r in ledger.releases if r.round <= server_round]
        spent = PrivacyLedger(ledger.epsilon, ledger.delta, ledger.accountant, upto).spent()
        by_round.append((server_round, spent))
    return PrivacySpend(ledger.epsilon, ledger.delta, tuple(by_round))


def _silo_ledger(folder: Path) -> tuple[str, PrivacySpend]:
    ledger = folder / LEDGER_FILE
    if not ledger.exists():
        raise RunFolderError(
            f"no {LEDGER_FILE} in {folder}: give a silo's state_dir (silo.toml) whose agent "
            "ran with differential privacy on"
        )
    return _silo_id(folder), _spend(ledger)


def _silo_id(folder: Path) -> str:
    """The id the agent's checkpoint names (metadata only), else the folder's name."""
    checkpoint = folder / AGENT_CHECKPOINT
    if checkpoint.exists():
        try:
            from safetensors import safe_open

            with safe_open(str(checkpoint), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            if isinstance(meta.get("silo_id"), str):
                return meta["silo_id"]
        except Exception:  # unreadable: the agent itself reports that; the name will do
            pass
    return folder.name


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
