"""Server-side outer optimizer for FDLoRA's shared adapter: SGD on the averaged pseudo-gradient.

Why an outer optimizer rather than plain FedAvg: FDLoRA treats `params - average` (how far the
silos moved the shared adapter this round, averaged) as a gradient and applies Nesterov
momentum to it across rounds, which speeds up and smooths the global adapter's progress.
With momentum 0 and lr 1 the step lands exactly on `average`, i.e. FedAvg.

The update follows `torch.optim.SGD` (dampening 0, weight decay 0) step for step, so results
can be compared against PyTorch; it is written out here instead of wrapping `torch.optim.SGD`
because the aggregator holds plain named tensors (no `nn.Parameter`s, no `.grad`) and must
checkpoint the momentum buffers with JSON metadata (fedsilo.sdk.checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["OuterSGD"]


def _key_mismatch(params: Mapping[str, Tensor], average: Mapping[str, Tensor]) -> str | None:
    """A message naming the keys present on one side only, or None when the key sets match."""
    missing = sorted(set(params) - set(average))
    extra = sorted(set(average) - set(params))
    if not missing and not extra:
        return None
    parts = []
    if missing:
        parts.append(f"missing from average: {missing}")
    if extra:
        parts.append(f"not in params: {extra}")
    return "; ".join(parts)


class OuterSGD:
    """SGD with (Nesterov) momentum applied to the pseudo-gradient `params - average`.

    Per key, exactly as `torch.optim.SGD(lr, momentum, nesterov, dampening=0)`:
    ``g = params - average``; ``buf = g`` on that key's first step, else
    ``buf = momentum * buf + g``; ``d = g + momentum * buf`` if nesterov else ``buf``;
    ``new = params - lr * d``. With momentum 0 no buffer is kept and ``d = g``.

    Arithmetic and buffers are float64 (why: the global adapter is updated hundreds of times
    and buffers must not drift with bf16/fp16 rounding); results come back in each param's
    dtype and device. Inputs are never modified.
    """

    def __init__(self, lr: float = 1.0, momentum: float = 0.5, nesterov: bool = True) -> None:
        lr = float(lr)
        momentum = float(momentum)
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"outer lr must be a finite number > 0, got {lr}")
        if not (math.isfinite(momentum) and 0.0 <= momentum < 1.0):
            raise ValueError(f"outer momentum must satisfy 0 <= momentum < 1, got {momentum}")
        if not isinstance(nesterov, bool):
            raise ValueError(f"nesterov must be True or False, got {nesterov!r}")
        if nesterov and momentum == 0.0:
            raise ValueError(
                "Nesterov momentum needs momentum > 0: set momentum > 0 or nesterov=False"
            )
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.steps = 0
        self._buffers: dict[str, Tensor] = {}

    def _settings(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov}

    def step(
        self, params: Mapping[str, Tensor], average: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """The new global params after one outer step; updates the momentum buffers.

        Everything is validated before any buffer changes, so a bad call leaves the state as
        it was (an aggregator can report the error and keep its checkpointable state).
        """
        mismatch = _key_mismatch(params, average)
        if mismatch is not None:
            raise ValueError(f"params and average must have the same keys ({mismatch})")
        for key, value in params.items():
            other = average[key]
            for name, tensor in (("params", value), ("average", other)):
                if not isinstance(tensor, Tensor):
                    raise TypeError(
                        f"{name}[{key!r}]: expected a torch.Tensor, got {type(tensor).__name__}"
                    )
                if not tensor.is_floating_point():
                    raise TypeError(f"{name}[{key!r}]: expected a float tensor, got {tensor.dtype}")
            if value.shape != other.shape:
                raise ValueError(
                    f"shape mismatch for {key!r}: params {tuple(value.shape)}, "
                    f"average {tuple(other.shape)}"
                )
            held = self._buffers.get(key)
            if held is not None and held.shape != value.shape:
                raise ValueError(
                    f"shape mismatch for {key!r}: params {tuple(value.shape)}, momentum buffer "
                    f"{tuple(held.shape)} from earlier steps"
                )

        new_buffers: dict[str, Tensor] = {}
        out: dict[str, Tensor] = {}
        for key, value in params.items():
            p = value.detach().to(dtype=torch.float64)
            a = average[key].detach().to(device=p.device, dtype=torch.float64)
            g = p - a  # fresh tensor: the inputs are never written to
            if self.momentum == 0.0:
                d = g
            else:
                held = self._buffers.get(key)
                if held is None:
                    buf = g.clone()
                else:
                    # Same op order as torch.optim.SGD: buf.mul_(momentum).add_(g).
                    buf = held.to(device=p.device).mul(self.momentum).add_(g)
                new_buffers[key] = buf
                d = g.add(buf, alpha=self.momentum) if self.nesterov else buf
            out[key] = p.add(d, alpha=-self.lr).to(dtype=value.dtype)
        self._buffers.update(new_buffers)
        self.steps += 1
        return out

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """`(momentum buffers, JSON-able meta)`: what `load_state_dict` needs to resume exactly.

        Buffers are float64 copies, so later steps do not change what was returned.
        """
        keys = sorted(self._buffers)
        tensors = {key: self._buffers[key].detach().clone() for key in keys}
        meta: dict[str, Any] = {**self._settings(), "steps": self.steps, "keys": keys}
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore the state `state_dict` returned; refuse state written under other settings.

        Why refuse: continuing momentum built with another lr/momentum/nesterov would silently
        mix two runs' dynamics.
        """
        changed = [
            f"{name}: {meta.get(name, '<absent>')!r} in state, {mine!r} here"
            for name, mine in self._settings().items()
            if meta.get(name) != mine
        ]
        if changed:
            raise ValueError(
                "outer optimizer state was written with other settings ("
                + "; ".join(changed)
                + "): resume with that run's settings, or start afresh"
            )
        keys = meta.get("keys")
        steps = meta.get("steps")
        if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
            raise ValueError(f"outer optimizer meta 'keys' must be a list of names, got {keys!r}")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"outer optimizer meta 'steps' must be an int >= 0, got {steps!r}")
        if set(tensors) != set(keys):
            missing = sorted(set(keys) - set(tensors))
            extra = sorted(set(tensors) - set(keys))
            raise ValueError(
                f"outer optimizer buffers do not match meta 'keys' (missing: {missing}; "
                f"unexpected: {extra})"
            )
        if self.momentum == 0.0 and keys:
            raise ValueError("outer optimizer without momentum cannot load momentum buffers")
        buffers: dict[str, Tensor] = {}
        for key in keys:
            value = tensors[key]
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise ValueError(f"outer optimizer buffer {key!r} must be a float tensor")
            buffers[key] = value.detach().to(dtype=torch.float64, copy=True)
        self._buffers = buffers
        self.steps = steps
