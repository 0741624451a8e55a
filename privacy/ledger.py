"""The silo's privacy ledger: every DP release it made, composed in one opacus accountant.

Why a ledger and not a per-run counter: the privacy budget is a lifetime property of the silo's
data. Each release (one round's embeddings, one round's DP-SGD steps) is recorded with its
noise multiplier, sample rate and number of compositions; epsilon is always recomputed from the
whole list, so embedding releases and DP-SGD compose correctly, and a restarted agent that
reloads the file keeps what it already spent. The file is written atomically and owner-only.

Why it cannot be bypassed: the ledger has one writer, the process holding the state folder's
lock (see :mod:`fedsilo.privacy.silo`); the agent's checkpoint remembers the ledger it was
written with (:class:`LedgerRecord`: release count, digest, epsilon), and a ledger that is
missing, shorter or different from that record is refused at load instead of restarting
the spend; and a writer refuses to save over a file that changed on disk since it loaded
it (another process wrote or replaced it). A ledger *longer* than the record, beginning
with the recorded releases, is kept: that is spend charged before a release whose
checkpoint a crash prevented, and spend recorded before release stays.

Accounting is a pure function of the list (:func:`compose_epsilon`), so a ledger written
under one delta or accountant can be re-read under another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant

from fedsilo.sdk.files import write_atomic

__all__ = [
    "ACCOUNTANTS",
    "DP_SGD",
    "EMBEDDINGS",
    "FORMAT",
    "FORMAT_VERSION",
    "BudgetExceeded",
    "LedgerError",
    "LedgerRecord",
    "PrivacyLedger",
    "Release",
    "compose_epsilon",
]

FORMAT = "fedsilo-privacy-ledger"
FORMAT_VERSION = 1
ACCOUNTANTS = ("rdp", "prv")
EMBEDDINGS = "embeddings"
DP_SGD = "dp-sgd"


class BudgetExceeded(RuntimeError):
    """A release that would exceed the silo's privacy budget; says spent, would-spend, budget."""


class LedgerError(ValueError):
    """A ledger file or setting that cannot be used; says which and what to do."""


