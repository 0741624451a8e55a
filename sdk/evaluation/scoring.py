"""Model-facing evaluation: candidate scoring for classification, greedy decoding for generation.

The model is any Hugging Face-style causal LM: `model(input_ids=..., attention_mask=...,
position_ids=...)` returns an object with `.logits` (B, T, V), and optionally
`.past_key_values` when called with `use_cache=True`. The tokenizer needs
`encode(text, add_special_tokens=False)`, `decode(ids, skip_special_tokens=True)`,
`eos_token_id` and `pad_token_id` (None falls back to eos); `bos_token_id` only with
`add_bos=True`.

Tokenisation: prompt and answer are encoded separately and concatenated (prompt + answer +
EOS), so the answer's tokens do not depend on the prompt's last characters; prompts longer
than the budget lose their *left* part, answers are never truncated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .metrics import rouge_l_f

if TYPE_CHECKING:
    from fedsilo.sdk.data.examples import Example, TaskInfo

__all__ = [
    "Progress",
    "candidate_nll",
    "classification_accuracy",
    "first_token_accuracy",
    "generation_rouge_l",
    "greedy_generate",
    "score_task",
]

Progress = Callable[[int, int], None]
"""Called after each batch with (done, total) in the scorer's own units (sequences)."""


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """eval() for the duration, then every submodule gets back its own previous mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _special_ids(tokenizer: Any) -> tuple[int, int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; scoring needs one")
    pad = tokenizer.pad_token_id
    return int(eos), int(eos if pad is None else pad)


def _prompt_ids(tokenizer: Any, prompt: str, budget: int, add_bos: bool) -> list[int]:
    """The prompt's last `budget` tokens (bos first and kept, when asked for)."""
    ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    if add_bos:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
        ids = [int(bos), *(ids[len(ids) - (budget - 1) :] if budget > 1 else [])]
    else:
        ids = ids[max(0, len(ids) - budget) :]
    if not ids:
        raise ValueError(
            f"prompt {prompt[:40]!r} has no tokens to condition on; pass add_bos=True or a "
            f"non-empty prompt"
        )
    return ids


