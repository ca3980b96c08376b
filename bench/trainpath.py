"""The round's training path against the synthetic loop, through the production worker.

    python -m bench.trainpath --out bench/results            # on a GPU (no MPS needed)

For each model and input size, warm workers (agent.workers.WorkerPool) train exactly as a round does
(`agent.runner.run_round`: Prepare, then Train from a global model, the delta written) on
- `memory`: the digits, upscaled once and held on the device, batches gathered with index tensors;
- `jpeg`: an image folder of generated 256 px JPEGs, streamed (data budget 0): DataLoader workers read the
  files into pinned memory, nvJPEG decodes on the GPU (or the readers decode), random resized crops and flips
  run on the device;
- `jpeg-decoded-once`: the same folder within the data budget: decoded once, held on the device as uint8;
- `synthetic-round`: the synthetic loop's random images, but trained through a round (it separates what a
  round adds from what the data adds; not run by default);
and the same worker type measures the synthetic loop: the same training step on random images held on the
device (`Measure`). real_ips is images over the training loop's time as the worker reports it for a round
(the second and later rounds of a warm worker); each figure is the median of `--repeats` runs, with the spread,
and the runs interleave: a synthetic window, then a round of each path, repeated.
data_ips is what the data path alone delivers (epochs of the same opened data, here, with no training): where
real_ips falls short of synthetic_ips and data_ips is close to real_ips, the data path is the bound.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from agent import jobs
from agent.calibration import SYNTHETIC_SAMPLES
from agent.data import DigitsData, ImageFolderData, SyntheticData
from agent.runner import TaskWork, run_round
from agent.training import open_data
from agent.windows import Member, measure_window
from agent.workers import Launch, WorkerPool
from bench.common import describe_device, write_json
from common.models import build_model, state_to_numpy
from protocol.chunking import sha256_hex
from protocol.schemas import ModelSpec, OptimizerSpec, TaskAssignment
from protocol.tensors import encode_state

MODELS = ("resnet18", "resnet50", "mobilenet_v3_small")
TARGETS = {"memory": 0.9, "synthetic": 0.9, "jpeg": 0.7}  # real / synthetic, by data kind
SGD = OptimizerSpec(name="sgd", lr=0.01, momentum=0.9)


def write_jpegs(root: Path, count: int, size: int = 256, classes: int = 10, seed: int = 0) -> Path:
    """`count` smooth random colour images (upsampled noise, as photographs compress) as JPEGs in class folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.BILINEAR)
        image.save(folder / f"{i:05d}.jpg", quality=90)
    return root


def round_ips(pool: WorkerPool, prepare: jobs.Prepare, train: jobs.Train, stall_s: float) -> float:
    """Images/s of the training loop of one round on the warm worker of `train`'s task."""
    key = train.assignment.task
    outcomes: list = []
    run_round([Launch(key)], {key: TaskWork(prepare, train)}, pool, outcomes.append, stall_timeout_s=stall_s)
    outcome = outcomes[0]
    if outcome.failure is not None:
        raise RuntimeError(f"{key}: {outcome.failure.error}")
    return outcome.trained.metrics["images"] / outcome.trained.metrics["train_s"]


def window_ips(pool: WorkerPool, model: ModelSpec, images: int, batch: int) -> float:
    """Images/s of one synthetic-loop window (`Measure` on random images held on the device)."""
    prepare = jobs.Prepare(model=model, data=SyntheticData(samples=SYNTHETIC_SAMPLES))
    measure = jobs.Measure(batch=batch, images=images, warmup_steps=10, optimizer=SGD)
    member = Member("synthetic", Launch("synthetic"), prepare, measure)
    return measure_window(pool, [member]).results[0].images_per_s


