"""`fedsilo evaluate`: score a silo's personalised model again, as its run scored it.

Why it reproduces the run's final score exactly: the test split is cut again from the
recorded data recipe, the same first `eval_limit` examples are scored by the same function
(`score_task`) with the same batching, and the model is the one the score was of
(`personalise`), installed into the same backbone (its digest is checked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedsilo.sdk.data.examples import DataError, Example, TaskInfo
from fedsilo.sdk.data.loading import load_examples
from fedsilo.sdk.data.presets import resolve_dataset
from fedsilo.sdk.evaluation.scoring import Progress, score_task
from fedsilo.sdk.training import TrainingConfig

from .config import PersonalisedError
from .export import personalise
from .loading import build_personalised_model
from .record import SiloRun


@dataclass(frozen=True)
class SiloScore:
    silo_id: str
    metric: str
    """"accuracy" (classification) or "rouge-l" (generation), as the run's summary names it."""
    value: float
    examples: int
    data: str
    """What was scored: "<data set> test split" or the --data spec."""

    def to_json(self) -> dict[str, Any]:
        return {"silo": self.silo_id, "metric": self.metric, "value": self.value}


def metric_name(task: TaskInfo) -> str:
    return "accuracy" if task.kind == "classification" else "rouge-l"


def own_test_split(run: SiloRun) -> tuple[list[Example], TaskInfo, str]:
    """The examples the run's final score covers: the first `eval_limit` of the silo's test
    split, cut again from its data recipe."""
    if run.data is None:
        raise PersonalisedError(
            f"{run.path} does not record how the silo's data was cut; pass --data SPEC to "
            "score other data, or --config silo.toml for an agent's state_dir"
        )
    training = _training(run)
    try:
        data = run.data.build()
    except DataError as exc:
        raise PersonalisedError(f"cannot rebuild the data of {run.silo_id}: {exc}") from None
    limit = training.eval_limit
    examples = data.test if limit is None else data.test[:limit]
    return list(examples), data.task, f"{run.data.held()} test split"


def spec_examples(spec: str, data_dir: str | None, limit: int | None,
                  seed: int = 0) -> tuple[list[Example], TaskInfo, str]:
    """Examples of another data set (a preset or a dataset description .toml): a seeded
    random `limit` of them, or all."""
    try:
        examples, task = load_examples(resolve_dataset(spec, data_dir), limit=limit, seed=seed)
    except DataError as exc:
        raise PersonalisedError(f"--data {spec}: {exc}") from None
    return examples, task, spec


def _training(run: SiloRun) -> TrainingConfig:
    if run.training is None:
        raise PersonalisedError(
            f"{run.path} does not record the training settings its score used (max_length, "
            "eval batch size, scoring); re-run the federation with this fedsilo"
        )
    return run.training


def evaluate_run(
    run: SiloRun,
    examples: list[Example] | None = None,
    task: TaskInfo | None = None,
    what: str = "",
    *,
    base_model: str | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> SiloScore:
    """Score the silo's personalised model on `examples` (default: its own test split, as
    the run's final score)."""
    if examples is None or task is None:
        examples, task, what = own_test_split(run)
    training = run.training or TrainingConfig()
    config, tensors = personalise(run)
    model, tokenizer = build_personalised_model(config, tensors, base_model, device)
    value = score_task(model, tokenizer, examples, task, progress=progress,
                       **training.scoring_options())
    return SiloScore(run.silo_id, metric_name(task), value, len(examples), what)
