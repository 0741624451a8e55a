"""AmqpTransport over amqps:// (a TLS-only RabbitMQ node with client certificates, see
tests/tls_broker.py), the TLS options behind it, and the warning for plain amqp:// off-host."""

import logging
import ssl
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pika
import pika.exceptions
import pytest
import torch

from fedsilo.privacy.certs import issue, make_ca
from fedsilo.sdk.messages import RoundPlan, Upload
from fedsilo.sdk.transport.amqp import AmqpTransport
from fedsilo.sdk.transport.amqp_connection import BrokerUnavailable, mask_url
from fedsilo.sdk.transport.settings import BrokerSettings
from fedsilo.sdk.transport.tls import TlsFiles, describe_tls_error, insecure_remote, ssl_options


def _plan(silo: str, n: int = 4) -> RoundPlan:
    return RoundPlan(3, silo, 5, 0.01, 2, {"m0": [0, 1]}, {"k.shared.A": torch.arange(n) * 1.5})


def _upload(silo: str) -> Upload:
    return Upload(3, silo, {"k.A": torch.ones(3)}, {"e": torch.zeros(2)}, 7, {"loss": 0.5})


def _silo() -> str:
    return f"tls-{uuid.uuid4().hex[:8]}"  # the TLS node lives for the session: no clashes


def _tls(broker, **changes) -> TlsFiles:
    files = {
        "ca_file": broker.ca_file,
        "cert_file": broker.client_cert,
        "key_file": broker.client_key,
        **changes,
    }
    return TlsFiles(**files)


def _password(url: str) -> str:
    password = urlsplit(url).password
    assert password
    return password


# -- against the TLS node -----------------------------------------------------------------


def test_plan_and_upload_round_trip_over_tls(tls_broker) -> None:
    silo_id = _silo()
    agg = AmqpTransport(
        tls_broker.url, "aggregator", silo_ids=[silo_id], tls=_tls(tls_broker), chunk_size=16 * 1024
    )
    silo = AmqpTransport(tls_broker.url, silo_id, tls=_tls(tls_broker), chunk_size=16 * 1024)
    try:
        assert agg.connection._blocking._impl.params.ssl_options is not None  # really TLS
        size = agg.send_plan(_plan(silo_id, n=20_000))  # ~160 KB: ten chunks
        got = silo.receive_plan(silo_id, timeout=5)
        assert got is not None and got.size == size
        assert torch.equal(got.message.params["k.shared.A"], torch.arange(20_000) * 1.5)
        got.ack()
        up = silo.send_upload(_upload(silo_id))
        received = agg.receive_upload(timeout=5)
        assert received is not None and received.size == up
        assert received.message.silo_id == silo_id and received.message.metrics == {"loss": 0.5}
        received.ack()
        assert agg.receive_upload(timeout=0.05) is None
    finally:
        agg.close()
        silo.close()


def test_settings_connect_over_tls_without_declaring_topology(tls_broker) -> None:
    """A provisioned silo's user may not configure anything; it uses the topology as is."""
    silo_id = _silo()
    tls = {
        "tls_ca_file": tls_broker.ca_file,
        "tls_cert_file": tls_broker.client_cert,
        "tls_key_file": tls_broker.client_key,
    }
    agg = BrokerSettings(urls=(tls_broker.url,), **tls).connect("aggregator", [silo_id])
    try:
        limited = BrokerSettings(urls=(tls_broker.limited_url,), **tls)
        with pytest.raises(BrokerUnavailable, match="ACCESS_REFUSED"):
            limited.connect(silo_id)  # declaring needs the configure permission
        silo = BrokerSettings(
            urls=(tls_broker.limited_url,), declare_topology=False, **tls
        ).connect(silo_id)
        try:
            agg.send_plan(_plan(silo_id))
            got = silo.receive_plan(silo_id, timeout=5)
            assert got is not None and got.message.silo_id == silo_id
            got.ack()
            silo.send_upload(_upload(silo_id))
            received = agg.receive_upload(timeout=5)
            assert received is not None and received.message.silo_id == silo_id
            received.ack()
        finally:
            silo.close()
    finally:
        agg.close()


