"""The operator's limits on one update: its weight (samples) and the L2 norm of its delta.

FedAvg weighs an update by the sample count its device declares, and a device may send any delta; unbounded,
one device could own the global model. Per task (`[tasks.NAME.limits]`), the operator caps the weight
(`max_samples`; samples the operator registered for a device replace the device's word) and the L2 norm of the
delta's floating-point tensors, weights and batch-norm statistics alike (`max_norm`), and chooses for each
whether an update beyond the cap is clipped to it or rejected. Integer and bool tensors (batch-norm step
counters, masks) are not part of the norm. The norm of every accepted update is logged, to choose a bound from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec
import numpy as np
from msgspec import Meta

from aggregator.errors import Rejected
from protocol.tensors import float_values

#: what happens to an update beyond a limit: scaled down to it, or refused with a receipt saying why
Excess = Literal["clip", "reject"]


class UpdateLimits(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A task's limits on each update; None: no limit."""

    max_samples: Annotated[int, Meta(ge=1)] | None = None
    samples_excess: Excess = "clip"
    max_norm: Annotated[float, Meta(gt=0)] | None = None
    norm_excess: Excess = "clip"


@dataclass(frozen=True)
class LimitedUpdate:
    """An update as it counts: its weight, its delta scaled by `scale` (1.0: untouched), the norm the delta had,
    and what was changed."""

    delta: Mapping[str, np.ndarray]
    weight: int
    scale: float
    norm: float
    notes: tuple[str, ...]


def limit_update(
    delta: Mapping[str, np.ndarray], samples: int, limits: UpdateLimits, registered: int | None = None
) -> LimitedUpdate:
    """Apply `limits` to a validated update (expected layout, finite values) whose device declared `samples`;
    `registered`, when given, is the operator's count for the device and replaces its word. Rejected (a ProtocolError):
    the limits reject the update."""
    notes = []
    weight = samples
    if registered is not None and registered != samples:
        weight = registered
        notes.append(f"weight {registered} samples from the operator's registry (declared {samples})")
    cap = limits.max_samples
    if cap is not None and weight > cap:
        if limits.samples_excess == "reject":
            raise Rejected(
                "over_sample_cap", f"update claims {weight} samples, above the task's cap of {cap}"
            )
        notes.append(f"weight capped at {cap} samples (declared {samples})")
        weight = cap
    scale = 1.0
    bound = limits.max_norm
    peak, root = _norm_parts(delta)
    norm = peak * root
    if bound is not None and norm > bound:
        if limits.norm_excess == "reject":
            raise Rejected(
                "over_norm_bound", f"update norm {norm:.4g} exceeds the task's bound of {bound:.4g}"
            )
        scale = bound / peak / root  # in this order: finite and > 0 even where the norm overflows
        notes.append(f"delta norm {norm:.4g} clipped to {bound:.4g}")
    return LimitedUpdate(scale_delta(delta, scale), weight, scale, norm, tuple(notes))


def scale_delta(delta: Mapping[str, np.ndarray], scale: float) -> Mapping[str, np.ndarray]:
    """`delta` with its floating-point tensors multiplied by `scale` (in float64, stored in their own dtype)."""
    if scale == 1.0:
        return delta
    return {
        name: np.multiply(array, scale, dtype=np.float64).astype(array.dtype)
        if array.dtype.kind == "f"
        else array
        for name, array in delta.items()
    }


def _norm_parts(delta: Mapping[str, np.ndarray]) -> tuple[float, float]:
    """(peak, root) with norm = peak * root. Usually (1, norm) from one pass: the squares summed by BLAS in
    blocks of `_BLOCK` values, the blocks' sums added in float64. Where that overflows or may have underflowed,
    the exact way: the largest magnitude and the norm of the tensors divided by it, so that no square overflows."""
    floats = [values for values in float_values(delta) if values.size]
    with np.errstate(over="ignore"):  # an overflow makes the sum infinite: the exact way is taken
        squares = sum(_sum_of_squares(flat) for flat in floats)
    if math.isfinite(squares) and squares > _TINY:
        return 1.0, math.sqrt(squares)
    peak = max((float(np.max(np.abs(array))) for array in floats), default=0.0)
    if peak == 0.0:
        return 0.0, 0.0
    squares = sum(float(np.sum(np.square(np.divide(array, peak, dtype=np.float64)))) for array in floats)
    return peak, math.sqrt(squares)


#: values whose squares BLAS sums in their own precision (float32: ~1e-7 relative error); below OpenBLAS's
#: threshold for threads, which on a busy machine cost far more than they save
_BLOCK = 8192
_TINY = 1e-30  # a sum of squares below this may hide float32 squares that underflowed


def _sum_of_squares(flat: np.ndarray) -> float:
    total = 0.0
    for start in range(0, flat.size, _BLOCK):
        block = flat[start : start + _BLOCK]
        if block.dtype.itemsize < 4:  # float16: no BLAS
            block = block.astype(np.float32)
        total += float(np.dot(block, block))
    return total
