"""`benchmarks/transport_limits.py` runs end to end against a real broker and writes sane
results (to tmp_path: the committed results under benchmarks/results/ are never touched)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "transport_limits.py"
RESULTS = REPO / "benchmarks" / "results"


def _snapshot() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in RESULTS.iterdir() if p.is_file()}


def test_transport_limits_smoke(broker_url: str, tmp_path: Path) -> None:
    before = _snapshot()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--profile", "smoke", "--url", broker_url,
         "--vhost", "url", "--total-mb", "8", "--chunk-mib", "1", "--publishers", "2",
         "--repeat", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert _snapshot() == before, "the smoke run must not write benchmarks/results/"
    report = json.loads((tmp_path / "transport_limits.json").read_text())
    assert report["benchmark"] == "transport_limits"
    assert "guest:guest" not in report["command"], "the password must be masked"
    codec = report["codec"]
    assert codec["sealed_mb"] > codec["upload_mb"] > 0
    for stage in ("encode", "decode", "seal", "open"):
        assert codec[stage]["mb_s"] > 0 and codec[stage]["seconds"] > 0
    cases = {(r["queue"], r["confirms"], r.get("publishers", 1)) for r in report["broker"]}
    assert cases == {("quorum", True, 1), ("quorum", False, 1), ("classic", True, 1),
                     ("quorum", True, 2)}
    for row in report["broker"]:
        assert row["publish_mb_s"] > 0
        if row.get("publishers", 1) == 1:
            assert row["get_mb_s"] > 0 and row["consume_mb_s"] > 0
    md = (tmp_path / "transport_limits.md").read_text()
    assert md.startswith("# Transport limits") and report["git"]["commit"] in md
    assert "| seal |" in md and "| quorum | each | 1 | 2 |" in md
