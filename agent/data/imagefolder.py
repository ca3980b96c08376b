"""A torchvision-style image folder: one sub-folder per class (sorted names are the labels), images below it.

While the decoded images fit the data budget they are decoded once (JPEGs on the GPU where nvJPEG is there),
squared to a stored size and kept on the device as uint8. Larger folders stream: DataLoader workers read the
files (and decode them, unless the GPU does) into pinned memory. Either way, random resized crops and flips
(`augment`) and normalisation run batched on the device.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from agent.data.base import DataSpecBase, TrainingData, check_classes
from protocol.schemas import ModelSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: the extensions torchvision's ImageFolder loads
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
JPEG_EXTENSIONS = (".jpg", ".jpeg")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DECODE_CHUNK = 64
STREAM_TIMEOUT_S = 120.0


class ImageFolderData(DataSpecBase, tag="imagefolder"):
    path: str
    augment: bool = True  # random resized crops and horizontal flips; else the centre square
    gpu_decode: bool = True  # JPEGs decoded by nvJPEG on a GPU (where it works); else by the CPU

    def sample_count(self) -> int:
        return len(scan(self)[0])

    def open(self, model: ModelSpec, device: str, budget_bytes: int, loader_workers: int = 2) -> TrainingData:
        import torch

        paths, labels, classes = scan(self)
        check_classes(len(classes), model)
        if not paths:
            raise ValueError(f"image folder {self.path!r} holds no images")
        size = stored_size(model.input_size, self.augment)
        jpegs_only = all(p.lower().endswith(JPEG_EXTENSIONS) for p in paths)
        decoder = Decoder(device, self.gpu_decode and jpegs_only, size)
        transform = Augment(model.input_size, self.augment)
        labels_t = torch.from_numpy(labels)
        if len(paths) * 3 * size * size <= budget_bytes:
            from agent.data.tensors import DeviceTensors

            stored = torch.cat(
                [
                    decoder.decode([read(p) for p in paths[i : i + DECODE_CHUNK]])
                    for i in range(0, len(paths), DECODE_CHUNK)
                ]
            )
            return DeviceTensors(stored, labels_t.to(device), transform)
        return StreamedImages(paths, labels_t, decoder, transform, loader_workers)


def scan(spec: ImageFolderData) -> tuple[list[str], np.ndarray, list[str]]:
    """Image files (sorted by class, then path), their labels and the class names, as ImageFolder orders them."""
    root = Path(spec.path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = [
            os.path.join(folder, file)
            for folder, _, files in os.walk(root / name, followlinks=True)
            for file in files
            if file.lower().endswith(IMAGE_EXTENSIONS)
        ]
        paths += sorted(found)
        labels += [label] * len(found)
    return paths, np.array(labels, dtype=np.int64), classes


def stored_size(input_size: int, augment: bool) -> int:
    """Side of the stored squares: crops need a margin (the usual 8/7, e.g. 256 for 224)."""
    return round(input_size * 8 / 7) if augment else input_size


def read(path: str) -> torch.Tensor:
    import torchvision

    return torchvision.io.read_file(path)


class Decoder:
    """Encoded files to uint8 (B, 3, size, size) squares on the device (shorter side resized, centre cut)."""

    def __init__(self, device: str, gpu_jpeg: bool, size: int) -> None:
        self.device, self.size = device, size
        self.on_device = device.startswith("cuda") and gpu_jpeg and _gpu_jpeg_works(device)

    def decode(self, encoded: list[torch.Tensor]) -> torch.Tensor:
        """Decode a batch where this decoder decodes (the GPU, else here on the CPU) and square it."""
        import torch
        import torchvision

        if self.on_device:
            # nvJPEG writes on a stream of its own into memory allocated on this one: memory that this stream
            # freed may still be read by its queued kernels, so let them finish first
            if self.device.startswith("cuda"):
                torch.cuda.current_stream(self.device).synchronize()
            images = torchvision.io.decode_jpeg(
                encoded, mode=torchvision.io.ImageReadMode.RGB, device=self.device
            )
        else:
            images = [torchvision.io.decode_image(e, mode=torchvision.io.ImageReadMode.RGB) for e in encoded]
        return self.square(images).to(self.device, non_blocking=True)

    def square(self, images: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Images (a list, or a batch of one size) as a batch of squares: one batched resize where sizes agree."""
        import torch
        from torchvision.transforms.v2 import functional as F

        if isinstance(images, torch.Tensor) or all(image.shape == images[0].shape for image in images):
            batch = images if isinstance(images, torch.Tensor) else torch.stack(images)
            return F.center_crop(F.resize(batch, self.size, antialias=True), self.size)
        return torch.stack([F.center_crop(F.resize(i, self.size, antialias=True), self.size) for i in images])


