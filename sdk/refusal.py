"""Why a message was refused, as one exception type for every layer that refuses.

The transport's chunk reassembly (`ChunkError`), its codec (`Rejected`), the envelope
(`EnvelopeError`) and the tensor checks (`InvalidTensors`) each refuse messages for their
own reasons; all of them end up as a dead-lettered message counted under `reason`, so they
share this base and whoever counts refusals reads the same two fields.
"""

from __future__ import annotations


class Refusal(Exception):
    """`reason` is short and stable (a counter's name); `detail` says what exactly was
    wrong. str() is "reason: detail"."""

    reason: str
    detail: str

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)  # args round-trip through pickle
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"
