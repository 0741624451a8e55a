"""Keyrings on disk, pinned public keys and trust files (real keys, real files)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedsilo.privacy.envelope import EnvelopeError, open_sealed, seal
from fedsilo.privacy.keys import (
    KEYRING_FILE,
    PUBLIC_FILE,
    Keyring,
    KeysError,
    PartyKeys,
    PublicKey,
    RetiredKeyError,
    TrustFile,
    TrustStore,
)

FEDERATION = "fed-test"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _private_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.pem"))


# -- keyring ---------------------------------------------------------------------------


def test_create_then_load_round_trip(tmp_path: Path) -> None:
    created = Keyring.create(tmp_path / "keys", "silo-1")
    loaded = Keyring.load(tmp_path / "keys")

    assert loaded.party == created.party == "silo-1"
    assert loaded.active == created.active
    assert loaded.public() == created.public()
    assert PartyKeys.load(tmp_path / "keys" / PUBLIC_FILE) == created.public()
    key_id = created.active.key_id
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == sorted(
        [KEYRING_FILE, PUBLIC_FILE, f"{key_id}.ed25519.pem", f"{key_id}.x25519.pem"]
    )
    document = json.loads((tmp_path / "keys" / KEYRING_FILE).read_text())
    assert document["party"] == "silo-1"
    assert document["active"] == key_id
    assert [entry["key_id"] for entry in document["keys"]] == [key_id]
    assert document["keys"][0]["created"]


def test_signature_verifies_with_the_advertised_key(tmp_path: Path) -> None:
    keyring = Keyring.create(tmp_path / "keys", "silo-1")
    key_id, signature = keyring.sign(b"hello")
    assert key_id == keyring.active.key_id
    Ed25519PublicKey.from_public_bytes(keyring.active.signing).verify(signature, b"hello")


def test_both_sides_agree_the_same_secret(tmp_path: Path) -> None:
    a = Keyring.create(tmp_path / "a", "a")
    b = Keyring.create(tmp_path / "b", "b")
    shared_ab = a.exchange(a.active.key_id, b.active.encryption)
    assert shared_ab == b.exchange(b.active.key_id, a.active.encryption)
    with pytest.raises(KeysError, match="has no key"):
        a.exchange(b.active.key_id, b.active.encryption)
    with pytest.raises(KeysError, match="cannot agree"):
        a.exchange(a.active.key_id, bytes(32))  # all-zero point: no usable secret


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000])
def test_files_get_their_modes_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    with _umask(umask):
        keyring = Keyring.create(tmp_path / "keys", "silo-1")
        keyring.rotate()
    folder = tmp_path / "keys"
    assert _mode(folder) == 0o700
    assert _mode(folder / KEYRING_FILE) == 0o600
    assert _mode(folder / PUBLIC_FILE) == 0o644
    assert len(_private_files(folder)) == 4
    for path in _private_files(folder):
        assert _mode(path) == 0o600, path
    assert not list(folder.glob(".*.tmp"))


def test_create_narrows_an_existing_open_folder(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    Keyring.create(folder, "silo-1")
    assert _mode(folder) == 0o700
    Keyring.load(folder)


def test_load_refuses_a_group_readable_private_key(tmp_path: Path) -> None:
    keyring = Keyring.create(tmp_path / "keys", "silo-1")
    pem = tmp_path / "keys" / f"{keyring.active.key_id}.x25519.pem"
    os.chmod(pem, 0o640)
    with pytest.raises(KeysError, match="chmod 600") as caught:
        Keyring.load(tmp_path / "keys")
    assert str(pem) in str(caught.value)
    os.chmod(pem, 0o600)
    Keyring.load(tmp_path / "keys")


def test_load_refuses_a_folder_others_can_enter(tmp_path: Path) -> None:
    Keyring.create(tmp_path / "keys", "silo-1")
    os.chmod(tmp_path / "keys", 0o750)
    with pytest.raises(KeysError, match="chmod 700"):
        Keyring.load(tmp_path / "keys")


def test_load_of_a_missing_keyring_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(KeysError, match="fedsilo keys init"):
        Keyring.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir(mode=0o700)
    with pytest.raises(KeysError, match="fedsilo keys init"):
        Keyring.load(tmp_path / "empty")


def test_load_refuses_swapped_private_key_files(tmp_path: Path) -> None:
    keyring = Keyring.create(tmp_path / "keys", "silo-1")
    other = Keyring.create(tmp_path / "other", "silo-2")
    target = tmp_path / "keys" / f"{keyring.active.key_id}.ed25519.pem"
    target.write_bytes((tmp_path / "other" / f"{other.active.key_id}.ed25519.pem").read_bytes())
    with pytest.raises(KeysError, match="swapped or replaced"):
        Keyring.load(tmp_path / "keys")


def test_create_refuses_an_existing_keyring(tmp_path: Path) -> None:
    first = Keyring.create(tmp_path / "keys", "silo-1")
    with pytest.raises(KeysError, match="already holds a keyring"):
        Keyring.create(tmp_path / "keys", "someone-else")
    assert Keyring.load(tmp_path / "keys").active == first.active
    assert Keyring.load(tmp_path / "keys").party == "silo-1"


def test_repr_shows_no_private_key(tmp_path: Path) -> None:
    keyring = Keyring.create(tmp_path / "keys", "silo-1")
    secret = (tmp_path / "keys" / f"{keyring.active.key_id}.ed25519.pem").read_text()
    body = "".join(secret.splitlines()[1:-1])
    text = repr(keyring) + str(keyring) + repr(keyring.public())
    assert "PRIVATE" not in text and body not in text
    assert keyring.active.key_id in text


# -- rotation --------------------------------------------------------------------------


def _parties(tmp_path: Path) -> tuple[Keyring, Keyring, TrustStore]:
    """An aggregator keyring, a silo keyring, and the aggregator's trust store."""
    aggregator = Keyring.create(tmp_path / "agg", "aggregator")
    silo = Keyring.create(tmp_path / "silo", "silo-1")
    return aggregator, silo, TrustStore(FEDERATION, {"silo-1": silo.public()})


