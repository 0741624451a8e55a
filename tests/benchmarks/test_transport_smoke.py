"""`benchmarks/transport.py --smoke` runs end to end against a real broker and writes sane
results (to tmp_path: the committed results under benchmarks/results/ are never touched)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "transport.py"
RESULTS = REPO / "benchmarks" / "results"


def _snapshot() -> dict[str, bytes]:
    if not RESULTS.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in RESULTS.iterdir() if p.is_file()}


def test_transport_benchmark_smoke(broker_url: str, tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "transport.json", tmp_path / "transport.md"
    before = _snapshot()
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--smoke",
            "--url",
            broker_url,
            "--vhost",
            "url",  # the fixture's throw-away vhost; the fixture deletes it
            "--out-json",
            str(out_json),
            "--out-md",
            str(out_md),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert _snapshot() == before, "the smoke run must not write benchmarks/results/"

    report = json.loads(out_json.read_text())
    assert report["benchmark"] == "transport"
    assert report["ok"] is True
    assert "--smoke" in report["command"]
    assert "guest:guest" not in report["command"], "the password must be masked"
    assert report["git"]["commit"]
    for key in ("cpu_model", "cpu_count", "ram_GB", "rabbitmq", "python", "torch", "pika"):
        assert report["machine"][key], key
    payload = report["payload"]
    assert payload["wire_bytes"] > payload["raw_bytes"] > 0
    assert payload["overhead_pct"] == pytest.approx(
        100 * (payload["wire_bytes"] - payload["raw_bytes"]) / payload["raw_bytes"]
    )

    (run,) = report["runs"]
    assert run["silos"] == 3
    assert all(run["check"].values()), run["check"]
    assert run["wire_bytes"] == 3 * payload["wire_bytes"]
    assert run["wall_s"] > 0 and run["publish_s"] > 0
    assert run["throughput_MBps"] * run["wall_s"] * 1e6 == pytest.approx(run["wire_bytes"])
    assert run["aggregator_peak_rss_MB"] >= run["aggregator_baseline_rss_MB"] > 0
    assert len(run["aggregator_rss_after_fold_MB"]) == 3

    md = out_md.read_text()
    assert md.startswith("# Transport benchmark")
    assert report["git"]["commit"] in md
    assert "| 3 |" in md
