"""The production path end to end: `fedsilo provision` makes every party's kit (keys,
pinned peers, broker users with least privilege, TLS certificates); a RabbitMQ node runs
with the provisioned definitions and server certificate, TLS only; the federation runs over
amqps:// with client certificates and sealed messages, and matches `fedsilo simulate`."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
import torch
from safetensors.torch import load_file

from fedsilo.sdk.transport.amqp_topology import UPLOADS_EXCHANGE, UPLOADS_ROUTING_KEY
from fedsilo.sdk.transport.chunking import split
from fedsilo.simulation.engine import run_simulation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kit_sections(kit: Path, config: str) -> dict[str, dict[str, Any]]:
    """The kit's [broker] and [security], with its relative paths made absolute."""
    data = tomllib.loads((kit / config).read_text())
    out = {}
    for name in ("broker", "security"):
        section = dict(data[name])
        for key, value in section.items():
            if key.endswith(("_file", "_dir")) and isinstance(value, str):
                section[key] = str(kit / value)
        out[name] = section
    return out


@contextlib.contextmanager
def _provisioned(deployment, broker: dict[str, Any] | None = None,
                 aggregator_broker: dict[str, Any] | None = None) -> Iterator[Path]:
    """`fedsilo provision` kits for the deployment, wired into its configs (`broker` and
    `aggregator_broker` add [broker] keys), and a TLS-only RabbitMQ node loaded with the
    kit's definitions; yields the kits folder."""
    import tls_broker

    port = _free_port()
    deployment.secure = False  # the kits bring the keys
    deployment.broker_url = f"amqps://localhost:{port}/test"
    deployment.write()
    kits = deployment.root / "kits"
    result = subprocess.run(
        [sys.executable, "-m", "fedsilo.cli.main", "provision", "--federation",
         str(deployment.root / "federation.toml"), "--out", str(kits), "--tls-host",
         "localhost"], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    deployment.party_sections = {
        "aggregator": _kit_sections(kits / "aggregator", "federation.toml"),
        **{s: _kit_sections(kits / s, "silo.toml") for s in deployment.silos},
    }
    assert deployment.party_sections["silo-0"]["broker"]["declare_topology"] is False
    for party, sections in deployment.party_sections.items():
        sections["broker"].update(broker or {})
        if party == "aggregator":
            sections["broker"].update(aggregator_broker or {})
    deployment.write()
    try:
        node, process = tls_broker.start(
            certs_from=kits / "broker" / "tls",
            definitions=kits / "broker" / "definitions.json", port=port,
        )
    except tls_broker.BrokerStartError as exc:
        pytest.fail(f"cannot start the TLS broker node: {exc}")
    try:
        yield kits
    finally:
        tls_broker.stop(node, process)


def _assert_matches_simulate(deployment) -> None:
    reference = run_simulation(deployment.sim, run_dir=deployment.root / "sim").final_params
    params = load_file(str(deployment.aggregator_dir / "global_params.safetensors"))
    assert params.keys() == reference.keys()
    for key, value in params.items():
        assert torch.equal(value, reference[key]), key


@pytest.mark.usefixtures("broker_url")  # same skip/fail policy when RabbitMQ is missing
def test_a_provisioned_federation_runs_over_tls_with_least_privilege(deployment) -> None:
    with _provisioned(deployment) as kits:
        deployment.start_all()
        deployment.wait_all(timeout=300)
        _assert_silo_cannot_read_another_silos_plans(kits / "silo-0")
    _assert_matches_simulate(deployment)


def _silo_connection(kit: Path, silo: str) -> tuple[pika.BlockingConnection, str]:
    """A raw connection with the kit's own credentials and certificate (not an agent: it
    holds no lock queue), and the broker user it publishes as."""
    from fedsilo.sdk.config import load_config
    from fedsilo.silo_agent.config import SiloConfig

    config = load_config(SiloConfig, kit / "silo.toml", env={})
    transport = config.broker.connect(silo)  # proves the kit works, then lends its settings
    try:
        parameters = transport.connection.parameters(transport.url)
        user = transport.connection.user
    finally:
        transport.close()
    assert user == f"test.{silo}"  # provisioned: one broker user per silo
    return pika.BlockingConnection(parameters), user


def _status(deployment) -> dict[str, Any]:
    try:
        return json.loads((deployment.aggregator_dir / "status.json").read_text())
    except (OSError, ValueError):  # not written yet
        return {}


def _rejected(deployment) -> dict[str, int]:
    return _status(deployment).get("rejected", {})


def _expired(deployment, message_id: str) -> bool:
    return any(r["reason"] == "chunk timeout" and r["message_id"] == message_id
               for r in _status(deployment).get("refusals", []))


@pytest.mark.usefixtures("broker_url")
def test_a_silo_flooding_chunk_sets_fills_only_its_own_share(deployment, tmp_path) -> None:
    """silo-2's broker user (valid credentials) floods the uploads queue with chunk sets it
    never completes, up to and past its pending-bytes share, re-sending their chunks all the
    while; silo-0 and silo-1 upload chunked round-0 updates meanwhile. Theirs fold; the
    flood's sets expire on time although their chunks keep coming; silo-2's own agent,
    held back until the flood is over, then joins in; the run equals `fedsilo simulate`."""
    chunk = 16 * 1024
    cap_mb = 1.0  # 64 chunks of 16 KiB; an honest upload here is about 24
    deployment.rounds = {"deadline_s": 600.0}
    go = tmp_path / "silo-2.go"
    with _provisioned(deployment, broker={"chunk_size_mb": chunk / 2**20},
                      aggregator_broker={"max_pending_mb": cap_mb,
                                         "reassembly_timeout_s": 5.0}) as kits:
        deployment.start_aggregator()
        deployment.start_agent("silo-0")
        deployment.start_agent("silo-1")
        deployment.start_agent("silo-2", env={"FEDSILO_FAULT": f"plan_received@0:wait={go}"})
        deployment.wait_for_event("aggregator", "round_opened", round=0, timeout=240)

        connection, user = _silo_connection(kits / "silo-2", "silo-2")
        channel = connection.channel()
        channel.confirm_delivery()

        def publish(piece) -> None:
            channel.basic_publish(
                UPLOADS_EXCHANGE, UPLOADS_ROUTING_KEY, piece.data,
                pika.BasicProperties(delivery_mode=2, user_id=user,
                                     message_id=piece.header.message_id,
                                     headers=piece.header.to_headers()),
                mandatory=True)

        opened = 0
        deadline = time.monotonic() + 300
        try:
            # One set at a time, 80 chunks of which 79 are sent: 64 fill the share, the
            # rest are refused; then its first chunk again and again until the set expires
            # (a duplicate must not keep it alive), and the next set, until both honest
            # silos' uploads are folded.
            while len(deployment.events("aggregator", "upload_folded")) < 2:
                assert time.monotonic() < deadline, deployment.log("aggregator")
                mid = f"flood-{opened}"
                pieces = split(os.urandom(80 * chunk), mid, chunk)
                for piece in pieces[:-1]:
                    publish(piece)
                opened += 1
                while not _expired(deployment, mid):
                    assert time.monotonic() < deadline, (_rejected(deployment),
                                                         deployment.log("aggregator"))
                    publish(pieces[0])
                    connection.sleep(0.25)
        finally:
            connection.close()
        folded = {e["silo"] for e in deployment.events("aggregator", "upload_folded")}
        assert folded == {"silo-0", "silo-1"}
        rejected = _rejected(deployment)
        assert rejected.get("chunk: pending bytes cap", 0) >= 15 * opened, rejected
        # A duplicate that arrives after its set expired starts a one-chunk set of its own,
        # which expires in turn: at most one more timeout per set.
        assert opened <= rejected.get("chunk timeout", 0) <= 2 * opened, rejected
        assert set(rejected) == {"chunk: pending bytes cap", "chunk timeout"}, rejected

        go.touch()
        deployment.wait_all(timeout=400)
        assert _rejected(deployment) == rejected  # nothing honest refused afterwards
    _assert_matches_simulate(deployment)


def _assert_silo_cannot_read_another_silos_plans(kit: Path) -> None:
    """The kit's own credentials, over the same TLS: the broker refuses silo-1's queue."""
    from fedsilo.sdk.config import load_config
    from fedsilo.silo_agent.config import SiloConfig

    config = load_config(SiloConfig, kit / "silo.toml", env={})
    transport = config.broker.connect("silo-0")
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            transport.connection.channel.basic_get("silo.silo-1.plans")
        assert info.value.reply_code == 403
    finally:
        transport.close()