def test_rotate_makes_a_pending_key_that_decrypts_but_does_not_sign(tmp_path: Path) -> None:
    aggregator, silo, trust = _parties(tmp_path)
    old = aggregator.active
    in_flight = seal(
        b"sealed before the rotation", federation=FEDERATION, type="upload", round=1,
        sender=silo, recipient=aggregator.public(),
    )

    new = aggregator.rotate()

    # Pending: published first (peers that pin it seal to it), but the old key still signs.
    assert new != old and aggregator.pending == new and aggregator.active == old
    assert aggregator.sign(b"x")[0] == old.key_id
    assert [k.key_id for k in aggregator.public().keys] == [new.key_id, old.key_id]
    assert PartyKeys.load(tmp_path / "agg" / PUBLIC_FILE) == aggregator.public()
    reloaded = Keyring.load(tmp_path / "agg")
    assert (reloaded.active, reloaded.pending) == (old, new)
    assert json.loads((tmp_path / "agg" / KEYRING_FILE).read_text())["pending"] == new.key_id
    for me in (aggregator, reloaded):
        header, payload = open_sealed(in_flight, federation=FEDERATION, me=me, trust=trust)
        assert payload == b"sealed before the rotation" and header.recipient_key == old.key_id
    after = seal(
        b"sealed to the pending key", federation=FEDERATION, type="upload", round=2,
        sender=silo, recipient=reloaded.public(),
    )
    header, payload = open_sealed(after, federation=FEDERATION, me=aggregator, trust=trust)
    assert header.recipient_key == new.key_id and payload == b"sealed to the pending key"

    assert aggregator.activate(new.key_id) == new
    assert aggregator.active == new and aggregator.pending is None
    assert aggregator.sign(b"x")[0] == new.key_id
    assert [k.key_id for k in aggregator.public().keys] == [new.key_id, old.key_id]  # unchanged
    reloaded = Keyring.load(tmp_path / "agg")
    assert (reloaded.active, reloaded.pending) == (new, None)
    assert "pending" not in json.loads((tmp_path / "agg" / KEYRING_FILE).read_text())
    header, _ = open_sealed(in_flight, federation=FEDERATION, me=reloaded, trust=trust)
    assert header.recipient_key == old.key_id  # the old key still decrypts