def _gold_indices(
    prompts: Sequence[str], answers: Sequence[str], candidates: Sequence[str]
) -> list[int]:
    """Each answer's index among the candidates, after checking the inputs fit together."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        raise ValueError("no examples to score")
    if len(set(candidates)) != len(candidates) or not candidates:
        raise ValueError(f"candidates must be non-empty and distinct, got {list(candidates)}")
    index = {c: k for k, c in enumerate(candidates)}
    missing = sorted({a for a in answers if a not in index})
    if missing:
        raise ValueError(f"answers {missing} are not among the candidates {list(candidates)}")
    return [index[a] for a in answers]


def _right_padded(
    seqs: Sequence[Sequence[int]], pad: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Token ids (B, T) right-padded with `pad`, and the attention mask, on `device`."""
    width = max(len(seq) for seq in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def _batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped by similar length (longest first), so padding stays small."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def candidate_nll(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    candidates: Sequence[str],
    batch_size: int = 8,
    max_length: int = 256,
    *,
    add_bos: bool = False,
    progress: Progress | None = None,
) -> Tensor:
    """Mean token NLL of each candidate (answer tokens + EOS) after each prompt, shape (N, K).

    All (prompt, candidate) pairs are batched with right padding and an attention mask; only
    the answer positions are scored, so padding never enters the mean.
    """
    eos, pad = _special_ids(tokenizer)
    answers = [[*tokenizer.encode(c, add_special_tokens=False), eos] for c in candidates]
    for cand, ids in zip(candidates, answers, strict=True):
        if len(ids) >= max_length:
            raise ValueError(
                f"candidate {cand[:40]!r} needs {len(ids)} tokens with EOS, leaving no room for "
                f"the prompt within max_length={max_length}; raise max_length"
            )
    seqs: list[list[int]] = []
    starts: list[int] = []
    for prompt in prompts:
        for ans in answers:
            ctx = _prompt_ids(tokenizer, prompt, max_length - len(ans), add_bos)
            seqs.append(ctx + ans)
            starts.append(len(ctx))
    device = _device(model)
    nll = torch.empty(len(seqs), dtype=torch.float32)
    done = 0
    with _eval_mode(model):
        for idx in _batches([len(s) for s in seqs], batch_size):
            ids, mask = _right_padded([seqs[i] for i in idx], pad, device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            for row, i in enumerate(idx):
                start, end = starts[i], len(seqs[i])
                # logits at t predict token t + 1
                pred = logits[row, start - 1 : end - 1].float()
                nll[i] = F.cross_entropy(pred, ids[row, start:end]).cpu()
            done += len(idx)
            if progress is not None:
                progress(done, len(seqs))
    return nll.view(len(prompts), len(candidates))


@torch.no_grad()
def classification_accuracy(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    candidates: Sequence[str],
    batch_size: int = 8,
    max_length: int = 256,
    *,
    add_bos: bool = False,
    progress: Progress | None = None,
) -> float:
    """Share of prompts whose lowest-NLL candidate is the gold answer (ALGORITHM.md: score
    prompt + answer + EOS by the mean NLL of the answer tokens, predict the argmin)."""
    gold = torch.tensor(_gold_indices(prompts, answers, candidates))
    nll = candidate_nll(
        model, tokenizer, prompts, candidates, batch_size, max_length, add_bos=add_bos,
        progress=progress,
    )
    return (nll.argmin(dim=1) == gold).float().mean().item()


@torch.no_grad()
def first_token_accuracy(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    candidates: Sequence[str],
    batch_size: int = 8,
    max_length: int = 256,
    *,
    add_bos: bool = False,
    progress: Progress | None = None,
) -> float:
    """Share of prompts whose gold answer's first token is the likeliest next token among
    the candidates' first tokens: one forward per prompt instead of one per candidate
    (K times cheaper than `classification_accuracy`; the CPU benchmark profiles use it).
    Needs candidates whose first tokens differ."""
    gold = _gold_indices(prompts, answers, candidates)
    firsts = []
    for cand in candidates:
        ids = tokenizer.encode(cand, add_special_tokens=False)
        if not ids:
            raise ValueError(f"candidate {cand!r} has no tokens")
        firsts.append(int(ids[0]))
    if len(set(firsts)) != len(firsts):
        raise ValueError(
            f"candidates {list(candidates)} share a first token: first-token scoring cannot "
            "tell them apart; use scoring = 'nll'"
        )
    _, pad = _special_ids(tokenizer)
    seqs = [_prompt_ids(tokenizer, p, max_length, add_bos) for p in prompts]
    device = _device(model)
    first_ids = torch.tensor(firsts, device=device)
    correct = done = 0
    with _eval_mode(model):
        for idx in _batches([len(s) for s in seqs], batch_size):
            ids, mask = _right_padded([seqs[i] for i in idx], pad, device)
            last = torch.tensor([len(seqs[i]) - 1 for i in idx], device=device)
            # Only the positions that predict an answer: the full (B, T, vocab) logits
            # would cost more than the forward pass itself on a CPU.
            keep = torch.unique(last)
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
            # a model that ignores logits_to_keep returns every position: index it directly
            column = torch.searchsorted(keep, last) if logits.shape[1] == len(keep) else last
            scores = logits[torch.arange(len(idx), device=device), column][:, first_ids]
            predicted = scores.argmax(dim=-1).tolist()
            correct += sum(int(p == gold[i]) for p, i in zip(predicted, idx, strict=True))
            done += len(idx)
            if progress is not None:
                progress(done, len(seqs))
    return correct / len(prompts)


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    max_length: int = 256,
    *,
    add_bos: bool = False,
    use_cache: bool = True,
    progress: Progress | None = None,
) -> list[str]:
    """Greedy (argmax) continuation of each prompt, stopped at EOS, decoded without specials.

    Why an own loop instead of `model.generate`: greedy is then exactly argmax, whatever the
    checkpoint's generation_config says (repetition penalties, sampling flags), and any
    module with the forward above works. Prompts are left-padded, with position ids from the
    attention mask so padding does not shift positions; the KV cache is used when the model
    returns one (`use_cache=False` recomputes the whole sequence each step: same result, slower).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos, pad = _special_ids(tokenizer)
    contexts = [_prompt_ids(tokenizer, p, max_length, add_bos) for p in prompts]
    device = _device(model)
    outputs: list[str] = [""] * len(prompts)
    done = 0
    with _eval_mode(model):
        for idx in _batches([len(c) for c in contexts], batch_size):
            width = max(len(contexts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(contexts[i]) :] = torch.tensor(contexts[i])
                mask[row, width - len(contexts[i]) :] = 1
            new = _greedy_batch(
                model, ids.to(device), mask.to(device), max_new_tokens, eos, pad, use_cache
            )
            for row, i in enumerate(idx):
                tokens = new[row].tolist()
                if eos in tokens:
                    tokens = tokens[: tokens.index(eos)]
                outputs[i] = tokenizer.decode(tokens, skip_special_tokens=True)
            done += len(idx)
            if progress is not None:
                progress(done, len(contexts))
    return outputs


def _greedy_batch(
    model: nn.Module,
    ids: Tensor,
    mask: Tensor,
    max_new_tokens: int,
    eos: int,
    pad: int,
    use_cache: bool,
) -> Tensor:
    """New tokens (B, <= max_new_tokens) for a left-padded batch; finished rows emit pad."""
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    kwargs: dict[str, Any] = {"use_cache": True} if use_cache else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
    past = getattr(out, "past_key_values", None) if use_cache else None
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    generated: list[Tensor] = []
    while True:
        nxt = out.logits[:, -1].argmax(dim=-1)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        generated.append(nxt)
        finished |= nxt == eos
        if bool(finished.all()) or len(generated) == max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        if past is not None:
            out = model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=positions[:, -1:],
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
        else:
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions)
    return torch.stack(generated, dim=1)


@torch.no_grad()
def generation_rouge_l(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    references: Sequence[str],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    max_length: int = 256,
    *,
    add_bos: bool = False,
    progress: Progress | None = None,
) -> float:
    """Mean Rouge-L F of greedy continuations (`greedy_generate`) against the references."""
    if len(prompts) != len(references):
        raise ValueError(f"{len(prompts)} prompts but {len(references)} references")
    if not prompts:
        raise ValueError("no examples to score")
    preds = greedy_generate(
        model, tokenizer, prompts, max_new_tokens, batch_size, max_length, add_bos=add_bos,
        progress=progress,
    )
    return sum(rouge_l_f(p, r) for p, r in zip(preds, references, strict=True)) / len(preds)


def score_task(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    task: TaskInfo,
    *,
    scoring: str = "nll",
    batch_size: int = 16,
    max_length: int = 256,
    max_new_tokens: int = 128,
    progress: Progress | None = None,
) -> float:
    """A silo's score on `examples`: accuracy by candidate scoring (`scoring` "nll" or
    "first_token") for classification, Rouge-L F of greedy decoding for generation; NaN
    for no examples. The one place silos (each round) and `fedsilo evaluate` score, so
    the two agree exactly."""
    if not examples:
        return math.nan
    prompts = [e.prompt for e in examples]
    answers = [e.response for e in examples]
    if task.kind == "classification":
        score = first_token_accuracy if scoring == "first_token" else classification_accuracy
        return score(model, tokenizer, prompts, answers, task.candidates,
                     batch_size=batch_size, max_length=max_length, progress=progress)
    return generation_rouge_l(model, tokenizer, prompts, answers,
                              max_new_tokens=max_new_tokens, batch_size=batch_size,
                              max_length=max_length, progress=progress)
