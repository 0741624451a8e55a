"""Server strategy state: a run checkpointed and resumed after every step, or fed its uploads
in another order, ends exactly like an uninterrupted one; silos may join late or miss a round.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsilo.sdk.aggregation.rsea import InfeasibleAssignmentError
from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedsilo.sdk.messages import Upload
from fedsilo.sdk.params import (
    ModuleShape,
    TensorDict,
    client_embedding_key,
    expert_embedding_key,
    expert_key,
)
from fedsilo.sdk.strategies import ServerStrategy, SiloPlan, get_strategy
from fedsilo.sdk.strategies.config import SPEED_ONLY, config_from_values, flat_knobs
from fedsilo.sdk.strategies.fedamole import FedAMoLEServer

SHAPES = {"l0.q": ModuleShape(6, 6), "l0.v": ModuleShape(6, 4)}
R = 2
# Round 1: "d" joins late. Round 2: "c" misses the deadline (no upload).
ROSTER = [["a", "b", "c"], ["a", "b", "c", "d"], ["a", "b", "c", "d"]]
MISSING = [set(), set(), {"c"}]

CASES = [
    ("fedamole", {}),
    ("fedamole", {"assignment": "random", "solver": "flow"}),  # draws from the rng every round
    ("fedamole", {"assignment": "static", "weighting": "samples"}),
    ("fedit", {}),
    ("fedit-ft", {"weighting": "samples"}),
]
IDS = ["fedamole-rsea", "fedamole-random", "fedamole-static", "fedit", "fedit-ft"]

Factory = Callable[[], ServerStrategy]


def factory(name: str, **kw: object) -> Factory:
    spec = get_strategy(name)
    adapter = spec.adapter(AMoLEConfig(r=R, alpha=4, top_k=2))
    settings = {"name": name, "num_experts": 4, "k_c": 2, "b": 3, **kw}
    config = config_from_values(settings)
    return lambda: spec.server(adapter, config, 0)


def make_upload(server_round: int, silo: str, plan: SiloPlan) -> Upload:
    """Trained tensors = plan + noise whose magnitude differs by silo (so float sums would
    depend on the order), and random embeddings for the experts the silo holds."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{server_round}/{silo}".encode()))
    scale = 10.0 ** (ord(silo) % 4 - 1)
    params = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in plan.params.items()}
    embeddings: TensorDict = {}
    for module, ids in plan.assignment.items():
        embeddings[client_embedding_key(module)] = torch.randn(R, generator=gen)
        for j in ids:
            embeddings[expert_embedding_key(module, j)] = torch.randn(R, generator=gen)
    return Upload(server_round, silo, params, embeddings, n_samples=3 + ord(silo) % 5)


def resume(server: ServerStrategy, make: Factory, path: Path) -> ServerStrategy:
    """What a SIGKILLed aggregator does on restart: a fresh instance, state from disk."""
    save_checkpoint(path, *server.state_dict())
    fresh = make()
    fresh.load_state_dict(*load_checkpoint(path))
    return fresh


Run = tuple[ServerStrategy, list[dict[str, SiloPlan]]]


def run(
    make: Factory,
    checkpoint: Path | None = None,
    order: Callable[[Sequence[str]], list[str]] = list,
) -> Run:
    def step(server: ServerStrategy) -> ServerStrategy:
        return server if checkpoint is None else resume(server, make, checkpoint)

    server = make()
    server.initialize(SHAPES, ROSTER[0])
    server = step(server)
    history = []
    for rnd, silos in enumerate(ROSTER):
        plans = server.configure_round(rnd, silos)
        history.append(plans)
        server = step(server)
        server.begin_round(rnd)
        server = step(server)
        for silo in order(silos):
            if silo not in MISSING[rnd]:
                server.accumulate(make_upload(rnd, silo, plans[silo]))
                server = step(server)
        report = server.end_round(rnd)
        assert report.num_uploads == len(silos) - len(MISSING[rnd])
        server = step(server)
    return server, history


