"""A silo's local model operations: the only place that runs the optimiser.

Strategies call these verbs (install, train, evaluate, embed, extract); the agent loop
never touches the model itself.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from fedsilo.sdk.adapters.inject import inject_adapters
from fedsilo.sdk.adapters.model import (
    assignment_of,
    extract_state,
    extract_trainable,
    fused_lora,
    load_trainable,
    module_shapes,
    routing_context,
    set_assignment,
)
from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.amole.model import (
    TokenSums,
    client_sums_from,
    embedding_sums,
    embeddings_to_tensors,
    load_balance,
    per_example_embedding_tensors,
    pooled_embeddings,
)
from fedsilo.sdk.data.examples import Example, SiloData
from fedsilo.sdk.data.tokenize import TrainStream, batches, encode_example
from fedsilo.sdk.evaluation.scoring import Progress, score_task
from fedsilo.sdk.messages import RoundPlan, Upload
from fedsilo.sdk.params import ModuleShape, TensorDict


class TrainingPrivacy(Protocol):
    """What training asks of a silo's differential privacy, declared here so that sdk
    needs nothing from the privacy package above it (fedsilo.privacy.silo.SiloPrivacy
    implements it; the agent or the simulation that builds the trainer hands one in)."""

    @property
    def protects_training(self) -> bool:
        """Whether released training runs DP-SGD (`private_gradients`)."""
        ...

    @property
    def protects_embeddings(self) -> bool:
        """Whether `embed` releases through `release_embeddings`."""
        ...

    def begin_round(self, server_round: int, total_rounds: int, local_steps: int,
                    batch_size: int, num_train: int) -> None:
        """Called by the silo's loop before each training round's plan runs."""
        ...

    def charge_training(self, steps: int, batch_size: int, num_train: int) -> None:
        """Charge a round's DP-SGD before it starts; raises to refuse it."""
        ...

    def private_gradients(self, params: Sequence[nn.Parameter],
                          example_losses: Sequence[Callable[[], Tensor]]) -> None:
        """Set each `p.grad` to the DP-SGD gradient of one batch, one closure per example."""
        ...

    def release_embeddings(self, per_example: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The noised mean of per-example embeddings, charged before it is returned."""
        ...


@dataclass(frozen=True)
class TrainingConfig:
    batch_size: int = 8
    max_length: int = 128
    eval_batch_size: int = 16
    max_new_tokens: int = 64
    grad_clip: float | None = 1.0
    eval_limit: int | None = None  # cap on test/val examples scored per round (None: all)
    curve_eval_limit: int | None = None
    """A lower cap for the scores before the final one (the per-round curve), so a long
    run can score its whole test split once at the end without paying for it every round.
    None: `eval_limit`."""
    report_val: bool = False
    """Also score the validation split with the final score (`val_metric`): what benchmarks
    tune on, since choosing settings on the test split would overstate the result."""
    scoring: str = "nll"
    """Classification: "nll" (mean NLL of each whole candidate, the paper's) or
    "first_token" (one forward per prompt; candidates must differ in their first token)."""

    def __post_init__(self) -> None:
        if self.scoring not in ("nll", "first_token"):
            raise ValueError(
                f"training.scoring = {self.scoring!r}; use 'nll' or 'first_token'"
            )
        for key in ("eval_limit", "curve_eval_limit"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"training.{key} = {value!r}; use an integer >= 1 or none")

    def scoring_options(self) -> dict[str, Any]:
        """`score_task`'s settings: a score recomputed later must batch and cut the same."""
        return {"scoring": self.scoring, "batch_size": self.eval_batch_size,
                "max_length": self.max_length, "max_new_tokens": self.max_new_tokens}


@dataclass
class TrainStats:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)


StepCallback = Callable[[int, int, float], None]


def stable_seed(*parts: object) -> int:
    """A seed that depends only on its parts, identical in every process (unlike hash())."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


class LocalTrainer:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        data: SiloData,
        adapter: AMoLEConfig,
        config: TrainingConfig | None = None,
        seed: int = 0,
        silo_id: str = "silo",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.data = data
        self.adapter = adapter
        self.config = config or TrainingConfig()
        self.seed = seed
        self.silo_id = silo_id
        self.layers = inject_adapters(model, adapter)
        self.device = next(model.parameters()).device
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id
        )
        encode = self._encode
        self._train = [encode(e) for e in data.train]
        self._emb = [encode(e) for e in (data.emb or data.train)]
        self._val: list[Any] | None = None  # validation_loss's batches, on first use
        self.on_step: StepCallback | None = None  # progress hook, set by the agent or CLI
        # Scoring's progress hook, (done, total) sequences: a long test split (greedy
        # decoding) would otherwise look like a hang.
        self.on_eval: Progress | None = None
        self.privacy: TrainingPrivacy | None = None  # differential privacy, set by the agent

    def _encode(self, example: Example):
        return encode_example(self.tokenizer, example, self.config.max_length)

    @property
    def num_train(self) -> int:
        return len(self.data.train)

    def shapes(self) -> dict[str, ModuleShape]:
        return module_shapes(self.model)

    def install(self, assignment: Mapping[str, Sequence[int]], params: TensorDict) -> None:
        """Take the plan's architecture and global tensors (missing ones are an error)."""
        set_assignment(self.model, {m: list(ids) for m, ids in assignment.items()})
        load_trainable(self.model, params, strict=True)

    def extract(self) -> TensorDict:
        """What the silo trained: the tensors an upload carries."""
        return extract_trainable(self.model)

    def state(self) -> TensorDict:
        """Every adapter tensor installed (trained or frozen): what a checkpoint restores."""
        return extract_state(self.model)

    @contextmanager
    def fused(self, adapters: Sequence[TensorDict], weights: Sequence[float]) -> Iterator[None]:
        """The model with sum_k w_k * adapter_k in place of its LoRA (FDLoRA's fusion)."""
        with fused_lora(self.model, adapters, weights):
            yield

    @torch.no_grad()
    def validation_loss(self, max_batches: int) -> float:
        """Mean training loss (NLL of the response tokens) over the first `max_batches`
        evaluation batches (`eval_batch_size` examples each) of the validation split (the
        training split if it has none)."""
        if self._val is None:  # encoded once: FDLoRA's fusion search asks several times
            self._val = [self._encode(e) for e in (self.data.val or self.data.train)]
        encoded = self._val
        losses = []
        was_training = self.model.training
        self.model.eval()
        try:
            for i, batch in enumerate(batches(encoded, self.config.eval_batch_size,
                                              self.pad_id)):
                if i >= max_batches:
                    break
                batch = self._to_device(batch)
                out = self.model(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"], labels=batch["labels"])
                losses.append(float(out.loss))
        finally:
            self.model.train(was_training)
        return sum(losses) / len(losses) if losses else float("nan")

    def assignment(self) -> dict[str, list[int]]:
        return assignment_of(self.model)

    def _to_device(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}

    def train(
        self, steps: int, lr: float, server_round: int, stream: str = "train",
        released: bool = True
    ) -> TrainStats:
        """`steps` Adam steps with a fresh optimiser (as the paper): NLL on response tokens
        plus beta * load balance. Batch order and dropout are seeded by (seed, silo, round,
        stream) alone, so a rerun of the round in another process repeats it exactly.
        `released=False` marks training whose result never leaves the silo (FDLoRA's
        personal adapter): DP-SGD does not apply to it and nothing is charged."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        stats = TrainStats(steps=steps, seconds=0.0)
        if steps <= 0 or not params:
            return stats
        private = released and self.privacy is not None and self.privacy.protects_training
        if private:
            assert self.privacy is not None
            self.privacy.charge_training(steps, self.config.batch_size, self.num_train)
        optimizer = torch.optim.Adam(params, lr=lr)
        self.model.train()
        start = time.perf_counter()
        round_seed = stable_seed(self.seed, self.silo_id, stream, server_round)
        stream = TrainStream(self._train, self.config.batch_size, self.pad_id, seed=round_seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(round_seed)
            for step in range(steps):
                batch = self._to_device(stream.next())
                optimizer.zero_grad(set_to_none=True)
                if private:
                    loss = self._private_step(params, batch)
                else:
                    loss = self._loss(batch)
                    loss.backward()
                    if self.config.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
                optimizer.step()
                stats.losses.append(float(loss.detach()))
                if self.on_step is not None:
                    self.on_step(step + 1, steps, stats.losses[-1])
        self.model.eval()
        stats.seconds = time.perf_counter() - start
        return stats

    def _loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        """NLL on response tokens plus beta * load balance."""
        mask = batch["attention_mask"]
        with routing_context(self.model, mask, record=True):
            out = self.model(
                input_ids=batch["input_ids"], attention_mask=mask, labels=batch["labels"]
            )
            loss = out.loss
            if self.adapter.use_router and self.adapter.lb_coef > 0:
                loss = loss + self.adapter.lb_coef * load_balance(self.model, mask)
        return loss

    def _private_step(self, params: list[nn.Parameter], batch: Mapping[str, Tensor]) -> Tensor:
        """DP-SGD gradients: one backward pass per example, clipped, summed, noised."""
        assert self.privacy is not None
        n = batch["input_ids"].shape[0]
        losses: list[Tensor] = []

        def example_loss(i: int) -> Callable[[], Tensor]:
            def closure() -> Tensor:
                loss = self._loss({k: v[i : i + 1] for k, v in batch.items()})
                losses.append(loss.detach())
                return loss

            return closure

        self.privacy.private_gradients(params, [example_loss(i) for i in range(n)])
        return torch.stack(losses).mean()

    def evaluate(self, split: str = "test", limit: int | None = None) -> float:
        """Accuracy (candidate scoring) for classification, Rouge-L F for generation, over
        the first `limit` examples of `split` (default `eval_limit`; None: all)."""
        return score_task(self.model, self.tokenizer, self._scored(split, limit),
                          self.data.task, progress=self.on_eval,
                          **self.config.scoring_options())

    def _scored(self, split: str, limit: int | None) -> list[Example]:
        """The examples `evaluate(split, limit)` scores."""
        if split not in ("test", "val"):
            raise ValueError(f"split {split!r}: a silo scores 'test' or 'val'")
        examples: list[Example] = self.data.val if split == "val" else self.data.test
        limit = self.config.eval_limit if limit is None else limit
        return examples if limit is None else examples[:limit]

    def test(self, final: bool = True) -> tuple[dict[str, float], dict[str, float]]:
        """The score on the local test split and its duration, as an upload reports them,
        with `test_n`, the number of test examples it is over (a score's weight: 0.5 of 8
        and 0.5 of 800 are not the same evidence). `final` marks the score that counts (the
        strategy knows which one it is): scored under `eval_limit` and, with `report_val`,
        joined by the validation score; the others under `curve_eval_limit`."""
        start = time.perf_counter()
        limit = None if final else self.config.curve_eval_limit
        metrics = {"metric": self.evaluate("test", limit),
                   "test_n": float(len(self._scored("test", limit)))}
        if final and self.config.report_val:
            metrics["val_metric"] = self.evaluate("val")
        # An empty split scores NaN: send no score rather than one the aggregator refuses.
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        return metrics, {"test_s": time.perf_counter() - start}

    def embedding_pass(self) -> dict[str, TokenSums]:
        """The model as it is now over the embedding set: what `embed` releases from."""
        loader = (
            self._to_device(b)
            for b in batches(self._emb, self.config.eval_batch_size, self.pad_id)
        )
        return embedding_sums(self.model, loader)

    def embed(self, client_from: dict[str, TokenSums] | None = None) -> TensorDict:
        """Client and expert embeddings (eq. 23, 25) on the embedding set, the client part
        from the earlier pass `client_from` when given; with DP, the clipped and noised mean
        of the per-example vectors (both passes in one vector: one release, charged)."""
        sums = self.embedding_pass()
        if client_from is not None:
            sums = client_sums_from(sums, client_from)
        if self.privacy is not None and self.privacy.protects_embeddings:
            return self.privacy.release_embeddings(per_example_embedding_tensors(sums))
        return embeddings_to_tensors(pooled_embeddings(sums))

    def upload(
        self,
        plan: RoundPlan,
        params: TensorDict | None = None,
        embeddings: TensorDict | None = None,
        metrics: dict[str, float] | None = None,
        timings: dict[str, float] | None = None,
    ) -> Upload:
        return Upload(
            round=plan.round,
            silo_id=plan.silo_id,
            params=params or {},
            embeddings=embeddings or {},
            n_samples=self.num_train,
            metrics=metrics or {},
            timings=timings or {},
        )

    def empty_upload(self, plan: RoundPlan) -> Upload:
        return self.upload(plan)
