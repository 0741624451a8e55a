"""The aggregator rotates its key while plans and uploads cross a REAL RabbitMQ broker
(AmqpTransport with the secure codecs, each party's keyring folder and trust file as in a
deployment): no message is refused at any step, and nothing is restarted.

Skips without a broker (see tests/conftest.py); FEDSILO_REQUIRE_BROKER=1 makes that a failure.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from fedsilo.privacy.keys import PUBLIC_FILE, Keyring, PartyKeys, TrustStore
from fedsilo.privacy.settings import SecuritySettings
from fedsilo.sdk.messages import RoundPlan, Upload
from fedsilo.sdk.transport.amqp import AmqpTransport

SILO = "silo-0"
WAIT_S = 10.0  # an upper bound only: receive returns as soon as the message is there


def _plan(server_round: int) -> RoundPlan:
    return RoundPlan(server_round, SILO, 1, 0.1, 1, {"m": [0, 1]},
                     {"m.shared.A": torch.full((4,), 1.0)})


def _upload(server_round: int) -> Upload:
    return Upload(server_round, SILO, {"m.shared.A": torch.full((4,), float(server_round))}, {}, 5)


def test_the_aggregator_rotates_while_plans_and_uploads_cross_the_broker(
    broker_url: str, tmp_path: Path
) -> None:
    keys = {p: Keyring.create(tmp_path / p, p) for p in ("aggregator", SILO)}
    TrustStore("fed", {SILO: keys[SILO].public()}).save(tmp_path / "aggregator.json")
    TrustStore("fed", {"aggregator": keys["aggregator"].public()}).save(tmp_path / f"{SILO}.json")

    def security(party: str) -> SecuritySettings:
        return SecuritySettings(keys_dir=tmp_path / party, trust_file=tmp_path / f"{party}.json")

    agg = AmqpTransport(broker_url, "aggregator", silo_ids=[SILO],
                        codec=security("aggregator").codec("aggregator", "fed"))
    silo = AmqpTransport(broker_url, SILO, codec=security(SILO).codec(SILO))
    cli = Keyring.load(tmp_path / "aggregator")  # `fedsilo keys ...`, another process
    old = cli.active
    silo_trust = tmp_path / f"{SILO}.json"

    def trust_add() -> None:  # `fedsilo trust add` at the silo
        store = TrustStore.load(silo_trust)
        store.add(PartyKeys.load(tmp_path / "aggregator" / PUBLIC_FILE))
        store.save(silo_trust)

    def trust_retire() -> None:  # `fedsilo trust retire` at the silo
        store = TrustStore.load(silo_trust)
        store.retire("aggregator", old.key_id)
        store.save(silo_trust)

    steps: list[tuple[str, Callable[[], object]]] = [
        ("keys rotate", cli.rotate),
        ("trust add", trust_add),
        ("keys activate", cli.activate),
        ("keys retire", lambda: cli.retire(old.key_id)),
        ("trust retire", trust_retire),
    ]
    rounds = iter(range(1, 1000))

    def send() -> int:
        """A plan and an upload on the wire (they stay in flight across the next step)."""
        r = next(rounds)
        agg.send_plan(_plan(r))
        silo.send_upload(_upload(r))
        return r

    def receive(r: int, step: str) -> None:
        plan = silo.receive_plan(SILO, timeout=WAIT_S)
        assert plan is not None, (step, silo.rejected, silo.refusals)
        assert plan.message.round == r
        plan.ack()
        upload = agg.receive_upload(timeout=WAIT_S)
        assert upload is not None, (step, agg.rejected, agg.refusals)
        assert upload.message.round == r
        assert torch.equal(upload.message.params["m.shared.A"], torch.full((4,), float(r)))
        upload.ack()

    try:
        in_flight = send()
        for step, run in steps:
            run()
            receive(in_flight, step)  # sealed before the step, opened after it
            receive(send(), step)  # sealed and opened after it
            if step == "trust add":  # the silo's uploads now go to the new (pending) key
                assert agg.codec.peers_on_pending() == {SILO}
            in_flight = send()
        receive(in_flight, "after the rotation")
        assert agg.rejected == {} and silo.rejected == {}, (agg.refusals, silo.refusals)
    finally:
        agg.close()
        silo.close()
    new = Keyring.load(tmp_path / "aggregator")
    assert new.active != old and new.public().keys == (new.active,)
    assert [r.key_id for r in TrustStore.load(silo_trust).retired["aggregator"]] == [old.key_id]
