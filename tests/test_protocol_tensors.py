"""State dict codec: bit-exact round trips, canonical little-endian wire form, and strict rejection."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from protocol import ProtocolError
from protocol.limits import MAX_TENSOR_NAME
from protocol.schemas import TensorInfo
from protocol.tensors import (
    MAX_DIM,
    MAX_NDIM,
    WIRE_DTYPES,
    check_finite,
    check_layout,
    decode_state,
    describe,
    encode_state,
    wire_dtype,
)

DTYPES = sorted(WIRE_DTYPES)
FLOATS = ["float16", "float32", "float64"]
UINT_OF = {"float16": np.uint16, "float32": np.uint32, "float64": np.uint64}


def sample(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random values covering the dtype's full range (ints) or sign/magnitude (floats)."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
    return (rng.standard_normal(size=shape) * 1e3).astype(dt)


def wire(**tensors: list) -> bytes:
    """A hand-made state payload: name -> [dtype, shape, data]."""
    return msgspec.msgpack.encode(tensors)


def assert_bit_exact(decoded: np.ndarray, original: np.ndarray) -> None:
    assert decoded.shape == original.shape
    assert decoded.dtype == original.dtype.newbyteorder("<")
    assert decoded.dtype.byteorder != ">"
    little = original.astype(original.dtype.newbyteorder("<"))
    assert decoded.tobytes() == little.tobytes()


# --- round trips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0, 4), (1,), (7,), (2, 3, 5)])
def test_round_trip_is_bit_exact(dtype, shape):
    original = sample(dtype, shape, seed=len(shape))
    decoded = decode_state(encode_state({"w": original}))
    assert list(decoded) == ["w"]
    assert_bit_exact(decoded["w"], original)


def test_round_trip_keeps_names_and_order_of_a_mixed_state():
    state = {f"layer{i}.{dtype}": sample(dtype, (i + 1, 2), seed=i) for i, dtype in enumerate(DTYPES)}
    state["scalar"] = np.float32(3.5)  # numpy scalar, not an array
    decoded = decode_state(encode_state(state))
    assert list(decoded) == list(state)
    for name, array in state.items():
        assert_bit_exact(decoded[name], np.asarray(array))
    assert decoded["scalar"].shape == () and decoded["scalar"] == np.float32(3.5)


def test_decoded_arrays_are_read_only_and_accept_memoryview_payload():
    payload = encode_state({"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    decoded = decode_state(memoryview(payload))
    assert np.array_equal(decoded["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert not decoded["w"].flags.writeable


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a.T,
        lambda a: a[::2, 1:],
        lambda a: a[:, ::-1],
        lambda a: np.asfortranarray(a),
        lambda a: np.broadcast_to(a[:1], a.shape),
    ],
    ids=["transposed", "strided-slice", "reversed", "fortran", "broadcast"],
)
@pytest.mark.parametrize("dtype", ["float32", "int64", "bool"])
def test_non_contiguous_input_is_sent_in_logical_c_order(make, dtype):
    view = make(sample(dtype, (6, 5)))
    decoded = decode_state(encode_state({"w": view}))["w"]
    assert decoded.shape == view.shape
    assert np.array_equal(decoded, view)
    assert decoded.tobytes() == np.ascontiguousarray(view).tobytes()


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int16", "int32", "int64"])
def test_big_endian_input_decodes_to_equal_little_endian_values(dtype):
    little = sample(dtype, (4, 3), seed=3)
    big = little.astype(np.dtype(dtype).newbyteorder(">"))
    decoded = decode_state(encode_state({"w": big}))["w"]
    assert decoded.dtype.byteorder in "<=|"
    assert decoded.dtype == np.dtype(dtype).newbyteorder("<")
    assert np.array_equal(decoded, little)
    # the wire form is canonical: byte order of the sender does not show
    assert encode_state({"w": big}) == encode_state({"w": little})


@pytest.mark.parametrize(
    "dtype, patterns",
    [
        ("float16", [0x7E01, 0xFE00, 0x7C01, 0xFC01, 0x8000, 0x7C00, 0xFC00, 0x0001]),
        ("float32", [0x7FC00001, 0xFFC12345, 0x7F800001, 0xFF800001, 0x80000000, 0x7F800000, 0x00000001]),
        (
            "float64",
            [
                0x7FF8000000000001,
                0xFFF8DEADBEEF0001,
                0x7FF0000000000001,
                0x8000000000000000,
                0x0000000000000001,
            ],
        ),
    ],
)
def test_nan_payloads_signs_and_subnormals_survive_bit_exactly(dtype, patterns):
    bits = np.array(patterns, dtype=UINT_OF[dtype])
    values = bits.view(dtype)
    decoded = decode_state(encode_state({"w": values}))["w"]
    assert decoded.view(UINT_OF[dtype]).tolist() == bits.tolist()


def test_realistic_state_of_fifty_tensors_round_trips():
    rng = np.random.default_rng(42)
    state = {}
    for i in range(50):
        ndim = int(rng.integers(0, 5))
        shape = tuple(int(d) for d in rng.integers(1, 12, size=ndim))
        dtype = "int64" if i % 10 == 9 else "float32"
        state[f"block{i // 5}.layer{i % 5}.weight"] = sample(dtype, shape, seed=i)
    state["conv1.weight"] = sample("float32", (64, 3, 7, 7), seed=99)
    payload = encode_state(state)
    decoded = decode_state(payload)
    assert list(decoded) == list(state)
    for name, array in state.items():
        assert_bit_exact(decoded[name], array)
    raw_bytes = sum(a.nbytes for a in state.values())
    assert (
        raw_bytes <= len(payload) < raw_bytes + 64 * len(state)
    )  # no bloat beyond a small per-tensor header


# --- rejected payloads ---------------------------------------------------------------------------------

GOOD = encode_state({"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, dtype=np.int64)})


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(b"this is not msgpack", id="text"),
        pytest.param(bytes(range(256)), id="garbage"),
        pytest.param(GOOD[: len(GOOD) // 2], id="truncated-half"),
        pytest.param(GOOD[:-1], id="truncated-one-byte"),
        pytest.param(GOOD + b"\x00", id="trailing-byte"),
        pytest.param(msgspec.msgpack.encode([["float32", [1], b"\0" * 4]]), id="list-not-map"),
        pytest.param(msgspec.msgpack.encode({1: ["float32", [1], b"\0" * 4]}), id="non-string-name"),
        pytest.param(wire(w=["float32", [1]]), id="missing-data"),
        pytest.param(wire(w=["float32", [1], b"\0" * 4, "extra"]), id="extra-element"),
        pytest.param(wire(w={"dtype": "float32", "shape": [1], "data": b"\0" * 4}), id="map-not-array"),
        pytest.param(wire(w=["float32", "1", b"\0" * 4]), id="shape-not-list"),
        pytest.param(wire(w=["float32", [1.0], b"\0" * 4]), id="float-dim"),
        pytest.param(wire(w=["float32", [1], [0, 0, 0, 0]]), id="data-not-bytes"),
        pytest.param(wire(w=["float32", [2, 2], b"\0" * 15]), id="short-data"),
        pytest.param(wire(w=["float32", [2, 2], b"\0" * 17]), id="long-data"),
        pytest.param(wire(w=["int64", [3], b"\0" * 8]), id="int64-wrong-length"),
        pytest.param(wire(w=["float32", [], b""]), id="scalar-without-bytes"),
        pytest.param(wire(w=["float32", [0, 4], b"\0" * 4]), id="empty-with-bytes"),
        pytest.param(wire(w=["float32", [2**63, 1], b"\0" * 4]), id="huge-dim"),
        pytest.param(wire(ok=["uint8", [1], b"\0"], bad=["float64", [2], b"\0" * 8]), id="second-tensor-bad"),
    ],
)
def test_malformed_payload_raises_protocol_error(payload):
    with pytest.raises(ProtocolError):
        decode_state(payload)


@pytest.mark.parametrize(
    "dtype",
    [
        "object",
        "O",
        "complex128",
        "complex64",
        "float128",
        "uint16",
        "uint32",
        "uint64",
        "<f4",
        "bfloat16",
        "",
    ],
)
def test_unknown_dtype_name_raises_protocol_error(dtype):
    with pytest.raises(ProtocolError, match="dtype"):
        decode_state(wire(w=[dtype, [1], b"\0" * 16]))


@pytest.mark.parametrize("shape", [[-1], [-2, -2], [0, -1], [4, -1, -1]])
def test_negative_dimensions_raise_even_when_byte_count_matches(shape):
    nbytes = max(0, int(np.prod(shape))) * 4  # [-2, -2] -> 16 bytes would "fit" without the sign check
    with pytest.raises(ProtocolError, match="shape"):
        decode_state(wire(w=["float32", shape, b"\0" * nbytes]))


def test_tensor_name_longer_than_the_limit_raises():
    with pytest.raises(ProtocolError, match="name"):
        decode_state(wire(**{"n" * (MAX_TENSOR_NAME + 1): ["float32", [1], b"\0" * 4]}))


def test_too_many_dimensions_raise_but_max_ndim_is_accepted():
    ok = decode_state(wire(w=["float32", [1] * MAX_NDIM, b"\0" * 4]))
    assert ok["w"].shape == (1,) * MAX_NDIM
    with pytest.raises(ProtocolError, match="shape"):
        decode_state(wire(w=["float32", [1] * (MAX_NDIM + 1), b"\0" * 4]))


@pytest.mark.parametrize(
    "shape",
    [[0, 2**62], [0, 2**63], [0, 2**40, 2**40], [0] + [MAX_DIM] * (MAX_NDIM - 1)],
    ids=["2^62", "2^63", "2^40x2^40", "max-dims"],
)
def test_zero_size_tensor_with_oversized_dimension_raises_protocol_error(shape):
    with pytest.raises(ProtocolError):
        decode_state(wire(w=["float32", shape, b""]))


@pytest.mark.parametrize(
    "array",
    [
        np.array([object(), 1], dtype=object),
        np.array([1 + 2j]),
        np.array([1 + 2j], dtype=np.complex64),
        np.array([1], dtype=np.uint16),
        np.array([1], dtype=np.uint64),
        np.array(["abc"]),
        np.array(["2024-01-01"], dtype="datetime64[D]"),
        np.zeros(2, dtype=[("x", "f4")]),
    ],
    ids=["object", "complex128", "complex64", "uint16", "uint64", "str", "datetime", "structured"],
)
def test_encoding_a_dtype_that_cannot_travel_raises_protocol_error(array):
    with pytest.raises(ProtocolError):
        encode_state({"ok": np.zeros(2, np.float32), "bad": array})
    with pytest.raises(ProtocolError):
        wire_dtype(array)
    with pytest.raises(ProtocolError):
        describe({"bad": array})


# --- describe / check_layout / check_finite -----------------------------------------------------------


def layout_state() -> dict[str, np.ndarray]:
    return {
        "conv.weight": np.zeros((8, 3, 3, 3), np.float32),
        "bn.num_batches_tracked": np.array(0, np.int64),
        "mask": np.ones((4,), bool),
    }


def test_describe_lists_names_wire_dtypes_and_shapes():
    state = layout_state()
    state["be"] = np.zeros((2, 5), ">f8")
    assert describe(state) == [  # in name order
        TensorInfo(name="be", dtype="float64", shape=[2, 5]),
        TensorInfo(name="bn.num_batches_tracked", dtype="int64", shape=[]),
        TensorInfo(name="conv.weight", dtype="float32", shape=[8, 3, 3, 3]),
        TensorInfo(name="mask", dtype="bool", shape=[4]),
    ]


def test_check_layout_accepts_a_decoded_state_matching_its_description():
    state = layout_state()
    check_layout(decode_state(encode_state(state)), describe(state), "global")


@pytest.mark.parametrize(
    "name, replacement",
    [
        ("conv.weight", np.zeros((8, 3, 3, 2), np.float32)),
        ("conv.weight", np.zeros((3, 8, 3, 3), np.float32)),
        ("conv.weight", np.zeros((8 * 27,), np.float32)),
        ("bn.num_batches_tracked", np.array([0], np.int64)),
        ("conv.weight", np.zeros((8, 3, 3, 3), np.float64)),
        ("conv.weight", np.zeros((8, 3, 3, 3), np.float16)),
        ("bn.num_batches_tracked", np.array(0, np.int32)),
        ("mask", np.ones((4,), np.uint8)),
    ],
    ids=["shape", "permuted", "flattened", "scalar-vs-1d", "f64", "f16", "i32", "u8-vs-bool"],
)
def test_check_layout_rejects_wrong_shape_or_dtype(name, replacement):
    expected = describe(layout_state())
    state = layout_state() | {name: replacement}
    with pytest.raises(ProtocolError) as exc:
        check_layout(state, expected, "update from d1")
    assert name in str(exc.value) and "update from d1" in str(exc.value)


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.pop("mask"),
        lambda s: s.update(extra=np.zeros(1, np.float32)),
        lambda s: (s.pop("mask"), s.update(Mask=np.ones((4,), bool))),
        lambda s: s.clear(),
    ],
    ids=["missing", "extra", "renamed", "empty"],
)
def test_check_layout_rejects_missing_and_extra_names(edit):
    expected = describe(layout_state())
    state = layout_state()
    edit(state)
    with pytest.raises(ProtocolError, match="names"):
        check_layout(state, expected, "global")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("size", [100, 20_000], ids=["checked with the small tensors", "checked alone"])
def test_check_finite_rejects_nan_and_infinities(dtype, bad, size):
    values = np.linspace(-1, 1, size).astype(dtype)
    values[57] = bad
    state = {"ok": np.zeros(3, np.float32), "w": values}
    with pytest.raises(ProtocolError) as exc:
        check_finite(state, "update")
    assert "'w'" in str(exc.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_check_finite_rejects_non_finite_scalar(bad):
    with pytest.raises(ProtocolError):
        check_finite({"s": np.array(bad, np.float32)}, "update")


def test_check_finite_accepts_finite_floats_and_any_integers_or_bools():
    state = {
        "f16": np.array([np.finfo(np.float16).max, np.finfo(np.float16).min, 0.0], np.float16),
        "f64": np.array([np.finfo(np.float64).max, 5e-324], np.float64),
        "empty": np.zeros((0, 4), np.float32),
        "i64": np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max]),
        "u8": np.array([255], np.uint8),
        "b": np.array([True, False]),
    }
    check_finite(state, "global")
    check_finite(decode_state(encode_state(state)), "global")


def test_encoding_is_canonical_whatever_the_insertion_order():
    rng = np.random.default_rng(0)
    state = {name: rng.normal(size=(3, 2)).astype(np.float32) for name in ["b", "a.weight", "c", "a.bias"]}
    reordered = dict(reversed(list(state.items())))
    assert encode_state(state) == encode_state(reordered)
    assert describe(state) == describe(reordered)
