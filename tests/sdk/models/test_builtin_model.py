import hashlib
import random
import subprocess
import sys

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


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.float().numpy().tobytes())
    return h.hexdigest()


def test_weights_identical_in_another_process() -> None:
    """Silos and the aggregator build the backbone in separate processes."""
    script = (
        "import hashlib, torch\n"
        "from fedsilo.sdk.models import builtin_model\n"
        "m, _ = builtin_model('tiny', seed=11)\n"
        "h = hashlib.sha256()\n"
        "for k, v in sorted(m.state_dict().items()):\n"
        "    h.update(k.encode()); h.update(v.float().numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    model, _ = builtin_model("tiny", seed=11)
    assert out.stdout.strip() == _digest(model)


POS = ["great", "happy", "love", "nice", "fun", "superb", "joy", "bright"]
NEG = ["awful", "sad", "hate", "ugly", "boring", "poor", "grim", "dull"]
NEU = ["the", "movie", "food", "day", "was", "it", "and", "plot"]
LABELS = [" good", " bad"]


def _toy_task(rng: random.Random, n: int) -> list[tuple[str, int]]:
    out = []
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.sample(POS if label == 0 else NEG, 2) + rng.sample(NEU, 2)
        rng.shuffle(words)
        out.append((f"sentiment: {' '.join(words)} ->", label))
    return out


def _answer_nll(model: torch.nn.Module, tok: ByteTokenizer, prompts, answers) -> torch.Tensor:
    """Mean NLL of each answer (+eos) given its prompt: the candidate-scoring rule."""
    rows = []
    for prompt, answer in zip(prompts, answers, strict=True):
        p = [tok.bos_token_id, *tok.encode(prompt)]
        a = [*tok.encode(answer), tok.eos_token_id]
        rows.append((p + a, [-100] * len(p) + a))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros_like(ids)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), target.clamp(min=0), reduction="none"
    )
    keep = (target != -100).float()
    return (nll * keep).sum(1) / keep.sum(1)


def _accuracy(model: torch.nn.Module, tok: ByteTokenizer, data) -> float:
    prompts = [p for p, _ in data]
    with torch.no_grad():
        scores = torch.stack([_answer_nll(model, tok, prompts, [a] * len(data)) for a in LABELS])
    gold = torch.tensor([y for _, y in data])
    return (scores.argmin(0) == gold).float().mean().item()


def test_qv_lora_can_learn_on_the_frozen_random_backbone() -> None:
    """Guards the init scale: with initializer_range 0.02 this stays near chance."""
    peft = pytest.importorskip("peft")
    model, tok = builtin_model("tiny", seed=0)
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = peft.get_peft_model(model, lora)
        train, test = _toy_task(random.Random(0), 1200), _toy_task(random.Random(1), 100)
        before = _accuracy(model, tok, test)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        model.train()
        for step in range(150):
            batch = train[step * 8 : step * 8 + 8]
            loss = _answer_nll(model, tok, [p for p, _ in batch], [LABELS[y] for _, y in batch])
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
        model.eval()
        after = _accuracy(model, tok, test)
    assert after >= 0.8, (before, after)
    assert after >= before + 0.15, (before, after)
