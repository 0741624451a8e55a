"""LocalTrainer's scores: the final one over the whole split (and validation on request),
the per-round curve under its own cap."""

from __future__ import annotations

import pytest

from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.data.silos import build_silo_data
from fedsilo.sdk.messages import RoundPlan
from fedsilo.sdk.models.loading import load_model
from fedsilo.sdk.training import LocalTrainer, TrainingConfig


def _trainer(**config: object) -> LocalTrainer:
    loaded = load_model("builtin:tiny", seed=0)
    data = build_silo_data(None, 1, 0, 200)[0]
    return LocalTrainer(loaded.model, loaded.tokenizer, data, AMoLEConfig(use_router=False),
                        TrainingConfig(**config), seed=0)  # type: ignore[arg-type]


def test_final_score_uses_the_whole_split_and_the_curve_its_cap() -> None:
    trainer = _trainer(curve_eval_limit=1, report_val=True)
    n_test = len(trainer.data.test)
    assert n_test > 1
    curve, _ = trainer.test(final=False)
    assert set(curve) == {"metric", "test_n"} and curve["metric"] in (0.0, 1.0)
    assert curve["test_n"] == 1  # one example scored
    final, timings = trainer.test(final=True)
    assert set(final) == {"metric", "test_n", "val_metric"} and timings["test_s"] >= 0
    assert final["test_n"] == n_test
    assert final["metric"] == pytest.approx(trainer.evaluate("test"))
    assert final["val_metric"] == pytest.approx(trainer.evaluate("val"))
    assert final["metric"] * n_test == pytest.approx(round(final["metric"] * n_test))


def test_without_report_val_only_the_test_metric_is_reported() -> None:
    metrics, _ = _trainer().test(final=True)
    assert set(metrics) == {"metric", "test_n"}


def test_scoring_reports_progress_to_on_eval() -> None:
    """A long test split shows progress (the CLI draws it) instead of looking hung."""
    trainer = _trainer(eval_batch_size=4)
    seen: list[tuple[int, int]] = []
    trainer.on_eval = lambda done, total: seen.append((done, total))
    trainer.test(final=True)
    assert len(seen) > 1, seen
    dones = [d for d, _ in seen]
    assert dones == sorted(dones) and seen[-1][0] == seen[-1][1] > 0


@pytest.mark.parametrize("key", ["eval_limit", "curve_eval_limit"])
def test_limits_are_checked(key: str) -> None:
    with pytest.raises(ValueError, match=key):
        TrainingConfig(**{key: 0})  # type: ignore[arg-type]


def test_last_training_round_marks_the_final_personalised_score() -> None:
    def plan(server_round: int, final: bool = False) -> RoundPlan:
        return RoundPlan(server_round, "s", 3, 1e-3, 1, {}, {}, final=final)

    assert [plan(r).last_training_round for r in range(3)] == [False, False, True]
    assert not plan(3, final=True).last_training_round
