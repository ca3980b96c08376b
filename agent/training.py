"""Local training of one task from a global model, returning the update as a delta; and test accuracy."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from agent.datasets import train_dataset
from agent.dataspec import DataSpec
from common.models import build_model, load_numpy_state, state_to_numpy
from protocol.schemas import ModelSpec, OptimizerSpec, TaskAssignment


class TrainingStopped(Exception):
    """Training was cancelled through `should_stop`."""


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite."""


@dataclass(frozen=True)
class TrainResult:
    delta: dict[str, np.ndarray]
    samples: int
    steps: int
    metrics: dict[str, float]


class _ShuffledBatches(Sampler[list[int]]):
    """Seeded shuffled batches covering every sample once per epoch (drop_last=False).

    A trailing batch of one sample joins the previous batch: BatchNorm cannot train on a single sample when
    the feature map has shrunk to 1x1.
    """

    def __init__(self, samples: int, batch_size: int, seed: int) -> None:
        self.samples, self.batch_size = samples, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        full, rest = divmod(self.samples, self.batch_size)
        return full + (rest > 1 or full == 0)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.samples, generator=self.generator).tolist()
        batches = [order[i : i + self.batch_size] for i in range(0, self.samples, self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) == 1:
            batches[-2].extend(batches.pop())
        return iter(batches)


def _optimizer(spec: OptimizerSpec, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay, or Adam (which ignores `momentum`)."""
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)


def train_task(
    assignment: TaskAssignment,
    data: DataSpec,
    base_state: Mapping[str, np.ndarray],
    *,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    seed: int = 0,
) -> TrainResult:
    """Train `assignment.local_steps` steps, or else `local_epochs` epochs, from `base_state`; the delta is local
    minus base, per entry.

    Raises TrainingStopped when `should_stop()` turns true (checked before every step) and TrainingDiverged
    when the loss or the trained weights are not finite.
    """
    started = time.perf_counter()
    dataset = train_dataset(data, assignment.model)
    loader = DataLoader(dataset, batch_sampler=_ShuffledBatches(len(dataset), assignment.batch_size, seed))
    total = assignment.local_steps or assignment.local_epochs * len(loader)
    step = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(assignment.model)
        load_numpy_state(model, base_state)
        model.to(device).train()
        optimizer = _optimizer(assignment.optimizer, model.parameters())
        images_seen = 0
        for _ in range(math.ceil(total / len(loader))):
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            epoch_images = 0
            for images, labels in loader:
                if step == total:
                    break
                if should_stop is not None and should_stop():
                    raise TrainingStopped(f"task {assignment.task} stopped at step {step}/{total}")
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                logits = model(images)
                loss = torch.nn.functional.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach() * len(labels)
                correct += (logits.argmax(1) == labels).sum()
                epoch_images += len(labels)
                step += 1
                if progress is not None:
                    progress(step, total)
            if not torch.isfinite(loss_sum):
                raise TrainingDiverged(f"task {assignment.task}: non-finite training loss")
            images_seen += epoch_images
    delta = _delta(state_to_numpy(model), base_state, assignment.task)
    metrics = {  # loss and accuracy over the last (possibly partial) epoch
        "train_loss": loss_sum.item() / epoch_images,
        "train_accuracy": correct.item() / epoch_images,
        "images": float(images_seen),
        "seconds": time.perf_counter() - started,
    }
    return TrainResult(delta=delta, samples=len(dataset), steps=step, metrics=metrics)


def _delta(
    local: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], task: str
) -> dict[str, np.ndarray]:
    delta = {}
    for name, array in local.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise TrainingDiverged(f"task {task}: tensor {name!r} became non-finite")
        delta[name] = np.subtract(array, base[name], dtype=base[name].dtype)
    return delta


@torch.no_grad()
def evaluate(
    model: ModelSpec,
    state: Mapping[str, np.ndarray],
    dataset: Dataset,
    *,
    device: str = "cpu",
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy of the model with `state` over `dataset`, in [0, 1]."""
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    net = build_model(model)
    load_numpy_state(net, state)
    net.to(device).eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for images, labels in DataLoader(dataset, batch_size=batch_size):
        labels = labels.to(device, non_blocking=True)
        correct += (net(images.to(device, non_blocking=True)).argmax(1) == labels).sum()
    return correct.item() / len(dataset)
