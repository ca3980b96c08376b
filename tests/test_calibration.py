"""Calibration on the device (agent.calibration, agent.autocalibration) with fake worker timings: what is profiled,
repetitions and their spread, the time budget, stopping and resuming, failed windows, the fit and export into the
state directory, and the agent preferring that predictor over the shipped one."""

from __future__ import annotations

import json
import threading
import time

import msgspec
import numpy as np
import pytest

from agent.autocalibration import AutoCalibration, CalibrationConfig
from agent.calibration import (
    DEEPSETS_FROM_COLOCATIONS,
    FIT_SHARE,
    Device,
    Result,
    calibrate,
    calibration_batches,
    calibration_network,
    target_for,
)
from agent.gpu.probe import GpuReport
from agent.jobs import Failed
from agent.planning import Planner
from agent.service import load_predictor
from agent.workers import TaskFailed
from predictor.encoding import MAX_TASKS
from predictor.features import extract
from predictor.records import (
    CO_LOCATIONS_PER_ALONE,
    DataFile,
    Record,
    TaskSample,
    Workload,
    dataset_path,
    load_records,
    task_spec,
)
from predictor.runtime import OnnxPredictor
from predictor.training import fit
from protocol.schemas import GpuInfo, ModelSpec, OptimizerSpec, TaskAssignment
from tests.test_planning import sharing

GPU = "NVIDIA H200"  # a GPU the repository ships a predictor for


class TorchVersion(str):
    """The type of torch.__version__: a str subclass, which msgspec does not encode (found on the H200)."""


DEVICE = Device(GPU, 132, "580.1", TorchVersion("2.x"))
WINDOW_S, REPEATS = 2.0, 3


def task(name: str, model: str, size: int, batch: int = 16) -> TaskAssignment:
    return TaskAssignment(
        task=name,
        model=ModelSpec(name=model, num_classes=10, input_size=size),
        optimizer=OptimizerSpec(),
        base_version=0,
        base_sha256="0" * 64,
        batch_size=batch,
        min_batch_size=8,
        max_batch_size=256,
    )


TASKS = [task("a", "resnet18", 32), task("b", "shufflenet_v2_x0_5", 32), task("c", "mobilenet_v3_small", 48)]
#: seven distinct workloads: more than a predictor plans at once
MANY_TASKS = [
    *TASKS,
    *(
        task(name, model, 32)
        for name, model in zip("defg", ("resnet34", "vgg11", "squeezenet1_0", "resnet50"))
    ),
]


class FakeGpu:
    """Window timings from a throughput law, 2% apart between repetitions, on a clock that each window advances
    by its length (so budgets are exact). `oom` batch sizes fail alone."""

    def __init__(self, oom: int | None = None, stop_after: int | None = None) -> None:
        self.now, self.windows, self.oom, self.stop_after = 0.0, 0, oom, stop_after
        self.stop = threading.Event()

    def clock(self) -> float:
        return self.now

    def __call__(self, config) -> tuple[list[float], list[int | None]]:
        self.now += WINDOW_S
        self.windows += 1
        if self.stop_after is not None and self.windows >= self.stop_after * REPEATS:
            self.stop.set()
        n = len(config.tasks)
        if n == 1 and config.tasks[0][1] == self.oom:
            raise TaskFailed(Failed(code="oom", error="CUDA out of memory"))
        jitter = 1 + 0.02 * (self.windows % REPEATS - 1)
        return [law(w, b, r, n) * jitter for w, b, r in config.tasks], [
            int(1.32 * r) for _, _, r in config.tasks
        ]


def law(workload: Workload, batch: int, resource: float, n: int) -> float:
    flops = extract(ModelSpec(name=workload.model, num_classes=10, input_size=workload.input_size))
    return (
        1e11 / flops.flops_per_sample * batch / (batch + 16) * (resource / 100) ** 0.6 / (1 + 0.3 * (n - 1))
    )


def test_the_target_is_the_configured_tasks_around_their_batch_sizes():
    target = target_for(TASKS)
    assert target.workloads == (
        Workload("resnet18", 32),
        Workload("shufflenet_v2_x0_5", 32),
        Workload("mobilenet_v3_small", 48),
    )
    assert target.batches[Workload("resnet18", 32)] == (8, 16, 32, 64) == calibration_batches(TASKS[0])
    assert calibration_batches(task("x", "resnet18", 32, batch=24)) == (8, 16, 24, 32, 64)
    assert target.focus == (target.workloads,)
    assert target.protected == (("mobilenet_v3_small", "resnet18", "shufflenet_v2_x0_5"),)


