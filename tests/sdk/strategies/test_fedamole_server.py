import numpy as np
import pytest
import torch

from fedsilo.sdk.aggregation.rsea import InfeasibleAssignmentError
from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.messages import Upload
from fedsilo.sdk.params import ModuleShape, expert_key, shared_key
from fedsilo.sdk.strategies import StrategyConfig, get_strategy
from fedsilo.sdk.strategies.fedamole import FedAMoLEServer

SHAPES = {"l0.q": ModuleShape(6, 6), "l0.v": ModuleShape(6, 4)}
SILOS = ["a", "b", "c"]


def _server(top_k: int = 1, **kw: object) -> FedAMoLEServer:
    config = StrategyConfig(**{"num_experts": 3, "k_c": 1, "b": 1, **kw})  # type: ignore[arg-type]
    server = FedAMoLEServer(AMoLEConfig(r=2, alpha=4, top_k=top_k), config, seed=0)
    server.initialize(SHAPES, SILOS)
    return server


def _check_feasible(server: FedAMoLEServer) -> None:
    c = server.constraints
    for d in server.assignment.values():
        assert (d.sum(axis=0) == c.k_c).all()
        assert ((d.sum(axis=1) >= c.k_e) & (d.sum(axis=1) <= c.b)).all()


def test_round0_is_feasible_and_plans_carry_only_assigned_experts() -> None:
    server = _server()
    _check_feasible(server)
    plans = server.configure_round(0, SILOS)
    for silo, plan in plans.items():
        for module, ids in plan.assignment.items():
            assert len(ids) == 1
            sent = {k for k in plan.params if k.startswith(f"{module}.expert.")}
            assert sent == {expert_key(module, ids[0], p) for p in "AB"}
            assert shared_key(module, "A") in plan.params
            assert f"{module}.router.W_t" in plan.params
        assert silo in SILOS


def test_infeasible_settings_are_explained_before_any_work() -> None:
    config = StrategyConfig(num_experts=2, k_c=1, b=1)
    server = FedAMoLEServer(AMoLEConfig(r=2, top_k=1), config, seed=0)
    with pytest.raises(InfeasibleAssignmentError, match="k_e"):
        server.validate(3)  # C*k_e = 3 > E*k_c = 2


def _upload(server: FedAMoLEServer, silo: str, value: float, emb: dict) -> Upload:
    # configure_round with a subset would be a membership change: plan the whole roster
    plan = server.configure_round(0, server.silo_ids)[silo]
    params = {k: torch.full_like(v, value) for k, v in plan.params.items()}
    return Upload(0, silo, params, emb, n_samples=10)


def test_per_expert_fedavg_and_untrained_experts_keep_their_value() -> None:
    server = _server()
    before = {k: v.clone() for k, v in server.global_params.items()}
    server.begin_round(0)
    uploads = [_upload(server, s, float(i + 1), {}) for i, s in enumerate(["a", "b"])]
    for upload in uploads:
        server.accumulate(upload)
    report = server.end_round(0)
    assert report.num_uploads == 2
    after = server.global_params
    for module in SHAPES:
        # shared expert: mean over the silos that answered
        assert torch.allclose(after[shared_key(module, "A")], torch.full((2, 6), 1.5))
        trained = {u.silo_id: server_ids for u in uploads
                   for server_ids in [[int(k.split(".")[-2]) for k in u.params
                                       if k.startswith(f"{module}.expert.") and k.endswith("A")]]}
        untrained = set(range(3)) - set(trained["a"]) - set(trained["b"])
        for j in trained["a"]:
            assert torch.allclose(after[expert_key(module, j, "A")], torch.full((2, 6), 1.0))
        for j in untrained:  # silo c never answered: its expert keeps its value
            key = expert_key(module, j, "A")
            assert torch.equal(after[key], before[key])


def test_rsea_gives_each_expert_the_silo_whose_data_matches_it() -> None:
    server = _server()
    server.begin_round(0)
    directions = torch.eye(2) * 5
    planted = {"a": directions[0], "b": directions[1], "c": -directions[0]}
    for silo in SILOS:
        emb = {}
        assignment = server.silo_assignment(silo)
        for module, ids in assignment.items():
            emb[f"{module}.client"] = planted[silo]
            for j in ids:  # expert j's embedding mirrors the data of the silo training it
                emb[f"{module}.expert.{j}"] = planted[silo]
        server.accumulate(_upload(server, silo, 0.0, emb))
    round0 = {s: server.silo_assignment(s) for s in SILOS}
    server.end_round(0)
    _check_feasible(server)
    for silo in SILOS:
        # each expert picks back the silo whose embedding it learned from
        assert server.silo_assignment(silo) == round0[silo]


def test_static_keeps_round0_and_random_stays_feasible() -> None:
    static = _server(assignment="static")
    first = {m: d.copy() for m, d in static.assignment.items()}
    static.begin_round(0)
    static.end_round(0)
    assert all(np.array_equal(first[m], static.assignment[m]) for m in first)
    rand = _server(assignment="random", num_experts=6, b=3)
    seen = set()
    for r in range(5):
        rand.begin_round(r)
        rand.end_round(r)
        _check_feasible(rand)
        seen.add(rand.assignment["l0.q"].tobytes())
    assert len(seen) > 1


def test_registry_names_and_clear_error() -> None:
    assert get_strategy("fedamole").name == "fedamole"
    available = "available: fdlora, fedamole, fedit, fedit-ft, fedlease, local"
    with pytest.raises(ValueError, match=available):
        get_strategy("nope")
    with pytest.raises(ValueError, match=r"strategy\.assignment"):
        StrategyConfig(assignment="greedy")  # type: ignore[arg-type]
