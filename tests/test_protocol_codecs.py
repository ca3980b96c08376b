"""Update codecs: round trips (shapes, dtypes; integer and boolean tensors untouched), what each keeps, sparse
folding without densifying, the registry and zstd, and strict rejection of malformed payloads."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codecs import CODECS, Sparse, make_codec
from protocol.codecs.base import CUT_ELEMENTS, Dense
from protocol.codecs.dct import dct, idct
from protocol.errors import ProtocolError
from protocol.tensors import describe, encode_state

ALL = [name + suffix for name in CODECS for suffix in ("", "+zstd")]


def delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": (rng.normal(size=(16, 3, 3, 3)) * 1e-2).astype(np.float32),
        "fc.bias": rng.normal(size=10).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "mask": rng.random(5) < 0.5,
        "scalar": np.array(0.25, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


@pytest.mark.parametrize("name", ALL)
def test_every_codec_round_trips_shapes_dtypes_and_leaves_integers_and_flags_untouched(name):
    d = delta()
    out = make_codec(name).decode(make_codec(name).encode(d), describe(d))
    assert sorted(out) == sorted(d)
    for key, array in d.items():
        assert out[key].shape == array.shape and out[key].dtype == array.dtype, key
    assert out["bn.num_batches_tracked"] == 7 and np.array_equal(out["mask"], d["mask"])


@pytest.mark.parametrize("name", ["dense", "dense+zstd"])
def test_dense_is_exact_and_is_todays_wire_format(name):
    d = delta()
    payload = make_codec(name).encode(d)
    assert name.endswith("zstd") or payload == encode_state(d)
    out = make_codec(name).decode(payload, describe(d))
    assert all(np.array_equal(out[k], d[k]) for k in d)


def test_fp16_halves_float_bytes_and_rounds_like_float16():
    d = {"w": np.random.default_rng(1).normal(size=(256, 256)).astype(np.float32)}
    payload = make_codec("fp16").encode(d)
    assert len(encode_state(d)) / len(payload) > 1.99
    out = make_codec("fp16").decode(payload, describe(d))
    assert np.array_equal(out["w"], d["w"].astype(np.float16).astype(np.float32))


def test_fp16_saturates_instead_of_overflowing_to_infinity():
    d = {"w": np.array([1e6, -1e6, 1.0], dtype=np.float32)}
    out = make_codec("fp16").decode(make_codec("fp16").encode(d), describe(d))
    assert np.isfinite(out["w"]).all() and out["w"][0] == 65504


def test_topk_saturates_the_values_it_sends():
    d = {"w": np.array([[1e6, -1e6], [0.5, 0.0]], dtype=np.float32)}
    out = make_codec("topk", 1.0).decode(make_codec("topk", 1.0).encode(d), describe(d))
    assert out["w"].tolist() == [[65504.0, -65504.0], [0.5, 0.0]]


def test_topk_keeps_the_largest_magnitudes_of_each_matrix_and_sends_vectors_whole():
    rng = np.random.default_rng(2)
    d = {"w": rng.normal(size=(200, 100)).astype(np.float32), "b": rng.normal(size=7).astype(np.float32)}
    codec = make_codec("topk", 0.1)
    out = codec.decode(codec.encode(d), describe(d))
    kept = np.flatnonzero(out["w"])
    assert len(kept) == 2000
    assert set(kept) == set(np.argsort(np.abs(d["w"]).ravel())[-2000:])
    assert np.allclose(out["w"].ravel()[kept], d["w"].ravel()[kept], rtol=1e-3)
    assert np.array_equal(out["b"], d["b"].astype(np.float16))  # vectors travel whole, as float16


def test_topk_never_sends_zeros():
    """A kernel whose outer taps saw no image is mostly zeros: only its nonzero elements travel, however few."""
    mostly_zero = np.zeros((2048, 9), np.float32)
    mostly_zero[:, 4] = np.arange(1, 2049)  # 2048 nonzero of 18432: 922 kept at 5%
    few = np.zeros((1000, 20), np.float32)
    few[3, 7], few[500, 0] = -2.0, 0.5  # 2 nonzero, fewer than the 1000 that 5% would keep
    d = {"mostly_zero": mostly_zero, "few": few, "none": np.zeros((128, 128), np.float32)}
    codec = make_codec("topk", 0.05)
    payload = codec.encode(d)
    parts = dict(codec.parts(payload, describe(d)))
    assert parts["none"].values.size == 0
    assert list(parts["few"].indices) == [67, 10000]
    assert parts["mostly_zero"].values.size == 922  # ceil(0.05 * 18432), all nonzero
    out = codec.decode(payload, describe(d))
    assert np.array_equal(out["few"], few) and not out["none"].any()
    assert set(np.flatnonzero(out["mostly_zero"])) == set(np.argsort(mostly_zero.ravel())[-922:])


def test_topk_at_one_percent_is_over_fifty_times_smaller_than_dense():
    d = {"w": np.random.default_rng(3).normal(size=(512, 512)).astype(np.float32)}
    assert len(encode_state(d)) / len(make_codec("topk", 0.01).encode(d)) > 90  # 4 bytes a value, 2 + 2


def test_sparse_parts_fold_into_a_running_sum_without_densifying():
    d = {"w": np.random.default_rng(4).normal(size=(160, 160)).astype(np.float32)}
    codec = make_codec("topk", 0.05)
    parts = dict(codec.parts(codec.encode(d), describe(d)))
    assert isinstance(parts["w"], Sparse) and parts["w"].values.size == 1280
    total = np.zeros((160, 160))
    parts["w"].add_into(total, 2.0)
    parts["w"].add_into(total, 0.5)
    assert np.allclose(total, 2.5 * codec.decode(codec.encode(d), describe(d))["w"])


def test_dct_matches_the_orthonormal_dct_and_inverts():
    from scipy.fft import dct as reference

    for n in (2, 3, 64, 1001):
        x = np.random.default_rng(n).normal(size=n)
        assert np.allclose(dct(x), reference(x, norm="ortho"))
        assert np.allclose(idct(dct(x)), x)


def test_dct_keeps_the_lowest_frequencies_of_a_matrix_and_is_exact_when_keeping_all():
    x = np.cos(np.linspace(0, 3, 20000)).astype(np.float32).reshape(200, 100)  # smooth: low frequencies
    d = {"w": x}
    low = make_codec("dct", 0.1)
    payload = low.encode(d)
    assert len(encode_state(d)) / len(payload) > 9
    assert np.abs(low.decode(payload, describe(d))["w"] - x).max() < 1e-3
    exact = make_codec("dct", 1.0)
    assert np.allclose(exact.decode(exact.encode(d), describe(d))["w"], x, atol=1e-6)


def test_unknown_codec_names_and_fractions_are_refused():
    with pytest.raises(ProtocolError, match="unknown codec"):  # a message naming one is dropped as bad input
        make_codec("gzip")
    with pytest.raises(ValueError, match="fraction"):
        make_codec("topk", 0.0)


@pytest.mark.parametrize("name", ALL)
def test_a_payload_for_another_layout_is_rejected(name):
    d = delta()
    payload = make_codec(name).encode(d)
    other = dict(d, **{"fc.bias": np.zeros(11, dtype=np.float32)})
    with pytest.raises(ProtocolError):
        make_codec(name).decode(payload, describe(other))
    with pytest.raises(ProtocolError):
        make_codec(name).decode(payload, describe({k: v for k, v in d.items() if k != "mask"}))


@pytest.mark.parametrize("name", ALL)
def test_garbage_is_a_protocol_error(name):
    with pytest.raises(ProtocolError):
        make_codec(name).decode(b"\x93not a payload", describe(delta()))


def sparse_payload(index: list[int], dtype: str, coding: str) -> bytes:
    import msgspec

    from protocol.codecs.wire import Entry, little

    values = little(np.arange(1, len(index) + 1, dtype=np.float16))
    entry = Entry(
        [10], "float16", len(index), values, little(np.array(index, dtype)), dtype, index_coding=coding
    )
    return msgspec.msgpack.encode({"w": entry})


@pytest.mark.parametrize(
    "index, coding",
    [([3, 3], "positions"), ([2, 10], "positions"), ([5, 1], "positions")]
    + [([3, 0], "gaps"), ([2, 8], "gaps"), ([10], "gaps"), ([1, 65535], "gaps")],
)
def test_topk_rejects_repeated_or_out_of_range_indices(index, coding):
    d = {"w": np.zeros(10, dtype=np.float32)}
    with pytest.raises(ProtocolError, match="indices"):
        make_codec("topk").decode(sparse_payload(index, "uint32", coding), describe(d))


def test_sparse_positions_travel_as_gaps_in_the_narrowest_type_and_earlier_positions_still_decode():
    from protocol.codecs.wire import read_entries

    w = np.zeros((2, 100_000), dtype=np.float32)
    w[0, [7, 9]], w[1, 50_000] = 1.0, 2.0  # gaps 7, 2 and 150_000 - 9
    for array, dtype in ((w, "uint32"), (w[:, :200], "uint16")):
        payload = make_codec("sparse").encode({"w": array})
        [(_, entry)] = read_entries(payload, describe({"w": array}))
        assert (entry.index_coding, entry.index_dtype) == ("gaps", dtype)
        assert np.array_equal(make_codec("sparse").decode(payload, describe({"w": array}))["w"], array)
    with pytest.raises(ProtocolError, match="not allowed"):  # uint16 positions were never sent
        make_codec("topk").decode(sparse_payload([1, 2], "uint16", "positions"), describe({"w": w[0, :10]}))
    positions = make_codec("topk").decode(
        sparse_payload([1, 7], "uint32", "positions"), describe({"w": w[0, :10]})
    )
    assert np.array_equal(np.flatnonzero(positions["w"]), [1, 7]) and positions["w"][7] == 2.0


def test_zstd_refuses_to_expand_beyond_what_the_layout_holds():
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(b"\0" * (8 << 20))
    with pytest.raises(ProtocolError, match="zstd"):
        make_codec("dense+zstd").decode(bomb, describe({"w": np.zeros(4, np.float32)}))


def test_sparse_is_exact_and_small_where_a_delta_is_mostly_zeros():
    rng = np.random.default_rng(5)
    w = np.zeros((200, 100), dtype=np.float32)
    w.ravel()[rng.choice(w.size, 600, replace=False)] = rng.normal(size=600).astype(np.float32)
    d = {"w": w, "b": np.zeros(10, dtype=np.float32), "n": np.array(3, np.int64)}
    codec = make_codec("sparse")
    payload = codec.encode(d)
    assert len(encode_state(d)) / len(payload) > 15
    out = codec.decode(payload, describe(d))
    assert all(np.array_equal(out[k], d[k]) for k in d)


@pytest.mark.parametrize("name", ["topk", "dct"])
def test_partial_codecs_cut_large_kernels_and_send_small_ones_whole(name):
    """A depthwise kernel (48 x 1 x 3 x 3) is below CUT_ELEMENTS: whole, as float16; a 128 x 128 matrix is cut."""
    rng = np.random.default_rng(6)
    d = {
        "depthwise": rng.normal(size=(48, 1, 3, 3)).astype(np.float32),
        "pointwise": rng.normal(size=(128, 128)).astype(np.float32),
    }
    assert d["depthwise"].size < CUT_ELEMENTS <= d["pointwise"].size
    codec = make_codec(name, 0.1)
    parts = dict(codec.parts(codec.encode(d), describe(d)))
    assert isinstance(parts["depthwise"], Dense)
    assert np.array_equal(parts["depthwise"].array, d["depthwise"].astype(np.float16))
    out = codec.decode(codec.encode(d), describe(d))
    assert not np.allclose(out["pointwise"], d["pointwise"], atol=1e-2)  # 10% of it: not the whole


@pytest.mark.parametrize("name", ["topk", "dct"])
def test_partial_codecs_send_batchnorm_statistics_whole(name):
    d = {"bn.running_var": np.linspace(0.5, 2.0, 64, dtype=np.float32), "conv": np.ones((8, 8), np.float32)}
    out = make_codec(name, 0.1).decode(make_codec(name, 0.1).encode(d), describe(d))
    assert np.array_equal(out["bn.running_var"], d["bn.running_var"].astype(np.float16))


@settings(max_examples=200, deadline=None, database=None)
@given(
    size=st.integers(1, 200_000),
    data=st.data(),
)
def test_any_set_of_positions_round_trips_through_its_gaps(size, data):
    """Sorted unique positions anywhere in a tensor (gaps across the uint16 / uint32 bounds) come back exactly."""
    positions = data.draw(st.sets(st.integers(0, size - 1), max_size=64).map(sorted))
    w = np.zeros((1, size), dtype=np.float32)
    w.ravel()[positions] = np.arange(1, len(positions) + 1, dtype=np.float32)
    codec = make_codec("sparse")
    assert np.array_equal(codec.decode(codec.encode({"w": w}), describe({"w": w}))["w"], w)


@settings(max_examples=300, deadline=None, database=None)
@given(
    index=st.lists(st.integers(0, 2**32 - 1), max_size=8),
    dtype=st.sampled_from(["uint16", "uint32", "uint64"]),
    coding=st.sampled_from(["positions", "gaps"]),
)
def test_arbitrary_indices_decode_in_range_and_increasing_or_are_a_protocol_error(index, dtype, coding):
    index = [i % (np.iinfo(dtype).max + 1) for i in index]
    layout = describe({"w": np.zeros(10, dtype=np.float32)})
    try:
        [(_, part)] = make_codec("topk").parts(sparse_payload(index, dtype, coding), layout)
    except ProtocolError:
        return
    assert np.all(np.diff(part.indices) > 0) and all(0 <= i < 10 for i in part.indices)


def test_a_warm_up_doubles_a_partial_codecs_share_for_each_round_before_it_ends():
    from protocol.codecs import warmed
    from protocol.schemas import CodecSpec

    topk = CodecSpec(name="topk+zstd", fraction=0.01, warmup_rounds=2)
    assert [warmed(topk, version).fraction for version in range(4)] == [0.04, 0.02, 0.01, 0.01]
    assert warmed(CodecSpec(name="dct", warmup_rounds=1), 0).fraction == 1.0  # 2 x its default 0.8, capped
    assert warmed(CodecSpec(name="topk", fraction=0.01), 0).fraction == 0.01  # no warm-up
    assert warmed(CodecSpec(name="fp16", warmup_rounds=3), 0) == CodecSpec(name="fp16", warmup_rounds=3)
