"""FedLEASEServer driven directly with hand-made uploads: warm-up, clustering by planted B
structure, per-cluster aggregation, upload schemas, late joiners and checkpoints."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from fedsilo.aggregator.coordinator import Aggregator, Verdict
from fedsilo.aggregator.schedule import Schedule
from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.checkpoint import load_checkpoint, save_checkpoint
from fedsilo.sdk.messages import Upload
from fedsilo.sdk.params import ModuleShape, TensorDict, expert_key, gate_key
from fedsilo.sdk.strategies import FedLEASEConfig, SiloPlan, get_strategy
from fedsilo.sdk.strategies.fedlease import FedLEASEServer, cluster_router_key
from fedsilo.sdk.transport.memory import MemoryTransport

R = 2
SHAPES = {"l0.q": ModuleShape(6, 8), "l0.v": ModuleShape(6, 4)}
MODULES = list(SHAPES)
SILOS = ["a", "b", "c", "d", "e", "f"]


def make_server(**kw: object) -> FedLEASEServer:
    spec = get_strategy("fedlease")
    adapter = spec.adapter(AMoLEConfig(r=R, alpha=4))
    assert adapter.layer == "lease"
    # min_contributors 1 unless a test says otherwise: singleton clusters are computed by
    # hand here (min_contributors is tested on its own below)
    settings = {"name": "fedlease", "warmup_rounds": 2, "max_clusters": 5,
                "min_contributors": 1, **kw}
    config = FedLEASEConfig(**settings)  # type: ignore[arg-type]
    server = spec.server(adapter, config, 0)
    assert isinstance(server, FedLEASEServer)
    return server


def _gen(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32("/".join(map(str, parts)).encode()))


def _directions(num_groups: int) -> dict[str, torch.Tensor]:
    """Per module, `num_groups` orthonormal directions in the space of vec(B)."""
    out = {}
    for module, shape in SHAPES.items():
        q, _ = torch.linalg.qr(torch.randn(shape.out_features * R, num_groups,
                                           generator=_gen("dir", module)))
        out[module] = q.T  # (groups, d_out * r), orthonormal rows
    return out


def warm_upload(rnd: int, silo: str, group: int, directions: dict[str, torch.Tensor]) -> Upload:
    """A warm-up LoRA whose B points along its group's direction (plus a little noise)."""
    gen = _gen("warm", rnd, silo)
    params: TensorDict = {}
    for module, shape in SHAPES.items():
        params[expert_key(module, 0, "A")] = torch.randn(R, shape.in_features, generator=gen)
        b = directions[module][group] * (1.0 + rnd) + 0.01 * torch.randn(
            shape.out_features * R, generator=gen
        )
        params[expert_key(module, 0, "B")] = b.reshape(shape.out_features, R)
    return Upload(rnd, silo, params, {}, n_samples=10)


def trained_upload(server: FedLEASEServer, rnd: int, silo: str, plan: SiloPlan) -> Upload:
    """What a silo sends back after clustering: exactly the schema's tensors, moved."""
    schema = server.upload_schema(silo, plan, final=False).params
    gen = _gen("trained", rnd, silo)
    params = {k: plan.params[k] + torch.randn(plan.params[k].shape, generator=gen)
              for k in schema}
    return Upload(rnd, silo, params, {}, n_samples=3 + ord(silo[0]) % 5)


def warm_up(server: FedLEASEServer, groups: Sequence[int], silos: Sequence[str] = SILOS,
            skip: Sequence[str] = ()) -> dict[str, Upload]:
    """Run every warm-up round; returns each silo's last warm-up upload."""
    directions = _directions(max(groups) + 1)
    last: dict[str, Upload] = {}
    for rnd in range(server.config.warmup_rounds):
        server.configure_round(rnd, silos)
        server.begin_round(rnd)
        for silo, group in zip(silos, groups, strict=True):
            if silo in skip:
                continue
            last[silo] = warm_upload(rnd, silo, group, directions)
            server.accumulate(last[silo])
        server.end_round(rnd)
    return last


