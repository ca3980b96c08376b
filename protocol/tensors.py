"""State dicts on the wire: each tensor as dtype + shape + raw little-endian bytes, in msgpack. No pickle.

`encode_state` / `decode_state` round-trip bit-exactly. The encoding is canonical (tensors in name order), so
equal states give equal bytes and equal sha256 whatever order they were built in. Decoding checks every tensor's byte length against its
dtype and shape and never executes or imports anything named in the payload.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import get_args

import msgspec
import numpy as np

from protocol.errors import ProtocolError
from protocol.limits import MAX_DIM, MAX_NDIM, MAX_TENSOR_NAME, MAX_TENSORS
from protocol.schemas import TensorInfo, WireDtype

#: dtypes allowed on the wire (numpy names). bfloat16 travels as float32.
WIRE_DTYPES = frozenset(get_args(WireDtype))
_LITTLE_ENDIAN = {name: np.dtype(name).newbyteorder("<") for name in WIRE_DTYPES}  # as payloads hold them
_KIND_SIZE = {name: (np.dtype(name).kind, np.dtype(name).itemsize) for name in WIRE_DTYPES}  # any byte order
#: wire names of the native-order dtypes (`dtype.name` costs microseconds, a model has hundreds of tensors)
_WIRE_NAMES = {np.dtype(name): name for name in WIRE_DTYPES}
#: floating tensors of fewer values are taken together (`float_values`): a numpy call each costs more than they do
_SMALL_TENSOR = 8192


class _WireTensor(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    dtype: str
    shape: list[int]
    data: memoryview


_state_decoder = msgspec.msgpack.Decoder(dict[str, _WireTensor])
_encoder = msgspec.msgpack.Encoder()


def wire_dtype(array: np.ndarray) -> str:
    """The wire name of an array's dtype; raises ProtocolError for dtypes the protocol does not carry."""
    name = _WIRE_NAMES.get(array.dtype) or array.dtype.name
    if name not in WIRE_DTYPES:
        raise ProtocolError(f"dtype {name} cannot travel; allowed: {sorted(WIRE_DTYPES)}")
    return name


def encode_state(state: Mapping[str, np.ndarray]) -> bytes:
    """msgpack bytes of a name -> array mapping (arrays are sent little-endian, C order)."""
    wire = {}
    for name, array in sorted(state.items()):
        array = np.asarray(array)
        dtype = wire_dtype(array)
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        wire[name] = _WireTensor(dtype, list(array.shape), memoryview(little.reshape(-1).view(np.uint8)))
    return _encoder.encode(wire)


def decode_state(payload: bytes | memoryview) -> dict[str, np.ndarray]:
    """Arrays of an encoded state dict, read-only views into `payload` (copy to modify)."""
    try:
        wire = _state_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"bad state dict payload: {exc}") from None
    if len(wire) > MAX_TENSORS:
        raise ProtocolError(f"state dict has {len(wire)} tensors; at most {MAX_TENSORS} allowed")
    state = {}
    for name, tensor in wire.items():
        if not 1 <= len(name) <= MAX_TENSOR_NAME:
            raise ProtocolError(f"tensor name of {len(name)} characters; 1..{MAX_TENSOR_NAME} allowed")
        if tensor.dtype not in WIRE_DTYPES:
            raise ProtocolError(f"tensor {name!r}: dtype {tensor.dtype!r} not allowed")
        if len(tensor.shape) > MAX_NDIM or any(not 0 <= d <= MAX_DIM for d in tensor.shape):
            raise ProtocolError(f"tensor {name!r}: invalid shape {tensor.shape}")
        dtype = _LITTLE_ENDIAN[tensor.dtype]
        expected = math.prod(tensor.shape) * dtype.itemsize
        if len(tensor.data) != expected:
            raise ProtocolError(
                f"tensor {name!r}: {len(tensor.data)} bytes for shape {tensor.shape} {tensor.dtype}, expected {expected}"
            )
        try:
            state[name] = np.frombuffer(tensor.data, dtype=dtype).reshape(tensor.shape)
        except ValueError as exc:  # e.g. a zero-sized shape whose other dimensions overflow numpy's size
            raise ProtocolError(f"tensor {name!r}: shape {tensor.shape}: {exc}") from None
    return state


def describe(state: Mapping[str, np.ndarray]) -> list[TensorInfo]:
    """Names, dtypes and shapes of a state dict, for manifests."""
    return [
        TensorInfo(name=n, dtype=wire_dtype(np.asarray(a)), shape=list(np.shape(a)))
        for n, a in sorted(state.items())
    ]


def check_layout(state: Mapping[str, np.ndarray], expected: list[TensorInfo], what: str) -> None:
    """Raise ProtocolError unless `state` has exactly the expected names, dtypes and shapes."""
    want = {t.name: t for t in expected}
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        raise ProtocolError(f"{what}: tensor names differ (missing {missing[:5]}, unexpected {extra[:5]})")
    for name, array in state.items():
        info = want[name]
        kind_size = (array.dtype.kind, array.dtype.itemsize)
        if kind_size != _KIND_SIZE[info.dtype] or array.shape != tuple(info.shape):
            raise ProtocolError(
                f"{what}: tensor {name!r} is {array.dtype.name}{list(array.shape)}, expected {info.dtype}{info.shape}"
            )


def float_values(state: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The values of the floating tensors of `state` as a few flat arrays: each tensor of _SMALL_TENSOR values or
    more as a view, the smaller ones copied together into one (in the widest of their dtypes)."""
    floats = [array for array in state.values() if array.dtype.kind == "f"]
    small = [array for array in floats if array.size < _SMALL_TENSOR]
    large = [array.reshape(-1) for array in floats if array.size >= _SMALL_TENSOR]
    return [np.concatenate(small, axis=None), *large] if small else large


def check_finite(state: Mapping[str, np.ndarray], what: str) -> None:
    """Raise ProtocolError if any floating tensor holds NaN or infinity (naming the first such tensor)."""
    if all(np.isfinite(values).all() for values in float_values(state)):
        return
    for name, array in state.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ProtocolError(f"{what}: tensor {name!r} holds non-finite values")
