"""Fuzzing open_sealed: whatever the bytes, the result is (header, payload) or EnvelopeError.

A mutated envelope must never open (unless the mutations cancelled out); anything else
escaping (struct.error, KeyError, InvalidTag, UnicodeDecodeError...) is a bug.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsilo.privacy import envelope
from fedsilo.privacy.envelope import (
    ENVELOPE_MAGIC,
    EnvelopeError,
    ReplayGuard,
    open_sealed,
    peek_header,
    seal,
)
from fedsilo.privacy.keys import Keyring, TrustStore

FEDERATION = "fed-fuzz"
NOW = 1_750_000_000.0
PAYLOAD = bytes(range(100))
FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@dataclass(frozen=True)
class Setup:
    aggregator: Keyring
    trust: TrustStore
    envelope: bytes  # 4 segments of at most 32 bytes


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    folder: Path = tmp_path_factory.mktemp("fuzz")
    aggregator = Keyring.create(folder / "agg", "aggregator")
    silo = Keyring.create(folder / "silo", "silo-1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(envelope, "SEGMENT_SIZE", 32)
        data = seal(
            PAYLOAD, federation=FEDERATION, type="upload", round=1, sender=silo,
            recipient=aggregator.public(), now=NOW,
        )
    return Setup(aggregator, TrustStore(FEDERATION, {"silo-1": silo.public()}), data)


def _open(setup: Setup, data: bytes) -> bytes:
    guard = ReplayGuard()
    header, payload = open_sealed(
        data, federation=FEDERATION, me=setup.aggregator, trust=setup.trust, replay=guard,
        now=NOW,
    )
    guard.remember(header)
    return payload


def _refused(setup: Setup, data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        _open(setup, data)


def test_the_unmutated_envelope_opens(setup: Setup) -> None:
    assert _open(setup, setup.envelope) == PAYLOAD


# -- arbitrary bytes -------------------------------------------------------------------


def _with_prefix(header: bytes) -> st.SearchStrategy[bytes]:
    """Bytes that get past the magic and version, so the deeper checks are exercised."""
    return st.binary(max_size=400).map(
        lambda tail: ENVELOPE_MAGIC + b"\x01" + len(header).to_bytes(4, "big") + header + tail
    )


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=600),
        st.binary(max_size=600).map(lambda tail: ENVELOPE_MAGIC + tail),
        _json_values.flatmap(lambda value: _with_prefix(json.dumps(value).encode())),
        st.binary(max_size=300).flatmap(_with_prefix),
    )
)
def test_arbitrary_bytes_are_refused(setup: Setup, data: bytes) -> None:
    _refused(setup, data)
    try:
        peek_header(data)
    except EnvelopeError as exc:
        assert exc.reason == "header"


_FIELDS = ("federation", "version", "type", "round", "sender", "recipient", "message_id",
           "timestamp", "sender_key", "recipient_key")


@FUZZ
@given(field=st.sampled_from(_FIELDS), value=_json_values, tail=st.binary(max_size=300))
def test_headers_with_a_field_of_any_value_are_refused(
    setup: Setup, field: str, value: object, tail: bytes
) -> None:
    body = setup.envelope
    header_len = int.from_bytes(body[5:9], "big")
    document = json.loads(body[9 : 9 + header_len])
    document[field] = value
    header = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    rest = body[9 + header_len :]
    data = ENVELOPE_MAGIC + b"\x01" + len(header).to_bytes(4, "big") + header + rest + tail
    if data == setup.envelope:
        return
    _refused(setup, data)


# -- mutated envelopes -----------------------------------------------------------------


@st.composite
def _mutation(draw: st.DrawFn, length: int) -> tuple[str, int, int, bytes]:
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]))
    position = draw(st.integers(0, length))
    return kind, position, draw(st.integers(0, 7)), draw(st.binary(min_size=1, max_size=16))


def _apply(data: bytes, mutation: tuple[str, int, int, bytes]) -> bytes:
    kind, position, bit, blob = mutation
    position = min(position, len(data))
    if kind == "flip" and position < len(data):
        return data[:position] + bytes([data[position] ^ (1 << bit)]) + data[position + 1 :]
    if kind == "truncate":
        return data[:position]
    if kind == "insert":
        return data[:position] + blob + data[position:]
    if kind == "delete":
        return data[:position] + data[position + len(blob) :]
    if kind == "overwrite":
        return data[:position] + blob + data[position + len(blob) :]
    return data


@FUZZ
@given(data=st.data())
def test_mutated_envelopes_never_open(setup: Setup, data: st.DataObject) -> None:
    original = setup.envelope
    mutations = data.draw(st.lists(_mutation(len(original)), min_size=1, max_size=3))
    mutated = original
    for mutation in mutations:
        mutated = _apply(mutated, mutation)
    if mutated == original:
        assert _open(setup, mutated) == PAYLOAD
    else:
        _refused(setup, mutated)


@FUZZ
@given(position=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_every_single_bit_flip_is_refused(setup: Setup, position: int, bit: int) -> None:
    data = bytearray(setup.envelope)
    data[position % len(data)] ^= 1 << bit
    _refused(setup, bytes(data))
