"""A silo's personalised model out of a real (tiny) `fedsilo simulate` run, for every
strategy: exported, loaded back as a Hugging Face causal LM, generating, and scoring
exactly what the run scored."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fedsilo.sdk.models.digest import weights_digest
from fedsilo.sdk.models.loading import load_model
from fedsilo.sdk.personalised import (
    PEFT_DIR,
    PersonalisedError,
    complete,
    evaluate_run,
    export_personalised,
    load_personalised,
    locate_silo_adapter,
    read_personalised_config,
    read_silo_run,
)
from fedsilo.simulation.engine import SimulationConfig, run_simulation

STRATEGIES = ("fedamole", "fedlease", "fedit", "fedit-ft", "fdlora", "local")
PLAIN_LORA = ("fedit", "fedit-ft", "fdlora", "local")
SILO = "silo-1"


def _config(strategy: str, root: Path) -> SimulationConfig:
    # 3 silos, 2 rounds (FedLEASE: one warm-up round, then its clustered experts)
    return SimulationConfig(silos=3, rounds=2, local_steps=6, strategy=strategy,
                            num_experts=3, b=3, warmup_rounds=1, examples_per_silo=80,
                            eval_limit=8, out_dir=str(root))


@pytest.fixture(scope="module")
def run_of(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The run folder of a tiny simulation with `strategy`, made once per module."""
    runs: dict[str, Path] = {}

    def make(strategy: str) -> Path:
        if strategy not in runs:
            root = tmp_path_factory.mktemp(strategy)
            runs[strategy] = run_simulation(_config(strategy, root)).run_dir
        return runs[strategy]

    return make


def _final_score(run: Path, silo: str) -> float:
    return json.loads((run / "summary.json").read_text())["per_silo"][silo]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_export_loads_generates_and_scores_as_the_run(
    strategy: str, run_of: Callable[[str], Path], tmp_path: Path
) -> None:
    run = run_of(strategy)
    exported = export_personalised(run, tmp_path / "out", SILO)
    config = read_personalised_config(tmp_path / "out")
    assert config == exported
    # self-describing: base model (with its digest), strategy, adapter, architecture
    assert config.strategy == strategy and config.silo_id == SILO
    base = load_model("builtin:tiny", seed=0).model
    assert config.base_model.source == "builtin:tiny"
    assert config.base_model.digest == weights_digest(base)
    with safe_open(str(run / "silos" / SILO / "adapter.safetensors"), "pt") as handle:
        saved = json.loads(handle.metadata()["assignment"])
    assert config.assignment == saved
    assert config.prompt is not None and config.prompt.candidates == ("good", "bad", "warm",
                                                                      "cool")
    assert config.fedsilo_version and config.round == 2
    assert (tmp_path / "out" / PEFT_DIR).is_dir() == (strategy in PLAIN_LORA)
    if strategy == "fdlora":  # the fused model: shared and personal stacked, rank 2r
        assert config.adapter.r == 16 and config.adapter.alpha == 32.0
        assert set(config.details["fusion"]["weights"]) == {"shared", "personal"}
    else:
        assert config.adapter.r == 8 and config.adapter.alpha == 16.0

    model, tokenizer = load_personalised(tmp_path / "out")
    from transformers import PreTrainedModel

    assert isinstance(model, PreTrainedModel) and not model.training
    prompt = config.prompt.render("topic: gift")
    assert prompt == "topic: gift\n"
    greedy = complete(model, tokenizer, prompt, max_new_tokens=6)
    assert greedy, "greedy decoding produced nothing beyond the prompt"
    assert complete(model, tokenizer, prompt, max_new_tokens=6) == greedy
    drawn = [complete(model, tokenizer, prompt, max_new_tokens=6, sample=True, seed=s,
                      temperature=1.5) for s in (1, 1, 2)]
    assert drawn[0] == drawn[1]
    # model.generate itself, batched: left padding, the stops of training
    batch = tokenizer([prompt, config.prompt.render("review: film was great")],
                      return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    first = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert first == greedy

    score = evaluate_run(read_silo_run(locate_silo_adapter(run, SILO)[0]))
    assert score.metric == "accuracy" and score.examples == 8
    assert score.value == _final_score(run, SILO)  # exactly, not approximately


@pytest.mark.parametrize("strategy", PLAIN_LORA)
def test_peft_folder_gives_the_same_logits(
    strategy: str, run_of: Callable[[str], Path], tmp_path: Path
) -> None:
    from peft import PeftModel

    export_personalised(run_of(strategy), tmp_path / "out", SILO, merged=strategy == "fdlora")
    ours, tokenizer = load_personalised(tmp_path / "out")
    batch = tokenizer(["topic: gift\n", "colour: car is teal\n"], return_tensors="pt")
    with torch.no_grad():
        expected = ours(**batch).logits
        base = load_model("builtin:tiny", seed=0).model
        assert not torch.allclose(base(**batch).logits, expected, atol=1e-3)  # adapted
        peft = PeftModel.from_pretrained(base, str(tmp_path / "out" / PEFT_DIR)).eval()
        torch.testing.assert_close(peft(**batch).logits, expected, atol=1e-5, rtol=0)
    if strategy == "fdlora":
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "merged")).eval()
        with torch.no_grad():
            torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-4, rtol=0)


def test_routed_strategies_refuse_merging(run_of: Callable[[str], Path],
                                          tmp_path: Path) -> None:
    with pytest.raises(PersonalisedError, match="plain-LoRA"):
        export_personalised(run_of("fedamole"), tmp_path / "out", SILO, merged=True)
    assert not (tmp_path / "out").exists()


def test_another_base_model_is_refused(run_of: Callable[[str], Path], tmp_path: Path) -> None:
    export_personalised(run_of("fedit"), tmp_path / "out", SILO)
    with pytest.raises(PersonalisedError, match="digest"):
        load_personalised(tmp_path / "out", base_model="builtin:nano")


def test_an_adapter_without_its_record_says_what_is_missing(
    run_of: Callable[[str], Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    source = run_of("fedit") / "silos" / SILO / "adapter.safetensors"
    with safe_open(str(source), "pt") as handle:
        meta = handle.metadata()
    old = tmp_path / "adapter.safetensors"  # as fedsilo wrote it before it recorded more
    save_file(load_file(str(source)), str(old),
              {k: meta[k] for k in ("silo_id", "round", "assignment")})
    with pytest.raises(PersonalisedError, match="strategy, adapter, base_model"):
        read_silo_run(old)
    with pytest.raises(PersonalisedError, match="neither"):
        locate_silo_adapter(tmp_path / "..")


def test_export_refuses_to_overwrite_without_force(run_of: Callable[[str], Path],
                                                   tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(PersonalisedError, match="--force"):
        export_personalised(run_of("local"), tmp_path / "out", SILO)
    export_personalised(run_of("local"), tmp_path / "out", SILO, force=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"  # only its own files go
    assert read_personalised_config(tmp_path / "out").strategy == "local"
