"""A global version as a difference to the version before, computed and applied alike on both ends, so that a
device holding the previous version rebuilds the new one bit for bit (and checks it by its sha256).

Floating tensors travel as `new - base` through an update codec; the new version IS `base + decoded` (the
aggregator publishes that, not the value before encoding), so a lossy codec (fp16) changes the global model by
its rounding of the round's step, never by more. Integer tensors travel as `new - base` too (wrapping arithmetic:
exact); boolean tensors as their new values.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from protocol.codecs import Codec


def difference(new: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What turns `base` into `new`, tensor by tensor."""
    return {
        name: array if array.dtype == np.bool_ else np.subtract(array, base[name], dtype=array.dtype)
        for name, array in new.items()
    }


def apply(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`base` moved by `delta` (as `difference` made it and a codec decoded it)."""
    return {
        name: delta[name].astype(np.bool_)
        if array.dtype == np.bool_
        else np.add(array, delta[name].astype(array.dtype, copy=False), dtype=array.dtype)
        for name, array in base.items()
    }


def encode_version(
    codec: Codec, new: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]
) -> tuple[bytes, dict[str, np.ndarray]]:
    """The delta payload from `base` towards `new`, and the version it rebuilds (which is what to publish)."""
    from protocol.tensors import describe

    payload = codec.encode(difference(new, base))
    return payload, apply(base, codec.decode(payload, describe(base)))
