import json

import pytest
import torch

from fedsilo.aggregator.coordinator import Aggregator, RoundRecord, Verdict
from fedsilo.aggregator.schedule import Schedule
from fedsilo.sdk.amole.config import AMoLEConfig
from fedsilo.sdk.messages import Upload
from fedsilo.sdk.params import ModuleShape
from fedsilo.sdk.strategies import FedAMoLEConfig, StrategyConfig, get_strategy
from fedsilo.sdk.strategies.config import config_from_values
from fedsilo.sdk.transport.memory import MemoryTransport


def _aggregator(rounds: int = 2, silos: tuple[str, ...] = ("a", "b")
                ) -> tuple[Aggregator, MemoryTransport]:
    spec = get_strategy("fedit")
    # min_contributors 1: a round one silo answered still moves the model (what these
    # tests of the round's bookkeeping compute by hand)
    server = spec.server(spec.adapter(AMoLEConfig(r=2)),
                         StrategyConfig(name="fedit", min_contributors=1), 0)
    transport = MemoryTransport()
    agg = Aggregator(server, transport, Schedule(rounds=rounds, local_steps=1, lr=0.1,
                                                 lr_decay=0.5), setup={"name": "t"})
    agg.start({"m": ModuleShape(3, 3)}, list(silos))
    return agg, transport


def _up(server_round: int, silo: str, value: float) -> Upload:
    params = {"m.shared.A": torch.full((2, 3), value), "m.shared.B": torch.zeros(3, 2)}
    # a score in [0, 1] that still tells the uploads apart
    return Upload(server_round, silo, params, {}, 1, metrics={"metric": 1 / (1 + abs(value))})


def test_plans_carry_decayed_lr_and_final_round_is_evaluation_only() -> None:
    agg, transport = _aggregator()
    agg.publish(1)
    plan = transport.receive_plan("a")
    assert plan is not None and plan.message.lr == pytest.approx(0.05)
    assert not plan.message.final and plan.message.local_steps == 1
    assert plan.message.setup == {"name": "t"}
    agg.publish(2)
    final = transport.receive_plan("a")
    assert final is not None and final.message.final and final.message.local_steps == 0


def test_duplicates_and_late_uploads_are_ignored_and_counted() -> None:
    agg, transport = _aggregator()
    record = agg.publish(0)
    transport.send_upload(_up(0, "a", 1.0))
    transport.send_upload(_up(0, "a", 100.0))  # redelivery / duplicate
    transport.send_upload(_up(7, "b", 100.0))  # for a round that is not open
    transport.send_upload(_up(0, "intruder", 100.0))
    transport.send_upload(_up(0, "b", 3.0))
    agg.close(agg.collect(record))
    assert record.ignored == {"duplicate": 1, "late": 1, "unknown": 1}
    assert record.missing == []
    assert torch.allclose(agg.strategy.global_params["m.shared.A"], torch.full((2, 3), 2.0))
    assert record.bytes_up["a"] > 0 and record.metrics["b"] == {"metric": 0.25}


def test_missing_silos_are_reported_and_the_round_closes_with_who_answered() -> None:
    agg, transport = _aggregator()
    record = agg.publish(0)
    transport.send_upload(_up(0, "b", 4.0))
    agg.close(agg.collect(record))
    assert record.missing == ["a"]
    assert record.aggregation is not None and record.aggregation.num_uploads == 1
    assert torch.allclose(agg.strategy.global_params["m.shared.A"], torch.full((2, 3), 4.0))


def test_bad_roster_is_rejected() -> None:
    spec = get_strategy("fedit")
    server = spec.server(spec.adapter(AMoLEConfig(r=2)), StrategyConfig(name="fedit"), 0)
    with pytest.raises(ValueError, match="unique"):
        Aggregator(server, MemoryTransport(), Schedule(1, 1, 0.1)).start({}, ["a", "a"])


def test_a_late_joiner_gets_a_plan_from_the_next_round() -> None:
    agg, transport = _aggregator(rounds=3)
    agg.close(agg.collect(agg.publish(0)))
    record = agg.publish(1, ["a", "b", "c"])
    assert record.expected == ["a", "b", "c"]
    plan = transport.receive_plan("c")
    assert plan is not None and plan.message.round == 1


def test_record_round_trips_through_json() -> None:
    agg, transport = _aggregator()
    record = agg.publish(0)
    transport.send_upload(_up(0, "a", 1.0))
    agg.close(agg.collect(record))
    again = RoundRecord.from_json(json.loads(json.dumps(record.to_json())))
    assert again == record


def test_an_update_scaled_by_1e30_is_clipped_and_the_average_stays_bounded() -> None:
    agg, transport = _aggregator(silos=("a", "b", "c"))
    record = agg.publish(0)
    sent = transport.receive_plan("a")
    assert sent is not None
    start = sent.message.params["m.shared.A"]
    honest = [_up(0, "a", 1.0), _up(0, "b", 1.5)]
    attack = _up(0, "c", 1e30)  # finite, valid keys: only the bound stops it
    for upload in (*honest, attack):
        transport.send_upload(upload)
    agg.close(agg.collect(record))
    assert set(record.clipped) == {"c"} and record.aggregation is not None
    assert record.aggregation.details["clipped"] == 1.0
    # c's update was cut to 5 x the median update norm (b's), so the mean moved by <= that / 3
    median = float(torch.linalg.vector_norm(torch.full((2, 3), 1.5) - start))
    result = agg.strategy.global_params["m.shared.A"]
    assert torch.isfinite(result).all()
    honest_mean = (torch.full((2, 3), 1.0) + torch.full((2, 3), 1.5)) / 2
    moved = float(torch.linalg.vector_norm(result - (2 * honest_mean + start) / 3))
    assert moved <= 5 * median / 3 + 1e-5


