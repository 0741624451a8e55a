"""Outer SGD: hand-computed steps, equality with torch.optim.SGD, FedAvg case, resume, errors."""

from __future__ import annotations

import json

import pytest
import torch

from fedsilo.sdk.aggregation.outer_optimizer import OuterSGD

A = "layers.0.q_proj.shared.A"
B = "layers.0.q_proj.shared.B"


def t(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def test_nesterov_steps_by_hand() -> None:
    # lr 1, momentum 0.5, Nesterov. All values are exact in binary floating point.
    opt = OuterSGD(lr=1.0, momentum=0.5, nesterov=True)

    # Step 1: p = [1, 2], avg = [0, 1] -> g = [1, 1]; buf = g = [1, 1];
    # d = g + 0.5 * buf = [1.5, 1.5]; new = p - d = [-0.5, 0.5].
    p1 = opt.step({A: t(1, 2)}, {A: t(0, 1)})
    torch.testing.assert_close(p1[A], t(-0.5, 0.5), rtol=0, atol=0)

    # Step 2: p = [-0.5, 0.5], avg = [-1.5, 0.5] -> g = [1, 0];
    # buf = 0.5 * [1, 1] + [1, 0] = [1.5, 0.5]; d = [1, 0] + 0.5 * [1.5, 0.5] = [1.75, 0.25];
    # new = [-0.5 - 1.75, 0.5 - 0.25] = [-2.25, 0.25].
    p2 = opt.step(p1, {A: t(-1.5, 0.5)})
    torch.testing.assert_close(p2[A], t(-2.25, 0.25), rtol=0, atol=0)

    # Step 3: p = [-2.25, 0.25], avg = [-2.25, 1.25] -> g = [0, -1];
    # buf = 0.5 * [1.5, 0.5] + [0, -1] = [0.75, -0.75];
    # d = [0, -1] + 0.5 * [0.75, -0.75] = [0.375, -1.375]; new = [-2.625, 1.625].
    p3 = opt.step(p2, {A: t(-2.25, 1.25)})
    torch.testing.assert_close(p3[A], t(-2.625, 1.625), rtol=0, atol=0)
    assert opt.steps == 3


def test_plain_momentum_and_lr_by_hand() -> None:
    # lr 0.5, momentum 0.5, no Nesterov: d = buf.
    opt = OuterSGD(lr=0.5, momentum=0.5, nesterov=False)
    # Step 1: g = [2, -4]; buf = [2, -4]; new = [2, 0] - 0.5 * [2, -4] = [1, 2].
    p1 = opt.step({A: t(2, 0)}, {A: t(0, 4)})
    torch.testing.assert_close(p1[A], t(1, 2), rtol=0, atol=0)
    # Step 2: g = [1, 2] - [1, 0] = [0, 2]; buf = 0.5 * [2, -4] + [0, 2] = [1, 0];
    # new = [1, 2] - 0.5 * [1, 0] = [0.5, 2].
    p2 = opt.step(p1, {A: t(1, 0)})
    torch.testing.assert_close(p2[A], t(0.5, 2), rtol=0, atol=0)


def _rounds(seed: int, n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            A: torch.randn(3, 4, generator=g, dtype=torch.float64),
            B: torch.randn(5, generator=g, dtype=torch.float64),
        }
        for _ in range(n)
    ]


@pytest.mark.parametrize(("lr", "momentum", "nesterov"), [(1.0, 0.5, True), (0.7, 0.9, False)])
def test_matches_torch_sgd(lr: float, momentum: float, nesterov: bool) -> None:
    start = _rounds(0, 1)[0]
    averages = _rounds(1, 6)
    ref = {key: torch.nn.Parameter(value.clone()) for key, value in start.items()}
    sgd = torch.optim.SGD(
        list(ref.values()), lr=lr, momentum=momentum, nesterov=nesterov, foreach=False
    )
    opt = OuterSGD(lr=lr, momentum=momentum, nesterov=nesterov)
    params = {key: value.clone() for key, value in start.items()}
    for average in averages:
        sgd.zero_grad()
        for key, param in ref.items():
            param.grad = param.detach() - average[key]  # the same pseudo-gradient
        sgd.step()
        params = opt.step(params, average)
        for key, param in ref.items():
            torch.testing.assert_close(params[key], param.detach(), rtol=0, atol=0)


def test_momentum_zero_lr_one_is_fedavg() -> None:
    opt = OuterSGD(lr=1.0, momentum=0.0, nesterov=False)
    params = {A: t(1, 2, 3), B: t(4.5, dtype=torch.bfloat16)}
    for average in (
        {A: t(0.25, -1, 7), B: t(2, dtype=torch.bfloat16)},
        {A: t(3, 3, 3), B: t(-1, dtype=torch.bfloat16)},
    ):
        params = opt.step(params, average)
        for key in average:
            torch.testing.assert_close(params[key], average[key], rtol=0, atol=0)
    tensors, meta = opt.state_dict()
    assert tensors == {}
    assert meta["steps"] == 2