def assert_equal_dicts(a: TensorDict, b: TensorDict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def assert_same_run(a: Run, b: Run) -> None:
    assert_equal_dicts(a[0].global_params, b[0].global_params)
    assert len(a[1]) == len(b[1])
    for plans_a, plans_b in zip(a[1], b[1], strict=True):
        assert list(plans_a) == list(plans_b)
        for silo in plans_a:
            assert plans_a[silo].assignment == plans_b[silo].assignment
            assert_equal_dicts(plans_a[silo].params, plans_b[silo].params)
    if isinstance(a[0], FedAMoLEServer):
        assert isinstance(b[0], FedAMoLEServer)
        assert a[0].silo_ids == b[0].silo_ids
        for module in SHAPES:  # the assignment for the round after the last one
            assert np.array_equal(a[0].assignment[module], b[0].assignment[module])


@pytest.mark.parametrize(("name", "kw"), CASES, ids=IDS)
def test_resumed_after_every_step_equals_uninterrupted(
    name: str, kw: dict, tmp_path: Path
) -> None:
    make = factory(name, **kw)
    uninterrupted = run(make)
    resumed = run(make, checkpoint=tmp_path / "agg" / "state.safetensors")
    assert_same_run(uninterrupted, resumed)
    # Nothing hidden was lost either: the whole state (rng, embeddings, counters) agrees.
    tensors_a, meta_a = uninterrupted[0].state_dict()
    tensors_b, meta_b = resumed[0].state_dict()
    assert json.loads(json.dumps(meta_a)) == json.loads(json.dumps(meta_b))
    assert_equal_dicts(tensors_a, tensors_b)


@pytest.mark.parametrize(("name", "kw"), CASES, ids=IDS)
def test_upload_order_does_not_matter(name: str, kw: dict) -> None:
    make = factory(name, **kw)
    forward = run(make)
    assert_same_run(forward, run(make, order=lambda silos: list(reversed(silos))))
    assert_same_run(forward, run(make, order=lambda silos: sorted(silos, key=lambda s: s in "bd")))


def check_valid(server: FedAMoLEServer, silos: Sequence[str]) -> None:
    """Every expert goes to k_c silos, every silo holds k_e..b experts, the plans agree."""
    c = server.constraints
    plans = server.configure_round(1, silos)
    assert sorted(plans) == sorted(silos) == sorted(server.silo_ids)
    for d in server.assignment.values():
        assert d.shape == (len(silos), c.num_experts)
        assert (d.sum(axis=0) == c.k_c).all()
        assert ((d.sum(axis=1) >= c.k_e) & (d.sum(axis=1) <= c.b)).all()
    for silo, plan in plans.items():
        assert plan.assignment == server.silo_assignment(silo)
        for module, ids in plan.assignment.items():
            assert c.k_e <= len(ids) <= c.b
            sent = {k for k in plan.params if k.startswith(f"{module}.expert.")}
            assert sent == {expert_key(module, j, p) for j in ids for p in "AB"}


def fedamole(**kw: object) -> FedAMoLEServer:
    server = factory("fedamole", **kw)()
    assert isinstance(server, FedAMoLEServer)
    server.initialize(SHAPES, ROSTER[0])
    return server


def aggregate(server: FedAMoLEServer, rnd: int, silos: Sequence[str], skip: set[str]) -> None:
    plans = server.configure_round(rnd, silos)
    server.begin_round(rnd)
    for silo in silos:
        if silo not in skip:
            server.accumulate(make_upload(rnd, silo, plans[silo]))
    server.end_round(rnd)


def test_late_joiner_gets_a_valid_assignment_from_rsea() -> None:
    server = fedamole()
    aggregate(server, 0, ["a", "b", "c"], set())
    check_valid(server, ["a", "b", "c", "d"])  # "d" has no embedding yet: zeros
    aggregate(server, 1, ["a", "b", "c", "d"], set())
    check_valid(server, ["a", "b", "c", "d"])


def test_late_joiner_before_any_aggregation_gets_a_random_feasible_assignment() -> None:
    server = fedamole()
    check_valid(server, ["a", "b", "c", "d"])
    same = fedamole()  # deterministic: the draw comes from the seeded, checkpointed rng
    same.configure_round(0, ["a", "b", "c", "d"])
    assert all(np.array_equal(server.assignment[m], same.assignment[m]) for m in SHAPES)


def test_silo_leaving_and_impossible_membership() -> None:
    server = fedamole(b=4)  # two silos must be able to hold all 4*2 expert slots
    aggregate(server, 0, ["a", "b", "c"], set())
    check_valid(server, ["b", "c"])
    before = {m: d.copy() for m, d in server.assignment.items()}
    with pytest.raises(InfeasibleAssignmentError, match="k_c <= C"):
        server.configure_round(2, ["b"])  # an expert needs k_c = 2 silos
    assert server.silo_ids == ["b", "c"]  # a refused change leaves the state as it was
    assert all(np.array_equal(before[m], server.assignment[m]) for m in SHAPES)
    with pytest.raises(ValueError, match="unique"):
        server.configure_round(2, ["b", "b", "c"])


def test_round_with_a_missing_upload_still_aggregates() -> None:
    server = fedamole(min_contributors=1)  # experts c co-trained move with one trainer
    aggregate(server, 0, ["a", "b", "c"], set())
    kept_embedding = dict(server.client_embeddings["c"])
    plans = server.configure_round(1, ["a", "b", "c"])
    before = dict(server.global_params)
    server.begin_round(1)
    for silo in ["a", "b"]:
        server.accumulate(make_upload(1, silo, plans[silo]))
    assert server.end_round(1).num_uploads == 2
    trained = {k for silo in ["a", "b"] for k in plans[silo].params}
    for key, value in server.global_params.items():
        assert (key in trained) != (value is before[key])  # untrained experts keep theirs
    assert server.client_embeddings["c"] == kept_embedding  # "c" keeps its last embedding
    check_valid(server, ["a", "b", "c"])  # and still gets experts next round


@pytest.mark.parametrize(
    ("name", "other"),
    [("fedamole", factory("fedamole", k_c=1)), ("fedit", factory("fedit-ft")),
     ("fedamole", factory("fedit"))],
)
def test_state_from_other_settings_is_refused(name: str, other: Factory) -> None:
    server = factory(name)()
    server.initialize(SHAPES, ROSTER[0])
    with pytest.raises(CheckpointError, match="other strategy settings"):
        other().load_state_dict(*server.state_dict())


@pytest.mark.parametrize("name", ["fedamole", "fedlease", "fedit", "fdlora", "local"])
def test_state_of_an_earlier_version_resumes_unless_the_strategys_own_knobs_differ(
    name: str,
) -> None:
    """Checkpoints written before each strategy had its own config record every strategy's
    knobs; the others are not compared, this strategy's still are."""
    server = factory(name)()
    server.initialize(SHAPES, ROSTER[0])
    tensors, meta = server.state_dict()
    meta = json.loads(json.dumps(meta))  # as a checkpoint holds it
    config = server.config  # type: ignore[attr-defined]
    flat = {k: v for k, v in flat_knobs(config).items() if k not in SPEED_ONLY}
    legacy = {**meta, "settings": {**meta["settings"], "config": flat}}
    assert legacy["settings"]["config"] != meta["settings"]["config"]
    resumed = factory(name)()
    resumed.load_state_dict(tensors, legacy)
    assert_equal_dicts(resumed.global_params, server.global_params)
    changed = {**legacy, "settings": {**legacy["settings"], "config": {
        **legacy["settings"]["config"], "min_contributors": 1}}}
    with pytest.raises(CheckpointError, match=r"'min_contributors': 1.* -> .*'min_cont"):
        factory(name)().load_state_dict(tensors, changed)
