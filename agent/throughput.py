"""Timed training steps on synthetic data: the measurement behind the co-location benchmark and the profiler.

Data lives on the device (one random batch, reused), so the loop times the model's training step alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from common.models import build_model
from protocol.schemas import ModelSpec, OptimizerSpec


@dataclass(frozen=True)
class Timing:
    images: int
    seconds: float
    started_at: float  # wall clock, comparable across processes
    ended_at: float


class SyntheticTrainer:
    """A model, its optimizer and one synthetic batch (see `set_batch`) on `device`, ready to step."""

    def __init__(self, model: ModelSpec, device: str, optimizer: OptimizerSpec, seed: int = 0) -> None:
        import torch

        self._torch = torch
        self.spec = model
        self.device = device
        self.seed = seed
        self.batch = 0
        self.inputs = self.labels = None
        with torch.device(
            device
        ):  # initialise the weights where they live (large models are slow to init on CPU)
            self.model = build_model(model, seed=seed).train()
        params = self.model.parameters()
        if optimizer.name == "adam":
            self.optimizer = torch.optim.Adam(params, lr=optimizer.lr, weight_decay=optimizer.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(
                params, lr=optimizer.lr, momentum=optimizer.momentum, weight_decay=optimizer.weight_decay
            )
        self.loss = torch.nn.CrossEntropyLoss()

    def set_batch(self, batch: int | None) -> None:
        """Make one random batch of `batch` images on the device (None frees it)."""
        if batch is None:
            self.batch, self.inputs, self.labels = 0, None, None
            return
        if batch == self.batch:
            return
        torch = self._torch
        generator = torch.Generator().manual_seed(self.seed + batch)
        size = self.spec.input_size
        self.inputs = torch.randn(batch, 3, size, size, generator=generator).to(self.device)
        self.labels = torch.randint(0, self.spec.num_classes, (batch,), generator=generator).to(self.device)
        self.batch = batch

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(self.model(self.inputs), self.labels).backward()
        self.optimizer.step()

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            self._torch.cuda.synchronize()

    def warm_up(self, steps: int) -> None:
        for _ in range(steps):
            self.step()
        self.synchronize()

    def run(self, *, images: int | None, seconds: float | None, should_stop: Callable[[], bool]) -> Timing:
        """Step until `images` were processed (rounded up to whole batches) or `seconds` passed."""
        if (images is None) == (seconds is None):
            raise ValueError("give exactly one of images or seconds")
        steps_wanted = -(-images // self.batch) if images is not None else None
        started_wall, started = time.time(), time.perf_counter()
        steps = 0
        while not should_stop():
            self.step()
            steps += 1
            if steps_wanted is not None and steps >= steps_wanted:
                break
            if seconds is not None and time.perf_counter() - started >= seconds:
                break
        self.synchronize()
        elapsed = time.perf_counter() - started
        return Timing(steps * self.batch, elapsed, started_wall, started_wall + elapsed)
