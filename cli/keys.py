"""`fedsilo keys`, `fedsilo trust` and `fedsilo provision`: identities and kits.

Registered from cli/main.py. Heavy imports (cryptography, the federation config) happen
inside the commands so `fedsilo --help` stays fast. Nothing here prints private material:
keys are shown by id and fingerprint, passwords never.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

keys_app = typer.Typer(
    help="This party's key pairs (sign what it sends, open what is sealed to it).",
    no_args_is_help=True,
)
trust_app = typer.Typer(
    help="The peers' pinned public keys (a trust.json); picked up without a restart.",
    no_args_is_help=True,
)

DirOption = Annotated[
    Path, typer.Option("--dir", "-d", help="The keyring folder (owner-only).")
]


def _fail(message: str) -> NoReturn:
    """One line on stderr, exit code 2, no traceback."""
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    Console(stderr=True, soft_wrap=True).print(
        f"[bold red]error:[/] {escape(line)}", highlight=False
    )
    raise typer.Exit(code=2)


def _out() -> Console:
    return Console(highlight=False, soft_wrap=True)  # fingerprints must stay on one line


def _key_lines(console: Console, keys: object) -> None:
    from fedsilo.privacy.keys import PartyKeys

    assert isinstance(keys, PartyKeys)
    for i, key in enumerate(keys.keys):
        state = "active" if i == 0 else "older "
        console.print(f"  {state}  {key.key_id}  {key.fingerprint}")


# -- fedsilo keys ---------------------------------------------------------------------------


@keys_app.command("init")
def keys_init(
    dir_: DirOption,
    party: Annotated[
        str, typer.Option("--party", "-p", help='This party\'s name: "aggregator" or a silo id.')
    ],
) -> None:
    """Make this party's first key pair; send DIR/public.json to the coordinator."""
    from fedsilo.privacy.keys import PUBLIC_FILE, Keyring, KeysError

    try:
        keyring = Keyring.create(dir_, party)
    except (KeysError, OSError) as exc:
        _fail(str(exc))
    console = _out()
    console.print(f"keyring of {escape(party)} created in {escape(str(dir_))}")
    _key_lines(console, keyring.public())
    console.print(
        f"Send {escape(str(dir_ / PUBLIC_FILE))} to the coordinator (it holds no secret); "
        "confirm the fingerprint with them by another channel. Keep the folder private."
    )


@keys_app.command("rotate")
def keys_rotate(dir_: DirOption) -> None:
    """Add a new active key; the old ones keep opening messages already sealed to them."""
    from fedsilo.privacy.keys import PUBLIC_FILE, Keyring, KeysError

    try:
        keyring = Keyring.load(dir_)
        new = keyring.rotate()
    except (KeysError, OSError) as exc:
        _fail(str(exc))
    console = _out()
    console.print(f"new active key of {escape(keyring.party)}: {new.key_id}  {new.fingerprint}")
    _key_lines(console, keyring.public())
    older = [k.key_id for k in keyring.public().keys[1:]]
    console.print(
        f"Send {escape(str(dir_ / PUBLIC_FILE))} to your peers (`fedsilo trust add`); once "
        "they have it, retire the old key"
        + (f" (`fedsilo keys retire --dir {escape(str(dir_))} {older[0]}`)." if older else ".")
    )


@keys_app.command("retire")
def keys_retire(
    dir_: DirOption,
    key_id: Annotated[str, typer.Argument(help="The (non-active) key id to delete.")],
) -> None:
    """Delete an old key for good (messages sealed to it can no longer be opened)."""
    from fedsilo.privacy.keys import Keyring, KeysError

    try:
        keyring = Keyring.load(dir_)
        keyring.retire(key_id)
    except (KeysError, OSError) as exc:
        _fail(str(exc))
    console = _out()
    console.print(f"retired key {escape(key_id)} of {escape(keyring.party)}; keys now:")
    _key_lines(console, keyring.public())
    console.print(
        f"Peers may now drop it: `fedsilo trust remove trust.json {escape(keyring.party)} "
        f"{escape(key_id)}`."
    )


@keys_app.command("show")
def keys_show(dir_: DirOption) -> None:
    """Party, key ids and fingerprints (public information only)."""
    from fedsilo.privacy.keys import Keyring, KeysError

    try:
        keyring = Keyring.load(dir_)
    except (KeysError, OSError) as exc:
        _fail(str(exc))
    console = _out()
    console.print(f"party {escape(keyring.party)} ({escape(str(dir_))})")
    _key_lines(console, keyring.public())


# -- fedsilo trust --------------------------------------------------------------------------


@trust_app.command("add")
def trust_add(
    trust_file: Annotated[Path, typer.Argument(help="The trust.json to update.")],
    public_json: Annotated[Path, typer.Argument(help="A party's public.json.")],
) -> None:
    """Pin a party's public keys (replacing what was pinned for it), e.g. after it rotated."""
    from fedsilo.privacy.keys import KeysError, PartyKeys, TrustStore

    try:
        store = TrustStore.load(trust_file)
        keys = PartyKeys.load(public_json)
        before = store.parties.get(keys.party)
        store.add(keys)
        store.save(trust_file)
    except (KeysError, OSError) as exc:
        _fail(str(exc))
    console = _out()
    old = {k.key_id for k in before.keys} if before is not None else set()
    new = {k.key_id for k in keys.keys}
    verb = "updated" if before is not None else "added"
    console.print(f"{verb} {escape(keys.party)} in {escape(str(trust_file))}:")
    _key_lines(console, keys)
    if before is not None and old - new:
        console.print("no longer pinned: " + ", ".join(sorted(old - new)))
    console.print("Compare the fingerprints with the party's operator by another channel.")


