"""Simulated fleets (testbed/fleet.py) against a real Mosquitto and the real aggregator: rounds with dropouts and
failures, client sampling that does not wait for stragglers, two aggregators owning different tasks on one
broker, and an aggregator killed with SIGKILL in the middle of a burst of updates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from aggregator.config import AggregatorConfig, RoundsConfig, TaskConfig
from aggregator.ledger import RoundLedger
from aggregator.sampling import SamplingConfig
from aggregator.service import AggregatorService
from protocol.schemas import ModelSpec
from testbed.aggregator_process import AggregatorProcess
from testbed.broker import Mosquitto
from testbed.fleet import Fleet, FleetConfig, FleetStats, TrainTime, fleet_users
from testbed.fleet_audit import audit
from tests.federation import USERS, mqtt, running

pytestmark = [pytest.mark.slow, pytest.mark.broker]
SIZE = 2000  # float32 parameters of every task's model: 8 kB updates
TOLERANCE = 1e-6  # of the aggregate: an update counted twice of 100 moves it by ~1e-5


@pytest.fixture
def fleet_broker(request, tmp_path):
    """A broker that also knows `request.param` simulated devices (`broker.devices`: name -> password)."""
    devices = fleet_users(request.param)
    with Mosquitto(tmp_path / "broker", {**USERS, **devices}) as broker:
        broker.devices = devices
        yield broker


def task(tmp_path: Path, name: str, **fields) -> TaskConfig:
    weights = tmp_path / f"{name}.safetensors"
    save_file({"w": np.zeros(SIZE, np.float32)}, str(weights))
    return TaskConfig(
        model=ModelSpec(name="sim", num_classes=2, input_size=8), init_weights=str(weights), **fields
    )


def aggregator(
    tmp_path: Path, broker, tasks: dict, user: str = "aggregator", sharded: bool = False, **rounds
) -> AggregatorConfig:
    return AggregatorConfig(
        state_dir=str(tmp_path / user),
        mqtt=mqtt(broker, user),
        rounds=RoundsConfig(**{"round_timeout_s": 300.0, **rounds}),
        tasks=tasks,
        sharded=sharded,
    )


def check(state_dir: str, task_name: str, fleet: Fleet, rounds: int, each: range | None = None) -> None:
    """Every round of the task finalised, nothing lost, every recorded update counted exactly once; `each`: how
    many updates a round may record."""
    try:
        fleet.wait(FleetStats.settled, 30, "a receipt for every update")
    except TimeoutError:
        pass  # the audit names what is missing
    audits = fleet.query(lambda stats: audit(Path(state_dir), task_name, fleet.values, stats))
    assert [a.round for a in audits] == list(range(1, rounds + 1))
    for a in audits:
        assert a.lost == [] and a.aggregate_error is not None and a.aggregate_error < TOLERANCE, a
        assert each is None or a.recorded in each, a


@pytest.mark.parametrize("fleet_broker", [30], indirect=True)
def test_a_fleet_with_dropouts_and_failures_completes_its_rounds_and_loses_nothing(tmp_path, fleet_broker):
    config = aggregator(tmp_path, fleet_broker, {"t": task(tmp_path, "t")}, rounds=3, min_devices=30)
    behaviour = FleetConfig(
        tasks={"t": 20},
        train_time=TrainTime(median_s=0.3, spread=0.5, jitter=0.2),
        failure_rate=0.1,
        dropout_rate=0.15,
        dropout_s=(0.5, 1.5),
        seed=3,
    )
    with (
        running(AggregatorService(config)) as services,
        Fleet(fleet_broker.host, fleet_broker.port, fleet_broker.devices, behaviour) as fleet,
    ):
        fleet.wait(lambda s: ("t", 3) in s.global_seen, 180, "global v3", services)
        stats = fleet.query(lambda s: (s.dropouts, [len(s.tasks["t", r].failed) for r in (1, 2, 3)]))
        assert stats[0] > 0 and sum(stats[1]) > 0, "the seed gave no dropout or no failure"
        check(config.state_dir, "t", fleet, 3)


@pytest.mark.parametrize("fleet_broker", [100], indirect=True)
def test_sampling_k_of_100_finishes_rounds_without_waiting_for_the_slowest_tenth(tmp_path, fleet_broker):
    sampling = SamplingConfig(clients=10, over_selection=0.5)
    config = aggregator(
        tmp_path, fleet_broker, {"t": task(tmp_path, "t", sampling=sampling)}, rounds=3, min_devices=100
    )
    slow_s = 20.0  # stragglers: 10% of the devices take 100x the median of 0.2 s
    behaviour = FleetConfig(
        tasks={"t": 20}, train_time=TrainTime(median_s=0.2, spread=0.3, stragglers=0.1, straggler_factor=100)
    )
    with (
        running(AggregatorService(config)) as services,
        Fleet(fleet_broker.host, fleet_broker.port, fleet_broker.devices, behaviour) as fleet,
    ):
        fleet.wait(lambda s: ("t", 3) in s.global_seen, 120, "global v3", services)
        check(config.state_dir, "t", fleet, 3, each=range(10, 16))  # K, and those in before the tick
        with RoundLedger(Path(config.state_dir) / "ledger.sqlite", read_only=True) as ledger:
            selected = set().union(*(ledger.participants(r)["t"] for r in (1, 2, 3)))
            for number in (1, 2, 3):
                record = ledger.get_round(number)
                assert record.tasks["t"].finalized_at - record.opened_at < slow_s / 4, number
        stragglers = {d for d, device in fleet.devices.items() if device.speed > 10}
        assert len(stragglers) == 10 and stragglers & selected, (
            "no straggler was selected: the test shows nothing"
        )

        def stopped(stats) -> bool:  # the schedules of round 3 are cleared just after its global goes out
            return stragglers & selected <= set().union(*(stats.tasks["t", r].cancelled for r in (1, 2, 3)))

        fleet.wait(stopped, 10, "every selected straggler stopped when its round ended")


@pytest.mark.parametrize("fleet_broker", [8], indirect=True)
def test_two_aggregator_processes_owning_different_tasks_run_one_federation(tmp_path, fleet_broker):
    shard = {"sharded": True, "rounds": 2, "min_devices": 8}
    first = aggregator(tmp_path, fleet_broker, {"a": task(tmp_path, "a")}, **shard)
    second = aggregator(tmp_path, fleet_broker, {"b": task(tmp_path, "b")}, user="aggregator-2", **shard)
    behaviour = FleetConfig(tasks={"a": 10, "b": 30}, train_time=TrainTime(median_s=0.2, jitter=0.3))
    with AggregatorProcess(first, tmp_path / "a") as one, AggregatorProcess(second, tmp_path / "b") as two:
        with Fleet(fleet_broker.host, fleet_broker.port, fleet_broker.devices, behaviour) as fleet:
            fleet.wait(at_v2, 120, "both tasks at v2", [one.check_alive, two.check_alive])
            check(first.state_dir, "a", fleet, 2, each=range(8, 9))
            check(second.state_dir, "b", fleet, 2, each=range(8, 9))
            receipts = fleet.query(lambda s: [st for r in s.tasks.values() for st, _ in r.receipts.values()])
    assert set(receipts) == {"accepted"}  # neither aggregator answered for the other's task
    for state_dir, other in ((first.state_dir, "b"), (second.state_dir, "a")):
        with RoundLedger(Path(state_dir) / "ledger.sqlite", read_only=True) as ledger:
            assert other not in ledger.current_round().tasks


@pytest.mark.parametrize("fleet_broker", [100], indirect=True)
def test_an_aggregator_killed_mid_burst_counts_every_update_exactly_once_after_its_restart(
    tmp_path, fleet_broker
):
    config = aggregator(tmp_path, fleet_broker, {"t": task(tmp_path, "t")}, rounds=3, min_devices=100)
    behaviour = FleetConfig(
        tasks={"t": 20}, train_time=TrainTime(median_s=0.5, jitter=0.5), receipt_timeout_s=5.0
    )
    with (
        AggregatorProcess(config, tmp_path / "process") as process,
        Fleet(fleet_broker.host, fleet_broker.port, fleet_broker.devices, behaviour) as fleet,
    ):
        fleet.wait(lambda s: accepted(s, 2) >= 30, 120, "round 2 under way", [process.check_alive])
        process.kill()
        at_kill = fleet.query(lambda s: accepted(s, 2))
        process.start()
        fleet.wait(
            lambda s: ("t", 3) in s.global_seen, 180, "global v3 after the restart", [process.check_alive]
        )
        check(config.state_dir, "t", fleet, 3, each=range(100, 101))
    assert 30 <= at_kill < 100, "the kill did not fall in the middle of round 2's updates"


def accepted(stats, round_: int) -> int:
    record = stats.tasks.get(("t", round_))
    return 0 if record is None else len(record.accepted())


def at_v2(stats) -> bool:
    return ("a", 2) in stats.global_seen and ("b", 2) in stats.global_seen
