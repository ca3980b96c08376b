"""The predictor's training data: measured co-locations as JSON-lines records, and which ones to measure.

A record is one synchronised window on one GPU: what ran (model, B_i, R_i per task), where (GPU, SM count,
driver and torch versions, input size) and each task's throughput. The agent measures them on its own GPU
(`fedmt-agent calibrate`, agent/calibration.py) through its task runtime; this module only defines the format
and the sampling of configurations: every model alone first, then random co-locations of 1..5 tasks.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import msgspec

MODELS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "vgg16",
    "densenet121",
    "mobilenet_v3_small",
    "shufflenet_v2_x1_0",
)
R_LEVELS = (20, 40, 60, 80, 100)
BATCHES = (16, 32, 64, 128)
ALONE_LEVELS = (100, 60, 20)
#: combinations the benchmarks use (the paper's scenarios and Table III), profiled more densely
FOCUS = (
    ("densenet121", "vgg16", "resnet101"),
    ("resnet18", "mobilenet_v3_small", "shufflenet_v2_x1_0"),
    ("resnet50", "vgg16", "mobilenet_v3_small"),
    ("vgg16", "resnet34"),
    ("resnet50", "resnet101"),
    ("vgg16", "resnet18", "mobilenet_v3_small", "densenet121"),
    ("resnet50", "vgg16"),
    ("resnet50", "mobilenet_v3_small"),
    ("resnet50", "vgg16", "mobilenet_v3_small", "densenet121"),
)


class TaskSample(msgspec.Struct, frozen=True):
    model: str
    batch: int
    resource: float
    throughput: float = 0.0
    sm: int | None = None


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """One measured co-location: what ran, where, and each task's throughput (images/s)."""

    gpu: str
    sm_total: int
    driver: str | None
    torch: str
    resolution: int
    tasks: list[TaskSample]
    window_s: float
    ts: float


@dataclass(frozen=True)
class Config:
    tasks: tuple[tuple[str, int, float], ...]  # (model, batch, R_i)


def sample_configs(
    seed: int, windows: int, models=MODELS, focus=FOCUS, measured: frozenset[Config] = frozenset()
) -> list[Config]:
    """Every model alone at a few R levels and all batches first (the baselines, unless already `measured`), then
    random co-locations (half of them on `focus`) in random order."""
    rng = random.Random(seed)
    alone = [Config(((m, b, r),)) for m in models for r in ALONE_LEVELS for b in BATCHES]
    alone = [c for c in alone if c not in measured]
    together = []
    while len(alone) + len(together) < windows:
        if rng.random() < 0.5:
            combo = rng.choice(focus)
        else:
            combo = tuple(rng.sample(models, min(len(models), rng.choice((2, 2, 3, 3, 4, 5)))))
        together.append(Config(tuple((m, rng.choice(BATCHES), rng.choice(R_LEVELS)) for m in combo)))
    return alone + together


def dataset_path(root: Path, gpu: str) -> Path:
    """The data file of a GPU model, e.g. predictor/data/nvidia-h100-80gb-hbm3.jsonl."""
    return Path(root) / (re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") + ".jsonl")


def load_records(path: Path) -> list[Record]:
    decoder = msgspec.json.Decoder(Record)
    return [decoder.decode(line) for line in Path(path).read_bytes().splitlines() if line.strip()]


def measured_configs(path: Path) -> frozenset[Config]:
    """The configurations a data file already holds (none if it does not exist yet)."""
    if not Path(path).exists():
        return frozenset()
    return frozenset(
        Config(tuple((t.model, t.batch, t.resource) for t in r.tasks)) for r in load_records(path)
    )
