"""Norm bounding of updates: the bound, the norm of an update, clipping keeps direction."""

from __future__ import annotations

import math

import pytest
import torch

from fedsilo.sdk.aggregation.clipping import ClipSettings, clip_update, update_norm


def test_the_bound_is_a_multiple_of_the_median_capped_by_the_fixed_norm() -> None:
    norms = [1.0, 2.0, 3.0, 1e30]  # one silo far out cannot move the median
    assert ClipSettings(factor=5.0).bound(norms) == pytest.approx(12.5)
    assert ClipSettings(factor=5.0, norm=4.0).bound(norms) == 4.0
    assert ClipSettings(factor=0.0, norm=4.0).bound(norms) == 4.0
    assert ClipSettings(factor=0.0).bound(norms) is None
    assert ClipSettings().bound([]) is None


@pytest.mark.parametrize("field", ["factor", "norm"])
@pytest.mark.parametrize("value", [-1.0, math.inf, math.nan])
def test_settings_are_checked(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"{field} = .*>= 0"):
        ClipSettings(**{field: value})


def test_update_norm_counts_every_tensor_and_unsent_ones_whole() -> None:
    sent = {"a": torch.ones(2)}
    uploaded = {"a": torch.tensor([4.0, 1.0]), "b": torch.tensor([4.0])}
    assert update_norm(uploaded, sent) == pytest.approx(5.0)  # sqrt(3^2 + 0 + 4^2)


def test_clipping_scales_the_update_to_the_bound_and_keeps_its_direction() -> None:
    sent = {"a": torch.ones(2, dtype=torch.float32), "b": torch.zeros(1)}
    uploaded = {"a": torch.tensor([4.0, 1.0]), "b": torch.tensor([4.0])}
    clipped, scale = clip_update(uploaded, sent, bound=1.0)
    assert scale == pytest.approx(0.2)
    assert update_norm(clipped, sent) == pytest.approx(1.0, rel=1e-6)
    assert torch.allclose(clipped["a"], torch.tensor([1.6, 1.0]))
    assert torch.allclose(clipped["b"], torch.tensor([0.8]))
    assert clipped["a"].dtype == torch.float32
    same, scale = clip_update(uploaded, sent, bound=10.0)
    assert scale == 1.0 and all(torch.equal(same[k], uploaded[k]) for k in uploaded)
    assert clip_update(uploaded, sent, bound=None)[1] == 1.0
