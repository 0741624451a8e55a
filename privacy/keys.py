"""Party identities: key pairs on disk, the public keys peers pin, and the trust store.

Each party (a silo or the aggregator) holds one or more key *generations*. A generation is an
Ed25519 key (signs what the party sends) and an X25519 key (receives what is sealed to it),
named by a key id derived from both public keys. Several generations coexist during a
rotation, each in one state:

- *active* (exactly one): signs what the party sends;
- *pending* (at most one, the newest): made by `rotate` and published in `public.json`, so
  peers that pin it encrypt to it, but it does not sign until `activate`: no peer is ever
  sent a signature by a key it has not pinned yet;
- *older*: kept only so messages still sealed to it can be opened, until `retire`.

Every generation decrypts. `public.json` lists the newest first (what peers encrypt to).

Rotation without an outage, each step safe whatever the order messages arrive in:

1. `fedsilo keys rotate`: a pending key; the party still signs with the old one.
2. every peer `fedsilo trust add trust.json public.json`: it now encrypts to the new key and
   accepts signatures by both (running processes re-read the trust file).
3. `fedsilo keys activate`: the party signs with the new key (peers pinned it in step 2).
4. `fedsilo keys retire OLD`: the old private key is deleted; every peer
   `fedsilo trust retire trust.json PARTY OLD`: the peer refuses it from then on, by name.

Retired keys are recorded (here in `keyring.json`, at peers in the trust file) with the time
they were retired, so a message signed with or sealed to one is refused with a reason that
says so, and a stale `public.json` cannot pin a retired key again.

Why pinning: a peer's public keys reach a party out of band (`fedsilo provision`) and are
stored with their fingerprint; every load recomputes the fingerprint and key id, so an edited
or corrupted trust file is refused instead of silently trusting a substituted key.

Keyring folder (owner-only, 0700)::

    keyring.json                 0600  party, active key id, key ids with creation time
    <key_id>.ed25519.pem         0600  PKCS8 PEM, unencrypted (the folder is the protection)
    <key_id>.x25519.pem          0600
    public.json                  0644  PartyKeys: what to hand to peers

Every file is written atomically (temporary file in the same folder, fsync, rename) and
created with its final mode, so a secret is never readable by others, not even briefly.
`keyring.json` is the commit point: a key exists once it is listed there, and `public.json`
is rewritten after it, so a crash in between leaves peers encrypting to a key still held.
One writer at a time (the `fedsilo keys` command); readers pick changes up via `refresh`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedsilo.sdk.files import fsync_dir, write_atomic

__all__ = [
    "KEYRING_FILE",
    "PUBLIC_FILE",
    "Keyring",
    "KeysError",
    "PartyKeys",
    "PublicKey",
    "RetiredKey",
    "RetiredKeyError",
    "TrustFile",
    "TrustStore",
]

KEYRING_FILE = "keyring.json"
PUBLIC_FILE = "public.json"
_KEYRING_FORMAT = "fedsilo-keyring"
_KEYRING_VERSION = 1
_FINGERPRINT_DOMAIN = b"fedsilo-key-v1"
_FINGERPRINT_PREFIX = "sha256:"
_KEY_ID_LEN = 16
_MAX_NAME_LEN = 256
_PUBLIC_FIELDS = frozenset({"key_id", "signing", "encryption", "fingerprint"})
_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")
_FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{64}")


class KeysError(ValueError):
    """A key file or trust file that cannot be used; says why and what to do."""


class RetiredKeyError(KeysError):
    """A key its party retired: refused, with when and what to do."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _check_name(value: object, what: str) -> str:
    """Party and federation names end up in headers and log lines: keep them printable."""
    if (
        not isinstance(value, str)
        or not value
        or len(value) > _MAX_NAME_LEN
        or not value.isprintable()
        or value != value.strip()
    ):
        raise KeysError(
            f"{what} must be a non-empty printable string of at most {_MAX_NAME_LEN} "
            f"characters without surrounding spaces, got {value!r}"
        )
    return value


def _is_int(value: object, expected: int) -> bool:
    return type(value) is int and value == expected  # not a bool, not 1.0


def _fingerprint(signing: bytes, encryption: bytes) -> str:
    digest = hashlib.sha256(_FINGERPRINT_DOMAIN + signing + encryption).hexdigest()
    return _FINGERPRINT_PREFIX + digest


