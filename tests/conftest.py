"""`broker_url`: a fresh vhost on a real RabbitMQ broker, deleted afterwards.

Skips when no broker answers or `rabbitmqctl` is missing, unless FEDSILO_REQUIRE_BROKER=1
(then the test fails with the reason). Base URL: FEDSILO_TEST_BROKER_URL.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _unavailable(reason: str) -> None:
    message = f"RabbitMQ broker tests need a broker: {reason}"
    if os.environ.get("FEDSILO_REQUIRE_BROKER") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _ctl(*args: str) -> None:
    result = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        _unavailable(f"`rabbitmqctl {' '.join(args)}` failed: {result.stderr.strip()}")


@pytest.fixture
def broker_url() -> Iterator[str]:
    base = os.environ.get("FEDSILO_TEST_BROKER_URL", DEFAULT_BROKER_URL)
    parts = urlsplit(base)
    host, port = parts.hostname or "localhost", parts.port or 5672
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        _unavailable(
            f"nothing answers at {host}:{port} ({exc}); start one with "
            "`rabbitmq-server -detached` or set FEDSILO_TEST_BROKER_URL"
        )
    if shutil.which("rabbitmqctl") is None:
        _unavailable("`rabbitmqctl` is not on PATH (needed to create a test vhost)")
    vhost = f"fedsilo-test-{uuid.uuid4().hex[:12]}"
    user = parts.username or "guest"
    _ctl("add_vhost", vhost)
    try:
        _ctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield urlunsplit((parts.scheme, parts.netloc, f"/{vhost}", "", ""))
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, check=False)


@pytest.fixture(scope="session")
def tls_broker() -> Iterator[object]:
    """A second RabbitMQ node, TLS only, with a fresh CA (see tests/tls_broker.py): yields a
    `tls_broker.TlsBroker` (url, limited_url, ca_file, client_cert, client_key, node,
    ctl(*args)). Starting it takes several seconds, once per session; same skip/fail policy
    as `broker_url`."""
    import tls_broker as node  # tests/ is on sys.path (rootdir conftest, prepend mode)

    try:
        broker, process = node.start()
    except node.BrokerStartError as exc:
        _unavailable(f"cannot start a TLS RabbitMQ node: {exc}")
    try:
        yield broker
    finally:
        node.stop(broker, process)
