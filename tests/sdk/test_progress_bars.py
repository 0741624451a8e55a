"""Third-party progress bars stay out of fedsilo's output, and the libraries' own settings
are left as the caller had them (sdk/progress_bars.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from fedsilo.sdk.models.loading import load_model
from fedsilo.sdk.progress_bars import quiet_progress_bars


def _hf_folder(folder: Path) -> Path:
    words = ["<unk>", "</s>", "a", "b"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, "<unk>")),
        unk_token="<unk>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=16, eos_token_id=1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_loading_a_model_draws_no_library_bars(tmp_path: Path,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    folder = _hf_folder(tmp_path / "m")
    capfd.readouterr()
    hf_logging.enable_progress_bar()
    load_model(str(folder))
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err, err
    assert hf_logging.is_progress_bar_enabled()  # the caller's setting is back


def test_the_caller_keeps_bars_off_when_it_turned_them_off() -> None:
    hf_logging.disable_progress_bar()
    try:
        with quiet_progress_bars():
            assert not hf_logging.is_progress_bar_enabled()
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


def test_the_gguf_readers_direct_tqdm_is_silenced_and_put_back(
        capfd: pytest.CaptureFixture[str]) -> None:
    gguf = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    original = gguf.tqdm
    with quiet_progress_bars(gguf=True):
        assert list(gguf.tqdm(range(3), desc="Converting and de-quantizing")) == [0, 1, 2]
    assert gguf.tqdm is original
    assert "Converting" not in capfd.readouterr().err


def test_datasets_bars_are_silenced_and_restored() -> None:
    ds_logging = pytest.importorskip("datasets.utils.logging")
    ds_logging.enable_progress_bar()
    with quiet_progress_bars():
        assert not ds_logging.is_progress_bar_enabled()
    assert ds_logging.is_progress_bar_enabled()