def _refused(url: str, tls: TlsFiles) -> str:
    with pytest.raises(BrokerUnavailable) as info:
        AmqpTransport(url, "aggregator", tls=tls, connect_timeout=5)
    message = str(info.value)
    assert mask_url(url) in message
    assert _password(url) not in message
    return message


def test_server_certificate_from_another_ca_is_refused(tls_broker, tmp_path: Path) -> None:
    make_ca("not the broker's CA").write(tmp_path / "other.pem", tmp_path / "other.key")
    message = _refused(tls_broker.url, _tls(tls_broker, ca_file=tmp_path / "other.pem"))
    assert "certificate could not be verified" in message
    assert "broker.tls_ca_file" in message


def test_system_store_does_not_trust_a_private_ca(tls_broker) -> None:
    message = _refused(tls_broker.url, _tls(tls_broker, ca_file=None))
    assert "certificate could not be verified" in message


def test_wrong_host_name_is_refused(tls_broker) -> None:
    message = _refused(tls_broker.url, _tls(tls_broker, server_name="broker.example"))
    assert "does not name the host" in message and "broker.example" in message
    assert "broker.tls_server_name" in message


def test_server_name_override_connects_by_ip(tls_broker) -> None:
    """127.0.0.1 is in the test certificate; a name override still checks the certificate."""
    url = tls_broker.url.replace("@localhost:", "@127.0.0.1:")
    AmqpTransport(url, "aggregator", tls=_tls(tls_broker, server_name="localhost")).close()


def test_broker_requires_a_client_certificate(tls_broker) -> None:
    message = _refused(tls_broker.url, _tls(tls_broker, cert_file=None, key_file=None))
    # "requires a client certificate", or (TLS 1.3 race: the broker hung up before its
    # alert was read) "closed the connection during the TLS handshake"
    assert "client certificate" in message and "broker.tls_cert_file" in message


def test_client_certificate_from_another_ca_is_refused(tls_broker, tmp_path: Path) -> None:
    issue(make_ca("rogue"), "rogue", client=True).write(tmp_path / "c.pem", tmp_path / "c.key")
    message = _refused(
        tls_broker.url, _tls(tls_broker, cert_file=tmp_path / "c.pem", key_file=tmp_path / "c.key")
    )
    assert "client certificate" in message  # the alert (unknown ca, bad certificate) or EOF


# -- ssl_options, TlsFiles, describe_tls_error ----------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tls")
    ca = make_ca("unit CA")
    ca.write(d / "ca.pem", d / "ca.key")
    issue(ca, "c", client=True).write(d / "c.pem", d / "c.key")
    issue(ca, "d", client=True).write(d / "d.pem", d / "d.key")
    return {"ca": d / "ca.pem", "cert": d / "c.pem", "key": d / "c.key", "other_key": d / "d.key"}


def _opts(url: str = "amqps://h/", **kw):
    return ssl_options(url, **{"ca_file": None, "cert_file": None, "key_file": None, **kw})


def test_plain_amqp_has_no_ssl_options(files) -> None:
    assert _opts("amqp://u:p@h:5672/v", ca_file=files["ca"]) is None


def test_amqps_context_verifies(files) -> None:
    opts = _opts(ca_file=files["ca"], cert_file=files["cert"], key_file=files["key"])
    assert isinstance(opts, pika.SSLOptions) and opts.server_hostname is None
    ctx = opts.context
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "unit CA"),),)]
    assert _opts(server_name="broker.example").server_hostname == "broker.example"
    system = _opts().context  # no CA file: the system store, still verifying
    assert system.verify_mode == ssl.CERT_REQUIRED and system.check_hostname


