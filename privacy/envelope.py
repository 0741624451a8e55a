"""Sealed envelopes: every message encrypted to its recipient and signed by its sender.

Why: messages cross a broker whose operator, and anyone holding its credentials, could read
or inject them. An envelope makes a message readable only by the recipient's private key
(confidentiality), provably from a pinned sender key (authenticity), bound to one
federation, recipient, round and type (no cross-context reuse), fresh (timestamp) and, with
a `ReplayGuard`, accepted at most once.

Wire format (integers big endian)::

    MAGIC b"FSEV" (4) | version (1) | header length H (4) | header (H)
    | ephemeral X25519 public key (32) | wrap nonce (12) | wrapped content key (32 + 16)
    | payload nonce prefix (8) | segment count N (4)
    | N x [ ciphertext length L (4) | AES-256-GCM ciphertext + tag (L) ]
    | Ed25519 signature (64)

- Header: `EnvelopeHeader` as canonical JSON (sorted keys, compact separators, UTF-8, no
  NaN); a header in any other spelling is refused, so its bytes have a single meaning.
- Content key: 32 random bytes per message, wrapped with AES-256-GCM under
  KEK = HKDF-SHA256(X25519(ephemeral, recipient key), salt=None,
  info=b"fedsilo/v1/key-wrap" + ephemeral public + recipient public), AAD = header bytes.
- Payload: AES-256-GCM in segments of `SEGMENT_SIZE` plaintext bytes (one AESGCM call takes
  less than 2 GiB, and a silo's adapters may be larger). Segment i uses nonce = prefix + i (4
  bytes) and AAD = header + i (4 bytes) + final flag (1 byte), so segments cannot be
  reordered, dropped, or cut off at a segment boundary. An empty payload is one empty final
  segment. A receiver accepts any segment sizes up to the AESGCM limit.
- Signature: Ed25519 by the sender's active key (never a pending one, see `keys`) over
  b"fedsilo/v1/sig" + SHA-512(all bytes before the signature). Signing the ciphertext (not
  the plaintext) lets a receiver reject a forged message before doing any decryption work.

Overhead: 177 bytes + the header (about 250) + 20 bytes per segment, i.e. under 0.01% of
a payload of a few MB (fedsilo promises wire bytes within 2% of raw tensor bytes).

`open_sealed` checks in this order and raises `EnvelopeError(reason, detail)` with the first
failure: size, header, federation, recipient, unknown sender, signature, stale, replay,
decrypt. Any input yields either (header, payload) or an EnvelopeError, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedsilo.privacy.keys import Keyring, KeysError, PartyKeys, TrustStore
from fedsilo.sdk.refusal import Refusal

__all__ = [
    "ENVELOPE_MAGIC",
    "ENVELOPE_VERSION",
    "MESSAGE_TYPES",
    "REASONS",
    "SEGMENT_SIZE",
    "EnvelopeError",
    "EnvelopeHeader",
    "ReplayGuard",
    "open_sealed",
    "peek_header",
    "seal",
]

ENVELOPE_MAGIC = b"FSEV"
ENVELOPE_VERSION = 1
#: Plaintext bytes per AES-GCM segment (the last one may be shorter).
SEGMENT_SIZE = 16 * 2**20
MESSAGE_TYPES = ("plan", "upload", "announce")
REASONS = (
    "size",
    "header",
    "federation",
    "recipient",
    "unknown sender",
    "signature",
    "stale",
    "replay",
    "decrypt",
)

_PREFIX = struct.Struct(">4sBI")  # magic, version, header length
_U32 = struct.Struct(">I")
_EPHEMERAL_LEN = 32
_NONCE_LEN = 12
_WRAPPED_LEN = 32 + 16
_PREFIX_NONCE_LEN = 8
_TAG_LEN = 16
_SIGNATURE_LEN = 64
_KEYING_LEN = _EPHEMERAL_LEN + _NONCE_LEN + _WRAPPED_LEN + _PREFIX_NONCE_LEN + _U32.size
_SEGMENT_OVERHEAD = _U32.size + _TAG_LEN
#: The shortest envelope: "{}" as header, one empty segment.
_MIN_LEN = _PREFIX.size + 2 + _KEYING_LEN + _SEGMENT_OVERHEAD + _SIGNATURE_LEN
_MAX_HEADER_LEN = 64 * 1024
_MAX_CIPHERTEXT = 2**31 - 1  # what one AESGCM call accepts
_MAX_NAME_LEN = 256
_MAX_ROUND = 2**63 - 1
_SIG_DOMAIN = b"fedsilo/v1/sig"
_WRAP_INFO = b"fedsilo/v1/key-wrap"
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_FINAL = b"\x01"
_NOT_FINAL = b"\x00"


class EnvelopeError(Refusal, ValueError):
    """Bytes that are not a message this party may accept. `reason` is one of REASONS (a
    stable key for counting and alerting)."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown envelope error reason {reason!r}; use one of {REASONS}")
        super().__init__(reason, detail)


