"""FDLoRA: the server's Nesterov outer step, the client's personal adapter (never uploaded,
re-synced every `sync_every` rounds, checkpointed) and the fusion weights it reports."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.checkpoint import load_checkpoint, save_checkpoint
from fedsilo.sdk.messages import RoundPlan, Upload
from fedsilo.sdk.params import ModuleShape, TensorDict, shared_key
from fedsilo.sdk.strategies import FDLoRAConfig, StrategyConfig, get_strategy
from fedsilo.sdk.strategies.fdlora import FUSION_KEY, FDLoRAClient, FDLoRAServer
from fedsilo.sdk.strategies.fedit import FedITServer
from fedsilo.simulation import engine as simulation

SHAPES = {"m": ModuleShape(3, 4), "n": ModuleShape(2, 2)}
SILOS = ["a", "b", "c"]


def make_server(**kw: object) -> FDLoRAServer:
    spec = get_strategy("fdlora")
    adapter = spec.adapter(AMoLEConfig(r=2, alpha=4))
    assert adapter.use_router is False
    config = FDLoRAConfig(**{"name": "fdlora", **kw})  # type: ignore[arg-type]
    server = spec.server(adapter, config, 0)
    assert isinstance(server, FDLoRAServer)
    return server


def uploads_for(rnd: int, params: TensorDict, silos: list[str] = SILOS) -> list[Upload]:
    out = []
    for i, silo in enumerate(silos):
        gen = torch.Generator().manual_seed(100 * rnd + i)
        moved = {k: v + torch.randn(v.shape, generator=gen) for k, v in params.items()}
        out.append(Upload(rnd, silo, moved, {}, n_samples=5 + i))
    return out


def play_round(server: FedITServer, rnd: int, silos: list[str] = SILOS) -> list[Upload]:
    plans = server.configure_round(rnd, silos)
    server.begin_round(rnd)
    uploads = uploads_for(rnd, plans[silos[0]].params, silos)
    for upload in uploads:
        server.accumulate(upload)
    server.end_round(rnd)
    return uploads


def assert_equal_dicts(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# -- server ----------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", [1.0, 0.7])
def test_outer_step_is_nesterov_sgd_on_the_pseudo_gradient(lr: float) -> None:
    server = make_server(outer_lr=lr, outer_momentum=0.5)
    server.initialize(SHAPES, SILOS)
    params = {k: v.double() for k, v in server.global_params.items()}
    assert set(params) == {shared_key(m, p) for m in SHAPES for p in "AB"}
    buf: dict[str, torch.Tensor] = {}
    for rnd in range(3):
        plans = server.configure_round(rnd, SILOS)
        for plan in plans.values():  # every silo gets the shared LoRA, no architecture
            assert plan.assignment == {}
            assert set(plan.params) == set(params)
        uploads = play_round(server, rnd)
        for key in params:
            average = torch.stack([u.params[key].double() for u in uploads]).mean(0)
            g = params[key] - average
            buf[key] = g if rnd == 0 else 0.5 * buf[key] + g
            params[key] = params[key] - lr * (g + 0.5 * buf[key])
        for key, value in server.global_params.items():
            assert value.dtype == torch.float32
            assert torch.allclose(value.double(), params[key], rtol=0, atol=1e-5), (rnd, key)
    # momentum really acts: the result is not the plain mean of the last uploads
    last_mean = torch.stack([u.params["m.shared.A"] for u in uploads]).mean(0)
    assert not torch.allclose(server.global_params["m.shared.A"], last_mean, atol=1e-3)


def test_without_momentum_it_is_fedavg() -> None:
    fdlora = make_server(outer_momentum=0.0)
    fdlora.initialize(SHAPES, SILOS)
    spec = get_strategy("fedit")
    fedit = spec.server(spec.adapter(AMoLEConfig(r=2, alpha=4)),
                        StrategyConfig(name="fedit"), 0)
    fedit.initialize(SHAPES, SILOS)
    assert_equal_dicts(fdlora.global_params, fedit.global_params)
    for rnd in range(3):
        play_round(fdlora, rnd)
        play_round(fedit, rnd)
        for key, value in fedit.global_params.items():
            assert torch.allclose(fdlora.global_params[key], value, rtol=0, atol=1e-6), key


def test_a_round_nobody_answered_takes_no_step() -> None:
    server = make_server()
    server.initialize(SHAPES, SILOS)
    play_round(server, 0)
    before = {k: v.clone() for k, v in server.global_params.items()}
    server.configure_round(1, SILOS)
    server.begin_round(1)
    report = server.end_round(1)
    assert report.num_uploads == 0
    assert_equal_dicts(server.global_params, before)
    assert server.outer.steps == 1


@pytest.mark.parametrize("mid_round", [False, True])
def test_state_dict_round_trip_continues_identically(mid_round: bool, tmp_path: Path) -> None:
    def run(resume_after: int | None) -> FDLoRAServer:
        server = make_server()
        server.initialize(SHAPES, SILOS)
        for rnd in range(4):
            plans = server.configure_round(rnd, SILOS)
            server.begin_round(rnd)
            for k, upload in enumerate(uploads_for(rnd, plans["a"].params)):
                server.accumulate(upload)
                if resume_after == rnd and (k == 0 if mid_round else k == len(SILOS) - 1):
                    path = tmp_path / f"state-{rnd}-{k}.safetensors"
                    save_checkpoint(path, *server.state_dict())
                    server = make_server()
                    server.load_state_dict(*load_checkpoint(path))
                    again = server.configure_round(rnd, SILOS)
                    assert_equal_dicts(again["a"].params, plans["a"].params)
            server.end_round(rnd)
        return server

    plain = run(None)
    resumed = run(1)  # after round 0 the momentum buffers exist
    assert_equal_dicts(plain.global_params, resumed.global_params)
    assert plain.outer.steps == resumed.outer.steps == 4
    tensors_a, meta_a = plain.state_dict()
    tensors_b, meta_b = resumed.state_dict()
    assert meta_a == meta_b
    assert_equal_dicts(tensors_a, tensors_b)


def test_state_dict_refuses_other_outer_settings(tmp_path: Path) -> None:
    server = make_server()
    server.initialize(SHAPES, SILOS)
    play_round(server, 0)
    path = tmp_path / "state.safetensors"
    save_checkpoint(path, *server.state_dict())
    with pytest.raises(ValueError, match="outer_momentum"):
        make_server(outer_momentum=0.9).load_state_dict(*load_checkpoint(path))
    fedit_like = make_server()
    tensors, meta = load_checkpoint(path)
    fedit_like.load_state_dict(tensors, meta)  # the same settings load fine
    assert_equal_dicts(fedit_like.global_params, server.global_params)


# -- client, with a stand-in trainer ---------------------------------------------------------


@dataclass
class _Stats:
    seconds: float = 0.0


@dataclass
class FakeTrainer:
    """Just enough of LocalTrainer: training adds 1 to every tensor ("train" stream) or 10
    ("personal" stream); the validation loss is a bowl in the fusion weights."""

    seed: int = 0
    silo_id: str = "s"
    num_train: int = 7
    current: TensorDict = field(default_factory=dict)
    fused_with: list[tuple[int, list[TensorDict], tuple[float, ...]]] = field(
        default_factory=list
    )
    trained: list[tuple[str, bool]] = field(default_factory=list)
    round: int = -1

    def install(self, assignment: Mapping[str, list[int]], params: TensorDict) -> None:
        self.current = {k: v.clone() for k, v in params.items()}

    def extract(self) -> TensorDict:
        return {k: v.clone() for k, v in self.current.items()}

    def train(self, steps: int, lr: float, server_round: int, stream: str = "train",
              released: bool = True) -> _Stats:
        self.trained.append((stream, released))
        step = 1.0 if stream == "train" else 10.0
        self.current = {k: v + step for k, v in self.current.items()}
        return _Stats()

    @contextmanager
    def fused(self, adapters: list[TensorDict], weights: tuple[float, ...]) -> Iterator[None]:
        self.fused_with.append((self.round, [dict(a) for a in adapters], tuple(weights)))
        yield

    def validation_loss(self, max_batches: int) -> float:
        _, _, (ws, wp) = self.fused_with[-1]
        return (ws - 0.3) ** 2 + (wp - 0.9) ** 2

    def test(self, final: bool = True) -> tuple[dict[str, float], dict[str, float]]:
        return {"metric": 0.5}, {"test_s": 0.0}

    def upload(self, plan: RoundPlan, params: TensorDict | None = None,
               embeddings: TensorDict | None = None, metrics: dict[str, float] | None = None,
               timings: dict[str, float] | None = None) -> Upload:
        return Upload(plan.round, plan.silo_id, params or {}, embeddings or {}, self.num_train,
                      metrics or {}, timings or {})


def _plan(rnd: int, final: bool = False) -> RoundPlan:
    shared = {"m.shared.A": torch.full((2, 3), 100.0 * (rnd + 1)),
              "m.shared.B": torch.full((4, 2), -100.0 * (rnd + 1))}
    return RoundPlan(rnd, "s", 6, 0.1, 0 if final else 3, {}, shared, final=final)


def _run(client: FDLoRAClient, trainer: FakeTrainer, plan: RoundPlan) -> Upload:
    trainer.round = plan.round
    return client.run_round(plan, trainer)  # type: ignore[arg-type]


def test_personal_adapter_resyncs_every_sync_every_rounds_and_is_never_uploaded() -> None:
    client = FDLoRAClient(FDLoRAConfig(name="fdlora", sync_every=3, fusion_budget=4))
    trainer = FakeTrainer()
    previous: TensorDict = {}
    for rnd in range(7):
        plan = _plan(rnd)
        upload = _run(client, trainer, plan)
        tested = [adapters for r, adapters, _ in trainer.fused_with if r == rnd]
        assert tested, rnd
        shared, personal = tested[-1]
        assert_equal_dicts(shared, plan.params)
        if rnd % 3 == 0:  # restarted from the shared LoRA just received
            assert_equal_dicts(personal, plan.params)
        else:  # continues from the silo's own, trained last round
            assert_equal_dicts(personal, previous)
        # trained: the shared LoRA is uploaded, the personal one kept (and trained privately)
        assert set(upload.params) == set(plan.params)
        for key, value in upload.params.items():
            assert torch.equal(value, plan.params[key] + 1.0)
            assert torch.equal(client.personal[key], personal[key] + 10.0)
            assert not torch.equal(value, client.personal[key])
        assert trainer.trained[-2:] == [("train", True), ("personal", False)]
        assert_equal_dicts(trainer.current, upload.params)  # the silo holds what it sent
        previous = {k: v.clone() for k, v in client.personal.items()}

    final = _plan(6, final=True)  # 6 % 3 == 0, but the final plan never resets
    upload = _run(client, trainer, final)
    assert upload.params == {}
    _, (shared, personal), weights = trainer.fused_with[-1]
    assert_equal_dicts(personal, previous)
    assert_equal_dicts(client.personal, previous)  # no training on the final plan
    assert (upload.metrics["fusion_shared"], upload.metrics["fusion_personal"]) == weights


def test_fusion_weights_are_searched_and_reported() -> None:
    client = FDLoRAClient(FDLoRAConfig(name="fdlora", fusion_budget=6, fusion_l1=0.0))
    trainer = FakeTrainer()
    upload = _run(client, trainer, _plan(0))
    evaluated = [w for r, _, w in trainer.fused_with if r == 0]
    assert evaluated[0] == (0.5, 0.5)  # the search starts from the even mix
    best = min(evaluated[:-1], key=lambda w: (w[0] - 0.3) ** 2 + (w[1] - 0.9) ** 2)
    assert evaluated[-1] == best == client.fusion_weights  # then tests with the best
    assert (upload.metrics["fusion_shared"], upload.metrics["fusion_personal"]) == best
    assert all(-1.5 <= w <= 1.5 for w in best)


def test_client_state_dict_round_trip_continues_identically() -> None:
    config = FDLoRAConfig(name="fdlora", sync_every=5, fusion_budget=3)
    client, trainer = FDLoRAClient(config), FakeTrainer()
    assert client.state_dict() == {}
    for rnd in range(2):
        _run(client, trainer, _plan(rnd))
    state = client.state_dict()
    assert set(state) == {*_plan(0).params, FUSION_KEY}
    assert_equal_dicts({k: v for k, v in state.items() if k != FUSION_KEY}, client.personal)
    assert tuple(state[FUSION_KEY].tolist()) == client.fusion_weights

    restored = FDLoRAClient(config)
    restored.load_state_dict({k: v.clone() for k, v in state.items()})
    assert_equal_dicts(restored.personal, client.personal)
    assert restored.fusion_weights == client.fusion_weights
    # the next round (not a sync round) goes on from the restored personal adapter
    twin = FakeTrainer()
    a, b = _run(client, trainer, _plan(2)), _run(restored, twin, _plan(2))
    assert_equal_dicts(a.params, b.params)
    assert a.metrics == b.metrics
    assert_equal_dicts(restored.personal, client.personal)
    assert_equal_dicts(twin.fused_with[-1][1][1], trainer.fused_with[-1][1][1])
    assert not torch.equal(twin.fused_with[-1][1][1]["m.shared.A"], _plan(2).params["m.shared.A"])


# -- a whole federation, every message captured ----------------------------------------------


SYNC_EVERY = 2
ROUNDS = 4


@dataclass
class Captured:
    plans: dict[tuple[str, int], RoundPlan] = field(default_factory=dict)
    # each upload with a copy of every silo's personal adapter when it was sent
    uploads: list[tuple[Upload, dict[str, TensorDict]]] = field(default_factory=list)
    # (silo, round, shared, personal) each time a silo tested its fused model
    tested: list[tuple[str, int, TensorDict, TensorDict]] = field(default_factory=list)
    agents: list[Any] = field(default_factory=list)
    result: Any = None


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Captured:
    captured = Captured()

    class RecordingTransport(simulation.MemoryTransport):
        """Decodes what crosses the wire, as the other side will see it."""

        def deliver_plan(self, silo_id: str, data: bytes) -> int:
            plan = self.codec.open(data)
            assert isinstance(plan, RoundPlan)
            captured.plans[(silo_id, plan.round)] = plan
            return super().deliver_plan(silo_id, data)

        def deliver_upload(self, silo_id: str, data: bytes) -> int:
            message = self.codec.open(data)
            if isinstance(message, Upload):
                personal = {
                    agent.silo_id: {k: v.clone() for k, v in agent.client.personal.items()}
                    for agent in captured.agents
                }
                captured.uploads.append((message, personal))
            return super().deliver_upload(silo_id, data)

    class RecordingAgent(simulation.SiloAgent):
        def __init__(self, silo_id: str, client: Any, trainer: Any, *args: Any,
                     **kw: Any) -> None:
            super().__init__(silo_id, client, trainer, *args, **kw)
            captured.agents.append(self)
            fused = trainer.fused

            @contextmanager
            def recording(adapters: list[TensorDict], weights: Any) -> Iterator[None]:
                shared, personal = adapters
                captured.tested.append((silo_id, self.round, dict(shared), dict(personal)))
                with fused(adapters, weights):
                    yield

            trainer.fused = recording
            self.round = -1

        def handle(self, plan: RoundPlan) -> Upload:
            self.round = plan.round
            return super().handle(plan)

    config = simulation.SimulationConfig(
        silos=3, rounds=ROUNDS, local_steps=3, examples_per_silo=60, strategy="fdlora",
        sync_every=SYNC_EVERY, fusion_budget=3, out_dir=str(tmp_path_factory.mktemp("runs")),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(simulation, "MemoryTransport", RecordingTransport)
        mp.setattr(simulation, "SiloAgent", RecordingAgent)
        captured.result = simulation.run_simulation(config)
    assert len(captured.agents) == 3
    return captured


def test_uploads_carry_only_the_shared_lora(federation: Captured) -> None:
    assert len(federation.uploads) == 3 * (ROUNDS + 1)
    for upload, _ in federation.uploads:
        plan = federation.plans[(upload.silo_id, upload.round)]
        if plan.final:
            assert upload.params == {}
            continue
        assert set(upload.params) == set(plan.params)
        assert all(k.endswith((".shared.A", ".shared.B")) for k in upload.params)
        assert upload.embeddings == {}


def test_personal_adapter_never_leaves_the_silo(federation: Captured) -> None:
    compared = 0
    for upload, personal in federation.uploads:
        for silo, adapter in personal.items():
            if not adapter:  # that silo has not run yet
                continue
            assert set(adapter) == set(federation.plans[(silo, 0)].params)
            for key, value in upload.params.items():
                assert not torch.equal(value, adapter[key]), (upload.silo_id, silo, key)
                compared += 1
    assert compared > 0
    # the silo's own copy: its personal adapter differs from what it sent
    for agent in federation.agents:
        assert agent.client.personal
        state = agent.client.state_dict()
        assert set(state) == {*agent.client.personal, FUSION_KEY}
        restored = FDLoRAClient(agent.client.config)
        restored.load_state_dict(state)
        assert_equal_dicts(restored.personal, agent.client.personal)
        assert restored.fusion_weights == agent.client.fusion_weights
        # what the agent saved at the end holds the personal adapter under client/
        from safetensors.torch import load_file

        saved = load_file(str(federation.result.run_dir / "silos" / agent.silo_id
                              / "adapter.safetensors"))
        for key, value in agent.client.personal.items():
            assert torch.equal(saved[f"client/{key}"], value)


def test_personal_adapter_restarts_from_the_shared_one_on_sync_rounds(
    federation: Captured,
) -> None:
    rounds_seen = set()
    for silo, rnd, shared, personal in federation.tested:
        rounds_seen.add(rnd)
        plan = federation.plans[(silo, rnd)]
        assert set(shared) == set(plan.params)  # tested with the shared LoRA received
        assert all(torch.equal(shared[k], plan.params[k]) for k in shared), (silo, rnd)
        same = all(torch.equal(shared[k], personal[k]) for k in shared)
        expect_reset = not plan.final and rnd % SYNC_EVERY == 0
        assert same == expect_reset, (silo, rnd)
    assert rounds_seen == set(range(ROUNDS + 1))  # ROUNDS is the final plan


def test_metrics_report_fusion_weights_in_the_search_box(federation: Captured) -> None:
    for upload, _ in federation.uploads:
        for name in ("fusion_shared", "fusion_personal"):
            value = upload.metrics[name]
            assert math.isfinite(value) and -1.5 <= value <= 1.5, (upload.silo_id, name)
        assert math.isfinite(upload.metrics["metric"])
    last = {u.silo_id: u for u, _ in federation.uploads}
    for agent in federation.agents:
        metrics = last[agent.silo_id].metrics
        assert agent.client.fusion_weights == (metrics["fusion_shared"],
                                               metrics["fusion_personal"])
    assert len(federation.result.rounds) == ROUNDS + 1
