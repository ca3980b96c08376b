"""The predictor's training data: measured co-locations as JSON-lines records, and which ones to measure.

A record is one synchronised window on one GPU: what ran (model, B_i, R_i per task), where (GPU, SM count,
driver and torch versions, input size) and each task's throughput. The agent measures them on its own GPU
(`fedmt-agent calibrate`, agent/calibration.py) through its task runtime; this module only defines the format
and the sampling of configurations: every model alone first, then random co-locations of 1..5 tasks.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import msgspec

log = logging.getLogger(__name__)
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
#: after the baselines, co-locations measured for each window alone at a lower share: co-locations teach the
#: predictor most (a 2-s-window budget replayed on the H200 set erred 13-15% on combinations never measured with
#: 41 co-locations and 10 lower-share windows, 15-16% with 25 and 26; bench/results/calibration_mix.json)
CO_LOCATIONS_PER_ALONE = 4
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
    throughput: float = 0.0  # images/s (the median over the window's repetitions)
    sm: int | None = None
    input_size: int | None = None  # None: the record's resolution
    num_classes: int | None = None  # None: 10
    spread: float | None = None  # (max - min) / median throughput over the repetitions
    predicted: float | None = None  # what the planner predicted for a round


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """One measured co-location: what ran, where, and each task's throughput (images/s). Calibration windows
    and a device's rounds (with `round`, the `policy` its plan chose and the predictions) share the format."""

    gpu: str
    sm_total: int
    driver: str | None
    torch: str
    resolution: int
    tasks: list[TaskSample]
    window_s: float
    ts: float
    round: int | None = None
    policy: str | None = None
    # the training steps replayed from CUDA graphs (agent/step_graph.py), else eager
    cuda_graphs: bool = False

    @property
    def combination(self) -> tuple[str, ...]:
        """The models that ran, sorted: the model combination, whatever the batches and shares."""
        return tuple(sorted(t.model for t in self.tasks))


def task_spec(record: Record, task: TaskSample):
    """The ModelSpec a sample was measured with."""
    from protocol.schemas import ModelSpec

    return ModelSpec(
        name=task.model, num_classes=task.num_classes or 10, input_size=task.input_size or record.resolution
    )


@dataclass(frozen=True)
class Config:
    tasks: tuple[tuple[Hashable, int, float], ...]  # (model, batch, R_i); the model may be a Workload


class Workload(NamedTuple):
    """A task's model as calibration profiles it: name, input size and classes."""

    model: str
    input_size: int
    num_classes: int = 10


def sample_configs(
    seed: int,
    windows: int,
    models: Sequence[Hashable] = MODELS,
    focus: Sequence[Sequence[Hashable]] = FOCUS,
    measured: frozenset[Config] = frozenset(),
    batches: Mapping[Hashable, Sequence[int]] | None = None,
) -> list[Config]:
    """Every model alone on all the SMs at all its batch sizes (`batches`, default BATCHES) first (the
    baselines), then alone at the lower ALONE_LEVELS, each followed by CO_LOCATIONS_PER_ALONE random
    co-locations (half of them on `focus`, if any), so that a budget that ends early holds mostly co-locations;
    what is already `measured` is skipped."""
    rng = random.Random(seed)

    def options(model: Hashable) -> Sequence[int]:
        return BATCHES if batches is None else batches[model]

    alone = [Config(((m, b, r),)) for m in models for r in ALONE_LEVELS for b in options(m)]
    alone = [c for c in alone if c not in measured]
    together = []
    while len(alone) + len(together) < windows:
        if focus and rng.random() < 0.5:
            combo = rng.choice(focus)
        else:
            combo = tuple(rng.sample(models, min(len(models), rng.choice((2, 2, 3, 3, 4, 5)))))
        together.append(Config(tuple((m, rng.choice(options(m)), rng.choice(R_LEVELS)) for m in combo)))
    baselines = [c for c in alone if c.tasks[0][2] == ALONE_LEVELS[0]]
    return baselines + _interleave([c for c in alone if c not in baselines], together, CO_LOCATIONS_PER_ALONE)


def _interleave(first: list[Config], second: list[Config], every: int) -> list[Config]:
    """first[0], then `every` of second, first[1], the next `every` of second, ...; then what is left of either."""
    chunks = [second[i : i + every] for i in range(0, len(second), every)]
    paired = min(len(first), len(chunks))
    head = [c for one, chunk in zip(first, chunks) for c in (one, *chunk)]
    return head + first[paired:] + [c for chunk in chunks[paired:] for c in chunk]


#: how a record's, a card's or an agent's `cuda_graphs` reads
STEP_KINDS = {True: "steps replayed from CUDA graphs", False: "eager steps"}


def dataset_path(root: Path, gpu: str, cuda_graphs: bool = False) -> Path:
    """The data file of a GPU model, e.g. predictor/data/nvidia-h100-80gb-hbm3.jsonl, and of its training steps
    replayed from CUDA graphs `<gpu>.graphs.jsonl` (they run up to 3x faster where launches bound a step, so the
    two never share a file or a predictor)."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    return Path(root) / (slug + (".graphs" if cuda_graphs else "") + ".jsonl")


@dataclass(frozen=True)
class DataFile:
    """A data file read once: its bytes and their records, so that what a fit reports (sha256, counts) is what
    it trained on even while a calibration appends to the file."""

    path: Path
    raw: bytes
    records: list[Record]

    @classmethod
    def read(cls, path: Path) -> DataFile:
        """A line that does not decode (one cut short by a crash) is skipped, with a warning, so appending after it
        loses nothing else."""
        raw = Path(path).read_bytes()
        decoder = msgspec.json.Decoder(Record)
        records = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(decoder.decode(line))
            except msgspec.DecodeError as exc:
                log.warning("%s line %d skipped: %s", path, number, exc)
        return cls(Path(path), raw, records)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    @property
    def gpu(self) -> str:
        """The one GPU the records were measured on; ValueError for a file of none or of several."""
        gpus = sorted({record.gpu for record in self.records})
        if not gpus:
            raise ValueError(f"{self.path} holds no profiling records")
        if len(gpus) > 1:
            raise ValueError(f"{self.path} mixes GPUs {gpus}; one GPU a file")
        return gpus[0]

    @property
    def cuda_graphs(self) -> bool:
        """Whether the records' training steps were replayed from CUDA graphs; ValueError for a file of both."""
        modes = {record.cuda_graphs for record in self.records}
        if len(modes) > 1:
            raise ValueError(f"{self.path} mixes eager and CUDA-graph training steps; one kind a file")
        return modes == {True}


def load_records(path: Path) -> list[Record]:
    """The records of a data file (see DataFile.read)."""
    return DataFile.read(path).records


def measured_configs(
    path: Path, key: Callable[[Record, TaskSample], Hashable] | None = None
) -> frozenset[Config]:
    """The configurations a data file already holds (none if it does not exist yet), each task named by
    `key(record, sample)` (default: its model name)."""
    if not Path(path).exists():
        return frozenset()
    key = key or (lambda record, task: task.model)
    return frozenset(
        Config(tuple((key(r, t), t.batch, t.resource) for t in r.tasks)) for r in load_records(path)
    )
