"""Profiling co-located training throughput on this device's GPU, for fitting the predictor (FedMT Sec. IV).

Runs on the device, through the agent's runner: a pool of workers, one per (model, R_i) (MPS fixes R_i at
process start; batch sizes change freely), measures random co-locations of 1..5 tasks with random (B_i, R_i)
in synchronised windows, plus every model alone. Each window appends one record to a JSON-lines file named
after the GPU, with the driver and torch versions, so a dataset always says where it is valid.

    fedmt-predictor profile --out predictor/data --budget-s 480
"""

from __future__ import annotations

import json
import random
import re
import time
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


def profile(out: Path, *, budget_s: float, seed: int, resolution: int, window_s: float = 1.0) -> Path:
    """Measure until the budget is spent; return the data file (records are appended, never rewritten; baselines
    it already holds are not measured again)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from agent import jobs
    from agent.colocation import WorkerPool
    from agent.mps import mps_sharing
    from bench.common import describe_device
    from protocol.schemas import ModelSpec

    started = time.monotonic()
    device = describe_device()
    path = dataset_path(out, str(device["gpu"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    configs = sample_configs(seed, windows=4000, measured=measured_configs(path))
    specs = {m: ModelSpec(name=m, num_classes=10, input_size=resolution) for m in MODELS}
    with (
        mps_sharing() as sharing,
        WorkerPool(sharing.launch_for, jobs.Init(device="cuda")) as pool,
        open(path, "ab") as f,
    ):
        pool.start([(m, float(r)) for m in MODELS for r in R_LEVELS])
        columns = [TextColumn("profiling"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
        with Progress(*columns) as progress:
            bar = progress.add_task("windows", total=None)
            measuring_since = time.monotonic()
            done = 0
            for config in configs:
                elapsed = time.monotonic() - started
                if elapsed > budget_s:
                    break
                if done == 20:  # the pace is known now: estimate how many windows the budget allows
                    pace = (time.monotonic() - measuring_since) / done
                    progress.update(bar, total=done + int((budget_s - elapsed) / pace))
                picks = [
                    ((m, float(r)), jobs.Measure(model=specs[m], batch=b, seconds=window_s, warmup_steps=2))
                    for m, b, r in config.tasks
                ]
                results = pool.measure(picks)
                record = Record(
                    gpu=str(device["gpu"]),
                    sm_total=int(device["sm_count"]),
                    driver=device.get("driver"),
                    torch=str(device["torch"]),
                    resolution=resolution,
                    window_s=window_s,
                    ts=time.time(),
                    tasks=[
                        TaskSample(
                            m, b, float(r), round(res.images_per_s, 2), pool.ready[(m, float(r))].sm_count
                        )
                        for (m, b, r), res in zip(config.tasks, results)
                    ],
                )
                f.write(msgspec.json.encode(record) + b"\n")
                f.flush()
                done += 1
                progress.update(bar, completed=done)
    print(json.dumps({"data": str(path), "windows": done, "seconds": round(time.monotonic() - started)}))
    return path