def partition(labels: dict[str, int] | Sequence[int], silos: Sequence[str]) -> set[frozenset]:
    values = [labels[s] for s in silos] if isinstance(labels, dict) else list(labels)
    return {frozenset(s for s, v in zip(silos, values, strict=True) if v == g)
            for g in set(values)}


def mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.double() for t in tensors]).mean(0).to(tensors[0].dtype)


def assert_equal_dicts(a: TensorDict, b: TensorDict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# -- warm-up -------------------------------------------------------------------------------


def test_warmup_plans_carry_expert_0_and_the_silos_own_last_lora() -> None:
    server = make_server(warmup_rounds=3)
    server.initialize(SHAPES, SILOS)
    plans = server.configure_round(0, SILOS)
    first = plans["a"].params
    assert set(first) == {expert_key(m, 0, p) for m in MODULES for p in "AB"}
    for module, shape in SHAPES.items():
        assert first[expert_key(module, 0, "A")].shape == (R, shape.in_features)
        assert first[expert_key(module, 0, "A")].abs().sum() > 0
        assert torch.equal(first[expert_key(module, 0, "B")], torch.zeros(shape.out_features, R))
    for plan in plans.values():
        assert plan.assignment == {m: [0] for m in MODULES}
        assert_equal_dicts(plan.params, first)  # everyone starts from the same LoRA

    directions = _directions(2)
    sent = {s: warm_upload(0, s, i % 2, directions) for i, s in enumerate(SILOS) if s != "f"}
    server.begin_round(0)
    for upload in sent.values():
        server.accumulate(upload)
    report = server.end_round(0)
    assert report.num_uploads == 5 and not server.clustered

    plans = server.configure_round(1, SILOS)
    for silo in SILOS:
        assert plans[silo].assignment == {m: [0] for m in MODULES}
        # its own LoRA back, nothing averaged; "f" never uploaded: the initial one
        expected = sent[silo].params if silo in sent else first
        assert_equal_dicts(plans[silo].params, expected)
    # the global state is the silos' own LoRAs side by side, no mean anywhere
    assert set(server.global_params) == {f"silo.{s}.{k}" for s in sent for k in first}
    for silo, upload in sent.items():
        for key, value in upload.params.items():
            assert torch.equal(server.global_params[f"silo.{silo}.{key}"], value)

    # round 1: only "a" uploads; everyone else keeps the LoRA of its latest upload
    server.begin_round(1)
    newer = warm_upload(1, "a", 0, directions)
    server.accumulate(newer)
    server.end_round(1)
    assert not server.clustered
    plans = server.configure_round(2, SILOS)
    assert_equal_dicts(plans["a"].params, newer.params)
    assert_equal_dicts(plans["b"].params, sent["b"].params)
    assert_equal_dicts(plans["f"].params, first)
    assert server.upload_schema("a", plans["a"], final=False).params.keys() == set(first)


def test_warmup_plans_do_not_change_while_uploads_arrive() -> None:
    """A resumed aggregator asks again for the open round's plans: the silos that already
    uploaded must get the same plan, not the LoRA they just sent."""
    server = make_server(warmup_rounds=3)
    server.initialize(SHAPES, SILOS)
    directions = _directions(2)
    for rnd in range(2):
        plans = server.configure_round(rnd, SILOS)
        before = {k: v.clone() for k, v in server.global_params.items()}
        server.begin_round(rnd)
        for i, silo in enumerate(SILOS):
            server.accumulate(warm_upload(rnd, silo, i % 2, directions))
        again = server.configure_round(rnd, SILOS)
        for silo in SILOS:
            assert_equal_dicts(again[silo].params, plans[silo].params)
        assert_equal_dicts(server.global_params, before)
        server.end_round(rnd)


# -- clustering ------------------------------------------------------------------------------


GROUPINGS = {
    "2-interleaved": [0, 1, 0, 1, 0, 1],
    "3-pairs": [0, 0, 1, 1, 2, 2],
    "3-mixed": [2, 0, 1, 0, 2, 1],
}


@pytest.mark.parametrize("groups", GROUPINGS.values(), ids=GROUPINGS.keys())
def test_clustering_finds_the_planted_groups(groups: list[int]) -> None:
    server = make_server()
    server.initialize(SHAPES, SILOS)
    directions = _directions(max(groups) + 1)
    for rnd in range(2):
        server.configure_round(rnd, SILOS)
        server.begin_round(rnd)
        for silo, group in zip(SILOS, groups, strict=True):
            server.accumulate(warm_upload(rnd, silo, group, directions))
        report = server.end_round(rnd)
        assert server.clustered == (rnd == 1)  # after round W-1 closes, not before
    num_groups = len(set(groups))
    assert server.num_clusters == num_groups
    assert report.details["clusters"] == num_groups
    assert report.details["silhouette"] == max(server.silhouette.values())
    assert partition(server.labels, SILOS) == partition(groups, SILOS)
    assert sorted(set(server.labels.values())) == list(range(num_groups))


def test_two_silos_cluster_without_a_silhouette_and_checkpoint_as_json() -> None:
    """C = 2: two clusters and no silhouette to report (NaN in a report once stopped the
    aggregator's checkpoint: its metadata must be plain JSON)."""
    import json

    server = make_server()
    server.initialize(SHAPES, SILOS[:2])
    directions = _directions(2)
    for rnd in range(2):
        server.configure_round(rnd, SILOS[:2])
        server.begin_round(rnd)
        for i, silo in enumerate(SILOS[:2]):
            server.accumulate(warm_upload(rnd, silo, i, directions))
        report = server.end_round(rnd)
    assert report.details == {"clusters": 2.0}
    json.dumps(report.details, allow_nan=False)
    json.dumps(server.state_dict()[1], allow_nan=False)


def _clustered(expert_init: str = "own", groups: Sequence[int] = (0, 0, 1, 1, 2, 2),
               min_contributors: int = 1) -> tuple[FedLEASEServer, dict[str, Upload]]:
    server = make_server(expert_init=expert_init, min_contributors=min_contributors)
    server.initialize(SHAPES, SILOS)
    last = warm_up(server, groups)
    assert server.num_clusters == len(set(groups))
    return server, last


@pytest.mark.parametrize("expert_init", ["own", "mean"])
def test_post_warmup_plans_hold_every_expert_and_the_clusters_router(expert_init: str) -> None:
    server, last = _clustered(expert_init)
    m = server.num_clusters
    members = {c: [s for s in SILOS if server.labels[s] == c] for c in range(m)}
    cluster_mean = {
        (module, c, part): mean([last[s].params[expert_key(module, 0, part)] for s in members[c]])
        for module in MODULES for c in range(m) for part in "AB"
    }
    plans = server.configure_round(2, SILOS)
    routers: dict[tuple[str, int], torch.Tensor] = {}
    for silo, plan in plans.items():
        own = server.labels[silo]
        for module, shape in SHAPES.items():
            ids = plan.assignment[module]
            assert ids[0] == own and sorted(ids) == list(range(m))
            gate = plan.params[gate_key(module)]
            assert gate.shape == (2 * m - 1, shape.in_features)
            assert torch.equal(gate, server.global_params[cluster_router_key(own, module)])
            routers.setdefault((module, own), gate)
            assert torch.equal(routers[(module, own)], gate)  # one router per cluster
            for c in range(m):
                for part in "AB":
                    sent = plan.params[expert_key(module, c, part)]
                    if c == own and expert_init == "own":  # its own warm-up LoRA
                        expected = last[silo].params[expert_key(module, 0, part)]
                        assert torch.equal(sent, expected)
                    else:  # the cluster mean
                        assert torch.allclose(sent, cluster_mean[(module, c, part)],
                                              rtol=0, atol=1e-6)
        assert set(plan.params) == (
            {expert_key(mod, c, p) for mod in MODULES for c in range(m) for p in "AB"}
            | {gate_key(mod) for mod in MODULES}
        )
    for module in MODULES:  # clusters' routers differ from each other
        assert not torch.equal(routers[(module, 0)], routers[(module, 1)])

    # The silo's own warm-up start is for the first post-warm-up round only.
    server.begin_round(2)
    server.end_round(2)  # nobody answered: everything keeps its value
    later = server.configure_round(3, SILOS)
    for silo in SILOS:
        own = server.labels[silo]
        for module in MODULES:
            assert torch.allclose(later[silo].params[expert_key(module, own, "B")],
                                  cluster_mean[(module, own, "B")], rtol=0, atol=1e-6)


def test_upload_schema_after_clustering_is_own_expert_and_gate() -> None:
    server, _ = _clustered()
    plans = server.configure_round(2, SILOS)
    for silo, plan in plans.items():
        own = server.labels[silo]
        schema = server.upload_schema(silo, plan, final=False).params
        expected = {expert_key(m, own, p) for m in MODULES for p in "AB"}
        expected |= {gate_key(m) for m in MODULES}
        assert set(schema) == expected
        for key, spec in schema.items():
            assert tuple(spec.shape) == tuple(plan.params[key].shape)
        final = server.upload_schema(silo, plan, final=True)
        assert final.params == {} and final.embeddings == {}


@pytest.mark.parametrize("min_contributors", [1, 2])
def test_per_cluster_aggregation_matches_hand_computation(min_contributors: int) -> None:
    server, _ = _clustered(min_contributors=min_contributors)
    members = {c: [s for s in SILOS if server.labels[s] == c] for c in range(3)}
    # cluster 0: both members answer; cluster 1: one of two (below min_contributors = 2,
    # so not published as that silo trained it); cluster 2: nobody
    answering = members[0] + members[1][:1]
    before = {k: v.clone() for k, v in server.global_params.items()}
    plans = server.configure_round(2, SILOS)
    server.begin_round(2)
    uploads = {s: trained_upload(server, 2, s, plans[s]) for s in answering}
    for upload in uploads.values():
        server.accumulate(upload)
    report = server.end_round(2)
    assert report.num_uploads == 3
    after = server.global_params
    assert set(after) == set(before)
    for module in MODULES:
        for c in range(3):
            senders = [s for s in answering if server.labels[s] == c]
            keys = [expert_key(module, c, "A"), expert_key(module, c, "B")]
            router = cluster_router_key(c, module)
            if len(senders) < server.config.min_contributors:  # expert, router kept
                for key in [*keys, router]:
                    assert torch.equal(after[key], before[key]), key
                continue
            for key in keys:
                expected = mean([uploads[s].params[key] for s in senders])
                assert torch.allclose(after[key], expected, rtol=0, atol=1e-6), key
            expected = mean([uploads[s].params[gate_key(module)] for s in senders])
            assert torch.allclose(after[router], expected, rtol=0, atol=1e-6)
            assert not torch.equal(after[router], before[router])
    # cluster 1's expert is exactly its only sender's upload, not mixed with cluster 0, or,
    # with min_contributors 2, not that upload at all
    only = members[1][0]
    key = expert_key(MODULES[0], 1, "B")
    assert torch.equal(after[key], uploads[only].params[key]) == (min_contributors == 1)
    # the next plans carry the aggregate (no more own warm-up start)
    nxt = server.configure_round(3, SILOS)
    for silo in SILOS:
        for key, value in nxt[silo].params.items():
            if key.endswith(".router.gate"):
                module = key.removesuffix(".router.gate")
                assert torch.equal(value, after[cluster_router_key(server.labels[silo], module)])
            else:
                assert torch.equal(value, after[key])


def test_sample_weighting_within_a_cluster() -> None:
    server = make_server(weighting="samples")
    server.initialize(SHAPES, SILOS)
    warm_up(server, [0, 0, 1, 1, 2, 2])
    a, b = [s for s in SILOS if server.labels[s] == 0]
    plans = server.configure_round(2, SILOS)
    server.begin_round(2)
    ua, ub = trained_upload(server, 2, a, plans[a]), trained_upload(server, 2, b, plans[b])
    server.accumulate(ua)
    server.accumulate(ub)
    server.end_round(2)
    key = expert_key(MODULES[1], 0, "A")
    expected = (ua.n_samples * ua.params[key].double() + ub.n_samples * ub.params[key].double()
                ) / (ua.n_samples + ub.n_samples)
    assert ua.n_samples != ub.n_samples
    assert torch.allclose(server.global_params[key], expected.float(), rtol=0, atol=1e-6)


# -- membership changes, errors ------------------------------------------------------------


def test_late_joiner_joins_the_largest_cluster() -> None:
    silos = ["a", "b", "c", "d", "e"]
    server = make_server()
    server.initialize(SHAPES, silos)
    warm_up(server, [0, 1, 1, 1, 0], silos=silos)
    assert server.num_clusters == 2
    assert partition(server.labels, silos) == {frozenset("ae"), frozenset("bcd")}
    largest = server.labels["b"]
    assert largest == 1  # so "largest" is not mistaken for "lowest id"
    plans = server.configure_round(2, [*silos, "z"])
    assert server.labels["z"] == largest
    for module in MODULES:
        assert plans["z"].assignment[module] == [1, 0]
        assert torch.equal(plans["z"].params[gate_key(module)],
                           server.global_params[cluster_router_key(1, module)])
    schema = server.upload_schema("z", plans["z"], final=False).params
    assert set(schema) == {expert_key(m, 1, p) for m in MODULES for p in "AB"} | {
        gate_key(m) for m in MODULES
    }
    # its upload is folded into cluster 1, the expert it holds first
    server.begin_round(2)
    upload = trained_upload(server, 2, "z", plans["z"])
    server.accumulate(upload)
    server.end_round(2)
    key = expert_key(MODULES[0], 1, "A")
    assert torch.equal(server.global_params[key], upload.params[key])


def test_participant_without_warmup_lora_and_ties_go_to_the_lowest_cluster() -> None:
    silos = ["a", "b", "c", "d", "x"]
    server = make_server()
    server.initialize(SHAPES, silos)
    # "x" takes part but never uploads during warm-up: sizes tie 2-2, cluster 0 wins
    warm_up(server, [0, 1, 0, 1, 0], silos=silos, skip=["x"])
    assert server.num_clusters == 2
    assert server.labels["x"] == 0
    plans = server.configure_round(2, silos)
    assert all(plans["x"].assignment[m][0] == 0 for m in MODULES)


def test_duplicate_upload_is_refused_in_warmup_and_after_clustering() -> None:
    """The engine refuses a silo's second upload of a round (`Aggregator.offer`): in
    warm-up and after clustering the strategy counts it once."""
    server = make_server()
    server.initialize(SHAPES, SILOS)
    directions = _directions(2)
    engine = Aggregator(server, MemoryTransport(), Schedule(rounds=4, local_steps=1, lr=0.1))
    record = engine.publish(0, SILOS)
    upload = warm_upload(0, "a", 0, directions)
    assert engine.offer(record, upload, 1).verdict is Verdict.FOLDED
    assert engine.offer(record, upload, 1).verdict is Verdict.DUPLICATE

    clustered, _ = _clustered()
    engine = Aggregator(clustered, MemoryTransport(), Schedule(rounds=4, local_steps=1, lr=0.1))
    record = engine.publish(2, SILOS)
    plans = clustered.configure_round(2, SILOS)
    upload = trained_upload(clustered, 2, "c", plans["c"])
    assert engine.offer(record, upload, 1).verdict is Verdict.FOLDED
    assert engine.offer(record, upload, 1).verdict is Verdict.DUPLICATE
    engine.close(record)
    key = expert_key(MODULES[0], clustered.labels["c"], "A")
    assert torch.equal(clustered.global_params[key], upload.params[key])  # counted once


def test_duplicate_silo_ids_in_a_round_raise() -> None:
    server = make_server()
    server.initialize(SHAPES, SILOS)
    with pytest.raises(ValueError, match="unique"):
        server.configure_round(0, ["a", "a"])


def test_validate_rounds_needs_a_round_after_warmup() -> None:
    server = make_server(warmup_rounds=3)
    for rounds in (1, 3):
        with pytest.raises(ValueError, match=r"warmup_rounds = 3 .* out of " + str(rounds)):
            server.validate_rounds(rounds)
    server.validate_rounds(4)


def test_final_plans_are_empty() -> None:
    server, _ = _clustered()
    final = server.configure_final(SILOS)
    assert set(final) == set(SILOS)
    assert all(p.params == {} and p.assignment == {} for p in final.values())


# -- checkpoints -----------------------------------------------------------------------------


GROUPS = dict(zip(SILOS, [0, 1, 0, 2, 1, 2], strict=True))
ROUNDS = 4  # W = 2 warm-up rounds, then 2 clustered rounds
MISSING = {1: {"f"}, 3: {"b"}}


def _upload(server: FedLEASEServer, rnd: int, silo: str, plan: SiloPlan) -> Upload:
    if not server.clustered:
        return warm_upload(rnd, silo, GROUPS[silo], _directions(3))
    return trained_upload(server, rnd, silo, plan)


def _resume(server: FedLEASEServer, path: Path, expert_init: str) -> FedLEASEServer:
    save_checkpoint(path, *server.state_dict())
    fresh = make_server(expert_init=expert_init)
    fresh.load_state_dict(*load_checkpoint(path))
    return fresh


def _run(expert_init: str, resume_at: set[tuple[int, int]], path: Path | None
         ) -> tuple[FedLEASEServer, list[dict[str, SiloPlan]]]:
    """The whole schedule; at (round, k) the server is checkpointed and replaced by a fresh
    instance after the k-th upload of the round (k = -1: after configure_round), which asks
    again for the round's plans as a resumed aggregator does."""
    server = make_server(expert_init=expert_init)
    server.initialize(SHAPES, SILOS)
    history = []
    for rnd in range(ROUNDS):
        plans = server.configure_round(rnd, SILOS)
        history.append(plans)
        server.begin_round(rnd)
        if (rnd, -1) in resume_at:
            assert path is not None
            server = _resume(server, path, expert_init)
            again = server.configure_round(rnd, SILOS)
            for silo in SILOS:
                assert again[silo].assignment == plans[silo].assignment
                assert_equal_dicts(again[silo].params, plans[silo].params)
        sent = [s for s in SILOS if s not in MISSING.get(rnd, set())]
        for k, silo in enumerate(sent):
            server.accumulate(_upload(server, rnd, silo, plans[silo]))
            if (rnd, k) in resume_at:
                assert path is not None
                server = _resume(server, path, expert_init)
                again = server.configure_round(rnd, SILOS)
                for s in SILOS:
                    assert_equal_dicts(again[s].params, plans[s].params)
        server.end_round(rnd)
    history.append(server.configure_round(ROUNDS, SILOS))
    return server, history


RESUME_POINTS = {
    "mid-warm-up": {(0, 2)},
    "before-clustering": {(1, 4)},
    "first-post-warm-up-round": {(2, -1), (2, 1)},
    "mid-round": {(3, 2)},
}


@pytest.mark.parametrize("expert_init", ["own", "mean"])
@pytest.mark.parametrize("points", RESUME_POINTS.values(), ids=RESUME_POINTS.keys())
def test_state_dict_round_trip_continues_identically(
    expert_init: str, points: set[tuple[int, int]], tmp_path: Path
) -> None:
    plain, plain_history = _run(expert_init, set(), None)
    resumed, resumed_history = _run(expert_init, points, tmp_path / "state.safetensors")
    assert plain.num_clusters == resumed.num_clusters == 3
    assert plain.labels == resumed.labels
    assert_equal_dicts(plain.global_params, resumed.global_params)
    for plans_a, plans_b in zip(plain_history, resumed_history, strict=True):
        assert list(plans_a) == list(plans_b)
        for silo in plans_a:
            assert plans_a[silo].assignment == plans_b[silo].assignment
            assert_equal_dicts(plans_a[silo].params, plans_b[silo].params)
    tensors_a, meta_a = plain.state_dict()
    tensors_b, meta_b = resumed.state_dict()
    assert meta_a == meta_b
    assert_equal_dicts(tensors_a, tensors_b)


def test_state_dict_refuses_other_settings(tmp_path: Path) -> None:
    server = make_server()
    server.initialize(SHAPES, SILOS)
    path = tmp_path / "state.safetensors"
    save_checkpoint(path, *server.state_dict())
    other = make_server(max_clusters=3)
    with pytest.raises(ValueError, match="max_clusters"):
        other.load_state_dict(*load_checkpoint(path))