@dataclass(frozen=True)
class EnvelopeHeader:
    """The cleartext, signed part of an envelope: who sent what to whom, for which round.

    Visible to the broker (routing and logs need it); it holds no tensor data.
    """

    federation: str
    version: int
    type: str
    round: int
    sender: str
    recipient: str
    message_id: str
    timestamp: float
    sender_key: str
    recipient_key: str

    def __post_init__(self) -> None:
        problem = _header_problem(self)
        if problem is not None:
            raise EnvelopeError("header", problem)
        object.__setattr__(self, "timestamp", float(self.timestamp))

    def to_bytes(self) -> bytes:
        """Canonical JSON: the exact bytes that are signed and authenticated."""
        return _canonical(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EnvelopeHeader:
        names = {f.name for f in fields(cls)}
        if set(d) != names:
            missing, unknown = sorted(names - set(d)), sorted(set(d) - names)
            raise EnvelopeError("header", f"fields missing {missing}, unknown {unknown}")
        return cls(**d)


def _canonical(document: Mapping[str, Any]) -> bytes:
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _header_problem(h: EnvelopeHeader) -> str | None:
    for name in ("federation", "type", "sender", "recipient", "message_id"):
        value = getattr(h, name)
        if (
            not isinstance(value, str)
            or not value
            or len(value) > _MAX_NAME_LEN
            or not value.isprintable()
        ):
            return (
                f"{name} must be a non-empty printable string of at most {_MAX_NAME_LEN} "
                f"characters, got {value!r}"
            )
    for name in ("sender_key", "recipient_key"):
        value = getattr(h, name)
        if not isinstance(value, str) or not _KEY_ID.fullmatch(value):
            return f"{name} must be a key id (16 lowercase hex characters), got {value!r}"
    if h.type not in MESSAGE_TYPES:
        return f"type must be one of {MESSAGE_TYPES}, got {h.type!r}"
    if type(h.version) is not int or h.version != ENVELOPE_VERSION:
        return f"version must be {ENVELOPE_VERSION}, got {h.version!r}"
    if type(h.round) is not int or not 0 <= h.round <= _MAX_ROUND:
        return f"round must be an integer from 0 to 2**63 - 1, got {h.round!r}"
    if type(h.timestamp) not in (int, float) or not math.isfinite(h.timestamp):
        return f"timestamp must be a finite number of seconds, got {h.timestamp!r}"
    return None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _parse_header(view: memoryview) -> tuple[EnvelopeHeader, memoryview]:
    """The header and its raw bytes; `EnvelopeError("header")` for anything malformed."""
    if len(view) < _PREFIX.size:
        raise EnvelopeError("header", f"{len(view)} bytes is too short for an envelope prefix")
    magic, version, header_len = _PREFIX.unpack_from(view)
    if magic != ENVELOPE_MAGIC:
        raise EnvelopeError(
            "header", f"magic {bytes(magic)!r} is not {ENVELOPE_MAGIC!r}: not a fedsilo envelope"
        )
    if version != ENVELOPE_VERSION:
        raise EnvelopeError(
            "header",
            f"envelope version {version}, this fedsilo reads {ENVELOPE_VERSION}; upgrade the "
            "older side",
        )
    if header_len > _MAX_HEADER_LEN or _PREFIX.size + header_len > len(view):
        raise EnvelopeError(
            "header",
            f"header length {header_len} exceeds the limit ({_MAX_HEADER_LEN}) or the data "
            f"({len(view)} bytes)",
        )
    raw = view[_PREFIX.size : _PREFIX.size + header_len]
    try:
        document = json.loads(
            str(raw, "utf-8"), parse_constant=_reject_constant  # type: ignore[arg-type]
        )
    except (ValueError, RecursionError) as exc:  # includes UnicodeDecodeError
        raise EnvelopeError("header", f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(document, dict):
        raise EnvelopeError("header", f"header is a JSON {type(document).__name__}, not object")
    try:
        canonical = _canonical(document) == raw
    except (ValueError, TypeError):
        canonical = False
    if not canonical:
        raise EnvelopeError(
            "header", "header JSON is not canonical (sorted keys, compact, no duplicates)"
        )
    header = EnvelopeHeader.from_dict(document)
    return header, raw


def peek_header(data: bytes) -> EnvelopeHeader:
    """The header, unverified: for logging and routing only, never for decisions."""
    header, _ = _parse_header(memoryview(data).cast("B"))
    return header


def _kek(shared: bytes, ephemeral_public: bytes, recipient_public: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=_WRAP_INFO + ephemeral_public + recipient_public,
    ).derive(shared)


def _segment_aad(header: bytes | memoryview, index: int, final: bool) -> bytes:
    return bytes(header) + _U32.pack(index) + (_FINAL if final else _NOT_FINAL)


def _to_sign(digest: bytes) -> bytes:
    return _SIG_DOMAIN + digest


def seal(
    payload: bytes,
    *,
    federation: str,
    type: str,  # noqa: A002 - the keywords are the header's field names
    round: int,  # noqa: A002
    sender: Keyring,
    recipient: PartyKeys,
    now: float | None = None,
    message_id: str | None = None,
) -> bytes:
    """Encrypt `payload` to `recipient`'s active key and sign it with `sender`'s.

    Raises EnvelopeError("header") for unusable header fields (say, an unknown type) and
    KeysError if the recipient's pinned key cannot be used.
    """
    signing_key = sender.active
    target = recipient.active
    header = EnvelopeHeader(
        federation=federation,
        version=ENVELOPE_VERSION,
        type=type,
        round=round,
        sender=sender.party,
        recipient=recipient.party,
        message_id=uuid.uuid4().hex if message_id is None else message_id,
        timestamp=time.time() if now is None else now,
        sender_key=signing_key.key_id,
        recipient_key=target.key_id,
    )
    header_bytes = header.to_bytes()
    if len(header_bytes) > _MAX_HEADER_LEN:
        raise EnvelopeError(
            "header", f"header is {len(header_bytes)} bytes, over {_MAX_HEADER_LEN}"
        )

    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(target.encryption))
    except ValueError as exc:  # a low-order point: no secret can be agreed with it
        raise KeysError(
            f"the pinned encryption key {target.key_id!r} of {recipient.party!r} is unusable "
            f"({exc}); get the party's public keys again"
        ) from None
    content_key = AESGCM.generate_key(bit_length=256)
    wrap_nonce = os.urandom(_NONCE_LEN)
    wrapped = AESGCM(_kek(shared, ephemeral_public, target.encryption)).encrypt(
        wrap_nonce, content_key, header_bytes
    )
    nonce_prefix = os.urandom(_PREFIX_NONCE_LEN)

    view = memoryview(payload).cast("B")
    size = SEGMENT_SIZE
    count = max(1, -(-len(view) // size))
    parts: list[bytes] = [
        _PREFIX.pack(ENVELOPE_MAGIC, ENVELOPE_VERSION, len(header_bytes)),
        header_bytes,
        ephemeral_public,
        wrap_nonce,
        wrapped,
        nonce_prefix,
        _U32.pack(count),
    ]
    aead = AESGCM(content_key)
    for index in range(count):
        ciphertext = aead.encrypt(
            nonce_prefix + _U32.pack(index),
            view[index * size : (index + 1) * size],
            _segment_aad(header_bytes, index, index == count - 1),
        )
        parts += (_U32.pack(len(ciphertext)), ciphertext)

    digest = hashlib.sha512()
    for part in parts:
        digest.update(part)
    key_id, signature = sender.sign(_to_sign(digest.digest()))
    if key_id != signing_key.key_id:
        raise KeysError(
            f"the active key of {sender.party!r} changed while sealing (a refresh or rotation "
            "in another thread); seal the message again"
        )
    parts.append(signature)
    return b"".join(parts)


def open_sealed(
    data: bytes,
    *,
    federation: str,
    me: Keyring,
    trust: TrustStore,
    replay: ReplayGuard | None = None,
    max_bytes: int = 4 * 2**30,
    max_age_s: float = 7 * 86400,
    max_skew_s: float = 300.0,
    now: float | None = None,
) -> tuple[EnvelopeHeader, bytes]:
    """Verify and decrypt an envelope addressed to `me`: (header, payload).

    Does not record the message in `replay`: call `replay.remember(header)` once the
    message is accepted, so a message that fails later processing can be sent again.
    Raises EnvelopeError (see REASONS) and nothing else, whatever the bytes.
    """
    view = memoryview(data).cast("B")
    if len(view) > max_bytes:
        raise EnvelopeError("size", f"{len(view)} bytes is over the limit of {max_bytes}")
    if len(view) < _MIN_LEN:
        raise EnvelopeError(
            "size", f"{len(view)} bytes is shorter than any envelope ({_MIN_LEN} bytes)"
        )

    header, header_bytes = _parse_header(view)
    body_start = _PREFIX.size + len(header_bytes)
    needed = body_start + _KEYING_LEN + _SEGMENT_OVERHEAD + _SIGNATURE_LEN
    if len(view) < needed:
        raise EnvelopeError(
            "size",
            f"{len(view)} bytes cannot hold this header, the keys, a segment and the signature "
            f"({needed} bytes): truncated",
        )

    if header.federation != federation:
        raise EnvelopeError(
            "federation",
            f"message is for federation {header.federation!r}, this is {federation!r}",
        )
    if header.recipient != me.party:
        raise EnvelopeError(
            "recipient", f"message is addressed to {header.recipient!r}, this is {me.party!r}"
        )
    my_keys = me.public()
    recipient_key = my_keys.get(header.recipient_key)
    if recipient_key is None:
        retired = me.retired_key(header.recipient_key)
        if retired is not None:
            raise EnvelopeError(
                "recipient",
                f"message from {header.sender!r} is sealed to key {header.recipient_key!r}, "
                f"which {me.party!r} retired on {retired.retired}: {header.sender!r} must pin "
                f"{me.party!r}'s current public.json (`fedsilo trust add`) and refuse the old "
                f"key (`fedsilo trust retire trust.json {me.party} {header.recipient_key}`)",
            )
        raise EnvelopeError(
            "recipient",
            f"message is sealed to key {header.recipient_key!r}, which {me.party!r} does not "
            f"hold (it holds {[k.key_id for k in my_keys.keys]}); was it retired too early?",
        )
    try:
        sender_key = trust.key(header.sender, header.sender_key)
    except KeysError as exc:
        raise EnvelopeError("unknown sender", str(exc)) from None

    signed = view[: len(view) - _SIGNATURE_LEN]
    signature = bytes(view[len(view) - _SIGNATURE_LEN :])
    try:
        Ed25519PublicKey.from_public_bytes(sender_key.signing).verify(
            signature, _to_sign(hashlib.sha512(signed).digest())
        )
    except InvalidSignature:
        raise EnvelopeError(
            "signature",
            f"not signed by {header.sender!r}'s key {header.sender_key!r}: forged, altered or "
            "truncated in transit",
        ) from None

    current = time.time() if now is None else now
    age = current - header.timestamp
    if age > max_age_s:
        raise EnvelopeError(
            "stale", f"message is {age:.0f} s old, older than the limit of {max_age_s:.0f} s"
        )
    if -age > max_skew_s:
        raise EnvelopeError(
            "stale",
            f"message is dated {-age:.0f} s in the future (limit {max_skew_s:.0f} s); check "
            "the sender's clock",
        )
    if replay is not None:
        replay.check(header)

    payload = _decrypt(view, body_start, header_bytes, me, recipient_key.encryption, header)
    return header, payload


def _decrypt(
    view: memoryview,
    offset: int,
    header_bytes: memoryview,
    me: Keyring,
    recipient_public: bytes,
    header: EnvelopeHeader,
) -> bytes:
    """Unwrap the content key and decrypt every segment; EnvelopeError("decrypt") if the
    layout is inconsistent or anything fails to authenticate."""
    end = len(view) - _SIGNATURE_LEN
    ephemeral_public = bytes(view[offset : offset + _EPHEMERAL_LEN])
    offset += _EPHEMERAL_LEN
    wrap_nonce = bytes(view[offset : offset + _NONCE_LEN])
    offset += _NONCE_LEN
    wrapped = view[offset : offset + _WRAPPED_LEN]
    offset += _WRAPPED_LEN
    nonce_prefix = bytes(view[offset : offset + _PREFIX_NONCE_LEN])
    offset += _PREFIX_NONCE_LEN
    (count,) = _U32.unpack_from(view, offset)
    offset += _U32.size

    if count == 0 or count > (end - offset) // _SEGMENT_OVERHEAD:
        raise EnvelopeError("decrypt", f"segment count {count} does not fit the data")
    segments: list[tuple[int, int]] = []
    for index in range(count):
        if end - offset < _U32.size:
            raise EnvelopeError("decrypt", f"segment {index} of {count} is missing: truncated")
        (length,) = _U32.unpack_from(view, offset)
        offset += _U32.size
        if not _TAG_LEN <= length <= min(_MAX_CIPHERTEXT, end - offset):
            raise EnvelopeError(
                "decrypt", f"segment {index} of {count} has an impossible length {length}"
            )
        segments.append((offset, length))
        offset += length
    if offset != end:
        raise EnvelopeError("decrypt", f"{end - offset} unexpected bytes after the last segment")

    try:
        shared = me.exchange(header.recipient_key, ephemeral_public)
        kek = _kek(shared, ephemeral_public, recipient_public)
        content_key = AESGCM(kek).decrypt(wrap_nonce, wrapped, header_bytes)
    except (KeysError, InvalidTag):
        raise EnvelopeError(
            "decrypt", "the content key does not unwrap: not sealed to this key, or altered"
        ) from None
    aead = AESGCM(content_key)
    plaintext: list[bytes] = []
    for index, (start, length) in enumerate(segments):
        try:
            plaintext.append(
                aead.decrypt(
                    nonce_prefix + _U32.pack(index),
                    view[start : start + length],
                    _segment_aad(header_bytes, index, index == count - 1),
                )
            )
        except (InvalidTag, ValueError, OverflowError):
            raise EnvelopeError(
                "decrypt",
                f"segment {index} of {count} fails authentication: altered, reordered or cut",
            ) from None
    return plaintext[0] if count == 1 else b"".join(plaintext)


class ReplayGuard:
    """Message ids accepted so far, per round, with a floor: anything for a round below the
    floor, or an id accepted before, is a replay. JSON-able state so it survives restarts.

    An id accepted since the last `state_dict()` is *uncommitted*: its effect is not in
    any checkpoint yet, so the broker's redelivery of it (after a lost connection) is the
    same message, not a replay, and passes; the receiver handles it idempotently (the
    aggregator as a duplicate upload, an agent as a plan it already ran). `state_dict()`
    commits: from then on a copy is a replay. A restart loads only committed ids, so what
    was accepted but never checkpointed is accepted again, and nothing is lost."""

    def __init__(self) -> None:
        self._floor = 0
        self._seen: dict[int, set[tuple[str, str]]] = {}
        self._uncommitted: set[tuple[int, str, str]] = set()

    def __repr__(self) -> str:
        counts = {r: len(ids) for r, ids in sorted(self._seen.items())}
        return f"ReplayGuard(floor={self._floor}, seen={counts})"

    @property
    def floor(self) -> int:
        return self._floor

    def check(self, header: EnvelopeHeader) -> None:
        """Raise EnvelopeError("replay") if `header`'s message must not be accepted again."""
        if header.round < self._floor:
            raise EnvelopeError(
                "replay",
                f"message {header.message_id!r} from {header.sender!r} is for round "
                f"{header.round}, below the floor {self._floor} (those rounds are closed)",
            )
        if (header.round, header.sender, header.message_id) in self._uncommitted:
            return  # a redelivery of a message whose effect is not checkpointed yet
        if (header.sender, header.message_id) in self._seen.get(header.round, ()):
            raise EnvelopeError(
                "replay",
                f"message {header.message_id!r} from {header.sender!r} for round "
                f"{header.round} was already accepted",
            )

    def remember(self, header: EnvelopeHeader) -> None:
        """Record an accepted message. Checks again first, so of two copies processed at
        once only the first to be remembered wins (EnvelopeError("replay") for the other)."""
        self.check(header)
        self._seen.setdefault(header.round, set()).add((header.sender, header.message_id))
        self._uncommitted.add((header.round, header.sender, header.message_id))

    def set_floor(self, floor: int) -> None:
        """Close every round below `floor`: forget their ids and reject them from now on.
        The floor never moves down (that would re-open rounds whose ids are forgotten)."""
        if type(floor) is not int or floor < 0:
            raise ValueError(f"floor must be a non-negative integer round, got {floor!r}")
        self._floor = max(self._floor, floor)
        self._seen = {r: ids for r, ids in self._seen.items() if r >= self._floor}
        self._uncommitted = {key for key in self._uncommitted if key[0] >= self._floor}

    def state_dict(self) -> dict[str, Any]:
        """Every accepted id, for the checkpoint being written; commits them (see above)."""
        self._uncommitted = set()
        seen = {str(r): sorted([s, m] for s, m in ids) for r, ids in sorted(self._seen.items())}
        return {"floor": self._floor, "seen": seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this guard's state with one from `state_dict` (ValueError if malformed)."""
        try:
            floor = state["floor"]
            seen_in = state["seen"]
            if type(floor) is not int or floor < 0 or not isinstance(seen_in, Mapping):
                raise TypeError("floor must be a non-negative int and seen a mapping")
            seen: dict[int, set[tuple[str, str]]] = {}
            for key, entries in seen_in.items():
                round_ = int(key)
                if str(round_) != key or round_ < floor:
                    raise TypeError(f"round key {key!r} is not a round at or above the floor")
                pairs: set[tuple[str, str]] = set()
                for entry in entries:
                    if (
                        not isinstance(entry, list | tuple)
                        or len(entry) != 2
                        or not all(isinstance(part, str) for part in entry)
                    ):
                        raise TypeError(f"entry {entry!r} is not [sender, message_id]")
                    pairs.add((entry[0], entry[1]))
                seen[round_] = pairs
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"not a ReplayGuard state ({exc}); pass what ReplayGuard.state_dict() returned"
            ) from None
        self._floor, self._seen, self._uncommitted = floor, seen, set()