@pytest.mark.slow
def test_more_workloads_than_the_predictor_takes_are_profiled_in_co_locations_it_can_fit(tmp_path):
    target = target_for(MANY_TASKS)
    assert len(target.workloads) == len(MANY_TASKS) > MAX_TASKS and target.focus == ()
    gpu = FakeGpu()
    result = calibrate(
        target,
        tmp_path,
        DEVICE,
        gpu,
        measure_s=70 * WINDOW_S * REPEATS,
        window_s=WINDOW_S,
        fit_epochs=20,
        clock=gpu.clock,
    )
    records = load_records(result.data)
    assert max(len(r.tasks) for r in records) == MAX_TASKS
    card = json.loads(result.predictor.with_suffix(".card.json").read_text())
    assert card["data"]["records"] == len(records) == 70


def test_the_calibrate_command_takes_each_task_with_the_batch_bounds_its_plans_keep_to():
    from agent.cli import _assignment

    bounded = _assignment("shufflenet_v2_x0_5:128:16:16-128")
    assert (bounded.model.name, bounded.model.input_size, bounded.batch_size) == (
        "shufflenet_v2_x0_5",
        128,
        16,
    )
    assert calibration_batches(bounded) == (16, 32, 64)
    assert calibration_batches(_assignment("resnet18:128:16")) == (4, 8, 16, 32, 64)
    for bad in ("resnet18:128", "resnet18:128:16:64-128", "resnet18:128:16:16"):
        with pytest.raises(SystemExit, match="--task"):
            _assignment(bad)


@pytest.mark.slow
def test_calibration_measures_baselines_then_co_locations_within_its_budget_and_exports_a_predictor(tmp_path):
    gpu = FakeGpu()
    target = target_for(TASKS)
    progress = []
    result = calibrate(
        target,
        tmp_path,
        DEVICE,
        gpu,
        measure_s=80 * WINDOW_S * REPEATS,
        window_s=WINDOW_S,
        repeats=REPEATS,
        fit_epochs=300,
        clock=gpu.clock,
        on_progress=lambda done, total: progress.append((done, total)),
    )
    records = load_records(result.data)
    assert result.data == dataset_path(tmp_path, GPU) and len(records) == result.windows == 80
    assert gpu.windows == 80 * REPEATS and result.measured_s == pytest.approx(80 * WINDOW_S * REPEATS)
    full = 3 * 4  # alone on all the SMs first, then a lower share alone before every few co-locations
    assert all(len(r.tasks) == 1 and r.tasks[0].resource == 100 for r in records[:full])
    alone = [len(r.tasks) == 1 for r in records[full:]]
    group = [True] + [False] * CO_LOCATIONS_PER_ALONE
    assert alone == (group * len(alone))[: len(alone)]
    assert {Workload(t.model, task_spec(r, t).input_size) for r in records for t in r.tasks} == set(
        target.workloads
    )
    assert {t.batch for r in records for t in r.tasks} == {8, 16, 32, 64}
    first = records[0].tasks[0]
    workload = Workload(first.model, first.input_size)
    assert first.throughput == pytest.approx(
        law(workload, first.batch, first.resource, 1), rel=1e-3
    )  # median
    assert first.spread == pytest.approx(0.04, abs=1e-3) and first.sm == int(1.32 * first.resource)
    assert progress[-1][0] == 80 and progress[-1][1] == 80 and progress[20][1] >= 80
    # the predictor: exported next to its data, with its card, covering the configured tasks
    assert result.predictor == tmp_path / "nvidia-h200.onnx" and result.fit_s is not None
    predictor = OnnxPredictor(result.predictor, gpu=GPU)
    assert predictor.input_sizes == {32, 48} and predictor.batch_range == (8, 64)
    shares = {t.resource for r in records for t in r.tasks}
    assert predictor.share_range == (min(shares), max(shares)) and min(shares) > 10  # as measured
    assert predictor.card["data"]["models"] == sorted(w.model for w in target.workloads)
    assert predictor.card["network"]["name"] == "factored"  # 80 windows: few co-locations
    planner = Planner(sharing(tmp_path, mps=True), predictor, "calibrated")
    assert planner.profiled(TASKS) and not planner.profiled([*TASKS[:2], task("d", "vgg16", 32)])
    tasks = [
        extract(ModelSpec(name=w.model, num_classes=10, input_size=w.input_size)) for w in target.workloads
    ]
    predicted = predictor(tasks, np.array([[16, 16, 16]]), np.array([[40.0, 60.0, 80.0]]))[0]
    truth = [law(w, 16, r, 3) for w, r in zip(target.workloads, (40.0, 60.0, 80.0))]
    assert np.all(np.abs(predicted / truth - 1) < 0.5)  # a rough fit from 80 windows and 300 epochs


