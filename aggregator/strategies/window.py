"""Coordinate-wise robust rules over bounded windows of updates (the base of trimmed mean and median).

A robust rule needs every update's value of a coordinate at once, so it cannot fold updates into one running
sum. Here updates are held in a window of at most `window` of them; a full window is reduced coordinate by
coordinate (in slices of at most `WORK_BYTES` of float64) and its result is added, weighted by the number of
updates it held, to a running float64 sum. The result is base + that sum / updates folded: with no more
updates than `window` this is exactly the rule over all of them; beyond it, the mean of the windows' results.
Every update counts once: sample counts are not weights here, so a device cannot buy influence by declaring
more.

Memory: the running sum (8 bytes per parameter), at most `window` held updates and `WORK_BYTES` of working
space, whatever the number of devices. The coordinator hands updates over as memory maps of their durable
payload files (the ledger's), so held updates are pages the OS may drop, not copies in the heap (an update
clipped to its task's norm bound is held as its scaled copy).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Annotated

import numpy as np
from msgspec import Meta

from aggregator.buffers import BufferPool
from aggregator.strategies.base import Strategy

#: the most updates one window may hold
MAX_WINDOW = 1024
Window = Annotated[int, Meta(ge=1, le=MAX_WINDOW)]
#: float64 working space for reducing one slice of a window's coordinates
WORK_BYTES = 64 << 20


class WindowedRule(Strategy):
    """A coordinate-wise rule (`reduce`) applied to windows of at most `window` updates."""

    def __init__(
        self, base: Mapping[str, np.ndarray], window: int, buffers: BufferPool | None = None
    ) -> None:
        super().__init__(base, buffers)
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be 1..{MAX_WINDOW}, got {window}")
        self.window = window
        self._held: list[Mapping[str, np.ndarray]] = []
        self._sums = self.zeros()

    @abstractmethod
    def reduce(self, values: np.ndarray) -> np.ndarray:
        """The rule over n updates' values of k coordinates: float64 (n, k) -> (k,)."""

    def _add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        self._held.append(delta)
        if len(self._held) == self.window:
            self._add_window(self._sums)
            self._held = []

    def _combined_delta(self) -> dict[str, np.ndarray]:
        sums = self._sums
        if self._held:  # a partial window: reduce it into a copy, so result() changes nothing
            sums = {name: total.copy() for name, total in sums.items()}
            self._add_window(sums)
        return {name: total / self._count for name, total in sums.items()}

    def _add_window(self, sums: dict[str, np.ndarray]) -> None:
        """Add len(held) x the rule over the held updates to `sums`."""
        held = len(self._held)
        step = max(1, WORK_BYTES // (8 * held))
        for name, total in sums.items():
            flat = total.reshape(-1)
            columns = [delta[name].reshape(-1) for delta in self._held]
            for start in range(0, flat.size, step):
                stop = min(start + step, flat.size)
                values = np.empty((held, stop - start), dtype=np.float64)
                for row, column in enumerate(columns):
                    values[row] = column[start:stop]
                flat[start:stop] += held * self.reduce(values)
