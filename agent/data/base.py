"""The two sides of a dataset kind: a torch-free spec (what the agent's config names) and the training data it
opens inside a task worker (tensors on the worker's device, or a stream)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar, Literal

import msgspec

from protocol.schemas import ModelSpec

if TYPE_CHECKING:
    import torch


class DataSpecBase(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True, tag_field="kind"):
    """Base of the data specs: decoded from TOML by kind, counted without torch, opened in a worker."""

    #: modules that opening this kind imports and that take long to import: a spare worker imports them while it
    #: waits for a task (agent.worker's preload), so a task's start does not
    imports: ClassVar[tuple[str, ...]] = ()

    def sample_count(self) -> int:
        """How many training samples the spec describes, without loading or decoding any of them."""
        raise NotImplementedError

    def open(self, model: ModelSpec, device: str, budget_bytes: int, loader_workers: int) -> TrainingData:
        """The samples shaped for `model` on `device`: held in memory on the device while they fit in
        `budget_bytes`, else produced per batch (streamed with `loader_workers` processes where files are read)."""
        raise NotImplementedError


def check_classes(classes: int, model: ModelSpec) -> None:
    if classes > model.num_classes:
        raise ValueError(f"data has {classes} classes but model {model.name} has only {model.num_classes}")


class TrainingData(ABC):
    """Training batches on the worker's device, one shuffled epoch at a time."""

    samples: int
    #: "device": every sample held on the device, batches gathered with index tensors; "stream": made per batch
    placement: Literal["device", "stream"]

    def steps_per_epoch(self, batch_size: int) -> int:
        from agent.batching import steps_per_epoch

        return steps_per_epoch(self.samples, batch_size)

    @abstractmethod
    def epoch(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over every sample in a seeded random order: (images float (B, 3, S, S), labels int64 (B,))."""

    def close(self) -> None:  # noqa: B027 (a hook: most kinds hold nothing to let go of)
        """Let go of what the data holds beyond memory (reader processes); idempotent."""
