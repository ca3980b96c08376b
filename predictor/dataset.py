"""Profiling records as network inputs, and the held-out splits behind the model card's errors.

- unseen: model combinations left out of training entirely (multi-task combinations outside `protected`,
  which are the ones the benchmarks rely on);
- seen: held-out configurations of combinations that stay in training. A configuration (the same models, batches
  and shares) measured more than once is held out or trained on as a whole, never both.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from predictor.encoding import encode_inputs
from predictor.features import extract
from predictor.records import FOCUS, Record, task_spec


@dataclass(frozen=True)
class Samples:
    x: np.ndarray  # (N, MAX_TASKS, N_INPUTS)
    mask: np.ndarray  # (N, MAX_TASKS)
    throughput: np.ndarray  # (N, MAX_TASKS), images/s, 0 in masked slots
    combos: list[tuple[str, ...]]  # sorted model names of each record

    def take(self, index: np.ndarray) -> Samples:
        return Samples(
            self.x[index], self.mask[index], self.throughput[index], [self.combos[i] for i in index]
        )

    def __len__(self) -> int:
        return len(self.combos)

    def configuration(self, i: int) -> tuple[bytes, ...]:
        """Record i's configuration: its tasks' network inputs (model features, batch, share), in any order."""
        return tuple(sorted(row.tobytes() for row in self.x[i][self.mask[i] > 0]))


def build(records: list[Record]) -> Samples:
    xs, masks, ys, combos = [], [], [], []
    for record in records:
        tasks = [extract(task_spec(record, t)) for t in record.tasks]
        x, mask = encode_inputs(
            tasks, np.array([[t.batch for t in record.tasks]]), np.array([[t.resource for t in record.tasks]])
        )
        y = np.zeros_like(mask)
        y[0, : len(record.tasks)] = [t.throughput for t in record.tasks]
        xs.append(x[0])
        masks.append(mask[0])
        ys.append(y[0])
        combos.append(record.combination)
    return Samples(np.stack(xs), np.stack(masks), np.stack(ys), combos)


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    seen: np.ndarray
    unseen: np.ndarray
    unseen_combos: list[tuple[str, ...]]


def split(
    samples: Samples, *, unseen_share: float = 0.2, seen_share: float = 0.15, seed: int = 0, protected=FOCUS
) -> Split:
    rng = random.Random(seed)
    keep = {tuple(sorted(c)) for c in protected}
    candidates = sorted({c for c in samples.combos if len(c) > 1 and c not in keep})
    unseen_combos = sorted(rng.sample(candidates, round(unseen_share * len(candidates))))
    held = set(unseen_combos)
    unseen = [i for i, c in enumerate(samples.combos) if c in held]
    counts: dict[tuple[str, ...], int] = {}
    for c in samples.combos:
        counts[c] = counts.get(c, 0) + 1
    rest = [i for i, c in enumerate(samples.combos) if c not in held]
    configurations: dict[tuple[bytes, ...], list[int]] = {}  # in order of first record
    for i in rest:
        configurations.setdefault(samples.configuration(i), []).append(i)
    groups = list(configurations.values())
    eligible = [g for g in groups if counts[samples.combos[g[0]]] >= 3]
    held_out = rng.sample(eligible, round(seen_share * len(eligible)))
    # every seen combination keeps a configuration in training
    for combo in {samples.combos[g[0]] for g in held_out}:
        if all(g in held_out for g in groups if samples.combos[g[0]] == combo):
            held_out.remove(next(g for g in groups if samples.combos[g[0]] == combo))
    seen = {i for g in held_out for i in g}
    train = sorted(set(rest) - seen)
    return Split(
        np.array(train, dtype=int),
        np.array(sorted(seen), dtype=int),
        np.array(unseen, dtype=int),
        unseen_combos,
    )


def mape(predicted: np.ndarray, actual: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute percentage error over the unmasked task slots, in percent."""
    valid = mask.astype(bool)
    return float(100 * np.mean(np.abs(predicted[valid] - actual[valid]) / actual[valid]))


def mape_interval(
    predicted: np.ndarray, actual: np.ndarray, mask: np.ndarray, *, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% bootstrap interval (percent) of `mape`, resampling whole records (a window's tasks err together)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(actual), size=(resamples, len(actual)))
    valid = mask.astype(bool)
    errors = np.where(valid, np.abs(predicted - actual) / np.where(valid, actual, 1.0), 0.0)
    values = 100 * errors[picks].sum(axis=(1, 2)) / valid[picks].sum(axis=(1, 2))
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)
