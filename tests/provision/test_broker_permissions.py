"""The provisioned broker definitions on a REAL RabbitMQ: imported with rabbitmqctl, then
each party's user tried against what it may and may not do.

Skips without a broker (see tests/conftest.py). Users are created broker-wide, so each test
uses a unique federation name and deletes its users in a finally block; the vhost is the
`broker_url` fixture's throwaway one."""

from __future__ import annotations

import subprocess
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pika
import pika.exceptions
import pytest
import torch

from fedsilo.aggregator.config import FederationConfig
from fedsilo.provision.builders import provision
from fedsilo.provision.context import ProvisionResult
from fedsilo.sdk.config import load_config
from fedsilo.sdk.messages import RoundPlan, Upload
from fedsilo.sdk.transport.amqp import AmqpTransport
from fedsilo.sdk.transport.amqp_connection import SiloAlreadyConnected
from fedsilo.sdk.transport.amqp_topology import (
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    PLANS_EXCHANGE,
    UPLOADS_EXCHANGE,
    UPLOADS_QUEUE,
    UPLOADS_ROUTING_KEY,
    lock_queue,
    plans_queue,
)
from fedsilo.sdk.transport.settings import BrokerSettings
from fedsilo.silo_agent.config import SiloConfig

SILOS = ("silo-a", "silo-b")


def _ctl(*args: str, stdin: Any = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", *args], stdin=stdin, capture_output=True, text=True,
                          timeout=120, check=False)


@dataclass(frozen=True)
class Federation:
    kit: Path
    result: ProvisionResult
    admin_url: str  # guest, on the same vhost

    def url(self, party: str) -> str:
        """The party's URL, built from its kit the way its service does (config + password)."""
        folder = self.kit / party
        config = folder / ("federation.toml" if party == "aggregator" else "silo.toml")
        broker = tomllib.loads(config.read_text())["broker"]
        settings = BrokerSettings(
            urls=tuple(broker["urls"]), password_file=folder / broker["password_file"]
        )
        return settings.resolved_urls()[0]

    def connect(self, party: str) -> pika.BlockingConnection:
        return pika.BlockingConnection(pika.URLParameters(self.url(party)))


def _admin(url: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(url))


