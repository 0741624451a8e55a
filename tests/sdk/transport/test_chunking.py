import hashlib
import os
import random

import pytest

from fedsilo.sdk.transport.chunking import Chunk, ChunkError, ChunkHeader, Reassembler, split


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_split_headers_and_exact_reassembly() -> None:
    payload = os.urandom(10_000)
    chunks = split(payload, "m1", 3_000)
    assert [c.header.index for c in chunks] == [0, 1, 2, 3]
    assert {c.header.count for c in chunks} == {4}
    assert {c.header.total_size for c in chunks} == {10_000}
    assert {c.header.sha256 for c in chunks} == {hashlib.sha256(payload).hexdigest()}
    assert b"".join(c.data for c in chunks) == payload
    r = Reassembler(max_pending_bytes=1 << 20, timeout_s=10)
    results = [r.add(c) for c in chunks]
    assert results[:-1] == [None] * 3 and results[-1] == payload
    assert r.pending_bytes == 0 and r.progress() == {}


def test_empty_and_exact_multiple_payloads() -> None:
    assert [len(c.data) for c in split(b"", "e", 4)] == [0]
    assert [len(c.data) for c in split(b"12345678", "x", 4)] == [4, 4]
    r = Reassembler(100, 1)
    assert r.add(split(b"", "e", 4)[0]) == b""


def test_out_of_order_and_duplicates_interleaved_messages() -> None:
    a, b = os.urandom(5_000), os.urandom(7_000)
    chunks = split(a, "a", 1_000) + split(b, "b", 1_000)
    chunks += chunks[:3]  # duplicates
    random.Random(0).shuffle(chunks)
    r = Reassembler(1 << 20, 10)
    done = {}
    for c in chunks:
        out = r.add(c)
        if out is not None:
            done[c.header.message_id] = out
    assert done == {"a": a, "b": b}
    # a duplicate arriving after completion starts a new set but never completes it alone
    assert r.add(split(a, "a", 1_000)[0]) is None


def test_header_roundtrip_and_bad_headers() -> None:
    h = ChunkHeader("m", 1, 3, 10, "ab")
    assert ChunkHeader.from_headers(h.to_headers()) == h
    assert ChunkHeader.from_headers(None) is None
    assert ChunkHeader.from_headers({"other": 1}) is None
    bad = h.to_headers()
    del bad["fedsilo-chunk-count"]
    with pytest.raises(ChunkError) as exc:
        ChunkHeader.from_headers(bad)
    assert exc.value.reason == "bad header"
    bad = {**h.to_headers(), "fedsilo-chunk-index": "1"}
    with pytest.raises(ChunkError, match="bad header"):
        ChunkHeader.from_headers(bad)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("count", 5, "count mismatch"),
        ("total_size", 9_999, "total_size mismatch"),
        ("sha256", "0" * 64, "sha256 mismatch"),
        ("index", 7, "index out of range"),
        ("index", -1, "index out of range"),
    ],
)
def test_inconsistent_chunks(field: str, value: object, reason: str) -> None:
    chunks = split(os.urandom(4_000), "m", 1_000)
    r = Reassembler(1 << 20, 10)
    assert r.add(chunks[0]) is None
    h = chunks[1].header
    fields = {
        "message_id": h.message_id,
        "index": h.index,
        "count": h.count,
        "total_size": h.total_size,
        "sha256": h.sha256,
        field: value,
    }
    with pytest.raises(ChunkError) as exc:
        r.add(Chunk(ChunkHeader(**fields), chunks[1].data))
    assert exc.value.reason == reason and exc.value.message_id == "m"
    # the good chunks still complete the message
    assert [r.add(c) for c in chunks[1:]][-1] is not None


def test_conflicting_duplicate() -> None:
    chunks = split(b"a" * 3_000, "m", 1_000)
    r = Reassembler(1 << 20, 10)
    r.add(chunks[0])
    with pytest.raises(ChunkError, match="conflicting duplicate"):
        r.add(Chunk(chunks[0].header, b"b" * 1_000))


