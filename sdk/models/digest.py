"""A fingerprint of a backbone's weights, so the aggregator can refuse a silo whose base
model differs (another checkpoint, another seed of a built-in model, another dtype)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer's name, dtype, shape and bytes (a second or
    two for a 1B-parameter model, once per agent start)."""
    h = hashlib.sha256()
    for name, tensor in sorted({**dict(model.named_parameters()),
                                **dict(model.named_buffers())}.items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()
