"""`fedsilo provision`: one federation.toml in, one kit per party out (NVFlare-style).

What the coordinator hands out, and why it looks like this:

* the broker gets a definitions document (`rabbitmqctl import_definitions`, see
  fedsilo.provision.broker) with one user per party and least-privilege permissions;
* every party gets its own folder: broker password file, private keys (unless it made its
  own with `fedsilo keys init` and sent only `public.json`), the peers' pinned public keys,
  TLS client certificate, and a config pointing at all of it by relative path.

Each builder below makes one of those concerns and nothing else; `provision` checks the
inputs once and runs them in order over a shared `ProvisionContext`. Passwords exist only
in the `broker.password` files (the definitions hold salted hashes).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import stat
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fedsilo.aggregator.config import FederationConfig
from fedsilo.privacy.certs import CertPair, issue, make_ca
from fedsilo.privacy.keys import Keyring, PartyKeys, TrustStore
from fedsilo.provision.broker import (
    broker_definitions,
    import_command,
    party_url,
    username,
    vhost_of,
)
from fedsilo.provision.context import (
    Builder,
    ProvisionContext,
    ProvisionError,
    ProvisionResult,
    check_silos,
)
from fedsilo.sdk.config import ConfigError, dump_toml, load_config
from fedsilo.sdk.files import write_atomic
from fedsilo.sdk.transport.amqp_topology import AGGREGATOR

__all__ = [
    "BUILDERS",
    "SECURITY_SECTION",
    "aggregator_kit",
    "broker_accounts",
    "identities",
    "provision",
    "readme",
    "silo_kits",
    "tls_certificates",
    "trust_files",
]

SECURITY_SECTION: Mapping[str, Any] = {
    "enabled": True,
    "keys_dir": "keys",
    "trust_file": "trust.json",
}
_PASSWORD_FILE = "broker.password"
_TLS_PORT = 5671


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


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


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


def _base_broker(ctx: ProvisionContext) -> dict[str, Any]:
    """The given [broker] settings the kit's configs keep (it sets the URLs, password file
    and topology itself)."""
    return {k: v for k, v in ctx.raw.get("broker", {}).items()
            if k not in ("urls", "password_file", "declare_topology")}


# -- builders -------------------------------------------------------------------------------


def broker_accounts(ctx: ProvisionContext) -> None:
    """One broker password per party (kept across `force` runs, so the parties' files stay
    valid) in its owner-only `broker.password`, and the broker's definitions document."""
    passwords: dict[str, str] = {}
    for party in ctx.parties:
        path = ctx.out / party / _PASSWORD_FILE
        old = _existing_password(path) if ctx.force else None
        passwords[party] = old or secrets.token_urlsafe(24)
        _write(path, passwords[party] + "\n", 0o600)
    definitions = broker_definitions(ctx.cfg.name, ctx.vhost, ctx.silos, passwords,
                                     dead_letter_max=ctx.cfg.broker.dead_letter_max,
                                     dead_letter_ttl_h=ctx.cfg.broker.dead_letter_ttl_h)
    passwords.clear()
    broker = _private_dir(ctx.out / "broker")
    _write(broker / "definitions.json", json.dumps(definitions, indent=2) + "\n", 0o600)


def identities(ctx: ProvisionContext) -> None:
    """Each party's keys: made here (kept across `force` runs) unless it sent its
    public.json, in which case the kit holds no private key of it."""
    for party in ctx.parties:
        keys_dir = ctx.out / party / SECURITY_SECTION["keys_dir"]
        if party in ctx.given:
            ctx.public[party] = ctx.given[party]
            if keys_dir.exists():  # a copy from an earlier run: the party now holds its own
                shutil.rmtree(keys_dir)
            continue
        if ctx.force and (keys_dir / "keyring.json").exists():
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
        ctx.public[party] = keyring.public()
        ctx.generated.append(party)


def trust_files(ctx: ProvisionContext) -> None:
    """The coordinator pins every silo's public keys; each silo pins the coordinator's."""
    trust_file = SECURITY_SECTION["trust_file"]
    TrustStore(ctx.cfg.name, {s: ctx.public[s] for s in ctx.silos}).save(
        ctx.out / AGGREGATOR / trust_file
    )
    for silo in ctx.silos:
        TrustStore(ctx.cfg.name, {AGGREGATOR: ctx.public[AGGREGATOR]}).save(
            ctx.out / silo / trust_file
        )


def tls_certificates(ctx: ProvisionContext) -> None:
    """With TLS: one CA (kept across `force` runs), the broker's server certificate and
    rabbitmq.conf, one client certificate per party. Without: no certificate of an earlier
    `force` run may linger."""
    broker = ctx.out / "broker"
    if not ctx.tls:
        for folder in (broker / "tls", *(ctx.out / p / "tls" for p in ctx.parties)):
            if folder.is_dir():
                shutil.rmtree(folder)
        (broker / "rabbitmq.conf").unlink(missing_ok=True)
        return
    ca_dir = _private_dir(ctx.out / "ca")
    if ctx.force and (ca_dir / "ca.pem").exists() and (ca_dir / "ca.key").exists():
        ca = CertPair.read(ca_dir / "ca.pem", ca_dir / "ca.key")
    else:
        ca = make_ca(f"fedsilo {ctx.cfg.name} CA")
        ca.write(ca_dir / "ca.pem", ca_dir / "ca.key")
    hosts = ctx.tls_hosts
    server = issue(
        ca,
        hosts[0],
        dns_names=[h for h in hosts if not _is_ip(h)],
        ip_addresses=[h for h in hosts if _is_ip(h)],
        server=True,
    )
    broker_tls = _private_dir(broker / "tls")
    server.write(broker_tls / "server.pem", broker_tls / "server.key")
    _write(broker_tls / "ca.pem", ca.cert_pem, 0o644)
    for party in ctx.parties:
        party_tls = _private_dir(ctx.out / party / "tls")
        issue(ca, ctx.users[party], client=True).write(
            party_tls / "client.pem", party_tls / "client.key"
        )
        _write(party_tls / "ca.pem", ca.cert_pem, 0o644)
    if not {urlsplit(u).hostname for u in ctx.cfg.broker.urls} <= set(hosts):
        ctx.server_name = hosts[0]
    _write(broker / "rabbitmq.conf",
           _rabbitmq_conf(ctx.cfg.name, broker_tls, ctx.cfg.broker.urls), 0o644)


