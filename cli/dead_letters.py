"""`fedsilo dead-letters`: what the broker keeps of refused messages, and why each was refused.

The broker's record (queue, time, size, the validated sender) is joined by message id with
the aggregator's own (status.json `refusals`: the reason and detail), and an envelope's
clear header names its type, claimed sender and round, unverified: for an operator's eyes.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedsilo.privacy.envelope import EnvelopeError, peek_header
from fedsilo.sdk.transport.amqp import DeadLetter


def describe_all(letters: Sequence[DeadLetter],
                 refusals: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows for `letters` (oldest first), each matched with the aggregator's refusal of the
    same message id in the same order (a replayed copy shares its original's id)."""
    by_id: dict[str, deque[Mapping[str, Any]]] = defaultdict(deque)
    for refusal in refusals:
        if refusal.get("message_id"):
            by_id[refusal["message_id"]].append(refusal)
    rows = []
    for letter in letters:
        pending = by_id.get(letter.message_id)
        rows.append(describe(letter, pending.popleft() if pending else {}))
    return rows


def describe(letter: DeadLetter, refusal: Mapping[str, Any]) -> dict[str, Any]:
    """One row: the broker's facts, the envelope's claims, the aggregator's reason."""
    claims: dict[str, Any] = {}
    if not letter.chunk or letter.chunk.startswith("1/"):  # where an envelope begins
        try:
            header = peek_header(letter.head)
            claims = {"type": header.type, "claimed_sender": header.sender,
                      "round": header.round}
        except (EnvelopeError, ValueError):
            claims = {}
    return {
        "message_id": letter.message_id, "queue": letter.queue, "died_at": letter.died_at,
        "size": letter.size, "broker_user": letter.sender, "chunk": letter.chunk, **claims,
        "reason": refusal.get("reason"), "detail": refusal.get("detail"),
    }


def render_dead_letters(console: Console, rows: Sequence[Mapping[str, Any]]) -> None:
    if not rows:
        console.print("the dead-letter queue is empty")
        return
    table = Table(title=f"{len(rows)} dead letter(s), oldest first")
    for column in ("when", "queue", "broker user", "type / sender / round", "size",
                   "reason"):
        table.add_column(column)
    for row in rows:
        when = ("?" if row["died_at"] is None
                else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["died_at"])))
        claims = (f"{row.get('type', '?')} / {row.get('claimed_sender', '?')} / "
                  f"{row.get('round', '?')}" if "type" in row else "(no readable header)")
        if row["chunk"]:
            claims += f" (chunk {row['chunk']})"
        reason = (f"{row['reason']}: {row['detail']}" if row["reason"]
                  else "not recorded (refused by a silo, or before the aggregator restarted)")
        table.add_row(when, escape(row["queue"]), escape(row["broker_user"] or "?"),
                      escape(claims), str(row["size"]), escape(reason))
    console.print(table)