def test_a_calibration_fits_the_factored_network_to_few_co_locations_and_deepsets_to_many():
    def window(models: list[str]) -> Record:
        samples = [TaskSample(m, 16, 50.0, 100.0) for m in models]
        return Record(
            gpu=GPU, sm_total=132, driver="1", torch="2", resolution=32, tasks=samples, window_s=1.0, ts=0.0
        )

    alone, pair = window(["resnet18"]), window(["resnet18", "vgg16"])
    assert calibration_network([alone] * 500 + [pair] * (DEEPSETS_FROM_COLOCATIONS - 1)) == "factored"
    assert calibration_network([alone] * 10 + [pair] * DEEPSETS_FROM_COLOCATIONS) == "deepsets"


def test_a_stopped_calibration_keeps_its_records_and_the_next_run_skips_the_baselines_it_holds(tmp_path):
    gpu = FakeGpu(stop_after=10)
    target = target_for(TASKS)
    stopped = calibrate(
        target, tmp_path, DEVICE, gpu, measure_s=1e6, window_s=WINDOW_S, stop=gpu.stop, clock=gpu.clock
    )
    assert stopped.stopped and stopped.windows == 10 and stopped.predictor is None
    held = {(r.tasks[0].model, r.tasks[0].batch, r.tasks[0].resource) for r in load_records(stopped.data)}
    again = FakeGpu(stop_after=5)
    calibrate(
        target, tmp_path, DEVICE, again, measure_s=1e6, window_s=WINDOW_S, stop=again.stop, clock=again.clock
    )
    records = load_records(stopped.data)
    assert len(records) == 15
    alone_again = {
        (r.tasks[0].model, r.tasks[0].batch, r.tasks[0].resource) for r in records[10:] if len(r.tasks) == 1
    }
    assert alone_again and not held & alone_again


def test_a_batch_size_that_runs_out_of_memory_alone_is_not_tried_again(tmp_path):
    gpu = FakeGpu(oom=64)
    result = calibrate(
        target_for(TASKS[:1]),
        tmp_path,
        DEVICE,
        gpu,
        measure_s=12 * WINDOW_S * REPEATS,
        window_s=WINDOW_S,
        clock=gpu.clock,
        fit=False,
    )
    assert result.failed == 1 and 64 not in {t.batch for r in load_records(result.data) for t in r.tasks}


def quick_calibration(directory, cuda_graphs: bool = False) -> Result:
    """60 windows and a 50-epoch fit: a rough predictor for TASKS in `directory`."""
    gpu = FakeGpu()
    return calibrate(
        target_for(TASKS, cuda_graphs),
        directory,
        DEVICE,
        gpu,
        measure_s=60 * 6.0,
        window_s=2.0,
        fit_epochs=50,
        clock=gpu.clock,
    )


def test_the_agent_prefers_the_predictor_calibrated_here_over_the_shipped_one(tmp_path):
    report = GpuReport(
        gpus=[GpuInfo(index=0, name=GPU, backend="nvml", memory_total_bytes=1)], backend="nvml"
    )
    shipped, note = load_predictor(None, report, "cuda", tmp_path)
    assert shipped.path.parent.name == "models" and "nvidia-h200.onnx" in note
    quick_calibration(tmp_path)
    own, note = load_predictor(None, report, "cuda", tmp_path)
    assert own.path == tmp_path / "nvidia-h200.onnx" and own.input_sizes == {32, 48}


