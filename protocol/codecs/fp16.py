"""`fp16`: floating tensors as float16 (half the bytes of float32; values beyond float16's range saturate at
+-65504), integer and boolean tensors untouched."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from protocol.codecs.base import FLOAT_DTYPES, Codec, Dense, Part, check_names, to_half
from protocol.errors import ProtocolError
from protocol.schemas import TensorInfo
from protocol.tensors import decode_state, encode_state


class Fp16Codec(Codec):
    name = "fp16"
    lossy = True

    def encode(self, delta: Mapping[str, np.ndarray]) -> bytes:
        return encode_state({name: to_half(array) for name, array in delta.items()})

    def parts(self, payload: bytes | memoryview, layout: list[TensorInfo]) -> Iterator[tuple[str, Part]]:
        state = decode_state(payload)
        check_names(list(state), layout, "update")
        for info in layout:
            array = state[info.name]
            wire = "float16" if info.dtype in FLOAT_DTYPES else info.dtype
            if array.dtype.name != wire or list(array.shape) != info.shape:
                raise ProtocolError(
                    f"update: tensor {info.name!r} is {array.dtype.name}{list(array.shape)}, expected {wire}{info.shape}"
                )
            yield info.name, Dense(array)
