"""Text and federation metrics: Rouge-L F and MTAL (ALGORITHM.md, Schedule).

Rouge-L is implemented here rather than imported so the score is the same on every silo with
no extra dependency; it matches `rouge_score`'s rougeL without stemming (lowercase, tokens
are runs of [a-z0-9], F with beta = 1).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

__all__ = [
    "METRIC_NAMES", "lcs_length", "mean_metric", "metric_for", "metrics_label", "mtal",
    "rouge_l_f", "rouge_tokens",
]

# What a silo's score is called, by task kind: the name runs, summaries and reports show.
METRIC_NAMES = {"classification": "accuracy", "generation": "rouge-l"}

_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenisation: lowercase, keep runs of letters and digits."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) DP, two rows of memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l_f(prediction: str, reference: str) -> float:
    """Rouge-L F-measure: P = LCS/len(pred), R = LCS/len(ref), F = 2PR/(P+R); 0.0 if either
    text has no tokens or nothing in common."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def mean_metric(values: Mapping[str, float]) -> float:
    """Mean over silos of one round's metric (the round's MTA)."""
    if not values:
        raise ValueError("no silo metrics to average")
    out = math.fsum(float(v) for v in values.values()) / len(values)
    if not math.isfinite(out):
        raise ValueError(f"silo metrics are not all finite: {dict(values)}")
    return out


def mtal(history: Sequence[Mapping[str, float]]) -> float:
    """MTAL: mean over silos of the metric after the last round; history[r] = {silo: metric}."""
    if not history:
        raise ValueError("MTAL needs at least one round of metrics; history is empty")
    return mean_metric(history[-1])


def metric_for(kind: str) -> str:
    """The name of the score of a task of `kind` ("classification" or "generation")."""
    return METRIC_NAMES.get(kind, "metric")


def metrics_label(names: Sequence[str]) -> str:
    """One metric's name, or the names joined by '/' when the silos' tasks differ; "metric"
    when none is known (silos that did not say, e.g. agents of an older fedsilo)."""
    known = [n for n in names if n in METRIC_NAMES.values()]
    return "/".join(dict.fromkeys(known)) or "metric"
