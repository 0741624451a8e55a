"""`fedsilo keys`, `fedsilo trust` and `fedsilo provision`: identities and kits.

Registered from cli/main.py. Heavy imports (cryptography, the federation config) happen
inside the commands so `fedsilo --help` stays fast. Nothing here prints private material:
keys are shown by id and fingerprint, passwords never.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

keys_app = typer.Typer(
    help="This party's key pairs (sign what it sends, open what is sealed to it). Rotation "
    "without an outage: `keys rotate` (a pending key: published, decrypts, does not sign), "
    "peers `trust add` the new public.json, `keys activate` (it signs from then on), "
    "`keys retire OLD`, peers `trust retire` it.",
    no_args_is_help=True,
)
trust_app = typer.Typer(
    help="The peers' pinned public keys and retired keys (a trust.json); running processes "
    "pick changes up without a restart.",
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


def _key_lines(console: Console, keys: object, retired: Iterable[Any] = ()) -> None:
    """A peer's pinned keys (the newest is the one sealed to) and its retired keys."""
    from fedsilo.privacy.keys import PartyKeys

    assert isinstance(keys, PartyKeys)
    for i, key in enumerate(keys.keys):
        state = "newest " if i == 0 else "older  "
        console.print(f"  {state}  {key.key_id}  {key.fingerprint}")
    _retired_lines(console, retired)


def _retired_lines(console: Console, retired: Iterable[Any]) -> None:
    for record in retired:
        fingerprint = record.fingerprint or "(fingerprint not recorded)"
        console.print(f"  retired  {record.key_id}  {fingerprint}  on {record.retired}")


def _keyring_lines(console: Console, keyring: object) -> None:
    """This party's keys with their state: pending (decrypts, does not sign yet), active
    (signs), older (decrypts), retired (deleted, refused)."""
    from fedsilo.privacy.keys import Keyring

    assert isinstance(keyring, Keyring)
    pending = keyring.pending
    for key in keyring.public().keys:
        if key == keyring.active:
            state = "active "
        elif pending is not None and key == pending:
            state = "pending"
        else:
            state = "older  "
        console.print(f"  {state}  {key.key_id}  {key.fingerprint}")
    _retired_lines(console, keyring.retired)


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
    _keyring_lines(console, keyring)
    console.print(
        f"Send {escape(str(dir_ / PUBLIC_FILE))} to the coordinator (it holds no secret); "
        "confirm the fingerprint with them by another channel. Keep the folder private."
    )


@keys_app.command("rotate")
def keys_rotate(dir_: DirOption) -> None:
    """Make a new pending key: published, decrypts, does not sign until `keys activate`.

    The new key is listed first in DIR/public.json (peers that pin it encrypt to it, and it
    decrypts here), but this party keeps signing with its active key until `fedsilo keys
    activate`, so no peer is sent a signature it cannot verify."""
    from fedsilo.privacy.keys import PUBLIC_FILE, Keyring, KeysError

    try:
        keyring = Keyring.load(dir_)
        old = keyring.active
        new = keyring.rotate()
    except (KeysError, OSError) as exc:
        _fail(str(exc))
    console = _out()
    party, folder = escape(keyring.party), escape(str(dir_))
    console.print(f"new pending key of {party}: {new.key_id}  {new.fingerprint}")
    _keyring_lines(console, keyring)
    console.print(
        f"{party} still signs with {old.key_id} and already opens what is sealed to "
        f"{new.key_id}. Next: 1. send {escape(str(dir_ / PUBLIC_FILE))} to every peer, which "
        "runs `fedsilo trust add trust.json public.json` (running processes pick it up); "
        f"2. once every peer has pinned it: `fedsilo keys activate --dir {folder}` ({party} "
        f"then signs with {new.key_id}; its log says which peers already seal to it); "
        f"3. then `fedsilo keys retire --dir {folder} {old.key_id}`, and every peer runs "
        f"`fedsilo trust retire trust.json {party} {old.key_id}`."
    )


@keys_app.command("activate")
def keys_activate(
    dir_: DirOption,
    key_id: Annotated[
        str | None, typer.Argument(help="The pending key id (optional: checked if given).")
    ] = None,
) -> None:
    """Sign with the pending key from now on, once every peer has pinned it.

    Run it only once every peer has pinned the new public.json (`fedsilo trust add`): a peer
    that has not would refuse what this party signs. The previous key keeps opening
    messages still sealed to it."""
    from fedsilo.privacy.keys import Keyring, KeysError

    try:
        keyring = Keyring.load(dir_)
        old = keyring.active
        new = keyring.activate(key_id)
    except (KeysError, OSError) as exc:
        _fail(str(exc))
    console = _out()
    party = escape(keyring.party)
    console.print(f"{party} now signs with {new.key_id}  {new.fingerprint}")
    _keyring_lines(console, keyring)
    console.print(
        f"Running processes pick this up with their next message. Once no message sealed to "
        f"{old.key_id} can still be in flight: `fedsilo keys retire --dir "
        f"{escape(str(dir_))} {old.key_id}`."
    )


