import torch

from fedsilo.sdk.messages import RoundPlan, Upload
from fedsilo.sdk.transport.memory import MemoryTransport


def test_messages_cross_as_copies_and_bytes_are_counted() -> None:
    transport = MemoryTransport()
    tensor = torch.zeros(4)
    size = transport.send_plan(RoundPlan(0, "a", 1, 0.1, 1, {}, {"k.shared.A": tensor}))
    assert transport.traffic.down == {"a": size}
    tensor += 1  # the sender mutating its tensor must not reach the receiver
    delivery = transport.receive_plan("a")
    assert delivery is not None and delivery.size == size
    assert torch.equal(delivery.message.params["k.shared.A"], torch.zeros(4))
    assert transport.receive_plan("a") is None
    assert transport.receive_plan("nobody") is None


def test_uploads_are_fifo() -> None:
    transport = MemoryTransport()
    for silo in ("a", "b"):
        transport.send_upload(Upload(0, silo, {}, {}, 1))
    first, second = transport.receive_upload(), transport.receive_upload()
    assert first is not None and second is not None
    assert [first.message.silo_id, second.message.silo_id] == ["a", "b"]
    assert transport.receive_upload() is None
    assert set(transport.traffic.up) == {"a", "b"}
