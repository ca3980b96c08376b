"""agent.dataspec and agent.datasets: digits partitions, preprocessing, synthetic and image-folder data, spec validation."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from agent.datasets import digits_test_set, train_dataset
from agent.dataspec import (
    DataSpec,
    DigitsData,
    ImageFolderData,
    SyntheticData,
    digits_indices,
    digits_split,
    sample_count,
)
from protocol.schemas import ModelSpec

MODEL = ModelSpec(name="resnet18", num_classes=10, input_size=16)


def partitions(**spec) -> list[np.ndarray]:
    count = spec["num_partitions"]
    return [digits_indices(DigitsData(partition_index=i, **spec)) for i in range(count)]


def label_skew(parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each partition's label histogram and the training split's."""
    target = load_digits().target
    overall = np.bincount(target[digits_split()[0]], minlength=10) / len(digits_split()[0])
    return float(
        np.mean([0.5 * np.abs(np.bincount(target[p], minlength=10) / len(p) - overall).sum() for p in parts])
    )


# --- digits --------------------------------------------------------------------------------------------


def test_split_is_fixed_and_disjoint() -> None:
    train, test = digits_split()
    assert len(train) + len(test) == 1797 and len(test) == round(1797 * 0.2)
    assert not set(train) & set(test)


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
@pytest.mark.parametrize("count", [1, 3, 7])
def test_partitions_are_disjoint_non_empty_and_cover_the_train_split(kind: str, count: int) -> None:
    parts = partitions(partition=kind, num_partitions=count, alpha=0.3, seed=5)
    train, test = digits_split()
    assert all(len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined)) == len(train)
    assert set(joined) == set(train)
    assert not set(joined) & set(test)


def test_iid_partitions_have_equal_sizes() -> None:
    sizes = [len(p) for p in partitions(num_partitions=3)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_skews_labels_more_than_iid() -> None:
    iid = label_skew(partitions(partition="iid", num_partitions=5))
    skewed = label_skew(partitions(partition="dirichlet", alpha=0.3, num_partitions=5))
    assert iid < 0.1 < skewed


def test_partitions_are_deterministic_per_seed() -> None:
    spec = {"partition": "dirichlet", "num_partitions": 4, "alpha": 0.5}
    a, b, c = partitions(seed=1, **spec), partitions(seed=1, **spec), partitions(seed=2, **spec)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, c))


def test_fraction_takes_nested_prefixes_of_the_partition() -> None:
    whole = digits_indices(DigitsData(num_partitions=3, partition_index=1))
    third = digits_indices(DigitsData(num_partitions=3, partition_index=1, fraction=1 / 3))
    two_thirds = digits_indices(DigitsData(num_partitions=3, partition_index=1, fraction=2 / 3))
    assert len(third) == round(len(whole) / 3) and len(two_thirds) == round(len(whole) * 2 / 3)
    assert set(third) <= set(two_thirds) <= set(whole)
    assert sample_count(DigitsData(num_partitions=3, partition_index=1, fraction=2 / 3)) == len(two_thirds)


def test_digit_tensors_are_normalised_three_channel_and_resized() -> None:
    data = train_dataset(DigitsData(), ModelSpec(name="resnet18", num_classes=10, input_size=8))
    images, labels = data.tensors
    assert images.shape == (len(digits_split()[0]), 3, 8, 8) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    assert torch.equal(images[:, 0], images[:, 2])
    assert abs(images.mean().item()) < 1e-4 and abs(images.std().item() - 1) < 1e-3
    image, label = train_dataset(DigitsData(fraction=0.1), MODEL)[0]
    assert image.shape == (3, 16, 16) and label.dtype == torch.int64


def test_test_set_is_the_held_out_split() -> None:
    test = digits_test_set(MODEL)
    assert len(test) == len(digits_split()[1])
    assert test[0][0].shape == (3, 16, 16)


def test_digits_need_ten_classes() -> None:
    with pytest.raises(ValueError, match="10 classes"):
        train_dataset(DigitsData(), ModelSpec(name="resnet18", num_classes=5, input_size=16))


def test_more_partitions_than_samples_is_an_error() -> None:
    with pytest.raises(ValueError, match="partitions"):
        digits_indices(DigitsData(num_partitions=5000, partition_index=0))


# --- synthetic -----------------------------------------------------------------------------------------


def test_synthetic_is_lazy_and_deterministic() -> None:
    model = ModelSpec(name="resnet18", num_classes=3, input_size=12)
    data = train_dataset(SyntheticData(samples=10**9, seed=4), model)
    assert len(data) == sample_count(SyntheticData(samples=10**9)) == 10**9
    image, label = data[123_456_789]
    assert image.shape == (3, 12, 12) and image.dtype == torch.float32 and 0 <= label < 3
    assert torch.equal(train_dataset(SyntheticData(samples=10**9, seed=4), model)[123_456_789][0], image)
    assert not torch.equal(data[1][0], image)
    assert not torch.equal(train_dataset(SyntheticData(samples=10**9, seed=5), model)[123_456_789][0], image)
    with pytest.raises(IndexError):
        data[10**9]


# --- image folders -------------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for cls, count in [("cat", 2), ("dog", 3)]:
        (tmp_path / cls).mkdir()
        for i in range(count):
            pixels = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    return tmp_path


def test_image_folder_samples(folder: Path) -> None:
    data = train_dataset(ImageFolderData(path=str(folder)), MODEL)
    assert len(data) == sample_count(ImageFolderData(path=str(folder))) == 5
    image, label = data[4]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 1


def test_image_folder_with_more_classes_than_the_model(folder: Path) -> None:
    (folder / "eel").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "eel" / "0.png")
    with pytest.raises(ValueError, match="3 classes"):
        train_dataset(
            ImageFolderData(path=str(folder)), ModelSpec(name="resnet18", num_classes=2, input_size=16)
        )


def test_missing_image_folder_names_the_path(tmp_path: Path) -> None:
    spec = ImageFolderData(path=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train_dataset(spec, MODEL)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        sample_count(spec)


# --- specs ---------------------------------------------------------------------------------------------


def test_specs_decode_by_kind() -> None:
    assert msgspec.convert({"kind": "synthetic", "samples": 5}, DataSpec) == SyntheticData(samples=5)
    spec = msgspec.convert(
        {"kind": "digits", "partition": "dirichlet", "num_partitions": 3, "partition_index": 2}, DataSpec
    )
    assert spec == DigitsData(partition="dirichlet", num_partitions=3, partition_index=2)
    assert msgspec.convert({"kind": "imagefolder", "path": "/data"}, DataSpec) == ImageFolderData(
        path="/data"
    )


def test_partition_index_must_be_below_the_count() -> None:
    with pytest.raises(ValueError, match="partition_index 3"):
        DigitsData(num_partitions=3, partition_index=3)
    with pytest.raises(msgspec.ValidationError, match="partition_index 3"):
        msgspec.convert({"kind": "digits", "num_partitions": 3, "partition_index": 3}, DataSpec)


@pytest.mark.parametrize(
    "raw",
    [
        {"kind": "digits", "colour": "red"},
        {"kind": "digits", "fraction": 0.0},
        {"kind": "digits", "fraction": 1.5},
        {"kind": "digits", "alpha": 0.0},
        {"kind": "digits", "num_partitions": 0},
        {"kind": "digits", "partition": "sorted"},
        {"kind": "synthetic", "samples": 0},
        {"kind": "imagefolder"},
        {"kind": "tape"},
    ],
)
def test_invalid_specs_are_rejected(raw: dict) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(raw, DataSpec)
