"""Seeded random images and labels made on the device, for throughput work: the whole set at once while it fits
the data budget (then sampled like any stored data), else each batch anew."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from agent.data.base import DataSpecBase, TrainingData
from protocol.schemas import ModelSpec


class SyntheticData(DataSpecBase, tag="synthetic"):
    samples: Annotated[int, Meta(ge=1)]
    seed: int = 0

    def sample_count(self) -> int:
        return self.samples

    def open(self, model: ModelSpec, device: str, budget_bytes: int, loader_workers: int = 0) -> TrainingData:
        import torch

        from agent.data.tensors import DeviceTensors, GeneratedBatches, generator

        shape = (3, model.input_size, model.input_size)

        def make(count: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            images = torch.randn(count, *shape, generator=rng, device=device)
            return images, torch.randint(model.num_classes, (count,), generator=rng, device=device)

        if self.samples * 4 * shape[0] * shape[1] * shape[2] <= budget_bytes:
            images, labels = make(self.samples, generator(device, self.seed))
            return DeviceTensors(images, labels, lambda x, rng: x)
        return GeneratedBatches(self.samples, device, lambda index, rng: make(len(index), rng))
