"""`topk`: of each floating tensor, the `fraction` of elements largest in magnitude (at least one), as sorted
flat indices and float16 values; integer and boolean tensors dense. What it leaves out is meant to be kept by
the sender and added to the next update (error feedback, agent.compression)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import numpy as np

from protocol.codecs.base import FLOAT_DTYPES, Dense, Part, PartialCodec, Sparse
from protocol.codecs.fp16 import to_half
from protocol.codecs.wire import (
    Entry,
    dense_entry,
    dense_values,
    encode_entries,
    little,
    read_array,
    read_entries,
)
from protocol.errors import ProtocolError
from protocol.schemas import TensorInfo


class TopKCodec(PartialCodec):
    name = "topk"
    default_fraction = 0.01

    def encode(self, delta: Mapping[str, np.ndarray]) -> bytes:
        return encode_entries(delta, self._entry)

    def _entry(self, array: np.ndarray) -> Entry:
        if array.dtype.name not in FLOAT_DTYPES or array.size == 0:
            return dense_entry(array)
        flat = array.reshape(-1)
        k = self.kept(flat.size)
        index = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :])
        index_dtype = np.uint32 if flat.size <= np.iinfo(np.uint32).max else np.uint64
        return Entry(
            list(array.shape),
            "float16",
            k,
            little(to_half(flat[index])),
            little(index.astype(index_dtype)),
            np.dtype(index_dtype).name,
        )

    def parts(self, payload: bytes | memoryview, layout: list[TensorInfo]) -> Iterator[tuple[str, Part]]:
        for info, entry in read_entries(payload, layout):
            if entry.index is None:
                yield info.name, Dense(dense_values(info, entry))
                continue
            size = math.prod(info.shape)
            if info.dtype not in FLOAT_DTYPES or entry.dtype != "float16" or not 0 < entry.count <= size:
                raise ProtocolError(f"tensor {info.name!r}: not a sparse float tensor of {size} elements")
            if entry.index_dtype not in ("uint32", "uint64"):
                raise ProtocolError(f"tensor {info.name!r}: index dtype {entry.index_dtype!r} not allowed")
            index = read_array(entry.index, entry.index_dtype, entry.count, info.name).astype(np.int64)
            if (index.size and (index[0] < 0 or index[-1] >= size)) or np.any(np.diff(index) <= 0):
                raise ProtocolError(f"tensor {info.name!r}: indices not strictly increasing within {size}")
            yield info.name, Sparse(index, read_array(entry.data, "float16", entry.count, info.name))
