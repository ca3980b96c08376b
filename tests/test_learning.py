"""Learning from every round: round records (agent.learning), the device history (agent.history), the residual
correction (predictor.correction) and the report of predicted against measured throughput."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from agent import jobs
from agent.history import DeviceHistory
from agent.learning import RoundLearning, round_records
from agent.planning import Planner, RoundPlan
from agent.runner import TaskOutcome
from agent.workers import Launch
from predictor.correction import CorrectedPredictor, Correction, fit_correction, workload_key
from predictor.features import extract
from predictor.records import Record, TaskSample, dataset_path
from protocol.schemas import GpuInfo, ModelSpec, OptimizerSpec, TaskAssignment
from tests.test_planning import LawPredictor, sharing

GPU = GpuInfo(index=0, name="Fake GPU 100", backend="nvml", memory_total_bytes=1 << 30, sm_count=100)
MODELS = {"a": "resnet18", "b": "shufflenet_v2_x0_5", "c": "mobilenet_v3_small"}
#: what the fake device really delivers, relative to the law the predictor knows
TRUTH = {"resnet18": 0.6, "shufflenet_v2_x0_5": 1.5, "mobilenet_v3_small": 1.0}


def assignment(task: str, batch: int = 16) -> TaskAssignment:
    return TaskAssignment(
        task=task,
        model=ModelSpec(name=MODELS[task], num_classes=10, input_size=32),
        optimizer=OptimizerSpec(),
        base_version=0,
        base_sha256="0" * 64,
        batch_size=batch,
        min_batch_size=8,
        max_batch_size=64,
    )


def trained(images: float, seconds: float) -> jobs.Trained:
    return jobs.Trained(
        samples=100,
        steps=10,
        seconds=seconds,
        metrics={"images": images, "train_s": seconds},
        output_path="x",
        size=0,
        sha256="0" * 64,
    )


def plan_of(policy: str, resources: dict[str, float], waves: dict[str, int] | None = None, predicted=None):
    tasks = list(resources or waves)
    return RoundPlan(
        policy,
        [assignment(t) for t in tasks],
        [Launch(t, wave=(waves or {}).get(t, 0), percent=resources.get(t)) for t in tasks],
        resources,
        "",
        predicted=predicted or {},
        shares=policy,
    )


def test_a_round_record_takes_each_tasks_pace_while_all_trained():
    plan = plan_of("fedmt", {"a": 40.0, "b": 60.0}, predicted={"a": 90.0, "b": 210.0})
    outcomes = {
        "a": TaskOutcome("a", trained=trained(1000, 10.0)),  # first to finish: its whole round
        "b": TaskOutcome("b", trained=trained(3000, 12.0), co_run_images_per_s=200.0),
    }
    (record,) = round_records(7, plan, outcomes, GPU, "555.1")
    assert (record.round, record.policy, record.gpu, record.sm_total) == (7, "fedmt", GPU.name, 100)
    assert [(t.model, t.batch, t.resource, t.throughput, t.predicted) for t in record.tasks] == [
        ("resnet18", 16, 40.0, 100.0, 90.0),
        ("shufflenet_v2_x0_5", 16, 60.0, 200.0, 210.0),
    ]
    assert record.window_s == 12.0 and record.tasks[0].input_size == 32 and not record.cuda_graphs
    (graphed,) = round_records(7, plan, outcomes, GPU, "555.1", cuda_graphs=True)
    assert graphed.cuda_graphs and graphed.tasks == record.tasks


def test_temporal_gives_one_alone_record_per_wave_and_concurrent_none():
    plan = plan_of("temporal", {}, waves={"a": 0, "b": 1})
    outcomes = {t: TaskOutcome(t, trained=trained(500, 5.0)) for t in "ab"}
    records = round_records(1, plan, outcomes, GPU, None)
    assert [[(t.model, t.resource) for t in r.tasks] for r in records] == [
        [("resnet18", 100.0)],
        [("shufflenet_v2_x0_5", 100.0)],
    ]
    assert round_records(1, plan_of("concurrent", {}, waves={"a": 0, "b": 0}), outcomes, GPU, None) == []


def test_a_wave_with_a_failed_task_is_not_recorded():
    plan = plan_of("isolated", {"a": 50.0, "b": 50.0})
    outcomes = {
        "a": TaskOutcome("a", trained=trained(500, 5.0)),
        "b": TaskOutcome("b", failure=jobs.Failed(code="oom", error="x")),
    }
    assert round_records(1, plan, outcomes, GPU, None) == []


def record(round_: int, tasks: list[tuple[str, int, float, float, float | None]], policy="fedmt") -> Record:
    return Record(
        gpu=GPU.name,
        sm_total=100,
        driver=None,
        torch="2",
        resolution=32,
        tasks=[TaskSample(m, b, r, p, input_size=32, predicted=q) for m, b, r, p, q in tasks],
        window_s=1.0,
        ts=float(round_),
        round=round_,
        policy=policy,
    )


def test_the_history_answers_what_a_configuration_measured_here_and_survives_a_restart(tmp_path):
    path = tmp_path / "fake-gpu-100.jsonl"
    history = DeviceHistory(path)
    history.add(
        record(1, [("resnet18", 16, 40.0, 100.0, 120.0), ("shufflenet_v2_x0_5", 16, 60.0, 300.0, 290.0)])
    )
    history.add(
        record(2, [("shufflenet_v2_x0_5", 16, 60.0, 320.0, 300.0), ("resnet18", 16, 40.0, 110.0, 100.0)])
    )
    history.add(
        record(3, [("resnet18", 16, 40.0, 130.0, 100.0), ("shufflenet_v2_x0_5", 16, 60.0, 310.0, 300.0)])
    )
    keys = [("shufflenet_v2_x0_5", 32, 16, 60.0), ("resnet18", 32, 16, 40.0)]
    assert history.measured(keys) == [310.0, 110.0]  # medians, in the order asked
    assert history.measured([("resnet18", 32, 16, 50.0), ("shufflenet_v2_x0_5", 32, 16, 50.0)]) is None
    assert history.measured(keys[:1]) is None  # alone is another configuration
    errors = [20 / 100, 10 / 300, 20 / 320, 10 / 110, 30 / 130, 10 / 310]
    assert history.recent_error(5) == pytest.approx(100 * np.mean(errors))
    assert history.recent_error(1) == pytest.approx(100 * np.mean(errors[4:]))
    reloaded = DeviceHistory(path)
    assert reloaded.measured(keys) == [310.0, 110.0] and len(reloaded.rounds) == 3


def test_calibration_windows_are_not_round_history(tmp_path):
    import msgspec

    path = tmp_path / "g.jsonl"
    window = msgspec.structs.replace(record(1, [("resnet18", 16, 40.0, 999.0, None)]), round=None)
    path.write_bytes(msgspec.json.encode(window) + b"\n")
    assert DeviceHistory(path).measured([("resnet18", 32, 16, 40.0)]) is None


def test_the_correction_learns_a_bias_per_workload_and_shrinks_toward_no_change():
    assert fit_correction([]) == Correction()
    one = fit_correction([("m@32", 100.0, 200.0)])
    assert 1.0 < one.factor("m@32") < 2.0  # one observation moves it part of the way
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(40):
        for key, bias in (("a@32", 0.5), ("b@32", 1.5)):
            predicted = rng.uniform(50, 500)
            rows.append((key, predicted, predicted * bias * rng.lognormal(0, 0.03)))
    learned = fit_correction(rows)
    assert learned.factor("a@32") == pytest.approx(0.5, rel=0.08)
    assert learned.factor("b@32") == pytest.approx(1.5, rel=0.08)
    assert learned.factor("unseen@32") == pytest.approx(learned.device_factor)
    assert learned.observations == 80


def test_recent_rounds_outweigh_old_ones():
    old = [("m@32", 100.0, 50.0)] * 60
    new = [("m@32", 100.0, 150.0)] * 30
    assert fit_correction(old + new).factor("m@32") > 1.0  # unweighted: 0.72
    assert fit_correction(old + new * 4).factor("m@32") == pytest.approx(1.5, rel=0.05)


def true_throughput(tasks, batches, resources):
    law = LawPredictor()(tasks, batches, resources)
    return law * np.array([TRUTH[t.model] for t in tasks])


def test_rounds_correct_the_predictor_and_the_report_shows_predicted_against_measured(tmp_path):
    planner = Planner(sharing(tmp_path, mps=True), LawPredictor(), "law")
    learning = RoundLearning(tmp_path / "predictor", GPU, "555.1", planner)
    assert isinstance(planner.predictor, CorrectedPredictor) and planner.history is learning.history
    tasks = [assignment(t) for t in "abc"]
    samples = {"a": 400, "b": 800, "c": 1200}
    errors = []
    for number in range(1, 11):
        plan = planner.plan("fedmt", tasks, samples)
        features = [extract(a.model) for a in plan.assignments]
        batches = np.array([[a.batch_size for a in plan.assignments]], dtype=float)
        percents = np.array([[plan.resources[a.task] for a in plan.assignments]])
        truth = dict(zip([a.task for a in plan.assignments], true_throughput(features, batches, percents)[0]))
        errors.append(np.mean([abs(plan.predicted[t] - truth[t]) / truth[t] for t in truth]))
        outcomes = {t: TaskOutcome(t, trained=trained(truth[t] * 10, 10.0)) for t in truth}
        assert len(learning.observe(number, plan, outcomes)) == 1
    assert errors[0] > 0.25 and errors[-1] < 0.05, errors  # the law was off by 0.6x..1.5x
    data = dataset_path(tmp_path / "predictor", GPU.name)
    assert learning.data == data and len(data.read_text().splitlines()) == 10
    graphed = RoundLearning(tmp_path / "predictor", GPU, "555.1", planner, cuda_graphs=True)
    assert graphed.data == dataset_path(tmp_path / "predictor", GPU.name, cuda_graphs=True) != data
    assert len(graphed.history.rounds) == 0  # the eager rounds are not its history
    report = json.loads(data.with_suffix(".refinement.json").read_text())
    assert report["recent_rounds"] == 10 and report["correction"]["observations"] == 30
    assert report["refit_ms"] is not None and report["rounds"][-1]["round"] == 10
    last = report["rounds"][-1]["tasks"]
    assert all(math.isclose(t["predicted"], t["measured"], rel_tol=0.1) for t in last)
    corrected = (
        report["correction"]["device_factor"] * report["correction"]["factors"][workload_key("resnet18", 32)]
    )
    assert corrected == pytest.approx(0.6, rel=0.1)


def test_a_history_line_cut_short_by_a_crash_is_skipped_not_fatal(tmp_path):
    import msgspec

    path = tmp_path / "g.jsonl"
    good = msgspec.json.encode(record(1, [("resnet18", 16, 40.0, 100.0, 90.0)]))
    path.write_bytes(good + b"\n" + good[: len(good) // 2] + b"\n")
    history = DeviceHistory(path)
    assert len(history.rounds) == 1 and history.measured([("resnet18", 32, 16, 40.0)]) == [100.0]
