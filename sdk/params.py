"""Stable names for the tensors that travel between silos and the aggregator.

Every tensor on the wire is keyed by the adapted module's dotted path in the base model
plus what it is, so both sides agree on meaning without sharing Python objects:

    {module}.shared.A          shared LoRA expert, r x d_in
    {module}.shared.B          shared LoRA expert, d_out x r
    {module}.router.W_t        token projection, r x d_in
    {module}.expert.{id}.A     domain expert `id` (global id within the module's pool)
    {module}.expert.{id}.B
    {module}.router.gate       FedLEASE's adaptive top-M router, (2M-1) x d_in
    {module}.client            client embedding h_t (eq. 23), r
    {module}.expert.{id}       expert embedding h_e (eq. 25), r
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

TensorDict = dict[str, torch.Tensor]

_EXPERT_PARAM = re.compile(r"^(?P<module>.+)\.expert\.(?P<id>\d+)\.(?P<part>[AB])$")
_EXPERT_EMB = re.compile(r"^(?P<module>.+)\.expert\.(?P<id>\d+)$")


def shared_key(module: str, part: str) -> str:
    return f"{module}.shared.{part}"


def router_key(module: str) -> str:
    return f"{module}.router.W_t"


def gate_key(module: str) -> str:
    return f"{module}.router.gate"


def expert_key(module: str, expert_id: int, part: str) -> str:
    return f"{module}.expert.{expert_id}.{part}"


def client_embedding_key(module: str) -> str:
    return f"{module}.client"


def expert_embedding_key(module: str, expert_id: int) -> str:
    return f"{module}.expert.{expert_id}"


@dataclass(frozen=True)
class ExpertParam:
    module: str
    expert_id: int
    part: str  # "A" or "B"


def parse_expert_param(key: str) -> ExpertParam | None:
    """The expert a parameter key belongs to, or None for shared / router tensors."""
    m = _EXPERT_PARAM.match(key)
    if m is None:
        return None
    return ExpertParam(m["module"], int(m["id"]), m["part"])


def parse_expert_embedding(key: str) -> tuple[str, int] | None:
    m = _EXPERT_EMB.match(key)
    if m is None:
        return None
    return m["module"], int(m["id"])


@dataclass(frozen=True)
class ModuleShape:
    """What the aggregator needs to know about an adapted layer (no weights)."""

    in_features: int
    out_features: int


def select_for_assignment(
    tensors: Mapping[str, torch.Tensor], assignment: Mapping[str, list[int]]
) -> TensorDict:
    """Shared + router tensors of every module, and the experts `assignment` names."""
    out: TensorDict = {}
    for key, value in tensors.items():
        expert = parse_expert_param(key)
        if expert is None or expert.expert_id in assignment.get(expert.module, ()):
            out[key] = value
    return out
