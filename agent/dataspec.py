"""What local data a device holds for a task: small specs, partitions and sample counts (numpy, no torch).

Three kinds, decoded with `msgspec.convert(obj, DataSpec)` (tagged on "kind"):

- `digits`: scikit-learn's 8x8 digits (1797 images, shipped with the library), split once by a fixed seeded
  permutation into a training 80% and a held-out test 20%; the training part is divided among
  `num_partitions` devices (IID or Dirichlet non-IID), and `fraction` keeps a seeded prefix of one partition.
- `imagefolder`: a torchvision ImageFolder tree (one sub-folder per class).
- `synthetic`: seeded random images and labels made per item, for throughput work.

`agent.datasets` turns a spec into torch tensors; this module is what the agent's own process needs.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import numpy as np
from msgspec import Meta

DIGITS_SPLIT_SEED = 20240601
DIGITS_TEST_SHARE = 0.2
DIRICHLET_ATTEMPTS = 1000


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
def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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
    return digits_arrays()[2:]


def _partitions(spec: DigitsData) -> list[np.ndarray]:
    """The training indices of every device: disjoint, together the whole training split, none empty."""
    _, labels, train, _ = digits_arrays()
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


# --- image folders -------------------------------------------------------------------------------------

#: the extensions torchvision's ImageFolder loads
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def folder_root(spec: ImageFolderData) -> Path:
    root = Path(spec.path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    return root


def _image_count(spec: ImageFolderData) -> int:
    """Images ImageFolder would load: files with an image extension anywhere under each class folder."""
    count = 0
    for class_dir in (d for d in folder_root(spec).iterdir() if d.is_dir()):
        for _, _, files in os.walk(class_dir, followlinks=True):
            count += sum(name.lower().endswith(IMAGE_EXTENSIONS) for name in files)
    return count


def sample_count(spec: DataSpec) -> int:
    """How many training samples a spec describes, without loading or decoding any image."""
    if isinstance(spec, DigitsData):
        return len(digits_indices(spec))
    if isinstance(spec, ImageFolderData):
        return _image_count(spec)
    return spec.samples
