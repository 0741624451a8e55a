"""AmqpTransport against a real RabbitMQ broker (fresh vhost per test, see conftest)."""

import hashlib
import time

import pika
import pytest
import torch

from fedsilo.sdk import protocol
from fedsilo.sdk.messages import RoundPlan, Upload
from fedsilo.sdk.transport.amqp import AmqpTransport, PublishError
from fedsilo.sdk.transport.amqp_connection import BrokerUnavailable, mask_url
from fedsilo.sdk.transport.amqp_topology import DEAD_QUEUE, UPLOADS_EXCHANGE, UPLOADS_ROUTING_KEY


def _plan(silo: str = "s1", n: int = 4) -> RoundPlan:
    return RoundPlan(3, silo, 5, 0.01, 2, {"m0": [0, 1]}, {"k.shared.A": torch.arange(n) * 1.5})


def _upload(silo: str = "s1", round_: int = 3) -> Upload:
    return Upload(round_, silo, {"k.A": torch.ones(3)}, {"e": torch.zeros(2)}, 7, {"loss": 0.5})


@pytest.fixture
def pair(broker_url: str):
    agg = AmqpTransport(broker_url, "aggregator", silo_ids=["s1", "s2"])
    silo = AmqpTransport(broker_url, "s1")
    yield agg, silo
    agg.close()
    silo.close()


def test_plan_and_upload_round_trip(pair) -> None:
    agg, silo = pair
    size = agg.send_plan(_plan())
    assert agg.traffic.down == {"s1": size}
    got = silo.receive_plan("s1", timeout=2)
    assert got is not None and got.size == size
    assert got.message.round == 3 and got.message.assignment == {"m0": [0, 1]}
    assert torch.equal(got.message.params["k.shared.A"], torch.arange(4) * 1.5)
    got.ack()
    got.ack()  # idempotent
    assert silo.receive_plan("s1", timeout=0.05) is None

    up = silo.send_upload(_upload())
    assert silo.traffic.up == {"s1": up}
    received = agg.receive_upload(timeout=2)
    assert received is not None and received.size == up
    assert received.message.silo_id == "s1" and received.message.metrics == {"loss": 0.5}
    received.ack()
    assert agg.receive_upload(timeout=0.05) is None
    with pytest.raises(ValueError):
        silo.receive_plan("s2", timeout=0)


def test_plan_to_unknown_silo_is_unroutable(pair) -> None:
    agg, _ = pair
    with pytest.raises(PublishError, match="nobody"):
        agg.send_plan(_plan("nobody"))


def test_chunked_payload_is_byte_exact(broker_url: str) -> None:
    agg = AmqpTransport(broker_url, "aggregator", silo_ids=["s1"], chunk_size=64 * 1024)
    silo = AmqpTransport(broker_url, "s1", chunk_size=64 * 1024, prefetch=2)
    try:
        gen = torch.Generator().manual_seed(0)
        params = {f"t{i}": torch.randn(256, 1024, generator=gen) for i in range(3)}  # 3 MiB
        upload = Upload(1, "s1", params, {"e": torch.randn(17, generator=gen)}, 9)
        encoded = protocol.encode(upload)
        assert len(encoded) > 40 * 64 * 1024  # many more chunks than prefetch
        silo.send_upload(upload)
        silo.send_upload(_upload(round_=2))  # a small one behind it
        got = agg.receive_upload(timeout=2.5)
        assert got is not None and got.size == len(encoded)
        assert hashlib.sha256(protocol.encode(got.message)).hexdigest() == (
            hashlib.sha256(encoded).hexdigest()
        )
        for name, tensor in params.items():
            assert torch.equal(got.message.params[name], tensor)
        assert torch.equal(got.message.embeddings["e"], upload.embeddings["e"])
        second = agg.receive_upload(timeout=1)  # first still unacked: no prefetch stall
        assert second is not None and second.message.round == 2
        got.ack()
        second.ack()
        assert agg.receive_upload(timeout=0.05) is None
        assert agg.rejected == {}
    finally:
        agg.close()
        silo.close()


