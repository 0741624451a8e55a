import pytest
import torch
from transformers import LlamaForCausalLM

from fedsilo.sdk.models import BUILTIN_MODELS, ByteTokenizer, builtin_model


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_same_seed_gives_identical_weights() -> None:
    m1, _ = builtin_model("tiny", seed=3)
    m2, _ = builtin_model("tiny", seed=3)
    assert _same_state(m1, m2)


def test_different_seed_gives_different_weights() -> None:
    m1, _ = builtin_model("tiny", seed=0)
    m2, _ = builtin_model("tiny", seed=1)
    assert not _same_state(m1, m2)


def test_weights_do_not_depend_on_global_rng() -> None:
    torch.manual_seed(123)
    m1, _ = builtin_model(seed=0)
    torch.manual_seed(456)
    m2, _ = builtin_model(seed=0)
    assert _same_state(m1, m2)


def test_building_leaves_global_rng_untouched() -> None:
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    builtin_model("tiny", seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_config_matches_tokenizer_and_model_is_ready() -> None:
    model, tok = builtin_model()
    assert isinstance(model, LlamaForCausalLM)
    assert isinstance(tok, ByteTokenizer)
    assert not model.training
    cfg = model.config
    assert cfg.vocab_size == tok.vocab_size
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    assert model.generation_config.pad_token_id == tok.pad_token_id
    # Init scale is what makes a frozen random backbone trainable through q/v adapters.
    assert cfg.initializer_range == BUILTIN_MODELS["tiny"]["initializer_range"]
    assert model.model.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(
        cfg.initializer_range, rel=0.1
    )


def test_forward_shape_and_generate() -> None:
    model, tok = builtin_model("nano")
    batch = tok(["sentiment: fun ->", "hi"])
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], tok.vocab_size)
    assert torch.isfinite(logits).all()
    tok.padding_side = "left"
    batch = tok(["abc", "a"])
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 6)


def test_dtype_is_applied() -> None:
    model, _ = builtin_model("nano", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_unknown_name_lists_available() -> None:
    with pytest.raises(ValueError, match="tiny"):
        builtin_model("huge")
