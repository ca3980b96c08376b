"""CheckpointStore: bit-exact safetensors round trips, atomic writes, versions, pruning, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors import SafetensorError, safe_open

from aggregator.checkpoints import CheckpointRef, CheckpointStore, load_safetensors
from protocol import ProtocolError


def sample_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=4 * 24, dtype=np.uint8)
    return {
        "float32_any_bits": raw.view(np.float32).reshape(4, 6),  # includes NaN/inf bit patterns
        "float16": rng.normal(size=(3, 5)).astype(np.float16),
        "float64": rng.normal(size=(7,)),
        "int64_scalar": np.array(123456789012, dtype=np.int64),  # 0-d, like num_batches_tracked
        "int32": rng.integers(-(2**31), 2**31 - 1, size=(2, 2), dtype=np.int32),
        "int8": np.array([-128, 0, 127], dtype=np.int8),
        "uint8": np.array([0, 255], dtype=np.uint8),
        "bool": np.array([[True, False], [False, True]]),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # not C-contiguous
    }


def assert_bit_exact(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        got = actual[name]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), name
        assert got.tobytes() == want.tobytes(), name


def test_round_trip_is_bit_exact_with_metadata(tmp_path):
    store = CheckpointStore(tmp_path)
    state = sample_state()
    ref = store.save("cifar", 3, state)
    assert ref == CheckpointRef("cifar", 3, tmp_path / "cifar" / "v000003.safetensors")
    assert ref.path.is_file()
    assert_bit_exact(store.load("cifar", 3), state)
    assert_bit_exact(load_safetensors(ref.path), state)
    with safe_open(ref.path, framework="np") as f:
        assert f.metadata() == {"task": "cifar", "version": "3"}


def test_latest_version_and_versions(tmp_path):
    store = CheckpointStore(tmp_path)
    assert store.latest_version("cifar") is None
    assert store.versions("cifar") == []
    for version in (0, 2, 1, 10):
        store.save("cifar", version, {"w": np.full(2, version, np.float32)})
    store.save("mnist", 5, {"w": np.zeros(2, np.float32)})
    (tmp_path / "cifar" / "notes.txt").write_text("not a checkpoint")
    assert store.versions("cifar") == [0, 1, 2, 10]
    assert store.latest_version("cifar") == 10
    assert store.latest_version("mnist") == 5
    np.testing.assert_array_equal(store.load("cifar", 10)["w"], [10, 10])


def test_prune_keeps_the_newest(tmp_path):
    store = CheckpointStore(tmp_path)
    for version in range(5):
        store.save("cifar", version, {"w": np.full(1, version, np.float32)})
    assert store.prune("cifar", keep=2) == [0, 1, 2]
    assert store.versions("cifar") == [3, 4]
    assert store.prune("cifar", keep=2) == []
    assert store.prune("cifar", keep=10) == []
    assert store.versions("cifar") == [3, 4]
    with pytest.raises(ValueError, match="keep"):
        store.prune("cifar", keep=0)
    assert store.versions("cifar") == [3, 4]


def test_saving_the_same_version_overwrites_without_leftovers(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save("cifar", 1, {"w": np.zeros(3, np.float32)})
    second = {"w": np.ones(3, np.float32), "b": np.array([7], np.int64)}
    store.save("cifar", 1, second)
    assert_bit_exact(store.load("cifar", 1), second)
    assert sorted(p.name for p in (tmp_path / "cifar").iterdir()) == ["v000001.safetensors"]


def test_failed_save_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    store = CheckpointStore(tmp_path)
    first = {"w": np.arange(3, dtype=np.float32)}
    store.save("cifar", 1, first)
    with pytest.raises(SafetensorError, match="complex128"):
        store.save("cifar", 1, {"w": np.zeros(3, dtype=np.complex128)})  # dtype safetensors cannot store
    assert_bit_exact(store.load("cifar", 1), first)
    assert sorted(p.name for p in (tmp_path / "cifar").iterdir()) == ["v000001.safetensors"]


def test_missing_checkpoint_names_the_path(tmp_path):
    store = CheckpointStore(tmp_path)
    with pytest.raises(FileNotFoundError, match="v000004.safetensors"):
        store.load("cifar", 4)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_safetensors(tmp_path / "nothing.safetensors")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_checkpoint_names_the_path(tmp_path, damage):
    store = CheckpointStore(tmp_path)
    ref = store.save("cifar", 2, sample_state())
    data = ref.path.read_bytes()
    ref.path.write_bytes(b"\x13\x37 not a safetensors file" * 3 if damage == "garbage" else data[:-5])
    with pytest.raises(ValueError, match="v000002.safetensors.*corrupt"):
        store.load("cifar", 2)
    with pytest.raises(ValueError, match="corrupt"):
        load_safetensors(ref.path)


def test_checkpoint_for_another_version_is_rejected(tmp_path):
    store = CheckpointStore(tmp_path)
    ref = store.save("cifar", 1, {"w": np.zeros(1, np.float32)})
    ref.path.rename(store.path("cifar", 2))
    with pytest.raises(ValueError, match="expected 'cifar' v2"):
        store.load("cifar", 2)


@pytest.mark.parametrize("task", ["../escape", "a/b", "", ".hidden"])
def test_task_names_cannot_escape_the_root(tmp_path, task):
    with pytest.raises(ProtocolError):
        CheckpointStore(tmp_path / "store").save(task, 1, {"w": np.zeros(1, np.float32)})
    assert not any(tmp_path.rglob("*.safetensors"))


def test_negative_version_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="version"):
        CheckpointStore(tmp_path).save("cifar", -1, {"w": np.zeros(1, np.float32)})
