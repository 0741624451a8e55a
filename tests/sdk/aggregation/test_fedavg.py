"""Streaming FedAvg: hand-computed means, per-key contributors, memory, errors."""

from __future__ import annotations

import gc
import itertools
import json
import weakref

import pytest
import torch

from fedsilo.sdk.aggregation.fedavg import RunningMean, fedavg

SH = "layers.0.q_proj.shared.A"
E0 = "layers.0.q_proj.expert.0.A"
E1 = "layers.0.q_proj.expert.1.A"
E2 = "layers.0.q_proj.expert.2.A"


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_per_key_mean_by_hand() -> None:
    silo_a = {SH: t(1, 2), E0: t(2, 2)}
    silo_b = {SH: t(3, 4), E1: t(5, 5)}
    silo_c = {SH: t(5, 6), E0: t(4, 6)}
    kept = t(7, 7)
    previous = {SH: t(0, 0), E0: t(9, 9), E1: t(9, 9), E2: kept}

    out = fedavg([(silo_a, 1.0), (silo_b, 1.0), (silo_c, 1.0)], previous)

    assert set(out) == {SH, E0, E1, E2}
    torch.testing.assert_close(out[SH], t(3, 4))  # all three silos
    torch.testing.assert_close(out[E0], t(3, 4))  # only a and c trained expert 0
    torch.testing.assert_close(out[E1], t(5, 5))  # only b: its value, not diluted
    assert out[E2] is kept  # nobody trained expert 2: kept as is


def test_contributors_and_keys() -> None:
    mean = RunningMean()
    mean.add({SH: t(1), E0: t(1)})
    mean.add({SH: t(2)})
    assert mean.keys() == {SH, E0}
    assert mean.contributors(SH) == 2
    assert mean.contributors(E0) == 1
    assert mean.contributors(E1) == 0


def test_sample_weights() -> None:
    out = fedavg([({SH: t(0, 4)}, 1.0), ({SH: t(4, 0)}, 3.0)])
    torch.testing.assert_close(out[SH], t(3, 1))


def test_without_previous_only_sent_keys() -> None:
    out = fedavg([({E1: t(2)}, 2.0)])
    assert set(out) == {E1}
    torch.testing.assert_close(out[E1], t(2))


def test_shape_mismatch_names_key_and_shapes_and_leaves_state() -> None:
    mean = RunningMean()
    mean.add({SH: torch.zeros(2, 3)})
    with pytest.raises(ValueError) as err:
        mean.add({E0: torch.ones(1), SH: torch.ones(3, 2)})
    message = str(err.value)
    assert SH in message and "(3, 2)" in message and "(2, 3)" in message
    # the rejected upload changed nothing, not even its valid key
    assert mean.keys() == {SH}
    assert mean.contributors(SH) == 1


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_weight(weight: float) -> None:
    with pytest.raises(ValueError, match="weight"):
        RunningMean().add({SH: t(1)}, weight)


def test_dtype_of_first_contribution_and_accumulation_precision() -> None:
    mean = RunningMean()
    value = torch.tensor([1.0 + 2**-7], dtype=torch.bfloat16)
    for _ in range(300):
        mean.add({SH: value})
    out = mean.result({E2: torch.zeros(1, dtype=torch.float16)})
    assert out[SH].dtype == torch.bfloat16
    assert out[E2].dtype == torch.float16
    # a bf16 running sum would have lost the 2**-7 long before 300 terms
    assert out[SH].item() == value.item()

    double = fedavg([({SH: torch.tensor([0.1], dtype=torch.float64)}, 1.0)] * 3)
    assert double[SH].dtype == torch.float64
    assert double[SH].item() == pytest.approx(0.1, abs=1e-15)


def test_memory_one_tensor_per_key_and_no_references_to_uploads() -> None:
    mean = RunningMean()
    refs = []
    for i in range(20):
        upload = {SH: torch.full((4, 4), float(i)), E0 if i % 2 else E1: torch.ones(4, 4)}
        refs += [weakref.ref(v) for v in upload.values()]
        mean.add(upload)
        del upload
    gc.collect()
    assert all(r() is None for r in refs), "RunningMean kept a reference to an upload"
    held = [
        v
        for attr in vars(mean).values()
        if isinstance(attr, dict)
        for v in attr.values()
        if isinstance(v, torch.Tensor)
    ]
    assert len(held) == 3  # one running sum per key, independent of the 20 silos
    torch.testing.assert_close(mean.result()[SH], torch.full((4, 4), 9.5))


