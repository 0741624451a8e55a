"""AmqpTransport survives faults: several URLs, broker-side closes, network loss, outages.

Real broker, real pika (fresh vhost per test, see conftest). Network faults go through a
small in-process TCP proxy; broker-side closes use `rabbitmqctl close_all_connections`
on the test's own vhost only.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import pytest
import torch

from fedsilo.sdk import protocol
from fedsilo.sdk.messages import RoundPlan, Upload
from fedsilo.sdk.transport.amqp import AmqpTransport, TransferProgress
from fedsilo.sdk.transport.amqp_connection import BrokerUnavailable, mask_url

CHUNK = 16 * 1024
FAST = {"backoff_base": 0.05, "backoff_cap": 0.2, "connect_timeout": 2.0}


def _plan(silo: str = "s1", round_: int = 3) -> RoundPlan:
    return RoundPlan(round_, silo, 5, 0.01, 2, {"m0": [0, 1]}, {"k": torch.arange(8) * 1.5})


def _upload(round_: int, floats: int = 3, seed: int = 0) -> Upload:
    gen = torch.Generator().manual_seed(seed)
    params = {"k.A": torch.randn(floats, generator=gen)}
    return Upload(round_, "s1", params, {"e": torch.zeros(2)}, 7, {"loss": 0.5})


def _vhost(url: str) -> str:
    return urlsplit(url).path[1:]


def _close_all(vhost: str) -> None:
    """Make the broker close every connection of `vhost` (CONNECTION_FORCED, code 320)."""
    subprocess.run(
        ["rabbitmqctl", "close_all_connections", "-p", vhost, "fedsilo test: simulated fault"],
        check=True,
        capture_output=True,
        timeout=30,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit((parts.scheme, f"{auth}127.0.0.1:{port}", parts.path, "", ""))


class TcpProxy:
    """Forwards 127.0.0.1:`port` to the broker; can cut every connection or stop listening."""

    def __init__(self, target: tuple[str, int], port: int | None = None) -> None:
        self.target = target
        self.port = port or _free_port()
        self._listener: socket.socket | None = None
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        listener.settimeout(0.05)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._socks += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Network loss: every proxied connection dies at once (both ends see it)."""
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def stop(self) -> None:
        """Outage: cut everything and refuse new connections."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self.cut()


@pytest.fixture
def proxy(broker_url: str):
    parts = urlsplit(broker_url)
    p = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5672)).start()
    yield p
    p.stop()


# -- several URLs ------------------------------------------------------------------------


def test_failover_to_second_url_at_start(broker_url: str) -> None:
    dead = _with_port(broker_url, _free_port())
    agg = AmqpTransport([dead, broker_url], "aggregator", silo_ids=["s1"], **FAST)
    silo = AmqpTransport((dead, broker_url), "s1", **FAST)
    try:
        assert agg.url == broker_url and agg.urls == (dead, broker_url)
        size = agg.send_plan(_plan())
        got = silo.receive_plan("s1", timeout=2)
        assert got is not None and got.size == size and got.message.round == 3
        got.ack()
        assert agg.reconnects == silo.reconnects == 0
    finally:
        agg.close()
        silo.close()


def test_all_urls_dead_names_each_masked_url() -> None:
    urls = [
        f"amqp://alice:pw-one-s3cret@127.0.0.1:{_free_port()}/fed",
        f"amqp://bob:pw-two-s3cret@127.0.0.1:{_free_port()}/fed",
    ]
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable) as exc:
        AmqpTransport(urls, "aggregator", connect_timeout=1)
    assert time.monotonic() - start < 3
    text = str(exc.value)
    for url in urls:
        assert mask_url(url) in text
    assert "s3cret" not in text and "rabbitmq-server -detached" in text
    assert exc.value.__cause__ is None and exc.value.__suppress_context__


def test_startup_timeout_retries_then_gives_up() -> None:
    url = f"amqp://u:pw-s3cret@127.0.0.1:{_free_port()}/fed"
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable) as exc:
        AmqpTransport(url, "aggregator", startup_timeout=1.0, **FAST)
    assert 1.0 <= time.monotonic() - start < 3
    assert mask_url(url) in str(exc.value) and "s3cret" not in str(exc.value)


def test_startup_timeout_waits_for_a_broker_that_comes_up(broker_url: str) -> None:
    proxy = TcpProxy(("127.0.0.1", urlsplit(broker_url).port or 5672))  # not listening yet
    timer = threading.Timer(0.8, proxy.start)
    start = time.monotonic()
    timer.start()
    try:
        silo = AmqpTransport(_with_port(broker_url, proxy.port), "s1", startup_timeout=10, **FAST)
        assert time.monotonic() - start >= 0.7
        silo.send_upload(_upload(1))
        silo.close()
    finally:
        timer.cancel()
        proxy.stop()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        AmqpTransport([], "aggregator")
    with pytest.raises(ValueError):
        AmqpTransport("amqp://h/", "aggregator", backoff_base=0)


# -- broker closes connections -------------------------------------------------------------


def test_broker_closes_connections_mid_transfer(broker_url: str, caplog) -> None:
    """The broker drops every connection (1) while the receiver holds an unacked delivery
    and the sender is half-way through a chunked publish, then (2) between two publishes.
    Everything arrives byte-exact; nothing is lost; the stale ack does not raise."""
    caplog.set_level(logging.WARNING, logger="fedsilo.sdk.transport.amqp")
    vhost = _vhost(broker_url)
    closes: list[TransferProgress] = []

    def close_mid_publish(p: TransferProgress) -> None:
        if p.direction == "send" and p.chunks_done == 5 and not closes:
            closes.append(p)
            _close_all(vhost)

    agg = AmqpTransport(broker_url, "aggregator", silo_ids=["s1"], chunk_size=CHUNK, **FAST)
    silo = AmqpTransport(broker_url, "s1", chunk_size=CHUNK, progress=close_mid_publish, **FAST)
    try:
        sent = {1: _upload(1), 2: _upload(2, floats=60_000, seed=2), 3: _upload(3)}
        encoded = {r: protocol.encode(u) for r, u in sent.items()}
        assert len(encoded[2]) > 10 * CHUNK

        silo.send_upload(sent[1])
        held = agg.receive_upload(timeout=2)
        assert held is not None and held.message.round == 1  # not acked yet

        silo.send_upload(sent[2])  # broker closes everything after chunk 5 of ~15
        assert len(closes) == 1 and silo.reconnects == 1
        held.ack()  # from the dead connection: a no-op, the broker requeued it
        _close_all(vhost)  # sender between publishes
        silo.send_upload(sent[3])
        assert silo.reconnects == 2

        received: dict[int, bytes] = {}
        deadline = time.monotonic() + 10
        while len(received) < 3 and time.monotonic() < deadline:
            got = agg.receive_upload(timeout=1)
            if got is None:
                continue
            data = protocol.encode(got.message)
            assert got.size == len(data)
            assert received.setdefault(got.message.round, data) == data
            got.ack()
        assert received == encoded  # all three, byte-exact (1 redelivered, 2 re-sent whole)
        assert agg.reconnects >= 1
        assert agg.receive_upload(timeout=0.2) is None  # only the orphaned chunks remain
        assert agg.rejected == {}
    finally:
        agg.close()
        silo.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("lost the connection") for m in warnings)
    assert any(m.startswith("reconnected") for m in warnings)
    assert all(":guest@" not in m for m in warnings)  # URLs are masked


def test_receiver_loses_connection_mid_reassembly(broker_url: str) -> None:
    vhost = _vhost(broker_url)
    seen: list[tuple[str, int]] = []

    def on_progress(p: TransferProgress) -> None:
        seen.append((p.message_id, p.chunks_done))
        if len(seen) == 3:
            _close_all(vhost)

    agg = AmqpTransport(broker_url, "aggregator", silo_ids=["s1"], chunk_size=CHUNK, **FAST)
    silo = AmqpTransport(broker_url, "s1", chunk_size=CHUNK, **FAST)
    try:
        upload = _upload(1, floats=40_000, seed=1)
        size = silo.send_upload(upload)
        silo.close()
        agg.progress = on_progress
        got = agg.receive_upload(timeout=5)
        assert got is not None and got.size == size
        assert protocol.encode(got.message) == protocol.encode(upload)
        got.ack()
        assert agg.reconnects == 1
        count = -(-size // CHUNK)
        mid = seen[0][0]
        assert {m for m, _ in seen} == {mid}
        # some chunks (3, or a few more if the close raced), then the partial state was
        # dropped and every chunk came again
        restart = [n for _, n in seen].index(1, 1)
        assert 3 <= restart < count
        assert [n for _, n in seen] == [*range(1, restart + 1), *range(1, count + 1)]
        assert agg.receive_upload(timeout=0.1) is None
    finally:
        agg.close()
        silo.close()


def test_stale_ack_is_a_noop_and_the_message_is_redelivered(broker_url: str, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="fedsilo.sdk.transport.amqp")
    agg = AmqpTransport(broker_url, "aggregator", silo_ids=["s1"], **FAST)
    silo = AmqpTransport(broker_url, "s1", **FAST)
    try:
        agg.send_plan(_plan(round_=1))
        first = silo.receive_plan("s1", timeout=2)
        assert first is not None
        _close_all(_vhost(broker_url))
        again = silo.receive_plan("s1", timeout=3)  # reconnects; the plan is back
        assert silo.reconnects == 1
        assert again is not None and again.message.round == 1 and again.size == first.size
        # `first` and `again` probably carry the same delivery tag (1) on different
        # channels: the stale ack must not acknowledge `again`.
        first.ack()
        first.ack()
        assert any("earlier connection" in r.getMessage() for r in caplog.records)
        silo.close()  # `again` unacked: the plan must still be there
        silo = AmqpTransport(broker_url, "s1", **FAST)
        third = silo.receive_plan("s1", timeout=2)
        assert third is not None and third.message.round == 1
        third.ack()
        assert silo.receive_plan("s1", timeout=0.1) is None
        again.ack()  # after close of its transport: a no-op too
    finally:
        agg.close()
        silo.close()


# -- network loss ------------------------------------------------------------------------


def test_network_loss_keep_alive_reconnects(broker_url: str, proxy: TcpProxy) -> None:
    agg = AmqpTransport(broker_url, "aggregator", silo_ids=["s1"], **FAST)
    silo = AmqpTransport(_with_port(broker_url, proxy.port), "s1", heartbeat=30, **FAST)
    try:
        agg.send_plan(_plan(round_=1))
        held = silo.receive_plan("s1", timeout=2)
        assert held is not None
        silo.keep_alive()
        assert silo.reconnects == 0
        proxy.cut()
        silo.keep_alive()  # finds the dead socket, reconnects
        assert silo.reconnects == 1
        held.ack()  # stale
        again = silo.receive_plan("s1", timeout=2)
        assert again is not None and again.message.round == 1
        again.ack()
        assert silo.receive_plan("s1", timeout=0.1) is None
    finally:
        agg.close()
        silo.close()


def test_fails_over_to_the_next_url_after_a_loss(broker_url: str, proxy: TcpProxy) -> None:
    via_proxy = _with_port(broker_url, proxy.port)
    silo = AmqpTransport([via_proxy, broker_url], "s1", **FAST)
    agg = AmqpTransport(broker_url, "aggregator", silo_ids=["s1"], **FAST)
    try:
        assert silo.url == via_proxy
        proxy.stop()  # that node is gone for good
        silo.send_upload(_upload(1))
        assert silo.reconnects == 1 and silo.url == broker_url
        got = agg.receive_upload(timeout=2)
        assert got is not None and got.message.round == 1
        got.ack()
    finally:
        agg.close()
        silo.close()


def test_receive_during_outage_returns_none_then_recovers(broker_url: str, proxy: TcpProxy) -> None:
    agg = AmqpTransport(broker_url, "aggregator", silo_ids=["s1"], **FAST)
    silo = AmqpTransport(_with_port(broker_url, proxy.port), "s1", reconnect_timeout=30, **FAST)
    try:
        proxy.stop()
        start = time.monotonic()
        assert silo.receive_plan("s1", timeout=0.5) is None  # outage, within reconnect_timeout
        assert time.monotonic() - start < 2
        agg.send_plan(_plan(round_=4))
        proxy.start()  # same port: the broker is back
        got = silo.receive_plan("s1", timeout=3)
        assert got is not None and got.message.round == 4
        got.ack()
        assert silo.reconnects == 1
    finally:
        agg.close()
        silo.close()


def test_outage_longer_than_reconnect_timeout_raises(broker_url: str, proxy: TcpProxy) -> None:
    url = _with_port(broker_url, proxy.port)
    silo = AmqpTransport(url, "s1", reconnect_timeout=1.0, **FAST)
    try:
        proxy.stop()
        start = time.monotonic()
        with pytest.raises(BrokerUnavailable) as exc:
            silo.send_upload(_upload(1))
        assert 1.0 <= time.monotonic() - start < 4
        text = str(exc.value)
        assert mask_url(url) in text and ":guest@" not in text
        assert "rabbitmq-server -detached" in text
        assert silo.reconnects == 0
    finally:
        silo.close()
