"""`dense`: every tensor as it is (the state-dict wire format of protocol.tensors); lossless."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from protocol.codecs.base import Codec, Dense, Part
from protocol.schemas import TensorInfo
from protocol.tensors import check_layout, decode_state, encode_state


class DenseCodec(Codec):
    name = "dense"
    lossy = False

    def encode(self, delta: Mapping[str, np.ndarray]) -> bytes:
        return encode_state(delta)

    def parts(self, payload: bytes | memoryview, layout: list[TensorInfo]) -> Iterator[tuple[str, Part]]:
        state = decode_state(payload)
        check_layout(state, layout, "update")
        for name, array in state.items():
            yield name, Dense(array)
