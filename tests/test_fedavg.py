"""StreamingFedAvg against an independent numpy reference: weighted average of local weights (FedMT Eq. 1)."""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest

from aggregator.strategies.fedavg import StreamingFedAvg
from protocol import ProtocolError

SAMPLES = (10, 250, 3)
FLOAT_TOLERANCE = {np.float16: 1e-3, np.float32: 1e-6, np.float64: 1e-12}


def make_global(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "fc.weight": rng.normal(size=(5, 7)).astype(np.float16),
        "fc.bias": rng.normal(size=(5,)).astype(np.float64),
        "bn.num_batches_tracked": np.array(100, dtype=np.int64),
        "mask": np.array([True, False, True]),
    }


def make_delta(rng: np.random.Generator, base: dict[str, np.ndarray], steps: int) -> dict[str, np.ndarray]:
    delta = {}
    for name, array in base.items():
        if array.dtype == np.bool_:
            delta[name] = rng.integers(0, 2, size=array.shape).astype(bool)
        elif array.dtype.kind == "i":
            delta[name] = np.full(array.shape, steps, dtype=array.dtype)
        else:
            delta[name] = (rng.normal(scale=0.1, size=array.shape)).astype(array.dtype)
    return delta


def reference(base, deltas, samples) -> dict[str, np.ndarray]:
    """Weighted mean of the local weights w_k = base + delta_k, computed independently in float64."""
    out = {}
    for name, array in base.items():
        if array.dtype == np.bool_:
            out[name] = array.copy()
            continue
        local = [array.astype(np.float64) + d[name].astype(np.float64) for d in deltas]
        mean = sum(n * w for n, w in zip(samples, local, strict=True)) / sum(samples)
        out[name] = (np.rint(mean) if array.dtype.kind == "i" else mean).astype(array.dtype)
    return out


def assert_state_close(actual, expected) -> None:
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if want.dtype.kind == "f":
            tol = FLOAT_TOLERANCE[want.dtype.type]
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=name)
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def test_matches_weighted_average_of_local_weights(rng):
    base = make_global(rng)
    deltas = [make_delta(rng, base, steps) for steps in (5, 7, 3)]
    avg = StreamingFedAvg(base)
    for delta, n in zip(deltas, SAMPLES, strict=True):
        avg.fold(delta, n)
    assert avg.count == 3 and avg.total_weight == sum(SAMPLES)
    result = avg.result()
    assert_state_close(result, reference(base, deltas, SAMPLES))
    # int64 buffer is rounded, not truncated: 100 + (10*5 + 250*7 + 3*3) / 263 = 106.88 -> 107
    assert result["bn.num_batches_tracked"] == 107
    np.testing.assert_array_equal(result["mask"], base["mask"])


def test_result_does_not_modify_global_and_can_be_repeated(rng):
    base = make_global(rng)
    snapshot = {k: v.copy() for k, v in base.items()}
    avg = StreamingFedAvg(base)
    avg.fold(make_delta(rng, base, 4), 9)
    first = avg.result()
    second = avg.result()
    for name in base:
        np.testing.assert_array_equal(base[name], snapshot[name])
        np.testing.assert_array_equal(first[name], second[name])
        assert first[name] is not base[name]


def test_single_update_returns_global_plus_delta(rng):
    base = make_global(rng)
    delta = make_delta(rng, base, 6)
    avg = StreamingFedAvg(base)
    avg.fold(delta, 7)
    result = avg.result()
    for name, array in base.items():
        expected = array if array.dtype == np.bool_ else array + delta[name]
        np.testing.assert_array_equal(result[name], expected, err_msg=name)


def test_fold_order_does_not_matter(rng):
    base = make_global(rng)
    deltas = [make_delta(rng, base, steps) for steps in (5, 7, 3)]
    results = []
    for order in itertools.permutations(range(3)):
        avg = StreamingFedAvg(base)
        for i in order:
            avg.fold(deltas[i], SAMPLES[i])
        results.append(avg.result())
    for other in results[1:]:
        assert_state_close(other, results[0])


def test_fold_order_is_exact_for_small_integer_float64_values(rng):
    base = {"w": rng.integers(-50, 50, size=(64,)).astype(np.float64)}
    deltas = [{"w": rng.integers(-9, 10, size=(64,)).astype(np.float64)} for _ in range(4)]
    weights = (10, 250, 3, 41)
    results = []
    for order in itertools.permutations(range(4)):
        avg = StreamingFedAvg(base)
        for i in order:
            avg.fold(deltas[i], weights[i])
        results.append(avg.result()["w"])
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


def test_integer_tensors_saturate_instead_of_wrapping():
    base = {"q": np.array([120, -120], dtype=np.int8)}
    avg = StreamingFedAvg(base)
    avg.fold({"q": np.array([100, -100], dtype=np.int8)}, 1)
    np.testing.assert_array_equal(avg.result()["q"], np.array([127, -128], dtype=np.int8))


