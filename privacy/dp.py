"""Differential privacy for the embeddings a silo uploads each FedAMoLE round.

Mechanism (the unit of privacy is one example, add/remove adjacency): per example, all its
vectors (every key, in sorted key order, flattened) are concatenated and clipped to L2 norm
`clip`, so one example moves the sum by at most `clip`; the clipped rows are summed, Gaussian
noise of std `noise_multiplier * clip` is added per coordinate, and the sum is divided by the
public count. One call is one release of a Gaussian mechanism with that noise multiplier.

The noise multiplier comes from opacus's accountants for the configured (epsilon, delta) over
the planned releases, composed with anything already spent (DP-SGD, earlier rounds), see
:func:`noise_multiplier_for` and :mod:`fedsilo.privacy.ledger`.

Noise is drawn from a generator seeded from OS entropy unless one is passed: training code
often seeds torch's global generator from the config, and noise a reader can regenerate
protects nothing. Pass a generator only in tests.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from fedsilo.privacy.ledger import ACCOUNTANTS, DP_SGD, EMBEDDINGS, Release, compose_epsilon

__all__ = [
    "EMBEDDING_SET_CHANGE",
    "DPConfig",
    "DPError",
    "DPSGDConfig",
    "NonFiniteValues",
    "clip_rows",
    "embeddings_release",
    "noise_multiplier_for",
    "private_mean",
    "private_sum",
    "secure_generator",
    "sensitivity",
]

#: Examples of the embedding set D_emb that adding or removing one record of a silo can
#: change: that record enters or leaves, and a floor or cap that binds passes one other
#: record on (`sdk.data.splits`; tested there). The DP unit is one record of the silo.
EMBEDDING_SET_CHANGE = 2
#: Each example's weight in the release's count coordinate, as a share of the clip bound.
COUNT_WEIGHT = 0.5
MAX_NOISE_MULTIPLIER = 1e6
_SIGMA_RTOL = 1e-3  # relative precision of the noise-multiplier search


class DPError(ValueError):
    """Infeasible or invalid DP settings; says which and what to change."""


class NonFiniteValues(DPError):
    """Values to release that are NaN or inf: the model diverged or the data is broken,
    not a privacy-budget problem. Nothing is released; embeddings are checked before they
    are charged (DP-SGD's charge for the round was made before training and stays)."""


@dataclass(frozen=True)
class DPSGDConfig:
    """Optional DP-SGD of the LoRA training; composes with the embedding releases."""

    enabled: bool = False
    noise_multiplier: float = 1.0
    clip: float = 1.0  # per-example gradient L2 bound

    def __post_init__(self) -> None:
        if not _is_real(self.noise_multiplier) or not 0 <= self.noise_multiplier < math.inf:
            raise DPError(
                f"dp.sgd.noise_multiplier must be finite and >= 0 (got "
                f"{self.noise_multiplier!r}); typical values are 0.5 to 2"
            )
        _check_clip("dp.sgd.clip", self.clip)


@dataclass(frozen=True)
class DPConfig:
    """The [dp] section of a silo's config."""

    enabled: bool = True
    epsilon: float = 8.0  # math.inf allowed: no noise
    delta: float = 1e-5
    clip: float = 1.0  # per-example embedding L2 bound
    accountant: Literal["rdp", "prv"] = "rdp"
    sgd: DPSGDConfig = field(default_factory=DPSGDConfig)

    def __post_init__(self) -> None:
        _check_budget(self.epsilon, self.delta, prefix="dp.")
        _check_clip("dp.clip", self.clip)
        _check_accountant(self.accountant)
        if not isinstance(self.sgd, DPSGDConfig):
            raise DPError(f"dp.sgd must be a DPSGDConfig (got {type(self.sgd).__name__})")
        if (
            self.enabled
            and self.sgd.enabled
            and self.sgd.noise_multiplier == 0
            and math.isfinite(self.epsilon)
        ):
            raise DPError(
                "dp.sgd.noise_multiplier = 0 gives DP-SGD no protection, which no finite "
                "dp.epsilon allows; set it > 0 (e.g. 1.0), disable dp.sgd, or set dp.epsilon = inf"
            )

    @property
    def adds_noise(self) -> bool:
        """Whether releases are noised (DP on with a finite budget)."""
        return self.enabled and math.isfinite(self.epsilon)


def secure_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from OS entropy, independent of torch's global seed."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def clip_rows(x: Tensor, clip: float) -> Tensor:
    """Each row of `x` (N, D) scaled down to L2 norm `clip` if above it; rows within are kept."""
    _check_clip("clip", clip)
    if x.ndim != 2:
        raise DPError(
            f"clip_rows expects a 2-D (examples, features) tensor, got shape "
            f"{tuple(x.shape)}; flatten each example first"
        )
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    if not bool(torch.isfinite(norms).all()):
        raise NonFiniteValues(
            "per-example values contain NaN or inf; fix the model or data producing them "
            "(they cannot be clipped)"
        )
    return x * (clip / norms.clamp(min=clip))


def private_sum(
    per_example: Mapping[str, Tensor],
    *,
    clip: float,
    noise_multiplier: float,
    records_changed: int = EMBEDDING_SET_CHANGE,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, Tensor], float]:
    """One Gaussian mechanism over per-example values {key: (N, ...)}: their clipped sum
    {key: (...)} float64 and their count, both noised.

    Each example contributes its vector (all keys concatenated) clipped to `clip`, and
    ``clip * COUNT_WEIGHT`` to a count coordinate. Adding or removing one record of the silo
    changes at most `records_changed` examples, so the release moves by at most
    ``sensitivity(clip, records_changed)`` in L2; every coordinate gets
    N(0, (noise_multiplier * that)^2). noise_multiplier 0: exact. `generator` must be a CPU
    generator; None draws from :func:`secure_generator`.
    """
    _check_clip("clip", clip)
    if not _is_real(noise_multiplier) or not 0 <= noise_multiplier < math.inf:
        raise DPError(f"noise_multiplier must be finite and >= 0 (got {noise_multiplier!r})")
    if not isinstance(records_changed, int) or records_changed < 1:
        raise DPError(f"records_changed must be an int >= 1 (got {records_changed!r})")
    if not per_example:
        raise DPError("private_mean got no values; pass at least one key of per-example tensors")
    keys = sorted(per_example)
    sizes = {key: (per_example[key].shape[0] if per_example[key].ndim else None) for key in keys}
    n = sizes[keys[0]]
    if n is None or any(size != n for size in sizes.values()):
        raise DPError(
            "every per-example tensor needs the same leading (example) dimension; got "
            + ", ".join(f"{key}: {size}" for key, size in sizes.items())
        )
    if n == 0:
        raise DPError("private_mean got 0 examples; the embedding set must not be empty")
    shapes = [tuple(per_example[key].shape[1:]) for key in keys]
    rows = torch.cat(
        [per_example[key].detach().to("cpu", torch.float64).reshape(n, -1) for key in keys],
        dim=1,
    )
    total = clip_rows(rows, clip).sum(dim=0)
    count = float(n) * clip * COUNT_WEIGHT
    if noise_multiplier > 0:
        gen = generator if generator is not None else secure_generator()
        std = noise_multiplier * sensitivity(clip, records_changed)
        total = total + torch.randn(total.shape, generator=gen, dtype=torch.float64) * std
        count += float(torch.randn((), generator=gen, dtype=torch.float64)) * std
    parts = total.split([math.prod(shape) for shape in shapes])
    sums = {key: part.reshape(shape) for key, part, shape in zip(keys, parts, shapes, strict=True)}
    return sums, count / (clip * COUNT_WEIGHT)


