"""Rouge-L F and MTAL against hand-computed values."""

from __future__ import annotations

import pytest

from fedsilo.sdk.evaluation import lcs_length, mean_metric, mtal, rouge_l_f, rouge_tokens


def test_prefix_prediction() -> None:
    # LCS = 3, P = 3/3, R = 3/6, F = 2 * 1 * 0.5 / 1.5
    assert rouge_l_f("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)


def test_reordered_tokens() -> None:
    # LCS("a b c d", "a c b d") = 3 -> P = R = 3/4
    assert rouge_l_f("a b c d", "a c b d") == pytest.approx(0.75)


def test_asymmetric_lengths() -> None:
    # pred 5 tokens, ref 2 tokens, LCS 2 -> P = 2/5, R = 1, F = 2*0.4/1.4
    assert rouge_l_f("x the y cat z", "the cat") == pytest.approx(0.8 / 1.4)


def test_tokenisation_lowercases_and_drops_punctuation() -> None:
    assert rouge_tokens("The CAT, sat! (x2)") == ["the", "cat", "sat", "x2"]
    assert rouge_l_f("The CAT, sat!", "the cat sat") == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("pred", "ref"), [("", "the cat"), ("the cat", ""), ("", ""), ("...", "!!"), ("dog", "cat")]
)
def test_zero_cases(pred: str, ref: str) -> None:
    assert rouge_l_f(pred, ref) == 0.0


def test_lcs_length() -> None:
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert lcs_length([], ["a"]) == 0


def test_mean_metric_and_mtal() -> None:
    history = [{"a": 0.1, "b": 0.3}, {"a": 0.5, "b": 0.8, "c": 0.2}]
    assert mean_metric(history[0]) == pytest.approx(0.2)
    assert mtal(history) == pytest.approx(0.5)  # last round only


def test_mtal_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        mtal([])
    with pytest.raises(ValueError):
        mtal([{"a": 1.0}, {}])
    with pytest.raises(ValueError, match="finite"):
        mean_metric({"a": float("nan")})
