"""`sparse`: the nonzero elements of each floating tensor, as sorted flat indices and their exact values;
lossless. Small where a delta is mostly zeros, as a round's average of top-k updates is (a global model's delta
for devices that send `topk`); integer and boolean tensors dense."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from protocol.codecs.base import Codec, Part
from protocol.codecs.wire import encode_entries, read_entries, sparse_entry, sparse_part
from protocol.schemas import TensorInfo


class SparseCodec(Codec):
    name = "sparse"
    lossy = False

    def encode(self, delta: Mapping[str, np.ndarray]) -> bytes:
        return encode_entries(delta, lambda array: sparse_entry(array, np.flatnonzero(array), array.dtype))

    def parts(self, payload: bytes | memoryview, layout: list[TensorInfo]) -> Iterator[tuple[str, Part]]:
        for info, entry in read_entries(payload, layout):
            yield info.name, sparse_part(info, entry, value_dtype=info.dtype, allow_empty=True)
