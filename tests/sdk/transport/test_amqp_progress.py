"""Progress reports of chunked transfers, on a real broker (fresh vhost, see conftest)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedsilo.sdk import protocol
from fedsilo.sdk.messages import Upload
from fedsilo.sdk.transport.amqp import AmqpTransport, TransferProgress
from fedsilo.sdk.transport.amqp_topology import UPLOADS_EXCHANGE, UPLOADS_QUEUE

CHUNK = 8 * 1024


def _upload(round_: int, floats: int) -> Upload:
    gen = torch.Generator().manual_seed(round_)
    return Upload(round_, "s1", {"k.A": torch.randn(floats, generator=gen)}, {}, 3)


def _check(events: list[TransferProgress], direction: str, name: str, size: int) -> None:
    count = -(-size // CHUNK)
    assert len(events) == count
    assert len({e.message_id for e in events}) == 1
    done = 0
    for i, e in enumerate(events, start=1):
        assert (e.direction, e.name, e.chunks_done, e.chunks_total) == (direction, name, i, count)
        assert e.total_bytes == size and done < e.done_bytes <= size
        done = e.done_bytes
    assert done == size


def test_progress_sees_every_chunk_in_order_on_both_sides(broker_url: str) -> None:
    sent: list[TransferProgress] = []
    received: list[TransferProgress] = []
    silo = AmqpTransport(broker_url, "s1", chunk_size=CHUNK, progress=sent.append)
    agg = AmqpTransport(
        broker_url, "aggregator", silo_ids=["s1"], chunk_size=CHUNK, progress=received.append
    )
    try:
        big = _upload(1, 20_000)  # ~80 KB: ~10 chunks
        size = silo.send_upload(big)
        assert size == len(protocol.encode(big)) > 5 * CHUNK
        _check(sent, "send", UPLOADS_EXCHANGE, size)
        got = agg.receive_upload(timeout=2)
        assert got is not None and got.size == size
        got.ack()
        _check(received, "receive", UPLOADS_QUEUE, size)
        assert received[0].message_id == sent[0].message_id

        sent.clear()
        received.clear()
        silo.send_upload(_upload(2, 10))  # one chunk: no progress reports
        got = agg.receive_upload(timeout=2)
        assert got is not None and got.message.round == 2
        got.ack()
        assert sent == [] and received == []
    finally:
        agg.close()
        silo.close()


def test_a_failing_progress_callback_does_not_break_the_transfer(broker_url: str) -> None:
    def broken(_: TransferProgress) -> None:
        raise OSError("display went away")

    silo = AmqpTransport(broker_url, "s1", chunk_size=CHUNK, progress=broken)
    agg = AmqpTransport(broker_url, "aggregator", silo_ids=["s1"], chunk_size=CHUNK)
    try:
        size = silo.send_upload(_upload(1, 5_000))
        got = agg.receive_upload(timeout=2)
        assert got is not None and got.size == size
        got.ack()
        assert silo.reconnects == 0  # the OSError was not mistaken for a lost connection
    finally:
        agg.close()
        silo.close()


def test_transfer_progress_is_frozen() -> None:
    p = TransferProgress("send", "x", "m", 1, 2, 1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.done_bytes = 2  # type: ignore[misc]
