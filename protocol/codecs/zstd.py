"""Lossless zstd around any codec's bytes (`<codec>+zstd`). Decompression is bounded by what the layout can
hold, so a small payload cannot expand into an unbounded one."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import numpy as np

from protocol.codecs.base import Codec, Part
from protocol.errors import ProtocolError
from protocol.schemas import TensorInfo

LEVEL = 3
OVERHEAD_BYTES = 1 << 20  # msgpack headers and index arrays beyond the tensors' own bytes


class Zstd(Codec):
    lossy = False  # set per instance from the inner codec, as `sparse_step`

    def __init__(self, inner: Codec, level: int = LEVEL) -> None:
        import zstandard

        self.inner, self.name = inner, f"{inner.name}+zstd"
        self.lossy, self.sparse_step = inner.lossy, inner.sparse_step
        self._compressor = zstandard.ZstdCompressor(level=level)
        self._decompressor = zstandard.ZstdDecompressor()

    def encode(self, delta: Mapping[str, np.ndarray]) -> bytes:
        return self._compressor.compress(self.inner.encode(delta))

    def parts(self, payload: bytes | memoryview, layout: list[TensorInfo]) -> Iterator[tuple[str, Part]]:
        import zstandard

        bound = 2 * sum(math.prod(t.shape) * np.dtype(t.dtype).itemsize for t in layout) + OVERHEAD_BYTES
        try:
            raw = self._decompressor.decompress(bytes(payload), max_output_size=bound)
        except zstandard.ZstdError as exc:
            raise ProtocolError(f"bad zstd payload: {exc}") from None
        if len(raw) > bound:
            raise ProtocolError(f"zstd payload expands beyond {bound} bytes")
        yield from self.inner.parts(raw, layout)
