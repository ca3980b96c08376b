"""Batches made ahead: a streamed data path runs in a background thread, so that reading, decoding, moving and
augmenting the next batches overlaps the training step instead of taking turns with it.

On a GPU the thread works on a CUDA stream of its own; the training stream waits for each batch's event (never
for the whole device), and the batch's memory is marked as used there, so the caching allocator cannot hand it
back to the thread while a queued training kernel still reads it. Torch releases the GIL inside its operators,
so the thread's decoding and copying run beside the training loop's kernel launches.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import nullcontext

import torch

from agent.data.base import TrainingData

DEFAULT_DEPTH = 3  # batches made ahead: enough to ride out a slow one, little memory


class _End:
    """The producer's last item: the epoch ended, or `error` ended it."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class Prefetched(TrainingData):
    """`data`'s epochs, each made by a thread up to `depth` batches ahead of the consumer."""

    def __init__(self, data: TrainingData, device: str, depth: int = DEFAULT_DEPTH) -> None:
        self.data, self.depth = data, depth
        self.device = torch.device(device)
        self.samples, self.placement = data.samples, data.placement

    def epoch(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None

        def offer(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            end = _End()
            try:
                with torch.cuda.stream(stream) if cuda else nullcontext():
                    for images, labels in self.data.epoch(batch_size, seed):
                        made = None
                        if cuda:
                            made = torch.cuda.Event()
                            made.record(stream)
                        if not offer((images, labels, made)):
                            return
            except BaseException as exc:  # handed to the consumer, raised there
                end = _End(exc)
            offer(end)

        producer = threading.Thread(target=produce, name="prefetch", daemon=True)
        producer.start()
        try:
            while True:
                item = ready.get()
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    return
                images, labels, made = item
                if made is not None:
                    training = torch.cuda.current_stream(self.device)
                    training.wait_event(made)
                    images.record_stream(training)
                    labels.record_stream(training)
                yield images, labels
        finally:
            stop.set()
            producer.join()

    def close(self) -> None:
        self.data.close()
