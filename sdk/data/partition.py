"""Split one data set across silos: Dirichlet label skew, one group per silo, or IID.

All functions take a `numpy.random.Generator` and return, per silo, the sorted indices of
its examples; the same generator state gives the same partition.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .examples import DataError

SCHEMES = ("dirichlet", "label", "iid")


def _check_silos(num_silos: int) -> None:
    if num_silos < 1:
        raise DataError(f"num_silos must be at least 1, got {num_silos}")


def _group_indices(groups: Sequence[object]) -> list[np.ndarray]:
    """Indices of each distinct group, groups in sorted order (stable across runs)."""
    keys = np.asarray(["" if g is None else str(g) for g in groups], dtype=object)
    return [np.flatnonzero(keys == k) for k in sorted(set(keys.tolist()))]


def dirichlet_partition(
    groups: Sequence[object],
    num_silos: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[list[int]]:
    """Per group, proportions over silos ~ Dir(alpha); resample until each silo >= min_size.

    As in the paper's code (NIID-Bench style): a silo that already holds its fair share
    (n / num_silos) gets no more of the next group, which keeps small alphas feasible.
    Small alpha -> each silo sees few groups; alpha ~100 -> close to IID.
    """
    _check_silos(num_silos)
    if alpha <= 0:
        raise DataError(f"Dirichlet alpha must be > 0, got {alpha}; the paper uses 0.1, 1, 100")
    n = len(groups)
    if n < num_silos * min_size:
        raise DataError(
            f"cannot give {num_silos} silos at least {min_size} examples each from {n} "
            f"examples (needs {num_silos * min_size}); use fewer silos, a smaller min_size "
            "or more data"
        )
    per_group = _group_indices(groups)
    best = 0
    for _ in range(max_tries):
        silos: list[list[int]] = [[] for _ in range(num_silos)]
        for idx in per_group:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_silos, alpha))
            sizes = np.array([len(s) for s in silos])
            p = p * (sizes < n / num_silos)
            if not p.sum() > 0:  # tiny alpha: all mass on full silos -> spread over the rest
                p = (sizes < n / num_silos).astype(float)
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for silo, part in zip(silos, np.split(idx, cuts), strict=True):
                silo.extend(part.tolist())
        smallest = min(len(s) for s in silos)
        if smallest >= min_size:
            return [sorted(s) for s in silos]
        best = max(best, smallest)
    raise DataError(
        f"no Dirichlet(alpha={alpha}) partition of {n} examples over {num_silos} silos gave "
        f"every silo >= {min_size} examples in {max_tries} tries (best smallest silo: {best}); "
        "raise alpha, lower min_size, use fewer silos or raise max_tries"
    )


def label_per_silo_partition(
    groups: Sequence[object], num_silos: int, rng: np.random.Generator
) -> list[list[int]]:
    """One group (task) per silo: the paper's feature-skew setting.

    Groups are shuffled, then: with at least as many groups as silos, silo i takes groups
    i, i + num_silos, ... (round robin, so some silos hold several); with fewer groups,
    silos are dealt to groups round robin and the silos sharing a group split its examples
    evenly at random.
    """
    _check_silos(num_silos)
    per_group = _group_indices(groups)
    if not per_group:
        raise DataError("cannot partition an empty data set")
    order = rng.permutation(len(per_group))
    per_group = [per_group[i] for i in order]
    silos: list[list[int]] = [[] for _ in range(num_silos)]
    if len(per_group) >= num_silos:
        for k, idx in enumerate(per_group):
            silos[k % num_silos].extend(idx.tolist())
    else:
        sharers: list[list[int]] = [[] for _ in per_group]
        for silo in range(num_silos):
            sharers[silo % len(per_group)].append(silo)
        for idx, members in zip(per_group, sharers, strict=True):
            if len(idx) < len(members):
                raise DataError(
                    f"a group with {len(idx)} example(s) cannot be split across "
                    f"{len(members)} silos; use fewer silos or another scheme"
                )
            for silo, part in zip(
                members, np.array_split(rng.permutation(idx), len(members)), strict=True
            ):
                silos[silo].extend(part.tolist())
    return [sorted(s) for s in silos]


def iid_partition(n: int, num_silos: int, rng: np.random.Generator) -> list[list[int]]:
    """A uniform random split into near-equal parts."""
    _check_silos(num_silos)
    if n < num_silos:
        raise DataError(f"cannot split {n} examples across {num_silos} silos; use fewer silos")
    return [sorted(p.tolist()) for p in np.array_split(rng.permutation(n), num_silos)]


def partition(
    groups: Sequence[object],
    num_silos: int,
    scheme: str,
    rng: np.random.Generator,
    alpha: float = 1.0,
    min_size: int = 10,
) -> list[list[int]]:
    """Dispatch on ``scheme``: "dirichlet" (over groups), "label" (one group per silo), "iid"."""
    if scheme == "dirichlet":
        return dirichlet_partition(groups, num_silos, alpha, rng, min_size=min_size)
    if scheme == "label":
        return label_per_silo_partition(groups, num_silos, rng)
    if scheme == "iid":
        return iid_partition(len(groups), num_silos, rng)
    raise DataError(f"unknown partition scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
