"""Attacks on a running federation (real broker, real processes): forged, tampered,
misaddressed, replayed, truncated, oversized and poisoned messages are each refused with
their own reason, counted and dead-lettered; the honest silos finish the run and the final
parameters are exactly those of a run nobody attacked."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pika
import torch
from safetensors.torch import load_file

from fedsilo.privacy.codec import EnvelopeCodec
from fedsilo.privacy.envelope import seal
from fedsilo.privacy.keys import Keyring, PartyKeys, TrustStore
from fedsilo.sdk import protocol
from fedsilo.sdk.adapters.model import linear_shapes, target_shapes
from fedsilo.sdk.messages import Upload
from fedsilo.sdk.models.loading import load_model
from fedsilo.sdk.strategies import get_strategy
from fedsilo.sdk.transport.amqp_topology import DEAD_QUEUE, UPLOADS_EXCHANGE, UPLOADS_ROUTING_KEY
from fedsilo.sdk.transport.chunking import split
from fedsilo.simulation.engine import run_simulation


def _expected_upload(deployment, silo: str) -> Upload:
    """A well-formed round-0 upload for `silo`: the tensors its plan makes it train."""
    sim = deployment.sim
    spec = get_strategy(sim.strategy)
    server = spec.server(sim.adapter(), sim.strategy_config(), sim.seed)
    model = load_model(sim.model, dtype=sim.dtype, seed=sim.seed).model
    server.initialize(target_shapes(linear_shapes(model), sim.target_modules),
                      deployment.silos)
    part = server.configure_round(0, deployment.silos)[silo]
    schema = server.upload_schema(silo, part, False)
    zeros = {k: torch.zeros(s.shape, dtype=s.dtype) for k, s in schema.params.items()}
    emb = {k: torch.zeros(s.shape, dtype=s.dtype) for k, s in schema.embeddings.items()}
    return Upload(0, silo, zeros, emb, 10, {"metric": 0.0}, {})


def _codec_as(deployment, party: str, folder: Path) -> EnvelopeCodec:
    """An impostor: fresh keys under `party`'s name, trusting the real aggregator."""
    keys = Keyring.create(folder, party)
    return EnvelopeCodec("test", keys, TrustStore.load(
        deployment.root / "keys" / "silo-0.trust.json"))


def _publish(url: str, *bodies: bytes, headers: dict | None = None) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for body in bodies:
            channel.basic_publish(
                UPLOADS_EXCHANGE, UPLOADS_ROUTING_KEY, body,
                pika.BasicProperties(delivery_mode=2, headers=headers,
                                     message_id=_message_id(body, headers)),
                mandatory=True,
            )
    finally:
        connection.close()


def _message_id(body: bytes, headers: dict | None) -> str:
    """What a fedsilo publisher sets: one AMQP message id per message (all its chunks)."""
    if headers and "fedsilo-chunk-id" in headers:
        return str(headers["fedsilo-chunk-id"])
    return hashlib.sha256(body).hexdigest()[:32]


