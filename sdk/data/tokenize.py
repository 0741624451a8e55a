"""Examples -> token ids with response-only loss, padding, and batch streams.

Works with any tokenizer offering ``encode(text, add_special_tokens=False)``,
``eos_token_id`` and ``pad_token_id`` (Hugging Face tokenizers and fedsilo's byte tokenizer).
Prompt and response are encoded separately (see `templates` for why that is safe), so the
loss mask falls exactly on the response tokens, and candidate scoring can reuse
`encode_example` for each candidate answer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .examples import DataError, Example

IGNORE_INDEX = -100


@dataclass
class EncodedExample:
    """Token ids of prompt + response + EOS; labels are -100 over the prompt."""

    input_ids: list[int]
    labels: list[int]


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, or its EOS id when it has none (common for causal LMs)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return eos_id(tokenizer) if pad is None else int(pad)


def eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError(
            f"tokenizer {type(tokenizer).__name__} has no eos_token_id; the response must end "
            "with EOS so the model learns to stop; set tokenizer.eos_token"
        )
    return int(eos)


def encode_example(tokenizer: Any, example: Example, max_length: int) -> EncodedExample:
    """Encode with loss on the response and EOS only.

    Over-long inputs lose the start of the prompt (the end, next to the answer, matters most);
    the response is cut from the right only if it alone exceeds ``max_length``.
    """
    if max_length < 1:
        raise DataError(f"max_length must be at least 1, got {max_length}")
    prompt = list(tokenizer.encode(example.prompt, add_special_tokens=False))
    response = [*tokenizer.encode(example.response, add_special_tokens=False), eos_id(tokenizer)]
    response = response[:max_length]
    budget = max_length - len(response)
    prompt = prompt[len(prompt) - budget :] if budget > 0 else []
    return EncodedExample(
        input_ids=prompt + response, labels=[IGNORE_INDEX] * len(prompt) + response
    )


def encode_examples(
    tokenizer: Any, examples: Sequence[Example], max_length: int
) -> list[EncodedExample]:
    return [encode_example(tokenizer, e, max_length) for e in examples]


def collate(batch: Sequence[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: input_ids, attention_mask, labels (-100 on padding)."""
    if not batch:
        raise DataError("cannot collate an empty batch")
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(batch):
        if len(e.input_ids) != len(e.labels):
            raise DataError(
                f"encoded example {row} has {len(e.input_ids)} ids but {len(e.labels)} labels; "
                "build it with encode_example"
            )
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(
    encoded: Sequence[EncodedExample], batch_size: int, pad_token_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches in order, the last one possibly smaller (for evaluation)."""
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(encoded), batch_size):
        yield collate(encoded[start : start + batch_size], pad_token_id)


class TrainStream:
    """Endless shuffled training batches, reshuffled every epoch, seeded.

    Why batches never wrap across epochs: a batch then never holds one example twice. An
    epoch's incomplete tail is dropped (a different tail each epoch, so nothing is left out
    for long); a data set smaller than ``batch_size`` gives whole-set batches.
    """

    def __init__(
        self,
        encoded: Sequence[EncodedExample],
        batch_size: int,
        pad_token_id: int,
        seed: int = 0,
    ) -> None:
        if not encoded:
            raise DataError("cannot train on an empty data set; check the silo's train split")
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        self._encoded = list(encoded)
        self.batch_size = min(batch_size, len(self._encoded))
        self.pad_token_id = pad_token_id
        self._rng = np.random.default_rng(seed)
        self._queue: list[int] = []
        self.epoch = 0

    def next(self) -> dict[str, torch.Tensor]:
        if len(self._queue) < self.batch_size:
            self._queue = self._rng.permutation(len(self._encoded)).tolist()
            self.epoch += 1
        chosen, self._queue = self._queue[: self.batch_size], self._queue[self.batch_size :]
        return collate([self._encoded[i] for i in chosen], self.pad_token_id)

    def take(self, steps: int) -> Iterator[dict[str, torch.Tensor]]:
        """``steps`` batches, e.g. one round's ``local_steps``."""
        for _ in range(steps):
            yield self.next()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next()
