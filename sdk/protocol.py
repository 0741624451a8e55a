"""Wire format of a message: a versioned JSON header plus tensors in safetensors.

    b"FSLO" | version (1 byte) | header length (4 bytes, big endian) | JSON header | safetensors

The header carries every scalar field; tensors travel in one safetensors blob (no pickle,
so decoding untrusted bytes cannot execute code), prefixed `p/` (params) or `e/`
(embeddings). Encryption and signing wrap these bytes (privacy issue).
"""

from __future__ import annotations

import json
import struct
from typing import Any

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedsilo.sdk.messages import PROTOCOL_VERSION, Announce, RoundPlan, Upload
from fedsilo.sdk.params import ModuleShape, TensorDict

MAGIC = b"FSLO"
_PREFIX = struct.Struct(">4sBI")

Message = RoundPlan | Upload | Announce


class ProtocolError(ValueError):
    """Bytes that are not a valid fedsilo message; the reason says which check failed."""


def _pack_tensors(**groups: TensorDict) -> bytes:
    flat = {
        f"{prefix}/{key}": value.detach().to("cpu").contiguous()
        for prefix, tensors in groups.items()
        for key, value in tensors.items()
    }
    return st_save(flat) if flat else b""


def _unpack_tensors(blob: bytes) -> dict[str, TensorDict]:
    groups: dict[str, TensorDict] = {"p": {}, "e": {}}
    if not blob:
        return groups
    try:
        flat = st_load(blob)
    except Exception as exc:  # safetensors raises its own error types
        raise ProtocolError(f"tensor payload is not valid safetensors: {exc}") from None
    for name, value in flat.items():
        prefix, _, key = name.partition("/")
        if prefix not in groups or not key:
            raise ProtocolError(f"unexpected tensor name {name!r} in payload")
        groups[prefix][key] = value
    return groups


def encode(message: Message) -> bytes:
    if isinstance(message, RoundPlan):
        header: dict[str, Any] = {
            "type": "plan",
            "round": message.round,
            "silo_id": message.silo_id,
            "total_rounds": message.total_rounds,
            "lr": message.lr,
            "local_steps": message.local_steps,
            "assignment": message.assignment,
            "final": message.final,
            "setup": message.setup,
        }
        blob = _pack_tensors(p=message.params)
    elif isinstance(message, Upload):
        header = {
            "type": "upload",
            "round": message.round,
            "silo_id": message.silo_id,
            "n_samples": message.n_samples,
            "metrics": message.metrics,
            "timings": message.timings,
        }
        blob = _pack_tensors(p=message.params, e=message.embeddings)
    elif isinstance(message, Announce):
        header = {
            "type": "announce",
            "silo_id": message.silo_id,
            "model": message.model,
            "linear_shapes": {
                name: [s.in_features, s.out_features] for name, s in message.linear_shapes.items()
            },
            "n_samples": message.n_samples,
            "incarnation": message.incarnation,
            "model_digest": message.model_digest,
            "metric": message.metric,
        }
        blob = b""
    else:
        raise TypeError(f"cannot encode {type(message).__name__}")
    head = json.dumps(header, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, PROTOCOL_VERSION, len(head)) + head + blob


def decode(data: bytes) -> Message:
    if len(data) < _PREFIX.size:
        raise ProtocolError(f"message too short ({len(data)} bytes)")
    magic, version, head_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError("not a fedsilo message (bad magic bytes)")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version} is not supported (this build speaks {PROTOCOL_VERSION})"
        )
    start = _PREFIX.size
    if start + head_len > len(data):
        raise ProtocolError("header length exceeds message size")
    try:
        header = json.loads(data[start : start + head_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a JSON object")
    tensors = _unpack_tensors(data[start + head_len :])
    kind = header.pop("type", None)
    try:
        if kind == "plan":
            assignment = {str(m): [int(i) for i in ids] for m, ids in header["assignment"].items()}
            return RoundPlan(
                round=int(header["round"]),
                silo_id=str(header["silo_id"]),
                total_rounds=int(header["total_rounds"]),
                lr=float(header["lr"]),
                local_steps=int(header["local_steps"]),
                assignment=assignment,
                params=tensors["p"],
                final=bool(header["final"]),
                setup=_object(header.get("setup", {}), "setup"),
            )
        if kind == "upload":
            return Upload(
                round=int(header["round"]),
                silo_id=str(header["silo_id"]),
                params=tensors["p"],
                embeddings=tensors["e"],
                n_samples=int(header["n_samples"]),
                metrics={str(k): float(v) for k, v in header["metrics"].items()},
                timings={str(k): float(v) for k, v in header["timings"].items()},
            )
        if kind == "announce":
            return Announce(
                silo_id=str(header["silo_id"]),
                model=str(header["model"]),
                linear_shapes={
                    str(name): ModuleShape(int(dims[0]), int(dims[1]))
                    for name, dims in header["linear_shapes"].items()
                },
                n_samples=int(header["n_samples"]),
                incarnation=str(header.get("incarnation", "")),
                model_digest=str(header.get("model_digest", "")),
                metric=str(header.get("metric", "")),
            )
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ProtocolError(f"malformed {kind} header: {exc!r}") from None
    raise ProtocolError(f"unknown message type {kind!r}")


def _object(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{name} must be a JSON object")
    return value


def tensor_bytes(tensors: TensorDict) -> int:
    """Raw bytes of the tensors alone: the yardstick for wire overhead."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


__all__ = ["MAGIC", "ProtocolError", "decode", "encode", "tensor_bytes"]
