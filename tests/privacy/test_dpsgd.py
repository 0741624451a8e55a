"""fedsilo.privacy.dpsgd: micro-batched DP-SGD checked by hand on a linear model."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from fedsilo.privacy.dp import DPError, DPSGDConfig
from fedsilo.privacy.dpsgd import dpsgd_release, private_gradients

TAIL = 1e-6


def _linear_problem(b: int = 5, d: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    y = torch.randn(b, generator=g, dtype=torch.float64) * 3
    w = torch.nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    losses = [lambda i=i: (x[i] @ w + bias - y[i]) ** 2 for i in range(b)]
    return x, y, w, bias, losses


def _per_example_grads_by_hand(x, y, w, bias) -> torch.Tensor:
    """d/d(w, b) of (w.x_i + b - y_i)^2 = 2 r_i (x_i, 1): (B, d + 1)."""
    with torch.no_grad():
        residual = x @ w + bias - y
        return 2 * residual[:, None] * torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)


def test_no_noise_and_huge_clip_is_the_ordinary_mean_gradient() -> None:
    x, y, w, bias, losses = _linear_problem()
    ((x @ w + bias - y) ** 2).mean().backward()
    expected = [w.grad.clone(), bias.grad.clone()]
    w.grad, bias.grad = torch.full_like(w, 99.0), None  # replaced, not accumulated
    private_gradients([w, bias], losses, clip=1e9, noise_multiplier=0.0)
    torch.testing.assert_close(w.grad, expected[0])
    torch.testing.assert_close(bias.grad, expected[1])


def test_tiny_clip_gives_each_example_norm_clip() -> None:
    x, y, w, bias, losses = _linear_problem()
    clip = 1e-3
    per_example = _per_example_grads_by_hand(x, y, w, bias)
    norms = per_example.norm(dim=1)
    assert (norms > clip).all()
    mean_norm = private_gradients([w, bias], losses, clip=clip, noise_multiplier=0.0)
    assert mean_norm == pytest.approx(norms.mean().item(), rel=1e-9)
    expected = (per_example / norms[:, None] * clip).mean(0)
    torch.testing.assert_close(torch.cat([w.grad, bias.grad[None]]), expected)
    # One example alone: its contribution has norm exactly clip.
    private_gradients([w, bias], losses[:1], clip=clip, noise_multiplier=0.0)
    assert torch.cat([w.grad, bias.grad[None]]).norm().item() == pytest.approx(clip, rel=1e-9)


def test_mixed_clip_clips_only_large_examples() -> None:
    x, y, w, bias, losses = _linear_problem(b=8, seed=4)
    per_example = _per_example_grads_by_hand(x, y, w, bias)
    norms = per_example.norm(dim=1)
    clip = float(norms.median())
    private_gradients([w, bias], losses, clip=clip, noise_multiplier=0.0)
    scale = (clip / norms).clamp(max=1.0)
    expected = (per_example * scale[:, None]).mean(0)
    torch.testing.assert_close(torch.cat([w.grad, bias.grad[None]]), expected)


def test_noise_std_is_sigma_clip_over_batch() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Linear(100, 100)
    params = list(model.parameters())
    batch, sigma, clip = 4, 1.3, 0.1
    xs, ys = torch.randn(batch, 100), torch.randn(batch, 100)
    losses = [lambda i=i: ((model(xs[i]) - ys[i]) ** 2).sum() for i in range(batch)]
    private_gradients(params, losses, clip=clip, noise_multiplier=0.0)
    exact = [p.grad.clone() for p in params]
    private_gradients(
        params,
        losses,
        clip=clip,
        noise_multiplier=sigma,
        generator=torch.Generator().manual_seed(5),
    )
    noise = torch.cat([(p.grad - e).double().flatten() for p, e in zip(params, exact, strict=True)])
    std, n = sigma * clip / batch, noise.numel()
    ratio = float((noise**2).sum()) / (n * std**2)
    assert stats.chi2.ppf(TAIL, n) / n < ratio < stats.chi2.isf(TAIL, n) / n
    assert abs(float(noise.mean())) < stats.norm.isf(TAIL) * std / math.sqrt(n)
    # The bound is tight enough to catch forgetting the 1/B: std sigma*clip is far outside.
    wrong = float((noise**2).sum()) / (n * (sigma * clip) ** 2)
    assert not stats.chi2.ppf(TAIL, n) / n < wrong < stats.chi2.isf(TAIL, n) / n


def test_unused_params_get_zero_gradients_and_constant_losses_count() -> None:
    used = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    unused = torch.nn.Parameter(torch.ones(3))
    losses = [lambda: (used**2).sum() / 2, lambda: torch.tensor(1.0)]
    private_gradients([used, unused], losses, clip=1.0, noise_multiplier=0.0)
    # Example 0: gradient (3, 4), norm 5 -> (0.6, 0.8); example 1: zero. Mean over 2.
    torch.testing.assert_close(used.grad, torch.tensor([0.3, 0.4]))
    torch.testing.assert_close(unused.grad, torch.zeros(3))


def test_errors() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(DPError, match="no examples"):
        private_gradients([p], [], clip=1.0, noise_multiplier=1.0)
    with pytest.raises(DPError, match="scalar"):
        private_gradients([p], [lambda: p * 2], clip=1.0, noise_multiplier=1.0)
    with pytest.raises(DPError, match="does not require grad"):
        private_gradients([torch.ones(2)], [lambda: p.sum()], clip=1.0, noise_multiplier=1.0)
    with pytest.raises(DPError, match="clip"):
        private_gradients([p], [lambda: p.sum()], clip=0.0, noise_multiplier=1.0)


def test_dpsgd_release() -> None:
    cfg = DPSGDConfig(enabled=True, noise_multiplier=1.2, clip=0.5)
    release = dpsgd_release(server_round=2, steps=40, batch_size=8, num_train=400, cfg=cfg)
    assert (release.kind, release.round, release.steps) == ("dp-sgd", 2, 40)
    assert (release.noise_multiplier, release.sample_rate, release.clip) == (1.2, 0.02, 0.5)
    with pytest.raises(DPError, match="disabled"):
        dpsgd_release(0, 1, 8, 400, DPSGDConfig())
    with pytest.raises(DPError, match="batch_size"):
        dpsgd_release(0, 1, 500, 400, cfg)
