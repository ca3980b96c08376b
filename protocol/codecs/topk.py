"""`topk`: of each floating matrix or kernel of at least CUT_ELEMENTS elements, the `fraction` of elements largest
in magnitude, as sorted flat indices and float16 values; zeros are never sent (a tensor with fewer nonzero elements
sends them all, an all-zero one none); smaller kernels, vectors, scalars, integer and boolean tensors whole. What
it leaves out is meant to be kept by the sender and added to the next update (error feedback, agent.compression)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from protocol.codecs.base import Part, PartialCodec
from protocol.codecs.wire import Entry, encode_entries, half_entry, read_entries, sparse_entry, sparse_part
from protocol.schemas import TensorInfo


class TopKCodec(PartialCodec):
    name = "topk"
    default_fraction = 0.01
    sparse_step = True

    def encode(self, delta: Mapping[str, np.ndarray]) -> bytes:
        return encode_entries(delta, self._entry)

    def _entry(self, array: np.ndarray) -> Entry:
        if not self.cut(array):
            return half_entry(array)
        magnitude = np.abs(array.reshape(-1))
        # Selecting among the nonzero elements only: kernels whose outer taps never see an image (3x3 convolutions
        # on a 1x1 map) are mostly exact zeros, and argpartition over many equal values is ~50x slower.
        nonzero = np.flatnonzero(magnitude)
        k = min(self.kept(magnitude.size), nonzero.size)
        top = np.argpartition(magnitude[nonzero], nonzero.size - k)[nonzero.size - k :] if k else []
        return sparse_entry(array, np.sort(nonzero[top]), np.float16)

    def parts(self, payload: bytes | memoryview, layout: list[TensorInfo]) -> Iterator[tuple[str, Part]]:
        for info, entry in read_entries(payload, layout):
            yield info.name, sparse_part(info, entry, "float16", allow_empty=True)
