"""`fedsilo.provision`: the broker definitions (users, hashes, least-privilege
permissions, the transport's exact topology: broker.py) and the kit its builders write to
disk (builders.py).

The same permissions against a real broker: test_broker_permissions.py."""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import re
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pika.adapters.blocking_connection import BlockingChannel

from fedsilo.aggregator.config import FederationConfig
from fedsilo.privacy.keys import Keyring, PartyKeys, TrustStore
from fedsilo.provision.broker import (
    HASHING_ALGORITHM,
    aggregator_resources,
    broker_definitions,
    hash_password,
    import_command,
)
from fedsilo.provision.builders import provision
from fedsilo.provision.context import ProvisionError
from fedsilo.sdk.config import load_config
from fedsilo.sdk.transport.amqp_connection import AmqpConnection
from fedsilo.sdk.transport.amqp_topology import (
    DEAD_EXCHANGE,
    PLANS_EXCHANGE,
    UPLOADS_EXCHANGE,
    UPLOADS_QUEUE,
    AmqpTopology,
    lock_queue,
    plans_queue,
)
from fedsilo.silo_agent.config import SiloConfig

SILOS = ["silo-0", "a.b", "c_d"]  # '.' and '-' must be escaped in the permission regexes
PASSWORDS = {"aggregator": "agg pw", "silo-0": "pw0", "a.b": "pwé", "c_d": "pw2"}

#: Names a permission must be tested against: the topology, look-alikes, and the broker's.
OTHER_NAMES = [
    "",
    "amq.default",
    "amq.direct",
    "amq.topic",
    "fedsilo.plansX",
    "xfedsilo.uploads",
    "fedsilo.uploads.evil",
    "fedsilo_uploads",
    "silo.silo-0.plans.evil",
    "silo.silo-0Xplans",
    "silo.aXb.plans",
    "silo.a.b.plans\n",
    "aggregator.uploads2",
    "silo.other.plans",
    ".*",
]


def _universe(silos: list[str]) -> set[str]:
    return set(aggregator_resources(silos)) | set(OTHER_NAMES)


def _matches(pattern: str, names: set[str]) -> set[str]:
    """Names the broker would let through. RabbitMQ runs an unanchored `re:run` search, so
    the regex must anchor itself: check both a search and a full match agree."""
    found = {n for n in names if re.search(pattern, n)}
    assert found == {n for n in names if re.fullmatch(pattern, n)}, pattern
    return found


@pytest.fixture
def definitions() -> dict[str, Any]:
    return broker_definitions("fed", "fed-vhost", SILOS, PASSWORDS)


def _check_hash(password_hash: str, password: str) -> None:
    raw = base64.b64decode(password_hash)
    salt, digest = raw[:4], raw[4:]
    assert len(salt) == 4 and len(digest) == 32
    assert digest == hashlib.sha256(salt + password.encode("utf-8")).digest()


# -- definitions ----------------------------------------------------------------------------


def test_one_user_per_party_with_verifiable_sha256_hashes(definitions: dict[str, Any]) -> None:
    users = {u["name"]: u for u in definitions["users"]}
    assert list(users) == ["fed.aggregator", "fed.silo-0", "fed.a.b", "fed.c_d"]
    for party, password in PASSWORDS.items():
        user = users[f"fed.{party}"]
        assert user["hashing_algorithm"] == HASHING_ALGORITHM == "rabbit_password_hashing_sha256"
        assert user["tags"] == ""
        _check_hash(user["password_hash"], password)
        with pytest.raises(AssertionError):
            _check_hash(user["password_hash"], password + "x")
    assert "pw0" not in json.dumps(definitions)  # only salted hashes
    assert definitions["vhosts"] == [{"name": "fed-vhost"}]


def test_hash_password_salts() -> None:
    assert hash_password("x") != hash_password("x")
    fixed = hash_password("x", b"\x00\x01\x02\x03")
    assert fixed == hash_password("x", b"\x00\x01\x02\x03")
    _check_hash(fixed, "x")
    with pytest.raises(ValueError):
        hash_password("x", b"\x00")


