"""What an update codec is: it turns a delta (name -> array) into bytes and back into per-tensor parts that a
running sum can take one at a time, without densifying a sparse update as a whole."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from protocol.errors import ProtocolError
from protocol.schemas import TensorInfo

#: wire names of the dtypes a codec may leave untouched (integers, flags) or must carry as floats
FLOAT_DTYPES = frozenset({"float16", "float32", "float64"})
#: matrices and kernels smaller than this travel whole (as float16) under partial codecs: depthwise and small
#: pointwise kernels are a sliver of a large model's bytes but much of a small model's learning
CUT_ELEMENTS = 16384
FP16_MAX = float(np.finfo(np.float16).max)


def to_half(array: np.ndarray) -> np.ndarray:
    """Floating arrays as float16, saturated to its finite range (NaN stays NaN); other arrays as they are."""
    array = np.asarray(array)
    if array.dtype.name not in FLOAT_DTYPES:
        return array
    return np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16)


@dataclass(frozen=True)
class Dense:
    """A whole tensor."""

    array: np.ndarray

    def add_into(self, total: np.ndarray, weight: float) -> None:
        total += np.multiply(self.array, weight, dtype=np.float64)

    def to_dense(self, info: TensorInfo) -> np.ndarray:
        return self.array.astype(info.dtype, copy=False)

    def is_finite(self) -> bool:
        return self.array.dtype.kind != "f" or bool(np.isfinite(self.array).all())


@dataclass(frozen=True)
class Sparse:
    """Values at flat indices of a tensor; zero elsewhere. Indices are unique (a codec's guarantee, checked)."""

    indices: np.ndarray  # int64, flat positions
    values: np.ndarray

    def add_into(self, total: np.ndarray, weight: float) -> None:
        flat = total.reshape(-1)
        flat[self.indices] += np.multiply(self.values, weight, dtype=np.float64)

    def to_dense(self, info: TensorInfo) -> np.ndarray:
        dense = np.zeros(int(np.prod(info.shape)), dtype=info.dtype)
        dense[self.indices] = self.values
        return dense.reshape(info.shape)

    def is_finite(self) -> bool:
        return bool(np.isfinite(self.values).all())


Part = Dense | Sparse


class Codec(ABC):
    """An update codec: `name` is what schedules and manifests carry. `lossy` codecs lose information that an
    agent can keep as a residual and send later (error feedback); `sparse_step` ones move only a few
    coordinates of each matrix and kernel, so the weights they move a model to are far from the ones their sender
    trained (and BatchNorm statistics from that training do not fit them); they code each tensor on its own."""

    name: ClassVar[str]
    lossy: ClassVar[bool]
    sparse_step: ClassVar[bool] = False

    @abstractmethod
    def encode(self, delta: Mapping[str, np.ndarray]) -> bytes:
        """The bytes of `delta` (every tensor, canonical order)."""

    @abstractmethod
    def parts(self, payload: bytes | memoryview, layout: list[TensorInfo]) -> Iterator[tuple[str, Part]]:
        """Each tensor of a payload, checked against `layout` (names, shapes, dtypes, index ranges); raises
        ProtocolError on anything else, possibly after yielding some parts (validate before folding)."""

    def decode(self, payload: bytes | memoryview, layout: list[TensorInfo]) -> dict[str, np.ndarray]:
        """The whole delta as dense arrays in the layout's dtypes."""
        info = {t.name: t for t in layout}
        return {name: part.to_dense(info[name]) for name, part in self.parts(payload, layout)}


class PartialCodec(Codec):
    """A lossy codec that keeps a `fraction` of each floating matrix or kernel of at least CUT_ELEMENTS elements
    (at least one element; top-k sends no zeros, so a tensor with fewer nonzero elements sends fewer) and sends it
    in the per-tensor entries of protocol.codecs.wire. Smaller kernels, vectors and scalars (biases,
    normalisation weights, BatchNorm's running statistics) travel whole, as float16: a running variance cut short
    can turn negative and wreck a whole model's evaluation, and vectors are up to 5% of a model with many
    BatchNorm layers."""

    lossy = True
    default_fraction: ClassVar[float]

    def __init__(self, fraction: float | None = None) -> None:
        fraction = self.default_fraction if fraction is None else fraction
        if not 0 < fraction <= 1:
            raise ValueError(f"{self.name} fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def kept(self, size: int) -> int:
        return min(size, max(1, math.ceil(self.fraction * size)))

    @staticmethod
    def cut(array: np.ndarray) -> bool:
        """Whether the codec keeps only part of `array` (else it travels whole): a floating matrix or kernel of at
        least CUT_ELEMENTS elements."""
        return array.dtype.name in FLOAT_DTYPES and array.ndim >= 2 and array.size >= CUT_ELEMENTS


def check_names(found: list[str], layout: list[TensorInfo], what: str) -> None:
    """Raise ProtocolError unless a payload holds exactly the layout's tensors."""
    want = {t.name for t in layout}
    if set(found) != want or len(found) != len(want):
        missing, extra = sorted(want - set(found)), sorted(set(found) - want)
        raise ProtocolError(f"{what}: tensor names differ (missing {missing[:5]}, unexpected {extra[:5]})")
