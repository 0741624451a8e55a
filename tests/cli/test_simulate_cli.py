"""`fedsilo simulate` end to end on the built-in model, and its errors."""

import json
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsilo.cli.main import app

runner = CliRunner()
QUICK = ["--silos", "3", "--rounds", "2", "--local-steps", "3", "--experts", "4",
         "--b", "3", "--examples-per-silo", "60", "--eval-limit", "8"]


def _invoke(args: list[str]):
    return runner.invoke(app, ["simulate", *args], catch_exceptions=False)


@pytest.mark.parametrize(
    "strategy", ["fedamole", "fedit", "fedit-ft", "fedlease", "fdlora", "local"]
)
def test_simulate_records_every_silos_metric(tmp_path: Path, strategy: str) -> None:
    extra = ["--warmup-rounds", "1"] if strategy == "fedlease" else []
    result = _invoke([*QUICK, *extra, "--strategy", strategy, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (run,) = tmp_path.iterdir()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0, 1, 2] and lines[-1]["final"]
    scored = [x for x in lines if any(s["metric"] is not None for s in x["silos"].values())]
    assert scored, "no round recorded a metric"
    for line in scored:
        assert set(line["silos"]) == {"silo-0", "silo-1", "silo-2"}
        assert all(0.0 <= s["metric"] <= 1.0 for s in line["silos"].values())
        assert all(s["bytes_up"] > 0 and s["bytes_down"] > 0 for s in line["silos"].values())
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["per_silo"]) == {"silo-0", "silo-1", "silo-2"}
    assert (run / "config.json").exists()
    assert len(list((run / "assignments").iterdir())) == 3
    for silo in ("silo-0", "silo-1", "silo-2"):
        adapter = (run / "silos" / silo / "adapter.safetensors").stat()
        assert adapter.st_size > 0 and stat.S_IMODE(adapter.st_mode) == 0o600  # private data
    assert "MTAL" in result.output


def test_fedamole_gives_silos_heterogeneous_architectures(tmp_path: Path) -> None:
    # 5 experts x k_c 2 = 10 slots over 4 silos with 2 <= count <= 3: counts must differ
    result = _invoke([*QUICK, "--silos", "4", "--experts", "5", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (run,) = tmp_path.iterdir()
    counts = set()
    for path in (run / "assignments").iterdir():
        for per_module in json.loads(path.read_text()).values():
            counts.update(len(ids) for ids in per_module.values())
    assert len(counts) > 1, f"every silo got the same number of experts: {counts}"
    assert max(counts) <= 3 and min(counts) >= 2  # b and k_e bound the counts


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--experts", "2", "--silos", "3"], "k_e"),
        (["--data", "/nonexistent/data.jsonl"], "/nonexistent/data.jsonl"),
        (["--model", "/nonexistent/model"], "/nonexistent/model"),
        (["--strategy", "magic"], "unknown strategy"),
        (["--assignment", "greedy"], "strategy.assignment"),
        (["--partition", "weird", "--data", "agnews"], "weird"),
        (["--strategy", "fedlease", "--warmup-rounds", "2"], "warmup_rounds = 2 leaves no"),
        (["--strategy", "fedlease", "--max-clusters", "1"], "strategy.max_clusters = 1"),
        (["--strategy", "fdlora", "--sync-every", "0"], "strategy.sync_every = 0"),
        (["--relevance", "cosine"], "strategy.relevance"),
        (["--temperature", "0"], "strategy.temperature"),
        (["--stickiness", "-1"], "strategy.stickiness"),
        (["--temperature", "inf"], "strategy.temperature"),
        (["--client-embedding", "before"], "strategy.client_embedding"),
        (["--data", "agnews,AGNEWS"], "more than once"),
    ],
)
def test_bad_input_gives_a_clear_error_not_a_traceback(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["simulate", *QUICK, *args])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in result.output
    assert "Traceback" not in result.output


def test_help_lists_the_knobs() -> None:
    result = runner.invoke(app, ["simulate", "--help"])
    assert result.exit_code == 0
    for flag in ("--silos", "--rounds", "--local-steps", "--experts", "--k-e", "--k-c",
                 "--b", "--strategy", "--data", "--partition", "--model", "--seed",
                 "--warmup-rounds", "--max-clusters", "--sync-every", "--relevance",
                 "--temperature", "--stickiness", "--client-embedding"):
        assert flag in result.output


