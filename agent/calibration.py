"""Calibration: measuring co-located training throughput on this device's GPU, for fitting the predictor
(FedMT Sec. IV), through the same task runtime rounds train with.

A pool of warm workers, one per (model, R_i) (MPS fixes R_i at process start; batch sizes change freely), each
prepared with its model on device-resident synthetic data, measures random co-locations of 1..5 tasks with
random (B_i, R_i) in synchronised windows, plus every model alone. Each window appends one record
(predictor.records) to a JSON-lines file named after the GPU, with the driver and torch versions, so a dataset
always says where it is valid.

    fedmt-agent calibrate --out predictor/data --budget-s 480
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import msgspec

from agent import jobs
from agent.data import SyntheticData
from agent.gpu.probe import probe
from agent.mps import mps_sharing
from agent.windows import Member, measure_window
from agent.workers import WorkerPool
from predictor.records import (
    MODELS,
    R_LEVELS,
    Record,
    TaskSample,
    dataset_path,
    measured_configs,
    sample_configs,
)
from protocol.schemas import ModelSpec

SYNTHETIC_SAMPLES = 512  # per worker, held on the device: enough distinct batches, little memory


def calibrate(out: Path, *, budget_s: float, seed: int, resolution: int, window_s: float = 1.0) -> Path:
    """Measure until the budget is spent; return the data file (records are appended, never rewritten; baselines
    it already holds are not measured again)."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    started = time.monotonic()
    gpu = probe(allow_torch=True)
    if not gpu.gpus or not torch.cuda.is_available():
        raise RuntimeError(f"calibration needs a CUDA GPU: {gpu.note}")
    name, sm_total = gpu.gpus[0].name, gpu.gpus[0].sm_count
    path = dataset_path(out, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    configs = sample_configs(seed, windows=4000, measured=measured_configs(path))
    prepares = {
        m: jobs.Prepare(
            model=ModelSpec(name=m, num_classes=10, input_size=resolution),
            data=SyntheticData(samples=SYNTHETIC_SAMPLES, seed=seed),
        )
        for m in MODELS
    }
    with mps_sharing() as sharing, WorkerPool(jobs.Init(device="cuda")) as pool, open(path, "ab") as f:

        def member(model: str, batch: int, percent: float) -> Member:
            measure = jobs.Measure(batch=batch, seconds=window_s, warmup_steps=2)
            key = (model, float(percent))
            return Member(key, sharing.launch_for(model, float(percent)), prepares[model], measure)

        for model in MODELS:  # start every (model, R_i) worker once, up front
            for percent in R_LEVELS:
                pool.prestart(
                    (model, float(percent)), sharing.launch_for(model, float(percent)), prepares[model]
                )
        columns = [TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
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
                window = measure_window(pool, [member(m, b, r) for m, b, r in config.tasks])
                record = Record(
                    gpu=name,
                    sm_total=int(sm_total),
                    driver=gpu.driver_version,
                    torch=torch.__version__,
                    resolution=resolution,
                    window_s=window_s,
                    ts=time.time(),
                    tasks=[
                        TaskSample(m, b, float(r), round(result.images_per_s, 2), sms)
                        for (m, b, r), result, sms in zip(config.tasks, window.results, window.sm_counts)
                    ],
                )
                f.write(msgspec.json.encode(record) + b"\n")
                f.flush()
                done += 1
                progress.update(bar, completed=done)
    print(json.dumps({"data": str(path), "windows": done, "seconds": round(time.monotonic() - started)}))
    return path