def data_ips(prepare: jobs.Prepare, device: str, batch: int, epochs: int = 2) -> float:
    """Images/s of the data path alone, opened as the runtime opens it (the last of `epochs`): batches made,
    moved and augmented on the device, no training."""
    import torch

    data = open_data(prepare.data, prepare.model, device, prepare.budget_bytes, prepare.loader_workers)
    try:
        for epoch in range(epochs):
            started, images = time.perf_counter(), 0
            for _, labels in data.epoch(batch, seed=epoch):
                images += len(labels)
            if device == "cuda":
                torch.cuda.synchronize()
        return images / (time.perf_counter() - started)
    finally:
        data.close()


def measure_model(model: ModelSpec, paths: dict, args: argparse.Namespace, work: Path) -> list[dict]:
    """One row per data path for `model`: `args.repeats` rounds after a first, each round a synthetic window
    followed by one training round per path, so that drift over the run touches every path alike."""
    payload = encode_state(state_to_numpy(build_model(model, seed=0)))
    (work / "base").write_bytes(payload)
    prepares = {
        key: jobs.Prepare(model=model, data=spec, budget_bytes=budget, loader_workers=args.loader_workers)
        for key, (_, spec, budget) in paths.items()
    }
    speeds: dict[str, list[float]] = {key: [] for key in ["synthetic", *prepares]}
    errors: dict[str, str] = {}
    with WorkerPool(jobs.Init(device=args.device), log_dir=work) as pool:
        for key, prepare in prepares.items():  # they start while the first synthetic window runs
            pool.prestart(key, Launch(key), prepare)
        for repeat in range(args.repeats + 1):  # the first of each is a warm-up
            speed = window_ips(pool, model, args.steps * args.batch, args.batch)
            speeds["synthetic"] += [speed] if repeat else []
            for key, prepare in prepares.items():
                if key in errors:
                    continue
                assignment = TaskAssignment(
                    task=key,
                    model=model,
                    optimizer=SGD,
                    base_version=0,
                    base_sha256=sha256_hex(payload),
                    local_steps=args.steps,
                    batch_size=args.batch,
                )
                train = jobs.Train(
                    assignment=assignment,
                    base_path=str(work / "base"),
                    output_path=str(work / f"{key}.update"),
                    seed=repeat,
                )
                try:
                    speed = round_ips(pool, prepare, train, args.stall_s)
                except RuntimeError as exc:  # a failed or stalled path is a result too
                    errors[key] = str(exc)[:500]
                    continue
                speeds[key] += [speed] if repeat else []
    synthetic = summary(speeds["synthetic"])
    rows = []
    for key, prepare in prepares.items():
        row = {
            "model": model.name,
            "resolution": model.input_size,
            "batch": args.batch,
            "data": paths[key][0],
            "path": key,
            "placement": "device" if prepare.budget_bytes else "stream",
            "synthetic_ips": synthetic["median"],
            "synthetic_ips_range": [synthetic["min"], synthetic["max"]],
            "synthetic_ips_runs": [round(v, 1) for v in speeds["synthetic"]],
        }
        if key in errors:
            rows.append(row | {"real_ips": None, "ratio": None, "error": errors[key]})
            continue
        real = summary(speeds[key])
        rows.append(
            row
            | {
                "data_ips": round(data_ips(prepare, args.device, args.batch), 1),
                "real_ips": real["median"],
                "real_ips_range": [real["min"], real["max"]],
                "real_ips_runs": [round(v, 1) for v in speeds[key]],
                "ratio": round(real["median"] / synthetic["median"], 3),
            }
        )
    return rows