def test_result_before_any_fold_raises(rng):
    with pytest.raises(ValueError, match="nothing"):
        StreamingFedAvg(make_global(rng)).result()


def _drop(d):
    d.pop("fc.bias")


def _add(d):
    d["extra"] = np.zeros(3, np.float32)


def _reshape(d):
    d["fc.weight"] = np.zeros((7, 5), np.float16)


def _retype(d):
    d["conv.weight"] = d["conv.weight"].astype(np.float64)


def _nan(d):
    d["conv.weight"][0, 0, 0, 0] = np.nan


def _inf(d):
    d["fc.weight"][1, 1] = -np.inf


BAD_DELTAS = {"missing": _drop, "extra": _add, "shape": _reshape, "dtype": _retype, "nan": _nan, "inf": _inf}
BAD_WEIGHTS = {"zero": 0, "negative": -3, "nan": float("nan"), "inf": float("inf"), "bool": True, "str": "10"}


@pytest.mark.parametrize(
    "mutate, weight",
    [(fn, 5) for fn in BAD_DELTAS.values()] + [(None, w) for w in BAD_WEIGHTS.values()],
    ids=[f"delta-{k}" for k in BAD_DELTAS] + [f"weight-{k}" for k in BAD_WEIGHTS],
)
def test_invalid_fold_raises_and_changes_nothing(rng, mutate, weight):
    base = make_global(rng)
    good = make_delta(rng, base, 5)
    bad = make_delta(rng, base, 2)
    if mutate is not None:
        mutate(bad)

    fresh = StreamingFedAvg(base)
    with pytest.raises(ProtocolError):
        fresh.validate(bad, weight)
    with pytest.raises(ProtocolError):
        fresh.fold(bad, weight)
    assert fresh.count == 0 and fresh.total_weight == 0
    with pytest.raises(ValueError):
        fresh.result()

    avg = StreamingFedAvg(base)
    avg.validate(good, 10)
    assert avg.count == 0 and avg.total_weight == 0  # validate alone folds nothing
    avg.fold(good, 10)
    with pytest.raises(ProtocolError):
        avg.fold(bad, weight)
    assert avg.count == 1 and avg.total_weight == 10
    assert_state_close(avg.result(), reference(base, [good], [10]))


def test_numpy_scalar_weights_are_accepted(rng):
    base = make_global(rng)
    avg = StreamingFedAvg(base)
    avg.fold(make_delta(rng, base, 1), np.int64(3))
    avg.fold(make_delta(rng, base, 1), np.float32(2.5))
    assert avg.total_weight == 5.5


def test_memory_does_not_grow_with_number_of_folds(rng):
    base = {
        "w": rng.normal(size=(100, 100)).astype(np.float32),
        "steps": np.array(0, np.int64),
        "mask": np.ones(10, bool),
    }
    avg = StreamingFedAvg(base)
    elements = sum(a.size for a in base.values() if a.dtype != np.bool_)
    buffers = dict(avg._sums)
    assert sum(b.nbytes for b in buffers.values()) == 8 * elements

    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for k in range(200):
            avg.fold(
                {
                    "w": np.full((100, 100), 0.01, np.float32),
                    "steps": np.array(1, np.int64),
                    "mask": np.zeros(10, bool),
                },
                k + 1,
            )
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert avg.count == 200
    assert avg._sums.keys() == buffers.keys()
    assert all(avg._sums[n] is buffers[n] for n in buffers)  # updated in place, never reallocated
    assert sum(b.nbytes for b in avg._sums.values()) == 8 * elements
    assert after - before < 64 * 1024  # 200 retained deltas would be ~8 MB
    result = avg.result()
    np.testing.assert_allclose(result["w"], base["w"] + np.float32(0.01), rtol=1e-6)
    assert result["steps"] == 1


def test_a_buffer_pool_hands_a_released_rounds_arrays_to_the_next_zeroed(rng):
    from aggregator.buffers import BufferPool

    base = {"w": np.zeros((4, 3), np.float32), "n": np.zeros((), np.int64)}
    pool = BufferPool()
    first = StreamingFedAvg(base, pool)
    first.fold({"w": np.ones((4, 3), np.float32), "n": np.array(2)}, 1.0)
    before = first.result()
    first.release()
    assert pool.held_bytes == 12 * 8 + 8 + 12 * 8  # the sums and the scratch space
    second = StreamingFedAvg(base, pool)
    assert pool.held_bytes == 0
    second.fold({"w": np.full((4, 3), 3.0, np.float32), "n": np.array(4)}, 1.0)
    np.testing.assert_array_equal(second.result()["w"], np.full((4, 3), 3.0, np.float32))  # zeroed, not 1 + 3
    assert before["n"] == 2 and second.result()["n"] == 4
