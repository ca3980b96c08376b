"""Calibration: profiling this device's GPU for the throughput predictor (FedMT Sec. IV) through the task runtime
rounds train with, then fitting and exporting the predictor next to its data (predictor/training.py).

What is profiled (`Target`): the configured tasks' workloads (model, input size, classes) at batch sizes around
each task's configured one, or, for a generic predictor, predictor.records.MODELS at one input size. A pool of
warm workers, one per (workload, R_i) (MPS fixes R_i at process start; batch sizes change freely), each prepared
with its model on device-resident synthetic data, measures every workload alone on all the SMs at all its batch
sizes, then random co-locations of 2..5 tasks (half of them the configured combination, when it has at most 5)
with a window alone at a lower R_i after every few (predictor.records.sample_configs). Each configuration is
measured in `repeats` synchronised windows of `window_s`; its record keeps each task's median and spread.

Records are appended to `<dir>/<gpu>.jsonl` (`<gpu>.graphs.jsonl` for steps replayed from CUDA graphs) as they are
measured, so a run that is stopped (the agent stops it when a round starts) keeps them and a later run skips the
baselines the file holds. When the measuring share of the budget is spent, the predictor is fitted and exported
next to the data (`<dir>/<gpu>.onnx`, or `.graphs.onnx`) with its model card.

    fedmt-agent calibrate --config /etc/fedmt/agent.toml --budget-s 900
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from agent import jobs
from agent.data import SyntheticData
from agent.workers import TaskFailed, WorkerGone
from predictor.encoding import MAX_TASKS
from predictor.records import (
    FOCUS,
    MODELS,
    R_LEVELS,
    Config,
    Record,
    TaskSample,
    Workload,
    dataset_path,
    measured_configs,
    sample_configs,
    task_spec,
)
from protocol.schemas import ModelSpec, TaskAssignment

log = logging.getLogger(__name__)
SYNTHETIC_SAMPLES = 512  # per worker, held on the device: enough distinct batches, little memory
#: of a calibration's time budget kept for fitting and exporting: the fit of a 15-minute H100 calibration (146
#: records, 5 factored members) took 220 s there before its members trained batched, which halved it on the
#: 2-core CPU (43 s against 91-97 s; bench/results/README.md)
FIT_SHARE = 0.2
MAX_FAILED_IN_A_ROW = 10  # then the GPU or MPS is in trouble: stop
MIN_FIT_RECORDS = 20
#: seconds of one measurement window: on an H100 1-s windows measured 146 configurations in 11 minutes against 83 at
#: 2 s, with the same median spread over 3 repeats (3.3% against 3.5%; bench/results/README.md)
WINDOW_S = 1.0
#: co-located windows from which a calibration's predictor is the DeepSets network, below them the factored one:
#: on held-out combinations factored erred 14% against 23% with 25 co-locations (an H100 calibration) and 14%
#: against 16% with 114, DeepSets 12% against 14% with 323 (the H200 set; bench/results/README.md)
DEEPSETS_FROM_COLOCATIONS = 200


@dataclass(frozen=True)
class Target:
    """What to profile: workloads, the batch sizes of each, the combinations profiled densely, and whether the
    training steps replay from CUDA graphs (as the agent's do with [execution] cuda_graphs)."""

    workloads: tuple[Workload, ...]
    batches: dict[Workload, tuple[int, ...]]
    focus: tuple[tuple[Workload, ...], ...]
    cuda_graphs: bool = False

    @property
    def protected(self) -> tuple[tuple[str, ...], ...]:
        """The focus combinations by model, as the predictor's fit keeps them out of its unseen split."""
        return tuple(tuple(sorted(w.model for w in combo)) for combo in self.focus)


def calibration_batches(assignment: TaskAssignment) -> tuple[int, ...]:
    """Powers of two from a quarter to four times the configured batch size, within the task's bounds, and the
    configured size itself: the range a plan moves in."""
    low = max(assignment.min_batch_size, assignment.batch_size // 4, 1)
    high = min(assignment.max_batch_size, assignment.batch_size * 4)
    return tuple(sorted({*(2**k for k in range(11) if low <= 2**k <= high), assignment.batch_size}))


def target_for(assignments: Sequence[TaskAssignment], cuda_graphs: bool = False) -> Target:
    """The configured tasks (a schedule's assignments) as a calibration target; one workload per distinct model
    spec, with the union of its tasks' batch sizes. Their combination is the focus while the predictor can take
    it (MAX_TASKS); more workloads are profiled in random co-locations of up to MAX_TASKS only."""
    batches: dict[Workload, set[int]] = {}
    for a in assignments:
        workload = Workload(a.model.name, a.model.input_size, a.model.num_classes)
        batches.setdefault(workload, set()).update(calibration_batches(a))
    workloads = tuple(batches)
    focus = (workloads,) if len(workloads) <= MAX_TASKS else ()
    return Target(workloads, {w: tuple(sorted(b)) for w, b in batches.items()}, focus, cuda_graphs)


def generic_target(
    resolution: int, batches: Sequence[int] = (16, 32, 64, 128), cuda_graphs: bool = False
) -> Target:
    """predictor.records.MODELS at one input size: a predictor for any task mix at that size."""
    workloads = tuple(Workload(m, resolution) for m in MODELS)
    focus = tuple(tuple(Workload(m, resolution) for m in combo) for combo in FOCUS)
    return Target(workloads, dict.fromkeys(workloads, tuple(batches)), focus, cuda_graphs)


@dataclass(frozen=True)
class Device:
    """Where the records are valid: GPU, SM count, driver and torch versions."""

    gpu: str
    sm_total: int
    driver: str | None
    torch: str


#: one window of a configuration: each task's images/s and the SM count it saw
Measure = Callable[[Config], tuple[list[float], list[int | None]]]


@dataclass
class Result:
    data: Path
    windows: int = 0  # configurations measured in this run
    failed: int = 0
    measured_s: float = 0.0
    predictor: Path | None = None  # the exported ONNX file, once fitted
    stopped: bool = False  # stopped before the budget was spent
    fit_s: float | None = None
    spreads: list[float] = field(default_factory=list)


def calibrate(
    target: Target,
    directory: Path,
    device: Device,
    measure: Measure,
    *,
    measure_s: float,
    window_s: float = WINDOW_S,
    repeats: int = 3,
    seed: int = 0,
    stop: threading.Event | None = None,
    on_progress: Callable[[int, int | None], None] = lambda done, total: None,
    fit: bool = True,
    fit_epochs: int | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Result:
    """Measure `target` for `measure_s` or until `stop` is set, then (with `fit`, unless stopped) fit and export
    the predictor into `directory`. `on_progress(done, estimated_total)` follows the windows."""
    started = clock()
    stop = stop or threading.Event()
    path = dataset_path(directory, device.gpu, target.cuda_graphs)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = Result(path)
    measured = measured_configs(path, key=lambda r, t: _workload(r, t))
    configs = sample_configs(
        seed,
        windows=4000,
        models=target.workloads,
        focus=target.focus,
        measured=measured,
        batches=target.batches,
    )
    deadline = started + measure_s
    infeasible: set[tuple[Workload, int]] = set()
    failed_in_a_row = 0
    with open(path, "ab") as f:
        for config in configs:
            now = clock()
            if now >= deadline or stop.is_set():
                break
            if any((w, b) in infeasible for w, b, _ in config.tasks):
                continue
            try:
                record = _measure_config(config, measure, device, window_s, repeats, target.cuda_graphs)
            except (TaskFailed, WorkerGone) as exc:
                if stop.is_set():  # the window was cut short to give the GPU back
                    break
                result.failed += 1
                failed_in_a_row += 1
                log.warning("calibration window %s failed: %s", config.tasks, exc)
                if len(config.tasks) == 1 and isinstance(exc, TaskFailed) and exc.failure.code == "oom":
                    infeasible.add(config.tasks[0][:2])
                if failed_in_a_row >= MAX_FAILED_IN_A_ROW:
                    raise RuntimeError(
                        f"calibration: {failed_in_a_row} windows failed in a row: {exc}"
                    ) from exc
                continue
            failed_in_a_row = 0
            f.write(msgspec.json.encode(record) + b"\n")
            f.flush()
            result.windows += 1
            result.spreads += [t.spread for t in record.tasks if t.spread is not None]
            pace = (clock() - started) / result.windows
            on_progress(result.windows, result.windows + int(max(0.0, deadline - clock()) / pace))
    result.measured_s = clock() - started
    result.stopped = stop.is_set()
    if fit and not result.stopped:
        fitted = clock()
        result.predictor = fit_and_export(path, target, fit_epochs)
        result.fit_s = clock() - fitted
    return result


def measuring_left(budget_s: float, measured_s: float) -> float:
    """Seconds of a calibration budget's measuring share (all but FIT_SHARE) that earlier sittings left unspent."""
    return max(0.0, budget_s * (1 - FIT_SHARE) - measured_s)


def fit_and_export(data: Path, target: Target, epochs: int | None = None) -> Path:
    """Fit the predictor on a data file (the target's focus combinations stay out of the unseen split) and export
    it to ONNX with its model card, next to the data. ValueError when the file holds too few records."""
    from predictor.records import DataFile
    from predictor.training import export, fit

    snapshot = DataFile.read(data)
    if len(snapshot.records) < MIN_FIT_RECORDS:
        raise ValueError(
            f"{data} holds {len(snapshot.records)} records; fitting a predictor needs at least {MIN_FIT_RECORDS}"
        )
    options = {} if epochs is None else {"epochs": epochs}
    network = calibration_network(snapshot.records)
    return export(fit(snapshot, data.parent, protected=target.protected, network=network, **options))


def calibration_network(records: Sequence[Record]) -> str:
    """predictor.model's network for a data file: the factored one carries few co-locations over to combinations
    never measured, DeepSets fits many better."""
    co_located = sum(len(r.tasks) > 1 for r in records)
    return "deepsets" if co_located >= DEEPSETS_FROM_COLOCATIONS else "factored"


def _measure_config(
    config: Config, measure: Measure, device: Device, window_s: float, repeats: int, cuda_graphs: bool
) -> Record:
    """`repeats` windows of one configuration as one record: per task the median and the spread."""
    runs = [measure(config) for _ in range(repeats)]
    samples = []
    for i, (workload, batch, percent) in enumerate(config.tasks):
        values = [throughputs[i] for throughputs, _ in runs]
        median = statistics.median(values)
        samples.append(
            TaskSample(
                workload.model,
                batch,
                float(percent),
                round(median, 2),
                runs[-1][1][i],
                input_size=workload.input_size,
                num_classes=workload.num_classes,
                spread=round((max(values) - min(values)) / median, 4) if median > 0 else None,
            )
        )
    return Record(
        gpu=device.gpu,
        sm_total=device.sm_total,
        driver=device.driver,
        torch=str(device.torch),  # torch.__version__ is a str subclass that msgspec does not encode
        resolution=config.tasks[0][0].input_size,
        window_s=window_s,
        ts=time.time(),
        tasks=samples,
        cuda_graphs=cuda_graphs,
    )


def _workload(record: Record, task: TaskSample) -> Workload:
    spec = task_spec(record, task)
    return Workload(spec.name, spec.input_size, spec.num_classes)


class PoolMeasure:
    """Windows measured by warm workers under MPS (one per workload and SM share; those at the shares in `levels`
    started up front) through the task runtime (agent.windows); a context manager that ends its workers."""

    def __init__(
        self,
        target: Target,
        sharing,
        init: jobs.Init,
        *,
        window_s: float,
        seed: int = 0,
        stop: threading.Event | None = None,
        levels: Sequence[float] = R_LEVELS,
    ) -> None:
        from agent.workers import WorkerPool

        self.sharing, self.window_s = sharing, window_s
        self.pool = WorkerPool(init)
        self._closed = threading.Event()
        if stop is not None:  # cut a window short when asked to stop: the GPU is wanted
            threading.Thread(target=self._stop_on, args=(stop,), name="calibration-stop", daemon=True).start()
        self.prepares = {
            w: jobs.Prepare(
                model=ModelSpec(name=w.model, num_classes=w.num_classes, input_size=w.input_size),
                data=SyntheticData(samples=SYNTHETIC_SAMPLES, seed=seed),
            )
            for w in target.workloads
        }
        for workload in target.workloads:
            for percent in levels:
                self.pool.prestart(*self._worker(workload, float(percent)))

    def __call__(self, config: Config) -> tuple[list[float], list[int | None]]:
        from agent.windows import Member, measure_window

        members = [
            Member(*self._worker(w, float(r)), jobs.Measure(batch=b, seconds=self.window_s, warmup_steps=2))
            for w, b, r in config.tasks
        ]
        try:
            window = measure_window(self.pool, members)
        except TaskFailed as exc:
            # idle workers (other workloads and shares) hold GPU memory: end them and measure once more
            if exc.failure.code != "oom" or not (ended := self.pool.end_idle({m.key for m in members})):
                raise
            log.info("a window ran out of GPU memory: ended %d idle workers, measuring it again", ended)
            window = measure_window(self.pool, members)
        return [r.images_per_s for r in window.results], window.sm_counts

    def _worker(self, workload: Workload, percent: float):
        key = (workload, percent)
        name = f"{workload.model}-{workload.input_size}@{percent:g}"
        return key, self.sharing.launch(name, percent), self.prepares[workload]

    def close(self) -> None:
        self._closed.set()
        self.pool.close()

    def _stop_on(self, stop: threading.Event) -> None:
        """Once `stop` is set, ask the workers to stop until the pool closes (a worker forgets a stop asked for
        before its current command began)."""
        while not stop.wait(0.2):
            if self._closed.is_set():
                return
        while not self._closed.wait(0.5):
            self.pool.request_stop()

    def __enter__(self) -> PoolMeasure:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def calibrate_gpu(target: Target, directory: Path, sharing, **options) -> Result:
    """`calibrate` on this machine's first CUDA GPU, through warm workers under `sharing`'s MPS daemon, their
    training steps replayed from CUDA graphs if the target says so; `options` are calibrate's."""
    import torch

    from agent.gpu.probe import probe

    report = probe(allow_torch=True)
    if not report.gpus or not torch.cuda.is_available():
        raise RuntimeError(f"calibration needs a CUDA GPU: {report.note}")
    gpu = report.gpus[0]
    device = Device(gpu.name, gpu.sm_count or 0, report.driver_version, torch.__version__)
    init = jobs.Init(device="cuda", cuda_graphs=target.cuda_graphs)
    window_s, seed, stop = options.get("window_s", WINDOW_S), options.get("seed", 0), options.get("stop")
    levels = R_LEVELS if options["measure_s"] > 0 else ()  # a call that only fits starts no GPU process
    with PoolMeasure(
        target, sharing, init, window_s=window_s, seed=seed, stop=stop, levels=levels
    ) as measure:
        return calibrate(target, directory, device, measure, **options)
