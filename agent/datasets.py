"""Local training data as torch Datasets, shaped for a task's model (the specs live in `agent.dataspec`)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from agent.dataspec import (  # the specs and partitions; this module adds the tensors
    DataSpec,
    DigitsData,
    ImageFolderData,
    digits_arrays,
    digits_indices,
    digits_split,
    folder_root,
)
from protocol.schemas import ModelSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --- digits --------------------------------------------------------------------------------------------


def _digits_tensors(indices: np.ndarray, model: ModelSpec) -> TensorDataset:
    """Normalised, upscaled, 3-channel digit images and int64 labels, computed once."""
    images, labels, train, _ = digits_arrays()
    mean, std = float(images[train].mean()), float(images[train].std())
    x = (torch.from_numpy(images[indices]).unsqueeze(1) - mean) / std
    x = torch.nn.functional.interpolate(x, size=(model.input_size,) * 2, mode="bilinear", align_corners=False)
    return TensorDataset(x.expand(-1, 3, -1, -1), torch.from_numpy(labels[indices]))


def digits_test_set(model: ModelSpec) -> Dataset:
    """The held-out digits test split, disjoint from every training partition."""
    _check_classes(10, model)
    return _digits_tensors(digits_split()[1], model)


# --- image folders -------------------------------------------------------------------------------------


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
    dataset = datasets.ImageFolder(str(folder_root(spec)), transform=transform)
    _check_classes(len(dataset.classes), model)
    return dataset


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
