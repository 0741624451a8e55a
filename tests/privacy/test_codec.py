"""The secure codec between transports and the wire format: each party opens only what a
pinned peer signed for it, a silo speaks only for itself, replays are refused, and keys
rotate without a restart and without a message refused."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from fedsilo.privacy.codec import EnvelopeCodec
from fedsilo.privacy.envelope import peek_header
from fedsilo.privacy.keys import PUBLIC_FILE, Keyring, PartyKeys, TrustStore
from fedsilo.privacy.settings import SecuritySettings
from fedsilo.sdk.messages import Announce, RoundPlan, Upload
from fedsilo.sdk.params import ModuleShape
from fedsilo.sdk.transport.codec import PlainCodec, Rejected
from fedsilo.sdk.transport.memory import MemoryTransport

SILOS = ("silo-0", "silo-1")


@pytest.fixture
def parties(tmp_path: Path) -> dict[str, EnvelopeCodec]:
    keys = {p: Keyring.create(tmp_path / p, p) for p in ("aggregator", *SILOS)}
    TrustStore("fed", {s: keys[s].public() for s in SILOS}).save(tmp_path / "aggregator.json")
    for silo in SILOS:
        TrustStore("fed", {"aggregator": keys["aggregator"].public()}).save(
            tmp_path / f"{silo}.json"
        )
    return {
        p: SecuritySettings(keys_dir=tmp_path / p, trust_file=tmp_path / f"{p}.json").codec(
            p, "fed" if p == "aggregator" else None
        )
        for p in keys
    }


def _upload(silo: str = "silo-0", server_round: int = 1) -> Upload:
    return Upload(server_round, silo, {"m.shared.A": torch.randn(2, 3)},
                  {"m.client": torch.ones(4)}, 7,
                  {"accuracy": 0.5}, {"train_s": 1.0})


def _plan(silo: str = "silo-0", server_round: int = 1) -> RoundPlan:
    return RoundPlan(server_round, silo, 3, 0.1, 2, {"m": [0, 1]}, {"m.shared.A": torch.ones(2)})


def test_messages_round_trip_between_the_parties_they_are_for(parties) -> None:
    upload = _upload()
    opened = parties["aggregator"].open(parties["silo-0"].seal(upload))
    assert isinstance(opened, Upload) and opened.silo_id == "silo-0"
    assert torch.equal(opened.params["m.shared.A"], upload.params["m.shared.A"])
    plan = parties["silo-1"].open(parties["aggregator"].seal(_plan("silo-1")))
    assert isinstance(plan, RoundPlan) and plan.assignment == {"m": [0, 1]}
    announce = Announce("silo-0", "builtin:tiny", {"m": ModuleShape(4, 4)}, 10, "abc", "d")
    assert parties["aggregator"].open(parties["silo-0"].seal(announce)) == announce


def test_a_silo_cannot_open_another_silos_plan(parties) -> None:
    sealed = parties["aggregator"].seal(_plan("silo-0"))
    with pytest.raises(Rejected) as info:
        parties["silo-1"].open(sealed)
    assert info.value.reason == "recipient"


def test_a_silo_may_only_speak_for_itself(parties, tmp_path: Path) -> None:
    forged = parties["silo-0"].seal(_upload("silo-1"))  # signed by silo-0, claims silo-1
    with pytest.raises(Rejected) as info:
        parties["aggregator"].open(forged)
    assert info.value.reason == "sender mismatch" and "silo-1" in info.value.detail


def test_replays_are_refused_and_announcements_are_not(parties) -> None:
    aggregator = parties["aggregator"]
    sealed = parties["silo-0"].seal(_upload(server_round=1))
    aggregator.open(sealed)
    # Until a checkpoint holds its effect, a copy is the broker redelivering it: accepted
    # (the engine folds an upload once); once checkpointed, a copy is a replay.
    assert aggregator.open(sealed).round == aggregator.open(sealed).round == 1
    aggregator.state_dict()
    with pytest.raises(Rejected) as info:
        aggregator.open(sealed)
    assert info.value.reason == "replay"
    aggregator.advance(2)
    with pytest.raises(Rejected) as info:
        aggregator.open(parties["silo-1"].seal(_upload("silo-1", server_round=1)))
    assert info.value.reason == "replay" and "floor" in info.value.detail
    announce = parties["silo-0"].seal(
        Announce("silo-0", "builtin:tiny", {"m": ModuleShape(4, 4)}, 10, "abc", "d")
    )
    aggregator.open(announce)
    aggregator.open(announce)  # a restarted silo announces again; that is no replay


def test_replay_memory_survives_a_restart(parties, tmp_path: Path) -> None:
    sealed = parties["silo-0"].seal(_upload(server_round=3))
    parties["aggregator"].open(sealed)
    restarted = SecuritySettings(
        keys_dir=tmp_path / "aggregator", trust_file=tmp_path / "aggregator.json"
    ).codec("aggregator", "fed")
    restarted.load_state_dict(parties["aggregator"].state_dict())
    with pytest.raises(Rejected) as info:
        restarted.open(sealed)
    assert info.value.reason == "replay"


def test_plaintext_is_refused_by_a_secure_party(parties) -> None:
    with pytest.raises(Rejected) as info:
        parties["aggregator"].open(PlainCodec().seal(_upload()))
    assert info.value.reason in ("header", "size")


def _pin(tmp_path: Path, peer: str, party: str) -> None:
    """What `fedsilo trust add <peer>.json <party>/public.json` does at `peer`."""
    path = tmp_path / f"{peer}.json"
    store = TrustStore.load(path)
    store.add(PartyKeys.load(tmp_path / party / PUBLIC_FILE))
    store.save(path)


def _unpin_retired(tmp_path: Path, peer: str, party: str, key_id: str) -> None:
    """What `fedsilo trust retire <peer>.json <party> <key_id>` does at `peer`."""
    path = tmp_path / f"{peer}.json"
    store = TrustStore.load(path)
    store.retire(party, key_id)
    store.save(path)


class _Traffic:
    """Plans to every silo and uploads from every silo, sealed as a batch and opened later
    (so every batch is in flight across the next rotation step); each must open."""

    def __init__(self, parties: dict[str, EnvelopeCodec]) -> None:
        self.parties = parties
        self.round = 0

    def seal(self) -> list[tuple[str, bytes]]:
        self.round += 1
        batch = []
        for silo in SILOS:
            batch.append((silo, self.parties["aggregator"].seal(_plan(silo, self.round))))
            batch.append(("aggregator", self.parties[silo].seal(_upload(silo, self.round))))
        return batch

    def deliver(self, batch: list[tuple[str, bytes]]) -> None:
        for recipient, data in batch:
            header = peek_header(data)
            try:
                message = self.parties[recipient].open(data)
            except Rejected as exc:
                pytest.fail(f"{recipient} refused a message from {header.sender}: {exc}")
            assert message.round == header.round

    def exchange(self) -> list[tuple[str, bytes]]:
        """A batch sealed and opened now; returned for inspection."""
        batch = self.seal()
        self.deliver(batch)
        return batch


def _keys_used(batch: list[tuple[str, bytes]], party: str) -> tuple[set[str], set[str]]:
    """(keys `party` signed with, keys its peers sealed to it) in `batch`."""
    headers = [peek_header(data) for _, data in batch]
    return ({h.sender_key for h in headers if h.sender == party},
            {h.recipient_key for h in headers if h.recipient == party})


@pytest.mark.parametrize("rotating", ["aggregator", "silo-0"])
def test_a_rotation_refuses_no_message_at_any_step(
    parties, tmp_path: Path, rotating: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The documented rotation, messages flowing both ways at every step and across each
    step (sealed before it, opened after it): nothing is refused. The running codecs see
    every change through their keyring folder and trust file, without a restart."""
    caplog.set_level(logging.INFO, logger="fedsilo.privacy.codec")
    traffic = _Traffic(parties)
    peers = SILOS if rotating == "aggregator" else ("aggregator",)
    cli = Keyring.load(tmp_path / rotating)  # `fedsilo keys ...`: another process
    old = cli.active
    shutil.copytree(tmp_path / rotating, tmp_path / "stolen")  # the old key, leaked
    in_flight = traffic.seal()

    # 1. `fedsilo keys rotate`: a pending key; the party still signs with the old one.
    new = cli.rotate()
    traffic.deliver(in_flight)
    assert _keys_used(traffic.exchange(), rotating) == ({old.key_id}, {old.key_id})
    in_flight = traffic.seal()

    # 2. Each peer pins the new public.json (`fedsilo trust add`), one after the other: it
    # seals to the new key at once, and still verifies the old key's signatures.
    for i, peer in enumerate(peers):
        _pin(tmp_path, peer, rotating)
        traffic.deliver(in_flight)
        batch = traffic.exchange()
        signed, sealed_to = _keys_used(batch, rotating)
        assert signed == {old.key_id}
        assert sealed_to == ({new.key_id} if i == len(peers) - 1 else {old.key_id, new.key_id})
        assert parties[rotating].peers_on_pending() == set(peers[: i + 1])
        assert f"{peer} sealed a message to {rotating}'s pending key {new.key_id}" in caplog.text
        in_flight = traffic.seal()

    # 3. `fedsilo keys activate`: the party signs with the new key, which every peer pinned.
    cli.activate()
    traffic.deliver(in_flight)  # signed by the old key, opened after the activation
    assert _keys_used(traffic.exchange(), rotating) == ({new.key_id}, {new.key_id})
    in_flight = traffic.seal()

    # 4. `fedsilo keys retire OLD`, then every peer `fedsilo trust retire ... OLD`.
    cli.retire(old.key_id)
    traffic.deliver(in_flight)
    for peer in peers:
        _unpin_retired(tmp_path, peer, rotating, old.key_id)
        traffic.deliver(traffic.seal())
    assert _keys_used(traffic.exchange(), rotating) == ({new.key_id}, {new.key_id})

    # Retired means refused by the peers, naming the key: what the leaked old key signs...
    thief = EnvelopeCodec("fed", Keyring.load(tmp_path / "stolen"),
                          TrustStore.load(tmp_path / f"{rotating}.json"))
    for peer in peers:
        forged = _plan(peer, 99) if rotating == "aggregator" else _upload(rotating, 99)
        with pytest.raises(Rejected) as info:
            parties[peer].open(thief.seal(forged))
        assert info.value.reason == "unknown sender"
        assert f"key {old.key_id!r} of {rotating!r} was retired on" in info.value.detail
        assert "fedsilo keys activate" in info.value.detail
        # ...and nothing is sealed to it any more (it is not pinned).
        assert old not in parties[peer].trust.party(rotating).keys
    # A peer that missed the rotation (pins only the old key) is told what to do.
    stale_peer = peers[0]
    stale = EnvelopeCodec("fed", Keyring.load(tmp_path / stale_peer),
                          TrustStore("fed", {rotating: PartyKeys(rotating, (old,))}))
    late = _plan(rotating, 99) if stale_peer == "aggregator" else _upload(stale_peer, 99)
    with pytest.raises(Rejected) as info:
        parties[rotating].open(stale.seal(late))
    assert info.value.reason == "recipient"
    assert f"{old.key_id!r}, which {rotating!r} retired on" in info.value.detail
    assert "fedsilo trust add" in info.value.detail


