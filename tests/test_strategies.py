"""Aggregation strategies against plain numpy references on random updates; the registry; bounded windows."""

from __future__ import annotations

import importlib
import pkgutil
import tracemalloc
import typing

import msgspec
import numpy as np
import pytest

import aggregator.strategies as strategies
from aggregator.strategies import StrategySpec, StrategySpecBase, StreamingFedAvg
from aggregator.strategies.fedprox import FedProxSpec
from aggregator.strategies.median import MedianSpec
from aggregator.strategies.trimmed_mean import TrimmedMeanSpec
from protocol import ProtocolError
from tests.test_fedavg import assert_state_close, make_delta, make_global, reference

SPECS = typing.get_args(StrategySpec)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(2024)


def sorted_deltas(deltas: list[dict], name: str) -> np.ndarray:
    """The updates' values of one tensor, float64, sorted per coordinate: shape (n, *tensor)."""
    return np.sort(np.stack([d[name].astype(np.float64) for d in deltas]), axis=0)


def trimmed(deltas: list[dict], name: str, fraction: float) -> np.ndarray:
    values = sorted_deltas(deltas, name)
    k = int(fraction * len(values))
    return values[k : len(values) - k].mean(axis=0)


def median(deltas: list[dict], name: str) -> np.ndarray:
    values = sorted_deltas(deltas, name)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def windowed_reference(base: dict, deltas: list[dict], window: int, rule) -> dict[str, np.ndarray]:
    """The rule over consecutive windows of `window` updates, the windows averaged by their sizes."""
    out = {}
    for name, array in base.items():
        if array.dtype == np.bool_:
            out[name] = array.copy()
            continue
        windows = [deltas[i : i + window] for i in range(0, len(deltas), window)]
        combined = sum(len(w) * rule(w, name) for w in windows) / len(deltas)
        local = array.astype(np.float64) + combined
        out[name] = (np.rint(local) if array.dtype.kind in "iu" else local).astype(array.dtype)
    return out


RULES = {
    "median": (lambda window: MedianSpec(window=window), median),
    "trimmed_mean": (
        lambda window: TrimmedMeanSpec(window=window, trim_fraction=0.2),
        lambda deltas, name: trimmed(deltas, name, 0.2),
    ),
}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("count, window", [(1, 4), (5, 8), (6, 8), (7, 3), (10, 5), (11, 4)])
def test_robust_rules_match_numpy_over_their_windows(rng, rule, count, window):
    make_spec, reference_rule = RULES[rule]
    base = make_global(rng)
    deltas = [make_delta(rng, base, steps) for steps in rng.integers(1, 9, size=count)]
    strategy = make_spec(window).build(base)
    for delta, weight in zip(deltas, rng.integers(1, 1000, size=count)):
        strategy.fold(delta, weight)
    assert strategy.count == count
    assert_state_close(strategy.result(), windowed_reference(base, deltas, window, reference_rule))


@pytest.mark.parametrize("rule", RULES)
def test_robust_rules_ignore_sample_counts_and_outvote_an_outlier(rng, rule):
    base = {"w": np.zeros(64, np.float32)}
    honest = [{"w": rng.normal(0, 0.01, 64).astype(np.float32)} for _ in range(6)]
    attack = {"w": np.full(64, 1e6, np.float32)}
    spec = RULES[rule][0](16)
    results = []
    for attack_weight in (1, 10**9):
        strategy = spec.build(base)
        for delta in [*honest[:3], attack, *honest[3:]]:
            strategy.fold(delta, attack_weight if delta is attack else 100)
        results.append(strategy.result()["w"])
    np.testing.assert_array_equal(results[0], results[1])  # weights change nothing
    assert np.abs(results[0]).max() <= np.abs(np.stack([h["w"] for h in honest])).max()


