"""Streaming weighted FedAvg of one task's round (Eq. 1 of FedMT, weight = local samples).

Updates are deltas against one shared base, so averaging deltas equals averaging local weights:
new = base + sum_k(w_k * delta_k) / sum_k(w_k). Each update is folded into float64 running sums as it
arrives, so memory is one float64 buffer per tensor however many devices report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from protocol.errors import ProtocolError
from protocol.tensors import check_finite, check_layout, describe


class StreamingFedAvg:
    """Weighted running average of the updates of one task and one round, against `base` (the global state).

    `base` is kept by reference and must not be modified while the object is in use.
    Bool tensors (masks, flags) are not averaged: the result keeps the base value.
    """

    def __init__(self, base: Mapping[str, np.ndarray]) -> None:
        self._base = {name: np.asarray(array) for name, array in base.items()}
        self._layout = describe(self._base)
        self._sums = {
            name: np.zeros(array.shape, dtype=np.float64)
            for name, array in self._base.items()
            if array.dtype != np.bool_
        }
        self._count = 0
        self._total_weight = 0.0

    @property
    def count(self) -> int:
        """Number of updates folded so far."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the weights folded so far."""
        return self._total_weight

    def validate(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        """Raise ProtocolError unless `fold(delta, weight)` would accept the update (changes nothing).

        Lets a caller check an update before recording it durably, then fold it once recorded.
        """
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.integer, np.floating)):
            raise ProtocolError(f"update weight must be a number, got {type(weight).__name__}")
        if not (math.isfinite(weight) and weight > 0):
            raise ProtocolError(f"update weight must be positive and finite, got {weight}")
        check_layout(delta, self._layout, "update")
        check_finite(delta, "update")

    def fold(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        """Add `weight * delta`; raise ProtocolError, changing nothing, if the update or weight is invalid."""
        self.validate(delta, weight)
        weight = float(weight)
        for name, total in self._sums.items():
            total += np.multiply(delta[name], weight, dtype=np.float64)
        self._count += 1
        self._total_weight += weight

    def result(self) -> dict[str, np.ndarray]:
        """The new global state, each tensor in its base dtype (integers rounded to nearest, saturated)."""
        if self._count == 0:
            raise ValueError("no update was folded; there is nothing to average")
        state = {}
        for name, array in self._base.items():
            total = self._sums.get(name)
            if total is None:
                state[name] = array.copy()
                continue
            averaged = array.astype(np.float64) + total / self._total_weight
            if array.dtype.kind in "iu":
                averaged = np.clip(np.rint(averaged), *_float_bounds(array.dtype))
            state[name] = averaged.astype(array.dtype)
        return state


def _float_bounds(dtype: np.dtype) -> tuple[float, float]:
    """The widest float64 range that casts into integer `dtype` without overflow."""
    limits = np.iinfo(dtype)
    low, high = float(limits.min), float(limits.max)
    if high > limits.max:  # int64/uint64 maxima round up to 2**63 / 2**64 in float64
        high = float(np.nextafter(high, 0.0))
    return low, high
