"""FedProx (Li et al., 2020): FedAvg on the server; each device adds mu/2 * ||w - w_global||^2 to its local loss.

The proximal term keeps a device's local model near the global one it started from, which damps the drift of
devices whose data differ (non-IID) or that do more local work. The server side is the weighted FedAvg; `mu`
travels to the devices in each schedule (`TaskAssignment.proximal_mu`) and `agent.training.TrainStep` applies it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import numpy as np
from msgspec import Meta

from aggregator.buffers import BufferPool
from aggregator.strategies.base import StrategySpecBase
from aggregator.strategies.fedavg import StreamingFedAvg
from protocol.schemas import MAX_PROXIMAL_MU


class FedProxSpec(StrategySpecBase, tag="fedprox"):
    """`strategy = { name = "fedprox", mu = 0.01 }`."""

    mu: Annotated[float, Meta(gt=0, le=MAX_PROXIMAL_MU)] = 0.01

    @property
    def proximal_mu(self) -> float:
        return self.mu

    def build(self, base: Mapping[str, np.ndarray], buffers: BufferPool | None = None) -> StreamingFedAvg:
        return StreamingFedAvg(base, buffers)
