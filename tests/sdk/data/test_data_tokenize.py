import pytest
import torch

from fedsilo.sdk.data import (
    IGNORE_INDEX,
    DataError,
    EncodedExample,
    Example,
    TrainStream,
    batches,
    collate,
    encode_example,
    pad_id,
)


class ByteTok:
    """Stand-in tokenizer: bytes shifted by 3; 0 = pad, 1 = eos."""

    pad_token_id = 0
    eos_token_id = 1

    def encode(self, text, add_special_tokens=False):
        return [b + 3 for b in text.encode()]


class NoPadTok(ByteTok):
    pad_token_id = None


def _ids(text):
    return [b + 3 for b in text.encode()]


def test_prompt_masked_response_and_eos_kept():
    enc = encode_example(ByteTok(), Example("ab\n", "yes"), max_length=64)
    assert enc.input_ids == _ids("ab\n") + _ids("yes") + [1]
    assert enc.labels == [IGNORE_INDEX] * 3 + _ids("yes") + [1]


def test_left_truncation_keeps_response():
    enc = encode_example(ByteTok(), Example("0123456789\n", "ok"), max_length=6)
    assert enc.input_ids == _ids("89\n") + _ids("ok") + [1]
    assert enc.labels[:3] == [IGNORE_INDEX] * 3
    assert len(enc.input_ids) == len(enc.labels) == 6


def test_long_response_cut_from_right():
    enc = encode_example(ByteTok(), Example("p\n", "abcdef"), max_length=4)
    assert enc.input_ids == _ids("abcd")
    assert enc.labels == _ids("abcd")


def test_pad_falls_back_to_eos():
    assert pad_id(ByteTok()) == 0
    assert pad_id(NoPadTok()) == 1


def test_collate_pads_right():
    a = EncodedExample([5, 6, 7], [IGNORE_INDEX, 6, 7])
    b = EncodedExample([8], [8])
    out = collate([a, b], pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert out["input_ids"].dtype == torch.long
    with pytest.raises(DataError):
        collate([], 0)


def test_batches_in_order():
    encoded = [EncodedExample([i], [i]) for i in range(5)]
    got = [b["input_ids"][:, 0].tolist() for b in batches(encoded, 2, 0)]
    assert got == [[0, 1], [2, 3], [4]]


def test_train_stream_seeded_reshuffles_and_covers():
    encoded = [EncodedExample([i], [i]) for i in range(6)]
    first = [b["input_ids"][:, 0].tolist() for b in TrainStream(encoded, 3, 0, seed=1).take(6)]
    again = [b["input_ids"][:, 0].tolist() for b in TrainStream(encoded, 3, 0, seed=1).take(6)]
    assert first == again
    epochs = [sorted(first[k] + first[k + 1]) for k in range(0, 6, 2)]
    assert all(e == list(range(6)) for e in epochs)  # each epoch covers every example once
    assert len({tuple(first[k] + first[k + 1]) for k in range(0, 6, 2)}) > 1  # reshuffled


def test_train_stream_small_set_and_partial_tail():
    encoded = [EncodedExample([i], [i]) for i in range(5)]
    stream = TrainStream(encoded, 8, 0, seed=0)
    assert stream.next()["input_ids"].shape == (5, 1)
    stream = TrainStream(encoded, 2, 0, seed=0)
    for batch in stream.take(10):
        ids = batch["input_ids"][:, 0].tolist()
        assert len(ids) == 2 and len(set(ids)) == 2
    with pytest.raises(DataError):
        TrainStream([], 2, 0)
