"""Chunk reassembly quotas through the real broker: a sender that fills its share with
chunk sets it never completes (and keeps re-sending) costs an honest sender nothing."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pika
import pytest
import torch

from fedsilo.sdk.messages import Upload
from fedsilo.sdk.transport.amqp import AmqpTransport
from fedsilo.sdk.transport.amqp_topology import UPLOADS_EXCHANGE, UPLOADS_ROUTING_KEY
from fedsilo.sdk.transport.chunking import split


def _ctl(*args: str) -> None:
    result = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def mallory_url(broker_url: str) -> Iterator[str]:
    """A second broker user on the test vhost: its publishes carry its validated user id."""
    parts = urlsplit(broker_url)
    user, password = f"mallory-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    _ctl("add_user", user, password)
    try:
        _ctl("set_permissions", "-p", parts.path.lstrip("/"), user, "", "^fedsilo\\.uploads$", "")
        host = f"{parts.hostname}:{parts.port or 5672}"
        yield urlunsplit((parts.scheme, f"{user}:{password}@{host}", parts.path, "", ""))
    finally:
        subprocess.run(["rabbitmqctl", "delete_user", user], capture_output=True, check=False)


def test_a_sender_filling_its_chunk_quota_does_not_cost_an_honest_upload(
    broker_url: str, mallory_url: str
) -> None:
    agg = AmqpTransport(broker_url, "aggregator", silo_ids=["s1"], max_pending_bytes=64_000,
                        reassembly_timeout=600.0)
    silo = AmqpTransport(broker_url, "s1", chunk_size=16_000)
    try:
        parts = urlsplit(mallory_url)
        connection = pika.BlockingConnection(pika.URLParameters(mallory_url))
        channel = connection.channel()
        channel.confirm_delivery()
        user = parts.username
        # Four never-completed sets of 16 kB chunks: 64 kB, the whole quota, then the same
        # chunks again (duplicates must neither count twice nor keep the sets alive).
        for n in range(4):
            first = split(os.urandom(50_000), f"junk-{n}", 16_000)[0]
            for _ in range(2):
                channel.basic_publish(
                    UPLOADS_EXCHANGE, UPLOADS_ROUTING_KEY, first.data,
                    pika.BasicProperties(delivery_mode=2, user_id=user,
                                         headers=first.header.to_headers()),
                    mandatory=True,
                )
        connection.close()
        upload = Upload(0, "s1", {"w": torch.randn(12_000)}, {}, 3)  # ~48 kB: 3-4 chunks
        silo.send_upload(upload)
        got = agg.receive_upload(timeout=30)
        assert got is not None, agg.rejected
        assert torch.equal(got.message.params["w"], upload.params["w"])
        got.ack()
        assert "chunk: pending bytes cap" not in agg.rejected
        assert agg.receive_upload(timeout=0.5) is None  # mallory's sets stay incomplete
    finally:
        agg.close()
        silo.close()
