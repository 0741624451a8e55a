"""The secure codec between transports and the wire format: each party opens only what a
pinned peer signed for it, a silo speaks only for itself, replays are refused, and keys
rotate without a restart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsilo.privacy.codec import EnvelopeCodec
from fedsilo.privacy.keys import Keyring, TrustStore
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


def _upload(silo: str = "silo-0", round: int = 1) -> Upload:
    return Upload(round, silo, {"m.shared.A": torch.randn(2, 3)}, {"m.client": torch.ones(4)}, 7,
                  {"accuracy": 0.5}, {"train_s": 1.0})


def _plan(silo: str = "silo-0", round: int = 1) -> RoundPlan:
    return RoundPlan(round, silo, 3, 0.1, 2, {"m": [0, 1]}, {"m.shared.A": torch.ones(2)})


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
    sealed = parties["silo-0"].seal(_upload(round=1))
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
        aggregator.open(parties["silo-1"].seal(_upload("silo-1", round=1)))
    assert info.value.reason == "replay" and "floor" in info.value.detail
    announce = parties["silo-0"].seal(
        Announce("silo-0", "builtin:tiny", {"m": ModuleShape(4, 4)}, 10, "abc", "d")
    )
    aggregator.open(announce)
    aggregator.open(announce)  # a restarted silo announces again; that is no replay


def test_replay_memory_survives_a_restart(parties, tmp_path: Path) -> None:
    sealed = parties["silo-0"].seal(_upload(round=3))
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


def test_keys_rotate_without_a_restart(parties, tmp_path: Path) -> None:
    silo, aggregator = parties["silo-0"], parties["aggregator"]
    silo.keyring.rotate()
    with pytest.raises(Rejected) as info:  # the aggregator does not know the new key yet
        aggregator.open(silo.seal(_upload(round=1)))
    assert info.value.reason == "unknown sender"
    trust = TrustStore.load(tmp_path / "aggregator.json")
    trust.add(silo.keyring.public())  # `fedsilo trust add`: the running codec re-reads it
    trust.save(tmp_path / "aggregator.json")
    assert aggregator.open(silo.seal(_upload(round=2))).round == 2

    # The aggregator rotates too: a plan sealed to the silo's old key still opens there.
    in_flight = aggregator.seal(_plan("silo-0", round=3))
    old = silo.keyring.public().keys[-1].key_id
    assert silo.open(in_flight).round == 3
    silo.keyring.retire(old)
    assert all(k.key_id != old for k in silo.keyring.public().keys)


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