def test_inputs_not_aliased() -> None:
    x = t(1, 1)
    mean = RunningMean()
    mean.add({SH: x})
    x.add_(100)
    out = mean.result()
    torch.testing.assert_close(out[SH], t(1, 1))
    out[SH].add_(5)
    torch.testing.assert_close(mean.result()[SH], t(1, 1))


def _uploads(dtype: torch.dtype) -> list[tuple[dict[str, torch.Tensor], float]]:
    """4 silos, random tensors of very different magnitudes, some keys missing."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for i, scale in enumerate([1e-3, 1.0, 3e2, 5e3]):  # fp16 tops out at 65504
        upload = {SH: (torch.randn(64, generator=gen) * scale).to(dtype)}
        if i % 2 == 0:
            upload[E0] = (torch.randn(3, 5, generator=gen) * scale).to(dtype)
        out.append((upload, float(10 + 7 * i)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weighted", [False, True])
def test_mean_does_not_depend_on_arrival_order(dtype: torch.dtype, weighted: bool) -> None:
    uploads = _uploads(dtype)
    results = []
    for order in itertools.permutations(uploads):
        mean = RunningMean()
        for tensors, weight in order:
            mean.add(tensors, weight if weighted else 1.0)
        results.append(mean.result({E2: t(1)}))
    first = results[0]
    assert list(first) == [E2, E0, SH]  # previous's order, then new keys sorted
    assert first[SH].dtype == dtype
    for other in results[1:]:
        assert list(other) == list(first)
        assert all(torch.equal(other[k], first[k]) for k in first)


def test_state_round_trip_mid_stream_continues_exactly() -> None:
    uploads = [*_uploads(torch.float32), ({SH: torch.randn(64).bfloat16()}, 2.0)]
    uninterrupted = RunningMean()
    for tensors, weight in uploads:
        uninterrupted.add(tensors, weight)
    for cut in range(len(uploads) + 1):
        mean = RunningMean()
        for tensors, weight in uploads[:cut]:
            mean.add(tensors, weight)
        state, meta = mean.state_dict()
        resumed = RunningMean()
        resumed.load_state_dict(state, json.loads(json.dumps(meta)))  # as a checkpoint would
        for value in state.values():
            value.zero_()  # the loaded state must not alias the tensors it was given
        for tensors, weight in uploads[cut:]:
            resumed.add(tensors, weight)
        expected, got = uninterrupted.result(), resumed.result()
        assert list(got) == list(expected)
        for key in expected:
            assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key])
            assert resumed.contributors(key) == uninterrupted.contributors(key)


def test_state_dict_is_a_snapshot_and_bad_state_is_refused() -> None:
    mean = RunningMean()
    mean.add({SH: t(1, 2)})
    state, meta = mean.state_dict()
    mean.add({SH: t(3, 4)})  # folding on must not change a snapshot being written
    assert torch.equal(state[SH], torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert meta == {"weights": {SH: 1.0}, "counts": {SH: 1}, "dtypes": {SH: "float32"}}
    with pytest.raises(ValueError, match="different keys"):
        RunningMean().load_state_dict({}, meta)
    with pytest.raises(ValueError, match="unknown torch dtype"):
        RunningMean().load_state_dict(state, {**meta, "dtypes": {SH: "Tensor"}})


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed_mean"])
def test_a_key_fewer_than_min_contributors_sent_keeps_its_value(rule: str) -> None:
    """With min_contributors = 2 no single silo's tensor is published as it sent it: a
    key one contribution carried keeps its previous value (a new one is left out)."""
    from fedsilo.sdk.aggregation.robust import new_mean

    previous = {"both": torch.zeros(3), "one": torch.full((3,), 7.0)}
    mean = new_mean(rule, 0.0, min_contributors=2)  # type: ignore[arg-type]
    mean.add({"both": torch.ones(3), "one": torch.full((3,), 5.0), "new": torch.ones(3)})
    mean.add({"both": torch.full((3,), 3.0)})
    out = mean.result(previous)
    assert torch.equal(out["both"], torch.full((3,), 2.0))
    assert out["one"] is previous["one"]  # the lone update is not published
    assert "new" not in out
    assert RunningMean(1).result(None) == {}


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_min_contributors_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(ValueError, match="min_contributors"):
        RunningMean(bad)  # type: ignore[arg-type]
