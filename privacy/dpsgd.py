"""DP-SGD for the LoRA training, by micro-batching.

Why micro-batching rather than opacus's per-sample-gradient hooks: a backward pass per example
gives that example's exact gradient for any layer type (LoRA-wrapped, routed experts,
quantised bases) with no hook coverage to get wrong, and the trainable LoRA parameters are few,
so the extra passes are affordable for cross-silo data sizes. Clipping bounds each example's
influence on the step to `clip`; the noise, std `noise_multiplier * clip` on the sum, makes one
step one subsampled Gaussian mechanism, accounted in the privacy ledger via
:func:`dpsgd_release`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fedsilo.privacy.dp import DPError, DPSGDConfig, NonFiniteValues, secure_generator
from fedsilo.privacy.ledger import DP_SGD, Release

__all__ = ["dpsgd_release", "private_gradients"]


def private_gradients(
    params: Sequence[torch.nn.Parameter],
    example_losses: Sequence[Callable[[], Tensor]],
    *,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
) -> float:
    """Set each `p.grad` to the DP-SGD gradient of one batch; returns the mean pre-clip norm.

    Per loss closure (one example each): the gradient of every param (unused ones count as
    zero), clipped as one concatenated vector to L2 norm `clip`, summed over examples;
    N(0, (noise_multiplier*clip)^2) per coordinate is added and the sum divided by the number
    of examples. Existing `.grad`s are replaced, not accumulated. `generator` None draws the
    noise from :func:`fedsilo.privacy.dp.secure_generator`.
    """
    params = list(params)
    if not _is_real(clip) or not 0 < clip < math.inf:
        raise DPError(f"DP-SGD clip must be finite and > 0 (got {clip!r}); e.g. 1.0")
    if not _is_real(noise_multiplier) or not 0 <= noise_multiplier < math.inf:
        raise DPError(f"DP-SGD noise_multiplier must be finite and >= 0 (got {noise_multiplier!r})")
    if not params:
        raise DPError("private_gradients got no parameters; pass the trainable (LoRA) ones")
    for i, p in enumerate(params):
        if not p.requires_grad:
            raise DPError(
                f"parameter {i} (shape {tuple(p.shape)}) does not require grad; pass only the "
                "trainable (LoRA) parameters"
            )
    if not example_losses:
        raise DPError("private_gradients got no examples; the batch must not be empty")

    acc_dtypes = [torch.promote_types(p.dtype, torch.float32) for p in params]
    sums = [torch.zeros_like(p, dtype=dtype) for p, dtype in zip(params, acc_dtypes, strict=True)]
    norms: list[Tensor] = []
    for i, loss_fn in enumerate(example_losses):
        loss = loss_fn()
        if loss.ndim != 0:
            raise DPError(
                f"example {i}'s loss closure returned shape {tuple(loss.shape)}; each closure "
                "must return one example's scalar loss"
            )
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        else:  # the loss does not depend on any parameter
            grads = (None,) * len(params)
        flat = [
            torch.zeros_like(s) if g is None else g.detach().to(s.dtype)
            for g, s in zip(grads, sums, strict=True)
        ]
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g).to(sums[0].device) for g in flat])
        )
        if not bool(torch.isfinite(norm)):
            raise NonFiniteValues(
                f"example {i} has a NaN or inf gradient; lower the learning rate or check the "
                "data (a non-finite gradient cannot be clipped)"
            )
        scale = clip / norm.clamp(min=clip)
        for s, g in zip(sums, flat, strict=True):
            s.add_(g * scale.to(s.device))
        norms.append(norm)

    count = len(example_losses)
    gen = generator
    if noise_multiplier > 0 and gen is None:
        gen = secure_generator(params[0].device)
    for p, s in zip(params, sums, strict=True):
        if noise_multiplier > 0:
            assert gen is not None
            noise = torch.randn(s.shape, generator=gen, dtype=s.dtype, device=gen.device)
            s.add_(noise.to(s.device), alpha=noise_multiplier * clip)
        p.grad = (s / count).to(p.dtype)
    return float(torch.stack(norms).mean())


def dpsgd_release(
    server_round: int, steps: int, batch_size: int, num_train: int, cfg: DPSGDConfig
) -> Release:
    """The ledger entry for one round's DP-SGD: `steps` steps at rate batch_size/num_train.

    The accountant assumes Poisson sampling at that rate; fixed-size shuffled batches are the
    usual approximation of it.
    """
    if not cfg.enabled:
        raise DPError("DP-SGD is disabled (dp.sgd.enabled = false); record no DP-SGD release")
    if not isinstance(batch_size, int) or not isinstance(num_train, int) or num_train < 1:
        raise DPError(
            f"batch_size and num_train must be ints with num_train >= 1 (got {batch_size!r}, "
            f"{num_train!r})"
        )
    if not 1 <= batch_size <= num_train:
        raise DPError(
            f"batch_size must be between 1 and num_train={num_train} (got {batch_size}); "
            "a batch cannot exceed the training set"
        )
    return Release(
        kind=DP_SGD,
        round=server_round,
        noise_multiplier=float(cfg.noise_multiplier),
        sample_rate=batch_size / num_train,
        steps=steps,
        clip=float(cfg.clip),
    )


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
