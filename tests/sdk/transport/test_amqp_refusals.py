"""A broker that answers but refuses (wrong password, missing vhost) is told apart from one
that is not there: the error names what was refused and what to check, not "start a
broker", and is raised at once (retrying a refused login cannot help)."""

from __future__ import annotations

import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import pika.exceptions
import pytest

from fedsilo.sdk.transport.amqp import AmqpTransport
from fedsilo.sdk.transport.amqp_connection import BrokerUnavailable, refusal


def _with(url: str, password: str | None = None, vhost: str | None = None) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if password is not None:
        user = parts.username or "guest"
        netloc = f"{user}:{password}@{parts.hostname}:{parts.port or 5672}"
    path = parts.path if vhost is None else f"/{vhost}"
    return urlunsplit((parts.scheme, netloc, path, "", ""))


def test_refusals_are_classified() -> None:
    closed = pika.exceptions.ConnectionClosedByBroker(403, "ACCESS_REFUSED - Login was refused")
    assert refusal(pika.exceptions.ProbableAuthenticationError(closed)) == "credentials"
    assert refusal(closed) == "credentials"
    vhost = pika.exceptions.ConnectionClosedByBroker(530, "NOT_ALLOWED - vhost x not found")
    assert refusal(pika.exceptions.ProbableAccessDeniedError(vhost)) == "vhost"
    assert refusal(ConnectionRefusedError(111, "Connection refused")) is None
    assert refusal(pika.exceptions.AMQPConnectionError("timeout")) is None


def test_a_wrong_password_says_the_credentials_were_refused(broker_url: str) -> None:
    url = _with(broker_url, password="not-the-pw-s3cret")
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable) as info:
        AmqpTransport(url, "aggregator", startup_timeout=30)
    assert time.monotonic() - start < 20  # not retried for the whole startup_timeout
    text = str(info.value)
    assert "refused the credentials of user 'guest'" in text
    assert "broker.urls" in text and "password_file" in text
    assert "rabbitmq-server" not in text and "Start a broker" not in text
    assert "not-the-pw-s3cret" not in text


def test_a_missing_vhost_says_how_to_create_it(broker_url: str) -> None:
    vhost = f"fedsilo-absent-{uuid.uuid4().hex[:8]}"
    with pytest.raises(BrokerUnavailable) as info:
        AmqpTransport(_with(broker_url, vhost=vhost), "aggregator")
    text = str(info.value)
    assert f"access to the vhost {vhost!r}" in text
    assert f"rabbitmqctl add_vhost {vhost}" in text
    assert f"rabbitmqctl set_permissions -p {vhost} guest" in text
    assert "rabbitmq-server" not in text
