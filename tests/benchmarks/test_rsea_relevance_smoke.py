"""`benchmarks/rsea_relevance.py` runs on the embedded model and data and reports sane
spreads (the script behind the accuracy finding in benchmarks/README.md)."""

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType


def test_rsea_relevance_smoke(
    tmp_path: Path, load_benchmark: Callable[[str], ModuleType]
) -> None:
    module = load_benchmark("rsea_relevance.py")
    out = tmp_path / "r.json"
    argv = ["--model", "builtin:tiny", "--data", "synthetic", "--silos", "3", "--experts", "4",
            "--max-examples", "4", "--out", str(out)]
    assert module.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["modules"] > 0 and report["git"]["commit"]
    assert 0.0 <= report["p_spread_mean"] <= 1.0
    assert 0.0 < report["p_entropy_normalised_mean"] <= 1.0 + 1e-9
    assert -1.0 <= report["client_embedding_cosine_mean"] <= 1.0 + 1e-9