def test_silo_permissions_are_least_privilege(definitions: dict[str, Any]) -> None:
    perms = {p["user"]: p for p in definitions["permissions"]}
    assert {p["vhost"] for p in perms.values()} == {"fed-vhost"}
    names = _universe(SILOS)
    for silo in SILOS:
        p = perms[f"fed.{silo}"]
        # only its own lock queue (one live agent per silo), never another silo's
        assert _matches(p["configure"], names | {"\n", *map(lock_queue, SILOS)}) == {
            lock_queue(silo)}
        assert _matches(p["write"], names) == {UPLOADS_EXCHANGE}
        assert _matches(p["read"], names) == {plans_queue(silo)}


def test_aggregator_permissions_cover_exactly_the_federation(
    definitions: dict[str, Any],
) -> None:
    p = next(p for p in definitions["permissions"] if p["user"] == "fed.aggregator")
    expected = {
        "fedsilo.dead", "fedsilo.plans", "fedsilo.uploads", "aggregator.uploads",
        "silo.silo-0.plans", "silo.a.b.plans", "silo.c_d.plans",
    }
    assert set(aggregator_resources(SILOS)) == expected
    for kind in ("configure", "write", "read"):
        assert _matches(p[kind], _universe(SILOS)) == expected, kind


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ProvisionError, match="reserved"):
        broker_definitions("fed", "v", ["aggregator"], {"aggregator": "x"})
    with pytest.raises(ProvisionError, match="reserved"):
        broker_definitions("fed", "v", ["broker"], {"aggregator": "x", "broker": "y"})
    with pytest.raises(ProvisionError, match="unique"):
        broker_definitions("fed", "v", ["a", "a"], {"aggregator": "x", "a": "y"})
    with pytest.raises(ProvisionError, match="password"):
        broker_definitions("fed", "v", ["a"], {"aggregator": "x"})


