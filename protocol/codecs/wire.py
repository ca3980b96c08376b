"""The container of the sparse and transformed codecs: per tensor, either the dense wire tensor of
protocol.tensors or a compressed entry (the codec says how to read it), in name order, msgpack.

A sparse entry's flat positions travel as the gaps between them (the run lengths of the lecture's sparse
gradients), in the narrowest unsigned type that holds the largest: at 1% of a matrix, most gaps fit in 8 bits and
zstd takes them to ~1.3 bytes a position, against ~3 for the positions themselves."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Literal

import msgspec
import numpy as np

from protocol.codecs.base import FLOAT_DTYPES, Dense, Part, Sparse, check_names, to_half
from protocol.errors import ProtocolError
from protocol.schemas import TensorInfo
from protocol.tensors import MAX_TENSORS, wire_dtype


class Entry(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """One tensor of `shape`, `count` elements of `dtype` in `data`: the whole tensor; or, with `index`
    (little-endian unsigned integers of `index_dtype`), its values at those flat positions (`index_coding`
    "gaps": each position less the one before it, the first as it is; "positions", as earlier agents sent them:
    the positions themselves); or, with `transform` (e.g. "dct"), the leading coefficients of that transform of
    it."""

    shape: list[int]
    dtype: str
    count: int
    data: memoryview
    index: memoryview | None = None
    index_dtype: str | None = None
    transform: str | None = None
    index_coding: Literal["positions", "gaps"] = "positions"


#: index_coding -> the index dtypes it may travel in
INDEX_DTYPES = {"positions": ("uint32", "uint64"), "gaps": ("uint16", "uint32", "uint64")}

_decoder = msgspec.msgpack.Decoder(dict[str, Entry])
_encoder = msgspec.msgpack.Encoder()


def little(array: np.ndarray) -> memoryview:
    """An array's bytes, little-endian, C order."""
    return memoryview(
        np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).reshape(-1).view(np.uint8)
    )


def dense_entry(array: np.ndarray) -> Entry:
    array = np.asarray(array)
    return Entry(list(array.shape), wire_dtype(array), array.size, little(array))


def encode_entries(delta: Mapping[str, np.ndarray], entry: Callable[[np.ndarray], Entry]) -> bytes:
    return _encoder.encode({name: entry(np.asarray(array)) for name, array in sorted(delta.items())})


def read_entries(payload: bytes | memoryview, layout: list[TensorInfo]) -> Iterator[tuple[TensorInfo, Entry]]:
    """Each entry with the layout it must match; names checked first."""
    try:
        entries = _decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"bad update payload: {exc}") from None
    if len(entries) > MAX_TENSORS:
        raise ProtocolError(f"update has {len(entries)} tensors; at most {MAX_TENSORS} allowed")
    check_names(list(entries), layout, "update")
    for info in layout:
        entry = entries[info.name]
        if entry.shape != info.shape:
            raise ProtocolError(
                f"update: tensor {info.name!r} has shape {entry.shape}, expected {info.shape}"
            )
        yield info, entry


def read_array(data: memoryview, dtype: str, count: int, name: str) -> np.ndarray:
    """`count` little-endian elements of `dtype` (the caller allows it) from `data`, which must hold exactly them."""
    wire = np.dtype(dtype).newbyteorder("<")
    if len(data) != count * wire.itemsize:
        raise ProtocolError(f"tensor {name!r}: {len(data)} bytes for {count} {dtype} values")
    return np.frombuffer(data, dtype=wire)


def half_entry(array: np.ndarray) -> Entry:
    """A tensor whole, floating ones as float16 (see `dense_values`)."""
    return dense_entry(to_half(array))


def dense_values(info: TensorInfo, entry: Entry) -> np.ndarray:
    """A dense entry as the layout's tensor (a floating one may travel as float16); raises ProtocolError unless
    it is exactly that."""
    whole = entry.index is None and entry.transform is None
    half = info.dtype in FLOAT_DTYPES and entry.dtype == "float16"
    if not whole or (entry.dtype != info.dtype and not half) or entry.count != math.prod(info.shape):
        raise ProtocolError(f"tensor {info.name!r}: expected a dense {info.dtype}{info.shape}")
    return read_array(entry.data, entry.dtype, entry.count, info.name).reshape(info.shape)


def sparse_entry(array: np.ndarray, index: np.ndarray, value_dtype: np.dtype | str) -> Entry:
    """A floating tensor's values at sorted flat `index` (in `value_dtype`; float16 saturates, see `to_half`), or
    the dense entry of a tensor that is not floating."""
    if array.dtype.name not in FLOAT_DTYPES:
        return dense_entry(array)
    values = array.reshape(-1)[index]
    values = to_half(values) if np.dtype(value_dtype) == np.float16 else values.astype(value_dtype)
    gaps = np.diff(index, prepend=0)
    widest = int(gaps.max()) if gaps.size else 0
    index_dtype = next(np.dtype(t) for t in INDEX_DTYPES["gaps"] if widest <= np.iinfo(t).max)
    return Entry(
        list(array.shape),
        values.dtype.name,
        index.size,
        little(values),
        little(gaps.astype(index_dtype)),
        index_dtype.name,
        index_coding="gaps",
    )


def sparse_part(info: TensorInfo, entry: Entry, value_dtype: str, allow_empty: bool = False) -> Part:
    """The part of a sparse entry (values in `value_dtype` at strictly increasing indices within the tensor),
    or of a dense one; ProtocolError for anything else."""
    if entry.index is None:
        return Dense(dense_values(info, entry))
    size = math.prod(info.shape)
    if entry.transform is not None:
        raise ProtocolError(f"tensor {info.name!r}: a sparse entry with a transform")
    if (
        info.dtype not in FLOAT_DTYPES
        or entry.dtype != value_dtype
        or not (0 if allow_empty else 1) <= entry.count <= size
    ):
        raise ProtocolError(f"tensor {info.name!r}: not a sparse {value_dtype} tensor of {size} elements")
    if entry.index_dtype not in INDEX_DTYPES[entry.index_coding]:
        raise ProtocolError(
            f"tensor {info.name!r}: index dtype {entry.index_dtype!r} not allowed for {entry.index_coding}"
        )
    index = read_array(entry.index, entry.index_dtype, entry.count, info.name)
    if index.size and index.max() >= size:
        raise ProtocolError(f"tensor {info.name!r}: indices not strictly increasing within {size}")
    # gaps below the size: their sum is below count * size, within int64 for any tensor a layout can describe
    index = np.cumsum(index, dtype=np.int64) if entry.index_coding == "gaps" else index.astype(np.int64)
    if (index.size and index[-1] >= size) or np.any(np.diff(index) <= 0):
        raise ProtocolError(f"tensor {info.name!r}: indices not strictly increasing within {size}")
    return Sparse(index, read_array(entry.data, value_dtype, entry.count, info.name))
