"""`fedsilo provision`: one federation.toml in, one kit per party out (NVFlare-style).

What the coordinator hands out, and why it looks like this:

* the broker gets a definitions document (`rabbitmqctl import_definitions`) with one user per
  party and least-privilege permissions: a silo may only publish to the uploads exchange,
  read its own plans queue and configure its own lock queue; so the whole topology is
  declared in the document, EXACTLY as `AmqpTransport` declares it (same flags, same queue
  arguments), or the aggregator's idempotent redeclare would fail with PRECONDITION_FAILED;
* every party gets its own folder: broker password file, private keys (unless it made its
  own with `fedsilo keys init` and sent only `public.json`), the peers' pinned public keys,
  TLS client certificate, and a config pointing at all of it by relative path.

Functions compute documents; `provision` is the only one touching the disk. Passwords exist
only in the `broker.password` files (the definitions hold salted hashes).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import stat
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from fedsilo.privacy.certs import CertPair, issue, make_ca
from fedsilo.privacy.keys import Keyring, PartyKeys, TrustStore
from fedsilo.sdk.config import ConfigError, dump_toml, load_config
from fedsilo.sdk.files import write_atomic
from fedsilo.sdk.transport.amqp import (
    AGGREGATOR,
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    PLANS_EXCHANGE,
    UPLOADS_EXCHANGE,
    UPLOADS_QUEUE,
    UPLOADS_ROUTING_KEY,
    lock_queue,
    plans_queue,
)

__all__ = [
    "HASHING_ALGORITHM",
    "NOTHING",
    "RESERVED_NAMES",
    "ProvisionError",
    "ProvisionResult",
    "aggregator_resources",
    "broker_definitions",
    "hash_password",
    "import_command",
    "provision",
    "username",
]

HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
#: Kit folders beside the party folders: a silo may not be called like one of them.
RESERVED_NAMES = frozenset({AGGREGATOR, "broker", "ca"})
SECURITY_SECTION: Mapping[str, Any] = {
    "enabled": True,
    "keys_dir": "keys",
    "trust_file": "trust.json",
}
_PASSWORD_FILE = "broker.password"
_TLS_PORT = 5671


class ProvisionError(ValueError):
    """The inputs cannot make a kit; the message says what to change."""


@dataclass(frozen=True)
class ProvisionResult:
    """What `provision` wrote (no secrets: passwords stay in the kit's files)."""

    out: Path
    federation: str
    vhost: str
    parties: tuple[str, ...]  # "aggregator" first, then the silos in roster order
    usernames: Mapping[str, str] = field(default_factory=dict)  # party -> broker user
    urls: tuple[str, ...] = ()  # the password-free broker URLs written into the configs
    tls: bool = False
    generated_keys: tuple[str, ...] = ()  # parties whose private keys are in the kit
    external_keys: tuple[str, ...] = ()  # parties that sent public.json (keys stay with them)


# -- broker definitions ---------------------------------------------------------------------


def username(federation: str, party: str) -> str:
    """The broker user of `party`: prefixed, so federations can share a broker."""
    return f"{federation}.{party}"


def hash_password(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's `rabbit_password_hashing_sha256`: base64(salt + sha256(salt + password)),
    with a random 4-byte salt, so the definitions file never holds the password itself."""
    salt = secrets.token_bytes(4) if salt is None else salt
    if len(salt) != 4:
        raise ValueError("RabbitMQ password salts are 4 bytes")
    digest = hashlib.sha256(salt + password.encode("utf-8")).digest()
    return base64.b64encode(salt + digest).decode("ascii")


#: End of name. A bare `$` also matches before a final newline (in Erlang's re as in Python's),
#: and RabbitMQ accepts a queue called "silo.x.plans\n"; the lookahead shuts that door.
_END = r"$(?!\n)"
#: Configure nothing: matches only "", which names no resource the broker checks.
NOTHING = "^" + _END


def _exactly(names: Sequence[str]) -> str:
    """A regex matching exactly these resource names (anchored, escaped): nothing else."""
    unique = sorted(dict.fromkeys(names))
    return "^(?:" + "|".join(re.escape(n) for n in unique) + ")" + _END


def aggregator_resources(silos: Sequence[str]) -> tuple[str, ...]:
    """Every exchange and queue of the federation's topology (all the aggregator touches)."""
    names = [DEAD_EXCHANGE, PLANS_EXCHANGE, UPLOADS_EXCHANGE, DEAD_QUEUE, UPLOADS_QUEUE]
    names += [plans_queue(s) for s in silos]
    return tuple(dict.fromkeys(names))


def _queue(vhost: str, name: str, dead_letter: bool, quorum: bool) -> dict[str, Any]:
    # Mirrors AmqpTransport._declare_queue: a mismatch in any argument is a
    # PRECONDITION_FAILED when the aggregator redeclares.
    arguments: dict[str, Any] = {"x-dead-letter-exchange": DEAD_EXCHANGE} if dead_letter else {}
    if quorum:
        arguments = {"x-queue-type": "quorum", **arguments}
    return {
        "name": name,
        "vhost": vhost,
        "durable": True,
        "auto_delete": False,
        "arguments": arguments,
    }


def _exchange(vhost: str, name: str, kind: str) -> dict[str, Any]:
    return {
        "name": name,
        "vhost": vhost,
        "type": kind,
        "durable": True,
        "auto_delete": False,
        "internal": False,
        "arguments": {},
    }


def _binding(vhost: str, exchange: str, queue: str, routing_key: str) -> dict[str, Any]:
    return {
        "source": exchange,
        "vhost": vhost,
        "destination": queue,
        "destination_type": "queue",
        "routing_key": routing_key,
        "arguments": {},
    }


def _check_silos(silos: Sequence[str]) -> None:
    if not silos:
        raise ProvisionError("the federation lists no silos; add silos = [...] to it")
    if len(set(silos)) != len(silos):
        raise ProvisionError(f"silo ids must be unique (got {list(silos)})")
    for silo in silos:
        if silo in RESERVED_NAMES:
            raise ProvisionError(
                f"a silo may not be called {silo!r} (reserved for the kit's "
                f"{'coordinator' if silo == AGGREGATOR else silo} folder); rename it in the "
                "federation's silos list"
            )


def broker_definitions(
    federation: str,
    vhost: str,
    silos: Sequence[str],
    passwords: Mapping[str, str],
    *,
    quorum: bool = True,
    dead_letter_max: int = 100_000,
    dead_letter_ttl_h: float = 14 * 24.0,
) -> dict[str, Any]:
    """A RabbitMQ definitions document for one federation: its vhost, one user per party
    (`passwords` maps "aggregator" and every silo to its password), least-privilege
    permissions and the topology `AmqpTransport._declare_topology` declares.

    Silos may configure only their own lock queue (an exclusive queue: one live agent per
    silo), write only to the uploads exchange and read only their own plans queue; the
    aggregator may configure, write and read the federation's exchanges
    and queues and nothing else. `quorum=False` for brokers without quorum queues (the
    transport then falls back to classic durable queues the same way). A policy bounds the
    dead-letter queue (`dead_letter_max` messages, oldest dropped first; each kept
    `dead_letter_ttl_h` hours): a policy, not queue arguments, so it also applies to a
    queue that already exists and can be changed without redeclaring it."""
    _check_silos(silos)
    parties = (AGGREGATOR, *silos)
    missing = [p for p in parties if not passwords.get(p)]
    if missing:
        raise ProvisionError(f"no broker password for {missing}")
    users = [
        {
            "name": username(federation, party),
            "password_hash": hash_password(passwords[party]),
            "hashing_algorithm": HASHING_ALGORITHM,
            "tags": "",
        }
        for party in parties
    ]
    everything = _exactly(aggregator_resources(silos))
    permissions = [
        {
            "user": username(federation, AGGREGATOR),
            "vhost": vhost,
            "configure": everything,
            "write": everything,
            "read": everything,
        }
    ]
    permissions += [
        {
            "user": username(federation, silo),
            "vhost": vhost,
            "configure": _exactly([lock_queue(silo)]),  # its lock, nothing else
            "write": _exactly([UPLOADS_EXCHANGE]),
            "read": _exactly([plans_queue(silo)]),
        }
        for silo in silos
    ]
    exchanges = [
        _exchange(vhost, DEAD_EXCHANGE, "fanout"),
        _exchange(vhost, PLANS_EXCHANGE, "direct"),
        _exchange(vhost, UPLOADS_EXCHANGE, "direct"),
    ]
    queues = [
        _queue(vhost, DEAD_QUEUE, dead_letter=False, quorum=quorum),
        _queue(vhost, UPLOADS_QUEUE, dead_letter=True, quorum=quorum),
        *(_queue(vhost, plans_queue(s), dead_letter=True, quorum=quorum) for s in silos),
    ]
    bindings = [
        # pika's queue_bind without a routing key binds with the queue's name
        _binding(vhost, DEAD_EXCHANGE, DEAD_QUEUE, DEAD_QUEUE),
        _binding(vhost, UPLOADS_EXCHANGE, UPLOADS_QUEUE, UPLOADS_ROUTING_KEY),
        *(_binding(vhost, PLANS_EXCHANGE, plans_queue(s), s) for s in silos),
    ]
    return {
        "users": users,
        "vhosts": [{"name": vhost}],
        "permissions": permissions,
        "topic_permissions": [],
        "parameters": [],
        "global_parameters": [],
        "policies": [{
            "vhost": vhost,
            "name": "fedsilo-dead-letters-bounded",
            "pattern": f"^{re.escape(DEAD_QUEUE)}$",
            "apply-to": "queues",
            "priority": 0,
            "definition": {"max-length": dead_letter_max, "overflow": "drop-head",
                           "message-ttl": int(dead_letter_ttl_h * 3600 * 1000)},
        }],
        "exchanges": exchanges,
        "queues": queues,
        "bindings": bindings,
    }


def import_command(definitions: Path | str = "broker/definitions.json") -> str:
    """How to load the definitions. Through stdin (RabbitMQ 3.10 reads it when no file is
    named): `rabbitmqctl` often runs as the rabbitmq user, which cannot open the owner-only
    file itself."""
    return f"rabbitmqctl import_definitions < {shlex.quote(str(definitions))}"


# -- URLs -----------------------------------------------------------------------------------


def _vhost_of(url: str) -> str | None:
    path = urlsplit(url).path
    vhost = unquote(path[1:]) if path.startswith("/") else unquote(path)
    return vhost if vhost not in ("", "/") else None


def _party_url(url: str, user: str, vhost: str, tls: bool) -> str:
    """`url` for `user` on `vhost`, without a password (it is read from broker.password)."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal
    scheme, port = parts.scheme, parts.port
    if tls and scheme != "amqps":
        scheme = "amqps"
        port = None if port in (None, 5672) else port
    netloc = f"{quote(user, safe='')}@{host}" + (f":{port}" if port else "")
    return urlunsplit((scheme, netloc, "/" + quote(vhost, safe=""), parts.query, ""))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# -- files ----------------------------------------------------------------------------------


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _write(path: Path, data: str | bytes, mode: int) -> None:
    """Replace `path` atomically with a file of exactly `mode` (never wider, not even
    briefly: a password file must not be readable by others while it is written)."""
    write_atomic(path, data.encode("utf-8") if isinstance(data, str) else data, mode)


def _existing_password(path: Path) -> str | None:
    """The password a previous run wrote (kept by `force`, so the parties' files stay valid)."""
    if not path.is_file():
        return None
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise ProvisionError(f"{path} is readable by other users; run `chmod 600 {path}`")
    text = path.read_text().strip()
    return text or None


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ProvisionError(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ProvisionError(
            f"{out} is not empty; choose an empty or new folder, or pass --force to rewrite "
            "the kit in place (keeping its CA, keys and broker passwords)"
        )
    _private_dir(out)


def _read_public_keys(folder: Path | None, parties: Sequence[str]) -> dict[str, PartyKeys]:
    """`<party>.json` files made by `fedsilo keys init`; a file naming no party is an error
    (a typo would otherwise silently make keys for that party here)."""
    if folder is None:
        return {}
    if not folder.is_dir():
        raise ProvisionError(f"public keys folder {folder} does not exist or is not a folder")
    found: dict[str, PartyKeys] = {}
    for path in sorted(folder.glob("*.json")):
        party = path.stem
        if party not in parties:
            raise ProvisionError(
                f"{path} names no party of this federation (parties: {', '.join(parties)}); "
                "name each file <party>.json"
            )
        keys = PartyKeys.load(path)
        if keys.party != party:
            raise ProvisionError(
                f"{path} holds the public keys of {keys.party!r}, not {party!r}; "
                "name each file after the party it belongs to"
            )
        found[party] = keys
    return found


# -- config files ---------------------------------------------------------------------------


def _broker_section(
    base: Mapping[str, Any], urls: Sequence[str], tls: bool, server_name: str | None,
    declare_topology: bool,
) -> dict[str, Any]:
    section = {k: v for k, v in base.items() if not k.startswith("tls_")}
    section.update(urls=list(urls), password_file=_PASSWORD_FILE,
                   declare_topology=declare_topology)
    if tls:
        section.update(tls_ca_file="tls/ca.pem", tls_cert_file="tls/client.pem",
                       tls_key_file="tls/client.key")
        if server_name is not None:
            section["tls_server_name"] = server_name
    return section


def _toml(header: str, document: Mapping[str, Any]) -> str:
    comments = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    return comments + "\n" + dump_toml(dict(document), redact=False)


# -- provision ------------------------------------------------------------------------------


def provision(
    config_path: Path,
    out: Path,
    *,
    public_keys: Path | None = None,
    tls_hosts: Sequence[str] = (),
    vhost: str | None = None,
    force: bool = False,
    model: str | None = None,
    dtype: str = "float32",
) -> ProvisionResult:
    """Write the kits for `config_path`'s federation into `out` (see the module docstring).

    `public_keys`: a folder of `<party>.json` (from `fedsilo keys init` at each site); those
    parties get no private keys from here. `tls_hosts`: names and IPs the broker is reached
    under; non-empty turns on TLS (CA, broker server certificate, one client certificate per
    party, amqps URLs). `vhost`: default the URL's vhost unless "/", else the federation name.
    `force` rewrites a non-empty `out` in place, keeping the CA, keyrings and broker passwords
    found there, so re-provisioning after a key rotation changes only the trust files.
    `model` (with the silos' `dtype`): the base model; its weights' digest goes into the
    aggregator's federation.toml and the model into every silo.toml."""
    config_path, out = Path(config_path), Path(out)
    from fedsilo.aggregator.config import FederationConfig

    if not config_path.is_file():
        raise ProvisionError(
            f"cannot read the federation config {config_path}: no such file; pass the "
            "coordinator's federation.toml"
        )
    try:
        cfg = load_config(FederationConfig, config_path, env={})
        raw = tomllib.loads(config_path.read_text())
    except ConfigError as exc:
        raise ProvisionError(f"invalid federation config {config_path}:\n{exc}") from None
    except OSError as exc:
        raise ProvisionError(f"cannot read {config_path}: {exc.strerror or exc}") from None
    silos = tuple(cfg.silos)
    _check_silos(silos)
    parties = (AGGREGATOR, *silos)
    if isinstance(tls_hosts, str):
        raise TypeError("tls_hosts is a sequence of host names, not a string")
    tls_hosts = tuple(dict.fromkeys(h.strip() for h in tls_hosts if h.strip()))
    tls = bool(tls_hosts)
    vhost = vhost or _vhost_of(cfg.broker.urls[0]) or cfg.name
    given = _read_public_keys(public_keys, parties)
    digest = _model_digest(model, dtype, cfg.model_digest) if model else cfg.model_digest
    _prepare_out(out, force)

    users = {p: username(cfg.name, p) for p in parties}
    # -- broker passwords (kept across `force` runs) and definitions
    passwords: dict[str, str] = {}
    for party in parties:
        _private_dir(out / party)
        old = _existing_password(out / party / _PASSWORD_FILE) if force else None
        passwords[party] = old or secrets.token_urlsafe(24)
        _write(out / party / _PASSWORD_FILE, passwords[party] + "\n", 0o600)
    definitions = broker_definitions(cfg.name, vhost, silos, passwords,
                                     dead_letter_max=cfg.broker.dead_letter_max,
                                     dead_letter_ttl_h=cfg.broker.dead_letter_ttl_h)
    passwords.clear()
    broker = _private_dir(out / "broker")
    _write(broker / "definitions.json", json.dumps(definitions, indent=2) + "\n", 0o600)

    # -- identities: keys made here unless the party sent its public.json
    public: dict[str, PartyKeys] = {}
    generated: list[str] = []
    for party in parties:
        keys_dir = out / party / SECURITY_SECTION["keys_dir"]
        if party in given:
            public[party] = given[party]
            if keys_dir.exists():  # a copy from an earlier run: the party now holds its own
                shutil.rmtree(keys_dir)
            continue
        if force and (keys_dir / "keyring.json").exists():
            keyring = Keyring.load(keys_dir)
            if keyring.party != party:
                raise ProvisionError(
                    f"{keys_dir} holds the keys of {keyring.party!r}, not {party!r}; "
                    "move it away and run again"
                )
        else:
            if keys_dir.exists():
                shutil.rmtree(keys_dir)
            keyring = Keyring.create(keys_dir, party)
        public[party] = keyring.public()
        generated.append(party)
    aggregator_trust = TrustStore(cfg.name, {s: public[s] for s in silos})
    aggregator_trust.save(out / AGGREGATOR / SECURITY_SECTION["trust_file"])
    for silo in silos:
        TrustStore(cfg.name, {AGGREGATOR: public[AGGREGATOR]}).save(
            out / silo / SECURITY_SECTION["trust_file"]
        )

    # -- TLS: one CA (kept across `force` runs), the broker's server certificate, clients
    urls_by_party = {
        p: tuple(_party_url(u, users[p], vhost, tls) for u in cfg.broker.urls) for p in parties
    }
    server_name: str | None = None
    if tls:
        ca_dir = _private_dir(out / "ca")
        if force and (ca_dir / "ca.pem").exists() and (ca_dir / "ca.key").exists():
            ca = CertPair.read(ca_dir / "ca.pem", ca_dir / "ca.key")
        else:
            ca = make_ca(f"fedsilo {cfg.name} CA")
            ca.write(ca_dir / "ca.pem", ca_dir / "ca.key")
        server = issue(
            ca,
            tls_hosts[0],
            dns_names=[h for h in tls_hosts if not _is_ip(h)],
            ip_addresses=[h for h in tls_hosts if _is_ip(h)],
            server=True,
        )
        broker_tls = _private_dir(broker / "tls")
        server.write(broker_tls / "server.pem", broker_tls / "server.key")
        _write(broker_tls / "ca.pem", ca.cert_pem, 0o644)
        for party in parties:
            party_tls = _private_dir(out / party / "tls")
            issue(ca, users[party], client=True).write(
                party_tls / "client.pem", party_tls / "client.key"
            )
            _write(party_tls / "ca.pem", ca.cert_pem, 0o644)
        hosts = {urlsplit(u).hostname for u in cfg.broker.urls}
        if not hosts <= set(tls_hosts):
            server_name = tls_hosts[0]
        _write(broker / "rabbitmq.conf", _rabbitmq_conf(cfg.name, broker_tls, cfg.broker.urls),
               0o644)
    else:  # a `force` run without TLS: no certificate of an earlier run may linger
        for folder in (broker / "tls", *(out / p / "tls" for p in parties)):
            if folder.is_dir():
                shutil.rmtree(folder)
        (broker / "rabbitmq.conf").unlink(missing_ok=True)

    # -- configs
    base_broker = {k: v for k, v in raw.get("broker", {}).items()
                   if k not in ("urls", "password_file", "declare_topology")}
    federation_doc = {k: v for k, v in raw.items() if k not in ("broker", "security")}
    federation_doc["broker"] = _broker_section(
        base_broker, urls_by_party[AGGREGATOR], tls, server_name, declare_topology=True
    )
    federation_doc["security"] = dict(SECURITY_SECTION)
    if digest:
        federation_doc["model_digest"] = digest
    _write(
        out / AGGREGATOR / "federation.toml",
        _toml(
            f"federation.toml of federation {cfg.name!r}, made by `fedsilo provision` from\n"
            f"{config_path.name}. Paths are relative to this file's folder.",
            federation_doc,
        ),
        0o644,
    )
    for silo in silos:
        silo_doc = {
            "silo_id": silo,
            **({"model": model, "dtype": dtype} if model else {}),
            "broker": _broker_section(
                base_broker, urls_by_party[silo], tls, server_name, declare_topology=False
            ),
            "security": dict(SECURITY_SECTION),
        }
        _write(
            out / silo / "silo.toml",
            _toml(
                f"silo.toml of {silo!r} in federation {cfg.name!r}, made by `fedsilo "
                "provision`.\n"
                + ("The model is the federation's base model (the aggregator checks its "
                   "digest). Add a [data]" if model else
                   "Add the base model (model = \"...\", the same as every other "
                   "silo's) and a [data]")
                + "\nsection pointing at this silo's data before "
                f"`fedsilo agent start --config silo.toml`.\nThe broker user {users[silo]!r} "
                "may configure only its lock queue: the topology comes from the\nbroker's "
                "definitions "
                "(declare_topology = false). Paths are relative to this file.",
                silo_doc,
            ),
            0o644,
        )

    result = ProvisionResult(
        out=out,
        federation=cfg.name,
        vhost=vhost,
        parties=parties,
        usernames=users,
        urls=urls_by_party[AGGREGATOR],
        tls=tls,
        generated_keys=tuple(generated),
        external_keys=tuple(p for p in parties if p in given),
    )
    _write(out / "README.md", _readme(result, tls_hosts), 0o644)
    return result


def _model_digest(model: str, dtype: str, configured: str) -> str:
    """The digest of `model`'s weights; it must agree with federation.toml's, if set."""
    from fedsilo.sdk.models.digest import weights_digest
    from fedsilo.sdk.models.loading import ModelLoadError, load_model

    try:
        digest = weights_digest(load_model(model, dtype=dtype).model)
    except (ModelLoadError, ValueError, OSError) as exc:
        raise ProvisionError(f"cannot load the base model {model!r}: {exc}") from None
    if configured and configured != digest:
        raise ProvisionError(
            f"the federation.toml's model_digest {configured[:12]}... is not that of {model!r} "
            f"in {dtype} ({digest[:12]}...); remove it, or pass the model it names"
        )
    return digest


def _rabbitmq_conf(federation: str, tls_dir: Path, urls: Sequence[str]) -> str:
    ports = {p for u in urls if urlsplit(u).scheme == "amqps" and (p := urlsplit(u).port)}
    port = ports.pop() if len(ports) == 1 else _TLS_PORT
    tls_dir = tls_dir.absolute()
    return (
        f"# TLS listener for the fedsilo federation {federation!r}, made by `fedsilo "
        "provision`.\n"
        "# Merge into rabbitmq.conf and restart the broker. The paths point at this kit's\n"
        "# broker/tls folder: if you copy the files elsewhere (the rabbitmq user must be\n"
        "# able to read them; keep server.key 0600), change the paths.\n"
        f"listeners.ssl.default = {port}\n"
        f"ssl_options.cacertfile = {tls_dir / 'ca.pem'}\n"
        f"ssl_options.certfile = {tls_dir / 'server.pem'}\n"
        f"ssl_options.keyfile = {tls_dir / 'server.key'}\n"
        "# Mutual TLS: every party presents the client certificate from its kit.\n"
        "ssl_options.verify = verify_peer\n"
        "ssl_options.fail_if_no_peer_cert = true\n"
        "ssl_options.versions.1 = tlsv1.3\n"
        "ssl_options.versions.2 = tlsv1.2\n"
        "# Once every party connects with amqps://, turn plain AMQP off:\n"
        "# listeners.tcp = none\n"
    )


def _readme(result: ProvisionResult, tls_hosts: Sequence[str]) -> str:
    silos = [p for p in result.parties if p != AGGREGATOR]
    lines = [
        f"# fedsilo federation `{result.federation}`: provisioning kit",
        "",
        "Made by `fedsilo provision`. One folder per party: send each folder, whole and over "
        "a private channel, to that party only. Everything marked *secret* must never be "
        "sent to anyone else, committed or mailed in clear.",
        "",
        "| folder | goes to | secret |",
        "|---|---|---|",
        "| `broker/` | the RabbitMQ operator | `definitions.json` (password hashes)"
        + (", `tls/server.key`" if result.tls else "") + " |",
    ]
    if result.tls:
        lines.append("| `ca/` | nobody: keep offline | `ca.key` signs every certificate |")
    lines.append(
        f"| `{AGGREGATOR}/` | the coordinator (aggregator host) | `broker.password`, "
        "`keys/`" + (", `tls/client.key`" if result.tls else "") + " |"
    )
    for silo in silos:
        lines.append(
            f"| `{silo}/` | the operator of silo `{silo}` | `broker.password`, `keys/`"
            + (", `tls/client.key`" if result.tls else "") + " |"
        )
    lines += [
        "",
        "## 1. Broker",
        "",
        f"Virtual host `{result.vhost}`; one user per party, least privilege (a silo may "
        "only publish uploads and read its own plans queue; it may declare nothing, so the "
        "exchanges and queues are in the definitions). Import them (re-importing is safe "
        "and updates users and permissions):",
        "",
        "```sh",
        import_command(),
        "```",
        "",
        "(Through stdin because `rabbitmqctl` often runs as the `rabbitmq` user, which cannot "
        "read the owner-only file. The import finishes a moment after the command returns: "
        f"check with `rabbitmqctl list_permissions -p {result.vhost}`.) A silo removed from "
        "the roster keeps its broker user "
        f"until you delete it: `rabbitmqctl delete_user {result.federation}.<silo>`. Also "
        "remove or restrict the default `guest` user on a broker reachable from outside.",
        "",
    ]
    if result.tls:
        lines += [
            f"TLS: the server certificate names {', '.join(f'`{h}`' for h in tls_hosts)}. "
            "Merge `broker/rabbitmq.conf` into the broker's rabbitmq.conf (it turns on the "
            "TLS listener with client-certificate verification) and restart the broker. Every "
            "party connects with `amqps://`; its client certificate is in `tls/`.",
            "",
        ]
    lines += [
        "## 2. Parties",
        "",
        f"* Coordinator: `fedsilo aggregator run --config {AGGREGATOR}/federation.toml`. "
        "`trust.json` pins every silo's public keys.",
        "* Silo `<id>`: add the base model and a `[data]` section to `<id>/silo.toml`, then "
        "`fedsilo agent start --config <id>/silo.toml`. Its `trust.json` pins the "
        "coordinator's public keys.",
        "",
        "Broker URLs hold no password: each party reads it from its `broker.password` "
        "(mode 0600).",
        "",
    ]
    if result.external_keys:
        lines += [
            "Parties that sent their own public keys (their private keys never left their "
            "site; this kit has no `keys/` folder for them): "
            + ", ".join(f"`{p}`" for p in result.external_keys)
            + ". Each keeps the keyring it made with `fedsilo keys init --dir keys --party "
            "<party>` (run it there if it has not) as `keys/` beside its config, or points "
            "`[security] keys_dir` at it.",
            "",
        ]
    lines += [
        "Check fingerprints out of band (phone, video call) before trusting a kit: "
        "`fedsilo keys show --dir <party>/keys` at each site must print the fingerprints "
        "pinned in the peers' `trust.json`.",
        "",
        "## 3. Key rotation",
        "",
        "A party runs `fedsilo keys rotate --dir keys` (a pending key: it decrypts but does "
        "not sign yet) and sends its new `keys/public.json`; peers pin it with `fedsilo trust "
        "add trust.json public.json` (no restart needed), or the coordinator re-runs `fedsilo "
        "provision ... --public-keys DIR --force` (the CA, keys and broker passwords in this "
        "folder are kept). Once every peer has the new key, the party runs `fedsilo keys "
        "activate --dir keys` (it signs from then on), then `fedsilo keys retire --dir keys "
        "OLD_KEY_ID`, and peers run `fedsilo trust retire trust.json PARTY OLD_KEY_ID` so "
        "the old key is refused everywhere.",
        "",
    ]
    return "\n".join(lines)