@keys_app.command("retire")
def keys_retire(
    dir_: DirOption,
    key_id: Annotated[str, typer.Argument(help="The (non-active) key id to delete.")],
) -> None:
    """Delete a non-active key for good and record it as retired; peers then `trust retire` it.

    An older key, or the pending one to give up a rotation. Messages still sealed to it are
    refused with a reason naming it. Then every peer runs `fedsilo trust retire` so that it
    refuses the key too."""
    from fedsilo.privacy.keys import Keyring, KeysError

    try:
        keyring = Keyring.load(dir_)
        record = keyring.retire(key_id)
    except (KeysError, OSError) as exc:
        _fail(str(exc))
    console = _out()
    party = escape(keyring.party)
    console.print(f"retired key {escape(key_id)} of {party} on {record.retired}; keys now:")
    _keyring_lines(console, keyring)
    console.print(
        f"Every peer must now refuse it: `fedsilo trust retire trust.json {party} "
        f"{escape(key_id)}` (fingerprint {record.fingerprint})."
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
    _keyring_lines(console, keyring)


# -- fedsilo trust --------------------------------------------------------------------------


@trust_app.command("add")
def trust_add(
    trust_file: Annotated[Path, typer.Argument(help="The trust.json to update.")],
    public_json: Annotated[Path, typer.Argument(help="A party's public.json.")],
) -> None:
    """Pin a party's public keys (replacing what was pinned for it), e.g. after it rotated.

    This side then seals to its newest key and accepts signatures by any key pinned. Keys
    retired here (`fedsilo trust retire`) are never pinned again."""
    from fedsilo.privacy.keys import KeysError, PartyKeys, TrustStore

    try:
        store = TrustStore.load(trust_file)
        keys = PartyKeys.load(public_json)
        before = store.parties.get(keys.party)
        dropped = store.add(keys)
        store.save(trust_file)
    except (KeysError, OSError) as exc:
        _fail(str(exc))
    console = _out()
    party = escape(keys.party)
    pinned = store.party(keys.party)
    old = {k.key_id for k in before.keys} if before is not None else set()
    new = {k.key_id for k in pinned.keys}
    verb = "updated" if before is not None else "added"
    console.print(f"{verb} {party} in {escape(str(trust_file))}:")
    _key_lines(console, pinned)
    for record in dropped:
        console.print(f"not pinned again: {record.key_id} (retired here on {record.retired})")
    if before is not None and old - new - {r.key_id for r in dropped}:
        gone = sorted(old - new)
        console.print(
            "no longer pinned: " + ", ".join(gone) + "; if the party retired "
            + ("it" if len(gone) == 1 else "them")
            + f", refuse it by name: `fedsilo trust retire {escape(str(trust_file))} {party} "
            + f"{gone[0]}`"
        )
    console.print("Compare the fingerprints with the party's operator by another channel.")


@trust_app.command("remove")
def trust_remove(
    trust_file: Annotated[Path, typer.Argument(help="The trust.json to update.")],
    party: Annotated[str, typer.Argument(help="The party whose key to unpin.")],
    key_id: Annotated[str, typer.Argument(help="The key id (or fingerprint) to unpin.")],
) -> None:
    """Unpin one of a party's keys without refusing it (say, one pinned by mistake).

    For a key its party retired use `fedsilo trust retire`, which refuses it by name."""
    from fedsilo.privacy.keys import KeysError, PartyKeys, TrustStore

    try:
        store = TrustStore.load(trust_file)
        keys = store.party(party)
        match = keys.get(key_id)
        if match is None:
            pinned = ", ".join(k.key_id for k in keys.keys)
            _fail(f"key {key_id} is not pinned for {party} in {trust_file} (pinned: {pinned})")
        remaining = tuple(k for k in keys.keys if k is not match)
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


@trust_app.command("retire")
def trust_retire(
    trust_file: Annotated[Path, typer.Argument(help="The trust.json to update.")],
    party: Annotated[str, typer.Argument(help="The party that retired the key.")],
    key: Annotated[str, typer.Argument(help="The retired key's id or fingerprint.")],
) -> None:
    """Refuse a party's retired key from now on (after it ran `keys retire`).

    Unpins the key and records it (with the time) in the trust file, so running processes
    refuse what it signs, naming it, never seal to it, and `fedsilo trust add` never pins it
    again."""
    from fedsilo.privacy.keys import KeysError, TrustStore

    try:
        store = TrustStore.load(trust_file)
        already = store.retired_key(party, key)
        record = store.retire(party, key)
        if already is None:
            store.save(trust_file)
    except (KeysError, OSError) as exc:
        _fail(str(exc))
    console = _out()
    if already is not None:
        console.print(f"{escape(record.key_id)} of {escape(party)} was already retired on "
                      f"{record.retired}; nothing changed")
        return
    console.print(
        f"retired {escape(record.key_id)} of {escape(party)} in {escape(str(trust_file))}: "
        "what it signs is refused from now on, and nothing is sealed to it; pinned:"
    )
    _key_lines(console, store.party(party), store.retired.get(party, ()))


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
        _key_lines(console, store.parties[name], store.retired.get(name, ()))


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
    from fedsilo.provision.broker import import_command
    from fedsilo.provision.builders import provision

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