def test_dtype_device_kept_and_inputs_untouched() -> None:
    opt = OuterSGD()
    params = {A: t(1, 2, dtype=torch.bfloat16), B: t(1, 2, dtype=torch.float64)}
    average = {A: t(0, 0, dtype=torch.bfloat16), B: t(0, 0, dtype=torch.float64)}
    kept_params = {key: value.clone() for key, value in params.items()}
    kept_average = {key: value.clone() for key, value in average.items()}
    out = opt.step(params, average)
    assert out[A].dtype == torch.bfloat16 and out[B].dtype == torch.float64
    assert out[A] is not params[A] and out[B] is not params[B]
    for key in (A, B):
        assert torch.equal(params[key], kept_params[key])
        assert torch.equal(average[key], kept_average[key])
    # g = [1, 2], buf = g, d = 1.5 g -> new = [-0.5, -1].
    torch.testing.assert_close(out[B], t(-0.5, -1, dtype=torch.float64), rtol=0, atol=0)


def test_state_dict_round_trip_continues_identically() -> None:
    averages = _rounds(2, 6)
    params = _rounds(3, 1)[0]
    straight = OuterSGD()
    for average in averages[:3]:
        params = straight.step(params, average)
    tensors, meta = straight.state_dict()
    meta = json.loads(json.dumps(meta))  # JSON-able, as a checkpoint stores it
    assert meta == {
        "lr": 1.0,
        "momentum": 0.5,
        "nesterov": True,
        "steps": 3,
        "keys": sorted([A, B]),
    }
    assert all(value.dtype == torch.float64 for value in tensors.values())

    resumed = OuterSGD()
    resumed.load_state_dict({key: value.clone() for key, value in tensors.items()}, meta)
    assert resumed.steps == 3
    fresh = OuterSGD().step(params, averages[3])  # no buffers: would diverge
    a, b = params, dict(params)
    for i, average in enumerate(averages[3:]):
        a = straight.step(a, average)
        b = resumed.step(b, average)
        for key in a:
            assert torch.equal(a[key], b[key])
        if i == 0:
            assert not torch.equal(a[A], fresh[A])  # the restored momentum mattered


def test_state_dict_is_a_copy() -> None:
    opt = OuterSGD()
    opt.step({A: t(1, 1)}, {A: t(0, 0)})
    tensors, _ = opt.state_dict()
    tensors[A].fill_(100.0)
    assert torch.equal(opt.state_dict()[0][A], t(1, 1, dtype=torch.float64))


def test_load_refuses_other_settings() -> None:
    opt = OuterSGD(lr=1.0, momentum=0.5, nesterov=True)
    opt.step({A: t(1)}, {A: t(0)})
    tensors, meta = opt.state_dict()
    for other in (
        OuterSGD(lr=0.5),
        OuterSGD(momentum=0.9),
        OuterSGD(momentum=0.5, nesterov=False),
    ):
        with pytest.raises(ValueError, match="other settings"):
            other.load_state_dict(tensors, meta)
    with pytest.raises(ValueError, match="do not match"):
        OuterSGD().load_state_dict({}, meta)
    with pytest.raises(ValueError, match="steps"):
        OuterSGD().load_state_dict(tensors, {**meta, "steps": -1})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"momentum": -0.1}, "momentum"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": 0.0, "nesterov": True}, "Nesterov"),
    ],
)
def test_validation(kwargs: dict[str, float | bool], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OuterSGD(**kwargs)  # type: ignore[arg-type]


def test_key_and_shape_mismatch() -> None:
    opt = OuterSGD()
    with pytest.raises(ValueError, match=r"missing from average: \['" + B + r"'\]"):
        opt.step({A: t(1), B: t(1)}, {A: t(0)})
    with pytest.raises(ValueError, match=r"not in params: \['extra'\]"):
        opt.step({A: t(1)}, {A: t(0), "extra": t(0)})
    with pytest.raises(ValueError, match="shape mismatch"):
        opt.step({A: t(1, 2)}, {A: t(0)})
    opt.step({A: t(1, 2)}, {A: t(0, 0)})
    with pytest.raises(ValueError, match="momentum buffer"):
        opt.step({A: t(1)}, {A: t(0)})
    # Failed calls left the state untouched.
    tensors, meta = opt.state_dict()
    assert meta["steps"] == 1
    assert torch.equal(tensors[A], t(1, 2, dtype=torch.float64))
