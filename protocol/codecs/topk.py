"""`topk`: of each floating matrix or kernel, the `fraction` of elements largest in magnitude (at least one), as
sorted flat indices and float16 values; vectors, scalars, integer and boolean tensors whole. What it leaves out is meant to be kept by
the sender and added to the next update (error feedback, agent.compression)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from protocol.codecs.base import Part, PartialCodec, to_half
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
        flat = array.reshape(-1)
        k = self.kept(flat.size)
        index = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :])
        return sparse_entry(to_half(array), index, np.float16)

    def parts(self, payload: bytes | memoryview, layout: list[TensorInfo]) -> Iterator[tuple[str, Part]]:
        for info, entry in read_entries(payload, layout):
            yield info.name, sparse_part(info, entry, "float16")