def test_rotation_steps_out_of_order_are_refused_saying_what_to_do(
    parties, tmp_path: Path
) -> None:
    silo, aggregator = parties["silo-0"], parties["aggregator"]
    cli = Keyring.load(tmp_path / "silo-0")
    old = cli.active
    new = cli.rotate()
    # Activated before the aggregator pinned the new key: refused, naming the way out.
    cli.activate()
    with pytest.raises(Rejected) as info:
        aggregator.open(silo.seal(_upload(server_round=1)))
    assert info.value.reason == "unknown sender"
    assert f"key {new.key_id!r} is not pinned for party 'silo-0'" in info.value.detail
    assert "add its new public keys to the trust file" in info.value.detail
    _pin(tmp_path, "aggregator", "silo-0")
    assert aggregator.open(silo.seal(_upload(server_round=2))).round == 2

    # The aggregator retires the key the silo signs with: refused, saying so.
    cli = Keyring.load(tmp_path / "aggregator")
    agg_old = cli.active
    cli.rotate()
    _pin(tmp_path, "silo-0", "aggregator")
    _unpin_retired(tmp_path, "silo-0", "aggregator", agg_old.key_id)  # too early
    with pytest.raises(Rejected) as info:
        silo.open(aggregator.seal(_plan(server_round=3)))
    assert info.value.reason == "unknown sender"
    assert f"key {agg_old.key_id!r} of 'aggregator' was retired on" in info.value.detail
    assert "must activate the new key (`fedsilo keys activate`)" in info.value.detail
    cli.activate()
    assert silo.open(aggregator.seal(_plan(server_round=4))).round == 4
    assert old.key_id in [k.key_id for k in Keyring.load(tmp_path / "silo-0").public().keys]


def test_a_wrong_trust_file_or_keys_are_clear_errors(parties, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not 'silo-1'"):
        SecuritySettings(keys_dir=tmp_path / "silo-0", trust_file=tmp_path / "silo-0.json").codec(
            "silo-1"
        )
    with pytest.raises(ValueError, match="federation 'fed', not 'other'"):
        SecuritySettings(
            keys_dir=tmp_path / "aggregator", trust_file=tmp_path / "aggregator.json"
        ).codec("aggregator", "other")


def test_the_memory_transport_dead_letters_what_its_codec_refuses(parties) -> None:
    transport = MemoryTransport(parties["aggregator"])
    transport.deliver_upload("silo-0", b"garbage" * 20)
    transport.deliver_upload("silo-0", parties["silo-0"].seal(_upload()))
    delivery = transport.receive_upload()
    assert delivery is not None and delivery.message.silo_id == "silo-0"
    assert sum(transport.rejected.values()) == 1 and len(transport.dead) == 1
    delivery.reject("tensor schema", "test")
    assert transport.rejected["tensor schema"] == 1
