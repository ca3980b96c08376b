"""float64 arrays handed from one task round to the next.

A task round's running sums and scratch space are as large as its model in float64 (90 MB for ResNet18).
Allocating them afresh every round faults fresh pages in (and may grow the heap); taking them back from the
round before costs one pass of zeroing.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class BufferPool:
    """Free float64 arrays by shape; what a finished round gives back, the next round takes."""

    def __init__(self) -> None:
        self._free: dict[tuple[int, ...], list[np.ndarray]] = {}

    def empty(self, shape: tuple[int, ...]) -> np.ndarray:
        """An array of `shape` with arbitrary content."""
        free = self._free.get(tuple(shape))
        return free.pop() if free else np.empty(shape, dtype=np.float64)

    def zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        array = self.empty(shape)
        array.fill(0.0)
        return array

    def give_back(self, arrays: Iterable[np.ndarray]) -> None:
        """Arrays their user no longer reads or writes."""
        for array in arrays:
            self._free.setdefault(array.shape, []).append(array)

    @property
    def held_bytes(self) -> int:
        return sum(array.nbytes for arrays in self._free.values() for array in arrays)