def test_simulate_shows_learning_over_rounds(tmp_path: Path) -> None:
    """The embedded default must visibly learn: later rounds beat the first."""
    from fedsilo.simulation.engine import SimulationConfig, run_simulation

    config = SimulationConfig(silos=3, rounds=4, local_steps=15, examples_per_silo=150,
                              out_dir=str(tmp_path))
    result = run_simulation(config)
    mta = [r.mta for r in result.rounds if r.mta is not None]
    assert len(mta) == 4
    assert max(mta[1:]) > mta[0] + 0.05, mta
    assert result.mtal > 0.6, result.mtal  # chance is about 0.5 on these label pairs


def _own_data(tmp_path: Path, response_column: str) -> Path:
    rows = [{"q": f"say {w}", "a": w, "topic": t}
            for t, words in {"x": ["red", "blue"], "y": ["one", "two"]}.items()
            for w in words * 15]
    (tmp_path / "own.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    spec = tmp_path / "own.toml"
    spec.write_text(f'path = "own.jsonl"\nkind = "generation"\nresponse_column = '
                    f'"{response_column}"\nlabel_column = "topic"\n[columns]\ninstruction = "q"\n')
    return spec


def test_unknown_column_is_a_clear_error(tmp_path: Path) -> None:
    spec = _own_data(tmp_path, response_column="answer")
    result = runner.invoke(app, ["simulate", *QUICK, "--data", str(spec)])
    assert result.exit_code == 2, result.output
    assert "answer" in result.output and "available" in result.output


def test_generation_task_is_scored_with_rouge_l(tmp_path: Path) -> None:
    from fedsilo.simulation.engine import SimulationConfig, run_simulation

    spec = _own_data(tmp_path, response_column="a")
    config = SimulationConfig(
        silos=2, rounds=1, local_steps=2, num_experts=2, k_c=1, b=2, top_k=1, min_contributors=1,
        data=str(spec), partition="iid", examples_per_silo=30, max_new_tokens=8,
        out_dir=str(tmp_path / "runs"),
    )
    result = run_simulation(config)
    first = result.rounds[0]
    assert first.metric_name == "rouge-l"
    assert all(row.metric is not None and 0.0 <= row.metric <= 1.0
               for row in first.silos.values())


def test_mixed_data_gives_each_silo_its_own_data_set(tmp_path: Path) -> None:
    """--data a,b,c: silo i holds the (i mod 3)-th data set, scored on its own task; the
    run folder says which silo holds what."""
    result = _invoke([*QUICK, "--data", "agnews,sst2,snli", "--relevance", "standardised",
                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (run,) = tmp_path.iterdir()
    config = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    for record in (config["silo_data"], summary["silo_data"]):
        assert [record[f"silo-{i}"]["data"] for i in range(3)] == ["agnews", "sst2", "snli"]
        assert all(v["metric"] == "accuracy" for v in record.values())
    assert config["relevance"] == "standardised"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["metric"] == "accuracy"
    assert {"rsea_kept", "rsea_spread", "rsea_entropy"} <= set(lines[0]["aggregation"])
    assert set(summary["per_silo"]) == {"silo-0", "silo-1", "silo-2"}


def test_simulation_strategy_knobs_are_strategy_configs() -> None:
    """SimulationConfig's strategy fields are the strategy config classes' (same names and
    defaults but the smaller FedAMoLE pool), and `strategy_config()` passes the chosen
    strategy's own on, none of the others."""
    from dataclasses import fields

    from fedsilo.sdk.strategies import STRATEGIES, FDLoRAConfig, FedAMoLEConfig
    from fedsilo.simulation.config import STRATEGY_KNOBS, SimulationConfig

    sim = SimulationConfig()
    every = {f.name: f.default for spec in STRATEGIES.values() for f in fields(spec.config)
             if f.name != "name"}
    differ = {k for k in STRATEGY_KNOBS if getattr(sim, k) != every[k]}
    assert differ == {"num_experts", "b"}
    assert set(every) - set(STRATEGY_KNOBS) == {"solver_processes"}
    built = SimulationConfig(strategy="fdlora", sync_every=3, expert_init="mean").strategy_config()
    assert built == FDLoRAConfig(sync_every=3)
    assert SimulationConfig().strategy_config() == FedAMoLEConfig(num_experts=8, b=6)


def test_a_flag_the_chosen_strategy_does_not_read_is_named(tmp_path: Path) -> None:
    """One command line may serve every strategy, so the flags the chosen one ignores are
    named, not refused."""
    result = _invoke([*QUICK, "--rounds", "1", "--strategy", "fedit", "--sync-every", "2",
                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert ("note: --strategy fedit does not read --experts (a setting of fedamole), --b (a "
            "setting of fedamole), --sync-every (a setting of fdlora); they are ignored"
            ) in " ".join(result.output.split())
