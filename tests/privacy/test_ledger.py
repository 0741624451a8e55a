"""fedsilo.privacy.ledger: epsilon from opacus, composition, budget refusal and persistence."""

from __future__ import annotations

import json
import math
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedsilo.privacy.ledger import (
    BudgetExceeded,
    LedgerError,
    LedgerRecord,
    PrivacyLedger,
    Release,
    compose_epsilon,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Optimal order is the"),  # opacus RDP, called directly
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),  # opacus PRV at q=1
]


def emb(server_round: int, sigma: float = 1.0) -> Release:
    return Release("embeddings", server_round, noise_multiplier=sigma, sample_rate=1.0, steps=1,
                   clip=1.0)


def sgd(server_round: int, sigma: float = 1.1, rate: float = 0.02, steps: int = 100) -> Release:
    return Release("dp-sgd", server_round, noise_multiplier=sigma, sample_rate=rate, steps=steps,
                   clip=1.0)


def test_known_configuration_matches_opacus_rdp() -> None:
    ledger = PrivacyLedger(epsilon=100.0, delta=1e-5)
    ledger.charge([emb(r) for r in range(10)])
    acc = RDPAccountant()
    for _ in range(10):
        acc.step(noise_multiplier=1.0, sample_rate=1.0)
    expected = acc.get_epsilon(delta=1e-5)
    assert expected == pytest.approx(19.0536, abs=1e-3)  # the known value, pinned
    assert ledger.spent() == pytest.approx(expected, rel=1e-12)


def test_embeddings_and_dpsgd_compose_like_opacus_with_the_combined_history() -> None:
    ledger = PrivacyLedger(epsilon=50.0, delta=1e-5)
    for r in range(5):
        ledger.charge([sgd(r), emb(r, sigma=2.0)])
    acc = RDPAccountant()
    acc.history = [(1.1, 0.02, 100), (2.0, 1.0, 1)] * 5
    expected = acc.get_epsilon(delta=1e-5)
    assert ledger.spent() == pytest.approx(expected, rel=1e-9)
    # Composition is really happening: more than either part alone.
    only_emb = compose_epsilon([(2.0, 1.0, 5)], 1e-5)
    only_sgd = compose_epsilon([(1.1, 0.02, 500)], 1e-5)
    assert ledger.spent() > max(only_emb, only_sgd)


def test_prv_ledger_matches_opacus_prv() -> None:
    ledger = PrivacyLedger(epsilon=50.0, delta=1e-5, accountant="prv")
    ledger.charge([emb(0, sigma=2.0), sgd(0, sigma=1.1, rate=0.05, steps=20)])
    acc = PRVAccountant()
    acc.history = [(2.0, 1.0, 1), (1.1, 0.05, 20)]
    assert ledger.spent() == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)


def test_empty_unprotected_and_infinite_budget() -> None:
    assert PrivacyLedger(8.0, 1e-5).spent() == 0.0
    strict = PrivacyLedger(8.0, 1e-5)
    with pytest.raises(BudgetExceeded, match="spent to inf"):
        strict.charge([emb(0, sigma=0.0)])
    assert strict.releases == []
    open_budget = PrivacyLedger(math.inf, 1e-5)
    open_budget.charge([emb(0, sigma=0.0), emb(1)])
    assert open_budget.spent() == math.inf
    assert open_budget.summary()["epsilon_spent"] == math.inf
    protected_only = PrivacyLedger(math.inf, 1e-5)
    protected_only.charge([emb(0)])
    assert 0 < protected_only.spent() < math.inf


def test_charge_refuses_beyond_budget_and_leaves_the_ledger_unchanged() -> None:
    ledger = PrivacyLedger(epsilon=10.0, delta=1e-5)
    ledger.charge([emb(0, sigma=2.0), emb(1, sigma=2.0)])
    before, spent = list(ledger.releases), ledger.spent()
    would = ledger.spent_with([emb(2, sigma=0.5)])
    assert would > 10.0
    with pytest.raises(BudgetExceeded) as info:
        ledger.charge([emb(2, sigma=0.5)])
    message = str(info.value)
    assert f"{would:.4g}" in message and f"{spent:.4g}" in message
    assert "budget epsilon=10" in message and "dp.epsilon" in message
    assert ledger.releases == before and ledger.spent() == spent
    ledger.charge([])  # nothing to record
    assert ledger.releases == before


