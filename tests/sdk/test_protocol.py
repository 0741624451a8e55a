import pytest
import torch

from fedsilo.sdk import protocol
from fedsilo.sdk.messages import RoundPlan, Upload


def _frame(header: bytes) -> bytes:
    return protocol.MAGIC + bytes([1]) + len(header).to_bytes(4, "big") + header


def _plan() -> RoundPlan:
    return RoundPlan(
        round=3, silo_id="silo-1", total_rounds=5, lr=1e-3, local_steps=7,
        assignment={"m.q_proj": [0, 4], "m.v_proj": [2]},
        params={"m.q_proj.shared.A": torch.randn(2, 3), "m.q_proj.expert.4.B": torch.randn(3, 2)},
    )


def test_plan_round_trip_is_exact() -> None:
    plan = _plan()
    back = protocol.decode(protocol.encode(plan))
    assert isinstance(back, RoundPlan)
    assert back.assignment == plan.assignment
    assert (back.round, back.silo_id, back.lr, back.local_steps) == (3, "silo-1", 1e-3, 7)
    assert back.params.keys() == plan.params.keys()
    for key, value in plan.params.items():
        assert torch.equal(back.params[key], value)


def test_upload_round_trip_keeps_params_and_embeddings_apart() -> None:
    upload = Upload(
        round=0, silo_id="a", params={"x.shared.A": torch.ones(2, 2)},
        embeddings={"x.client": torch.arange(4.0)}, n_samples=12,
        metrics={"metric": 0.5}, timings={"train_s": 1.5},
    )
    back = protocol.decode(protocol.encode(upload))
    assert isinstance(back, Upload)
    assert set(back.params) == {"x.shared.A"} and set(back.embeddings) == {"x.client"}
    assert torch.equal(back.embeddings["x.client"], torch.arange(4.0))
    assert back.metrics == {"metric": 0.5} and back.n_samples == 12


def test_wire_overhead_is_small_for_realistic_payloads() -> None:
    params = {f"layer{i}.expert.{j}.A": torch.randn(8, 576) for i in range(4) for j in range(8)}
    plan = RoundPlan(0, "s", 1, 1e-3, 1, {}, params)
    raw = protocol.tensor_bytes(params)
    assert len(protocol.encode(plan)) < raw * 1.02


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "too short"),
        (b"GARBAGE-GARBAGE-GARBAGE", "bad magic"),
        (protocol.MAGIC + b"\x63\x00\x00\x00\x02{}", "version 99"),
        (protocol.MAGIC + b"\x01\x00\x00\x00\x05{abc}", "not valid JSON"),
        (protocol.MAGIC + b"\x01\x00\x00\xff\xff{}", "exceeds"),
        (_frame(b'{"type":"xx"}'), "unknown message type"),
        (_frame(b'{"type":"plan"}'), "malformed plan"),
        (_frame(b"[1, 2]"), "JSON object"),
    ],
)
def test_malformed_bytes_raise_protocol_error_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(protocol.ProtocolError, match=reason):
        protocol.decode(data)


def test_corrupt_tensor_payload_is_a_protocol_error() -> None:
    data = protocol.encode(_plan())
    with pytest.raises(protocol.ProtocolError, match="safetensors"):
        protocol.decode(data[:-10])
