"""Split a payload into numbered chunks and put it back together with bounded memory.

Pure (no broker): the AMQP transport carries `ChunkHeader.to_headers()` as message headers
and the chunk bytes as the body. Every chunk names its message, its position, how many
chunks there are, the payload's total size and the SHA-256 of the whole payload, so a
receiver can check consistency chunk by chunk and the integrity of the result.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedsilo.sdk.refusal import Refusal

#: Header names used on the wire (AMQP message headers).
HEADER_KEYS = {
    "message_id": "fedsilo-chunk-id",
    "index": "fedsilo-chunk-index",
    "count": "fedsilo-chunk-count",
    "total_size": "fedsilo-chunk-total",
    "sha256": "fedsilo-chunk-sha256",
}


class ChunkError(Refusal, ValueError):
    """An inconsistent or corrupt chunk. `dropped` says whether the receiver discarded the
    whole pending set of `message_id`."""

    def __init__(
        self, reason: str, detail: str, message_id: str = "", dropped: bool = False
    ) -> None:
        super().__init__(reason, detail)
        self.message_id = message_id
        self.dropped = dropped


@dataclass(frozen=True)
class ChunkHeader:
    message_id: str
    index: int
    count: int
    total_size: int
    sha256: str

    def to_headers(self) -> dict[str, Any]:
        return {wire: getattr(self, attr) for attr, wire in HEADER_KEYS.items()}

    @classmethod
    def from_headers(cls, headers: Mapping[str, Any] | None) -> ChunkHeader | None:
        """The chunk header in `headers`, None if the message is not a chunk at all."""
        if not headers or HEADER_KEYS["message_id"] not in headers:
            return None
        try:
            values = {attr: headers[wire] for attr, wire in HEADER_KEYS.items()}
        except KeyError as exc:
            raise ChunkError("bad header", f"missing {exc.args[0]}") from None
        for attr in ("message_id", "sha256"):
            if isinstance(values[attr], bytes):
                values[attr] = values[attr].decode("utf-8", "replace")
            if not isinstance(values[attr], str) or not values[attr]:
                raise ChunkError("bad header", f"{attr} must be a non-empty string")
        for attr in ("index", "count", "total_size"):
            if isinstance(values[attr], bool) or not isinstance(values[attr], int):
                raise ChunkError("bad header", f"{attr} must be an integer")
        return cls(**values)


@dataclass(frozen=True)
class Chunk:
    header: ChunkHeader
    data: bytes


def split(payload: bytes, message_id: str, chunk_size: int) -> list[Chunk]:
    """`payload` as ceil(len / chunk_size) chunks (one empty chunk for an empty payload)."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    digest = hashlib.sha256(payload).hexdigest()
    count = max(1, -(-len(payload) // chunk_size))
    view = memoryview(payload)
    return [
        Chunk(
            ChunkHeader(message_id, i, count, len(payload), digest),
            bytes(view[i * chunk_size : (i + 1) * chunk_size]),
        )
        for i in range(count)
    ]


@dataclass
class _Pending:
    first: ChunkHeader
    parts: dict[int, bytes] = field(default_factory=dict)
    size: int = 0
    last_seen: float = 0.0


class Reassembler:
    """Collects chunks of many messages at once, in any order, duplicates ignored.

    Memory is bounded per sender: the bytes held for one sender's incomplete messages never
    exceed `max_pending_bytes` (a chunk that would exceed it raises
    ChunkError("pending bytes cap") and is not stored), so one sender filling its share
    never costs another sender an upload. Sets are keyed by (sender, message id): a chunk
    from another sender never joins or breaks a set. `sender` is what the broker vouches
    for (the AMQP user id it validated), "" when unknown. A set that received no new chunk
    for `timeout_s` is dropped by `expire()`; a duplicate chunk does not keep it alive.
    Not thread-safe."""

    def __init__(
        self,
        max_pending_bytes: int,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_pending_bytes = max_pending_bytes
        self.timeout_s = timeout_s
        self._clock = clock
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._by_sender: dict[str, int] = {}
        self.pending_bytes = 0

    def progress(self) -> dict[str, tuple[int, int]]:
        """message id -> (chunks received, chunks expected), for incomplete messages."""
        return {mid: (len(p.parts), p.first.count) for (_, mid), p in self._pending.items()}

    def received(self, message_id: str, sender: str = "") -> tuple[int, int] | None:
        """(chunks, bytes) held so far for the incomplete message `message_id`, else None."""
        pending = self._pending.get((sender, message_id))
        return None if pending is None else (len(pending.parts), pending.size)

    def sender_bytes(self, sender: str = "") -> int:
        return self._by_sender.get(sender, 0)

    def discard(self, message_id: str, sender: str = "") -> None:
        pending = self._pending.pop((sender, message_id), None)
        if pending is not None:
            self.pending_bytes -= pending.size
            self._by_sender[sender] -= pending.size
            if not self._by_sender[sender]:
                del self._by_sender[sender]

    def add(self, chunk: Chunk, sender: str = "") -> bytes | None:
        """The whole payload once `chunk` completes it (hash checked), else None."""
        h = chunk.header
        mid = h.message_id
        if h.count < 1 or h.total_size < 0:
            raise ChunkError("bad header", f"count={h.count} total_size={h.total_size}", mid)
        if not 0 <= h.index < h.count:
            raise ChunkError("index out of range", f"{h.index} not in [0, {h.count})", mid)
        if len(chunk.data) > h.total_size:
            raise ChunkError("chunk larger than total", f"{len(chunk.data)} > {h.total_size}", mid)
        key = (sender, mid)
        pending = self._pending.get(key)
        if pending is not None:
            first = pending.first
            for attr in ("count", "total_size", "sha256"):
                if getattr(h, attr) != getattr(first, attr):
                    raise ChunkError(
                        f"{attr} mismatch",
                        f"{getattr(h, attr)!r} != {getattr(first, attr)!r} for message {mid}",
                        mid,
                    )
            known = pending.parts.get(h.index)
            if known is not None:
                if known != chunk.data:
                    raise ChunkError("conflicting duplicate", f"chunk {h.index} of {mid}", mid)
                return None  # a duplicate adds nothing and keeps nothing alive
        if h.count == 1:
            return self._finish(mid, h, [chunk.data])
        if self.sender_bytes(sender) + len(chunk.data) > self.max_pending_bytes:
            raise ChunkError(
                "pending bytes cap",
                f"{self.sender_bytes(sender)} + {len(chunk.data)} > {self.max_pending_bytes} "
                f"held for sender {sender or '(unknown)'}",
                mid,
            )
        if pending is None:
            pending = self._pending[key] = _Pending(first=h)
        pending.parts[h.index] = chunk.data
        pending.size += len(chunk.data)
        pending.last_seen = self._clock()
        self.pending_bytes += len(chunk.data)
        self._by_sender[sender] = self.sender_bytes(sender) + len(chunk.data)
        if len(pending.parts) < h.count:
            return None
        self.discard(mid, sender)
        return self._finish(mid, h, [pending.parts[i] for i in range(h.count)])

    def _finish(self, mid: str, h: ChunkHeader, parts: list[bytes]) -> bytes:
        payload = b"".join(parts)
        if len(payload) != h.total_size:
            raise ChunkError(
                "size mismatch", f"{len(payload)} != {h.total_size} for {mid}", mid, dropped=True
            )
        if hashlib.sha256(payload).hexdigest() != h.sha256:
            raise ChunkError("sha256 mismatch", f"payload of {mid}", mid, dropped=True)
        return payload

    def expire(self) -> list[tuple[str, str]]:
        """Drop incomplete sets without a new chunk for longer than timeout_s; their
        (sender, message id) keys."""
        now = self._clock()
        old = [key for key, p in self._pending.items() if now - p.last_seen > self.timeout_s]
        for sender, mid in old:
            self.discard(mid, sender)
        return old


__all__ = ["HEADER_KEYS", "Chunk", "ChunkError", "ChunkHeader", "Reassembler", "split"]
