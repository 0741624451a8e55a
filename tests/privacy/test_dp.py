"""fedsilo.privacy.dp: clipping, the Gaussian release mechanism and the noise calibration.

Noise checks are statistical with fixed seeds; their bounds come from the sample size
(chi-square for the variance, normal for the mean) at a 1e-6 tail, so a wrong noise scale
(e.g. sigma instead of sigma*clip, or forgetting the count) fails them by a wide margin.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from scipy import stats

from fedsilo.privacy.dp import (
    COUNT_WEIGHT,
    EMBEDDING_SET_CHANGE,
    DPConfig,
    DPError,
    DPSGDConfig,
    clip_rows,
    embeddings_release,
    noise_multiplier_for,
    private_mean,
    private_sum,
    sensitivity,
)
from fedsilo.privacy.ledger import Release

pytestmark = [
    pytest.mark.filterwarnings("ignore:Optimal order is the"),  # opacus RDP, called directly
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),  # opacus PRV at q=1
]

TAIL = 1e-6


def _rdp_eps(history: list[tuple[float, float, int]], delta: float) -> float:
    acc = RDPAccountant()
    acc.history = history
    return acc.get_epsilon(delta=delta)


def assert_gaussian(samples: torch.Tensor, std: float) -> None:
    """Samples are N(0, std^2): chi-square bound on the variance, normal bound on the mean."""
    x = samples.double().flatten()
    n = x.numel()
    ratio = float((x**2).sum()) / (n * std**2)
    lo, hi = stats.chi2.ppf(TAIL, n) / n, stats.chi2.isf(TAIL, n) / n
    assert lo < ratio < hi, f"variance ratio {ratio:.4f} outside ({lo:.4f}, {hi:.4f}), n={n}"
    z = stats.norm.isf(TAIL)
    assert abs(float(x.mean())) < z * std / math.sqrt(n)


# --- clip_rows --------------------------------------------------------------------------


def test_clip_rows_scales_rows_above_the_bound_to_exactly_the_bound() -> None:
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [-6.0, 8.0]], dtype=torch.float64)
    out = clip_rows(x, 1.0)
    norms = out.norm(dim=1)
    assert norms[0].item() == pytest.approx(1.0, abs=1e-12)
    assert norms[3].item() == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(out[0], torch.tensor([0.6, 0.8], dtype=torch.float64))
    torch.testing.assert_close(out[3], torch.tensor([-0.6, 0.8], dtype=torch.float64))
    assert torch.equal(out[1], x[1])  # within the bound: unchanged, bit for bit
    assert torch.equal(out[2], x[2])  # zero rows stay zero (no 0/0)


def test_clip_rows_rejects_bad_input() -> None:
    with pytest.raises(DPError, match="2-D"):
        clip_rows(torch.ones(3), 1.0)
    with pytest.raises(DPError, match="clip must be finite and > 0"):
        clip_rows(torch.ones(2, 2), 0.0)
    with pytest.raises(DPError, match="NaN or inf"):
        clip_rows(torch.tensor([[1.0, math.nan]]), 1.0)


# --- private_mean -----------------------------------------------------------------------


def _examples(n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "m2.client": torch.randn(n, 4, generator=g) * 0.2,
        "m1.expert.3": torch.randn(n, 4, generator=g),
        "m1.client": torch.randn(n, 2, 3, generator=g) * 2.0,
    }


def _clipped_mean_by_hand(values: dict[str, torch.Tensor], clip: float, count: int):
    keys = sorted(values)  # m1.client, m1.expert.3, m2.client
    n = values[keys[0]].shape[0]
    out = {key: torch.zeros(values[key].shape[1:], dtype=torch.float64) for key in keys}
    for i in range(n):
        row = torch.cat([values[key][i].double().flatten() for key in keys])
        scale = min(1.0, clip / row.norm().item())
        for key in keys:
            out[key] += values[key][i].double() * scale
    return {key: value / count for key, value in out.items()}


def test_private_mean_without_noise_is_the_clipped_mean() -> None:
    values = _examples()
    clip = 4.5  # some examples are above it, some below
    norms = torch.cat([v.flatten(1) for _, v in sorted(values.items())], dim=1).norm(dim=1)
    assert (norms > clip).any() and (norms < clip).any()
    out = private_mean(values, clip=clip, noise_multiplier=0.0)
    expected = _clipped_mean_by_hand(values, clip, 6)
    assert list(out) == sorted(values)
    for key in values:
        assert out[key].dtype == torch.float32
        assert out[key].shape == values[key].shape[1:]
        torch.testing.assert_close(out[key], expected[key].float(), rtol=1e-6, atol=1e-7)


def test_private_mean_clips_the_concatenation_not_each_key() -> None:
    # Two keys each of norm 1 (within clip=1 separately); together norm sqrt(2) -> scaled.
    values = {"a": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([[0.0, 1.0]])}
    out = private_mean(values, clip=1.0, noise_multiplier=0.0)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(out["a"], torch.tensor([s, 0.0]))
    torch.testing.assert_close(out["b"], torch.tensor([0.0, s]))


def test_the_release_noise_has_std_sigma_times_the_sensitivity_and_zero_mean() -> None:
    n, clip, sigma = 5, 0.5, 1.7
    g = torch.Generator().manual_seed(1)
    values = {
        "big": torch.randn(n, 100, 60, generator=g),
        "small": torch.randn(n, 1500, generator=g),
    }
    exact, exact_count = private_sum(values, clip=clip, noise_multiplier=0.0)
    assert exact_count == n
    std = sigma * sensitivity(clip, EMBEDDING_SET_CHANGE)
    assert std == pytest.approx(sigma * 2 * clip * math.sqrt(1 + COUNT_WEIGHT**2))
    counts = []
    for seed in range(400):
        noisy, count = private_sum(values, clip=clip, noise_multiplier=sigma,
                                   generator=torch.Generator().manual_seed(seed))
        counts.append(count)
        if seed == 0:
            for key in values:  # each key gets its own noise of the full scale
                assert_gaussian(noisy[key] - exact[key], std)
    # the count coordinate is noised at the same scale, in units of clip * COUNT_WEIGHT
    assert_gaussian((torch.tensor(counts, dtype=torch.float64) - n) * clip * COUNT_WEIGHT, std)


def test_private_mean_noise_scale_is_checked_against_a_wrong_one() -> None:
    # The statistical check above must be able to fail: sigma * clip alone (forgetting
    # the two records one change can move, and the count coordinate) does.
    values = {"v": torch.zeros(3, 4000)}
    noisy, _ = private_sum(
        values, clip=0.5, noise_multiplier=1.0, generator=torch.Generator().manual_seed(3)
    )
    with pytest.raises(AssertionError, match="variance ratio"):
        assert_gaussian(noisy["v"], 0.5)


def test_one_record_added_or_removed_moves_the_release_within_its_sensitivity() -> None:
    """The accounting's assumption, end to end: split a silo, release its embedding set's
    clipped sum and count (no noise), then add or remove single records: the release moves
    by at most `sensitivity(clip)` (two examples of D_emb: one in, one out)."""
    from fedsilo.sdk.data import Example, SplitConfig, TaskInfo, split_silo

    task = TaskInfo("classification", ("a", "b"), "t")
    clip = 1.0

    def vector(example: Example) -> torch.Tensor:  # what the model would embed it as
        seed = int.from_bytes(example.prompt.encode()[-4:].rjust(4, b"\0"), "big")
        return torch.randn(8, generator=torch.Generator().manual_seed(seed)) * 2.0

    def release(examples: list[Example]) -> torch.Tensor:
        emb = split_silo(examples, task, np.random.default_rng(5), SplitConfig(emb_cap=6)).emb
        sums, count = private_sum({"v": torch.stack([vector(e) for e in emb])}, clip=clip,
                                  noise_multiplier=0.0)
        return torch.cat([sums["v"], torch.tensor([count * clip * COUNT_WEIGHT])])

    base = [Example(f"p{i}\n", "a" if i % 2 else "b", "a") for i in range(400)]
    before = release(base)
    moved = []
    for i in range(400):
        for neighbour in (base[:i] + base[i + 1:], [*base, Example(f"q{i}\n", "a", "a")]):
            moved.append(float((release(neighbour) - before).norm()))
    assert max(moved) <= sensitivity(clip, EMBEDDING_SET_CHANGE) + 1e-9
    assert max(moved) > sensitivity(clip, 1)  # the cap binds: one in, one out happens


def test_private_mean_seeded_generator_repeats_and_default_ignores_global_seed() -> None:
    values = _examples()
    a = private_mean(
        values, clip=1.0, noise_multiplier=1.0, generator=torch.Generator().manual_seed(7)
    )
    b = private_mean(
        values, clip=1.0, noise_multiplier=1.0, generator=torch.Generator().manual_seed(7)
    )
    for key in values:
        assert torch.equal(a[key], b[key])
    with torch.random.fork_rng():  # training code seeding torch must not fix the DP noise
        torch.manual_seed(0)
        c = private_mean(values, clip=1.0, noise_multiplier=1.0)
        torch.manual_seed(0)
        d = private_mean(values, clip=1.0, noise_multiplier=1.0)
    assert any(not torch.equal(c[key], d[key]) for key in values)


def test_private_mean_errors() -> None:
    with pytest.raises(DPError, match="no values"):
        private_mean({}, clip=1.0, noise_multiplier=1.0)
    with pytest.raises(DPError, match="same leading"):
        private_mean({"a": torch.ones(3, 2), "b": torch.ones(4, 2)}, clip=1.0, noise_multiplier=1)
    with pytest.raises(DPError, match="0 examples"):
        private_mean({"a": torch.ones(0, 2)}, clip=1.0, noise_multiplier=1.0)
    with pytest.raises(DPError, match="records_changed"):
        private_mean({"a": torch.ones(2, 2)}, clip=1.0, noise_multiplier=1.0, records_changed=0)
    with pytest.raises(DPError, match="noise_multiplier"):
        private_mean({"a": torch.ones(2, 2)}, clip=1.0, noise_multiplier=-1.0)


# --- noise_multiplier_for ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("epsilon", "delta", "releases", "rate"),
    [(8.0, 1e-5, 30, 1.0), (1.0, 1e-6, 10, 1.0), (2.0, 1e-5, 50, 0.1)],
)
def test_noise_multiplier_for_is_tight_and_feasible_under_opacus(
    epsilon: float, delta: float, releases: int, rate: float
) -> None:
    sigma = noise_multiplier_for(epsilon, delta, releases=releases, sample_rate=rate)
    assert _rdp_eps([(sigma, rate, releases)], delta) <= epsilon
    assert _rdp_eps([(sigma * 0.97, rate, releases)], delta) > epsilon
    reference = get_noise_multiplier(
        target_epsilon=epsilon, target_delta=delta, sample_rate=rate, steps=releases
    )
    assert 0.97 * reference < sigma <= reference * 1.001


def test_noise_multiplier_for_composes_with_prior_dpsgd() -> None:
    prior = [
        Release("dp-sgd", r, noise_multiplier=1.1, sample_rate=0.02, steps=100, clip=1.0)
        for r in range(10)
    ]
    alone = noise_multiplier_for(8.0, 1e-5, releases=10)
    sigma = noise_multiplier_for(8.0, 1e-5, releases=10, prior=prior)
    assert sigma > alone
    history = [(1.1, 0.02, 100)] * 10 + [(sigma, 1.0, 10)]
    assert _rdp_eps(history, 1e-5) <= 8.0
    history[-1] = (sigma * 0.97, 1.0, 10)
    assert _rdp_eps(history, 1e-5) > 8.0


def test_noise_multiplier_for_prv_is_feasible_under_opacus_prv() -> None:
    sigma = noise_multiplier_for(8.0, 1e-5, releases=5, accountant="prv")
    acc = PRVAccountant()
    acc.history = [(sigma, 1.0, 5)]
    assert acc.get_epsilon(delta=1e-5) <= 8.0
    acc.history = [(sigma * 0.97, 1.0, 5)]
    assert acc.get_epsilon(delta=1e-5) > 8.0


def test_noise_multiplier_for_infinite_epsilon_is_zero() -> None:
    assert noise_multiplier_for(math.inf, 1e-5, releases=100) == 0.0


def test_noise_multiplier_for_prior_over_budget_is_an_error() -> None:
    prior = [Release("dp-sgd", 0, noise_multiplier=0.5, sample_rate=1.0, steps=50, clip=1.0)]
    with pytest.raises(DPError, match=r"DP-SGD alone spends eps=\S+.*raise dp\.epsilon"):
        noise_multiplier_for(8.0, 1e-5, releases=10, prior=prior)
    unprotected = [embeddings_release(0, noise_multiplier=0.0, clip=1.0)]
    with pytest.raises(DPError, match="eps=inf"):
        noise_multiplier_for(8.0, 1e-5, releases=10, prior=unprotected)


def test_noise_multiplier_for_rejects_bad_arguments() -> None:
    with pytest.raises(DPError, match="epsilon must be > 0"):
        noise_multiplier_for(0.0, 1e-5, releases=1)
    with pytest.raises(DPError, match="delta must be in"):
        noise_multiplier_for(1.0, 1.0, releases=1)
    with pytest.raises(DPError, match="releases must be"):
        noise_multiplier_for(1.0, 1e-5, releases=0)
    with pytest.raises(DPError, match="sample_rate"):
        noise_multiplier_for(1.0, 1e-5, releases=1, sample_rate=0.0)
    with pytest.raises(DPError, match="unknown accountant"):
        noise_multiplier_for(1.0, 1e-5, releases=1, accountant="gdp")


# --- configs ----------------------------------------------------------------------------


def test_dp_config_defaults_and_adds_noise() -> None:
    cfg = DPConfig()
    assert cfg.adds_noise and cfg.accountant == "rdp" and not cfg.sgd.enabled
    assert not DPConfig(epsilon=math.inf).adds_noise
    assert not DPConfig(enabled=False).adds_noise


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": 0.0}, "dp.epsilon must be > 0"),
        ({"epsilon": math.nan}, "dp.epsilon must be > 0"),
        ({"delta": 0.0}, "dp.delta must be in"),
        ({"delta": 1.5}, "dp.delta must be in"),
        ({"clip": -1.0}, "dp.clip must be finite and > 0"),
        ({"accountant": "gdp"}, "unknown accountant 'gdp'"),
        ({"sgd": DPSGDConfig(enabled=True, noise_multiplier=0.0)}, "no protection"),
    ],
)
def test_dp_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(DPError, match=message):
        DPConfig(**kwargs)


def test_dpsgd_config_validation() -> None:
    with pytest.raises(DPError, match=r"dp\.sgd\.noise_multiplier"):
        DPSGDConfig(noise_multiplier=-0.1)
    with pytest.raises(DPError, match=r"dp\.sgd\.clip"):
        DPSGDConfig(clip=0)
    # Unprotected DP-SGD is allowed when the budget is infinite (DP effectively off).
    DPConfig(epsilon=math.inf, sgd=DPSGDConfig(enabled=True, noise_multiplier=0.0))


def test_embeddings_release() -> None:
    release = embeddings_release(3, noise_multiplier=2.5, clip=0.5)
    assert (release.kind, release.round, release.steps) == ("embeddings", 3, 1)
    assert release.sample_rate == 1.0
    assert (release.noise_multiplier, release.clip) == (2.5, 0.5)