def test_hash_mismatch_drops_the_set() -> None:
    chunks = split(b"x" * 3_000, "m", 1_000)
    tampered = Chunk(chunks[2].header, b"y" * 1_000)
    r = Reassembler(1 << 20, 10)
    r.add(chunks[0])
    r.add(chunks[1])
    with pytest.raises(ChunkError) as exc:
        r.add(tampered)
    assert exc.value.reason == "sha256 mismatch" and exc.value.dropped
    assert r.pending_bytes == 0 and r.progress() == {}
    # single-chunk payload with a bad hash too
    single = split(b"abc", "s", 10)[0]
    with pytest.raises(ChunkError, match="sha256 mismatch"):
        r.add(Chunk(single.header, b"abd"))


def test_size_mismatch() -> None:
    chunks = split(b"x" * 3_000, "m", 1_000)
    short = Chunk(chunks[2].header, b"x" * 10)
    r = Reassembler(1 << 20, 10)
    r.add(chunks[0])
    r.add(chunks[1])
    with pytest.raises(ChunkError, match="size mismatch"):
        r.add(short)


def test_expiry() -> None:
    clock = FakeClock()
    r = Reassembler(1 << 20, timeout_s=5, clock=clock)
    a = split(os.urandom(3_000), "a", 1_000)
    b = split(os.urandom(3_000), "b", 1_000)
    r.add(a[0])
    clock.now = 3
    r.add(b[0])
    assert r.expire() == []
    clock.now = 5.5
    assert r.expire() == [("", "a")]
    assert r.progress() == {"b": (1, 3)} and r.pending_bytes == 1_000
    clock.now = 100
    assert r.expire() == [("", "b")] and r.pending_bytes == 0


def test_pending_bytes_cap() -> None:
    r = Reassembler(max_pending_bytes=2_500, timeout_s=10)
    a = split(os.urandom(4_000), "a", 1_000)
    r.add(a[0])
    r.add(a[1])
    with pytest.raises(ChunkError) as exc:
        r.add(split(os.urandom(4_000), "b", 1_000)[0])
    assert exc.value.reason == "pending bytes cap"
    assert r.pending_bytes == 2_000
    # a's next chunk would exceed the cap as well: it is refused, nothing stored
    with pytest.raises(ChunkError, match="pending bytes cap"):
        r.add(a[2])
    r.discard("a")
    assert r.pending_bytes == 0


def test_one_sender_filling_its_quota_costs_another_nothing() -> None:
    r = Reassembler(max_pending_bytes=2_500, timeout_s=10)
    junk = split(os.urandom(10_000), "junk", 1_000)
    r.add(junk[0], "mallory")
    r.add(junk[1], "mallory")
    with pytest.raises(ChunkError, match=r"pending bytes cap.*mallory"):
        r.add(junk[2], "mallory")
    honest = os.urandom(2_400)
    parts = split(honest, "up", 1_000)
    assert [r.add(c, "silo-0") for c in parts][-1] == honest
    assert r.sender_bytes("mallory") == 2_000 and r.sender_bytes("silo-0") == 0


def test_a_chunk_from_another_sender_never_joins_or_breaks_a_set() -> None:
    r = Reassembler(1 << 20, 10)
    payload = os.urandom(3_000)
    parts = split(payload, "same-id", 1_000)
    r.add(parts[0], "silo-0")
    forged = Chunk(parts[1].header, b"x" * 1_000)  # same message id and index, other bytes
    assert r.add(forged, "mallory") is None  # a set of mallory's own, not silo-0's
    assert r.add(parts[1], "silo-0") is None
    assert r.add(parts[2], "silo-0") == payload


def test_duplicates_do_not_keep_an_incomplete_set_alive() -> None:
    clock = FakeClock()
    r = Reassembler(1 << 20, timeout_s=5, clock=clock)
    parts = split(os.urandom(3_000), "stuck", 1_000)
    r.add(parts[0], "mallory")
    for t in (2, 4, 6):
        clock.now = t
        r.add(parts[0], "mallory")  # the same chunk again and again
    assert r.expire() == [("mallory", "stuck")] and r.pending_bytes == 0