def summary(speeds: list[float]) -> dict:
    return {
        "median": round(statistics.median(speeds), 1),
        "min": round(min(speeds), 1),
        "max": round(max(speeds), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--resolutions", nargs="+", type=int, default=[128, 224])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200, help="training steps per round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jpegs", type=int, default=3000, help="generated 256 px JPEGs in the image folder")
    parser.add_argument("--loader-workers", type=int, default=6)
    parser.add_argument(
        "--paths",
        nargs="+",
        default=["memory", "jpeg-gpu-decode", "jpeg-cpu-decode", "jpeg-decoded-once"],
        choices=["memory", "jpeg-gpu-decode", "jpeg-cpu-decode", "jpeg-decoded-once", "synthetic-round"],
    )
    parser.add_argument("--stall-s", type=float, default=90.0, help="a round silent this long has failed")
    parser.add_argument("--append", action="store_true", help="add rows to the existing trainpath.json")
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    console = Console()
    with tempfile.TemporaryDirectory(prefix="fedmt-trainpath-") as tmp:  # the JPEGs and every round's files
        work = Path(tmp)
        with console.status(f"writing {args.jpegs} JPEGs"):
            folder = write_jpegs(work / "jpegs", args.jpegs)
        paths = {  # (data kind, spec, budget: 0 streams); each a worker of its own
            "memory": ("memory", DigitsData(), 1 << 30),
            "jpeg-gpu-decode": ("jpeg", ImageFolderData(path=str(folder)), 0),
            "jpeg-cpu-decode": ("jpeg", ImageFolderData(path=str(folder), gpu_decode=False), 0),
            "jpeg-decoded-once": ("jpeg", ImageFolderData(path=str(folder)), 1 << 30),
            "synthetic-round": ("synthetic", SyntheticData(samples=SYNTHETIC_SAMPLES), 1 << 30),
        }
        paths = {key: paths[key] for key in args.paths}
        rows = json.loads((args.out / "trainpath.json").read_text())["rows"] if args.append else []
        device = describe_device()

        def save() -> None:  # after every row: a run cut short keeps what it measured
            results = {"device": device["gpu"], "setup": device, "steps": args.steps, "repeats": args.repeats}
            write_json(args.out / "trainpath.json", results | {"jpegs": args.jpegs, "rows": rows})

        for resolution in args.resolutions:
            for name in args.models:
                model = ModelSpec(name=name, num_classes=10, input_size=resolution)
                console.print(
                    f"{name} {resolution}px: {args.repeats + 1} rounds, synthetic window first in each"
                )
                rows += measure_model(model, paths, args, work)
                save()
    table = Table(
        title=f"round training path vs synthetic loop ({device['gpu']}, batch {args.batch}, median of {args.repeats})"
    )
    for column in ("model", "px", "data", "real img/s", "synthetic img/s", "real / synthetic", "target"):
        table.add_column(column, justify="right")
    for row in rows:
        target = TARGETS[row["data"]]
        if row["ratio"] is None:
            real, ratio, verdict = "failed", "-", "FAILED"
        else:
            low, high = row["real_ips_range"]
            real, ratio = f"{row['real_ips']:.0f} ({low:.0f}-{high:.0f})", f"{row['ratio']:.2f}"
            verdict = "ok" if row["ratio"] >= target else "MISSED"
        low, high = row["synthetic_ips_range"]
        synthetic = f"{row['synthetic_ips']:.0f} ({low:.0f}-{high:.0f})"
        table.add_row(
            row["model"],
            str(row["resolution"]),
            row["path"],
            real,
            synthetic,
            ratio,
            f">= {target} {verdict}",
        )
    console.print(table)
    plot(rows, args.out / "trainpath.png", str(device["gpu"]))
    return 0


def plot(rows: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["ratio"] is not None]
    labels = [f"{r['model']}\n{r['resolution']}px {r['path']}" for r in rows]
    figure, axis = plt.subplots(figsize=(max(6, len(rows) * 0.9), 4))
    axis.bar(
        range(len(rows)),
        [r["ratio"] for r in rows],
        color=["C1" if r["data"] == "jpeg" else "C0" for r in rows],
    )
    axis.axhline(0.9, color="C0", linestyle="--", linewidth=1, label="target, in memory (0.9)")
    axis.axhline(0.7, color="C1", linestyle="--", linewidth=1, label="target, JPEG folder (0.7)")
    axis.set_xticks(range(len(rows)), labels, fontsize=7)
    axis.set(
        ylabel="round path / synthetic loop", title=f"Training path throughput ({device})", ylim=(0, 1.2)
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