def test_steps_replayed_from_cuda_graphs_get_their_own_data_and_predictor_and_agents_keep_to_their_kind(
    tmp_path,
):
    result = quick_calibration(tmp_path, cuda_graphs=True)
    assert (
        result.data == tmp_path / "nvidia-h200.graphs.jsonl" and not (tmp_path / "nvidia-h200.jsonl").exists()
    )
    assert {r.cuda_graphs for r in load_records(result.data)} == {True}
    assert OnnxPredictor(result.predictor, gpu=GPU).cuda_graphs is True
    report = GpuReport(
        gpus=[GpuInfo(index=0, name=GPU, backend="nvml", memory_total_bytes=1)], backend="nvml"
    )
    graphed, note = load_predictor(None, report, "cuda", tmp_path, cuda_graphs=True)
    assert graphed.path == result.predictor == tmp_path / "nvidia-h200.graphs.onnx"
    # an eager agent passes over it to the shipped predictor (profiled eagerly), and a graphed agent without a
    # predictor of its kind refuses the shipped one: the heuristic, until it calibrates
    eager, note = load_predictor(None, report, "cuda", tmp_path)
    assert eager.path.parent.name == "models" and eager.cuda_graphs is False
    refused, note = load_predictor(None, report, "cuda", tmp_path / "empty", cuda_graphs=True)
    assert refused is None and "eager steps" in note and "CUDA graphs" in note
    refused, note = load_predictor(str(result.predictor), report, "cuda", cuda_graphs=False)
    assert refused is None and "profiled with steps replayed from CUDA graphs" in note


def test_a_data_file_of_both_kinds_of_steps_is_not_fitted(tmp_path):
    records = load_records(quick_calibration(tmp_path / "eager").data)[:30]
    mixed = tmp_path / "mixed.jsonl"
    flipped = [msgspec.structs.replace(r, cuda_graphs=i % 2 == 0) for i, r in enumerate(records)]
    mixed.write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in flipped))
    with pytest.raises(ValueError, match="mixes eager and CUDA-graph"):
        fit(DataFile.read(mixed), tmp_path / "out", epochs=5)


def test_the_agent_takes_its_predictors_features_so_that_plans_extract_none(tmp_path, monkeypatch):
    report = GpuReport(
        gpus=[GpuInfo(index=0, name=GPU, backend="nvml", memory_total_bytes=1)], backend="nvml"
    )
    quick_calibration(tmp_path)
    monkeypatch.setattr("predictor.features._known", {})

    def refuse(*spec):
        raise AssertionError(f"features of {spec} extracted")

    monkeypatch.setattr("predictor.features._compute", refuse)
    predictor, _ = load_predictor(None, report, "cuda", tmp_path)
    plan = Planner(sharing(tmp_path, mps=True), predictor, "calibrated").plan(
        "fedmt", TASKS, {"a": 100, "b": 200, "c": 300}
    )
    assert set(plan.resources) == {"a", "b", "c"} and set(plan.predicted) == {"a", "b", "c"}
    assert {(f.model, f.input_size) for f in predictor.features} == {
        (a.model.name, a.model.input_size) for a in TASKS
    }


def fake_measure(delay_s: float = 0.0):
    """calibrate_gpu's stand-in: calibrate() on a FakeGpu, each window taking `delay_s` of real time."""

    def measure(target, directory, sharing_, **options) -> Result:
        gpu = FakeGpu()

        def slow(config):
            threading.Event().wait(delay_s)
            return gpu(config)

        return calibrate(target, directory, DEVICE, slow, clock=gpu.clock, **options)

    return measure