def _wait_for_import(fed: Federation, timeout: float = 60.0) -> None:
    """`import_definitions` returns before the import is applied: wait until every party can
    log in and the last queue exists."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            for party in fed.result.parties:
                fed.connect(party).close()
            with _admin(fed.admin_url) as conn:
                conn.channel().queue_declare(plans_queue(SILOS[-1]), passive=True)
            return
        except pika.exceptions.AMQPError as exc:
            last_error = exc
            time.sleep(0.2)
    raise AssertionError(f"definitions not applied after {timeout} s: {last_error!r}")


@pytest.fixture
def fed(request: pytest.FixtureRequest, tmp_path: Path, broker_url: str
        ) -> Iterator[Federation]:
    """The provisioned federation; `indirect` parametrisation adds `[broker]` TOML lines."""
    name = f"fedtest{uuid.uuid4().hex[:10]}"
    config = tmp_path / "federation.toml"
    config.write_text(
        f'name = "{name}"\nsilos = {list(SILOS)!r}\n'.replace("'", '"')
        + f'[broker]\nurls = ["{broker_url}"]\n' + getattr(request, "param", "")
    )
    result = provision(config, tmp_path / "kit")
    assert result.vhost == urlsplit(broker_url).path.lstrip("/")  # the fixture's vhost
    try:
        with (tmp_path / "kit" / "broker" / "definitions.json").open() as definitions:
            done = _ctl("import_definitions", stdin=definitions)  # the README's command
        assert done.returncode == 0, done.stderr
        federation = Federation(tmp_path / "kit", result, broker_url)
        _wait_for_import(federation)
        yield federation
    finally:
        deleting = [  # in parallel: each rabbitmqctl call takes about half a second
            subprocess.Popen(["rabbitmqctl", "delete_user", user], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
            for user in result.usernames.values()
        ]
        for process in deleting:
            process.wait(timeout=120)


def _refused(action: Callable[[Any], Any], conn: pika.BlockingConnection,
             confirm: bool = False) -> None:
    """`action(channel)` must close the channel with 403 ACCESS_REFUSED (the connection
    survives: only the channel dies)."""
    channel = conn.channel()
    if confirm:
        channel.confirm_delivery()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        action(channel)
    assert info.value.reply_code == 403, info.value
    assert "ACCESS_REFUSED" in info.value.reply_text
    assert conn.is_open


def _plan(silo: str) -> RoundPlan:
    return RoundPlan(0, silo, 1, 0.01, 1, {"m0": [0]}, {"k.shared.A": torch.arange(4.0)})


def test_silo_can_do_its_job(fed: Federation) -> None:
    with _admin(fed.admin_url) as admin, fed.connect("silo-a") as silo:
        admin_ch = admin.channel()
        admin_ch.confirm_delivery()
        admin_ch.basic_publish(PLANS_EXCHANGE, "silo-a", b"plan for a", mandatory=True)

        ch = silo.channel()
        ch.confirm_delivery()
        ch.basic_publish(UPLOADS_EXCHANGE, UPLOADS_ROUTING_KEY, b"upload",
                         pika.BasicProperties(delivery_mode=2), mandatory=True)
        method, _, body = _get(ch, plans_queue("silo-a"))
        assert body == b"plan for a"
        ch.basic_ack(method.delivery_tag)

        method, _, body = _get(admin_ch, UPLOADS_QUEUE)
        assert body == b"upload"
        admin_ch.basic_ack(method.delivery_tag)


def _get(channel: Any, queue: str, timeout: float = 10.0) -> tuple[Any, Any, bytes]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        method, props, body = channel.basic_get(queue, auto_ack=False)
        if method is not None:
            return method, props, body
        time.sleep(0.05)
    raise AssertionError(f"nothing arrived on {queue}")


def test_silo_cannot_do_anything_else(fed: Federation) -> None:
    with fed.connect("silo-a") as silo:
        _refused(lambda ch: ch.basic_get(plans_queue("silo-b")), silo)  # another silo's plans
        _refused(lambda ch: ch.basic_get(UPLOADS_QUEUE), silo)  # the other silos' uploads
        _refused(lambda ch: ch.basic_publish(PLANS_EXCHANGE, "silo-b", b"forged plan"),
                 silo, confirm=True)
        _refused(lambda ch: ch.basic_publish("", plans_queue("silo-b"), b"via default"),
                 silo, confirm=True)
        _refused(lambda ch: ch.basic_publish("", plans_queue("silo-a"), b"via default"),
                 silo, confirm=True)
        _refused(lambda ch: ch.queue_declare("silo-a.private", durable=True), silo)
        _refused(lambda ch: ch.queue_declare(plans_queue("silo-a"), durable=True,
                                             arguments={"x-queue-type": "quorum"}), silo)
        _refused(lambda ch: ch.queue_delete(plans_queue("silo-a")), silo)
        _refused(lambda ch: ch.exchange_declare("silo-a.x", exchange_type="fanout"), silo)
        _refused(lambda ch: ch.queue_bind(plans_queue("silo-a"), UPLOADS_EXCHANGE, "x"), silo)
        _refused(lambda ch: ch.basic_consume(plans_queue("silo-b"), lambda *a: None), silo)
        _refused(lambda ch: ch.queue_declare(lock_queue("silo-b"), exclusive=True), silo)

    # no access to any other vhost
    other = urlunsplit(urlsplit(fed.url("silo-a"))._replace(path="/"))
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError):
        pika.BlockingConnection(pika.URLParameters(other))


def test_a_silo_can_only_count_what_lies_in_other_queues(fed: Federation) -> None:
    """RabbitMQ checks no permission on a passive queue.declare (it creates nothing), so a
    silo's user learns another queue's message and consumer counts (whether silo-b is
    connected, how many plans wait for it) but never a message: SECURITY.md, Not protected.
    If a broker release closes this, this test fails and the sentence must change."""
    with _admin(fed.admin_url) as admin, fed.connect("silo-a") as silo:
        admin.channel().basic_publish(PLANS_EXCHANGE, "silo-b", b"plan for b", mandatory=True)
        deadline = time.monotonic() + 30
        counts = (0, 0)
        while time.monotonic() < deadline and counts[0] < 1:
            ok = silo.channel().queue_declare(plans_queue("silo-b"), passive=True)
            counts = (ok.method.message_count, ok.method.consumer_count)
            time.sleep(0.05)
        assert counts == (1, 0)
        _refused(lambda ch: ch.basic_get(plans_queue("silo-b")), silo)  # but not the content


def test_wrong_password_is_refused_at_login(fed: Federation) -> None:
    url = urlsplit(fed.url("silo-a"))
    wrong = urlunsplit(url._replace(netloc=f"{url.username}:not-the-password@{url.hostname}:"
                                           f"{url.port or 5672}"))
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(pika.URLParameters(wrong))
    # a silo's password is not the aggregator's
    stolen = urlunsplit(url._replace(netloc=f"{quote(fed.result.usernames['aggregator'])}:"
                                            f"{quote(url.password or '')}@{url.hostname}:"
                                            f"{url.port or 5672}"))
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(pika.URLParameters(stolen))


def test_aggregator_redeclares_over_the_imported_topology(fed: Federation) -> None:
    """Any flag or argument differing from the imported topology would make this redeclare
    fail with PRECONDITION_FAILED (and the quorum fallback would hide it: check it too)."""
    aggregator = AmqpTransport([fed.url("aggregator")], "aggregator", silo_ids=SILOS)
    try:
        assert aggregator.topology.quorum
        aggregator.send_plan(_plan("silo-a"))
    finally:
        aggregator.close()
    with fed.connect("aggregator") as conn:  # ... and it reaches nothing outside the federation
        _refused(lambda ch: ch.queue_declare("elsewhere", durable=True), conn)
        _refused(lambda ch: ch.basic_publish("amq.topic", "x", b"x"), conn, confirm=True)


def test_the_kits_run_a_round_trip(fed: Federation) -> None:
    """The services' own path: each kit's config loaded as is, its broker user, keys and
    trust file (signed and encrypted envelopes), the silo declaring nothing."""
    fcfg = load_config(FederationConfig, fed.kit / "aggregator" / "federation.toml", env={})
    scfg = load_config(SiloConfig, fed.kit / "silo-b" / "silo.toml", env={})
    assert fcfg.security.enabled and not scfg.broker.declare_topology
    aggregator = fcfg.broker.connect(
        "aggregator", fcfg.silos, codec=fcfg.security.codec("aggregator", fcfg.name)
    )
    silo = scfg.broker.connect(scfg.silo_id, codec=scfg.security.codec(scfg.silo_id),
                               exclusive=True)  # as the agent connects
    try:
        with pytest.raises(SiloAlreadyConnected, match="another agent of silo-b"):
            scfg.broker.connect(scfg.silo_id, codec=scfg.security.codec(scfg.silo_id),
                                exclusive=True)
        aggregator.send_plan(_plan("silo-b"))
        delivery = silo.receive_plan("silo-b", timeout=10)
        assert delivery is not None and delivery.message.silo_id == "silo-b"
        assert torch.equal(delivery.message.params["k.shared.A"], torch.arange(4.0))
        delivery.ack()
        silo.send_upload(Upload(0, "silo-b", {"k": torch.zeros(2)}, {}, 3))
        upload = aggregator.receive_upload(timeout=10)
        assert upload is not None and upload.message.silo_id == "silo-b"
        upload.ack()
        assert aggregator.rejected == {} and silo.rejected == {}
    finally:
        aggregator.close()
        silo.close()
    with _admin(fed.admin_url) as admin:  # what crossed the broker was sealed
        admin_ch = admin.channel()
        admin_ch.confirm_delivery()
        admin_ch.basic_publish(PLANS_EXCHANGE, "silo-b", b"unsigned", mandatory=True)
    silo = scfg.broker.connect(scfg.silo_id, codec=scfg.security.codec(scfg.silo_id),
                               exclusive=True)  # the first one closed: its lock is free
    try:
        assert silo.receive_plan("silo-b", timeout=1) is None
        assert sum(silo.rejected.values()) == 1
    finally:
        silo.close()


def test_a_silo_transport_that_declares_is_told_why(fed: Federation) -> None:
    from fedsilo.sdk.transport.amqp_connection import BrokerUnavailable

    with pytest.raises(BrokerUnavailable, match="declare_topology"):
        AmqpTransport([fed.url("silo-a")], "silo-a")


@pytest.mark.parametrize("fed", ["dead_letter_max = 3\n"], indirect=True)
def test_the_dead_letter_queue_is_bounded(fed: Federation) -> None:
    with _admin(fed.admin_url) as admin:
        channel = admin.channel()
        channel.confirm_delivery()
        for i in range(6):
            channel.basic_publish(DEAD_EXCHANGE, "", f"refused {i}".encode(), mandatory=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the policy applies asynchronously
            count = channel.queue_declare(DEAD_QUEUE, passive=True).method.message_count
            if count <= 3:
                break
            time.sleep(0.2)
        assert count == 3
        method, _, body = channel.basic_get(DEAD_QUEUE, auto_ack=True)
        assert method is not None and body == b"refused 3"  # the oldest were dropped
