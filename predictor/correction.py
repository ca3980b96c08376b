"""Learning from every round, cheaply: a multiplicative residual on top of a fitted predictor.

A device's rounds measure each task's throughput under the round's (B_i, R_i, co-runners). The residual
r = log(measured / predicted) is modelled as a device-wide term plus one term per workload (model at an input
size), each a recency-weighted mean shrunk toward zero (a prior worth PRIOR_WEIGHT observations, weights halving
every HALF_LIFE observations): few rounds move the prediction a little, many rounds move it to what this device
measures, and a change on the device (a new driver, another data path) wins over old rounds. Refitting costs
microseconds per round; `CorrectedPredictor` applies it to any `predictor.search.Predict`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import msgspec
import numpy as np

from predictor.features import TaskFeatures

PRIOR_WEIGHT = 1.0
HALF_LIFE = 20.0


def workload_key(model: str, input_size: int) -> str:
    return f"{model}@{input_size}"


class Correction(msgspec.Struct, frozen=True, kw_only=True):
    """Measured / predicted throughput, as a device-wide factor times a factor per workload."""

    device_factor: float = 1.0
    factors: dict[str, float] = {}  # workload_key -> its own factor (on top of device_factor)
    observations: int = 0

    def factor(self, key: str) -> float:
        return self.device_factor * self.factors.get(key, 1.0)


def fit_correction(observations: Iterable[tuple[str, float, float]]) -> Correction:
    """The correction from (workload key, predicted, measured) throughputs, oldest first."""
    rows = [(k, math.log(m / p)) for k, p, m in observations if p > 0 and m > 0]
    if not rows:
        return Correction()
    weights = 0.5 ** (np.arange(len(rows))[::-1] / HALF_LIFE)
    residuals = np.array([r for _, r in rows])
    device = float((weights * residuals).sum() / (weights.sum() + PRIOR_WEIGHT))
    factors = {}
    for key in sorted({k for k, _ in rows}):
        mine = np.array([k == key for k, _ in rows])
        own = float((weights[mine] * (residuals[mine] - device)).sum() / (weights[mine].sum() + PRIOR_WEIGHT))
        factors[key] = math.exp(own)
    return Correction(device_factor=math.exp(device), factors=factors, observations=len(rows))


class CorrectedPredictor:
    """A predictor (`predictor.search.Predict`, e.g. an OnnxPredictor) times a Correction; everything else (its
    card, path, batch range, input sizes) is the base predictor's."""

    def __init__(self, base, correction: Correction | None = None) -> None:
        self.base = base
        self.correction = correction or Correction()

    def __getattr__(self, name: str):
        return getattr(self.base, name)

    def __call__(
        self, tasks: Sequence[TaskFeatures], batches: np.ndarray, resources: np.ndarray
    ) -> np.ndarray:
        factors = np.array([self.correction.factor(workload_key(t.model, t.input_size)) for t in tasks])
        return np.asarray(self.base(tasks, batches, resources), dtype=np.float64) * factors