def test_unacked_is_redelivered_acked_is_not(broker_url: str) -> None:
    agg = AmqpTransport(broker_url, "aggregator", silo_ids=["s1"], chunk_size=1024)
    agg.send_plan(_plan(n=1000))  # chunked: all chunks must come back
    agg.close()
    silo = AmqpTransport(broker_url, "s1", chunk_size=1024)
    first = silo.receive_plan("s1", timeout=2)
    assert first is not None
    silo.close()  # no ack
    silo = AmqpTransport(broker_url, "s1", chunk_size=1024)
    again = silo.receive_plan("s1", timeout=2)
    assert again is not None and again.size == first.size
    assert torch.equal(again.message.params["k.shared.A"], first.message.params["k.shared.A"])
    again.ack()
    silo.close()
    silo = AmqpTransport(broker_url, "s1")
    try:
        assert silo.receive_plan("s1", timeout=0.1) is None
    finally:
        silo.close()


def _dead_bodies(url: str, n: int, within: float = 2.0) -> list[bytes]:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        bodies: list[bytes] = []
        deadline = time.monotonic() + within
        while len(bodies) < n and time.monotonic() < deadline:
            method, _, body = ch.basic_get(DEAD_QUEUE, auto_ack=True)
            if method is None:
                conn.sleep(0.02)
            else:
                bodies.append(body)
        return bodies
    finally:
        conn.close()


def test_garbage_is_rejected_dead_lettered_and_counted(pair, broker_url: str) -> None:
    agg, silo = pair
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    ch = conn.channel()
    ch.basic_publish(UPLOADS_EXCHANGE, UPLOADS_ROUTING_KEY, b"not a fedsilo message")
    ch.basic_publish(  # a chunk header that makes no sense
        UPLOADS_EXCHANGE,
        UPLOADS_ROUTING_KEY,
        b"xx",
        pika.BasicProperties(headers={"fedsilo-chunk-id": "m", "fedsilo-chunk-index": 0}),
    )
    ch.basic_publish(  # a plan on the uploads queue
        UPLOADS_EXCHANGE, UPLOADS_ROUTING_KEY, protocol.encode(_plan())
    )
    conn.close()
    silo.send_upload(_upload())
    got = agg.receive_upload(timeout=2)
    assert got is not None and got.message.silo_id == "s1"
    got.ack()
    assert agg.rejected == {"protocol": 2, "chunk: bad header": 1}
    dead = _dead_bodies(broker_url, 3)
    assert b"not a fedsilo message" in dead and b"xx" in dead and len(dead) == 3


def test_unreachable_broker_message_masks_password() -> None:
    url = "amqp://user:s3cr3t-pw@127.0.0.1:1/fed"
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable) as exc:
        AmqpTransport(url, "aggregator", connect_timeout=1)
    assert time.monotonic() - start < 3
    text = str(exc.value)
    assert "127.0.0.1:1" in text and "s3cr3t-pw" not in text
    assert "rabbitmq-server -detached" in text
    assert exc.value.__cause__ is None and exc.value.__suppress_context__


def test_mask_url() -> None:
    assert mask_url("amqp://u:p@h/v") == "amqp://u:***@h:5672/v"
    assert mask_url("amqps://h:1234") == "amqps://h:1234"
    assert mask_url("amqps://u@h/") == "amqps://u@h:5671/"


def test_falls_back_to_classic_queues_when_quorum_is_refused(broker_url: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    conn.channel().queue_declare(DEAD_QUEUE, durable=True)  # classic: quorum now refused
    conn.close()
    agg = AmqpTransport(broker_url, "aggregator", silo_ids=["s1"])
    try:
        assert agg.topology.quorum is False
        agg.send_plan(_plan())
        silo = AmqpTransport(broker_url, "s1")
        got = silo.receive_plan("s1", timeout=2)
        assert got is not None
        got.ack()
        silo.close()
    finally:
        agg.close()
