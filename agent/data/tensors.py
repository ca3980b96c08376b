"""Training data held on the device: an epoch is a seeded permutation cut into index tensors, and a batch is one
gather plus a batched transform on the device (no per-sample Python)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from agent.data.base import TrainingData

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def generator(device: str | torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def shuffled_batches(samples: int, batch_size: int, rng: torch.Generator) -> list[torch.Tensor]:
    """A random permutation of range(samples) on the generator's device, cut into batches covering every sample
    once. A trailing batch of one sample joins the previous batch: BatchNorm cannot train on a single sample
    when the feature map has shrunk to 1x1."""
    order = torch.randperm(samples, generator=rng, device=rng.device)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


class DeviceTensors(TrainingData):
    """Samples stored once on the device (in whatever compact form `stored` has); `transform` turns a gathered
    batch into model inputs (upscaling, normalising, augmenting) on the device."""

    placement = "device"

    def __init__(self, stored: torch.Tensor, labels: torch.Tensor, transform: Transform) -> None:
        if len(stored) != len(labels):
            raise ValueError(f"{len(stored)} images but {len(labels)} labels")
        self.stored, self.labels, self.transform = stored, labels, transform
        self.samples = len(labels)

    def epoch(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = generator(self.stored.device, seed)
        for index in shuffled_batches(self.samples, batch_size, rng):
            yield self.transform(self.stored.index_select(0, index), rng), self.labels.index_select(0, index)


class GeneratedBatches(TrainingData):
    """Batches made on the device by `make(batch_size, generator)` when the samples would not fit in memory."""

    placement = "stream"

    def __init__(
        self,
        samples: int,
        device: str,
        make: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        self.samples, self.device, self.make = samples, device, make

    def epoch(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = generator(self.device, seed)
        for index in shuffled_batches(self.samples, batch_size, rng):
            yield self.make(index, rng)
