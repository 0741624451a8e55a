"""A federation of real processes over the real broker: `fedsilo aggregator run` and three
`fedsilo agent start` subprocesses, checked against `fedsilo simulate`."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedsilo.cli.simulation import run_simulation


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The agents run with threads = 1; so does the reference simulation."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _global_params(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(root / "aggregator" / "global_params.safetensors"))


def test_three_agents_and_an_aggregator_match_simulate(deployment, one_thread) -> None:
    deployment.write()
    deployment.start_all()
    deployment.wait_all(timeout=300)

    summary = deployment.summary()
    reference = run_simulation(deployment.sim, run_dir=deployment.root / "sim")
    assert summary["per_silo"].keys() == set(deployment.silos)
    for silo, value in summary["per_silo"].items():
        ref = next(r.silos[silo].metric for r in reversed(reference.rounds)
                   if r.silos[silo].metric is not None)
        assert math.isclose(value, ref, abs_tol=1e-9), (silo, value, ref)
    params = _global_params(deployment.root)
    assert params.keys() == reference.final_params.keys()
    for key, value in params.items():
        assert torch.equal(value, reference.final_params[key]), key
    for silo in deployment.silos:
        assert (deployment.silo_dir(silo) / "adapter.safetensors").exists()