def test_the_agent_calibrates_between_rounds_and_hands_the_predictor_over(tmp_path):
    ready = []
    config = CalibrationConfig(budget_s=60 * 6.0 / (1 - FIT_SHARE), window_s=2.0, epochs=50)
    auto = AutoCalibration(
        config, tmp_path, sharing(tmp_path, mps=True), ready.append, measure=fake_measure()
    )
    planner = Planner(sharing(tmp_path, mps=True))
    assert auto.maybe_start(TASKS, planner)
    auto._thread.join(120)
    assert ready == [tmp_path / "nvidia-h200.onnx"]
    state = json.loads((tmp_path / "calibration.json").read_text())
    assert state["finished"] and state["measured_s"] == pytest.approx(60 * 6.0)
    # the key that agents before the kind of step was recorded wrote: an upgrade does not calibrate again
    assert state["target"] == sorted([list(w), list(b)] for w, b in target_for(TASKS).batches.items())
    assert not auto.maybe_start(TASKS, planner)  # done for these tasks
    planner.predictor = OnnxPredictor(ready[0], gpu=GPU)
    assert planner.profiled(TASKS)
    off = AutoCalibration(
        CalibrationConfig(auto=False), tmp_path / "off", sharing(tmp_path, mps=True), ready.append
    )
    assert not off.maybe_start(TASKS, Planner(sharing(tmp_path, mps=True)))
    no_mps = AutoCalibration(config, tmp_path / "cpu", sharing(tmp_path, mps=False), ready.append)
    assert not no_mps.maybe_start(TASKS, Planner(sharing(tmp_path, mps=False)))
    # an agent whose steps replay from CUDA graphs calibrates anew, into the graphs' own data file
    graphed = AutoCalibration(
        config, tmp_path, sharing(tmp_path, mps=True), ready.append, fake_measure(), cuda_graphs=True
    )
    assert graphed.maybe_start(TASKS, Planner(sharing(tmp_path, mps=True)))
    graphed._thread.join(120)
    assert ready[-1] == tmp_path / "nvidia-h200.graphs.onnx"
    assert {r.cuda_graphs for r in load_records(tmp_path / "nvidia-h200.graphs.jsonl")} == {True}
    assert json.loads((tmp_path / "calibration.json").read_text())["target"][-1] == "cuda_graphs"
    # a round of more tasks than a predictor takes is planned by the heuristic whatever is calibrated
    many = AutoCalibration(config, tmp_path / "many", sharing(tmp_path, mps=True), ready.append)
    assert not many.maybe_start(MANY_TASKS[: MAX_TASKS + 1], Planner(sharing(tmp_path, mps=True)))
    assert not (tmp_path / "many").exists()


def test_a_round_pauses_calibration_and_the_next_idle_time_resumes_it(tmp_path):
    ready = []
    config = CalibrationConfig(budget_s=1e6, window_s=2.0)
    auto = AutoCalibration(
        config, tmp_path, sharing(tmp_path, mps=True), ready.append, measure=fake_measure(delay_s=0.01)
    )
    planner = Planner(sharing(tmp_path, mps=True))
    data = dataset_path(tmp_path, GPU)

    def measured_beyond(count: int) -> None:
        """Wait (a loaded CI machine may take a while to start the thread) until more than `count` records."""
        deadline = time.monotonic() + 60
        while not (data.exists() and len(load_records(data)) > count) and time.monotonic() < deadline:
            threading.Event().wait(0.05)

    assert auto.maybe_start(TASKS, planner)
    measured_beyond(0)
    auto.pause()
    auto._thread.join(5)
    assert not auto.running and ready == []
    first = json.loads((tmp_path / "calibration.json").read_text())
    assert not first["finished"] and first["measured_s"] > 0
    held = len(load_records(data))
    assert auto.maybe_start(TASKS, planner)  # resumes, appending
    measured_beyond(held)
    auto.pause()
    auto._thread.join(5)
    second = json.loads((tmp_path / "calibration.json").read_text())
    assert second["measured_s"] > first["measured_s"] and len(load_records(data)) > held


def test_rounds_write_their_refinement_into_the_card_of_a_predictor_calibrated_here(tmp_path):
    from agent import jobs
    from agent.learning import RoundLearning
    from agent.runner import TaskOutcome

    result = quick_calibration(tmp_path)
    planner = Planner(sharing(tmp_path, mps=True), OnnxPredictor(result.predictor, gpu=GPU), "calibrated")
    info = GpuInfo(index=0, name=GPU, backend="nvml", memory_total_bytes=1, sm_count=132)
    learning = RoundLearning(tmp_path, info, "580.1", planner)
    plan = planner.plan("fedmt", TASKS, {"a": 300, "b": 600, "c": 900})
    outcomes = {
        t: TaskOutcome(
            t,
            trained=jobs.Trained(
                samples=1,
                steps=1,
                seconds=1.0,
                metrics={"images": 10 * p, "train_s": 10.0},
                output_path="x",
                size=0,
                sha256="0" * 64,
            ),
        )
        for t, p in plan.predicted.items()
    }
    learning.observe(1, plan, outcomes)
    card = json.loads(result.predictor.with_suffix(".card.json").read_text())
    assert card["refinement"]["recent_rounds"] == 1 and card["refinement"]["mape_recent_percent"] == 0.0
    assert msgspec.json.decode(result.data.read_bytes().splitlines()[-1])["round"] == 1


