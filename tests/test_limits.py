"""The operator's limits on one update: the weight cap (and registry) and the L2 norm bound, clip or reject."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.limits import UpdateLimits, limit_update, scale_delta
from protocol import ProtocolError


def update(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "conv.weight": rng.normal(0, scale, (4, 3, 3, 3)).astype(np.float32),
        "fc.weight": rng.normal(0, scale, (5, 7)).astype(np.float16),
        "fc.bias": rng.normal(0, scale, 5).astype(np.float64),
        "bn.num_batches_tracked": np.array(10**6, np.int64),
        "mask": np.array([True, False]),
    }


def reference_norm(delta: dict[str, np.ndarray]) -> float:
    return float(
        np.linalg.norm(
            np.concatenate([a.astype(np.float64).ravel() for a in delta.values() if a.dtype.kind == "f"])
        )
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def test_no_limits_change_nothing(rng):
    delta = update(rng)
    limited = limit_update(delta, 123, UpdateLimits())
    assert (limited.weight, limited.scale, limited.notes) == (123, 1.0, ())
    assert limited.delta is delta


def test_a_declared_count_above_the_cap_is_clipped_or_rejected(rng):
    delta = update(rng)
    assert limit_update(delta, 500, UpdateLimits(max_samples=500)).weight == 500  # at the cap: untouched
    clipped = limit_update(delta, 10**9, UpdateLimits(max_samples=500))
    assert clipped.weight == 500 and clipped.delta is delta
    assert clipped.notes == ("weight capped at 500 samples (declared 1000000000)",)
    with pytest.raises(ProtocolError, match="claims 1000000000 samples, above the task's cap of 500"):
        limit_update(delta, 10**9, UpdateLimits(max_samples=500, samples_excess="reject"))


def test_registered_samples_replace_the_devices_word_and_are_capped_too(rng):
    delta = update(rng)
    registered = limit_update(delta, 10**9, UpdateLimits(), registered=40)
    assert registered.weight == 40 and "registry (declared 1000000000)" in registered.notes[0]
    assert limit_update(delta, 40, UpdateLimits(), registered=40).notes == ()
    assert limit_update(delta, 10, UpdateLimits(max_samples=30), registered=40).weight == 30


@pytest.mark.parametrize("bound", [0.5, 3.0])
def test_a_delta_beyond_the_norm_bound_is_scaled_onto_it(rng, bound):
    delta = update(rng)
    norm = reference_norm(delta)
    assert 5 < norm < 20
    limited = limit_update(delta, 10, UpdateLimits(max_norm=bound))
    assert limited.scale == pytest.approx(bound / norm, rel=1e-6)  # squares summed in float32 blocks
    assert reference_norm(limited.delta) == pytest.approx(bound, rel=1e-3)  # float16 storage rounds
    for name, array in delta.items():
        assert limited.delta[name].dtype == array.dtype, name
        if array.dtype.kind == "f":  # same direction
            np.testing.assert_allclose(limited.delta[name], array * limited.scale, rtol=2e-3, atol=1e-6)
        else:  # step counters and masks are not part of the norm and are not scaled
            np.testing.assert_array_equal(limited.delta[name], array)
    assert limited.notes == (f"delta norm {norm:.4g} clipped to {bound:.4g}",)


def test_a_delta_within_the_bound_is_untouched_and_one_beyond_may_be_rejected(rng):
    delta = update(rng)
    norm = reference_norm(delta)
    assert limit_update(delta, 10, UpdateLimits(max_norm=norm * 1.01)).delta is delta
    with pytest.raises(ProtocolError, match="exceeds the task's bound of 0.5"):
        limit_update(delta, 10, UpdateLimits(max_norm=0.5, norm_excess="reject"))


def test_a_norm_that_overflows_float64_still_clips_to_a_finite_positive_scale():
    delta = {"w": np.full(1000, 1e307, np.float64), "b": np.full(3, 65000, np.float16)}
    limited = limit_update(delta, 1, UpdateLimits(max_norm=1.0))
    assert 0 < limited.scale < 1 and "delta norm inf" in limited.notes[0]
    assert reference_norm(limited.delta) == pytest.approx(1.0, rel=1e-9)


def test_an_all_zero_delta_has_norm_zero(rng):
    delta = {"w": np.zeros(3, np.float32), "steps": np.array(5, np.int64)}
    assert limit_update(delta, 1, UpdateLimits(max_norm=1e-9)).scale == 1.0


def test_scaling_by_one_is_the_identity_and_other_factors_keep_dtypes(rng):
    delta = update(rng)
    assert scale_delta(delta, 1.0) is delta
    halved = scale_delta(delta, 0.5)
    assert {n: a.dtype for n, a in halved.items()} == {n: a.dtype for n, a in delta.items()}
    np.testing.assert_array_equal(halved["conv.weight"], delta["conv.weight"] * np.float32(0.5))


@pytest.mark.parametrize(
    "scale", [1e-25, 1e-3, 1e15], ids=["squares-underflow", "typical", "squares-overflow"]
)
def test_the_norm_of_large_tensors_is_exact_to_a_millionth_whatever_the_magnitude(rng, scale):
    delta = {
        "big": (rng.normal(0, 1, 300_000) * scale).astype(np.float32),
        "half": (rng.normal(0, 1, 20_000) * min(scale, 1e4)).astype(np.float16),
    }
    norm = limit_update(delta, 1, UpdateLimits()).norm
    assert norm == pytest.approx(reference_norm(delta), rel=1e-6) and norm > 0
