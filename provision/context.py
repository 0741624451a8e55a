"""What provisioning's builders share: the inputs, read and checked once, and what each
builder makes for the ones after it (the parties' public keys, the TLS server name). No
secret is kept here: the broker passwords live only inside the broker-accounts builder and
in the kit's `broker.password` files."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsilo.aggregator.config import FederationConfig
from fedsilo.privacy.keys import PartyKeys
from fedsilo.sdk.transport.amqp_topology import AGGREGATOR

__all__ = [
    "RESERVED_NAMES",
    "Builder",
    "ProvisionContext",
    "ProvisionError",
    "ProvisionResult",
    "check_silos",
]

#: Kit folders beside the party folders: a silo may not be called like one of them.
RESERVED_NAMES = frozenset({AGGREGATOR, "broker", "ca"})


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


def check_silos(silos: Sequence[str]) -> None:
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


@dataclass
class ProvisionContext:
    """One provisioning run. The inputs are set by `provision` before any builder runs;
    `public`, `generated` and `server_name` are filled by the builders that make them."""

    config_path: Path
    out: Path
    cfg: FederationConfig
    raw: Mapping[str, Any]  # the federation.toml as written (the kit's configs copy it)
    vhost: str
    tls_hosts: tuple[str, ...]  # non-empty: TLS
    given: Mapping[str, PartyKeys]  # parties that sent their public keys
    force: bool
    model: str | None
    dtype: str
    digest: str  # the base model's weights digest ("": none)
    users: Mapping[str, str]  # party -> broker user
    urls_by_party: Mapping[str, tuple[str, ...]]  # party -> password-free broker URLs
    public: dict[str, PartyKeys] = field(default_factory=dict)  # party -> public keys
    generated: list[str] = field(default_factory=list)  # parties whose keys were made here
    server_name: str | None = None  # the TLS name to check, when no URL host is in the cert

    @property
    def silos(self) -> tuple[str, ...]:
        return tuple(self.cfg.silos)

    @property
    def parties(self) -> tuple[str, ...]:
        return (AGGREGATOR, *self.silos)

    @property
    def tls(self) -> bool:
        return bool(self.tls_hosts)

    def result(self) -> ProvisionResult:
        return ProvisionResult(
            out=self.out,
            federation=self.cfg.name,
            vhost=self.vhost,
            parties=self.parties,
            usernames=dict(self.users),
            urls=self.urls_by_party[AGGREGATOR],
            tls=self.tls,
            generated_keys=tuple(self.generated),
            external_keys=tuple(p for p in self.parties if p in self.given),
        )


#: One concern of the kit (keys, certificates, a config...): reads the context, writes
#: its files under `out`, records what later builders need.
Builder = Callable[[ProvisionContext], None]
