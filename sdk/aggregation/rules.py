"""The names of the aggregation rules (`robust` implements them), torch-free, so a config
can check `aggregation = "..."` without loading the math."""

from typing import Literal

Rule = Literal["mean", "median", "trimmed_mean"]
RULES: tuple[str, ...] = ("mean", "median", "trimmed_mean")
