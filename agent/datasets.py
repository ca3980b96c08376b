"""Local training data of a task: what a device holds, described by a small spec, turned into a Dataset.

Three kinds, decoded with `msgspec.convert(obj, DataSpec)` (tagged on "kind"):

- `digits`: scikit-learn's 8x8 digits (1797 images, shipped with the library), split once by a fixed seeded
  permutation into a training 80% and a held-out test 20%; the training part is divided among
  `num_partitions` devices (IID or Dirichlet non-IID), and `fraction` keeps a seeded prefix of one partition.
- `imagefolder`: a torchvision ImageFolder tree (one sub-folder per class).
- `synthetic`: seeded random images and labels made per item, for throughput work.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import numpy as np
import torch
from msgspec import Meta
from torch.utils.data import Dataset, TensorDataset

from protocol.schemas import ModelSpec

DIGITS_SPLIT_SEED = 20240601
DIGITS_TEST_SHARE = 0.2
DIRICHLET_ATTEMPTS = 1000
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Spec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True, tag_field="kind"):
    """Base of the data specs."""


class DigitsData(_Spec, tag="digits"):
    partition: Literal["iid", "dirichlet"] = "iid"
    alpha: Annotated[float, Meta(gt=0)] = 0.5
    num_partitions: Annotated[int, Meta(ge=1)] = 1
    partition_index: Annotated[int, Meta(ge=0)] = 0
    fraction: Annotated[float, Meta(gt=0, le=1)] = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.partition_index < self.num_partitions:
            raise ValueError(f"partition_index {self.partition_index} not in [0, {self.num_partitions})")


class ImageFolderData(_Spec, tag="imagefolder"):
    path: str


class SyntheticData(_Spec, tag="synthetic"):
    samples: Annotated[int, Meta(ge=1)]
    seed: int = 0


DataSpec = DigitsData | ImageFolderData | SyntheticData


# --- digits --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Images scaled to [0, 1] (N, 8, 8), labels, and the train / test index arrays of the fixed split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
    cut = len(labels) - round(len(labels) * DIGITS_TEST_SHARE)
    for array in (images, labels, order):
        array.flags.writeable = False
    return images, labels, order[:cut], order[cut:]


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """Indices of the fixed training and test splits of the digits (read-only)."""
    return _digits()[2:]


def _partitions(spec: DigitsData) -> list[np.ndarray]:
    """The training indices of every device: disjoint, together the whole training split, none empty."""
    _, labels, train, _ = _digits()
    if spec.num_partitions > len(train):
        raise ValueError(f"{spec.num_partitions} partitions for {len(train)} training samples")
    rng = np.random.default_rng(spec.seed)
    if spec.partition == "iid":
        return np.array_split(rng.permutation(train), spec.num_partitions)
    for _ in range(DIRICHLET_ATTEMPTS):
        parts: list[list[int]] = [[] for _ in range(spec.num_partitions)]
        for cls in np.unique(labels[train]):
            members = rng.permutation(train[labels[train] == cls])
            shares = rng.dirichlet(np.full(spec.num_partitions, spec.alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for part, chunk in zip(parts, np.split(members, cuts)):
                part.extend(chunk.tolist())
        if all(parts):
            return [np.array(part, dtype=np.int64) for part in parts]
    raise ValueError(
        f"no Dirichlet(alpha={spec.alpha}) split into {spec.num_partitions} non-empty partitions"
    )


def digits_indices(spec: DigitsData) -> np.ndarray:
    """Indices (into the digits arrays) of this device's samples for this task."""
    part = _partitions(spec)[spec.partition_index]
    order = np.random.default_rng([spec.seed, spec.partition_index]).permutation(part)
    return order[: max(1, round(len(order) * spec.fraction))]


def _digits_tensors(indices: np.ndarray, model: ModelSpec) -> TensorDataset:
    """Normalised, upscaled, 3-channel digit images and int64 labels, computed once."""
    images, labels, train, _ = _digits()
    mean, std = float(images[train].mean()), float(images[train].std())
    x = (torch.from_numpy(images[indices]).unsqueeze(1) - mean) / std
    x = torch.nn.functional.interpolate(x, size=(model.input_size,) * 2, mode="bilinear", align_corners=False)
    return TensorDataset(x.expand(-1, 3, -1, -1), torch.from_numpy(labels[indices]))


def digits_test_set(model: ModelSpec) -> Dataset:
    """The held-out digits test split, disjoint from every training partition."""
    _check_classes(10, model)
    return _digits_tensors(digits_split()[1], model)


# --- image folders -------------------------------------------------------------------------------------


def _folder_root(spec: ImageFolderData) -> Path:
    root = Path(spec.path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    return root


def _image_folder(spec: ImageFolderData, model: ModelSpec) -> Dataset:
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [
            transforms.Resize(model.input_size),
            transforms.CenterCrop(model.input_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = datasets.ImageFolder(str(_folder_root(spec)), transform=transform)
    _check_classes(len(dataset.classes), model)
    return dataset


def _image_count(spec: ImageFolderData) -> int:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = str(_folder_root(spec))
    return len(make_dataset(root, find_classes(root)[1], extensions=IMG_EXTENSIONS))


# --- synthetic -----------------------------------------------------------------------------------------


class SyntheticDataset(Dataset):
    """Random normal images and uniform labels, each made from (seed, index) when read: no memory held."""

    def __init__(self, samples: int, model: ModelSpec, seed: int) -> None:
        self.samples, self.model, self.seed = samples, model, seed

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.samples:
            raise IndexError(f"index {index} out of range for {self.samples} samples")
        rng = np.random.default_rng([self.seed, index])
        size = self.model.input_size
        image = rng.standard_normal((3, size, size), dtype=np.float32)
        return torch.from_numpy(image), int(rng.integers(self.model.num_classes))


# --- entry points --------------------------------------------------------------------------------------


def _check_classes(classes: int, model: ModelSpec) -> None:
    if classes > model.num_classes:
        raise ValueError(f"data has {classes} classes but model {model.name} has only {model.num_classes}")


def train_dataset(spec: DataSpec, model: ModelSpec) -> Dataset:
    """The training samples a spec describes, as tensors shaped for `model` (3 x input_size x input_size)."""
    if isinstance(spec, DigitsData):
        _check_classes(10, model)
        return _digits_tensors(digits_indices(spec), model)
    if isinstance(spec, ImageFolderData):
        return _image_folder(spec, model)
    return SyntheticDataset(spec.samples, model, spec.seed)


def sample_count(spec: DataSpec) -> int:
    """How many training samples a spec describes, without loading or decoding any image."""
    if isinstance(spec, DigitsData):
        return len(digits_indices(spec))
    if isinstance(spec, ImageFolderData):
        return _image_count(spec)
    return spec.samples
