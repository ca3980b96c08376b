"""The round coordinator on its own: opening, deadlines, minimum updates, round limit, restart, initial weights."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
from safetensors.numpy import save_file

from aggregator.config import AggregatorConfig, RoundsConfig, TaskConfig
from aggregator.initial import initial_state
from aggregator.rounds import Coordinator
from protocol import ProtocolError
from protocol.chunking import transfer_info
from protocol.schemas import DeviceProfile, HostInfo, ModelSpec, TaskData, UpdateManifest
from protocol.tensors import encode_state

HOST = HostInfo(hostname="h", os="linux", machine="x86_64", python="3.11", cpu_count=2, memory_bytes=1)
BASE = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "steps": np.array(7, dtype=np.int64)}


@pytest.fixture
def config(tmp_path):
    weights = tmp_path / "init.safetensors"
    save_file(BASE, str(weights))
    task = TaskConfig(model=ModelSpec(name="tiny", num_classes=10, input_size=8), init_weights=str(weights))
    return AggregatorConfig(
        state_dir=str(tmp_path / "state"),
        rounds=RoundsConfig(rounds=2, min_devices=2, min_updates=1, round_timeout_s=100.0),
        tasks={"t": task},
    )


def join(coordinator: Coordinator, device: str, samples: int = 10) -> None:
    coordinator.device_status(device, True)
    profile = DeviceProfile(
        device=device, ts=0, agent_version="x", host=HOST, tasks={"t": TaskData(samples=samples)}
    )
    coordinator.device_profile(profile)


def started(config, samples=(10, 10)) -> Coordinator:
    """A started coordinator with devices d1 and d2 online, holding `samples` of the task."""
    coordinator = Coordinator(config)
    coordinator.start()
    join(coordinator, "d1", samples[0])
    join(coordinator, "d2", samples[1])
    return coordinator


def update(coordinator: Coordinator, tmp_path, device: str, delta: dict, samples: int = 10, round_: int = 1):
    payload = encode_state(delta)
    update_id = uuid.uuid4().hex
    path = tmp_path / f"{update_id}.done"
    path.write_bytes(payload)
    version = coordinator.globals["t"].manifest.version
    manifest = UpdateManifest(
        task="t",
        round=round_,
        device=device,
        update_id=update_id,
        base_version=version,
        samples=samples,
        codec="delta",
        transfer=transfer_info(update_id, payload),
    )
    return coordinator.accept_update(manifest, path)


def delta(value: float) -> dict:
    return {"w": np.full((3, 4), value, np.float32), "steps": np.array(2, dtype=np.int64)}


def test_a_round_opens_only_with_enough_devices_and_schedules_them(config):
    coordinator = Coordinator(config)
    published = coordinator.start().globals
    assert [m.manifest.version for m in published] == [0]
    join(coordinator, "d1")
    assert coordinator.tick(now=1000).schedules == []  # min_devices = 2
    join(coordinator, "d2")
    out = coordinator.tick(now=1000)
    assert sorted(s.device for s in out.schedules) == ["d1", "d2"]
    schedule = out.schedules[0]
    assert (schedule.round, schedule.deadline) == (1, 1100)
    assert schedule.tasks[0].base_sha256 == coordinator.globals["t"].manifest.transfer.sha256


def test_a_task_finalises_when_every_expected_device_reported(config, tmp_path):
    coordinator = started(config, (10, 30))
    coordinator.tick(now=1000)
    assert update(coordinator, tmp_path, "d1", delta(1.0), samples=10).status == "accepted"
    assert coordinator.tick(now=1001).globals == []  # d2 still expected
    assert update(coordinator, tmp_path, "d2", delta(-1.0), samples=30).status == "accepted"
    out = coordinator.tick(now=1002)
    new = out.globals[0]
    assert new.manifest.version == 1
    np.testing.assert_allclose(new.state["w"], BASE["w"] + (10 * 1.0 + 30 * -1.0) / 40, rtol=1e-6)
    assert new.state["steps"] == 9
    assert [s.round for s in out.schedules] == [2, 2]  # round 2 opens right away


def test_the_deadline_finalises_with_min_updates_or_extends_without(config, tmp_path):
    coordinator = started(config)
    coordinator.tick(now=1000)
    assert coordinator.tick(now=1101).globals == []  # nobody reported: the deadline moves
    assert coordinator.round.deadline == pytest.approx(1201)
    update(coordinator, tmp_path, "d1", delta(0.5))
    assert coordinator.tick(now=1150).globals == []  # d2 may still report before the new deadline
    out = coordinator.tick(now=1202)
    assert [m.manifest.version for m in out.globals] == [1]


def test_failed_devices_are_not_waited_for(config, tmp_path):
    coordinator = started(config)
    coordinator.tick(now=1000)
    update(coordinator, tmp_path, "d1", delta(0.5))
    coordinator.task_failed("d2", "t", 1)
    assert [m.manifest.version for m in coordinator.tick(now=1001).globals] == [1]


def test_the_round_limit_stops_the_federation(config, tmp_path):
    coordinator = started(config)
    for number in (1, 2):
        coordinator.tick(now=1000 * number)
        for device in ("d1", "d2"):
            assert update(coordinator, tmp_path, device, delta(0.1), round_=number).status == "accepted"
    out = coordinator.tick(now=5000)
    assert [m.manifest.version for m in out.globals] == [2] and out.schedules == []
    assert coordinator.tick(now=6000).schedules == []


def test_a_restarted_coordinator_resumes_the_open_round(config, tmp_path):
    first = started(config, (10, 30))
    first.tick(now=1000)
    update(first, tmp_path, "d1", delta(1.0), samples=10)
    first.ledger.close()
    second = Coordinator(config)  # same state directory
    resumed = second.start()
    assert [s.round for s in resumed.schedules] == [1, 1]
    update(second, tmp_path, "d2", delta(-1.0), samples=30)
    new = second.tick(now=1001).globals[0]
    np.testing.assert_allclose(new.state["w"], BASE["w"] + (10 * 1.0 + 30 * -1.0) / 40, rtol=1e-6)


def test_initial_weights_come_from_the_configured_file_and_must_be_finite(config, tmp_path):
    task = config.tasks["t"]
    state = initial_state("t", task)
    assert set(state) == {"w", "steps"} and np.array_equal(state["w"], BASE["w"])
    bad = tmp_path / "nan.safetensors"
    save_file({"w": np.array([np.nan], np.float32)}, str(bad))
    with pytest.raises(ProtocolError, match="non-finite"):
        initial_state("t", TaskConfig(model=task.model, init_weights=str(bad)))
    with pytest.raises(FileNotFoundError):
        initial_state("t", TaskConfig(model=task.model, init_weights=str(tmp_path / "absent.safetensors")))


def test_updates_for_unscheduled_devices_or_inflated_samples_are_rejected(config, tmp_path):
    coordinator = started(config)
    coordinator.tick(now=time.time())
    assert "not scheduled" in update(coordinator, tmp_path, "d9", delta(0.1)).reason
    assert "declared 10" in update(coordinator, tmp_path, "d1", delta(0.1), samples=11).reason
    assert coordinator.task_rounds["t"].fedavg.count == 0


def test_the_configured_policy_travels_with_every_schedule(config):
    config.rounds.policy = "isolated"
    coordinator = started(config)
    assert {s.policy for s in coordinator.tick(now=1000).schedules} == {"isolated"}