def _dead_letters(url: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return connection.channel().queue_declare(DEAD_QUEUE, passive=True).method.message_count
    finally:
        connection.close()


def _wait_rejected(deployment, reasons: dict[str, int], timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    rejected: dict[str, int] = {}
    while time.monotonic() < deadline:
        path = deployment.aggregator_dir / "status.json"
        if path.exists():
            try:
                rejected = json.loads(path.read_text()).get("rejected", {})
            except json.JSONDecodeError:  # written atomically, but be patient anyway
                rejected = {}
            if all(rejected.get(k, 0) >= n for k, n in reasons.items()):
                return rejected
        time.sleep(0.2)
    raise AssertionError(f"expected rejections {reasons}, saw {rejected}:\n"
                         f"{deployment.log('aggregator')}")


def test_attacks_are_refused_and_the_honest_run_is_unaffected(deployment, tmp_path) -> None:
    deployment.broker = {"reassembly_timeout_s": 3.0}
    deployment.security_extra = {"max_message_mb": 1.0}
    deployment.write()
    deployment.start_aggregator()
    # silo-0 is slow on the final plan, so the aggregator still listens when the replay
    # below arrives (otherwise the run may end first and the replay goes unread).
    deployment.start_agent("silo-0", env={"FEDSILO_FAULT": "plan_received@2:sleep=15"})
    deployment.start_agent("silo-1")
    # silo-2 is slow in round 0, so its poisoned "uploads" below arrive before its real one.
    deployment.start_agent("silo-2", env={"FEDSILO_FAULT": "plan_received@0:sleep=10"})
    deployment.wait_for_event("aggregator", "round_opened", round=0)

    url = deployment.broker_url
    honest0, honest2 = deployment.codec("silo-0"), deployment.codec("silo-2")
    good0 = Upload(0, "silo-0", {"x": torch.ones(3)}, {}, 1)
    sealed0 = honest0.seal(good0)

    head_len = int.from_bytes(sealed0[5:9], "big")
    header = sealed0[9 : 9 + head_len]
    assert b'"round":0' in header
    tampered_header = sealed0.replace(header, header.replace(b'"round":0', b'"round":1'), 1)
    tampered_body = bytearray(sealed0)
    tampered_body[len(sealed0) // 2] ^= 0x01
    silo1_keys = PartyKeys.load(deployment.root / "keys" / "silo-1" / "public.json")
    for_silo1 = seal(protocol.encode(good0), federation="test", type="upload", round=0,
                     sender=honest0.keyring, recipient=silo1_keys)
    impostor = _codec_as(deployment, "silo-0", tmp_path / "impostor").seal(good0)
    stranger = _codec_as(deployment, "mallory", tmp_path / "mallory").seal(
        Upload(0, "mallory", {"x": torch.ones(3)}, {}, 1)
    )
    oversize = honest0.seal(Upload(0, "silo-0", {"x": torch.ones(400_000)}, {}, 1))

    poisoned = _expected_upload(deployment, "silo-2")
    name = sorted(poisoned.params)[0]
    nan = dict(poisoned.params)
    nan[name] = nan[name].clone()
    nan[name].view(-1)[0] = float("nan")
    wrong = dict(poisoned.params)
    wrong[name] = torch.zeros(wrong[name].numel() + 1)
    nan_upload = honest2.seal(Upload(0, "silo-2", nan, poisoned.embeddings, 10))
    wrong_upload = honest2.seal(Upload(0, "silo-2", wrong, poisoned.embeddings, 10))
    # Valid keys, finite values: embeddings that would overflow RSEA, and sample counts
    # that would crash (0) or take over (1e12) sample-weighted averaging.
    huge = {k: torch.full_like(v, 3e38) for k, v in poisoned.embeddings.items()}
    assert huge, "the federation's strategy uploads embeddings (FedAMoLE)"
    huge_upload = honest2.seal(Upload(0, "silo-2", poisoned.params, huge, 10))
    no_samples = honest2.seal(Upload(0, "silo-2", poisoned.params, poisoned.embeddings, 0))
    all_samples = honest2.seal(Upload(0, "silo-2", poisoned.params, poisoned.embeddings,
                                      10**12))

    _publish(url, os.urandom(400), bytes(tampered_body), tampered_header, for_silo1, impostor,
             stranger, nan_upload, wrong_upload, huge_upload, no_samples, all_samples)
    for chunk in split(oversize, "oversize", 256 * 1024):
        _publish(url, chunk.data, headers=chunk.header.to_headers())
    first = split(sealed0, "truncated", 100)[0]  # one chunk of many, the rest never comes
    _publish(url, first.data, headers=first.header.to_headers())

    _wait_rejected(deployment, {"header": 1, "signature": 2, "recipient": 1,
                                "unknown sender": 2, "non-finite": 1, "tensor schema": 1,
                                "norm bound": 1, "sample count": 2, "size": 1,
                                "chunk timeout": 1})
    # A replay of an earlier round's message, once the run has moved past it.
    deployment.wait_for_event("aggregator", "round_opened", round=2, timeout=240)
    _publish(url, nan_upload)
    rejected = _wait_rejected(deployment, {"replay": 1})
    deployment.wait_all(timeout=240)

    assert rejected == {"header": 1, "signature": 2, "recipient": 1, "unknown sender": 2,
                        "non-finite": 1, "tensor schema": 1, "norm bound": 1,
                        "sample count": 2, "size": 1, "chunk timeout": 1, "replay": 1}
    assert _dead_letters(url) >= 14  # every refused message kept for audit
    invalid = deployment.events("aggregator", "upload_invalid")
    assert {e["reason"] for e in invalid} == {"non-finite", "tensor schema", "norm bound",
                                               "sample count"}
    assert all(e["silo"] == "silo-2" for e in invalid)

    # The operator's view: every refused message still in fedsilo.dead, with its reason.
    listed = subprocess.run(
        [sys.executable, "-m", "fedsilo.cli.main", "dead-letters", "--config",
         str(deployment.root / "federation.toml"), "--json", "--limit", "100"],
        capture_output=True, text=True, timeout=120,
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
    rows = json.loads(listed.stdout)
    assert len(rows) == _dead_letters(url)  # peeking leaves them in place
    reasons = {r["reason"] for r in rows}
    assert {"non-finite", "tensor schema", "norm bound", "sample count", "signature",
            "replay"} <= reasons, reasons
    poisoned_rows = [r for r in rows if r["reason"] == "sample count"]
    assert all(r["type"] == "upload" and r["claimed_sender"] == "silo-2"
               for r in poisoned_rows)

    reference = run_simulation(deployment.sim, run_dir=deployment.root / "sim").final_params
    params = load_file(str(deployment.aggregator_dir / "global_params.safetensors"))
    assert params.keys() == reference.keys()
    for key, value in params.items():
        assert torch.equal(value, reference[key]), key


def test_a_silo_with_valid_keys_cannot_pick_the_model_or_blow_up_the_average(
    deployment,
) -> None:
    """silo-2 is the attacker, played by the test with silo-2's own keys: it announces
    first with other weights (the coordinator's digest decides, so only it is refused),
    then joins properly and sends a round-0 update scaled by 1e30 (finite: it is clipped to
    the round's bound, not averaged in), then goes silent (later rounds close by quorum).
    The honest silos finish; the global model stays finite and near the honest one."""
    from fedsilo.sdk.adapters.model import linear_shapes
    from fedsilo.sdk.messages import Announce
    from fedsilo.sdk.transport.amqp import AmqpTransport

    deployment.rounds = {"deadline_s": 20.0, "quorum": 0.6}
    deployment.write()
    deployment.start_aggregator()
    attacker = AmqpTransport(deployment.broker_url, "silo-2", codec=deployment.codec("silo-2"))
    try:
        sim = deployment.sim
        model = load_model(sim.model, dtype=sim.dtype, seed=sim.seed).model
        shapes = linear_shapes(model)
        attacker.send_announce(Announce("silo-2", sim.model, shapes, 10, "evil", "e" * 64))
        deployment.wait_for_event("aggregator", "silo_refused", silo="silo-2")
        deployment.start_agent("silo-0")
        deployment.start_agent("silo-1")
        attacker.send_announce(Announce("silo-2", sim.model, shapes, 10, "evil",
                                        deployment.model_digest()))
        plan = attacker.receive_plan("silo-2", timeout=180)
        assert plan is not None and plan.message.round == 0
        plan.ack()
        blown = {k: v * 1e30 + 1e30 for k, v in plan.message.params.items()}
        emb = _expected_upload(deployment, "silo-2").embeddings
        attacker.send_upload(Upload(0, "silo-2", blown, emb, 10, {"metric": 1.0}, {}))
        deployment.wait_all(timeout=400)
    finally:
        attacker.close()

    status = json.loads((deployment.aggregator_dir / "status.json").read_text())
    assert status["counters"]["model_mismatch"] == 1 and status["counters"]["clipped"] == 1
    closed = deployment.events("aggregator", "round_closed")
    assert closed[0]["round"] == 0 and closed[0]["clipped"] == 1.0
    params = load_file(str(deployment.aggregator_dir / "global_params.safetensors"))
    assert all(bool(torch.isfinite(v).all()) for v in params.values())
    biggest = max(float(v.abs().max()) for v in params.values())
    assert biggest < 100.0, biggest  # 1e30 would be there had it been averaged in
    summary = deployment.summary()
    assert {"silo-0", "silo-1"} <= set(summary["per_silo"])
