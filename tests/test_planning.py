"""The agent's round planner: predictor plans (Eq. 6 batches, Eq. 5 shares, Algorithm 1 order), damping, fallbacks."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest

from agent.mps import GpuSharing, MpsConfig, MpsDaemon
from agent.planning import Planner, batch_candidates
from protocol.schemas import ModelSpec, MpsInfo, OptimizerSpec, TaskAssignment

SHA = "0" * 64


def assignment(task: str, model: str, batch: int = 16, version: int = 3) -> TaskAssignment:
    return TaskAssignment(
        task=task,
        model=ModelSpec(name=model, num_classes=10, input_size=32),
        optimizer=OptimizerSpec(),
        base_version=version,
        base_sha256=SHA,
        batch_size=batch,
        min_batch_size=8,
        max_batch_size=64,
    )


TASKS = [
    assignment("a", "resnet18"),
    assignment("b", "shufflenet_v2_x0_5"),
    assignment("c", "mobilenet_v3_small"),
]
SAMPLES = {"a": 100, "b": 200, "c": 400}


class LawPredictor:
    """A known throughput law standing in for the ONNX predictor (same call signature and card)."""

    path = Path("law.onnx")

    def __init__(
        self,
        resolution: int = 32,
        batch_range: tuple[int, int] = (1, 1024),
        share_range: tuple[float, float] = (0.0, 100.0),
    ) -> None:
        self.card = {"resolution": resolution}
        self.input_sizes = frozenset({resolution})
        self.batch_range = batch_range
        self.share_range = share_range
        self.calls = 0

    def __call__(self, tasks, batches, resources):
        self.calls += 1
        flops = np.array([t.flops_per_sample for t in tasks])
        alone = 1e11 / flops * batches / (batches + 16) * (resources / 100) ** 0.7
        return alone / (1 + 0.002 * resources.sum(axis=1, keepdims=True))


def sharing(tmp_path, mps: bool) -> GpuSharing:
    daemon = MpsDaemon(MpsConfig(pipe_dir=str(tmp_path / "pipe"), log_dir=str(tmp_path / "log")))
    daemon.info = MpsInfo(available=mps, reason="test daemon" if mps else "no MPS here")
    return GpuSharing(daemon, 132, tmp_path)


def test_batch_candidates_are_powers_of_two_in_bounds_plus_the_scheduled_size():
    assert batch_candidates(assignment("x", "resnet18", batch=24), (1, 1024)) == [8, 16, 24, 32, 64]


def test_batch_candidates_grow_at_most_twofold_per_global_version_from_the_configured_size():
    assert batch_candidates(assignment("x", "resnet18", batch=16, version=0), (1, 1024)) == [8, 16]
    assert batch_candidates(assignment("x", "resnet18", batch=16, version=1), (1, 1024)) == [8, 16, 32]
    assert batch_candidates(assignment("x", "resnet18", batch=16, version=2), (1, 1024)) == [8, 16, 32, 64]
    assert batch_candidates(assignment("x", "resnet18", batch=16, version=2**31 - 1), (1, 1024))[-1] == 64
    assert batch_candidates(assignment("x", "resnet18", batch=8, version=0), (12, 128)) == [12]  # into range


def test_a_task_may_let_its_initial_model_train_at_a_larger_batch():
    def grown(version: int, growth: int) -> TaskAssignment:
        return msgspec.structs.replace(
            assignment("x", "resnet18", batch=8, version=version), initial_batch_growth=growth
        )

    assert batch_candidates(grown(0, 4), (1, 1024)) == [8, 16, 32]
    assert batch_candidates(grown(1, 4), (1, 1024)) == [8, 16, 32, 64]  # then twofold per version
    assert batch_candidates(grown(0, 64), (1, 1024))[-1] == 64  # within the task's bounds
    adam = msgspec.structs.replace(grown(0, 4), optimizer=OptimizerSpec(name="adam"))
    assert batch_candidates(adam, (1, 1024))[-1] == 16  # Adam under `auto`: at most twofold in all


def test_an_adam_task_under_the_auto_rule_grows_its_batch_at_most_twofold():
    adam = msgspec.structs.replace(
        assignment("x", "resnet18", version=5), optimizer=OptimizerSpec(name="adam")
    )
    assert batch_candidates(adam, (1, 1024))[-1] == 32
    sqrt = msgspec.structs.replace(adam, lr_scaling="sqrt")  # a rule the task chose: the version's ceiling
    assert batch_candidates(sqrt, (1, 1024))[-1] == 64


def test_batch_candidates_stay_inside_the_predictors_profiled_range():
    assert batch_candidates(assignment("x", "resnet18", batch=24), (16, 32)) == [16, 24, 32]
    assert batch_candidates(assignment("x", "resnet18", batch=64), (16, 32)) == [16, 32]  # 64 moved to 32
    assert batch_candidates(assignment("x", "resnet18", batch=8), (12, 128)) == [12, 16, 32, 64]


def test_the_plan_keeps_batch_sizes_where_the_predictor_was_profiled(tmp_path):
    plan = Planner(sharing(tmp_path, mps=True), LawPredictor(batch_range=(16, 32)), "law").plan(
        "fedmt", TASKS, SAMPLES
    )
    assert "predictor law.onnx" in plan.note
    assert all(16 <= a.batch_size <= 32 for a in plan.assignments)


def test_the_search_keeps_sm_shares_where_the_predictor_was_profiled(tmp_path):
    def plan(share_range):
        predictor = LawPredictor(share_range=share_range)
        return Planner(sharing(tmp_path, mps=True), predictor, "law").plan("fedmt", TASKS, SAMPLES)

    anywhere, profiled = plan((0.0, 100.0)), plan((20.0, 100.0))
    assert anywhere.shares == profiled.shares == "fedmt"
    assert min(anywhere.resources.values()) == 10  # this law's search result below 20% ...
    assert min(profiled.resources.values()) == 20  # ... is not planned where the predictor never measured


def test_a_predictor_profiled_at_other_batch_sizes_is_not_used(tmp_path):
    predictor = LawPredictor(batch_range=(128, 512))
    plan = Planner(sharing(tmp_path, mps=True), predictor, "law").plan("fedmt", TASKS, SAMPLES)
    assert predictor.calls == 0 and [a.batch_size for a in plan.assignments] == [16, 16, 16]
    assert "profiled at batch sizes 128..512, task a allows 8..64" in plan.note and "heuristic" in plan.note


def test_fedmt_with_a_predictor_plans_batches_shares_and_order(tmp_path):
    predictor = LawPredictor()
    planner = Planner(sharing(tmp_path, mps=True), predictor, "law", objective="sum")
    plan = planner.plan("fedmt", TASKS, SAMPLES)
    assert plan.policy == "fedmt" and "predictor law.onnx" in plan.note
    assert sorted(a.task for a in plan.assignments) == ["a", "b", "c"]
    batches = {a.task: a.batch_size for a in plan.assignments}
    assert batches["a"] < batches["b"] < batches["c"]  # Eq. 6: batch sizes follow the data volumes 1:2:4
    assert all(8 <= b <= 64 for b in batches.values())
    assert set(plan.resources) == {"a", "b", "c"} and all(10 <= r <= 100 for r in plan.resources.values())
    assert [launch.task for launch in plan.launches] == [
        a.task for a in plan.assignments
    ]  # Algorithm 1's order
    assert all(launch.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] for launch in plan.launches)
    assert predictor.calls >= 2  # one inference for Eq. 5/6, one for Algorithm 1


def test_the_makespan_objective_weighs_every_batch_combination_not_only_eq6s(tmp_path):
    """The law's throughput grows with the batch size, so the shortest round trains the task with the most work
    (ResNet18: the fewest images, but tens of times the FLOPs of the others) at its largest batch, where Eq. 6's
    proportions to the data volumes give it the smallest."""
    plan = Planner(sharing(tmp_path, mps=True), LawPredictor(), "law").plan("fedmt", TASKS, SAMPLES)
    batches = {a.task: a.batch_size for a in plan.assignments}
    assert batches["a"] == max(batch_candidates(TASKS[0], (1, 1024))) == max(batches.values())
    eq6 = Planner(sharing(tmp_path, mps=True), LawPredictor(), "law", objective="sum").plan(
        "fedmt", TASKS, SAMPLES
    )
    assert min(eq6.assignments, key=lambda a: a.batch_size).task == "a"


def test_batch_changes_are_damped_across_rounds(tmp_path):
    planner = Planner(sharing(tmp_path, mps=True), LawPredictor(), "law", objective="sum")
    first = {a.task: a.batch_size for a in planner.plan("fedmt", TASKS, SAMPLES).assignments}
    swapped = {"a": 400, "b": 200, "c": 100}  # the data volumes turn around
    undamped = Planner(sharing(tmp_path, mps=True), LawPredictor(), "law", objective="sum").plan(
        "fedmt", TASKS, swapped
    )
    target = {a.task: a.batch_size for a in undamped.assignments}
    second = {a.task: a.batch_size for a in planner.plan("fedmt", TASKS, swapped).assignments}
    assert target["a"] > first["a"] and target["c"] < first["c"]
    assert first["a"] < second["a"] < target["a"] * 1.2  # part of the way, not all of it at once
    assert target["c"] * 0.8 < second["c"] < first["c"]


def test_fedmt_without_a_predictor_uses_the_heuristic_and_says_why(tmp_path):
    plan = Planner(sharing(tmp_path, mps=True), None, "no predictor for this GPU").plan(
        "fedmt", TASKS, SAMPLES
    )
    assert sum(plan.resources.values()) == pytest.approx(200, abs=0.2)
    assert [a.batch_size for a in plan.assignments] == [16, 16, 16]  # the schedule's
    assert "heuristic" in plan.note and "no predictor for this GPU" in plan.note


def test_a_predictor_for_another_input_size_is_not_used(tmp_path):
    predictor = LawPredictor(resolution=128)
    plan = Planner(sharing(tmp_path, mps=True), predictor, "law").plan("fedmt", TASKS, SAMPLES)
    assert predictor.calls == 0
    assert "fitted at input sizes [128] px" in plan.note and "heuristic" in plan.note


def test_without_mps_fedmt_falls_back_to_concurrent(tmp_path):
    predictor = LawPredictor()
    plan = Planner(sharing(tmp_path, mps=False), predictor, "law").plan("fedmt", TASKS, SAMPLES)
    assert plan.policy == "concurrent" and plan.resources == {}
    assert predictor.calls == 0
    assert all(
        launch.env == {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "no-mps")} for launch in plan.launches
    )


@pytest.mark.parametrize("policy, mps", [("temporal", True), ("concurrent", True), ("fedmt", False)])
def test_a_plan_without_sm_shares_extracts_no_model_features(tmp_path, monkeypatch, policy, mps):
    def refuse(spec):
        raise AssertionError(f"features of {spec.name} extracted")

    monkeypatch.setattr("predictor.features.extract", refuse)
    plan = Planner(sharing(tmp_path, mps=mps), LawPredictor(), "law").plan(policy, TASKS, SAMPLES)
    assert plan.resources == {} and len(plan.launches) == len(TASKS)


# --- warm workers: a new SM share costs a restart ---------------------------------------------------------


def test_heuristic_shares_lie_on_the_grid(tmp_path):
    plan = Planner(sharing(tmp_path, mps=True)).plan("fedmt", TASKS, SAMPLES)
    assert all(r % 10 == 0 and 10 <= r <= 100 for r in plan.resources.values())


def test_the_heuristic_keeps_running_shares_within_one_grid_step_and_restarts_beyond(tmp_path):
    planner = Planner(sharing(tmp_path, mps=True))
    fresh = planner.plan("fedmt", TASKS, SAMPLES).resources
    near = {t: min(100.0, r + 10) for t, r in fresh.items()}
    far = {t: 10.0 if r > 50 else 100.0 for t, r in fresh.items()}
    kept = planner.plan("fedmt", TASKS, SAMPLES, running=near)
    assert kept.resources == near and "kept the running SM shares" in kept.note
    assert [launch.percent for launch in kept.launches] == [near[a.task] for a in kept.assignments]
    assert planner.plan("fedmt", TASKS, SAMPLES, running=far).resources == fresh
    assert planner.plan("fedmt", TASKS, SAMPLES, running={"a": 50.0}).resources == fresh  # b, c start anew


def test_with_a_predictor_a_restart_happens_only_when_its_predicted_gain_pays_for_it(tmp_path):
    planner = Planner(sharing(tmp_path, mps=True), LawPredictor(), "law", objective="sum")
    samples = {"a": 10, "b": 2000, "c": 4000}  # b and c set the round's length
    fresh = planner.plan("fedmt", TASKS, samples, commit=False)
    assert fresh.resources["b"] > 10 and fresh.resources["c"] > 10
    slow = {t: 10.0 for t in fresh.resources}  # b and c would train far slower
    cheap = planner.plan("fedmt", TASKS, samples, running=slow, restart_cost_s=1e-9, commit=False)
    dear = planner.plan("fedmt", TASKS, samples, running=slow, restart_cost_s=1e9, commit=False)
    assert cheap.resources == fresh.resources
    assert dear.resources == slow and "a restart would not pay" in dear.note


def test_a_look_ahead_plan_leaves_the_damping_state_alone(tmp_path):
    planner = Planner(sharing(tmp_path, mps=True), LawPredictor(), "law")
    planner.plan("fedmt", TASKS, SAMPLES, commit=False)
    assert planner.previous_batches == {}
    planner.plan("fedmt", TASKS, SAMPLES)
    assert set(planner.previous_batches) == {"a", "b", "c"}


def test_policies_without_shares_ignore_the_running_ones(tmp_path):
    planner = Planner(sharing(tmp_path, mps=True))
    plan = planner.plan("isolated", TASKS, SAMPLES, running={t: 90.0 for t in "abc"})
    assert set(plan.resources.values()) == {round(100 / 3, 1)}