def test_held_uploads_survive_a_checkpoint_and_fold_after_resume() -> None:
    agg, transport = _aggregator()
    record = agg.publish(0)
    transport.send_upload(_up(0, "a", 1.0))
    agg.collect(record, deadline=0.0)
    tensors, meta = agg.state_dict()
    resumed, fresh = _aggregator()
    resumed.load_state_dict(tensors, json.loads(json.dumps(meta)))
    assert set(resumed.held) == {"a"}
    fresh.send_upload(_up(0, "b", 3.0))
    resumed.close(resumed.collect(resumed.history[-1]))
    assert torch.allclose(resumed.strategy.global_params["m.shared.A"],
                          torch.full((2, 3), 2.0))


@pytest.mark.parametrize("n_samples", [0, -3, 10**12])
def test_a_sample_count_out_of_bounds_is_refused(n_samples: int) -> None:
    agg, _ = _aggregator()
    record = agg.publish(0)
    bad = _up(0, "a", 1.0)
    bad.n_samples = n_samples
    offer = agg.offer(record, bad, 1)
    agg.collect(record, deadline=0.0)
    assert record.ignored == {"sample count": 1} and record.missing == ["a", "b"]
    assert offer.problem is not None and "n_samples" in str(offer.problem)


@pytest.mark.parametrize("metrics", [{"metric": float("inf")}, {"test_n": float("nan")},
                                     {"metric": 0.5, "x" * 100: 1.0}])
def test_a_report_out_of_range_is_refused_and_the_round_goes_on(metrics: dict) -> None:
    """An infinite score once reached MTAL and the checkpoint (plain JSON): refused now,
    before anything is folded, and the other silo's upload closes the round."""
    agg, transport = _aggregator()
    record = agg.publish(0)
    bad = _up(0, "a", 1.0)
    bad.metrics = metrics
    offer = agg.offer(record, bad, 1)
    transport.send_upload(_up(0, "b", 3.0))
    agg.collect(record, deadline=0.0)
    assert record.ignored == {"report": 1} and record.missing == ["a"]
    assert offer.problem is not None and "upload of a for round 0" in str(offer.problem)
    agg.close(record)
    json.dumps(agg.state_dict()[1], allow_nan=False)  # the checkpoint stays plain JSON


def test_huge_embeddings_are_refused_before_rsea() -> None:
    spec = get_strategy("fedamole")
    config = FedAMoLEConfig(num_experts=2, k_c=1, b=1, min_contributors=1)
    server = spec.server(spec.adapter(AMoLEConfig(r=2, top_k=1)), config, 0)
    transport = MemoryTransport()
    agg = Aggregator(server, transport, Schedule(rounds=2, local_steps=1, lr=0.1))
    agg.start({"m": ModuleShape(3, 3)}, ["a", "b"])
    record = agg.publish(0)
    plan = transport.receive_plan("a")
    assert plan is not None
    schema = server.upload_schema("a", server.configure_round(0, ["a", "b"])["a"], False)
    emb = {k: torch.full(s.shape, 3e38) for k, s in schema.embeddings.items()}
    params = {k: torch.zeros(s.shape) for k, s in schema.params.items()}
    offer = agg.offer(record, Upload(0, "a", params, emb, 10), 1)
    agg.collect(record, deadline=0.0)
    assert record.ignored == {"norm bound": 1}
    assert "embeddings" in str(offer.problem)


@pytest.mark.parametrize("name", ["fedamole", "fedit", "fedit-ft", "fdlora", "fedlease", "local"])
def test_a_second_upload_of_a_round_is_refused_before_the_strategy(name: str) -> None:
    """Duplicate detection lives here only: the strategies' `accumulate` never sees a
    silo twice in a round (moved from each strategy's own duplicate test)."""
    spec = get_strategy(name)
    config = config_from_values(
        {"name": name, "num_experts": 2, "k_c": 1, "b": 1, "min_contributors": 1})
    server = spec.server(spec.adapter(AMoLEConfig(r=2, top_k=1)), config, 0)
    agg = Aggregator(server, MemoryTransport(), Schedule(rounds=3, local_steps=1, lr=0.1))
    agg.start({"m": ModuleShape(3, 3)}, ["a", "b"])
    record = agg.publish(0)
    schema = server.upload_schema("a", server.configure_round(0, ["a", "b"])["a"], False)
    upload = Upload(0, "a", {k: torch.ones(s.shape) for k, s in schema.params.items()},
                    {k: torch.ones(s.shape) for k, s in schema.embeddings.items()}, 1)
    assert agg.offer(record, upload, 1).verdict is Verdict.FOLDED
    again = agg.offer(record, upload, 1)
    assert again.verdict is Verdict.DUPLICATE and again.problem is None
    assert record.ignored == {"duplicate": 1}
    agg.close(record)
    assert record.aggregation is not None and record.aggregation.num_uploads == 1
