"""The aggregation seam: how one task round turns the updates it accepted into the next global state.

A strategy object lives for one task round. Updates are deltas against the round's base (the global state the
devices trained from); the coordinator validates each one, records it durably, then folds it (`fold_valid`: not
validated twice), and asks for the result when the round finalises; then it gives the strategy's float64 arrays
back to the task's `BufferPool` (`release`) for the next round. A restarted aggregator builds the strategy again and folds the round's
recorded updates in their recorded order, so a strategy keeps no durable state of its own.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping

import msgspec
import numpy as np

from aggregator.buffers import BufferPool
from protocol.errors import ProtocolError
from protocol.tensors import check_finite, check_layout, describe


class StrategySpecBase(
    msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True, tag_field="name"
):
    """A strategy as the task config names it (`strategy = { name = "median", window = 16 }`)."""

    @property
    def proximal_mu(self) -> float:
        """The coefficient of the proximal term devices add to their local loss (FedProx); 0: none."""
        return 0.0

    def build(self, base: Mapping[str, np.ndarray], buffers: BufferPool | None = None) -> Strategy:
        """A fresh aggregation of one task round whose updates are deltas against `base`; its float64 arrays
        come from `buffers` (when given)."""
        raise NotImplementedError


class Strategy(ABC):
    """One task round's aggregation of deltas against `base` (kept by reference: it must not change).

    `fold` validates and adds an update; `result` is base + the strategy's combined delta, each tensor in its
    base dtype (integers rounded to nearest and saturated). Bool tensors (masks, flags) keep the base value.
    """

    def __init__(self, base: Mapping[str, np.ndarray], buffers: BufferPool | None = None) -> None:
        self._base = {name: np.asarray(array) for name, array in base.items()}
        self._layout = describe(self._base)
        self._count = 0
        self._total_weight = 0.0
        self._buffers = buffers or BufferPool()
        self._taken: list[np.ndarray] = []

    @property
    def count(self) -> int:
        """Number of updates folded so far."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the weights folded so far."""
        return self._total_weight

    def zeros(self) -> dict[str, np.ndarray]:
        """A float64 zero buffer for every tensor that is combined (all but bool ones)."""
        zeros = {
            name: self._buffers.zeros(array.shape)
            for name, array in self._base.items()
            if array.dtype != np.bool_
        }
        self._taken.extend(zeros.values())
        return zeros

    def scratch(self) -> np.ndarray:
        """A flat float64 work buffer as large as the largest tensor."""
        size = max((array.size for array in self._base.values()), default=0)
        scratch = self._buffers.empty((size,))
        self._taken.append(scratch)
        return scratch

    def release(self) -> None:
        """Give the strategy's arrays back to its pool; the strategy is done (its counts stay readable)."""
        self._buffers.give_back(self._taken)
        self._taken = []

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
        """Add an update; raise ProtocolError, changing nothing, if the update or weight is invalid."""
        self.validate(delta, weight)
        self.fold_valid(delta, weight)

    def fold_valid(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        """Add an update that `validate` accepted."""
        weight = float(weight)
        self._add(delta, weight)
        self._count += 1
        self._total_weight += weight

    def result(self) -> dict[str, np.ndarray]:
        """The new global state (can be asked for repeatedly; changes nothing)."""
        if self._count == 0:
            raise ValueError("no update was folded; there is nothing to aggregate")
        combined = self._combined_delta()
        state = {}
        for name, array in self._base.items():
            delta = combined.get(name)
            if delta is None:
                state[name] = array.copy()
                continue
            updated = array.astype(np.float64) + delta
            if array.dtype.kind in "iu":
                updated = np.clip(np.rint(updated), *_float_bounds(array.dtype))
            state[name] = updated.astype(array.dtype)
        return state

    @abstractmethod
    def _add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        """Take in a validated update."""

    @abstractmethod
    def _combined_delta(self) -> Mapping[str, np.ndarray]:
        """The float64 delta to add to the base, for every tensor `zeros()` covers (at least one update folded)."""


def _float_bounds(dtype: np.dtype) -> tuple[float, float]:
    """The widest float64 range that casts into integer `dtype` without overflow."""
    limits = np.iinfo(dtype)
    low, high = float(limits.min), float(limits.max)
    if high > limits.max:  # int64/uint64 maxima round up to 2**63 / 2**64 in float64
        high = float(np.nextafter(high, 0.0))
    return low, high