def sensitivity(clip: float, records_changed: int = EMBEDDING_SET_CHANGE) -> float:
    """L2 sensitivity of `private_sum`'s release: each changed example's row (its clipped
    vector and its count coordinate) has norm at most clip * sqrt(1 + COUNT_WEIGHT^2)."""
    return records_changed * clip * math.sqrt(1.0 + COUNT_WEIGHT**2)


def private_mean(
    per_example: Mapping[str, Tensor],
    *,
    clip: float,
    noise_multiplier: float,
    records_changed: int = EMBEDDING_SET_CHANGE,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The DP mean of per-example values {key: (N, ...)}: {key: (...)} float32 on the CPU:
    `private_sum`'s noisy sum over its noisy count (at least 1). Post-processing of one
    release: the count costs no budget of its own, and N itself is never released."""
    sums, count = private_sum(per_example, clip=clip, noise_multiplier=noise_multiplier,
                              records_changed=records_changed, generator=generator)
    return {key: (value / max(count, 1.0)).to(torch.float32) for key, value in sums.items()}


def noise_multiplier_for(
    epsilon: float,
    delta: float,
    *,
    releases: int,
    sample_rate: float = 1.0,
    accountant: str = "rdp",
    prior: Sequence[Release] = (),
) -> float:
    """The smallest noise multiplier keeping `prior` plus `releases` new releases at
    `sample_rate` within (epsilon, delta); 0.0 for epsilon inf.

    Binary search (to 0.1 % relative) on epsilon computed by the opacus accountant with the
    whole history, so the result is feasible under that accountant: epsilon <= target.
    """
    _check_budget(epsilon, delta)
    _check_accountant(accountant)
    if not isinstance(releases, int) or isinstance(releases, bool) or releases < 1:
        raise DPError(f"releases must be an int >= 1 (got {releases!r}): the planned rounds")
    if not _is_real(sample_rate) or not 0 < sample_rate <= 1:
        raise DPError(f"sample_rate must be in (0, 1] (got {sample_rate!r})")
    if math.isinf(epsilon):
        return 0.0
    history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in prior]
    before = compose_epsilon(history, delta, accountant)
    if before >= epsilon:
        kinds = {r.kind for r in prior}
        if kinds == {DP_SGD}:
            spender, fix = "DP-SGD alone spends", "raise dp.epsilon or dp.sgd.noise_multiplier"
        else:
            spender = f"earlier releases ({', '.join(sorted(kinds))}) already spend"
            fix = "raise dp.epsilon, or lower the DP-SGD spending (dp.sgd.noise_multiplier)"
        raise DPError(
            f"{spender} eps={before:.4g} at delta={delta:g}, leaving nothing of "
            f"dp.epsilon={epsilon:g} for {releases} embedding release(s); {fix}"
        )

    def fits(sigma: float) -> bool:
        entry = (sigma, float(sample_rate), releases)
        return compose_epsilon([*history, entry], delta, accountant) <= epsilon

    # Bracket [lo, hi] with fits(hi) and not fits(lo), starting at 1 and moving by factors
    # of 2 so the accountant is never asked about sigmas far from the answer.
    hi = 1.0
    if fits(hi):
        lo = hi / 2
        while fits(lo):
            hi, lo = lo, lo / 2
            if lo < 1e-6:  # epsilon so large that almost no noise is needed
                return hi
    else:
        lo, hi = hi, hi * 2
        while not fits(hi):
            lo, hi = hi, hi * 2
            if hi > MAX_NOISE_MULTIPLIER:
                raise DPError(
                    f"epsilon={epsilon:g} at delta={delta:g} over {releases} release(s) needs "
                    f"a noise multiplier above {MAX_NOISE_MULTIPLIER:g}; raise dp.epsilon or "
                    "plan fewer rounds"
                )
    while hi - lo > _SIGMA_RTOL * hi:
        mid = (lo + hi) / 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def embeddings_release(
    server_round: int, *, noise_multiplier: float, clip: float, sample_rate: float = 1.0
) -> Release:
    """The ledger entry for one round's :func:`private_mean` of the embeddings."""
    return Release(
        kind=EMBEDDINGS,
        round=server_round,
        noise_multiplier=float(noise_multiplier),
        sample_rate=float(sample_rate),
        steps=1,
        clip=float(clip),
    )


def _check_budget(epsilon: float, delta: float, *, prefix: str = "") -> None:
    if not _is_real(epsilon) or math.isnan(epsilon) or epsilon <= 0:
        raise DPError(
            f"{prefix}epsilon must be > 0 (got {epsilon!r}); use a budget such as 8 "
            "(smaller is more private), or inf to release without noise"
        )
    if not _is_real(delta) or not 0 < delta < 1:
        raise DPError(
            f"{prefix}delta must be in (0, 1) (got {delta!r}); use well below 1/(number of "
            "examples), e.g. 1e-5"
        )


def _check_clip(name: str, clip: float) -> None:
    if not _is_real(clip) or not 0 < clip < math.inf:
        raise DPError(f"{name} must be finite and > 0 (got {clip!r}); e.g. 1.0")


def _check_accountant(name: str) -> None:
    if name not in ACCOUNTANTS:
        raise DPError(f"unknown accountant {name!r}; use one of {', '.join(ACCOUNTANTS)}")


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
