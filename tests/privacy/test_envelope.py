"""Sealed envelopes: round trips and one test per refusal reason (real keys, real crypto)."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from fedsilo.privacy import envelope
from fedsilo.privacy.envelope import (
    ENVELOPE_MAGIC,
    REASONS,
    EnvelopeError,
    EnvelopeHeader,
    ReplayGuard,
    open_sealed,
    peek_header,
    seal,
)
from fedsilo.privacy.keys import Keyring, TrustStore

FEDERATION = "fed-test"
NOW = 1_750_000_000.0
FIXED_OVERHEAD = 9 + 32 + 12 + 48 + 8 + 4 + 64  # everything but the header and segments


@dataclass(frozen=True)
class World:
    aggregator: Keyring
    silo: Keyring
    trust: TrustStore  # the aggregator's: pins silo-1


@pytest.fixture
def world(tmp_path: Path) -> World:
    aggregator = Keyring.create(tmp_path / "agg", "aggregator")
    silo = Keyring.create(tmp_path / "silo", "silo-1")
    return World(aggregator, silo, TrustStore(FEDERATION, {"silo-1": silo.public()}))


def _seal(world: World, payload: bytes = b"adapter bytes", **overrides: object) -> bytes:
    arguments: dict[str, object] = {
        "federation": FEDERATION,
        "type": "upload",
        "round": 3,
        "sender": world.silo,
        "recipient": world.aggregator.public(),
        "now": NOW,
    }
    arguments.update(overrides)
    return seal(payload, **arguments)  # type: ignore[arg-type]


def _open(world: World, data: bytes, **overrides: object) -> tuple[EnvelopeHeader, bytes]:
    arguments: dict[str, object] = {
        "federation": FEDERATION,
        "me": world.aggregator,
        "trust": world.trust,
        "now": NOW,
    }
    arguments.update(overrides)
    return open_sealed(data, **arguments)  # type: ignore[arg-type]


def _reason(world: World, data: bytes, **overrides: object) -> str:
    with pytest.raises(EnvelopeError) as caught:
        _open(world, data, **overrides)
    assert str(caught.value).startswith(caught.value.reason + ": ")
    return caught.value.reason


# -- wire manipulation (follows the documented format) ---------------------------------


@dataclass(frozen=True)
class Layout:
    header: bytes
    keying: bytes  # ephemeral key .. nonce prefix (without the segment count)
    segments: list[bytes]  # each: length field + ciphertext


def _layout(data: bytes) -> Layout:
    header_len = int.from_bytes(data[5:9], "big")
    offset = 9 + header_len
    keying = data[offset : offset + 100]
    offset += 100
    count = int.from_bytes(data[offset : offset + 4], "big")
    offset += 4
    segments = []
    for _ in range(count):
        length = int.from_bytes(data[offset : offset + 4], "big")
        segments.append(data[offset : offset + 4 + length])
        offset += 4 + length
    assert offset == len(data) - 64
    return Layout(data[9 : 9 + header_len], keying, segments)


def _signed(body: bytes, signer: Keyring) -> bytes:
    """`body` with a valid signature by `signer`: isolates checks after the signature."""
    _, signature = signer.sign(b"fedsilo/v1/sig" + hashlib.sha512(body).digest())
    return body + signature


def _build(
    layout: Layout, signer: Keyring, *, count: int | None = None, trailing: bytes = b""
) -> bytes:
    body = (
        ENVELOPE_MAGIC
        + bytes([1])
        + struct.pack(">I", len(layout.header))
        + layout.header
        + layout.keying
        + struct.pack(">I", len(layout.segments) if count is None else count)
        + b"".join(layout.segments)
        + trailing
    )
    return _signed(body, signer)


def _header_json(data: bytes) -> dict[str, object]:
    return json.loads(_layout(data).header)


def _canonical(document: dict[str, object]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


# -- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1000, 100_000])
def test_round_trip(world: World, size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    data = _seal(world, payload, type="plan", round=7, message_id="m-1")
    header, opened = _open(world, data)
    assert opened == payload
    assert header == EnvelopeHeader(
        federation=FEDERATION, version=1, type="plan", round=7, sender="silo-1",
        recipient="aggregator", message_id="m-1", timestamp=NOW,
        sender_key=world.silo.active.key_id, recipient_key=world.aggregator.active.key_id,
    )
    assert peek_header(data) == header
    if size >= 64:  # the plaintext does not appear on the wire
        assert payload[:64] not in data
    assert len(_layout(data).segments) == 1


@pytest.mark.parametrize(
    ("size", "segments"), [(0, 1), (63, 1), (64, 1), (65, 2), (320, 5), (323, 6)]
)
def test_multi_segment_round_trip(
    world: World, monkeypatch: pytest.MonkeyPatch, size: int, segments: int
) -> None:
    monkeypatch.setattr(envelope, "SEGMENT_SIZE", 64)
    payload = bytes(range(256)) * 2
    payload = payload[:size]
    data = _seal(world, payload)
    layout = _layout(data)
    assert len(layout.segments) == segments
    assert len(data) == FIXED_OVERHEAD + len(layout.header) + 20 * segments + size
    assert _open(world, data)[1] == payload


def test_overhead_of_a_12_mb_payload_is_a_few_hundred_bytes(world: World) -> None:
    payload = bytes(12_000_000)
    data = _seal(world, payload)
    overhead = len(data) - len(payload)
    assert overhead == FIXED_OVERHEAD + len(_layout(data).header) + 20
    assert overhead < 600
    assert _open(world, data)[1] == payload


def test_each_message_gets_a_fresh_id_key_and_nonces(world: World) -> None:
    first, second = _seal(world, b"same"), _seal(world, b"same")
    assert _header_json(first)["message_id"] != _header_json(second)["message_id"]
    assert _layout(first).keying != _layout(second).keying
    assert _layout(first).segments != _layout(second).segments


def test_seal_refuses_an_unknown_message_type(world: World) -> None:
    with pytest.raises(EnvelopeError, match="type must be one of") as caught:
        _seal(world, type="gossip")
    assert caught.value.reason == "header"
    with pytest.raises(EnvelopeError, match="round"):
        _seal(world, round=-1)


# -- one refusal per reason ------------------------------------------------------------


def test_oversize(world: World) -> None:
    data = _seal(world)
    assert _reason(world, data, max_bytes=len(data) - 1) == "size"
    assert _open(world, data, max_bytes=len(data))[1] == b"adapter bytes"


@pytest.mark.parametrize(
    ("keep", "reason"),
    [(0, "size"), (10, "size"), (150, "size"), (300, "size"), (-1, "signature"),
     (-64, "signature"), (-100, "signature")],
)
def test_truncated(world: World, keep: int, reason: str) -> None:
    data = _seal(world, bytes(100))
    assert _reason(world, data[:keep]) == reason


def test_not_an_envelope(world: World) -> None:
    data = _seal(world)
    assert _reason(world, b"FSLO" + data[4:]) == "header"
    assert _reason(world, data[:4] + b"\x02" + data[5:]) == "header"
    assert _reason(world, data[:5] + struct.pack(">I", 2**31) + data[9:]) == "header"
    with pytest.raises(EnvelopeError, match="header"):
        peek_header(b"garbage")


def test_non_canonical_header(world: World) -> None:
    data = _seal(world)
    layout = _layout(data)
    spaced = json.dumps(json.loads(layout.header), sort_keys=True).encode()
    assert _reason(world, _build(replace(layout, header=spaced), world.silo)) == "header"


@pytest.mark.parametrize(
    ("field", "value"),
    [("round", "3"), ("round", True), ("timestamp", "now"), ("type", "gossip"),
     ("sender_key", "NOT-A-KEY-ID!!!!"), ("version", 2), ("sender", ""), ("extra", 1)],
)
def test_header_schema(world: World, field: str, value: object) -> None:
    data = _seal(world)
    document = _header_json(data)
    document[field] = value
    layout = replace(_layout(data), header=_canonical(document))
    assert _reason(world, _build(layout, world.silo)) == "header"


def test_header_missing_field(world: World) -> None:
    data = _seal(world)
    document = _header_json(data)
    del document["message_id"]
    layout = replace(_layout(data), header=_canonical(document))
    assert _reason(world, _build(layout, world.silo)) == "header"


def test_other_federation(world: World) -> None:
    assert _reason(world, _seal(world, federation="other-fed")) == "federation"


def test_message_for_another_recipient(world: World, tmp_path: Path) -> None:
    other = Keyring.create(tmp_path / "other", "silo-2")
    assert _reason(world, _seal(world, recipient=other.public())) == "recipient"
    # Same party name, but sealed to a key this keyring does not hold.
    impostor = Keyring.create(tmp_path / "impostor", "aggregator")
    assert _reason(world, _seal(world, recipient=impostor.public())) == "recipient"


def test_unknown_sender(world: World, tmp_path: Path) -> None:
    stranger = Keyring.create(tmp_path / "stranger", "silo-9")
    assert _reason(world, _seal(world, sender=stranger)) == "unknown sender"
    assert _reason(world, _seal(world), trust=TrustStore(FEDERATION)) == "unknown sender"


def test_signer_not_pinned_for_the_sender(world: World, tmp_path: Path) -> None:
    impostor = Keyring.create(tmp_path / "impostor", "silo-1")  # claims to be silo-1
    assert _reason(world, _seal(world, sender=impostor)) == "unknown sender"
    # It names silo-1's pinned key but can only sign with its own.
    data = _seal(world, sender=impostor)
    document = _header_json(data)
    document["sender_key"] = world.silo.active.key_id
    layout = replace(_layout(data), header=_canonical(document))
    assert _reason(world, _build(layout, impostor)) == "signature"


def test_tampered_header_byte(world: World) -> None:
    data = _seal(world, round=3)
    tampered = data.replace(b'"round":3', b'"round":4', 1)
    assert tampered != data and len(tampered) == len(data)
    assert peek_header(tampered).round == 4  # still a valid header, but not the signed one
    assert _reason(world, tampered) == "signature"


def test_tampered_ciphertext_byte(world: World) -> None:
    data = bytearray(_seal(world, bytes(1000)))
    data[-64 - 500] ^= 0x01
    assert _reason(world, bytes(data)) == "signature"


def test_tampered_ciphertext_behind_a_valid_signature(world: World) -> None:
    # A sender (or a bug) signing altered ciphertext: the AEAD layer still catches it.
    layout = _layout(_seal(world, bytes(1000)))
    segment = bytearray(layout.segments[0])
    segment[100] ^= 0x80
    data = _build(replace(layout, segments=[bytes(segment)]), world.silo)
    assert _reason(world, data) == "decrypt"


def test_tampered_wrapped_key(world: World) -> None:
    layout = _layout(_seal(world))
    keying = bytearray(layout.keying)
    keying[50] ^= 0x01  # inside the wrapped content key
    assert _reason(world, _build(replace(layout, keying=bytes(keying)), world.silo)) == "decrypt"
    keying = bytearray(layout.keying)
    keying[0] ^= 0x01  # the ephemeral public key
    assert _reason(world, _build(replace(layout, keying=bytes(keying)), world.silo)) == "decrypt"


@pytest.fixture
def segmented(world: World, monkeypatch: pytest.MonkeyPatch) -> Layout:
    monkeypatch.setattr(envelope, "SEGMENT_SIZE", 64)
    layout = _layout(_seal(world, bytes(range(200))))  # 64 + 64 + 64 + 8
    assert len(layout.segments) == 4
    return layout


def test_swapped_segments(world: World, segmented: Layout) -> None:
    s = segmented.segments
    swapped = replace(segmented, segments=[s[1], s[0], s[2], s[3]])
    assert _reason(world, _build(swapped, world.silo)) == "decrypt"
    unsigned = _build(swapped, world.silo)[:-64] + _build(segmented, world.silo)[-64:]
    assert _reason(world, unsigned) == "signature"


@pytest.mark.parametrize("drop", [0, 1, 3])
def test_dropped_segment(world: World, segmented: Layout, drop: int) -> None:
    kept = [s for i, s in enumerate(segmented.segments) if i != drop]
    assert _reason(world, _build(replace(segmented, segments=kept), world.silo)) == "decrypt"
    # The count still says 4: the layout no longer adds up.
    stale_count = _build(replace(segmented, segments=kept), world.silo, count=4)
    assert _reason(world, stale_count) == "decrypt"


def test_segment_layout_inconsistent(world: World, segmented: Layout) -> None:
    assert _reason(world, _build(segmented, world.silo, trailing=b"\x00")) == "decrypt"
    assert _reason(world, _build(segmented, world.silo, count=0)) == "decrypt"
    assert _reason(world, _build(segmented, world.silo, count=2**32 - 1)) == "decrypt"
    long = bytearray(segmented.segments[3])
    long[:4] = struct.pack(">I", 10**6)
    segments = [*segmented.segments[:3], bytes(long)]
    assert _reason(world, _build(replace(segmented, segments=segments), world.silo)) == "decrypt"
    assert _open(world, _build(segmented, world.silo))[1] == bytes(range(200))


def test_stale_and_future_timestamps(world: World) -> None:
    data = _seal(world, now=NOW)
    assert _reason(world, data, now=NOW + 7 * 86400 + 1) == "stale"
    assert _open(world, data, now=NOW + 7 * 86400 - 1)[1] == b"adapter bytes"
    assert _reason(world, data, now=NOW + 61, max_age_s=60) == "stale"
    assert _reason(world, data, now=NOW - 301) == "stale"  # dated in the future
    assert _open(world, data, now=NOW - 299)[1] == b"adapter bytes"
    assert _reason(world, data, now=NOW - 11, max_skew_s=10) == "stale"


# -- replay ----------------------------------------------------------------------------


def test_replay_of_the_same_message(world: World) -> None:
    guard = ReplayGuard()
    data = _seal(world)
    header, _ = _open(world, data, replay=guard)
    header_again, _ = _open(world, data, replay=guard)  # open_sealed does not remember
    guard.remember(header)
    # Not checkpointed yet: a copy is a redelivery of the same message and passes (the
    # receiver handles it idempotently); once state_dict() committed it, it is a replay.
    guard.remember(header_again)
    guard.state_dict()
    assert _reason(world, data, replay=guard) == "replay"
    with pytest.raises(EnvelopeError, match="already accepted"):
        guard.remember(header_again)
    # A fresh message of the same round is fine, and so is the same id from another sender.
    fresh = _seal(world)
    guard.remember(_open(world, fresh, replay=guard)[0])
    guard.check(replace(header, sender="silo-2"))


def test_replay_below_the_floor(world: World) -> None:
    guard = ReplayGuard()
    old = _seal(world, round=3)
    guard.remember(_open(world, old, replay=guard)[0])
    guard.set_floor(4)
    assert _reason(world, _seal(world, round=3), replay=guard) == "replay"
    assert _open(world, _seal(world, round=4), replay=guard)[1] == b"adapter bytes"
    guard.set_floor(2)  # never moves down: round 3 stays closed
    assert guard.floor == 4
    assert _reason(world, old, replay=guard) == "replay"
    assert guard.state_dict()["seen"] == {}


def test_replay_guard_state_survives_a_restart(world: World) -> None:
    guard = ReplayGuard()
    headers = [_open(world, _seal(world, round=r))[0] for r in (5, 5, 6)]
    for header in headers:
        guard.remember(header)
    guard.set_floor(5)
    state = json.loads(json.dumps(guard.state_dict()))
    uncommitted = _open(world, _seal(world, round=6))[0]
    guard.remember(uncommitted)  # accepted after the checkpoint above: not in `state`

    restored = ReplayGuard()
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert restored.floor == 5
    restored.remember(uncommitted)  # its effect was lost with the crash: accept it again
    for header in headers:
        with pytest.raises(EnvelopeError, match="replay"):
            restored.check(header)
    with pytest.raises(EnvelopeError, match="below the floor"):
        restored.check(replace(headers[0], round=4, message_id="new"))
    restored.check(replace(headers[0], message_id="new"))


@pytest.mark.parametrize(
    "state",
    [{}, {"floor": -1, "seen": {}}, {"floor": 1, "seen": {"0": []}},
     {"floor": 0, "seen": {"x": []}}, {"floor": 0, "seen": {"1": ["ab"]}},
     {"floor": 0, "seen": {"1": [["a", 2]]}}, {"floor": "1", "seen": {}}],
)
def test_replay_guard_refuses_malformed_state(state: dict[str, object]) -> None:
    guard = ReplayGuard()
    with pytest.raises(ValueError, match="not a ReplayGuard state"):
        guard.load_state_dict(state)
    assert guard.state_dict() == {"floor": 0, "seen": {}}


# -- the error type --------------------------------------------------------------------


def test_envelope_error() -> None:
    error = EnvelopeError("stale", "too old")
    assert str(error) == "stale: too old"
    assert error.reason == "stale" and isinstance(error, ValueError)
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == "stale: too old" and copy.reason == "stale"
    assert set(REASONS) == {
        "size", "header", "federation", "recipient", "unknown sender", "signature", "stale",
        "replay", "decrypt",
    }
    with pytest.raises(ValueError, match="unknown envelope error reason"):
        EnvelopeError("oops", "x")
