"""Profiling records as network inputs, and the held-out splits behind the model card's errors.

- unseen: model combinations left out of training entirely (multi-task combinations outside `protected`,
  which are the ones the benchmarks rely on);
- seen: held-out configurations of combinations that stay in training.
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
        combos.append(tuple(sorted(t.model for t in record.tasks)))
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
    eligible = [i for i in rest if counts[samples.combos[i]] >= 3]
    seen = set(rng.sample(eligible, round(seen_share * len(eligible))))
    for combo in {samples.combos[i] for i in seen}:  # every seen combination keeps a record in training
        members = [i for i in rest if samples.combos[i] == combo]
        if all(i in seen for i in members):
            seen.discard(members[0])
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