def aggregator_kit(ctx: ProvisionContext) -> None:
    """The coordinator's federation.toml: the given one, pointing at the kit's broker
    password, TLS files and keys, with the base model's digest if known."""
    document = {k: v for k, v in ctx.raw.items() if k not in ("broker", "security")}
    document["broker"] = _broker_section(
        _base_broker(ctx), ctx.urls_by_party[AGGREGATOR], ctx.tls, ctx.server_name,
        declare_topology=True,
    )
    document["security"] = dict(SECURITY_SECTION)
    if ctx.digest:
        document["model_digest"] = ctx.digest
    _write(
        ctx.out / AGGREGATOR / "federation.toml",
        _toml(
            f"federation.toml of federation {ctx.cfg.name!r}, made by `fedsilo provision` "
            f"from\n{ctx.config_path.name}. Paths are relative to this file's folder.",
            document,
        ),
        0o644,
    )


def silo_kits(ctx: ProvisionContext) -> None:
    """Each silo's silo.toml: its id, the base model (if given) and its broker user; the
    operator adds the data."""
    for silo in ctx.silos:
        document = {
            "silo_id": silo,
            **({"model": ctx.model, "dtype": ctx.dtype} if ctx.model else {}),
            "broker": _broker_section(
                _base_broker(ctx), ctx.urls_by_party[silo], ctx.tls, ctx.server_name,
                declare_topology=False,
            ),
            "security": dict(SECURITY_SECTION),
        }
        _write(
            ctx.out / silo / "silo.toml",
            _toml(
                f"silo.toml of {silo!r} in federation {ctx.cfg.name!r}, made by `fedsilo "
                "provision`.\n"
                + ("The model is the federation's base model (the aggregator checks its "
                   "digest). Add a [data]" if ctx.model else
                   "Add the base model (model = \"...\", the same as every other "
                   "silo's) and a [data]")
                + "\nsection pointing at this silo's data before "
                f"`fedsilo agent start --config silo.toml`.\nThe broker user "
                f"{ctx.users[silo]!r} may configure only its lock queue: the topology comes "
                "from the\nbroker's definitions (declare_topology = false). Paths are relative "
                "to this file.",
                document,
            ),
            0o644,
        )


def readme(ctx: ProvisionContext) -> None:
    """The kit's README.md: which folder goes to whom, what is secret, the next steps."""
    _write(ctx.out / "README.md", _readme(ctx.result(), ctx.tls_hosts), 0o644)


#: The kit, one concern each, in the order they run (later ones use what earlier ones made).
BUILDERS: tuple[Builder, ...] = (
    broker_accounts,
    identities,
    trust_files,
    tls_certificates,
    aggregator_kit,
    silo_kits,
    readme,
)


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
    builders: Sequence[Builder] = BUILDERS,
) -> ProvisionResult:
    """Write the kits for `config_path`'s federation into `out` (see the module docstring):
    check the inputs, then run `builders` in order over one context.

    `public_keys`: a folder of `<party>.json` (from `fedsilo keys init` at each site); those
    parties get no private keys from here. `tls_hosts`: names and IPs the broker is reached
    under; non-empty turns on TLS (CA, broker server certificate, one client certificate per
    party, amqps URLs). `vhost`: default the URL's vhost unless "/", else the federation name.
    `force` rewrites a non-empty `out` in place, keeping the CA, keyrings and broker passwords
    found there, so re-provisioning after a key rotation changes only the trust files.
    `model` (with the silos' `dtype`): the base model; its weights' digest goes into the
    aggregator's federation.toml and the model into every silo.toml."""
    config_path, out = Path(config_path), Path(out)
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
    check_silos(silos)
    parties = (AGGREGATOR, *silos)
    if isinstance(tls_hosts, str):
        raise TypeError("tls_hosts is a sequence of host names, not a string")
    tls_hosts = tuple(dict.fromkeys(h.strip() for h in tls_hosts if h.strip()))
    vhost = vhost or vhost_of(cfg.broker.urls[0]) or cfg.name
    given = _read_public_keys(public_keys, parties)
    digest = _model_digest(model, dtype, cfg.model_digest) if model else cfg.model_digest
    _prepare_out(out, force)
    for party in parties:
        _private_dir(out / party)

    users = {p: username(cfg.name, p) for p in parties}
    ctx = ProvisionContext(
        config_path=config_path, out=out, cfg=cfg, raw=raw, vhost=vhost,
        tls_hosts=tls_hosts, given=given, force=force, model=model, dtype=dtype,
        digest=digest, users=users,
        urls_by_party={p: tuple(party_url(u, users[p], vhost, bool(tls_hosts))
                                for u in cfg.broker.urls) for p in parties},
    )
    for build in builders:
        build(ctx)
    return ctx.result()


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
