"""Streaming weighted FedAvg (Eq. 1 of FedMT, weight = local samples): the default strategy.

Updates are deltas against one shared base, so averaging deltas equals averaging local weights:
new = base + sum_k(w_k * delta_k) / sum_k(w_k). Each update is folded into float64 running sums as it
arrives, so memory is one float64 buffer per tensor however many devices report.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregator.buffers import BufferPool
from aggregator.strategies.base import Strategy, StrategySpecBase


class FedAvgSpec(StrategySpecBase, tag="fedavg"):
    """`strategy = { name = "fedavg" }` (the default)."""

    def build(self, base: Mapping[str, np.ndarray], buffers: BufferPool | None = None) -> StreamingFedAvg:
        return StreamingFedAvg(base, buffers)


class StreamingFedAvg(Strategy):
    """Weighted running average of one task round's updates."""

    def __init__(self, base: Mapping[str, np.ndarray], buffers: BufferPool | None = None) -> None:
        super().__init__(base, buffers)
        self._sums = self.zeros()
        self._scratch = self.scratch()

    def _add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        for name, total in self._sums.items():
            product = self._scratch[: total.size].reshape(total.shape)
            np.multiply(delta[name], weight, out=product, dtype=np.float64)
            total += product

    def _combined_delta(self) -> dict[str, np.ndarray]:
        return {name: total / self._total_weight for name, total in self._sums.items()}
