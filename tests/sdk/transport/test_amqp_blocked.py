"""A broker resource alarm (disk) blocks publishing; the transport waits it out.

This raises a real disk alarm on the whole test broker for about two seconds
(`rabbitmqctl set_disk_free_limit`), then restores the limit read beforehand, in a
`finally`. Other publishers on the broker stall for that window (they are not failed).
Set FEDSILO_SKIP_BROKER_ALARM=1 to skip it on a shared broker.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time

import pytest
import torch

from fedsilo.sdk.messages import Upload
from fedsilo.sdk.transport.amqp import AmqpTransport

pytestmark = pytest.mark.skipif(
    os.environ.get("FEDSILO_SKIP_BROKER_ALARM") == "1", reason="FEDSILO_SKIP_BROKER_ALARM=1"
)


def _ctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=30
    ).stdout


def _disk_free_limit() -> int:
    """The broker's current disk free limit in bytes (what to restore)."""
    status = json.loads(_ctl("status", "--formatter", "json"))
    limit = status.get("disk_free_limit")
    if not isinstance(limit, int) or limit <= 0:
        pytest.skip(f"cannot read the broker's disk_free_limit (got {limit!r})")
    return limit


def test_publish_during_disk_alarm_completes_after_it_clears(broker_url: str, caplog) -> None:
    caplog.set_level(logging.INFO, logger="fedsilo.sdk.transport.amqp")
    patient = AmqpTransport(broker_url, "s1")  # default blocked_connection_timeout: 300 s
    impatient = AmqpTransport(  # its blocked timeout expires: reconnect and retry
        broker_url, "s1", blocked_connection_timeout=0.3, backoff_base=0.05, backoff_cap=0.2
    )
    agg = AmqpTransport(broker_url, "aggregator", silo_ids=["s1"])
    results: dict[str, object] = {}

    def send(name: str, transport: AmqpTransport, round_: int) -> None:
        try:
            upload = Upload(round_, "s1", {"k": torch.ones(4) * round_}, {}, 1)
            results[name] = transport.send_upload(upload)
        except BaseException as exc:  # reported by the assertions below
            results[name] = exc

    threads = [
        threading.Thread(target=send, args=("patient", patient, 1), daemon=True),
        threading.Thread(target=send, args=("impatient", impatient, 2), daemon=True),
    ]
    try:
        original = _disk_free_limit()
        try:
            _ctl("set_disk_free_limit", str(2**62))  # more than any disk: alarm now
            for t in threads:  # each transport is used by its thread only
                t.start()
            time.sleep(1.0)
            assert all(t.is_alive() for t in threads), results  # both held by the alarm
            assert patient.blocked and impatient.blocked
        finally:
            _ctl("set_disk_free_limit", str(original))
        for t in threads:
            t.join(15)
        assert not any(t.is_alive() for t in threads)
        assert isinstance(results["patient"], int) and isinstance(results["impatient"], int)
        assert patient.reconnects == 0 and impatient.reconnects >= 1
        assert not patient.blocked
        # At-least-once: each publish attempt cut off by the blocked timeout may have
        # reached the queue before the retry did, so round 2 may come more than once.
        rounds: list[int] = []
        while (got := agg.receive_upload(timeout=0.5)) is not None:
            rounds.append(got.message.round)
            got.ack()
        assert set(rounds) == {1, 2} and rounds.count(1) == 1, rounds
    finally:
        for t in threads:
            t.join(15)
        agg.close()
        patient.close()
        impatient.close()
    blocked = [r for r in caplog.records if "blocked publishing" in r.getMessage()]
    assert [r.levelno for r in blocked].count(logging.WARNING) == 2  # once per transport
    assert any(r.levelno == logging.INFO and "unblocked" in r.getMessage() for r in blocked)
