"""Coordinate-wise median (Yin et al., 2018): per coordinate, the median of the updates in a window (the mean of
the two middle values for an even count)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregator.buffers import BufferPool
from aggregator.strategies.base import StrategySpecBase
from aggregator.strategies.window import Window, WindowedRule


class MedianSpec(StrategySpecBase, tag="median"):
    """`strategy = { name = "median", window = 16 }`."""

    window: Window = 16

    def build(self, base: Mapping[str, np.ndarray], buffers: BufferPool | None = None) -> CoordinateMedian:
        return CoordinateMedian(base, self.window, buffers)


class CoordinateMedian(WindowedRule):
    def reduce(self, values: np.ndarray) -> np.ndarray:
        return np.median(values, axis=0)