def test_charge_accepts_up_to_the_budget() -> None:
    target = compose_epsilon([(2.0, 1.0, 3)], 1e-5)
    ledger = PrivacyLedger(epsilon=target, delta=1e-5)
    ledger.charge([emb(r, sigma=2.0) for r in range(3)])  # exactly the budget: accepted
    with pytest.raises(BudgetExceeded):
        ledger.charge([emb(3, sigma=50.0)])  # anything more is refused
    assert len(ledger.releases) == 3


def test_save_load_round_trip_mode_0600_and_spending_kept(tmp_path: Path) -> None:
    path = tmp_path / "state" / "privacy.json"
    ledger = PrivacyLedger(epsilon=20.0, delta=1e-5)
    ledger.charge([sgd(0), emb(0, sigma=2.0)])
    ledger.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["privacy.json"]  # no temp file left

    again = PrivacyLedger.load(path, epsilon=20.0, delta=1e-5, accountant="rdp")
    assert again.releases == ledger.releases
    assert again.spent() == ledger.spent() > 0
    # A restart cannot overspend: the reloaded ledger refuses what the old one would.
    with pytest.raises(BudgetExceeded):
        again.charge([emb(1, sigma=0.3)])

    ledger.charge([emb(1, sigma=3.0)])
    ledger.save(path)  # replaces the file
    assert len(PrivacyLedger.load(path, epsilon=20.0, delta=1e-5).releases) == 3


def test_load_recomputes_under_other_settings_and_missing_file_is_fresh(tmp_path: Path) -> None:
    path = tmp_path / "privacy.json"
    fresh = PrivacyLedger.load(path, epsilon=8.0, delta=1e-5)
    assert fresh.releases == [] and fresh.spent() == 0.0
    ledger = PrivacyLedger(epsilon=math.inf, delta=1e-5)
    ledger.charge([emb(0, sigma=2.0), emb(1, sigma=2.0)])
    ledger.save(path)
    assert json.loads(path.read_text())["epsilon"] == "inf"
    other = PrivacyLedger.load(path, epsilon=9.0, delta=1e-6, accountant="rdp")
    assert (other.epsilon, other.delta) == (9.0, 1e-6)
    assert other.spent() == pytest.approx(compose_epsilon([(2.0, 1.0, 2)], 1e-6), rel=1e-12)
    assert other.spent() > ledger.spent()  # smaller delta costs more epsilon
    assert PrivacyLedger.from_dict(ledger.to_dict()).epsilon == math.inf


def test_unreadable_ledger_is_an_error_not_a_reset(tmp_path: Path) -> None:
    path = tmp_path / "privacy.json"
    path.write_text("{not json")
    with pytest.raises(LedgerError, match="would reset"):
        PrivacyLedger.load(path, epsilon=8.0, delta=1e-5)
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(LedgerError, match="not a fedsilo privacy ledger"):
        PrivacyLedger.load(path, epsilon=8.0, delta=1e-5)
    data = PrivacyLedger(8.0, 1e-5, releases=[emb(0)]).to_dict()
    data["releases"][0]["sample_rate"] = 2.0
    path.write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="sample_rate"):
        PrivacyLedger.load(path, epsilon=8.0, delta=1e-5)


def test_summary() -> None:
    ledger = PrivacyLedger(epsilon=30.0, delta=1e-5)
    assert ledger.summary()["last"] is None
    ledger.charge([sgd(0), emb(0, sigma=2.0)])
    ledger.charge([sgd(1), emb(1, sigma=2.0)])
    summary = ledger.summary()
    assert summary["epsilon_spent"] == ledger.spent()
    assert summary["epsilon_budget"] == 30.0
    assert summary["epsilon_remaining"] == pytest.approx(30.0 - ledger.spent())
    assert (summary["delta"], summary["accountant"], summary["releases"]) == (1e-5, "rdp", 4)
    assert summary["by_kind"] == {"dp-sgd": 2, "embeddings": 2}
    assert summary["last"]["kind"] == "embeddings" and summary["last"]["round"] == 1
    json.dumps(summary)  # plain data


