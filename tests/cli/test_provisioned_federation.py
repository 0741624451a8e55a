"""The production path end to end: `fedsilo provision` makes every party's kit (keys,
pinned peers, broker users with least privilege, TLS certificates); a RabbitMQ node runs
with the provisioned definitions and server certificate, TLS only; the federation runs over
amqps:// with client certificates and sealed messages, and matches `fedsilo simulate`."""

from __future__ import annotations

import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
import torch
from safetensors.torch import load_file

from fedsilo.cli.simulation import run_simulation


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


@pytest.mark.usefixtures("broker_url")  # same skip/fail policy when RabbitMQ is missing
def test_a_provisioned_federation_runs_over_tls_with_least_privilege(deployment) -> None:
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
    deployment.write()
    try:
        broker, process = tls_broker.start(
            certs_from=kits / "broker" / "tls",
            definitions=kits / "broker" / "definitions.json", port=port,
        )
    except tls_broker.BrokerStartError as exc:
        pytest.fail(f"cannot start the TLS broker node: {exc}")
    try:
        deployment.start_all()
        deployment.wait_all(timeout=300)
        _assert_silo_cannot_read_another_silos_plans(kits / "silo-0")
    finally:
        tls_broker.stop(broker, process)

    reference = run_simulation(deployment.sim, run_dir=deployment.root / "sim").final_params
    params = load_file(str(deployment.aggregator_dir / "global_params.safetensors"))
    assert params.keys() == reference.keys()
    for key, value in params.items():
        assert torch.equal(value, reference[key]), key


def _assert_silo_cannot_read_another_silos_plans(kit: Path) -> None:
    """The kit's own credentials, over the same TLS: the broker refuses silo-1's queue."""
    from fedsilo.sdk.config import load_config
    from fedsilo.silo_agent.config import SiloConfig

    config = load_config(SiloConfig, kit / "silo.toml", env={})
    transport = config.broker.connect("silo-0")
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            transport._channel.basic_get("silo.silo-1.plans")
        assert info.value.reply_code == 403
    finally:
        transport.close()