def test_trimmed_mean_without_trimming_is_the_plain_mean(rng):
    base = make_global(rng)
    deltas = [make_delta(rng, base, steps) for steps in (1, 2, 3, 4)]
    strategy = TrimmedMeanSpec(trim_fraction=0.0, window=4).build(base)
    for delta, weight in zip(deltas, (5, 50, 500, 5000)):
        strategy.fold(delta, weight)
    assert_state_close(strategy.result(), reference(base, deltas, [1, 1, 1, 1]))


def test_fedprox_aggregates_like_fedavg_and_sends_its_mu(rng):
    base = make_global(rng)
    deltas = [make_delta(rng, base, steps) for steps in (5, 7, 3)]
    strategy = FedProxSpec(mu=0.5).build(base)
    assert isinstance(strategy, StreamingFedAvg)
    for delta, weight in zip(deltas, (10, 250, 3)):
        strategy.fold(delta, weight)
    assert_state_close(strategy.result(), reference(base, deltas, [10, 250, 3]))
    assert FedProxSpec(mu=0.5).proximal_mu == 0.5
    assert {spec().proximal_mu for spec in SPECS if spec is not FedProxSpec} == {0.0}


@pytest.mark.parametrize("spec", SPECS)
def test_every_strategy_validates_before_it_folds_and_result_changes_nothing(rng, spec):
    base = make_global(rng)
    strategy = spec().build(base)
    with pytest.raises(ValueError, match="nothing to aggregate"):
        strategy.result()
    good = make_delta(rng, base, 2)
    bad = {**good, "fc.bias": np.full(5, np.nan)}
    for delta, weight in ((bad, 1), (good, 0), ({**good, "extra": np.zeros(1)}, 1)):
        with pytest.raises(ProtocolError):
            strategy.fold(delta, weight)
    strategy.fold(good, 3)
    first, second = strategy.result(), strategy.result()
    assert strategy.count == 1 and strategy.total_weight == 3
    assert_state_close(first, second)
    assert_state_close(first, reference(base, [good], [1]))  # one update: the base plus its delta


def test_windows_bound_the_updates_a_robust_rule_holds():
    base = {"w": np.zeros((100, 100), np.float32)}
    strategy = MedianSpec(window=4).build(base)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for k in range(100):
            strategy.fold({"w": np.full((100, 100), k, np.float32)}, 1)  # 40 kB each, dropped by the caller
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 5 * 40_000  # at most 4 held updates, not 100 (4 MB)
    assert peak - before < 16 * 80_000  # and the working space of one window
    # windows (0..3), (4..7), ...: each median is k0 + 1.5, averaged: 49.5
    assert strategy.result()["w"][0, 0] == pytest.approx(49.5)


def test_every_strategy_module_is_in_the_registry_with_its_own_name():
    found = set()
    for module in pkgutil.iter_modules(strategies.__path__):
        for value in vars(importlib.import_module(f"{strategies.__name__}.{module.name}")).values():
            if (
                isinstance(value, type)
                and issubclass(value, StrategySpecBase)
                and value is not StrategySpecBase
            ):
                found.add(value)
    assert found == set(SPECS)
    names = [spec.__struct_config__.tag for spec in SPECS]
    assert sorted(names) == sorted(set(names)) == ["fedavg", "fedprox", "median", "trimmed_mean"]


@pytest.mark.parametrize(
    "table, problem",
    [
        ({"name": "krum"}, "Invalid value 'krum'"),
        ({"name": "median", "window": 0}, ">= 1"),
        ({"name": "median", "window": 5000}, "<= 1024"),
        ({"name": "trimmed_mean", "trim_fraction": 0.5}, "< 0.5"),
        ({"name": "fedprox", "mu": 0}, "> 0"),
        ({"name": "fedavg", "mu": 0.1}, "unknown field `mu`"),
    ],
)
def test_bad_strategy_tables_are_refused(table, problem):
    with pytest.raises(msgspec.ValidationError, match=problem):
        msgspec.convert(table, StrategySpec)