def test_invalid_settings_and_releases() -> None:
    with pytest.raises(LedgerError, match="epsilon must be > 0"):
        PrivacyLedger(0.0, 1e-5)
    with pytest.raises(LedgerError, match="delta"):
        PrivacyLedger(1.0, 0.0)
    with pytest.raises(LedgerError, match="unknown accountant"):
        PrivacyLedger(1.0, 1e-5, accountant="gdp")
    with pytest.raises(ValueError, match="noise_multiplier must be finite"):
        Release("embeddings", 0, noise_multiplier=-1.0, sample_rate=1.0, steps=1, clip=1.0)
    with pytest.raises(ValueError, match="sample_rate"):
        Release("dp-sgd", 0, noise_multiplier=1.0, sample_rate=0.0, steps=1, clip=1.0)


# -- the ledger against what the checkpoint recorded (issue 14) -------------------------------


def _saved(tmp_path: Path, releases: list[Release]) -> tuple[Path, PrivacyLedger]:
    path = tmp_path / "privacy-ledger.json"
    ledger = PrivacyLedger(epsilon=30.0, delta=1e-5)
    ledger.charge(releases)
    ledger.save(path)
    return path, ledger


def _load(path: Path, recorded: LedgerRecord | None) -> PrivacyLedger:
    return PrivacyLedger.load(path, epsilon=30.0, delta=1e-5, recorded=recorded)


def test_the_record_survives_save_load_and_json(tmp_path: Path) -> None:
    path, ledger = _saved(tmp_path, [sgd(0), emb(0, sigma=2.0), emb(1, sigma=2.0)])
    record = ledger.record(1)
    assert (record.releases, record.round) == (3, 1)
    assert record.epsilon_spent == ledger.spent() and len(record.sha256) == 64
    stored = json.loads(json.dumps(record.to_json(), allow_nan=False))  # as in a checkpoint
    again = LedgerRecord.from_json(stored, source="agent.ckpt")
    assert again == replace(record, source="agent.ckpt")
    assert _load(path, again).check(again) == 0  # the reloaded file hashes the same
    assert ledger.digest(2) != ledger.digest() != PrivacyLedger(30.0, 1e-5).digest()
    # epsilon inf (no budget, unprotected releases) is stored as plain JSON as well
    unprotected = PrivacyLedger(math.inf, 1e-5, releases=[emb(0, sigma=0.0)]).record(0)
    assert LedgerRecord.from_json(json.loads(json.dumps(unprotected.to_json(), allow_nan=False)))\
        .epsilon_spent == math.inf
    assert LedgerRecord.from_meta({"last_round": 3}, "agent.ckpt") is None  # an older checkpoint


def test_a_malformed_record_is_an_error() -> None:
    for bad in ({"releases": -1, "sha256": "0" * 64, "epsilon_spent": 1.0, "round": 0},
                {"releases": 2, "sha256": "short", "epsilon_spent": 1.0, "round": 0},
                {"releases": 2, "sha256": "0" * 64, "round": 0}, ["not", "a", "dict"]):
        with pytest.raises(LedgerError, match=r"agent\.ckpt records its privacy ledger"):
            LedgerRecord.from_json(bad, source="agent.ckpt")


def test_a_missing_ledger_beside_a_checkpoint_with_releases_is_refused(tmp_path: Path) -> None:
    path, ledger = _saved(tmp_path, [emb(0, sigma=2.0), emb(1, sigma=2.0), emb(2, sigma=2.0)])
    record = replace(ledger.record(3), source="state/agent.ckpt")
    path.unlink()
    with pytest.raises(LedgerError) as info:
        _load(path, record)
    message = str(info.value)
    assert (f"{path.name} is missing from {path.parent} but state/agent.ckpt recorded 3 "
            "release(s) at round 3") in message
    assert f"epsilon {ledger.spent():.4g} spent" in message
    assert "restore the ledger from backup" in message
    assert "refuses to restart the spend at zero" in message
    assert _load(path, None).releases == []  # without a checkpoint: a fresh silo


