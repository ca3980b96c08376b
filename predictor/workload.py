"""The paper's workload model (Eq. 3), O_i = alpha*f_i*B_i + beta*m_i*B_i, fitted to measured step times.

f_i is the training FLOPs per image and m_i the memory intensity, taken here as the activation bytes one image
writes in a forward pass (TaskFeatures.activation_bytes_per_sample): the traffic that grows with the batch.
Parameter bytes do not grow with B_i; their per-step cost is part of the intercept gamma0.

The paper fits time_i ~ gamma0 + gamma1*(alpha*f_i*B_i + beta*m_i*B_i). gamma1 and (alpha, beta) are not
separately identifiable, so gamma1 is fixed to 1 and time ~ gamma0 + alpha*(f*B) + beta*(m*B) is solved by
non-negative least squares (every coefficient is a cost, so none may be negative).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from predictor.features import TaskFeatures


@dataclass(frozen=True)
class WorkloadModel:
    """Seconds per training step as gamma0 + gamma1*O_i; alpha in s/FLOP, beta in s/byte."""

    alpha: float
    beta: float
    gamma0: float
    gamma1: float = 1.0

    def workload(self, features: TaskFeatures, batch: float | np.ndarray) -> float | np.ndarray:
        """O_i of Eq. 3 (scaled by gamma1): the predicted step time less the fixed overhead gamma0."""
        return (
            self.gamma1
            * batch
            * (self.alpha * features.flops_per_sample + self.beta * memory_intensity(features))
        )

    def step_time(self, features: TaskFeatures, batch: float | np.ndarray) -> float | np.ndarray:
        """Predicted seconds per training step of `batch` images."""
        return self.gamma0 + self.workload(features, batch)


def memory_intensity(features: TaskFeatures) -> float:
    """m_i of Eq. 3: activation bytes per image."""
    return float(features.activation_bytes_per_sample)


def fit_workload(samples: Sequence[tuple[TaskFeatures, int, float]]) -> WorkloadModel:
    """Fit alpha, beta, gamma0 (gamma1 = 1) to (features, batch size, seconds per step) measurements."""
    from scipy.optimize import nnls

    if len(samples) < 3:
        raise ValueError(f"need at least 3 measurements to fit 3 coefficients, got {len(samples)}")
    batch = np.array([b for _, b, _ in samples], dtype=np.float64)
    seconds = np.array([s for _, _, s in samples], dtype=np.float64)
    if np.any(batch <= 0) or not np.all(np.isfinite(seconds)) or np.any(seconds <= 0):
        raise ValueError("batch sizes and step times must be positive")
    flops = np.array([f.flops_per_sample for f, _, _ in samples]) * batch
    memory = np.array([memory_intensity(f) for f, _, _ in samples]) * batch
    design = np.column_stack([np.ones_like(batch), flops, memory])
    scale = np.linalg.norm(design, axis=0)  # columns differ by ~10 orders of magnitude
    coefficients, _ = nnls(design / scale, seconds)
    gamma0, alpha, beta = coefficients / scale
    return WorkloadModel(alpha=float(alpha), beta=float(beta), gamma0=float(gamma0))
