"""The broker's part of a kit: one user per party, least-privilege permissions and the
federation's topology as one RabbitMQ definitions document (`rabbitmqctl
import_definitions`), and the password-free broker URL each party's config holds.

The topology is declared in the document EXACTLY as `AmqpTransport` declares it (same
flags, same queue arguments), or the aggregator's idempotent redeclare would fail with
PRECONDITION_FAILED; a silo may not declare anything itself. The definitions hold salted
hashes, never a password.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from fedsilo.provision.context import ProvisionError, check_silos
from fedsilo.sdk.transport.amqp_topology import (
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
    "aggregator_resources",
    "broker_definitions",
    "hash_password",
    "import_command",
    "party_url",
    "username",
    "vhost_of",
]

HASHING_ALGORITHM = "rabbit_password_hashing_sha256"


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
    # Mirrors AmqpTopology._declare_queue: a mismatch in any argument is a
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
    permissions and the topology `AmqpTopology.declare` declares.

    Silos may configure only their own lock queue (an exclusive queue: one live agent per
    silo), write only to the uploads exchange and read only their own plans queue; the
    aggregator may configure, write and read the federation's exchanges
    and queues and nothing else. `quorum=False` for brokers without quorum queues (the
    transport then falls back to classic durable queues the same way). A policy bounds the
    dead-letter queue (`dead_letter_max` messages, oldest dropped first; each kept
    `dead_letter_ttl_h` hours): a policy, not queue arguments, so it also applies to a
    queue that already exists and can be changed without redeclaring it."""
    check_silos(silos)
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


def vhost_of(url: str) -> str | None:
    """The vhost a broker URL names, None for the default one ("" or "/")."""
    path = urlsplit(url).path
    vhost = unquote(path[1:]) if path.startswith("/") else unquote(path)
    return vhost if vhost not in ("", "/") else None


def party_url(url: str, user: str, vhost: str, tls: bool) -> str:
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