@trust_app.command("remove")
def trust_remove(
    trust_file: Annotated[Path, typer.Argument(help="The trust.json to update.")],
    party: Annotated[str, typer.Argument(help="The party whose key to unpin.")],
    key_id: Annotated[str, typer.Argument(help="The key id to unpin (retired by the party).")],
) -> None:
    """Unpin one of a party's keys (after it retired that key)."""
    from fedsilo.privacy.keys import KeysError, PartyKeys, TrustStore

    try:
        store = TrustStore.load(trust_file)
        keys = store.party(party)
        if keys.get(key_id) is None:
            pinned = ", ".join(k.key_id for k in keys.keys)
            _fail(f"key {key_id} is not pinned for {party} in {trust_file} (pinned: {pinned})")
        remaining = tuple(k for k in keys.keys if k.key_id != key_id)
        if not remaining:
            _fail(
                f"{key_id} is the only key pinned for {party}; pin its new public.json first "
                "(`fedsilo trust add`), then remove the old key"
            )
        store.add(PartyKeys(party, remaining))
        store.save(trust_file)
    except (KeysError, OSError) as exc:
        _fail(str(exc))
    console = _out()
    console.print(f"unpinned {escape(key_id)} of {escape(party)}; still pinned:")
    _key_lines(console, store.party(party))


@trust_app.command("show")
def trust_show(
    trust_file: Annotated[Path, typer.Argument(help="The trust.json to list.")],
) -> None:
    """Every pinned party with its key ids and fingerprints."""
    from fedsilo.privacy.keys import KeysError, TrustStore

    try:
        store = TrustStore.load(trust_file)
    except (KeysError, OSError) as exc:
        _fail(str(exc))
    console = _out()
    console.print(f"federation {escape(store.federation)} ({escape(str(trust_file))})")
    for name in sorted(store.parties):
        console.print(escape(name))
        _key_lines(console, store.parties[name])


# -- fedsilo provision ----------------------------------------------------------------------


def provision_command(
    federation: Annotated[
        Path, typer.Option("--federation", "-f", help="The federation.toml to provision.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="An empty folder for the kits.")],
    public_keys: Annotated[
        Path | None,
        typer.Option(
            "--public-keys",
            help="A folder of <party>.json files (from `fedsilo keys init` at each site); "
            "those parties get no private keys from here.",
        ),
    ] = None,
    tls_host: Annotated[
        list[str] | None,
        typer.Option(
            "--tls-host",
            help="A name or IP the broker is reached under (repeatable); turns on TLS: a CA, "
            "the broker's certificate and one client certificate per party.",
        ),
    ] = None,
    vhost: Annotated[
        str | None,
        typer.Option(help="The broker vhost (default: the URL's, else the federation name)."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Rewrite a non-empty --out in place, keeping its CA, keys and passwords.",
        ),
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(help="The base model every silo holds: its weights' digest goes into "
                     "federation.toml (model_digest) and the model into each silo.toml."),
    ] = None,
    dtype: Annotated[str, typer.Option(help="The silos' dtype for --model.")] = "float32",
) -> None:
    """Make one kit per party (broker definitions, keys, trust files, certificates, configs)."""
    from fedsilo.privacy.provision import import_command, provision

    try:
        result = provision(
            federation, out, public_keys=public_keys, tls_hosts=tuple(tls_host or ()),
            vhost=vhost, force=force, model=model, dtype=dtype,
        )
    except (ValueError, OSError) as exc:  # ProvisionError, KeysError, ConfigError are
        _fail(str(exc))  # ValueErrors; OSError: the disk

    console = Console(highlight=False)
    table = Table(title=f"federation {escape(result.federation)}, vhost {escape(result.vhost)}"
                  + (", TLS" if result.tls else ""))
    table.add_column("party")
    table.add_column("folder")
    table.add_column("broker user")
    table.add_column("private keys")
    for party in result.parties:
        table.add_row(
            escape(party),
            escape(str(result.out / party)) + "/",
            escape(result.usernames[party]),
            "in the kit" if party in result.generated_keys else "kept by the party",
        )
    console.print(table)
    definitions = result.out / "broker" / "definitions.json"
    steps = [f"Load the broker definitions: {import_command(definitions)}"]
    if result.tls:
        steps.append(
            f"Merge {result.out / 'broker' / 'rabbitmq.conf'} into the broker's rabbitmq.conf "
            f"and restart it; keep {result.out / 'ca'} offline."
        )
    steps.append(
        "Send each party its folder, and only its folder, over a private channel "
        "(it holds the broker password and, where made here, the private keys)."
    )
    steps.append("Each silo adds its model and [data] to silo.toml; see README.md.")
    for i, step in enumerate(steps, 1):
        console.print(f"{i}. {escape(step)}", soft_wrap=True)


__all__ = ["keys_app", "provision_command", "trust_app"]
