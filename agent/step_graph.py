"""A training step captured once as a CUDA graph and replayed for every later batch of the same shape.

Small models at small batches are launch-bound: DenseNet121 at batch 16 and 128 px takes ~65 ms a step on an
H100 (`bench/results/README.md`), nearly all of it Python and the CUDA driver issuing some two thousand kernels,
against a few milliseconds of arithmetic. A graph issues the whole step (forward, loss, backward, optimiser) in one
call. As torch's CUDA-graph notes ask, the first steps of each batch shape run eagerly on a side stream (cuDNN and
cuBLAS choose their kernels, the optimiser makes its state), then the next batch's step is captured and replayed;
an epoch's last, partial batch is a shape of its own. The eager steps and the replays work on the same weights and
optimiser state, so the steps a round takes and what each computes are the same with or without graphs.

Python's cyclic garbage collector is kept out of a capture: a finished round's steps and their graphs are freed
by it (a step and its GraphedStep refer to each other), and a graph freed while another is being captured
invalidates that capture (on an H100 a capture failed so after twenty runtimes in one process, and the process's
CUDA random state stayed broken). So a capture collects first and runs with the collector paused. A full
collection with torch and DenseNet121 loaded takes 75-90 ms on a 2-core machine; a round captures one graph per
batch shape, two at most (full batches and the epoch's last one).

The step must be capturable: no host synchronisation, no loss scaling (fp16's scaler checks for infinities on the
host), an optimiser whose step count and learning rate live on the device (`agent.training.make_optimizer` with
`capturable`: a float rate would be fixed in the graph, so a warm-up's steps would have to run eagerly).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)

#: eager steps of a batch shape, on a side stream, before its capture (torch's notes use three)
WARMUP_STEPS = 3
Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Shapes = tuple[torch.Size, torch.Size]


class GraphedStep:
    """`step(images, labels) -> (loss, logits)`, captured per batch shape after WARMUP_STEPS eager steps of that
    shape and replayed from then on. The graphs share one memory pool: they run one after another on one stream,
    and what outlives a replay (weights, optimiser state, BatchNorm statistics) is made by the eager steps."""

    def __init__(self, step: Step) -> None:
        self.step = step
        self.graphs: dict[Shapes, _Captured] = {}
        self.eager_steps: dict[Shapes, int] = {}
        self.failed = False  # a capture failed: every step runs eagerly
        self._side = torch.cuda.Stream()
        self._pool = torch.cuda.graph_pool_handle()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's detached loss and logits, as the eager step gives them."""
        shapes = (images.shape, labels.shape)
        if (captured := self.graphs.get(shapes)) is not None:
            return captured.replay(images, labels)
        if self.failed:
            return self.step(images, labels)
        done = self.eager_steps.get(shapes, 0)
        if done < WARMUP_STEPS:
            self.eager_steps[shapes] = done + 1
            return self._on_side_stream(images, labels)
        try:
            captured = _Captured(self.step, images, labels, self._pool)
        except RuntimeError as exc:  # what the step does cannot be captured: it runs eagerly from now on
            log.warning("training step not captured as a CUDA graph (%s); running it eagerly", exc)
            self.failed = True
            return self.step(images, labels)
        self.graphs[shapes] = captured
        return captured.replay(images, labels)

    def _on_side_stream(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        current = torch.cuda.current_stream()
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            outputs = self.step(images, labels)
        current.wait_stream(self._side)
        return outputs


class _Captured:
    """One step captured on static inputs shaped like `images` and `labels` (capturing runs nothing)."""

    def __init__(self, step: Step, images: torch.Tensor, labels: torch.Tensor, pool) -> None:
        self.images, self.labels = images.clone(), labels.clone()
        self.graph = torch.cuda.CUDAGraph()
        with _collector_paused(), torch.cuda.graph(self.graph, pool=pool):
            self.loss, self.logits = step(self.images, self.labels)

    def replay(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.images.copy_(images)
        self.labels.copy_(labels)
        self.graph.replay()
        return self.loss.clone(), self.logits.clone()  # the next replay overwrites the graph's own


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Collect garbage now (older graphs among it) and keep the cyclic collector off until the block ends."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