def _gpu_jpeg_works(device: str) -> bool:
    import torch
    import torchvision

    probe = torchvision.io.encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8))
    try:
        torchvision.io.decode_jpeg([probe], device=device)
        return True
    except RuntimeError as exc:
        log.info("JPEG decoding on the CPU: the GPU decoder is unavailable (%s)", exc)
        return False


class Augment:
    """uint8 squares -> normalised float model inputs: random resized crops (scale 0.5..1 of the area, aspect
    3/4..4/3) and horizontal flips in one roi_align call, or the plain squares; batched, on their device."""

    def __init__(self, size: int, augment: bool, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) -> None:
        self.size, self.augment, self.scale, self.ratio = size, augment, scale, ratio

    def __call__(self, images: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        import torch

        x = images.float().div_(255)
        if self.augment:
            x = self._crop_and_flip(x, rng)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def _crop_and_flip(self, x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        import math

        import torch
        from torchvision.ops import roi_align

        n, _, h, w = x.shape
        uniform = torch.rand(n, 5, generator=rng, device=rng.device).to(x.device)
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * uniform[:, 0]
        log_ratio = (
            math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * uniform[:, 1]
        )
        aspect = log_ratio.exp()
        bw = (w * (area * aspect).sqrt()).clamp(max=w)
        bh = (h * (area / aspect).sqrt()).clamp(max=h)
        x0, y0 = (w - bw) * uniform[:, 2], (h - bh) * uniform[:, 3]
        index = torch.arange(n, device=x.device, dtype=x.dtype)
        boxes = torch.stack([index, x0, y0, x0 + bw, y0 + bh], dim=1)
        crops = roi_align(x, boxes, (self.size, self.size), spatial_scale=1.0, sampling_ratio=2, aligned=True)
        flip = (uniform[:, 4] < 0.5).view(n, 1, 1, 1)
        return torch.where(flip, crops.flip(-1), crops)


class _Files:
    """Map-style dataset for the loader workers: a file's bytes (GPU decoding) or its decoded image."""

    def __init__(self, paths: list[str], decoder: Decoder) -> None:
        self.paths, self.decoder = paths, decoder

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        encoded = read(self.paths[index])
        if self.decoder.on_device:
            return encoded
        import torchvision

        return torchvision.io.decode_image(encoded, mode=torchvision.io.ImageReadMode.RGB)


class _Order:
    """Batch sampler of the stream: the epoch's seeded shuffled batches, set before each epoch."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Collate:
    """A reader's batch: encoded files joined into one buffer with their lengths (a reader hands each tensor over
    as a shared-memory file descriptor: two per batch, not one per image); decoded images of one size stacked as
    they are (squared on the device, batched: resizing costs a CPU reader more than decoding); images of mixed
    sizes squared here."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder

    def __call__(self, items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        import torch

        if items[0].dim() == 1:
            return torch.cat(items), torch.tensor([len(item) for item in items])
        if all(item.shape == items[0].shape for item in items):
            return torch.stack(items)
        return self.decoder.square(items)


class StreamedImages(TrainingData):
    """Files read by persistent DataLoader workers into pinned memory; decoded on the GPU or in the workers."""

    placement = "stream"

    def __init__(
        self, paths, labels: torch.Tensor, decoder: Decoder, transform: Augment, workers: int
    ) -> None:
        import torch

        self.samples, self.labels, self.decoder, self.transform = len(paths), labels, decoder, transform
        self.order = _Order()
        cuda = decoder.device.startswith("cuda")
        self.loader = torch.utils.data.DataLoader(
            _Files(paths, decoder),
            batch_sampler=self.order,
            num_workers=workers,
            collate_fn=_Collate(decoder),
            pin_memory=cuda,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            # readers never touch CUDA, so forking them is safe, and it starts them at once (a spawned reader
            # imports torch first, one after another: many seconds)
            multiprocessing_context="fork" if workers > 0 else None,
            timeout=STREAM_TIMEOUT_S if workers > 0 else 0,  # a stuck reader is an error, not a silent stall
        )

    def close(self) -> None:
        """End the reader processes now (dropping the loader shuts them down), not at interpreter exit, where the
        pinning thread and the readers' queues are torn down in no particular order and exit can hang."""
        self.loader = None

    def epoch(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from agent.data.tensors import generator, shuffled_batches

        if self.loader is None:
            raise RuntimeError("the image stream was closed")

        order = shuffled_batches(self.samples, batch_size, generator("cpu", seed))
        self.order.batches = [index.tolist() for index in order]
        rng = generator(self.decoder.device, seed)
        device = self.decoder.device
        for index, batch in zip(order, self.loader):
            if isinstance(batch, (tuple, list)):  # encoded files, decoded here
                buffer, lengths = batch
                images = self.decoder.decode(list(buffer.split(lengths.tolist())))
            else:
                images = batch.to(device, non_blocking=True)
                if images.shape[-2:] != (self.decoder.size, self.decoder.size):
                    images = self.decoder.square(images)
            yield self.transform(images, rng), self.labels[index].to(device, non_blocking=True)
