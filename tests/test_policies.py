"""Execution policies: what each task process gets (waves, environment, R_i, expected SMs)."""

from __future__ import annotations

import pytest

from agent.mps import MpsConfig, client_env, expected_sm_count
from agent.policies import HEURISTIC_RV, POLICIES, available_policies, policy_launches, split_by_workload

TASKS = ["dense", "vgg", "mobile"]
WORKLOADS = {"dense": 3.0, "vgg": 5.0, "mobile": 1.0}
NO_MPS = {"CUDA_MPS_PIPE_DIRECTORY": "/var/empty/no-mps"}
CONFIG = MpsConfig(pipe_dir="/run/test-mps", log_dir="/run/test-mps-log")


def launches_for(policy, mps=True, resources=None):
    return policy_launches(
        policy,
        TASKS,
        WORKLOADS,
        mps_env=(lambda p: client_env(CONFIG, p)) if mps else None,
        no_mps_env=NO_MPS,
        expected_sms=lambda p: expected_sm_count(132, p),
        resources=resources,
    )


def percents(launches) -> list[float]:
    return [float(launch.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"]) for launch in launches.launches]


def test_temporal_runs_tasks_one_wave_each_without_mps():
    result = launches_for("temporal")
    assert [(launch.task, launch.wave) for launch in result.launches] == [
        ("dense", 0),
        ("vgg", 1),
        ("mobile", 2),
    ]
    assert all(launch.env == NO_MPS and launch.expected_sms is None for launch in result.launches)
    assert result.resources == {}


def test_concurrent_runs_everything_at_once_without_mps():
    result = launches_for("concurrent")
    assert {launch.wave for launch in result.launches} == {0}
    assert all(launch.env == NO_MPS for launch in result.launches)


def test_isolated_splits_the_sms_equally_to_100_percent():
    result = launches_for("isolated")
    assert percents(result) == [33.3, 33.3, 33.3]  # one decimal, so CUDA and the SM check agree
    assert sum(result.resources.values()) == pytest.approx(100, abs=0.2)
    assert [launch.expected_sms for launch in result.launches] == [
        42,
        42,
        42,
    ]  # 33.3% of 132 SMs, H100 rounding
    assert all(launch.env["CUDA_MPS_PIPE_DIRECTORY"] == "/run/test-mps" for launch in result.launches)


def test_sharing_gives_every_task_all_sms():
    result = launches_for("sharing")
    assert percents(result) == [100, 100, 100]
    assert [launch.expected_sms for launch in result.launches] == [132] * 3


def test_fedmt_without_a_predictor_uses_the_workload_heuristic():
    result = launches_for("fedmt")
    shares = percents(result)
    assert sum(shares) == pytest.approx(HEURISTIC_RV, abs=0.2)
    assert shares[1] > shares[0] > shares[2]  # ordered like the workloads
    assert "heuristic" in result.note


def test_fedmt_with_predicted_resources_uses_them():
    result = launches_for("fedmt", resources={"dense": 70.0, "vgg": 40.0, "mobile": 50.0})
    assert percents(result) == [70, 40, 50]
    assert [launch.expected_sms for launch in result.launches] == [92, 52, 66]
    assert "predictor" in result.note


@pytest.mark.parametrize("policy", ["isolated", "sharing", "fedmt"])
def test_mps_policies_fall_back_to_concurrent_without_mps(policy):
    result = launches_for(policy, mps=False)
    assert result.policy == "concurrent"
    assert all(launch.env == NO_MPS and launch.wave == 0 for launch in result.launches)
    assert policy in result.note and "unavailable" in result.note


def test_available_policies_depend_on_mps():
    assert available_policies(True) == list(POLICIES)
    assert available_policies(False) == ["temporal", "concurrent"]


@pytest.mark.parametrize(
    "workloads, rv, expected",
    [
        ([1, 1], 200, [100, 100]),
        ([1, 3], 100, [25, 75]),
        ([1, 1, 2], 200, [50, 50, 100]),
        ([1, 100], 150, [50, 100]),  # the cap moves the excess to the other task
        ([1, 1000], 100, [10, 90]),  # the floor keeps the light task alive
        ([1, 1], 500, [100, 100]),  # R_v above n * 100% is clipped
    ],
)
def test_split_by_workload(workloads, rv, expected):
    assert split_by_workload(workloads, rv) == pytest.approx(expected)


def test_split_by_workload_is_proportional_inside_the_bounds():
    shares = split_by_workload([2.0, 3.0, 5.0], 180)
    assert sum(shares) == pytest.approx(180)
    assert shares[1] / shares[0] == pytest.approx(1.5) and shares[2] / shares[0] == pytest.approx(2.5)


def test_split_by_workload_rejects_non_positive_workloads():
    with pytest.raises(ValueError):
        split_by_workload([1.0, 0.0], 100)
