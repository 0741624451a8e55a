"""Candidate scoring and greedy generation with a scripted fake LM and a tiny random Llama."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fedsilo.sdk.evaluation import (
    candidate_nll,
    classification_accuracy,
    first_token_accuracy,
    generation_rouge_l,
    greedy_generate,
)

PAD, EOS, BOS = 128, 129, 130
VOCAB = 131


class CharTokenizer:
    """ASCII characters as ids 0..127; 128 pad, 129 eos, 130 bos."""

    pad_token_id = PAD
    eos_token_id = EOS
    bos_token_id = BOS

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [ord(ch) for ch in text]
        return [BOS, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) if i < 128 else ("" if skip_special_tokens else "#") for i in ids)


class ScriptedLM(nn.Module):
    """Causal toy LM: logits = 20 * one-hot(script[last token]) + a small causal, masked
    context term (mean embedding of the attended tokens so far). The context term makes the
    output depend on what the attention mask lets through, as in a real model."""

    def __init__(self, script: dict[str, str | int]) -> None:
        super().__init__()
        table = torch.zeros(VOCAB, VOCAB)
        for src, dst in script.items():
            table[ord(src), dst if isinstance(dst, int) else ord(dst)] = 20.0
        self.register_buffer("table", table)
        self.context = nn.Embedding(VOCAB, VOCAB)
        with torch.no_grad():
            self.context.weight.copy_(
                torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0))
            )
        self.seen_training: list[bool] = []

    def forward(self, input_ids, attention_mask, **_: object) -> SimpleNamespace:
        self.seen_training.append(self.training)
        m = attention_mask.unsqueeze(-1).float()
        ctx = (self.context(input_ids) * m).cumsum(1) / m.cumsum(1).clamp(min=1)
        return SimpleNamespace(logits=self.table[input_ids] + ctx)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matmuls run faster on one thread, and much faster when other jobs share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tok() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture
def lm() -> ScriptedLM:
    # '?' -> "yes</s>", ':' -> "no</s>", '=' -> "hi</s>", 'a' <-> 'b' loops forever
    return ScriptedLM(
        {
            "?": "y",
            "y": "e",
            "e": "s",
            "s": EOS,
            ":": "n",
            "n": "o",
            "o": EOS,
            "=": "h",
            "h": "i",
            "i": EOS,
            "a": "b",
            "b": "a",
        }
    )


def test_classification_picks_scripted_answer(lm: ScriptedLM, tok: CharTokenizer) -> None:
    prompts = ["is it?", "it is:", "Q?", "Q:"]
    answers = ["yes", "no", "yes", "yes"]  # the last gold label disagrees with the model
    acc = classification_accuracy(lm, tok, prompts, answers, ["yes", "no", "maybe"], batch_size=5)
    assert acc == pytest.approx(3 / 4)
    nll = candidate_nll(lm, tok, prompts, ["yes", "no", "maybe"], batch_size=5)
    assert nll.shape == (4, 3)
    assert nll.argmin(dim=1).tolist() == [0, 1, 0, 1]


def test_first_token_scoring_reads_one_forward_per_prompt(
    lm: ScriptedLM, tok: CharTokenizer
) -> None:
    prompts = ["is it?", "it is:", "Q?", "Q:", "a longer prompt, padded in its batch?"]
    answers = ["yes", "no", "yes", "yes", "yes"]  # the fourth disagrees with the model
    calls = len(lm.seen_training)
    acc = first_token_accuracy(lm, tok, prompts, answers, ["yes", "no", "maybe"], batch_size=2)
    assert acc == pytest.approx(4 / 5)
    assert len(lm.seen_training) - calls == 3  # ceil(5 / 2) forwards, not 5 x 3
    # the same verdicts as whole-candidate NLL scoring, for this model
    assert acc == pytest.approx(
        classification_accuracy(lm, tok, prompts, answers, ["yes", "no", "maybe"])
    )


def test_first_token_scoring_needs_distinct_first_tokens(
    lm: ScriptedLM, tok: CharTokenizer
) -> None:
    with pytest.raises(ValueError, match=r"share a first token.*scoring = 'nll'"):
        first_token_accuracy(lm, tok, ["x?"], ["no"], ["no", "nope"])
    with pytest.raises(ValueError, match="not among the candidates"):
        first_token_accuracy(lm, tok, ["x?"], ["perhaps"], ["yes", "no"])


def test_padding_does_not_change_nll(lm: ScriptedLM, tok: CharTokenizer) -> None:
    prompts = ["a much longer prompt that forces padding?", "x:", "mid length ="]
    candidates = ["yes", "no", "a longer candidate"]
    batched = candidate_nll(lm, tok, prompts, candidates, batch_size=9)
    for i, p in enumerate(prompts):
        for k, c in enumerate(candidates):
            alone = candidate_nll(lm, tok, [p], [c], batch_size=1)
            torch.testing.assert_close(batched[i, k], alone[0, 0])


def test_nll_is_mean_over_answer_and_eos(tok: CharTokenizer) -> None:
    lm = ScriptedLM({})
    lm.context.weight.data.zero_()  # uniform logits everywhere
    nll = candidate_nll(lm, tok, ["p"], ["ab", "abcdef"])
    torch.testing.assert_close(nll, torch.full((1, 2), float(torch.log(torch.tensor(VOCAB)))))


def test_eos_is_scored(lm: ScriptedLM, tok: CharTokenizer) -> None:
    # "n" is a prefix of "no": only the EOS after it tells them apart
    nll = candidate_nll(lm, tok, ["Q:"], ["n", "no"])
    assert nll[0, 0] > nll[0, 1] + 5


def test_prompt_truncated_from_left_never_answer(lm: ScriptedLM, tok: CharTokenizer) -> None:
    long = "z" * 50 + "Q:"
    # answer "no" + EOS = 3 tokens; max_length 5 keeps exactly the prompt's last 2 chars "Q:"
    truncated = candidate_nll(lm, tok, [long], ["no"], max_length=5)
    short = candidate_nll(lm, tok, ["Q:"], ["no"], max_length=5)
    torch.testing.assert_close(truncated, short)
    with pytest.raises(ValueError, match="max_length"):
        candidate_nll(lm, tok, ["Q:"], ["abcd"], max_length=5)


def test_add_bos_keeps_bos_when_truncating(lm: ScriptedLM, tok: CharTokenizer) -> None:
    a = candidate_nll(lm, tok, ["z" * 30 + "Q:"], ["no"], max_length=6, add_bos=True)
    b = candidate_nll(lm, tok, ["Q:"], ["no"], max_length=6, add_bos=True)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="no tokens"):
        candidate_nll(lm, tok, [""], ["no"])


def test_eval_mode_during_scoring_and_restored(lm: ScriptedLM, tok: CharTokenizer) -> None:
    lm.train()
    classification_accuracy(lm, tok, ["Q:"], ["no"], ["yes", "no"])
    assert lm.seen_training and not any(lm.seen_training)
    assert lm.training and lm.context.training
    lm.eval()
    greedy_generate(lm, tok, ["="], max_new_tokens=3)
    assert not lm.training


def test_answer_must_be_a_candidate(lm: ScriptedLM, tok: CharTokenizer) -> None:
    with pytest.raises(ValueError, match="not among the candidates"):
        classification_accuracy(lm, tok, ["Q:"], ["No"], ["yes", "no"])


def test_generation_stops_at_eos(lm: ScriptedLM, tok: CharTokenizer) -> None:
    prompts = ["say =", "?", "and loop a", "a long prompt then :"]
    out = greedy_generate(lm, tok, prompts, max_new_tokens=6, batch_size=4)
    assert out == ["hi", "yes", "bababa", "no"]
    assert greedy_generate(lm, tok, ["say ="], max_new_tokens=1) == ["h"]
    # batched with left padding == one by one
    assert out == [greedy_generate(lm, tok, [p], max_new_tokens=6)[0] for p in prompts]


def test_generation_rouge_l(lm: ScriptedLM, tok: CharTokenizer) -> None:
    score = generation_rouge_l(lm, tok, ["=", "?"], ["hi there", "yes"], max_new_tokens=8)
    # "hi" vs "hi there": P=1, R=1/2 -> 2/3; "yes" vs "yes" -> 1
    assert score == pytest.approx((2 / 3 + 1) / 2)


# --- a real Hugging Face model -----------------------------------------------------------


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return LlamaForCausalLM(config).eval()


def test_llama_scoring_runs_and_is_padding_invariant(llama: nn.Module, tok: CharTokenizer) -> None:
    prompts = ["Suppose it rains. Can we infer wet? Yes, No, or Maybe?\n", "short?\n"]
    candidates = ["Yes", "Maybe", "No"]
    acc = classification_accuracy(llama, tok, prompts, ["Yes", "No"], candidates, batch_size=4)
    assert 0.0 <= acc <= 1.0
    batched = candidate_nll(llama, tok, prompts, candidates, batch_size=6, add_bos=True)
    assert torch.isfinite(batched).all()
    alone = candidate_nll(llama, tok, prompts[1:], candidates[1:2], batch_size=1, add_bos=True)
    torch.testing.assert_close(batched[1, 1], alone[0, 0], atol=1e-5, rtol=1e-5)


def test_llama_greedy_matches_hf_generate(llama: nn.Module, tok: CharTokenizer) -> None:
    prompts = ["Instruction: say hello\n", "Hi", "A medium prompt."]
    ours = greedy_generate(llama, tok, prompts, max_new_tokens=6, batch_size=3, add_bos=True)
    uncached = greedy_generate(
        llama, tok, prompts, max_new_tokens=6, batch_size=3, add_bos=True, use_cache=False
    )
    assert ours == uncached
    for prompt, text in zip(prompts, ours, strict=True):
        ids = torch.tensor([[BOS, *tok.encode(prompt)]])
        ref = llama.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=6,
            pad_token_id=PAD,
            eos_token_id=EOS,
        )[0, ids.shape[1] :].tolist()
        if EOS in ref:
            ref = ref[: ref.index(EOS)]
        assert text == tok.decode(ref)
    score = generation_rouge_l(llama, tok, prompts, ["hello", "hi", "x"], max_new_tokens=4)
    assert 0.0 <= score <= 1.0


def test_first_token_scoring_keeps_only_the_answer_positions_of_a_real_model() -> None:
    """On a Hugging Face model (which honours logits_to_keep) the score equals the one read
    off the full logits."""
    from fedsilo.sdk.models.loading import load_model

    loaded = load_model("builtin:tiny", seed=3)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = ["review: film was great\n", "colour: car is amber\n", "topic: gift\n",
               "a much longer prompt that pads the others in its batch\n", "x\n"]
    candidates = ["good", "bad", "warm", "cool"]
    firsts = [tokenizer.encode(c)[0] for c in candidates]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer.encode(prompt)])
            logits = model(input_ids=ids).logits[0, -1, firsts]
            expected.append(candidates[int(logits.argmax())])
    for answers in (expected, ["good"] * 5):
        want = sum(a == e for a, e in zip(answers, expected, strict=True)) / len(prompts)
        got = first_token_accuracy(model, tokenizer, prompts, answers, candidates,
                                   batch_size=3)
        assert got == pytest.approx(want)