def test_a_missing_ledger_is_fresh_when_the_checkpoint_recorded_no_release(
    tmp_path: Path,
) -> None:
    record = PrivacyLedger(30.0, 1e-5).record(2)  # e.g. DP was off for those rounds
    fresh = _load(tmp_path / "privacy-ledger.json", record)
    assert fresh.releases == [] and fresh.spent() == 0.0


def test_a_ledger_with_fewer_releases_than_recorded_is_refused(tmp_path: Path) -> None:
    path, ledger = _saved(tmp_path, [emb(0, sigma=2.0)])
    older = path.read_bytes()  # a backup taken after round 0
    ledger.charge([emb(1, sigma=2.0), emb(2, sigma=2.0)])
    ledger.save(path)
    record = replace(ledger.record(2), source="agent.ckpt")
    path.write_bytes(older)  # "restored" from the stale backup
    with pytest.raises(LedgerError) as info:
        _load(path, record)
    message = str(info.value)
    assert f"{path.name} in {path.parent} holds 1 release(s)" in message
    assert "agent.ckpt recorded 3 release(s)" in message
    assert "replaced by an older or foreign copy" in message
    assert "at least 3 releases" in message and "refuses to continue with less spend" in message


def test_a_replaced_ledger_with_as_many_releases_is_refused(tmp_path: Path) -> None:
    path, ledger = _saved(tmp_path, [emb(0, sigma=2.0), emb(1, sigma=2.0)])
    record = ledger.record(1)
    data = json.loads(path.read_text())
    data["releases"][1]["noise_multiplier"] = 40.0  # edited to look cheaper
    path.write_text(json.dumps(data))
    with pytest.raises(LedgerError, match=r"does not begin with the releases .* first 2 release"
                       r"\(s\) differ.*replaced or edited.*did not write"):
        _load(path, record)
    # Another silo's ledger (same count, other releases) is refused the same way.
    _, other = _saved(tmp_path / "other", [emb(0, sigma=3.0), emb(1, sigma=3.0)])
    path.write_text(json.dumps(other.to_dict()))
    with pytest.raises(LedgerError, match="replaced or edited"):
        _load(path, record)


def test_a_ledger_ahead_of_the_checkpoint_is_kept(tmp_path: Path) -> None:
    """Spend recorded before release stays: releases charged after the last checkpoint
    (the agent was killed before writing the next one) are legitimate."""
    path, ledger = _saved(tmp_path, [sgd(0), emb(0, sigma=2.0)])
    record = ledger.record(0)  # the checkpoint after round 0
    ledger.charge([sgd(1), emb(1, sigma=2.0)])  # round 1 charged, then the crash
    ledger.save(path)
    again = _load(path, record)
    assert again.releases == ledger.releases and again.spent() == ledger.spent()
    assert again.check(record) == 2
    # ... but only if it begins with the recorded releases.
    rewritten = PrivacyLedger(30.0, 1e-5, releases=[emb(5), emb(6), emb(7)])
    path.write_text(json.dumps(rewritten.to_dict()))
    with pytest.raises(LedgerError, match="replaced or edited"):
        _load(path, record)


def test_save_refuses_to_overwrite_a_ledger_changed_on_disk(tmp_path: Path) -> None:
    """Two writers each spending from their own copy: the second save notices."""
    path, _ = _saved(tmp_path, [emb(0, sigma=2.0)])
    mine = _load(path, None)
    theirs = _load(path, None)
    theirs.charge([emb(1, sigma=2.0)])
    theirs.save(path)
    mine.charge([emb(2, sigma=2.0)])
    with pytest.raises(LedgerError, match=r"was written or replaced by someone else.*Nothing "
                       r"more was recorded or released"):
        mine.save(path)
    assert len(_load(path, None).releases) == 2  # theirs kept, not overwritten
    theirs.charge([emb(3, sigma=2.0)])
    theirs.save(path)  # its own last write is what is there: fine
    path.unlink()
    with pytest.raises(LedgerError, match="was deleted by someone else"):
        theirs.save(path)
    assert not path.exists()
    fresh = _load(path, None)  # found none; then another process creates one
    PrivacyLedger(30.0, 1e-5, releases=[emb(0)]).save(path)
    fresh.charge([emb(0)])
    with pytest.raises(LedgerError, match="written or replaced by someone else"):
        fresh.save(path)
