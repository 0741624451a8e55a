import pytest
import torch

from fedsilo.sdk.models import ByteTokenizer


def test_special_ids_and_vocab() -> None:
    tok = ByteTokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    assert tok.vocab_size == 259
    assert len(tok) == 259
    assert tok.padding_side == "right"


@pytest.mark.parametrize(
    "text", ["", "hello world", "sentiment: great fun ->", "naïve café 日本語 🙂"]
)
def test_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_bos_and_special_tokens_in_decode() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("ab", add_special_tokens=True)
    assert ids == [257, 97, 98]
    with_eos = [*ids, tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(with_eos) == "ab"
    assert tok.decode(with_eos, skip_special_tokens=False) == "<s>ab</s><pad>"
    assert tok.decode(torch.tensor(with_eos)) == "ab"


def test_invalid_utf8_is_replaced_not_raised() -> None:
    tok = ByteTokenizer()
    broken = tok.encode("é")[:1]
    assert tok.decode(broken) == "\ufffd"
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        tok.decode([300])


def test_call_pads_right_by_default() -> None:
    tok = ByteTokenizer()
    out = tok(["abc", "a"])
    assert out["input_ids"].tolist() == [[97, 98, 99], [97, 256, 256]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["input_ids"].dtype == torch.long


def test_call_pads_left_for_generation() -> None:
    tok = ByteTokenizer(padding_side="left")
    out = tok(["abc", "a"])
    assert out["input_ids"].tolist() == [[97, 98, 99], [256, 256, 97]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_call_single_text_and_lists() -> None:
    tok = ByteTokenizer()
    assert tok("hi")["input_ids"].shape == (1, 2)
    plain = tok(["hi", "x"], padding=False, return_tensors=None)
    assert plain["input_ids"] == [[104, 105], [120]]
    with pytest.raises(ValueError, match="padding=True"):
        tok(["hi", "x"], padding=False)


def test_bad_padding_side_rejected() -> None:
    with pytest.raises(ValueError, match="padding_side"):
        ByteTokenizer(padding_side="middle")