def test_a_measuring_pool_without_levels_starts_workers_only_for_the_windows_it_measures(tmp_path):
    """Refinement and a call that only fits start no profiling workers ahead: each is a CUDA context and an MPS
    client (48 at most per GPU)."""
    from agent import jobs
    from agent.calibration import PoolMeasure
    from predictor.records import R_LEVELS, Config
    from tests.test_handover import fake_mps

    target = target_for([task("a", "shufflenet_v2_x0_5", 16, batch=8)])
    (workload,) = target.workloads
    with PoolMeasure(target, fake_mps(tmp_path), jobs.Init(device="cpu"), window_s=0.2, levels=()) as measure:
        time.sleep(0.5)
        assert all(measure.pool.launch_of((workload, float(r))) is None for r in R_LEVELS)
        throughputs, _ = measure(Config(((workload, 8, 45.0),)))
        assert throughputs[0] > 0 and measure.pool.launch_of((workload, 45.0)) is not None
        assert all(measure.pool.launch_of((workload, float(r))) is None for r in R_LEVELS)


def test_a_window_out_of_gpu_memory_ends_the_idle_workers_and_is_measured_again(tmp_path, monkeypatch):
    from agent import jobs, windows
    from agent.calibration import PoolMeasure
    from predictor.records import Config
    from tests.test_handover import fake_mps

    target = target_for([task("a", "shufflenet_v2_x0_5", 16, batch=8)])
    (workload,) = target.workloads
    attempts, ended = [], []

    def measure_window(pool, members):
        attempts.append([m.key for m in members])
        if len(attempts) == 1:
            raise TaskFailed(Failed(code="oom", error="CUDA out of memory"))
        return windows.Window(
            [jobs.Measured(batch=8, images=80, seconds=0.1, started_at=0, ended_at=0.1)], [None], 0.1
        )

    monkeypatch.setattr(windows, "measure_window", measure_window)
    with PoolMeasure(target, fake_mps(tmp_path), jobs.Init(device="cpu"), window_s=0.1, levels=()) as measure:
        monkeypatch.setattr(measure.pool, "end_idle", lambda keep: ended.append(set(keep)) or 3)
        assert measure(Config(((workload, 8, 40.0),)))[0] == [pytest.approx(800.0)]
        assert attempts == [[(workload, 40.0)]] * 2 and ended == [{(workload, 40.0)}]
        # nothing idle to end: the window fails as it came (the calibration goes on without it)
        attempts.clear()
        monkeypatch.setattr(measure.pool, "end_idle", lambda keep: 0)
        with pytest.raises(TaskFailed, match="oom"):
            measure(Config(((workload, 8, 40.0),)))
        assert len(attempts) == 1


@pytest.mark.slow
def test_calibration_measures_through_real_workers_and_a_stop_cuts_a_long_window_short(tmp_path):
    """On the CPU under a faked MPS (shares without SM counts): real worker processes, one per R level, measure
    windows through the task runtime; a stop during a 60 s window ends the run within seconds."""
    from agent import jobs
    from agent.calibration import PoolMeasure
    from tests.test_handover import fake_mps

    target = target_for([task("a", "shufflenet_v2_x0_5", 16, batch=8)])
    device = Device("Fake CPU GPU", 1, None, "2.x")
    with PoolMeasure(target, fake_mps(tmp_path), jobs.Init(device="cpu"), window_s=0.3) as measure:
        result = calibrate(
            target, tmp_path, device, measure, measure_s=15.0, window_s=0.3, repeats=2, fit=False
        )
    records = load_records(result.data)
    assert result.windows == len(records) >= 1 and result.failed == 0
    assert all(t.throughput > 0 and t.spread is not None for r in records for t in r.tasks)
    stop = threading.Event()
    with PoolMeasure(
        target, fake_mps(tmp_path), jobs.Init(device="cpu"), window_s=60.0, stop=stop
    ) as measure:
        timer = threading.Timer(8.0, stop.set)
        timer.start()
        began = time.monotonic()
        stopped = calibrate(
            target, tmp_path, device, measure, measure_s=1e6, window_s=60.0, stop=stop, fit=False
        )
    assert stopped.stopped and stopped.windows == 0 and time.monotonic() - began < 30