def _b64decode(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise KeysError(f"{what} must be a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise KeysError(f"{what} is not valid base64: {value!r}") from None


def _raw_public(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


@dataclass(frozen=True)
class PublicKey:
    """One key generation's public half. The key id is derived, so it cannot be forged apart
    from the keys it names; construct from raw keys with `from_raw`."""

    key_id: str
    signing: bytes
    encryption: bytes

    def __post_init__(self) -> None:
        for name in ("signing", "encryption"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != 32:
                got = len(value) if isinstance(value, bytes) else type(value).__name__
                raise KeysError(f"{name} key must be 32 raw bytes, got {got}")
        try:
            Ed25519PublicKey.from_public_bytes(self.signing)
        except ValueError as exc:
            raise KeysError(f"signing key is not a valid Ed25519 public key ({exc})") from None
        expected = self.fingerprint.removeprefix(_FINGERPRINT_PREFIX)[:_KEY_ID_LEN]
        if self.key_id != expected:
            raise KeysError(
                f"key id {self.key_id!r} does not match its keys (expected {expected!r}); "
                "the key material was altered or mixed up: fetch the party's public keys again"
            )

    @classmethod
    def from_raw(cls, signing: bytes, encryption: bytes) -> PublicKey:
        """The public key for raw Ed25519 and X25519 public keys, with its derived id."""
        signing, encryption = bytes(signing), bytes(encryption)
        digest = _fingerprint(signing, encryption).removeprefix(_FINGERPRINT_PREFIX)
        return cls(digest[:_KEY_ID_LEN], signing, encryption)

    @property
    def fingerprint(self) -> str:
        """What operators compare out of band: `sha256:` + hex over both public keys."""
        return _fingerprint(self.signing, self.encryption)

    def to_dict(self) -> dict[str, str]:
        return {
            "key_id": self.key_id,
            "signing": base64.b64encode(self.signing).decode("ascii"),
            "encryption": base64.b64encode(self.encryption).decode("ascii"),
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PublicKey:
        """Parse and re-check a pinned key: the stored fingerprint and key id must be the
        ones recomputed from the keys, else the entry was tampered with."""
        if not isinstance(d, Mapping):
            raise KeysError(f"a public key must be a JSON object, got {type(d).__name__}")
        missing = sorted(_PUBLIC_FIELDS - d.keys())
        unknown = sorted(set(d) - _PUBLIC_FIELDS)
        if missing or unknown:
            raise KeysError(
                f"a public key needs exactly the fields {sorted(_PUBLIC_FIELDS)}; "
                f"missing {missing}, unknown {unknown}"
            )
        signing = _b64decode(d["signing"], "signing key")
        encryption = _b64decode(d["encryption"], "encryption key")
        key = cls.from_raw(signing, encryption)  # validates lengths
        if d["fingerprint"] != key.fingerprint or d["key_id"] != key.key_id:
            raise KeysError(
                f"pinned key {d['key_id']!r} does not match its stored fingerprint "
                f"{d['fingerprint']!r} (recomputed {key.key_id!r}, {key.fingerprint!r}); "
                "the entry was altered: get the party's public keys again and compare the "
                "fingerprint with its operator"
            )
        return key

    def __repr__(self) -> str:
        return f"PublicKey(key_id={self.key_id!r}, fingerprint={self.fingerprint!r})"


@dataclass(frozen=True)
class RetiredKey:
    """A key its party retired, recorded so that it is refused by name (which key, since
    when) rather than merely unknown, and is never pinned or used again."""

    key_id: str
    retired: str  # when it was retired (ISO 8601, UTC), as recorded where this is stored
    fingerprint: str | None = None  # known when the key was held or pinned at retirement

    def __post_init__(self) -> None:
        if not isinstance(self.key_id, str) or not _KEY_ID_RE.fullmatch(self.key_id):
            raise KeysError(f"a retired key id must be 16 lowercase hex characters, got "
                            f"{self.key_id!r}")
        try:
            datetime.fromisoformat(self.retired)
        except (TypeError, ValueError):
            raise KeysError(f"retired key {self.key_id!r}: 'retired' must be an ISO 8601 "
                            f"time, got {self.retired!r}") from None
        if self.fingerprint is not None and (
            not isinstance(self.fingerprint, str)
            or not _FINGERPRINT_RE.fullmatch(self.fingerprint)
            or self.fingerprint[len(_FINGERPRINT_PREFIX):][:_KEY_ID_LEN] != self.key_id
        ):
            raise KeysError(f"retired key {self.key_id!r}: fingerprint {self.fingerprint!r} "
                            "is not the fingerprint of that key id; the entry was altered")

    def to_dict(self) -> dict[str, str]:
        d = {"key_id": self.key_id, "retired": self.retired}
        if self.fingerprint is not None:
            d["fingerprint"] = self.fingerprint
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RetiredKey:
        if (
            not isinstance(d, Mapping)
            or not {"key_id", "retired"} <= set(d) <= {"key_id", "retired", "fingerprint"}
        ):
            raise KeysError(f"a retired key needs 'key_id' and 'retired' (and optionally "
                            f"'fingerprint'), got {d!r}")
        return cls(d["key_id"], d["retired"], d.get("fingerprint"))


@dataclass(frozen=True)
class PartyKeys:
    """The public side of one party: what its peers pin."""

    party: str
    # Newest first; keys[0] is the key senders encrypt to. At the party it may still be
    # pending (it decrypts there but does not sign yet): see the module docstring.
    keys: tuple[PublicKey, ...]

    def __post_init__(self) -> None:
        _check_name(self.party, "party name")
        keys = tuple(self.keys)
        object.__setattr__(self, "keys", keys)
        if not keys:
            raise KeysError(f"party {self.party!r} has no public keys; pin at least one")
        if not all(isinstance(k, PublicKey) for k in keys):
            raise KeysError(f"party {self.party!r}: keys must be PublicKey instances")
        ids = [k.key_id for k in keys]
        if len(set(ids)) != len(ids):
            raise KeysError(f"party {self.party!r} lists a key id twice: {ids}")

    @property
    def active(self) -> PublicKey:
        """The key senders encrypt to (the newest)."""
        return self.keys[0]

    def get(self, key_id: str) -> PublicKey | None:
        """The key with id (or fingerprint) `key_id`, if listed."""
        return next((k for k in self.keys if key_id in (k.key_id, k.fingerprint)), None)

    def to_dict(self) -> dict[str, Any]:
        return {"party": self.party, "keys": [k.to_dict() for k in self.keys]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PartyKeys:
        if not isinstance(d, Mapping) or set(d) != {"party", "keys"}:
            got = sorted(d) if isinstance(d, Mapping) else type(d).__name__
            raise KeysError(f"party keys must be an object with 'party' and 'keys', got {got}")
        party = _check_name(d["party"], "party name")
        if not isinstance(d["keys"], list):
            raise KeysError(f"party {party!r}: 'keys' must be a list of public keys")
        try:
            keys = tuple(PublicKey.from_dict(k) for k in d["keys"])
        except KeysError as exc:
            raise KeysError(f"party {party!r}: {exc}") from None
        return cls(party, keys)

    def save(self, path: Path) -> None:
        """Write atomically, world-readable (0644): this is what peers are handed."""
        write_atomic(Path(path), _dump_json(self.to_dict()), 0o644)

    @classmethod
    def load(cls, path: Path) -> PartyKeys:
        path = Path(path)
        document = _read_json(path, "party public keys")
        try:
            return cls.from_dict(document)
        except KeysError as exc:
            raise KeysError(f"party public keys {path}: {exc}") from None


@dataclass(frozen=True)
class _Generation:
    """One key generation with its private halves (never printed: no repr)."""

    public: PublicKey
    created: str
    signing: Ed25519PrivateKey
    encryption: X25519PrivateKey


@dataclass(frozen=True)
class _KeyringState:
    """What `keyring.json` and the PEM files said when read; swapped whole on refresh."""

    party: str
    generations: tuple[_Generation, ...]  # active first, then as listed (newest first)
    pending: str | None  # the pending key's id while a rotation is under way
    retired: tuple[RetiredKey, ...]  # oldest first
    stamp: tuple[int, ...]  # identity of the keyring.json that was read


class Keyring:
    """A party's private keys, in an owner-only folder. Several keys during a rotation: the
    active one signs; a pending one (newest, advertised) and older ones only decrypt."""

    def __init__(self, folder: Path, state: _KeyringState) -> None:
        """Use `create` or `load`; this only wraps state already read from `folder`."""
        self.folder = Path(folder)
        self._state = state

    def __repr__(self) -> str:
        return (
            f"Keyring(party={self.party!r}, folder={str(self.folder)!r}, active={self.active}, "
            f"pending={self.pending})"
        )

    # -- lifecycle -----------------------------------------------------------------------

    @classmethod
    def create(cls, folder: Path, party: str) -> Keyring:
        """A new keyring with one key (`fedsilo keys init`). Refuses a folder that already
        holds one, so an existing identity is never overwritten."""
        folder = Path(folder)
        party = _check_name(party, "party name")
        if (folder / KEYRING_FILE).exists():
            raise KeysError(
                f"{folder} already holds a keyring; load it (or rotate its key with "
                "`fedsilo keys rotate`) instead, or choose an empty folder"
            )
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)  # an existing folder may have been made with a wider mode
        generation = _new_generation(folder)
        _write_keyring(folder, party, (generation,), generation.public.key_id, None, ())
        keyring = cls(folder, _read_state(folder))
        keyring.public().save(folder / PUBLIC_FILE)
        return keyring

    @classmethod
    def load(cls, folder: Path) -> Keyring:
        """Read a keyring, refusing one whose files others could read."""
        return cls(Path(folder), _read_state(Path(folder)))

    def refresh(self) -> None:
        """Re-read the folder if `keyring.json` changed (a rotation by `fedsilo keys`), so a
        running service adopts the new key without a restart. Keeps the old state and raises
        KeysError if the changed keyring cannot be used."""
        if _stamp(self.folder / KEYRING_FILE) != self._state.stamp:
            self._state = _read_state(self.folder)

    # -- reading -------------------------------------------------------------------------

    @property
    def party(self) -> str:
        return self._state.party

    @property
    def active(self) -> PublicKey:
        """The key that signs what this party sends."""
        return self._state.generations[0].public

    @property
    def pending(self) -> PublicKey | None:
        """The key made by `rotate` and not activated yet (it decrypts, it does not sign)."""
        state = self._state
        return next((g.public for g in state.generations if g.public.key_id == state.pending),
                    None)

    @property
    def retired(self) -> tuple[RetiredKey, ...]:
        """The keys this party retired, oldest first (their private halves are deleted)."""
        return self._state.retired

    def retired_key(self, key_id: str) -> RetiredKey | None:
        return next((r for r in self._state.retired if r.key_id == key_id), None)

    def public(self) -> PartyKeys:
        """All keys, newest first: the pending key (if any), the active one, older ones."""
        return PartyKeys(self.party, tuple(g.public for g in _ordered(self._state)))

    def sign(self, data: bytes) -> tuple[str, bytes]:
        """(active key id, Ed25519 signature of `data`)."""
        generation = self._state.generations[0]  # one read: consistent under refresh
        return generation.public.key_id, generation.signing.sign(data)

    def exchange(self, key_id: str, peer_public: bytes) -> bytes:
        """X25519 shared secret between private key `key_id` and a peer's public key."""
        generation = self._generation(key_id)
        try:
            peer = X25519PublicKey.from_public_bytes(bytes(peer_public))
            return generation.encryption.exchange(peer)
        except ValueError as exc:  # wrong length, or a low-order point (all-zero secret)
            raise KeysError(f"cannot agree a key with the peer's public key: {exc}") from None

    def _generation(self, key_id: str) -> _Generation:
        for generation in self._state.generations:
            if generation.public.key_id == key_id:
                return generation
        retired = self.retired_key(key_id)
        if retired is not None:
            raise RetiredKeyError(
                f"key {key_id!r} of {self.party!r} was retired on {retired.retired}; its "
                f"private key is deleted. Keys held: {self._ids()}"
            )
        raise KeysError(
            f"keyring {self.folder} ({self.party}) has no key {key_id!r}; it holds "
            f"{self._ids()}"
        )

    def _ids(self) -> list[str]:
        return [g.public.key_id for g in _ordered(self._state)]

    # -- rotation ------------------------------------------------------------------------

    def rotate(self) -> PublicKey:
        """Add a new *pending* key: it is published first in `public.json` and decrypts, but
        the active key goes on signing until `activate`, so peers that have not pinned the
        new key yet keep verifying everything. Refused while a rotation is under way."""
        self.refresh()
        state = self._state
        pending = self.pending
        if pending is not None:
            raise KeysError(
                f"{self.party!r} already has a pending key {pending.key_id!r} (a rotation is "
                "under way): once every peer has pinned it, activate it (`fedsilo keys "
                f"activate`), or give it up (`fedsilo keys retire {pending.key_id}`)"
            )
        generation = _new_generation(self.folder)
        _write_keyring(self.folder, self.party, (generation, *_ordered(state)),
                       self.active.key_id, generation.public.key_id, state.retired)
        self._state = _read_state(self.folder)
        self.public().save(self.folder / PUBLIC_FILE)
        return generation.public

    def activate(self, key_id: str | None = None) -> PublicKey:
        """Sign with the pending key from now on (the previous active key becomes an older
        key that still decrypts). Do this once every peer has pinned the new `public.json`:
        a peer that has not would refuse what this party signs. `public.json` is unchanged
        (it already lists the new key first)."""
        self.refresh()
        state = self._state
        pending = self.pending
        if pending is None:
            raise KeysError(
                f"{self.party!r} has no pending key to activate (active: "
                f"{self.active.key_id!r}); make one with `fedsilo keys rotate`"
            )
        if key_id is not None and key_id not in (pending.key_id, pending.fingerprint):
            raise KeysError(
                f"{key_id!r} is not the pending key of {self.party!r} (pending: "
                f"{pending.key_id!r}, active: {self.active.key_id!r})"
            )
        _write_keyring(self.folder, self.party, _ordered(state), pending.key_id, None,
                       state.retired)
        self._state = _read_state(self.folder)
        self.public().save(self.folder / PUBLIC_FILE)
        return pending

    def retire(self, key_id: str) -> RetiredKey:
        """Forget a non-active key (an older one, or the pending one to give up a rotation),
        delete its private files and record it as retired. Peers refuse it once they run
        `fedsilo trust retire`."""
        self.refresh()
        state = self._state
        already = self.retired_key(key_id)
        if already is not None:
            raise RetiredKeyError(
                f"key {key_id!r} of {self.party!r} was already retired on {already.retired}"
            )
        retired = self._generation(key_id)
        if retired is state.generations[0]:
            if state.pending is not None:
                hint = (f"activate the pending key {state.pending!r} first (`fedsilo keys "
                        "activate`, once every peer has pinned it), then retire this one")
            else:
                hint = ("rotate first (`fedsilo keys rotate`), have every peer pin the new "
                        "public.json, activate it (`fedsilo keys activate`), then retire "
                        "this one")
            raise KeysError(
                f"key {key_id!r} is the active key of {self.party!r} (it signs what this "
                f"party sends); {hint}"
            )
        remaining = tuple(g for g in _ordered(state) if g is not retired)
        record = RetiredKey(key_id, _now(), retired.public.fingerprint)
        pending = None if state.pending == key_id else state.pending
        _write_keyring(self.folder, self.party, remaining, self.active.key_id, pending,
                       (*state.retired, record))
        self._state = _read_state(self.folder)
        self.public().save(self.folder / PUBLIC_FILE)
        for suffix in (".ed25519.pem", ".x25519.pem"):
            with contextlib.suppress(FileNotFoundError):
                (self.folder / f"{key_id}{suffix}").unlink()
        fsync_dir(self.folder)
        return record


def _ordered(state: _KeyringState) -> tuple[_Generation, ...]:
    """Newest first: the pending key (if any), then the active one, then older ones."""
    pending = tuple(g for g in state.generations if g.public.key_id == state.pending)
    return pending + tuple(g for g in state.generations if g.public.key_id != state.pending)


def _new_generation(folder: Path) -> _Generation:
    signing = Ed25519PrivateKey.generate()
    encryption = X25519PrivateKey.generate()
    public = PublicKey.from_raw(_raw_public(signing), _raw_public(encryption))
    for suffix, key in ((".ed25519.pem", signing), (".x25519.pem", encryption)):
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_atomic(folder / f"{public.key_id}{suffix}", pem, 0o600)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    return _Generation(public, created, signing, encryption)


def _write_keyring(
    folder: Path,
    party: str,
    generations: tuple[_Generation, ...],
    active: str,
    pending: str | None,
    retired: tuple[RetiredKey, ...],
) -> None:
    """`pending` and `retired` are written only when present, so a keyring without a
    rotation under way reads the same as before they existed."""
    document: dict[str, Any] = {
        "format": _KEYRING_FORMAT,
        "version": _KEYRING_VERSION,
        "party": party,
        "active": active,
        "keys": [{"key_id": g.public.key_id, "created": g.created} for g in generations],
    }
    if pending is not None:
        document["pending"] = pending
    if retired:
        document["retired"] = [r.to_dict() for r in retired]
    write_atomic(folder / KEYRING_FILE, _dump_json(document), 0o600)


def _check_private_mode(path: Path, st: os.stat_result, is_folder: bool) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        wanted = "700" if is_folder else "600"
        raise KeysError(
            f"{path} is accessible by group or others (mode {mode:04o}); private keys must be "
            f"owner-only: run chmod {wanted} {path}"
        )


def _read_state(folder: Path) -> _KeyringState:
    try:
        folder_stat = folder.stat()
    except FileNotFoundError:
        raise KeysError(
            f"no keyring at {folder}: create one with `fedsilo keys init`, or fix the path"
        ) from None
    except OSError as exc:
        raise KeysError(f"cannot read keyring folder {folder}: {exc}") from None
    if not stat.S_ISDIR(folder_stat.st_mode):
        raise KeysError(f"keyring path {folder} is not a folder; point to the keyring folder")
    _check_private_mode(folder, folder_stat, is_folder=True)
    path = folder / KEYRING_FILE
    if not path.exists():
        raise KeysError(
            f"no keyring at {folder} ({KEYRING_FILE} is missing): create one with "
            "`fedsilo keys init`, or fix the path"
        )
    stamp = _stamp(path)  # before reading: a change during the read shows up next refresh
    document = _read_json(path, "keyring")
    version = document.get("version")
    if document.get("format") != _KEYRING_FORMAT or not _is_int(version, _KEYRING_VERSION):
        raise KeysError(
            f"{path} is not a version-{_KEYRING_VERSION} fedsilo keyring (format "
            f"{document.get('format')!r}, version {version!r}); point to a keyring folder"
        )
    try:
        party = _check_name(document.get("party"), "party name")
    except KeysError as exc:
        raise KeysError(f"{path}: {exc}") from None
    entries = document.get("keys")
    if not isinstance(entries, list) or not entries:
        raise KeysError(f"{path}: 'keys' must be a non-empty list; restore the keyring")
    generations: list[_Generation] = []
    for entry in entries:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("key_id"), str)
            or not isinstance(entry.get("created"), str)
        ):
            raise KeysError(f"{path}: malformed key entry {entry!r}; restore the keyring")
        generations.append(_read_generation(folder, entry["key_id"], entry["created"]))
    ids = [g.public.key_id for g in generations]
    if len(set(ids)) != len(ids):
        raise KeysError(f"{path} lists a key id twice: {ids}; restore the keyring")
    active = document.get("active")
    if active not in ids:
        raise KeysError(f"{path}: active key {active!r} is not among its keys {ids}")
    pending = document.get("pending")
    if pending is not None and (pending not in ids or pending == active):
        raise KeysError(f"{path}: pending key {pending!r} is not one of its non-active keys "
                        f"{ids}; restore the keyring")
    entries = document.get("retired", [])
    if not isinstance(entries, list):
        raise KeysError(f"{path}: 'retired' must be a list; restore the keyring")
    try:
        retired = tuple(RetiredKey.from_dict(entry) for entry in entries)
    except KeysError as exc:
        raise KeysError(f"{path}: {exc}") from None
    if any(r.key_id in ids for r in retired):
        raise KeysError(f"{path} lists a key as both held and retired; restore the keyring")
    generations.sort(key=lambda g: g.public.key_id != active)  # stable: active first
    return _KeyringState(party, tuple(generations), pending, retired, stamp)


def _read_generation(folder: Path, key_id: str, created: str) -> _Generation:
    keys: list[Any] = []
    for suffix, kind in ((".ed25519.pem", Ed25519PrivateKey), (".x25519.pem", X25519PrivateKey)):
        path = folder / f"{key_id}{suffix}"
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise KeysError(
                f"private key file {path} is missing; restore it from a backup, or retire "
                f"key {key_id!r}"
            ) from None
        except OSError as exc:
            raise KeysError(f"cannot read private key file {path}: {exc}") from None
        with os.fdopen(fd, "rb") as f:
            _check_private_mode(path, os.fstat(f.fileno()), is_folder=False)
            pem = f.read()
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeysError(
                f"{path} is not an unencrypted PKCS8 PEM private key; restore it from a backup"
            ) from None
        if not isinstance(key, kind):
            raise KeysError(f"{path} holds a {type(key).__name__}, expected {kind.__name__}")
        keys.append(key)
    signing, encryption = keys
    public = PublicKey.from_raw(_raw_public(signing), _raw_public(encryption))
    if public.key_id != key_id:
        raise KeysError(
            f"the private key files of {key_id!r} in {folder} belong to key "
            f"{public.key_id!r}; they were swapped or replaced: restore them from a backup"
        )
    return _Generation(public, created, signing, encryption)


class TrustStore:
    """Pinned public keys of the parties this one talks to (what `fedsilo provision` hands
    out), and the keys those parties retired: refused by name, never pinned again."""

    federation: str
    parties: dict[str, PartyKeys]
    retired: dict[str, tuple[RetiredKey, ...]]  # per party, oldest first

    def __init__(
        self,
        federation: str,
        parties: Mapping[str, PartyKeys] = MappingProxyType({}),
        retired: Mapping[str, Iterable[RetiredKey]] = MappingProxyType({}),
    ) -> None:
        self.federation = _check_name(federation, "federation name")
        self.parties = {}
        for name, keys in parties.items():
            if not isinstance(keys, PartyKeys) or keys.party != name:
                raise KeysError(f"trust entry {name!r} must be the PartyKeys of party {name!r}")
            self.parties[name] = keys
        self.retired = {}
        for name, records in retired.items():
            _check_name(name, "party name")
            records = tuple(records)
            if not all(isinstance(r, RetiredKey) for r in records):
                raise KeysError(f"retired keys of {name!r} must be RetiredKey instances")
            ids = [r.key_id for r in records]
            if len(set(ids)) != len(ids):
                raise KeysError(f"party {name!r} lists a retired key twice: {ids}")
            if records:
                self.retired[name] = records
        for name, keys in self.parties.items():
            for key in keys.keys:
                record = self.retired_key(name, key.key_id)
                if record is not None:
                    raise KeysError(
                        f"key {key.key_id!r} of {name!r} is both pinned and retired (on "
                        f"{record.retired}); the trust file was edited by hand: remove the "
                        "key from the party's pinned keys"
                    )

    def __repr__(self) -> str:
        return f"TrustStore(federation={self.federation!r}, parties={sorted(self.parties)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrustStore):
            return NotImplemented
        return (self.federation, self.parties, self.retired) == (
            other.federation, other.parties, other.retired
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def retired_key(self, party: str, key_id: str) -> RetiredKey | None:
        """The record of `party`'s retired key `key_id` (id or fingerprint), if retired."""
        return next(
            (r for r in self.retired.get(party, ()) if key_id in (r.key_id, r.fingerprint)),
            None,
        )

    def add(self, keys: PartyKeys) -> tuple[RetiredKey, ...]:
        """Pin `keys`, replacing what was pinned for that party. Keys retired here are not
        pinned again (a stale public.json cannot bring one back): they are returned. Raises
        RetiredKeyError if every key in `keys` is retired."""
        dropped = tuple(
            r for k in keys.keys if (r := self.retired_key(keys.party, k.key_id)) is not None
        )
        if dropped:
            remaining = tuple(k for k in keys.keys if self.retired_key(keys.party, k.key_id)
                              is None)
            if not remaining:
                raise RetiredKeyError(
                    f"every key of {keys.party!r} offered here was retired "
                    f"({', '.join(f'{r.key_id} on {r.retired}' for r in dropped)}); this is "
                    f"a stale public.json: get {keys.party!r}'s current one"
                )
            keys = PartyKeys(keys.party, remaining)
        self.parties[keys.party] = keys
        return dropped

    def retire(self, party: str, key: str, when: str | None = None) -> RetiredKey:
        """Refuse `party`'s key `key` (a key id or fingerprint) from now on: unpin it and
        record it as retired, so a message signed with it is refused with a reason saying so,
        nothing is sealed to it, and it is never pinned again. A key that is no longer pinned
        may be retired too. Retiring a retired key returns its record unchanged."""
        known = self.party(party)  # KeysError for an unknown party
        existing = self.retired_key(party, key)
        if existing is not None:
            return existing
        match = known.get(key)
        when = _now() if when is None else when
        if match is not None:
            remaining = tuple(k for k in known.keys if k is not match)
            if not remaining:
                raise KeysError(
                    f"{match.key_id} is the only key pinned for {party!r}; pin its new "
                    "public.json first (`fedsilo trust add`), then retire the old key"
                )
            record = RetiredKey(match.key_id, when, match.fingerprint)
            self.parties[party] = PartyKeys(party, remaining)
        elif _FINGERPRINT_RE.fullmatch(key):
            record = RetiredKey(key.removeprefix(_FINGERPRINT_PREFIX)[:_KEY_ID_LEN], when, key)
        elif _KEY_ID_RE.fullmatch(key):
            record = RetiredKey(key, when)
        else:
            raise KeysError(
                f"{key!r} is neither a key id (16 lowercase hex characters) nor a fingerprint "
                f"(sha256: and 64 hex characters); copy it from `fedsilo keys show` at {party}"
            )
        self.retired[party] = (*self.retired.get(party, ()), record)
        return record

    def party(self, name: str) -> PartyKeys:
        keys = self.parties.get(name)
        if keys is None:
            raise KeysError(
                f"unknown party {name!r} in federation {self.federation!r}; pinned parties: "
                f"{sorted(self.parties)}. Add its public keys to the trust file"
            )
        return keys

    def key(self, party: str, key_id: str) -> PublicKey:
        """`party`'s pinned key `key_id`; KeysError if not pinned, RetiredKeyError (with
        when and what to do) if `party` retired it."""
        known = self.party(party)
        record = self.retired_key(party, key_id)
        if record is not None:
            raise RetiredKeyError(
                f"key {record.key_id!r} of {party!r} was retired on {record.retired} (this "
                "trust file records it) and is no longer trusted: what it signs is refused. "
                f"If {party!r} still signs with it, its operator must activate the new key "
                f"(`fedsilo keys activate`), and this side pin {party!r}'s current public.json "
                "(`fedsilo trust add`) if it has not"
            )
        key = known.get(key_id)
        if key is None:
            pinned = [k.key_id for k in self.party(party).keys]
            raise KeysError(
                f"key {key_id!r} is not pinned for party {party!r} (pinned: {pinned}); if the "
                "party rotated its key, add its new public keys to the trust file"
            )
        return key

    def to_dict(self) -> dict[str, Any]:
        """`retired` only when a key was retired, so older trust files read the same."""
        document: dict[str, Any] = {
            "federation": self.federation,
            "parties": {name: keys.to_dict() for name, keys in sorted(self.parties.items())},
        }
        if self.retired:
            document["retired"] = {
                name: [r.to_dict() for r in records]
                for name, records in sorted(self.retired.items())
            }
        return document

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrustStore:
        if not isinstance(d, Mapping) or not (
            {"federation", "parties"} <= set(d) <= {"federation", "parties", "retired"}
        ):
            got = sorted(d) if isinstance(d, Mapping) else type(d).__name__
            raise KeysError(
                f"a trust file must hold 'federation' and 'parties' (and optionally "
                f"'retired'), got {got}"
            )
        if not isinstance(d["parties"], Mapping):
            raise KeysError("'parties' must map party names to their public keys")
        parties = {name: PartyKeys.from_dict(keys) for name, keys in d["parties"].items()}
        retired_in = d.get("retired", {})
        if not isinstance(retired_in, Mapping) or not all(
            isinstance(v, list) for v in retired_in.values()
        ):
            raise KeysError("'retired' must map party names to lists of retired keys")
        retired: dict[str, tuple[RetiredKey, ...]] = {}
        for name, entries in retired_in.items():
            try:
                retired[name] = tuple(RetiredKey.from_dict(e) for e in entries)
            except KeysError as exc:
                raise KeysError(f"party {name!r}: {exc}") from None
        return cls(d["federation"], parties, retired)

    def save(self, path: Path) -> None:
        """Write atomically (0644: public keys only)."""
        write_atomic(Path(path), _dump_json(self.to_dict()), 0o644)

    @classmethod
    def load(cls, path: Path) -> TrustStore:
        path = Path(path)
        document = _read_json(path, "trust file")
        try:
            return cls.from_dict(document)
        except KeysError as exc:
            raise KeysError(f"trust file {path}: {exc}") from None


class TrustFile:
    """A TrustStore that re-reads its file when it changes (mtime/size), so a peer's new key
    can be added and an old one retired without restarting the process."""

    def __init__(self, path: Path) -> None:
        """Reads the file now, so a missing or broken trust file fails at startup."""
        self.path = Path(path)
        self._stamp = _stamp(self.path)
        self._store = TrustStore.load(self.path)

    def current(self) -> TrustStore:
        """The store as of the file's latest content. If a changed file cannot be read (say,
        an editor mid-save) this raises KeysError and retries on the next call."""
        stamp = _stamp(self.path)
        if stamp != self._stamp:
            store = TrustStore.load(self.path)
            self._store, self._stamp = store, stamp
        return self._store


# -- files -----------------------------------------------------------------------------


def _stamp(path: Path) -> tuple[int, ...]:
    """Identity of a file's current content: a rename over it changes the inode, an
    in-place edit the size or mtime."""
    try:
        st = path.stat()
    except OSError:
        return ()
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _dump_json(document: Mapping[str, Any]) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise KeysError(f"{what} {path} does not exist; check the path") from None
    except OSError as exc:
        raise KeysError(f"cannot read {what} {path}: {exc}") from None
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise KeysError(
            f"{what} {path} is not valid JSON ({exc}); restore it or fetch it again"
        ) from None
    if not isinstance(document, dict):
        raise KeysError(f"{what} {path} must hold a JSON object")
    return document
