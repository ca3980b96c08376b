"""Coordinate-wise trimmed mean (Yin et al., 2018): per coordinate, drop the k lowest and k highest values of
the n updates in a window (k = floor(trim_fraction * n)) and average the rest."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import numpy as np
from msgspec import Meta

from aggregator.buffers import BufferPool
from aggregator.strategies.base import StrategySpecBase
from aggregator.strategies.window import Window, WindowedRule


class TrimmedMeanSpec(StrategySpecBase, tag="trimmed_mean"):
    """`strategy = { name = "trimmed_mean", trim_fraction = 0.1, window = 16 }`."""

    trim_fraction: Annotated[float, Meta(ge=0, lt=0.5)] = 0.1
    window: Window = 16

    def build(self, base: Mapping[str, np.ndarray], buffers: BufferPool | None = None) -> TrimmedMean:
        return TrimmedMean(base, self.window, self.trim_fraction, buffers)


class TrimmedMean(WindowedRule):
    def __init__(
        self,
        base: Mapping[str, np.ndarray],
        window: int,
        trim_fraction: float,
        buffers: BufferPool | None = None,
    ) -> None:
        super().__init__(base, window, buffers)
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.trim_fraction = trim_fraction

    def reduce(self, values: np.ndarray) -> np.ndarray:
        n = len(values)
        k = int(self.trim_fraction * n)
        if k == 0:
            return values.mean(axis=0)
        return np.partition(values, (k, n - k - 1), axis=0)[k : n - k].mean(axis=0)
