"""Plans that never lose (agent.selection, agent.planning): candidates scored with the predictor and this device's
measurements; an untrusted predictor gives way to measured policies."""

from __future__ import annotations

import numpy as np
import pytest

from agent.history import DeviceHistory
from agent.planning import Planner
from agent.policies import heuristic_shares
from agent.selection import Candidate, candidates, choose
from predictor.features import TaskFeatures
from predictor.records import Record, TaskSample
from tests.test_planning import SAMPLES, TASKS, LawPredictor, sharing


def features(n: int) -> list[TaskFeatures]:
    return [TaskFeatures(f"m{i}", 32, 10, 1e9, 1000, 1000) for i in range(n)]


class Table:
    """A predictor that returns fixed throughputs per R vector (rows of the same n tasks)."""

    def __init__(self, values: dict[tuple[float, ...], list[float]]) -> None:
        self.values = values

    def __call__(self, tasks, batches, resources):
        return np.array([self.values[tuple(row)] for row in resources])


def test_candidates_are_the_search_and_the_static_splits_each_once():
    found = candidates([20.0, 50.0, 90.0], [1.0, 2.0, 3.0])
    assert [c.name for c in found] == ["fedmt", "isolated", "sharing", "heuristic"]
    assert found[1].resources == (33.3, 33.3, 33.3) and found[2].resources == (100.0, 100.0, 100.0)
    assert found[3].resources == tuple(heuristic_shares([1.0, 2.0, 3.0]))
    assert [c.name for c in candidates([100.0, 100.0], [1.0, 1.0])] == [
        "fedmt",
        "isolated",
    ]  # sharing = search
    assert [c.name for c in candidates(None, [1.0, 1.0])] == ["isolated", "sharing"]  # heuristic = sharing


OPTIONS = [
    Candidate("fedmt", (30.0, 70.0)),
    Candidate("isolated", (50.0, 50.0)),
    Candidate("sharing", (100.0, 100.0)),
]
PREDICTED = Table({(30.0, 70.0): [100.0, 100.0], (50.0, 50.0): [80.0, 80.0], (100.0, 100.0): [60.0, 90.0]})
WORK = [1000.0, 1000.0]


def test_a_trusted_model_takes_the_shortest_predicted_makespan():
    choice = choose(OPTIONS, features(2), [16, 16], WORK, PREDICTED, lambda c: None, trust_model=True)
    assert choice.candidate.name == "fedmt" and choice.makespan_s == pytest.approx(10.0)
    assert not choice.measured and "predicted" in choice.note


def test_what_this_device_measured_overrides_the_prediction():
    measured = {"fedmt": [50.0, 120.0]}  # the search's pick ran slower than predicted here
    choice = choose(
        OPTIONS, features(2), [16, 16], WORK, PREDICTED, lambda c: measured.get(c.name), trust_model=True
    )
    assert choice.candidate.name == "isolated" and choice.makespan_s == pytest.approx(12.5)
    measured["isolated"] = [70.0, 70.0]
    measured["sharing"] = [95.0, 95.0]
    again = choose(
        OPTIONS, features(2), [16, 16], WORK, PREDICTED, lambda c: measured.get(c.name), trust_model=True
    )
    assert again.candidate.name == "sharing" and again.measured and "measured here" in again.note


def test_an_untrusted_model_tries_what_was_never_measured_then_keeps_the_best_measured():
    measured: dict[str, list[float]] = {}

    def pick():
        return choose(
            OPTIONS,
            features(2),
            [16, 16],
            WORK,
            PREDICTED,
            lambda c: measured.get(c.name),
            trust_model=False,
            error_note="recent prediction error 40% > 20%",
        )

    tried = []
    for truth in ([50.0, 50.0], [90.0, 90.0], [70.0, 80.0]):  # what each candidate turns out to deliver
        choice = pick()
        assert "recent prediction error 40% > 20%: trying" in choice.note
        tried.append(choice.candidate.name)
        measured[choice.candidate.name] = truth
    assert tried == ["fedmt", "isolated", "sharing"]
    final = pick()
    assert final.candidate.name == "isolated" and final.measured and "best measured isolated" in final.note


def history_with(tmp_path, rounds: list[tuple[dict[str, float], dict[str, float], dict[str, float]]], plan):
    """A device history of rounds that ran `plan`'s batches at given shares: (R, measured, predicted) per task."""
    history = DeviceHistory(tmp_path / "h.jsonl")
    for number, (shares, measured, predicted) in enumerate(rounds, 1):
        history.add(
            Record(
                gpu="g",
                sm_total=100,
                driver=None,
                torch="2",
                resolution=32,
                tasks=[
                    TaskSample(
                        a.model.name,
                        a.batch_size,
                        shares[a.task],
                        measured[a.task],
                        input_size=32,
                        predicted=predicted[a.task],
                    )
                    for a in plan.assignments
                ],
                window_s=1.0,
                ts=float(number),
                round=number,
                policy="x",
            )
        )
    return history


def test_the_planner_drops_a_search_result_its_device_measured_slower_than_a_static_split(tmp_path):
    planner = Planner(sharing(tmp_path, mps=True), LawPredictor(), "law")
    first = planner.plan("fedmt", TASKS, SAMPLES, commit=False)
    assert first.shares == "fedmt" and "fedmt shares" in first.note
    slow = {t: first.predicted[t] / 5 for t in first.predicted}  # the search's shares ran 5x slower here
    planner.history = history_with(tmp_path, [(first.resources, slow, slow)], first)  # accurate predictions
    second = planner.plan("fedmt", TASKS, SAMPLES, commit=False)
    assert second.shares != "fedmt" and second.resources != first.resources
    assert second.policy == "fedmt" and [a.batch_size for a in second.assignments] == [
        a.batch_size for a in first.assignments
    ]


def test_a_planner_whose_predictions_were_off_says_so_and_explores(tmp_path):
    planner = Planner(sharing(tmp_path, mps=True), LawPredictor(), "law", max_error_percent=15.0)
    first = planner.plan("fedmt", TASKS, SAMPLES, commit=False)
    measured = {t: p / 2 for t, p in first.predicted.items()}  # predictions 100% too high
    planner.history = history_with(tmp_path, [(first.resources, measured, first.predicted)], first)
    plan = planner.plan("fedmt", TASKS, SAMPLES, commit=False)
    assert "recent prediction error 100% > 15%: trying isolated, never measured here" in plan.note
    assert plan.shares == "isolated" and set(plan.resources.values()) == {33.3}
