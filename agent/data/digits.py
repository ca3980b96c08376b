"""scikit-learn's 8x8 digits (1797 images, shipped with the library).

Split once by a fixed seeded permutation into a training 80% and a held-out test 20%; the training part is
divided among `num_partitions` devices (IID or Dirichlet non-IID), and `fraction` keeps a seeded prefix of one
partition. In a worker the images are normalised, upscaled to the model's input size and kept on the device;
when that would exceed the data budget the 8x8 originals stay there and each batch is upscaled on the device.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
from msgspec import Meta

from agent.data.base import DataSpecBase, TrainingData, check_classes
from protocol.schemas import ModelSpec

if TYPE_CHECKING:
    import torch

DIGITS_SPLIT_SEED = 20240601
DIGITS_TEST_SHARE = 0.2
DIRICHLET_ATTEMPTS = 1000
CLASSES = 10


class DigitsData(DataSpecBase, tag="digits"):
    imports = ("sklearn.datasets",)  # ~0.9 s on a 2-core machine with torch already loaded

    partition: Literal["iid", "dirichlet"] = "iid"
    alpha: Annotated[float, Meta(gt=0)] = 0.5
    num_partitions: Annotated[int, Meta(ge=1)] = 1
    partition_index: Annotated[int, Meta(ge=0)] = 0
    fraction: Annotated[float, Meta(gt=0, le=1)] = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.partition_index < self.num_partitions:
            raise ValueError(f"partition_index {self.partition_index} not in [0, {self.num_partitions})")

    def sample_count(self) -> int:
        return len(digits_indices(self))

    def open(self, model: ModelSpec, device: str, budget_bytes: int, loader_workers: int = 0) -> TrainingData:
        import torch

        from agent.data.tensors import DeviceTensors

        check_classes(CLASSES, model)
        indices = digits_indices(self)
        small, labels = _normalised(indices, device), torch.from_numpy(digits_arrays()[1][indices]).to(device)
        size = model.input_size
        if len(indices) * size * size * small.element_size() <= budget_bytes:
            return DeviceTensors(upscale(small, size), labels, lambda x, rng: to_rgb(x))
        return DeviceTensors(small, labels, lambda x, rng: to_rgb(upscale(x, size)))


def upscale(images: torch.Tensor, size: int) -> torch.Tensor:
    import torch

    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """Grey to three equal channels, as an ordinary contiguous batch (no zero-stride input for the first conv)."""
    return images.expand(-1, 3, -1, -1).contiguous()


def _normalised(indices: np.ndarray, device: str) -> torch.Tensor:
    """(N, 1, 8, 8) float32 images standardised with the training split's mean and deviation."""
    import torch

    images, _, train, _ = digits_arrays()
    mean, std = float(images[train].mean()), float(images[train].std())
    return ((torch.from_numpy(images[indices]).unsqueeze(1) - mean) / std).to(device)


def digits_test_set(model: ModelSpec) -> torch.utils.data.TensorDataset:
    """The held-out test split, shaped for `model` (CPU tensors), disjoint from every training partition."""
    import torch

    check_classes(CLASSES, model)
    _, labels, _, test = digits_arrays()
    images = to_rgb(upscale(_normalised(test, "cpu"), model.input_size))
    return torch.utils.data.TensorDataset(images, torch.from_numpy(labels[test]))


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