class _Recorder:
    """Stands in for the pika channel and records every declaration with all its arguments
    (defaults filled in from pika's own signatures)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def _record(self, name: str, *args: Any, **kwargs: Any) -> None:
        bound = inspect.signature(getattr(BlockingChannel, name)).bind(None, *args, **kwargs)
        bound.apply_defaults()
        params = {k: getattr(v, "value", v) for k, v in bound.arguments.items() if k != "self"}
        self.calls.append((name, params))

    def exchange_declare(self, *args: Any, **kwargs: Any) -> None:
        self._record("exchange_declare", *args, **kwargs)

    def queue_declare(self, *args: Any, **kwargs: Any) -> None:
        self._record("queue_declare", *args, **kwargs)

    def queue_bind(self, *args: Any, **kwargs: Any) -> None:
        self._record("queue_bind", *args, **kwargs)


def _transport_topology(silos: list[str], quorum: bool) -> list[tuple[str, dict[str, Any]]]:
    """What AmqpTopology.declare sends, without a broker. (If the topology grows
    connection attributes that declare reads, set them here.)"""
    topology = AmqpTopology(list(silos))
    topology.quorum = quorum
    connection = AmqpConnection.__new__(AmqpConnection)
    connection.channel = _Recorder()
    topology.declare(connection)
    return connection.channel.calls


@pytest.mark.parametrize("quorum", [True, False])
def test_topology_is_exactly_what_the_transport_declares(quorum: bool) -> None:
    """A declaration differing in any flag or argument makes the aggregator's redeclare fail
    with PRECONDITION_FAILED, and a silo may not declare at all: they must agree exactly."""
    calls = _transport_topology(SILOS, quorum)
    d = broker_definitions("fed", "v", SILOS, PASSWORDS, quorum=quorum)

    exchanges = {
        p["exchange"]: {
            "type": p["exchange_type"], "durable": p["durable"],
            "auto_delete": p["auto_delete"], "internal": p["internal"],
            "arguments": p["arguments"] or {},
        }
        for name, p in calls if name == "exchange_declare"
    }
    assert all(not p["passive"] for name, p in calls if name.endswith("_declare"))
    assert {
        e["name"]: {k: e[k] for k in ("type", "durable", "auto_delete", "internal", "arguments")}
        for e in d["exchanges"]
    } == exchanges
    assert {e["vhost"] for e in d["exchanges"] + d["queues"] + d["bindings"]} == {"v"}

    queues = {
        p["queue"]: {
            "durable": p["durable"], "auto_delete": p["auto_delete"],
            "arguments": p["arguments"] or {},
        }
        for name, p in calls if name == "queue_declare"
    }
    assert all(not p["exclusive"] for name, p in calls if name == "queue_declare")
    assert {
        q["name"]: {k: q[k] for k in ("durable", "auto_delete", "arguments")}
        for q in d["queues"]
    } == queues
    if quorum:
        assert queues[UPLOADS_QUEUE]["arguments"] == {
            "x-queue-type": "quorum", "x-dead-letter-exchange": DEAD_EXCHANGE,
        }
        assert queues["fedsilo.dead"]["arguments"] == {"x-queue-type": "quorum"}  # no DLX

    bindings = sorted(
        (p["exchange"], p["queue"], p["routing_key"] if p["routing_key"] is not None
         else p["queue"], p["arguments"] or {})
        for name, p in calls if name == "queue_bind"
    )
    assert sorted(
        (b["source"], b["destination"], b["routing_key"], b["arguments"])
        for b in d["bindings"]
    ) == bindings
    assert {b["destination_type"] for b in d["bindings"]} == {"queue"}
    assert (PLANS_EXCHANGE, plans_queue("a.b"), "a.b", {}) in bindings


def test_import_command_reads_stdin() -> None:
    assert import_command("my kit/broker/definitions.json") == (
        "rabbitmqctl import_definitions < 'my kit/broker/definitions.json'"
    )


# -- the kit --------------------------------------------------------------------------------


def _federation(tmp_path: Path, name: str = "acme", silos: tuple[str, ...] = ("silo-0", "silo-1"),
                url: str = "amqp://guest:guest@broker.example:5672/") -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(
        f'name = "{name}"\nsilos = {json.dumps(list(silos))}\nstate_dir = "state/agg"\n'
        f'\n[broker]\nurls = ["{url}"]\nchunk_size_mb = 1.5\nstartup_timeout_s = 30.0\n'
        "\n[schedule]\nrounds = 3\n"
    )
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _private_key_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]


def test_kit_layout_and_modes(tmp_path: Path) -> None:
    out = tmp_path / "kit"
    result = provision(_federation(tmp_path), out)
    assert result.parties == ("aggregator", "silo-0", "silo-1")
    assert result.vhost == "acme"  # the URL names "/": the federation's own vhost
    assert result.usernames == {p: f"acme.{p}" for p in result.parties}
    assert result.generated_keys == result.parties and result.external_keys == ()
    assert not result.tls and result.urls == ("amqp://acme.aggregator@broker.example:5672/acme",)

    top = {p.name for p in out.iterdir()}
    assert top == {"README.md", "broker", "aggregator", "silo-0", "silo-1"}  # no ca without TLS
    assert _files(out / "broker") == {"definitions.json"}
    assert _mode(out / "broker" / "definitions.json") == 0o600
    for party in result.parties:
        folder = out / party
        config = "federation.toml" if party == "aggregator" else "silo.toml"
        assert {"broker.password", "trust.json", config, "keys/keyring.json",
                "keys/public.json"} <= _files(folder)
        assert not (folder / "tls").exists()
        assert _mode(folder) == 0o700 and _mode(folder / "keys") == 0o700
        assert _mode(folder / "broker.password") == 0o600
        for key_file in _private_key_files(folder):
            assert _mode(key_file) == 0o600, key_file
        assert Keyring.load(folder / "keys").party == party
    assert _mode(out) == 0o700

    # the password files hold what the definitions hash, and nothing else holds it
    definitions = json.loads((out / "broker" / "definitions.json").read_text())
    hashes = {u["name"]: u["password_hash"] for u in definitions["users"]}
    everything = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file()
                          and p.name != "broker.password")
    for party in result.parties:
        password = (out / party / "broker.password").read_text().strip()
        assert len(password) >= 32
        _check_hash(hashes[f"acme.{party}"], password)
        assert password.encode() not in everything

    # trust: the aggregator pins every silo, each silo only the aggregator
    agg_trust = TrustStore.load(out / "aggregator" / "trust.json")
    assert agg_trust.federation == "acme" and set(agg_trust.parties) == {"silo-0", "silo-1"}
    for silo in ("silo-0", "silo-1"):
        assert agg_trust.party(silo) == Keyring.load(out / silo / "keys").public()
        silo_trust = TrustStore.load(out / silo / "trust.json")
        assert set(silo_trust.parties) == {"aggregator"}
        assert silo_trust.party("aggregator") == Keyring.load(out / "aggregator" / "keys").public()

    readme = (out / "README.md").read_text()
    assert import_command() in readme and "silo-1/" in readme and "secret" in readme


def test_configs_of_the_kit(tmp_path: Path) -> None:
    out = tmp_path / "kit"
    provision(_federation(tmp_path), out, vhost="custom")
    fed = tomllib.loads((out / "aggregator" / "federation.toml").read_text())
    assert fed["name"] == "acme" and fed["silos"] == ["silo-0", "silo-1"]
    assert fed["state_dir"] == "state/agg" and fed["schedule"] == {"rounds": 3}
    assert fed["broker"] == {
        "urls": ["amqp://acme.aggregator@broker.example:5672/custom"],
        "password_file": "broker.password",
        "declare_topology": True,
        "chunk_size_mb": 1.5,
        "startup_timeout_s": 30.0,
    }
    assert fed["security"] == {"enabled": True, "keys_dir": "keys", "trust_file": "trust.json"}
    silo_text = (out / "silo-0" / "silo.toml").read_text()
    assert "[data]" in silo_text and "model" in silo_text  # the comment telling what to add
    silo = tomllib.loads(silo_text)
    assert silo["silo_id"] == "silo-0"
    assert silo["broker"] == {
        "urls": ["amqp://acme.silo-0@broker.example:5672/custom"],
        "password_file": "broker.password",
        "declare_topology": False,
        "chunk_size_mb": 1.5,  # the federation's broker tuning carries over
        "startup_timeout_s": 30.0,
    }
    assert silo["security"] == fed["security"]

    fcfg = load_config(FederationConfig, out / "aggregator" / "federation.toml", env={})
    scfg = load_config(SiloConfig, out / "silo-0" / "silo.toml", env={})
    agg_dir, silo_dir = (out / "aggregator").absolute(), (out / "silo-0").absolute()
    assert fcfg.broker.password_file == agg_dir / "broker.password"
    assert fcfg.broker.declare_topology and not scfg.broker.declare_topology
    assert fcfg.security.keys_dir == agg_dir / "keys"
    assert fcfg.security.trust_file == agg_dir / "trust.json"
    assert scfg.security.keys_dir == silo_dir / "keys"
    password = (out / "silo-0" / "broker.password").read_text().strip()
    assert scfg.broker.resolved_urls() == [
        f"amqp://acme.silo-0:{password}@broker.example:5672/custom"
    ]


def test_tls_kit(tmp_path: Path) -> None:
    from cryptography import x509

    out = tmp_path / "kit"
    result = provision(
        _federation(tmp_path, url="amqp://guest:guest@10.0.0.5:5672/fedvh"), out,
        tls_hosts=["broker.example", "10.0.0.9"],
    )
    assert result.tls and result.vhost == "fedvh"
    assert result.urls == ("amqps://acme.aggregator@10.0.0.5/fedvh",)  # 5672 -> amqps default
    assert _mode(out / "ca") == 0o700 and _mode(out / "ca" / "ca.key") == 0o600
    assert _files(out / "broker") == {"definitions.json", "rabbitmq.conf", "tls/ca.pem",
                                      "tls/server.pem", "tls/server.key"}
    assert _mode(out / "broker" / "tls" / "server.key") == 0o600
    conf = (out / "broker" / "rabbitmq.conf").read_text()
    assert f"ssl_options.keyfile = {(out / 'broker' / 'tls' / 'server.key').absolute()}" in conf
    assert "listeners.ssl.default = 5671" in conf and "fail_if_no_peer_cert = true" in conf

    ca = x509.load_pem_x509_certificate((out / "ca" / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((out / "broker" / "tls" / "server.pem").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["broker.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.9"]
    server.verify_directly_issued_by(ca)
    for party in result.parties:
        tls = out / party / "tls"
        assert _mode(tls) == 0o700 and _mode(tls / "client.key") == 0o600
        assert (tls / "ca.pem").read_bytes() == (out / "ca" / "ca.pem").read_bytes()
        client = x509.load_pem_x509_certificate((tls / "client.pem").read_bytes())
        client.verify_directly_issued_by(ca)
        assert client.subject.rfc4514_string() == f"CN=acme.{party}"
    fed = tomllib.loads((out / "aggregator" / "federation.toml").read_text())
    assert fed["broker"]["tls_ca_file"] == "tls/ca.pem"
    assert fed["broker"]["tls_cert_file"] == "tls/client.pem"
    assert fed["broker"]["tls_key_file"] == "tls/client.key"
    # the URLs name 10.0.0.5, which the certificate does not: verify against the first name
    assert fed["broker"]["tls_server_name"] == "broker.example"
    silo = tomllib.loads((out / "silo-1" / "silo.toml").read_text())
    assert silo["broker"]["urls"] == ["amqps://acme.silo-1@10.0.0.5/fedvh"]
    assert silo["broker"]["tls_key_file"] == "tls/client.key"
    scfg = load_config(SiloConfig, out / "silo-1" / "silo.toml", env={})
    silo_dir = (out / "silo-1").absolute()
    assert scfg.broker.tls_ca_file == silo_dir / "tls" / "ca.pem"
    assert scfg.broker.tls_key_file == silo_dir / "tls" / "client.key"
    assert scfg.broker.tls_server_name == "broker.example"
    fcfg = load_config(FederationConfig, out / "aggregator" / "federation.toml", env={})
    assert fcfg.broker.tls_cert_file == (out / "aggregator" / "tls" / "client.pem").absolute()


def test_public_keys_mode_writes_no_private_identity_keys(tmp_path: Path) -> None:
    sites = tmp_path / "sites"
    given = tmp_path / "public"
    given.mkdir()
    for party in ("aggregator", "silo-1"):  # these two made their own keys
        Keyring.create(sites / party, party).public().save(given / f"{party}.json")
    out = tmp_path / "kit"
    result = provision(_federation(tmp_path), out, public_keys=given)
    assert result.external_keys == ("aggregator", "silo-1")
    assert result.generated_keys == ("silo-0",)
    for party in ("aggregator", "silo-1"):
        assert not (out / party / "keys").exists()
        assert _private_key_files(out / party) == []
    assert (out / "silo-0" / "keys" / "keyring.json").exists()
    agg_trust = TrustStore.load(out / "aggregator" / "trust.json")
    assert agg_trust.party("silo-1") == PartyKeys.load(given / "silo-1.json")
    for silo in ("silo-0", "silo-1"):
        pinned = TrustStore.load(out / silo / "trust.json").party("aggregator")
        assert pinned.active.fingerprint == Keyring.load(sites / "aggregator").active.fingerprint
    assert "fedsilo keys init" in (out / "README.md").read_text()


def test_public_keys_must_name_parties(tmp_path: Path) -> None:
    given = tmp_path / "public"
    given.mkdir()
    Keyring.create(tmp_path / "k", "silo-0").public().save(given / "silo-1.json")
    with pytest.raises(ProvisionError, match="not 'silo-1'"):
        provision(_federation(tmp_path), tmp_path / "kit", public_keys=given)
    (given / "silo-1.json").rename(given / "silo-7.json")
    with pytest.raises(ProvisionError, match="names no party"):
        provision(_federation(tmp_path), tmp_path / "kit", public_keys=given)
    with pytest.raises(ProvisionError, match="does not exist"):
        provision(_federation(tmp_path), tmp_path / "kit", public_keys=tmp_path / "none")


def test_refuses_non_empty_out_and_reserved_names(tmp_path: Path) -> None:
    out = tmp_path / "kit"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ProvisionError, match=r"not empty.*--force"):
        provision(_federation(tmp_path), out)
    assert _files(out) == {"notes.txt"}
    for name in ("aggregator", "broker", "ca"):
        with pytest.raises(ProvisionError, match="may not be called"):
            provision(_federation(tmp_path, silos=("a", name)), tmp_path / f"k-{name}")
    bad = tmp_path / "bad.toml"
    bad.write_text('silos = ["a"]\n[broker]\nurlz = []\n')
    with pytest.raises(ProvisionError, match="urlz"):
        provision(bad, tmp_path / "k-bad")
    with pytest.raises(ProvisionError, match="cannot read"):
        provision(tmp_path / "missing.toml", tmp_path / "k-missing")


def test_force_keeps_secrets_and_updates_trust_after_a_rotation(tmp_path: Path) -> None:
    """The rotation flow: silo-0 rotates at its site and sends its new public.json; the
    coordinator re-provisions; passwords, CA and other keys stay, trust files change."""
    fed = _federation(tmp_path)
    out = tmp_path / "kit"
    provision(fed, out, tls_hosts=["localhost"])

    def snapshot() -> dict[str, bytes]:
        names = ["aggregator/broker.password", "silo-1/broker.password", "ca/ca.pem",
                 "ca/ca.key", "aggregator/keys/keyring.json", "silo-1/keys/keyring.json"]
        return {n: (out / n).read_bytes() for n in names}

    before = snapshot()
    site = tmp_path / "site-silo-0"
    (out / "silo-0" / "keys").rename(site)  # the silo took its kit home
    keyring = Keyring.load(site)
    old = keyring.active
    new = keyring.rotate()
    given = tmp_path / "public"
    given.mkdir()
    keyring.public().save(given / "silo-0.json")

    with pytest.raises(ProvisionError, match="not empty"):
        provision(fed, out, public_keys=given, tls_hosts=["localhost"])
    result = provision(fed, out, public_keys=given, tls_hosts=["localhost"], force=True)
    assert result.external_keys == ("silo-0",)
    assert snapshot() == before
    pinned = TrustStore.load(out / "aggregator" / "trust.json").party("silo-0")
    assert [k.key_id for k in pinned.keys] == [new.key_id, old.key_id]
    assert not (out / "silo-0" / "keys").exists()

    # and again with the same inputs: still the same secrets, same trust
    trust = (out / "aggregator" / "trust.json").read_bytes()
    provision(fed, out, public_keys=given, tls_hosts=["localhost"], force=True)
    assert snapshot() == before
    assert (out / "aggregator" / "trust.json").read_bytes() == trust

    # dropping TLS on a forced run removes the earlier run's certificates
    provision(fed, out, public_keys=given, force=True)
    assert not (out / "broker" / "tls").exists() and not (out / "silo-1" / "tls").exists()
    assert not (out / "broker" / "rabbitmq.conf").exists()


def test_url_handling(tmp_path: Path) -> None:
    r = provision(_federation(tmp_path, url="amqp://u:p@h:5673/my%2Fvh?heartbeat=10"),
                  tmp_path / "a")
    assert r.vhost == "my/vh"
    assert r.urls == ("amqp://acme.aggregator@h:5673/my%2Fvh?heartbeat=10",)
    r = provision(_federation(tmp_path, url="amqp://[::1]"), tmp_path / "b", tls_hosts=["::1"])
    assert r.vhost == "acme" and r.urls == ("amqps://acme.aggregator@[::1]/acme",)
    r = provision(_federation(tmp_path, url="amqps://h:6000/"), tmp_path / "c",
                  tls_hosts=["h"])
    assert r.urls == ("amqps://acme.aggregator@h:6000/acme",)
    r = provision(_federation(tmp_path, url="amqp://h/%2F"), tmp_path / "d")
    assert r.vhost == "acme"


def test_the_base_model_digest_goes_into_the_kit(tmp_path: Path) -> None:
    from fedsilo.sdk.models.digest import weights_digest
    from fedsilo.sdk.models.loading import load_model

    out = tmp_path / "kit"
    provision(_federation(tmp_path), out, model="builtin:tiny")
    digest = weights_digest(load_model("builtin:tiny").model)
    fed = load_config(FederationConfig, out / "aggregator" / "federation.toml", env={})
    assert fed.model_digest == digest
    silo = load_config(SiloConfig, out / "silo-0" / "silo.toml", env={})
    assert (silo.model, silo.dtype) == ("builtin:tiny", "float32")
    with pytest.raises(ProvisionError, match="cannot load the base model"):
        provision(_federation(tmp_path), tmp_path / "k2", model="/no/such/model")
    pinned = _federation(tmp_path)
    pinned.write_text(f'model_digest = "{"0" * 64}"\n' + pinned.read_text())
    with pytest.raises(ProvisionError, match="is not that of 'builtin:tiny'"):
        provision(pinned, tmp_path / "k3", model="builtin:tiny")


def test_digest_command_prints_what_the_agent_announces() -> None:
    from typer.testing import CliRunner

    from fedsilo.cli.main import app
    from fedsilo.sdk.models.digest import weights_digest
    from fedsilo.sdk.models.loading import load_model

    result = CliRunner().invoke(app, ["digest", "builtin:tiny", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == weights_digest(load_model("builtin:tiny", seed=3).model)
    assert result.output.strip() != weights_digest(load_model("builtin:tiny").model)
