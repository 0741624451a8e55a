"""Evaluation: Rouge-L and MTAL metrics, candidate scoring and greedy generation."""

from .metrics import lcs_length, mean_metric, mtal, rouge_l_f, rouge_tokens
from .scoring import (
    candidate_nll,
    classification_accuracy,
    first_token_accuracy,
    generation_rouge_l,
    greedy_generate,
)

__all__ = [
    "candidate_nll",
    "classification_accuracy",
    "first_token_accuracy",
    "generation_rouge_l",
    "greedy_generate",
    "lcs_length",
    "mean_metric",
    "mtal",
    "rouge_l_f",
    "rouge_tokens",
]