def test_one_rotation_at_a_time_and_activate_checks_what_it_activates(tmp_path: Path) -> None:
    keyring = Keyring.create(tmp_path / "keys", "silo-1")
    old = keyring.active
    with pytest.raises(KeysError, match=r"no pending key to activate.*fedsilo keys rotate"):
        keyring.activate()
    new = keyring.rotate()
    with pytest.raises(KeysError, match=f"already has a pending key '{new.key_id}'.*activate"):
        keyring.rotate()
    with pytest.raises(KeysError, match=f"'{old.key_id}' is not the pending key"):
        keyring.activate(old.key_id)
    assert keyring.active == old
    assert keyring.activate(new.fingerprint) == new  # by id or by fingerprint
    assert keyring.rotate() not in (old, new)  # the next rotation may start


def test_retire_records_the_old_key_deletes_it_and_refuses_the_active_one(
    tmp_path: Path,
) -> None:
    aggregator, silo, trust = _parties(tmp_path)
    old = aggregator.active
    to_old = seal(
        b"late", federation=FEDERATION, type="upload", round=1, sender=silo,
        recipient=aggregator.public(),
    )
    new = aggregator.rotate()
    with pytest.raises(KeysError, match=r"active key.*activate the pending key"):
        aggregator.retire(old.key_id)  # it still signs: activate the new one first
    aggregator.activate()

    with pytest.raises(KeysError, match=r"active key.*rotate first"):
        aggregator.retire(new.key_id)
    with pytest.raises(KeysError, match="has no key"):
        aggregator.retire("0123456789abcdef")
    record = aggregator.retire(old.key_id)
    assert (record.key_id, record.fingerprint) == (old.key_id, old.fingerprint)
    with pytest.raises(KeysError, match="already retired on"):
        aggregator.retire(old.key_id)

    folder = tmp_path / "agg"
    assert not list(folder.glob(f"{old.key_id}.*"))
    assert [p.name.split(".")[0] for p in _private_files(folder)] == [new.key_id] * 2
    assert aggregator.public().keys == (new,)
    assert Keyring.load(folder).public().keys == (new,)
    assert Keyring.load(folder).retired == (record,)
    assert PartyKeys.load(folder / PUBLIC_FILE).keys == (new,)
    with pytest.raises(EnvelopeError) as caught:
        open_sealed(to_old, federation=FEDERATION, me=aggregator, trust=trust)
    assert caught.value.reason == "recipient"
    detail = caught.value.detail  # says which key, since when, and what the sender must do
    assert f"{old.key_id!r}, which 'aggregator' retired on {record.retired}" in detail
    assert "fedsilo trust add" in detail
    assert f"fedsilo trust retire trust.json aggregator {old.key_id}" in detail


def test_retiring_the_pending_key_gives_up_the_rotation(tmp_path: Path) -> None:
    keyring = Keyring.create(tmp_path / "keys", "silo-1")
    old = keyring.active
    abandoned = keyring.rotate()
    keyring.retire(abandoned.key_id)
    assert keyring.pending is None and keyring.active == old
    assert keyring.public().keys == (old,)
    assert [r.key_id for r in Keyring.load(tmp_path / "keys").retired] == [abandoned.key_id]
    assert keyring.rotate() != abandoned


