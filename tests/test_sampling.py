"""Client sampling (aggregator/sampling.py): K of the eligible devices per round with over-selection, fair turns,
slow devices less often; and the coordinator that schedules only the selected and finalises at K."""

from __future__ import annotations

import collections

import pytest

from aggregator.rounds import Coordinator
from aggregator.sampling import Participation, SamplingConfig, select, target
from tests.test_rounds import config, delta, join, update  # noqa: F401 - `config` is a fixture

DEVICES = [f"d{i:03d}" for i in range(100)]


def test_without_sampling_every_eligible_device_trains_and_every_one_is_waited_for():
    assert select(None, "t", 1, ["b", "a"], {}) == ["a", "b"]
    assert target(None, 2) == 2


def test_k_devices_finalise_a_round_that_schedules_k_plus_the_over_selection():
    sampling = SamplingConfig(clients=10, over_selection=0.3)
    chosen = select(sampling, "t", 1, DEVICES, {})
    assert len(chosen) == 13 and set(chosen) <= set(DEVICES) and chosen == sorted(chosen)
    assert target(sampling, len(chosen)) == 10
    assert select(sampling, "t", 1, DEVICES[:12], {}) == DEVICES[:12]  # fewer eligible: all of them
    assert target(sampling, 12) == 10 and target(sampling, 7) == 7
    assert SamplingConfig(clients=10, over_selection=0.0).selected == 10


def test_a_task_with_fewer_eligible_devices_than_its_minimum_sits_the_round_out():
    sampling = SamplingConfig(clients=10, min_clients=5)
    assert select(sampling, "t", 1, DEVICES[:4], {}) == []
    assert select(sampling, "t", 1, DEVICES[:5], {}) == DEVICES[:5]


def test_the_choice_is_seeded_and_differs_between_tasks_and_rounds():
    sampling = SamplingConfig(clients=10)
    first = select(sampling, "t", 1, DEVICES, {})
    assert select(sampling, "t", 1, list(reversed(DEVICES)), {}) == first
    assert select(sampling, "u", 1, DEVICES, {}) != first and select(sampling, "t", 2, DEVICES, {}) != first
    assert select(SamplingConfig(clients=10, seed=1), "t", 1, DEVICES, {}) != first


def run_rounds(
    sampling: SamplingConfig, rounds: int, seconds: dict[str, float | None]
) -> collections.Counter:
    """Select `rounds` rounds in a row, each device reporting after `seconds[device]` (None: never)."""
    history: dict[str, Participation] = {}
    turns: collections.Counter = collections.Counter()
    for number in range(1, rounds + 1):
        for device in select(sampling, "t", number, DEVICES, history):
            turns[device] += 1
            history[device] = Participation(number, seconds.get(device, 1.0))
    return turns


def test_every_device_gets_a_turn_before_any_gets_a_second():
    sampling = SamplingConfig(clients=10, over_selection=0.0)
    assert set(run_rounds(sampling, 10, {}).values()) == {1}
    assert sorted(set(run_rounds(sampling, 15, {}).values())) == [1, 2]


def test_slow_devices_train_about_half_as_often_and_still_get_turns():
    sampling = SamplingConfig(clients=10, over_selection=0.0, slow_factor=2.0)
    slow = {d: 30.0 for d in DEVICES[:10]} | {d: None for d in DEVICES[10:20]}  # too slow, or never reported
    turns = run_rounds(sampling, 40, slow)
    fast = [turns[d] for d in DEVICES[20:]]
    assert min(fast) >= 4 and all(1 <= turns[d] <= 3 for d in DEVICES[:20]), turns
    assert run_rounds(SamplingConfig(clients=10, over_selection=0.0, slow_factor=None), 40, slow)[
        DEVICES[0]
    ] == pytest.approx(4, abs=1)


# --- in the coordinator -------------------------------------------------------------------------------------


def sampled(config, devices: int, **sampling) -> Coordinator:  # noqa: F811
    config.tasks["t"].sampling = SamplingConfig(**sampling)
    coordinator = Coordinator(config)
    coordinator.start()
    for i in range(devices):
        join(coordinator, f"d{i}")
    return coordinator


def test_only_the_selected_are_scheduled_and_k_updates_finalise_the_task(config, tmp_path):  # noqa: F811
    coordinator = sampled(config, 6, clients=2, over_selection=0.5)
    out = coordinator.tick(now=1000)
    selected = sorted(s.device for s in out.schedules)
    assert len(selected) == 3 and all(s.tasks[0].task == "t" for s in out.schedules)
    outsider = next(f"d{i}" for i in range(6) if f"d{i}" not in selected)
    assert update(coordinator, tmp_path, outsider, delta(0.1)).status == "rejected"
    assert update(coordinator, tmp_path, selected[0], delta(0.1)).status == "accepted"
    assert coordinator.tick(now=1001).globals == []
    assert update(coordinator, tmp_path, selected[1], delta(0.3)).status == "accepted"
    out = coordinator.tick(now=1002)
    assert [m.manifest.version for m in out.globals] == [1]  # the third selected is not waited for
    assert sorted(out.cleared_schedules) == [(d, "t") for d in selected]  # it may stop training
    late = update(coordinator, tmp_path, selected[2], delta(0.5))
    assert late.status == "rejected" and "not open" in late.reason


def test_devices_not_selected_last_round_come_first_even_after_a_restart(config, tmp_path):  # noqa: F811
    coordinator = sampled(config, 6, clients=3, over_selection=0.0)
    first = sorted(s.device for s in coordinator.tick(now=1000).schedules)
    for device in first:
        update(coordinator, tmp_path, device, delta(0.1))
    coordinator.ledger.close()
    restarted = Coordinator(config)  # what was selected when comes from the ledger
    restarted.start()
    for i in range(6):
        join(restarted, f"d{i}")
    out = restarted.tick(now=1001)  # round 1 finalises, round 2 opens
    assert [m.manifest.version for m in out.globals] == [1]
    assert sorted(s.device for s in out.schedules) == sorted({f"d{i}" for i in range(6)} - set(first))
