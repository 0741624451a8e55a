"""`benchmarks/overhead.py --profile smoke` runs end to end and writes sane results (to
tmp_path: the committed results under benchmarks/results/ are never touched), and its small
helpers do what they say."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

from fedsilo.sdk.schema import TensorSpec


@pytest.fixture(scope="module")
def bench(load_benchmark: Callable[[str], ModuleType]) -> ModuleType:
    return load_benchmark("overhead.py")


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_overhead_benchmark_smoke(
    bench: ModuleType, tmp_path: Path, snapshot_results: Callable[[], dict[str, bytes]]
) -> None:
    before = snapshot_results()
    assert bench.main(["--profile", "smoke", "--out", str(tmp_path)]) == 0
    assert snapshot_results() == before, "the smoke run must not write benchmarks/results/"

    report = json.loads((tmp_path / "overhead.json").read_text())
    assert report["benchmark"] == "overhead"
    assert "--profile smoke" in report["command"]
    assert report["git"]["commit"] and report["date"]
    for key in ("cpu_model", "cpu_count", "ram_GB", "python", "torch", "cryptography"):
        assert report["machine"][key], key

    sums = [c["summary"] for c in report["configs"]]
    assert [(s["method"], s["experts"]) for s in sums] == [
        ("fedit-ft", None), ("fedamole", 15), ("fedamole", 20), ("fedamole", 25),
        ("fedamole", 30)]
    for config in report["configs"]:
        s = config["summary"]
        for key in ("upload_MB", "download_MB", "raw_upload_MB", "train_s", "test_s",
                    "silo_round_peak_MB", "wall_s"):
            assert _positive(s[key]), (s["method"], s["experts"], key)
        assert math.isfinite(s["memory_MB"]) and s["memory_MB"] >= 0
        assert math.isfinite(s["aggregation_s"]) and s["aggregation_s"] >= 0
        # 3 silos x 1 training round, each message sealed: wire bytes exceed the raw tensors
        assert len(config["rows"]) == 3 and len(config["rounds"]) == 1
        for row in config["rows"]:
            assert row["wire_up"] > row["raw_up"] > 0
            assert row["wire_down"] > row["raw_down"] > 0
            assert row["seal_up_s"] > 0 and row["open_up_s"] > 0
    amole = [s for s in sums if s["method"] == "fedamole"]
    for s in amole:
        # b = ceil(E k_c / C) spreads the E k_c = 2E expert slots evenly over the 3 silos
        assert s["experts_per_silo_per_module"] == pytest.approx(2 * s["experts"] / 3)
        assert s["assignment_s"] > 0 and s["aggregation_s"] >= s["assignment_s"]
    ups = [s["upload_MB"] for s in amole]
    assert ups == sorted(ups) and ups[0] < ups[-1], "more experts per silo, larger uploads"
    assert all(s["upload_MB"] > sums[0]["upload_MB"] for s in amole)

    llama = {x["method"]: x for x in report["llama"]}
    assert set(llama) == {"fedit-ft", "fedamole"}
    for x in llama.values():
        assert x["silos_in_plan"] == 30 and x["silos_sealed"] == 2
        for row in x["per_silo"]:
            for d in ("up", "down"):
                assert row[f"raw_{d}"] < row[f"encoded_{d}"] < row[f"wire_{d}"]
                assert row[f"wire_{d}"] <= 1.02 * row[f"raw_{d}"]  # the 2 % target
    assert llama["fedamole"]["experts_per_silo_per_module"] == 2.0  # k_e each, 30 silos
    # LLaMA-3.2-1B shapes, r = 8, fp32: 2 experts + shared + router per module (12.32 MB) and
    # one LoRA per module (3.41 MB) in tensors alone
    assert llama["fedamole"]["raw_up_MB"] == pytest.approx(12.324, abs=0.001)
    assert llama["fedit-ft"]["raw_up_MB"] == pytest.approx(3.408, abs=0.001)
    assert llama["fedit-ft"]["raw_up_16bit_MB"] == pytest.approx(3.408 / 2, abs=0.001)
    assert report["targets"]["llama_within_target"] is True
    assert report["targets"]["upload_grows_with_E"] is True

    md = (tmp_path / "overhead.md").read_text()
    assert md.startswith("# System overhead benchmark")
    assert report["git"]["commit"] in md and "--profile smoke" in md
    assert "| FedAMoLE (E=30) |" in md and "| FedIT-FT |" in md and "12.52" in md
    assert "## Against the targets" in md and "target: within 2 %: met" in md
    png = tmp_path / "overhead.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_smoke_profile_refuses_to_write_the_committed_results(bench: ModuleType) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--profile", "smoke"])
    assert bench.parse_args([]).out == bench.RESULTS


def test_experts_cap_spreads_the_slots_evenly(bench: ModuleType) -> None:
    assert bench.experts_cap(30, 2, 3, 2) == 20
    assert bench.experts_cap(20, 2, 3, 2) == 14  # 40 slots: 14 + 13 + 13
    assert bench.experts_cap(30, 2, 30, 2) == 2
    assert bench.experts_cap(4, 1, 10, 2) == 2  # never below k_e


def test_overhead_and_zeros(bench: ModuleType) -> None:
    assert bench.overhead(102, 100) == pytest.approx(0.02)
    assert math.isnan(bench.overhead(10, 0))
    zeros = bench.zeros_for({"a": TensorSpec((2, 3), torch.float32),
                             "b": TensorSpec((4,), torch.bfloat16)})
    assert zeros["a"].shape == (2, 3) and zeros["b"].dtype == torch.bfloat16
    assert not zeros["a"].any()


def test_summarize_means_per_silo_per_round(bench: ModuleType) -> None:
    def row(up: int, train: float, peak: float) -> dict[str, float]:
        return {"experts_per_module": 2.0, "wire_up": up, "wire_down": 1_000_000,
                "raw_up": up - 1000, "raw_down": 999_000, "train_s": train, "test_s": 1.0,
                "peak_MB": peak, "seal_up_s": 0.1, "open_up_s": 0.2}

    rounds = [{"aggregation_s": 1.0, "fedavg_s": 0.25, "assignment_s": 0.75},
              {"aggregation_s": 3.0, "fedavg_s": 0.75, "assignment_s": 2.25}]
    s = bench.summarize([row(2_001_000, 2.0, 5.0), row(4_001_000, 4.0, 7.0)], rounds)
    assert s["upload_MB"] == pytest.approx(3.001) and s["download_MB"] == pytest.approx(1.0)
    assert s["raw_upload_MB"] == pytest.approx(3.0)
    assert s["wire_over_raw_up"] == pytest.approx(3.001 / 3.0)
    assert s["train_s"] == 3.0 and s["silo_round_peak_MB"] == 7.0
    assert s["aggregation_s"] == 2.0 and s["fedavg_s"] == 0.5 and s["assignment_s"] == 1.5


def test_sealed_transport_uses_each_partys_own_keys(bench: ModuleType, tmp_path: Path) -> None:
    from fedsilo.sdk.messages import RoundPlan, Upload

    transport = bench.SealedTransport(bench.make_codecs(tmp_path, ["silo-0", "silo-1"]))
    plan = RoundPlan(0, "silo-1", 1, 0.1, 1, {}, {"m.A": torch.ones(4, 4)})
    # Sealed for silo-1: silo-0's keys cannot open it (dead-lettered, counted).
    transport.inbox["silo-0"].deliver_plan("silo-0", transport.codecs["aggregator"].seal(plan))
    assert transport.receive_plan("silo-0") is None
    assert transport.rejected == {"recipient": 1}
    sent = transport.send_plan(plan)
    delivery = transport.receive_plan("silo-1")
    assert delivery is not None and delivery.size == sent
    assert torch.equal(delivery.message.params["m.A"], torch.ones(4, 4))
    upload = Upload(0, "silo-0", {"m.A": torch.zeros(4, 4)}, {"m.client": torch.ones(8)}, 3)
    transport.send_upload(upload)
    got = transport.receive_upload()
    assert got is not None and got.message.silo_id == "silo-0"
    record = transport.sent[("upload", 0, "silo-0")]
    assert record["raw"] == 4 * 16 + 4 * 8 and record["wire"] == got.size > record["raw"]
    assert record["open_s"] >= 0 and record["seal_s"] > 0
    assert transport.traffic.up == {"silo-0": got.size}