def test_refresh_adopts_a_rotation_made_by_another_process(tmp_path: Path) -> None:
    Keyring.create(tmp_path / "keys", "silo-1")
    service = Keyring.load(tmp_path / "keys")
    cli = Keyring.load(tmp_path / "keys")
    before = service.active

    service.refresh()  # unchanged: nothing to do
    assert service.active == before
    new = cli.rotate()
    assert service.pending is None
    service.refresh()
    assert service.pending == new and service.active == before
    assert service.sign(b"x")[0] == before.key_id  # pending: does not sign yet
    cli.activate()
    service.refresh()
    assert service.active == new and service.sign(b"x")[0] == new.key_id

    cli.retire(before.key_id)
    service.refresh()
    assert service.public().keys == (new,)
    assert [r.key_id for r in service.retired] == [before.key_id]


def test_refresh_keeps_the_working_keys_when_the_new_keyring_is_broken(tmp_path: Path) -> None:
    keyring = Keyring.create(tmp_path / "keys", "silo-1")
    active = keyring.active
    (tmp_path / "keys" / KEYRING_FILE).write_text("{not json")
    with pytest.raises(KeysError, match="not valid JSON"):
        keyring.refresh()
    assert keyring.active == active
    assert keyring.sign(b"x")[0] == active.key_id


# -- public keys and pinning -----------------------------------------------------------


def test_fingerprint_and_key_id_follow_the_documented_formula(tmp_path: Path) -> None:
    key = Keyring.create(tmp_path / "keys", "silo-1").active
    digest = hashlib.sha256(b"fedsilo-key-v1" + key.signing + key.encryption).hexdigest()
    assert key.fingerprint == "sha256:" + digest
    assert key.key_id == digest[:16]
    assert PublicKey.from_dict(key.to_dict()) == key
    assert set(key.to_dict()) == {"key_id", "signing", "encryption", "fingerprint"}


def _flip_hex(text: str, index: int) -> str:
    return text[:index] + ("0" if text[index] != "0" else "1") + text[index + 1 :]


@pytest.mark.parametrize("field", ["fingerprint", "key_id", "signing", "encryption"])
def test_a_tampered_pinned_key_is_refused(tmp_path: Path, field: str) -> None:
    genuine = Keyring.create(tmp_path / "keys", "silo-1").public()
    attacker = Keyring.create(tmp_path / "attacker", "silo-1").active
    document = genuine.to_dict()
    entry = document["keys"][0]
    if field in ("signing", "encryption"):
        entry[field] = attacker.to_dict()[field]  # a substituted key under the old fingerprint
    else:
        entry[field] = _flip_hex(entry[field], len(entry[field]) - 1)
    with pytest.raises(KeysError, match="silo-1"):
        PartyKeys.from_dict(document)
    with pytest.raises(KeysError):
        TrustStore.from_dict({"federation": FEDERATION, "parties": {"silo-1": document}})


def test_a_tampered_trust_file_is_refused_naming_it(tmp_path: Path) -> None:
    silo = Keyring.create(tmp_path / "silo", "silo-1")
    path = tmp_path / "trust.json"
    TrustStore(FEDERATION, {"silo-1": silo.public()}).save(path)
    document = json.loads(path.read_text())
    entry = document["parties"]["silo-1"]["keys"][0]
    entry["fingerprint"] = _flip_hex(entry["fingerprint"], 10)
    path.write_text(json.dumps(document))
    with pytest.raises(KeysError, match="altered") as caught:
        TrustStore.load(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    "document",
    [
        {"party": "silo-1", "keys": []},
        {"party": "", "keys": []},
        {"party": "silo-1"},
        {"party": "silo-1", "keys": [{"key_id": "x"}]},
        {"party": "silo-1", "keys": [{"key_id": "x", "signing": "!!", "encryption": "",
                                      "fingerprint": ""}]},
        ["not", "an", "object"],
    ],
)
def test_malformed_party_keys_are_refused(document: object) -> None:
    with pytest.raises(KeysError):
        PartyKeys.from_dict(document)  # type: ignore[arg-type]