@dataclass(frozen=True)
class Release:
    """One DP release: `steps` compositions of a (subsampled) Gaussian mechanism."""

    kind: str  # EMBEDDINGS | DP_SGD
    round: int
    noise_multiplier: float  # 0 = no protection (epsilon inf)
    sample_rate: float
    steps: int  # 1 for one embedding release; the local steps for DP-SGD
    clip: float
    time: float = field(default_factory=time.time)  # unix time recorded

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.kind, str) or not self.kind:
            problems.append(f"kind must be a non-empty string (got {self.kind!r})")
        if not _is_int(self.round) or self.round < 0:
            problems.append(f"round must be an int >= 0 (got {self.round!r})")
        if not _is_real(self.noise_multiplier) or not 0 <= self.noise_multiplier < math.inf:
            problems.append(
                f"noise_multiplier must be finite and >= 0 (got {self.noise_multiplier!r})"
            )
        if not _is_real(self.sample_rate) or not 0 < self.sample_rate <= 1:
            problems.append(f"sample_rate must be in (0, 1] (got {self.sample_rate!r})")
        if not _is_int(self.steps) or self.steps < 0:
            problems.append(f"steps must be an int >= 0 (got {self.steps!r})")
        if not _is_real(self.clip) or not 0 < self.clip < math.inf:
            problems.append(f"clip must be finite and > 0 (got {self.clip!r})")
        if not _is_real(self.time):
            problems.append(f"time must be a unix time in seconds (got {self.time!r})")
        if problems:
            raise ValueError(f"invalid {self.kind!r} release: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compose_epsilon(
    history: Iterable[tuple[float, float, int]], delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon at `delta` of composing `(noise_multiplier, sample_rate, steps)` entries.

    Computed by opacus (RDPAccountant or PRVAccountant with `history` set). Entries with the
    same (noise, rate) are merged (composition is commutative; fewer PRV convolutions).
    0.0 for nothing released; inf when any entry has noise_multiplier 0.
    """
    accountant_cls = _accountant_class(accountant)
    merged: dict[tuple[float, float], int] = {}
    for noise, rate, steps in history:
        if steps > 0 and rate > 0:
            key = (float(noise), float(rate))
            merged[key] = merged.get(key, 0) + int(steps)
    if not merged:
        return 0.0
    if any(noise == 0 for noise, _ in merged):
        return math.inf
    acc = accountant_cls()
    acc.history = [(noise, rate, steps) for (noise, rate), steps in merged.items()]
    # opacus warns when the best RDP order is at the edge of its grid (the bound is then only
    # conservative), and PRV at rate 1 takes log(0) in a branch it discards; neither matters.
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        eps = float(acc.get_epsilon(delta=delta))
    return max(eps, 0.0)


@dataclass(frozen=True)
class LedgerRecord:
    """What a checkpoint remembers of the ledger it was written with: the number of releases,
    the SHA-256 of those releases (:meth:`PrivacyLedger.digest`), the epsilon they spent and
    the checkpoint's round. `source` (not stored) names the checkpoint, for messages."""

    releases: int
    sha256: str
    epsilon_spent: float
    round: int | None = None
    source: str = "the checkpoint"

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (no NaN/inf: epsilon inf is the string "inf")."""
        spent = self.epsilon_spent if math.isfinite(self.epsilon_spent) else "inf"
        return {"releases": self.releases, "sha256": self.sha256, "epsilon_spent": spent,
                "round": self.round}

    @classmethod
    def from_json(cls, data: object, source: str = "the checkpoint") -> LedgerRecord:
        try:
            if not isinstance(data, Mapping):
                raise TypeError("not a JSON object")
            record = cls(releases=data["releases"], sha256=data["sha256"],
                         epsilon_spent=float(data["epsilon_spent"]), round=data["round"],
                         source=source)
            if not _is_int(record.releases) or record.releases < 0:
                raise ValueError(f"releases {record.releases!r}")
            if not isinstance(record.sha256, str) or len(record.sha256) != 64:
                raise ValueError(f"sha256 {record.sha256!r}")
            if record.round is not None and not _is_int(record.round):
                raise ValueError(f"round {record.round!r}")
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerError(
                f"{source} records its privacy ledger in a form this fedsilo cannot read "
                f"({exc}); resume with the fedsilo version that wrote it"
            ) from None
        return record

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], source: str) -> LedgerRecord | None:
        """The record in a checkpoint's metadata (key "privacy"); None if it has none."""
        data = meta.get("privacy")
        return None if data is None else cls.from_json(data, source)

    def describe(self) -> str:
        at = "" if self.round is None else f" at round {self.round}"
        return (f"{self.source} recorded {self.releases} release(s){at}, epsilon "
                f"{self.epsilon_spent:.4g} spent")


class PrivacyLedger:
    """Everything this silo has released under DP, persisted with its state; composes all
    releases in one opacus accountant. A restart reloads it, so the budget never resets."""

    def __init__(
        self,
        epsilon: float,
        delta: float,
        accountant: str = "rdp",
        releases: Sequence[Release] = (),
    ) -> None:
        if not _is_real(epsilon) or math.isnan(epsilon) or epsilon <= 0:
            raise LedgerError(
                f"privacy budget epsilon must be > 0 (got {epsilon!r}); use e.g. 8, or inf for "
                "no budget"
            )
        if not _is_real(delta) or not 0 < delta < 1:
            raise LedgerError(f"delta must be in (0, 1) (got {delta!r}); use e.g. 1e-5")
        _accountant_class(accountant)
        for release in releases:
            _check_release(release)
        self.epsilon = float(epsilon)
        self.delta = float(delta)
        self.accountant = accountant
        self.releases: list[Release] = list(releases)
        self._cache: tuple[tuple[Release, ...], float] | None = None
        # (path, bytes) this object last loaded or saved there (None bytes: no file):
        # `save` refuses to write over a file someone else changed since.
        self._disk: tuple[Path, bytes | None] | None = None

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger(epsilon={self.epsilon}, delta={self.delta}, "
            f"accountant={self.accountant!r}, releases={len(self.releases)})"
        )

    def spent(self) -> float:
        """Epsilon spent so far at the ledger's delta (cached: PRV takes about a second)."""
        key = tuple(self.releases)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._epsilon_of(key))
        return self._cache[1]

    def spent_with(self, new: Sequence[Release]) -> float:
        """Epsilon spent if `new` were released as well."""
        for release in new:
            _check_release(release)
        if not new:
            return self.spent()
        return self._epsilon_of([*self.releases, *new])

    def charge(self, new: Sequence[Release]) -> None:
        """Record `new`, or raise BudgetExceeded (and record nothing) if it would overspend."""
        new = list(new)
        if not new:
            return
        would = self.spent_with(new)
        if would > self.epsilon + 1e-9:
            kinds = ", ".join(sorted({r.kind for r in new}))
            raise BudgetExceeded(
                f"refusing to release {kinds} (round {new[0].round}): it would bring epsilon "
                f"spent to {would:.4g} (spent so far {self.spent():.4g}) at delta={self.delta:g}, "
                f"over this silo's budget epsilon={self.epsilon:g}. Raise dp.epsilon, raise the "
                "noise multiplier, or stop releasing: the spent budget never resets"
            )
        self.releases.extend(new)

    def digest(self, count: int | None = None) -> str:
        """SHA-256 of the first `count` releases (all by default), every field included; the
        same after a save and load (the fields are normalised, floats kept exactly)."""
        h = hashlib.sha256(b"fedsilo-privacy-ledger-releases/1\n")
        for r in self.releases[:count]:
            fields = [r.kind, r.round, float(r.noise_multiplier), float(r.sample_rate),
                      r.steps, float(r.clip), float(r.time)]
            h.update(json.dumps(fields, allow_nan=False).encode() + b"\n")
        return h.hexdigest()

    def record(self, server_round: int | None = None) -> LedgerRecord:
        """What a checkpoint written now (at `round`) should remember of this ledger."""
        return LedgerRecord(len(self.releases), self.digest(), self.spent(), server_round)

    def check(self, recorded: LedgerRecord, path: Path | None = None) -> int:
        """Refuse (LedgerError) a ledger that does not begin with the `recorded` releases;
        return how many it holds beyond them (spend recorded before a release whose
        checkpoint was never written: legitimate, kept)."""
        held, want = len(self.releases), recorded.releases
        where = "the ledger" if path is None else _where(Path(path))
        if held < want:
            raise LedgerError(
                f"{where} holds {held} release(s) (epsilon {self.spent():.4g} spent) but "
                f"{recorded.describe()}: the ledger was replaced by an older or foreign copy, "
                "or cut short. Restore the ledger from backup (the copy holding at least "
                f"{want} releases); fedsilo refuses to continue with less spend than it "
                "recorded"
            )
        if self.digest(want) != recorded.sha256:
            raise LedgerError(
                f"{where} does not begin with the releases {recorded.source} recorded: its "
                f"first {want} release(s) differ (they hash to {self.digest(want)[:12]}..., "
                f"the checkpoint has {recorded.sha256[:12]}...; {recorded.describe()}). The "
                "ledger was replaced or edited. Restore the ledger from backup; fedsilo "
                "refuses to continue from a ledger it did not write"
            )
        return held - want

    def summary(self) -> dict[str, Any]:
        """Plain data for `fedsilo agent privacy`."""
        spent = self.spent()
        by_kind: dict[str, int] = {}
        for release in self.releases:
            by_kind[release.kind] = by_kind.get(release.kind, 0) + 1
        return {
            "epsilon_spent": spent,
            "epsilon_budget": self.epsilon,
            "epsilon_remaining": max(self.epsilon - spent, 0.0),
            "delta": self.delta,
            "accountant": self.accountant,
            "releases": len(self.releases),
            "by_kind": by_kind,
            "last": self.releases[-1].to_dict() if self.releases else None,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (epsilon inf is written as the string "inf")."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "epsilon": self.epsilon if math.isfinite(self.epsilon) else "inf",
            "delta": self.delta,
            "accountant": self.accountant,
            "releases": [release.to_dict() for release in self.releases],
        }

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        epsilon: float | None = None,
        delta: float | None = None,
        accountant: str | None = None,
    ) -> PrivacyLedger:
        """The ledger `to_dict` wrote; settings given here replace the stored ones."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise LedgerError(f"not a fedsilo privacy ledger (no format={FORMAT!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise LedgerError(
                f"privacy ledger format version {data.get('format_version')!r}, this fedsilo "
                f"reads {FORMAT_VERSION}; use the fedsilo version that wrote it"
            )
        try:
            stored_eps = data["epsilon"]
            releases = [Release(**entry) for entry in data["releases"]]
            return cls(
                epsilon=float(stored_eps) if epsilon is None else epsilon,
                delta=float(data["delta"]) if delta is None else delta,
                accountant=str(data["accountant"]) if accountant is None else accountant,
                releases=releases,
            )
        except LedgerError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerError(f"privacy ledger entries are malformed ({exc})") from None

    def save(self, path: Path) -> None:
        """Atomically replace `path` (temp file, fsync, rename, folder fsync); mode 0600.

        A ledger that was loaded from (or saved to) `path` refuses, with LedgerError, to
        overwrite a file that changed there since: another process wrote, replaced or
        deleted it, and writing our own copy over it would lose that spend."""
        path = Path(path)
        if self._disk is not None and self._disk[0] == path:
            now = _read_or_none(path)
            if now != self._disk[1]:
                what = "was deleted" if now is None else "was written or replaced"
                raise LedgerError(
                    f"{path} {what} by someone else since this process last read or wrote "
                    "it: another process is writing the ledger, or it was swapped. Nothing "
                    "more was recorded or released. Stop every agent on this state_dir, "
                    "restore the ledger from backup if it is gone, and start one agent"
                )
        data = json.dumps(self.to_dict(), indent=1, allow_nan=False).encode("utf-8")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(path, data, 0o600)
        self._disk = (path, data)

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        epsilon: float,
        delta: float,
        accountant: str = "rdp",
        recorded: LedgerRecord | None = None,
    ) -> PrivacyLedger:
        """The ledger at `path` under the given settings; a fresh one if there is no file.

        A file written with another delta or accountant is recomputed with these. An
        unreadable file raises LedgerError rather than starting afresh, which would reset the
        budget. `recorded` is what the checkpoint beside it remembers: a missing file where
        it shows releases, or a file that does not begin with them (:meth:`check`), raises
        LedgerError too.
        """
        path = Path(path)
        if not path.exists():
            if recorded is not None and recorded.releases > 0:
                raise LedgerError(
                    f"{path.name} is missing from {path.parent} but {recorded.describe()}: "
                    "restore the ledger from backup; fedsilo refuses to restart the spend at "
                    "zero"
                )
            fresh = cls(epsilon, delta, accountant)
            fresh._disk = (path, None)
            return fresh
        try:
            raw = path.read_bytes()
            data = json.loads(raw.decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise LedgerError(
                f"privacy ledger {path} is unreadable ({exc}); restore it from a backup. "
                "Deleting it would reset the silo's spent privacy budget"
            ) from None
        try:
            ledger = cls.from_dict(data, epsilon=epsilon, delta=delta, accountant=accountant)
        except LedgerError as exc:
            raise LedgerError(
                f"privacy ledger {path}: {exc}. Restore it from a backup; deleting it would "
                "reset the silo's spent privacy budget"
            ) from None
        if recorded is not None:
            ledger.check(recorded, path)
        ledger._disk = (path, raw)
        return ledger

    def _epsilon_of(self, releases: Sequence[Release]) -> float:
        history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in releases]
        return compose_epsilon(history, self.delta, self.accountant)


def _accountant_class(name: str) -> type[RDPAccountant] | type[PRVAccountant]:
    if name == "rdp":
        return RDPAccountant
    if name == "prv":
        return PRVAccountant
    raise LedgerError(f"unknown accountant {name!r}; use one of {', '.join(ACCOUNTANTS)}")


def _where(path: Path) -> str:
    """`name in folder`: the file's name stays one word however a terminal wraps the line."""
    return f"{path.name} in {path.parent}"


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _check_release(release: object) -> None:
    if not isinstance(release, Release):
        raise TypeError(f"expected a Release, got {type(release).__name__}")


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