def test_pika_url_parameters_take_the_options(files) -> None:
    params = pika.URLParameters("amqps://u:p@localhost/v")
    params.ssl_options = _opts("amqps://u:p@localhost/v", ca_file=files["ca"])
    assert params.port == 5671 and params.ssl_options.context.check_hostname


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"ca_file": "nope.pem"}, r"broker\.tls_ca_file: cannot read .*nope\.pem"),
        ({"ca_file": "key"}, r"broker\.tls_ca_file: .*key does not hold a PEM CA certificate"),
        ({"cert_file": "cert", "key_file": "nope.key"}, r"broker\.tls_key_file: cannot read"),
        ({"cert_file": "nope.pem", "key_file": "key"}, r"broker\.tls_cert_file: cannot read"),
        ({"cert_file": "cert"}, r"broker\.tls_cert_file and broker\.tls_key_file go together"),
        ({"cert_file": "cert", "key_file": "other_key"}, r"KEY_VALUES_MISMATCH"),
    ],
)
def test_bad_files_name_the_setting(files, tmp_path: Path, kw, expected) -> None:
    paths = {k: files.get(v, tmp_path / v) for k, v in kw.items()}
    with pytest.raises(ValueError, match=expected) as info:
        _opts(**paths)
    assert "PRIVATE KEY" not in str(info.value)


def test_cert_and_key_go_together_in_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tls_cert_file and broker\.tls_key_file go together"):
        BrokerSettings(tls_cert_file=tmp_path / "c.pem")
    with pytest.raises(ValueError, match="go together"):
        TlsFiles(key_file=tmp_path / "c.key")


def test_describe_tls_error_reads_pika_wrapped_alerts() -> None:
    lost = pika.exceptions.StreamLostError(
        "Stream connection lost: SSLError(1, '[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] "
        "tlsv13 alert certificate required (_ssl.c:2580)')"
    )
    assert "requires a client certificate" in describe_tls_error(
        pika.exceptions.IncompatibleProtocolError(lost)
    )
    eof = pika.exceptions.StreamLostError(
        "Stream connection lost: SSLEOFError(8, 'EOF occurred in violation of protocol')"
    )
    assert "during the TLS handshake" in describe_tls_error(eof)
    assert describe_tls_error(ConnectionRefusedError(111, "Connection refused")) is None
    assert describe_tls_error(pika.exceptions.ProbableAuthenticationError("ACCESS_REFUSED")) is None


# -- plain amqp:// off this machine -------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "insecure"),
    [
        ("amqp://u:p@10.0.0.5:5672/v", True),
        ("amqp://broker.example/", True),
        ("amqp://[2001:db8::1]:5672/", True),
        ("amqp://u:p@127.0.0.1:5672/v", False),
        ("amqp://127.8.9.10/", False),
        ("amqp://localhost/", False),
        ("amqp://LOCALHOST./", False),
        ("amqp://[::1]:5672/", False),
        ("amqp:///v", False),
        ("amqps://broker.example/", False),
    ],
)
def test_insecure_remote(url: str, insecure: bool) -> None:
    assert insecure_remote(url) is insecure


def test_plain_amqp_to_another_host_warns_loudly(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="fedsilo.sdk.transport.settings")
    settings = BrokerSettings(
        urls=("amqp://fed:s3cr3t-pw@10.255.255.1:5672/fed",), connect_timeout_s=0.2
    )
    with pytest.raises(BrokerUnavailable):
        settings.connect("aggregator")
    warnings = [r for r in caplog.records if r.name == "fedsilo.sdk.transport.settings"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    text = warnings[0].getMessage()
    assert text.startswith("plain amqp:// to 10.255.255.1 ")
    assert "cross the network in clear; use amqps://" in text
    assert "s3cr3t-pw" not in caplog.text


def test_plain_amqp_to_loopback_does_not_warn(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="fedsilo.sdk.transport.settings")
    with pytest.raises(BrokerUnavailable):  # nothing listens on port 1
        BrokerSettings(urls=("amqp://u:p@127.0.0.1:1/",), connect_timeout_s=0.5).connect("s1")
    assert not [r for r in caplog.records if r.name == "fedsilo.sdk.transport.settings"]


def test_tls_settings_with_plain_url_warn(caplog, files) -> None:
    caplog.set_level(logging.WARNING, logger="fedsilo.sdk.transport.settings")
    settings = BrokerSettings(
        urls=("amqp://u:pw1@127.0.0.1:1/",), tls_ca_file=files["ca"], connect_timeout_s=0.5
    )
    with pytest.raises(BrokerUnavailable):
        settings.connect("s1")
    assert "apply to amqps:// URLs only" in caplog.text and "pw1" not in caplog.text