def test_party_keys_save_and_load(tmp_path: Path) -> None:
    keyring = Keyring.create(tmp_path / "keys", "silo-1")
    keyring.rotate()
    public = keyring.public()
    public.save(tmp_path / "silo-1.json")
    assert _mode(tmp_path / "silo-1.json") == 0o644
    loaded = PartyKeys.load(tmp_path / "silo-1.json")
    assert loaded == public and loaded.active == keyring.pending  # what peers seal to
    assert loaded.get(public.keys[1].key_id) == public.keys[1]
    assert loaded.get("0123456789abcdef") is None
    with pytest.raises(KeysError, match=re.escape(str(tmp_path / "missing.json"))):
        PartyKeys.load(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(KeysError, match=re.escape("broken.json")):
        PartyKeys.load(tmp_path / "broken.json")


# -- trust store -----------------------------------------------------------------------


def test_trust_store_round_trip_and_lookups(tmp_path: Path) -> None:
    silo = Keyring.create(tmp_path / "silo", "silo-1")
    aggregator = Keyring.create(tmp_path / "agg", "aggregator")
    store = TrustStore(FEDERATION)
    store.add(silo.public())
    store.add(aggregator.public())
    store.save(tmp_path / "trust.json")
    assert _mode(tmp_path / "trust.json") == 0o644

    loaded = TrustStore.load(tmp_path / "trust.json")
    assert loaded == store and loaded.federation == FEDERATION
    assert loaded.party("silo-1") == silo.public()
    assert loaded.key("aggregator", aggregator.active.key_id) == aggregator.active
    with pytest.raises(KeysError, match="unknown party 'silo-9'"):
        loaded.party("silo-9")
    with pytest.raises(KeysError, match="not pinned for party 'silo-1'"):
        loaded.key("silo-1", aggregator.active.key_id)

    silo.rotate()
    loaded.add(silo.public())  # replaces the entry
    assert len(loaded.party("silo-1").keys) == 2
    with pytest.raises(KeysError, match="must be the PartyKeys of party"):
        TrustStore(FEDERATION, {"silo-2": silo.public()})


def test_trust_file_picks_up_a_changed_file(tmp_path: Path) -> None:
    silo = Keyring.create(tmp_path / "silo", "silo-1")
    path = tmp_path / "trust.json"
    store = TrustStore(FEDERATION, {"silo-1": silo.public()})
    store.save(path)
    trust = TrustFile(path)
    first = trust.current()
    assert set(first.parties) == {"silo-1"}
    assert trust.current() is first  # unchanged file: not re-read

    old = silo.active
    new = silo.rotate()
    store.add(silo.public())
    store.save(path)  # atomic replace
    assert trust.current().key("silo-1", new.key_id) == new

    store.add(PartyKeys("silo-1", (new,)))  # the peer retired its old key
    path.write_text(json.dumps(store.to_dict()))  # in-place edit, other size
    with pytest.raises(KeysError, match="not pinned"):
        trust.current().key("silo-1", old.key_id)

    path.write_text("{")  # a half-written file: refused, and re-read on the next call
    with pytest.raises(KeysError, match=re.escape("trust.json")):
        trust.current()
    store.save(path)
    assert trust.current().key("silo-1", new.key_id) == new


def test_trust_file_must_exist_at_startup(tmp_path: Path) -> None:
    with pytest.raises(KeysError, match=re.escape("missing.json")):
        TrustFile(tmp_path / "missing.json")


# -- retired keys at the peers ---------------------------------------------------------


def _rotated_silo(tmp_path: Path) -> tuple[Keyring, PublicKey, PublicKey, TrustStore]:
    """A silo that rotated and activated, and a peer's store pinning both its keys."""
    silo = Keyring.create(tmp_path / "silo", "silo-1")
    old = silo.active
    new = silo.rotate()
    silo.activate()
    return silo, old, new, TrustStore(FEDERATION, {"silo-1": silo.public()})


def test_a_retired_key_is_refused_by_name_and_never_pinned_again(tmp_path: Path) -> None:
    silo, old, new, store = _rotated_silo(tmp_path)
    stale = silo.public()  # the public.json from before the silo retired its old key

    record = store.retire("silo-1", old.key_id, when="2025-03-01T12:00:00+00:00")
    assert (record.key_id, record.fingerprint) == (old.key_id, old.fingerprint)
    assert store.party("silo-1").keys == (new,)  # unpinned: nothing is sealed to it
    with pytest.raises(RetiredKeyError) as caught:
        store.key("silo-1", old.key_id)
    message = str(caught.value)
    assert f"key {old.key_id!r} of 'silo-1' was retired on 2025-03-01T12:00:00+00:00" in message
    assert "fedsilo keys activate" in message and "fedsilo trust add" in message
    assert store.key("silo-1", new.key_id) == new

    assert store.add(stale) == (record,)  # a stale public.json cannot bring it back
    assert store.party("silo-1").keys == (new,)
    with pytest.raises(RetiredKeyError, match=r"stale public\.json"):
        store.add(PartyKeys("silo-1", (old,)))
    assert store.retire("silo-1", old.fingerprint) == record  # again: unchanged
    with pytest.raises(KeysError, match=r"only key pinned.*fedsilo trust add"):
        store.retire("silo-1", new.key_id)
    with pytest.raises(KeysError, match="unknown party"):
        store.retire("silo-9", new.key_id)
    with pytest.raises(KeysError, match="neither a key id"):
        store.retire("silo-1", "not-a-key")

    path = tmp_path / "trust.json"
    store.save(path)
    loaded = TrustStore.load(path)
    assert loaded == store and loaded.retired == {"silo-1": (record,)}
    with pytest.raises(RetiredKeyError):
        loaded.key("silo-1", old.key_id)


def test_a_key_no_longer_pinned_can_still_be_retired(tmp_path: Path) -> None:
    _, old, new, store = _rotated_silo(tmp_path)
    store.add(PartyKeys("silo-1", (new,)))  # pinned the silo's public.json after its retire
    with pytest.raises(KeysError, match="not pinned") as caught:
        store.key("silo-1", old.key_id)
    assert not isinstance(caught.value, RetiredKeyError)  # unknown, not known-retired
    by_id = store.retire("silo-1", old.key_id)
    assert by_id.fingerprint is None
    with pytest.raises(RetiredKeyError, match="was retired on"):
        store.key("silo-1", old.key_id)
    other = TrustStore(FEDERATION, {"silo-1": PartyKeys("silo-1", (new,))})
    assert other.retire("silo-1", old.fingerprint).fingerprint == old.fingerprint


def test_a_trust_file_that_pins_a_retired_key_or_alters_a_record_is_refused(
    tmp_path: Path,
) -> None:
    _, old, _, store = _rotated_silo(tmp_path)
    store.retire("silo-1", old.key_id)
    path = tmp_path / "trust.json"
    store.save(path)
    document = json.loads(path.read_text())
    edited = json.loads(json.dumps(document))
    edited["parties"]["silo-1"]["keys"].append(old.to_dict())  # pinned again by hand
    path.write_text(json.dumps(edited))
    with pytest.raises(KeysError, match="both pinned and retired"):
        TrustStore.load(path)
    edited = json.loads(json.dumps(document))
    edited["retired"]["silo-1"][0]["fingerprint"] = _flip_hex(old.fingerprint, 10)  # other id
    path.write_text(json.dumps(edited))
    with pytest.raises(KeysError, match="altered"):
        TrustStore.load(path)
    edited = json.loads(json.dumps(document))
    del edited["retired"]
    path.write_text(json.dumps(edited))  # a trust file from before retirement existed
    assert TrustStore.load(path).retired == {}


def test_a_running_trust_file_picks_up_a_retirement(tmp_path: Path) -> None:
    _, old, new, store = _rotated_silo(tmp_path)
    path = tmp_path / "trust.json"
    store.save(path)
    trust = TrustFile(path)
    assert trust.current().key("silo-1", old.key_id) == old
    edited = TrustStore.load(path)  # `fedsilo trust retire`, another process
    edited.retire("silo-1", old.key_id)
    edited.save(path)
    with pytest.raises(RetiredKeyError, match="was retired on"):
        trust.current().key("silo-1", old.key_id)
    assert trust.current().key("silo-1", new.key_id) == new
